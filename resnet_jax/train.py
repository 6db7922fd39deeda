"""The train step and the training loop; `train_and_evaluate(config, workdir)` runs a whole job.

The train step is a pure function `(state, batch) -> (state, metrics)` on one global batch;
`parallel.Backend` wraps it for the devices. Data order and augmentation are functions of
(seed, step), so a resumed run continues exactly where an unbroken one would be.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from resnet_jax import data, models, parallel, pipeline
from resnet_jax.checkpoint import Checkpointer, Preempted, PreemptionWatch
from resnet_jax.metrics import MetricsWriter

BLOCKS = {"post": False, "pre": True}  # block -> pre-activation?
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Keys that may change when a run resumes: they do not change what is computed.
RESUMABLE_KEYS = {"total_steps", "log_every_steps", "log_diagnostics", "eval_every_steps",
                  "eval_subset", "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size",
                  "parallelism", "num_devices", "tfds_data_dir", "max_converged_train_error",
                  "input_threads", "input_workers"}


class ConfigError(ValueError):
    """A config that cannot run. str(e) is one line naming the problem and the fix."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Everything that can be checked before touching data or disk."""
    def need(ok, message):
        if not ok:
            raise ConfigError(message)

    need(config.model in ("cifar", "imagenet"), f"unknown model {config.model!r}: use cifar or "
         "imagenet (pick the config file resnet_jax/configs/cifar.py or imagenet.py)")
    need(config.block in BLOCKS, f"unknown block {config.block!r}: use post or pre")
    need(config.shortcut in models.SHORTCUTS, f"unknown shortcut {config.shortcut!r}: use A, B "
         "or C")
    need(config.dtype in DTYPES, f"unknown dtype {config.dtype!r}: use float32 or bfloat16")
    need(config.parallelism in parallel.BACKENDS,
         f"unknown parallelism {config.parallelism!r}: use jit or pmap")
    for key in ("total_steps", "batch_size", "log_every_steps", "eval_every_steps",
                "checkpoint_every_steps", "eval_batch_size", "keep_checkpoints"):
        need(config[key] > 0, f"{key}={config[key]} must be positive")
    need(config.input_threads > 0 and config.input_workers >= 0,
         f"input_threads={config.input_threads} must be positive and "
         f"input_workers={config.input_workers} at least 0")
    need(not pipeline.is_streamed(config.dataset) or config.get("image_size", 0) > 0,
         f"{config.dataset} is streamed and needs a positive image_size: use "
         "resnet_jax/configs/imagenet.py or set --config.image_size")
    need(config.eval_subset >= 0,
         f"eval_subset={config.eval_subset} must be >= 0 (0 = the whole split)")
    need(config.bn_group_size >= 0 and (config.bn_group_size == 0
                                        or config.batch_size % config.bn_group_size == 0),
         f"bn_group_size={config.bn_group_size} must divide batch_size={config.batch_size} "
         "(0 = the whole batch)")
    need(list(config.lr_boundaries_steps) == sorted(config.lr_boundaries_steps),
         f"lr_boundaries_steps={tuple(config.lr_boundaries_steps)} must be increasing")
    try:
        cifar = config.model == "cifar"
        models.check_architecture(config.model, config.depth,
                                  config.width * (config.base_width if cifar else 1),
                                  cifar and config.bottleneck)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def create_model(config, *, num_classes: int, in_channels: int,
                 bn: models.BatchNormConfig | None = None, rngs: nnx.Rngs | None = None):
    bn = bn or models.BatchNormConfig(momentum=config.bn_momentum)
    if config.model == "cifar":
        family = functools.partial(models.cifar_resnet, base_width=config.base_width,
                                   bottleneck=config.bottleneck)
    else:
        family = models.imagenet_resnet
    return family(config.depth, width=config.width, num_classes=num_classes,
                  in_channels=in_channels, residual=config.residual, shortcut=config.shortcut,
                  preact=BLOCKS[config.block], dtype=DTYPES[config.dtype], bn=bn,
                  scan_blocks=config.get("scan_blocks", False),
                  rngs=rngs or nnx.Rngs(config.seed))


def create_lr_schedule(config):
    """Step-wise: `learning_rate` times `lr_decay_factor` per boundary passed (Sec. 4.2).

    With `warmup_steps`, the first iterations use `warmup_learning_rate` instead (the paper's
    ResNet-110: 0.01 until training error is below 80 %, about 400 iterations, then 0.1).
    """
    boundaries = jnp.asarray(config.lr_boundaries_steps or [np.iinfo(np.int32).max], jnp.int32)

    def schedule(step):
        decays = jnp.sum(step >= boundaries)
        lr = config.learning_rate * config.lr_decay_factor ** decays
        return jnp.where(step < config.warmup_steps, config.warmup_learning_rate, lr)

    return schedule


