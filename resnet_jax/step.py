"""The train step and what it is made of: the model, the optimiser, the learning-rate schedule,
the train state; the eval step, and the evaluation that training and `resnet-jax eval` share.

The train step is a pure function `(state, batch) -> (state, metrics)` on one global batch;
`parallel.Backend` wraps it for the devices (`create_backend`), and `TrainCalls` is how the loop
(train.py) calls it, one or several steps per compiled call.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from resnet_jax import data, models, optim, parallel, xla_cpu
from resnet_jax.errors import ConfigError
from resnet_jax.metrics import Phase
from resnet_jax.optim import LrSchedule


def create_backend(config, *, seeds: tuple[int, ...] = ()) -> parallel.Backend:
    """The devices of `config` (`parallelism`, `num_devices`; `seeds`: several in one program);
    a setting the devices cannot meet is a ConfigError."""
    try:
        return parallel.create_backend(config.parallelism, config.batch_size, config.num_devices,
                                       seeds=seeds)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def create_model(config, *, num_classes: int, in_channels: int,
                 bn: models.BatchNormConfig | None = None, platform: str | None = None,
                 rngs: nnx.Rngs | None = None):
    """The net of `config`. `platform` (default: JAX's default backend) picks the convolution
    its layers call: on XLA CPU one whose gradients XLA CPU runs fast (xla_cpu.py)."""
    bn = bn or models.BatchNormConfig(momentum=config.bn_momentum)
    scan_blocks = config.scan_blocks
    convolution = xla_cpu.convolution(platform or jax.default_backend(), scan_blocks,
                                      config.cpu_convolution)
    family = models.FAMILIES[config.model]
    return family.build(config.depth, width=config.width,
                        **{k: config[k] for k in family.options}, num_classes=num_classes,
                        in_channels=in_channels, residual=config.residual,
                        shortcut=config.shortcut, preact=models.BLOCKS[config.block],
                        dtype=models.DTYPES[config.dtype], bn=bn, scan_blocks=scan_blocks,
                        convolution=convolution, norm=config.norm, norm_groups=config.norm_groups,
                        residual_init=config.residual_init, rngs=rngs or nnx.Rngs(config.seed))


def create_lr_schedule(config) -> LrSchedule:
    """`config.schedule` after its warm-up (optim.py)."""
    return optim.create_lr_schedule(config)


def create_optimizer(config) -> optax.GradientTransformationExtraArgs:
    """`config.optimizer` (optim.OPTIMIZERS; the default, the paper's SGD with momentum, weight
    decay as an L2 gradient term on every parameter). Each update takes the step's learning
    rate as an argument, `tx.update(grads, opt_state, params, learning_rate=lr)`: where the
    warm-up ends is part of the train state, not a function of the optimizer's step count."""
    return optim.create_optimizer(config)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    # The warm-up (`LrSchedule`): the first step at the full learning rate (lowered by the
    # rule when it ends the warm-up early), and the training errors (%) of the last global
    # batches, the error of step t in row t % warmup_error_window_steps.
    warmup_end_step: jax.Array
    recent_errors: jax.Array


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation,
                       schedule: LrSchedule):
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params),
                       warmup_end_step=jnp.asarray(schedule.warmup_steps, jnp.int32),
                       recent_errors=jnp.zeros((schedule.warmup_error_window_steps,),
                                               jnp.float32))
    return graphdef, state


def make_train_step(graphdef, tx, schedule, axis_name: str | None = None,
                    stage_of_block: tuple[int, ...] | None = None):
    """The pure train step on one global batch (or, under pmap, on this device's share).

    With `stage_of_block` (the model's map from entries of `blocks` to stages) the metrics
    carry the depth diagnostics, computed in the same pass: gradient norm per stage, and the
    vectors `branch_ratio` (||F(x)|| / ||x|| per residual block) and `response_std` (the std of
    every 3x3 layer's response, He et al. 2015, Fig. 7).
    """
    diagnose = stage_of_block is not None

    def loss_fn(params, batch_stats, batch):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)  # fresh Variables per trace
        logits, sown = models.forward(model, batch["image"], train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        error = 100.0 * jnp.mean(jnp.argmax(logits, -1) != batch["label"])
        return loss, (error, nnx.state(model, nnx.BatchStat), sown if diagnose else {})

    def train_step(state: TrainState, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (error, batch_stats, sown)), grads = grad_fn(state.params, state.batch_stats,
                                                            batch)
        grads, loss, error, batch_stats, sown = parallel.pmean_if(
            (grads, loss, error, batch_stats, sown), axis_name)
        lr = schedule(state.step, state.warmup_end_step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, learning_rate=lr)
        params = optax.apply_updates(state.params, updates)
        # From the global batch's error (averaged over devices above): every process agrees.
        warmup_end_step, recent_errors = schedule.end_warmup(
            state.step, state.warmup_end_step, state.recent_errors, error)
        metrics = {"loss": loss, "error": error, "lr": lr, "warmup_end_step": warmup_end_step,
                   "grad_norm": optax.tree.norm(grads)}
        # The loss is measured before the update: whether the state it leaves is finite is
        # checked too, before every save (`train.check_finite`).
        metrics["finite"] = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in
                                               jax.tree.leaves((params, batch_stats))]))
        if diagnose:
            metrics |= _diagnostics(grads, sown, stage_of_block)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state, warmup_end_step=warmup_end_step,
                                  recent_errors=recent_errors)
        return new_state, metrics

    return train_step


def _diagnostics(grads, sown, stage_of_block) -> dict[str, jax.Array]:
    sq = lambda tree: sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree))  # noqa: E731
    per_stage = [0.0] * (max(stage_of_block) + 1)
    for i, stage in enumerate(stage_of_block):
        per_stage[stage] = per_stage[stage] + sq(grads["blocks"][i])
    out = {f"grad_norm/stage{k + 1}": jnp.sqrt(v) for k, v in enumerate(per_stage)}
    # Vectors, one logged key per element (`per_layer_metrics`): slicing them here would add an
    # op per layer to the compiled step.
    return out | {name: v for name, v in sown.items() if v.size}


PER_LAYER = {"response_std": "layer", "branch_ratio": "block"}


def per_layer_metrics(metrics: dict) -> dict:
    """The step's metrics with each per-layer vector as keys `response_std/layer000`, ...
    (fetched values: numpy arrays)."""
    out = {k: v for k, v in metrics.items() if k not in PER_LAYER}
    for name, unit in PER_LAYER.items():
        out |= {f"{name}/{unit}{i:03d}": v for i, v in enumerate(metrics.get(name, ()))}
    return out