def create_optimizer(config, schedule) -> optax.GradientTransformation:
    # Weight decay as an L2 gradient term on every parameter, as in the paper's SGD.
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, momentum=config.momentum))


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation):
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params))
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
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "error": error, "lr": schedule(state.step),
                   "grad_norm": optax.tree.norm(grads)}
        if diagnose:
            metrics |= _diagnostics(grads, sown, stage_of_block)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state)
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


def create_training(config, backend: parallel.Backend, *, num_classes: int, in_channels: int,
                    seeds: tuple[int, ...] = ()):
    """(graphdef, state, train_step): the model's state replicated on the backend's devices and
    the train step compiled for it (state in `backend.put_state` layout).

    With `seeds` (and a backend made for len(seeds) of them), the state holds one independently
    initialised net per seed, stacked on a leading axis, and the step trains them all at once.
    """
    bn = backend.batch_norm(config.bn_group_size, config.bn_momentum)
    make = functools.partial(create_model, config, num_classes=num_classes,
                             in_channels=in_channels, bn=bn)
    schedule = create_lr_schedule(config)
    tx = create_optimizer(config, schedule)
    if len(seeds) != backend.seeds:
        raise ValueError(f"{len(seeds)} seeds on a backend made for {backend.seeds}")
    nets = [make(rngs=nnx.Rngs(s)) for s in seeds] or [make()]
    (graphdef, state), *others = [create_train_state(net, tx) for net in nets]
    if seeds:  # one graph, the states stacked
        state = jax.tree.map(lambda *x: jnp.stack(x), state, *(s for _, s in others))
    stages = nets[0].stage_of_block if config.log_diagnostics else None
    step = backend.compile_step(make_train_step(graphdef, tx, schedule, backend.axis_name,
                                                stages))
    return graphdef, jax.device_put(state, backend.replicated), step


def create_feed(config, backend: parallel.Backend, seeds: tuple[int, ...] = ()):
    """The training data as the loop sees it: on the devices (CIFAR-sized sets, data.py) or
    streamed from the hosts, each process reading its share (ImageNet, pipeline.py). With
    `seeds`, one batch per seed (its own order and augmentation), stacked."""
    if pipeline.is_streamed(config.dataset):
        if seeds:
            raise ConfigError(f"{config.dataset} is streamed: train its seeds as separate runs")
        return pipeline.StreamFeed(config, backend)
    ds = data.load(config.dataset, validation_size=config.validation_size,
                   tfds_data_dir=config.tfds_data_dir or None)
    return data.DeviceFeed(ds, config, backend, seeds)


def load_trained(workdir: str | pathlib.Path):
    """(model, config, dataset) of a run's latest checkpoint: for analyses after training.
    The dataset is None for streamed datasets (ImageNet): they are never loaded whole."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "config.json").exists():
        raise ConfigError(f"{workdir} holds no run (no config.json): pass a run's --workdir")
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    data_dir = config.tfds_data_dir or None
    if pipeline.is_streamed(config.dataset):
        ds, num_classes, in_channels = None, pipeline.num_classes(config.dataset, data_dir), 3
    else:
        ds = data.load(config.dataset, validation_size=config.validation_size,
                       tfds_data_dir=data_dir)
        num_classes, in_channels = ds.num_classes, ds.train.images.shape[-1]
    model = create_model(config, num_classes=num_classes, in_channels=in_channels)
    graphdef, state = create_train_state(model, create_optimizer(config,
                                                                 create_lr_schedule(config)))
    if not (workdir / "checkpoints").is_dir():
        raise ConfigError(f"{workdir} has no checkpoints: train it first")
    restored = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints).restore_latest(
        state)
    if restored is None:
        raise ConfigError(f"{workdir} has no readable checkpoint: train it first")
    return nnx.merge(graphdef, restored.params, restored.batch_stats), config, ds


# --- The loop ------------------------------------------------------------------------------


def _check_workdir(workdir: pathlib.Path, config) -> None:
    """Refuses an unwritable workdir or one holding a run of a different config."""
    probe = workdir if workdir.exists() else next(p for p in workdir.parents if p.exists())
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ConfigError(f"workdir {workdir} is not writable: pass a --workdir you can write to")
    saved = workdir / "config.json"
    if saved.exists():
        old, new = json.loads(saved.read_text()), json.loads(config.to_json())
        changed = sorted(k for k in old.keys() | new.keys()
                         if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))
        if changed:
            raise ConfigError(
                f"workdir {workdir} holds a run with a different config ({', '.join(changed)}): "
                "use a new --workdir or the original values")


def _check_finite(fetched_metrics: list[dict], step: int) -> None:
    if not all(np.all(np.isfinite(m["loss"])) for m in fetched_metrics):
        raise FloatingPointError(
            f"loss is not finite by step {step}; training stopped and the last good checkpoint "
            "is kept: lower learning_rate or set warmup_steps")


def _write_json(path: pathlib.Path, obj) -> None:
    if jax.process_index() != 0:
        return
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:  # a full disk leaves neither a half-written file nor its temporary
        tmp.unlink(missing_ok=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the summary."""
    return train_runs([config], [workdir])[0]