def make_eval_step(graphdef):
    """(loss sum, wrong predictions, examples) over one uint8 batch; 'mask' marks the real
    examples of a padded batch."""

    def eval_step(state: TrainState, batch, mean):
        model = nnx.merge(graphdef, state.params, state.batch_stats, copy=True)
        logits, _ = models.forward(model, data.normalize(batch["image"], mean), train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        wrong = jnp.argmax(logits, -1) != batch["label"]
        m = batch["mask"]
        return jnp.stack([jnp.sum(loss * m), jnp.sum(wrong * m), jnp.sum(m)])

    return eval_step


def evaluate(eval_step, state, feed, mean, backend: parallel.Backend, *,
             whole: bool) -> list[dict]:
    """Each run's error (%) and loss on every evaluation split of `feed`: all of each split
    (`whole`, the final evaluation) or its fixed subset (`eval_subset`). `eval_step` is
    `make_eval_step`'s, compiled for `state`'s layout; `mean` the input's mean image. Training's
    evaluations and `resnet-jax eval` both call this, so their numbers are equal."""
    out = [{} for _ in range(len(backend.seeds) or 1)]
    for name in feed.eval_names:
        sums = [eval_step(state, b, mean) for b in feed.eval_batches(name, whole)]
        for k, (loss, wrong, count) in enumerate(backend.runs_of(jax.device_get(sum(sums)))):
            out[k] |= {f"{name}/error": 100.0 * wrong / count, f"{name}/loss": loss / count}
    return out


def create_training(config, backend: parallel.Backend, *, num_classes: int, in_channels: int):
    """(graphdef, state, train_step): the model's state replicated on the backend's devices and
    the train step compiled for it (state in `backend.put_state` layout).

    With several seeds in one program (`backend.seeds`), the state holds one independently
    initialised net per seed, stacked on the seed axis, and the step trains them all at once.
    """
    graphdef, state, train_step = make_training(config, backend, num_classes=num_classes,
                                                in_channels=in_channels)
    return graphdef, state, backend.compile_step(train_step)


def make_training(config, backend: parallel.Backend, *, num_classes: int, in_channels: int):
    """`create_training` with the pure train step, not yet compiled (for
    `backend.compile_step` or `backend.compile_steps`)."""
    bn = models.BatchNormConfig(momentum=config.bn_momentum,
                                **backend.batch_norm_groups(config.bn_group_size))
    schedule = create_lr_schedule(config)
    tx = create_optimizer(config)
    nets = [create_model(config, num_classes=num_classes, in_channels=in_channels, bn=bn,
                         platform=backend.platform, rngs=nnx.Rngs(seed))
            for seed in backend.seeds_of(config.seed)]
    (graphdef, _), *_ = trained = [create_train_state(net, tx, schedule) for net in nets]
    state = backend.stack_runs([s for _, s in trained])  # one graph, the states stacked
    stages = nets[0].stage_of_block if config.log_diagnostics else None
    step = make_train_step(graphdef, tx, schedule, backend.axis_name, stages)
    return graphdef, jax.device_put(state, backend.replicated), step


class TrainCalls:
    """The train steps as the loop calls them: `calls(state, first, count)` runs steps
    first..first+count-1 and returns (state, metrics), `per_step(fetched, count)` the fetched
    metrics as one dict per step.

    `steps_per_call=1`: one compiled call per step on the batch `feed.train_batch(step)` (and
    a second for cutting that batch). K > 1: up to K steps per call (`Backend.compile_steps`),
    each batch cut inside the call by the feed's own computation (`DeviceFeed.traced_batches`:
    the epoch's order drawn once per epoch there too), so the host dispatches once per K steps;
    the same numbers, bit for bit on CPU (tests/test_steps_per_call.py).
    """

    def __init__(self, config, backend: parallel.Backend, train_step, feed):
        self.per_call, self.feed = config.steps_per_call, feed
        self.called = False
        if self.per_call == 1:
            self._step = backend.compile_step(train_step)
        else:
            batch_of, self._data, self._carry_of = feed.traced_batches()
            self._steps = backend.compile_steps(train_step, batch_of, self.per_call)

    def __call__(self, state, first: int, count: int):
        if self.called:
            return self._call(state, first, count)
        # The first call compiles, then runs: each said on stderr, as each takes a while.
        self.called, main = True, jax.process_index() == 0
        with Phase("compiling the train step", "compiled the train step", show=main):
            out = self._call(state, first, count)  # returns once compiled and dispatched
        steps = "train step" if count == 1 else f"{count} train steps"  # steps_per_call
        with Phase(f"running the first {steps}", f"ran the first {steps}", show=main):
            return jax.block_until_ready(out)

    def _call(self, state, first: int, count: int):
        if self.per_call == 1:
            return self._step(state, self.feed.train_batch(first))
        return self._steps(state, self._data, self._carry_of(first), first, count)

    def per_step(self, fetched: dict, count: int) -> list[dict]:
        if self.per_call == 1:
            return [fetched]
        return [jax.tree.map(lambda rows: rows[i], fetched) for i in range(count)]