def _check_seed_group(configs) -> None:
    first = json.loads(configs[0].to_json())
    for c in configs[1:]:
        other = json.loads(c.to_json())
        changed = sorted(k for k in first.keys() | other.keys()
                         if k != "seed" and first.get(k) != other.get(k))
        if changed:
            raise ConfigError(f"runs trained in one program may differ only in seed, not in "
                              f"{', '.join(changed)}: train them separately")
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"runs trained in one program need distinct seeds, got {seeds}")


def train_runs(configs: list, workdirs: list) -> list[dict]:
    """Trains runs that differ only in their seed, each in its own workdir, resuming each from
    its latest checkpoint; returns their summaries in order.

    Several runs are trained at once in one compiled program (the step mapped over a leading
    seed axis, `parallel.Backend.map_seeds`): each run's workdir ends up as that run alone
    would leave it, up to rounding (tests/test_train.py). Finished runs are skipped; the others
    must resume from one step.
    """
    workdirs = [pathlib.Path(w) for w in workdirs]
    for c in configs:
        check_config(c)
    _check_seed_group(configs)
    summaries = [None] * len(configs)
    for k, (c, w) in enumerate(zip(configs, workdirs)):
        _check_workdir(w, c)
        if (w / "summary.json").exists():
            summary = json.loads((w / "summary.json").read_text())
            if summary["step"] >= c.total_steps:
                print(f"run in {w} already finished at step {summary['step']} "
                      f"(test error {summary['test/error']:.2f}%)", flush=True)
                summaries[k] = summary
    todo = [k for k, s in enumerate(summaries) if s is None]
    if todo:
        trained = _train([configs[k] for k in todo], [workdirs[k] for k in todo])
        for k, summary in zip(todo, trained):
            summaries[k] = summary
    return summaries


def _train(configs: list, workdirs: list[pathlib.Path]) -> list[dict]:
    config, runs = configs[0], range(len(configs))
    seeds = tuple(c.seed for c in configs) if len(configs) > 1 else ()
    # Run k's part of a tree with a leading seed axis (the whole tree when there is none).
    part = (lambda tree, k: jax.tree.map(lambda x: x[k], tree)) if seeds else (lambda t, k: t)
    try:
        backend = parallel.create_backend(config.parallelism, config.batch_size,
                                          config.num_devices, seeds=len(seeds))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # Data before anything is written: a bad dataset must fail first.
    feed = create_feed(config, backend, seeds)
    if feed.num_train < config.batch_size:
        raise ConfigError(f"dataset {config.dataset} has {feed.num_train} training "
                          f"images, fewer than batch_size={config.batch_size}: lower batch_size")
    for c, w in zip(configs, workdirs):
        w.mkdir(parents=True, exist_ok=True)
        _write_json(w / "config.json", json.loads(c.to_json()))

    graphdef, state, train_step = create_training(config, backend, num_classes=feed.num_classes,
                                                  in_channels=feed.in_channels, seeds=seeds)
    checkpointers = [Checkpointer(w / "checkpoints", keep=config.keep_checkpoints)
                     for w in workdirs]
    restored = [ckpt.restore_latest(part(state, k)) for k, ckpt in enumerate(checkpointers)]
    steps = {None if r is None else int(r.step) for r in restored}
    if len(steps) > 1:
        raise ConfigError(
            f"runs trained in one program must resume from one step, but their checkpoints are "
            f"at {', '.join(str(r and int(r.step)) for r in restored)}: train them separately")
    if restored[0] is not None:
        state = jax.tree.map(lambda *x: jnp.stack(x), *restored) if seeds else restored[0]
        for w in workdirs:
            print(f"resuming from step {int(restored[0].step)} in {w}", flush=True)
    start = steps.pop() or 0
    writers = [MetricsWriter(w, total_steps=config.total_steps,
                             label=f"seed {c.seed}: " if seeds else "")
               for c, w in zip(configs, workdirs)]
    for writer in writers:
        writer.truncate(start)
    eval_step = make_eval_step(graphdef)
    eval_step = jax.jit(backend.map_seeds(eval_step, (0, None, None)) if seeds else eval_step,
                        compiler_options=backend.compiler_options)

    def evaluate(global_state, whole: bool) -> list[dict]:
        out = [{} for _ in runs]
        for name in feed.eval_names:
            sums = [eval_step(global_state, b, feed.mean) for b in feed.eval_batches(name, whole)]
            total = jax.device_get(sum(sums))
            for k in runs:
                loss, wrong, count = part(total, k)
                out[k] |= {f"{name}/error": 100.0 * wrong / count, f"{name}/loss": loss / count}
        return out

    state = backend.put_state(state)
    pending, records, t_start, step_start = [], [{} for _ in runs], None, start
    watch = PreemptionWatch()
    try:
        for step in range(start, config.total_steps):
            state, metrics = train_step(state, feed.train_batch(step))
            pending.append(metrics)
            if len(pending) > 2:
                # Let the host run at most two steps ahead: a deeper queue gains nothing, and on
                # simulated CPU devices it can starve a device of threads inside a collective.
                jax.block_until_ready(pending[-3])
            done = step + 1
            if t_start is None:  # the first step compiles: measure speed from after it
                jax.block_until_ready(metrics)
                t_start, step_start = time.perf_counter(), done
            last = done == config.total_steps
            evaluate_now = done % config.eval_every_steps == 0 or last
            save = done % config.checkpoint_every_steps == 0 or last
            preempted = not last and watch.reached(done)  # every process asks at every step
            if done % config.log_every_steps == 0 or evaluate_now:
                fetched, pending = jax.device_get(pending), []
                _check_finite(fetched, done)
                seconds_left, rate = None, None
                if done > step_start:
                    rate = (done - step_start) / (time.perf_counter() - t_start)
                    seconds_left = (config.total_steps - done) / rate
                evaluated = evaluate(backend.get_state(state), whole=last) if evaluate_now else None
                for k in runs:
                    own = [part(m, k) for m in fetched]
                    # Loss and error average the window; the rest (lr, diagnostics): its last step.
                    record = {**per_layer_metrics(own[-1]),
                              "train/loss": np.mean([m["loss"] for m in own]),
                              "train/error": np.mean([m["error"] for m in own])}
                    del record["loss"], record["error"]
                    if rate is not None:
                        record["examples_per_sec"] = rate * config.batch_size
                    if evaluated:
                        record |= evaluated[k]
                    writers[k].write(done, record)
                    writers[k].progress(done, record, seconds_left)
                    records[k] = record
            if save or preempted:
                _check_finite(jax.device_get(pending), done)  # never checkpoint a NaN
                global_state = backend.get_state(state)
                for k, ckpt in enumerate(checkpointers):
                    ckpt.save(done, part(global_state, k))
            if preempted:
                raise Preempted(done, workdirs[0])
    finally:
        feed.close()
        watch.close()
        for closable in (*checkpointers, *writers):
            closable.close()

    return [_finish(c, w, records[k] or writers[k].last_record())
            for k, (c, w) in enumerate(zip(configs, workdirs))]


def _finish(config, workdir: pathlib.Path, final: dict) -> dict:
    """Writes and returns the summary of a run whose last record is `final` (a run restored at
    its last step, killed before writing its summary, trained nothing now: its last record)."""
    summary = {"step": config.total_steps, "train/error": float(final["train/error"]),
               "train/loss": float(final["train/loss"]), "test/error": float(final["test/error"])}
    if "val/error" in final:
        summary["val/error"] = float(final["val/error"])
    summary["converged"] = summary["train/error"] <= config.max_converged_train_error
    summary_path = workdir / "summary.json"
    _write_json(summary_path, summary)
    print(f"finished: train error {summary['train/error']:.2f}%, "
          f"test error {summary['test/error']:.2f}%"
          + ("" if summary["converged"] else " (not converged)") + f" -> {summary_path}",
          flush=True)
    return summary
