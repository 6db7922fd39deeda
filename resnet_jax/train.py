"""The train step and the training loop; `train_and_evaluate(config, workdir)` runs a whole job.

The train step is a pure function `(state, batch) -> (state, metrics)` on one global batch;
`parallel.Backend` wraps it for the devices. Data order and augmentation are functions of
(seed, step), so a resumed run continues exactly where an unbroken one would be.
"""

from __future__ import annotations

import contextlib
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
from jax.extend import core as jax_core

from resnet_jax import data, models, optim, parallel, pipeline, xla_cpu
from resnet_jax.checkpoint import (Checkpointer, NoneReadable, Preempted, PreemptionWatch,
                                   SetupMismatch, WorkdirBusy, WorkdirLock)
from resnet_jax.configs import ADDED_KEYS, cifar, imagenet
from resnet_jax.files import write_atomically
from resnet_jax.metrics import MetricsWriter, Phase
from resnet_jax.optim import LrSchedule

BLOCKS = {"post": False, "pre": True}  # block -> pre-activation?
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Keys that may change when a run resumes: they do not change what is computed.
RESUMABLE_KEYS = {"total_steps", "log_every_steps", "log_diagnostics", "eval_every_steps",
                  "eval_subset", "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size",
                  "parallelism", "num_devices", "tfds_data_dir", "not_converged_fraction_of_chance",
                  "input_threads", "input_workers", "profile_steps", "steps_per_call"}


def resume_changes(old: dict, new: dict) -> list[str]:
    """The keys in which config `new` differs from a run's `old` that a resume refuses: all but
    RESUMABLE_KEYS, and total_steps where the schedule ends there ('cosine')."""
    resumable = RESUMABLE_KEYS - ({"total_steps"} if new.get("schedule") == "cosine" else set())
    return sorted(k for k in old.keys() | new.keys()
                  if k not in resumable and old.get(k) != new.get(k))


class ConfigError(ValueError):
    """A config that cannot run. str(e) is one line naming the problem and the fix."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Everything that can be checked before touching data or disk."""
    def need(ok, message):
        if not ok:
            raise ConfigError(message)

    family = models.FAMILIES.get(config.model)
    try:  # the net (family, depth, widths, shortcut) and the parallelism: checked by their owners
        models.check_architecture(config.model, config.depth, width=config.width,
                                  shortcut=config.shortcut, ablation=dict(
                                      norm=config.norm, norm_groups=config.norm_groups,
                                      residual_init=config.residual_init,
                                      residual=config.residual,
                                      preact=BLOCKS.get(config.block, False)),
                                  **{k: config[k] for k in family.options} if family else {})
        parallel.check_parallelism(config.parallelism)
        optim.check_config(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    need(config.block in BLOCKS, f"unknown block {config.block!r}: use post or pre")
    need(config.dtype in DTYPES, f"unknown dtype {config.dtype!r}: use float32 or bfloat16")
    for key in ("total_steps", "batch_size", "log_every_steps", "eval_every_steps",
                "checkpoint_every_steps", "eval_batch_size", "keep_checkpoints"):
        need(config[key] > 0, f"{key}={config[key]} must be positive")
    need(config.input_threads > 0 and config.input_workers >= 0,
         f"input_threads={config.input_threads} must be positive and "
         f"input_workers={config.input_workers} at least 0")
    need(not pipeline.is_streamed(config.dataset) or config.get("image_size", 0) > 0,
         f"{config.dataset} is streamed and needs a positive image_size: use "
         "resnet_jax/configs/imagenet.py or set --config.image_size")
    need(config.get("image_size", 0) >= 0,
         f"image_size={config.get('image_size')} must be >= 0 (0 = the dataset's own size)")
    need(config.get("train_size", 0) >= 0,
         f"train_size={config.get('train_size')} must be >= 0 (0 = the whole training split)")
    need(config.eval_subset >= 0,
         f"eval_subset={config.eval_subset} must be >= 0 (0 = the whole split)")
    need(config.bn_group_size >= 0 and (config.bn_group_size == 0
                                        or config.batch_size % config.bn_group_size == 0),
         f"bn_group_size={config.bn_group_size} must divide batch_size={config.batch_size} "
         "(0 = the whole batch)")
    # A negative rate, decay or factor would climb the loss instead of descending it.
    for key in ("learning_rate", "warmup_learning_rate", "lr_decay_factor", "weight_decay"):
        need(config[key] >= 0, f"{key}={config[key]} must be >= 0")
    need(0 <= config.momentum < 1, f"momentum={config.momentum} must be in [0, 1) (the paper: 0.9)")
    # Batch norm's running averages keep bn_momentum of the old value per step: at 1 they never
    # leave their initial values, and evaluation would normalise with those.
    need(0 <= config.bn_momentum < 1,
         f"bn_momentum={config.bn_momentum} must be in [0, 1) (the default: 0.9)")
    boundaries = tuple(config.lr_boundaries_steps)
    need(min(boundaries, default=0) >= 0,
         f"lr_boundaries_steps={boundaries} holds a negative step: give steps >= 0")
    need(list(boundaries) == sorted(boundaries),
         f"lr_boundaries_steps={boundaries} must be increasing")
    need(config.warmup_steps >= 0 and config.warmup_error_window_steps >= 1
         and 0 <= config.warmup_until_error <= 100,
         f"warmup_steps={config.warmup_steps} must be >= 0, warmup_error_window_steps="
         f"{config.warmup_error_window_steps} >= 1 and warmup_until_error="
         f"{config.warmup_until_error} a percentage (0 = exactly warmup_steps)")
    profile = tuple(config.get("profile_steps", ()))
    need(profile == () or (len(profile) == 2 and all(isinstance(s, int) for s in profile)
                           and 0 <= profile[0] < profile[1]),
         f"profile_steps={profile} must be () (off) or (first, end), 0 <= first < end: traces "
         "train steps first..end-1, e.g. --config.profile_steps='(100,110)'")
    need(not profile or profile[0] < config.total_steps,
         f"profile_steps={profile} starts at or past total_steps={config.total_steps}: pick "
         "steps the run trains")
    steps_per_call = config.get("steps_per_call", 1)
    need(isinstance(steps_per_call, int) and steps_per_call > 0,
         f"steps_per_call={steps_per_call} must be a positive integer (1 = one compiled call "
         "per train step)")
    # Streamed batches come from host threads one at a time, and a step long enough to stream
    # for (ResNet-50 on ImageNet) is far longer than the ~1 ms a call costs the host.
    need(steps_per_call == 1 or not pipeline.is_streamed(config.dataset),
         f"steps_per_call={steps_per_call} needs a dataset on the devices, but {config.dataset} "
         "is streamed from the hosts (its steps are long enough not to need it): use 1")
    need(0 < config.not_converged_fraction_of_chance <= 1,
         f"not_converged_fraction_of_chance={config.not_converged_fraction_of_chance} must be "
         "in (0, 1] (0.9: a final training error of 90 % of chance's or more did not train)")


# How to get past a damaged file of a run (both are written atomically, so damage comes from
# outside: a cut copy, a full disk on another tool's write, an edit).
_RUN_JSON_FIX = {"summary.json": "delete it and rerun to write it again",
                 "config.json": "restore it, or train in a new --workdir"}
# What readers of summary.json use (a rerun, sweeps, reports), so that an edited one is named here.
_SUMMARY_KEYS = ("step", "train/error", "test/error")


def read_run_json(path: pathlib.Path) -> dict:
    """A run's config.json or summary.json; a file that cannot be read or is not a JSON object
    is a ConfigError naming it and the way out."""
    fix = _RUN_JSON_FIX.get(path.name, "restore or delete it")
    try:
        obj = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror or e}): {fix}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path} is cut short or not JSON ({e}): {fix}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} holds no JSON object: {fix}")
    missing = [key for key in _SUMMARY_KEYS if key not in obj]
    if path.name == "summary.json" and missing:
        raise ConfigError(f"{path} has no {', '.join(map(repr, missing))}: {fix}")
    if path.name == "config.json":  # written before keys whose defaults mean what it ran
        defaults = _config_defaults(obj)
        obj |= {k: defaults[k] for k in ADDED_KEYS if k in defaults and k not in obj}
    return obj


def create_model(config, *, num_classes: int, in_channels: int,
                 bn: models.BatchNormConfig | None = None, platform: str | None = None,
                 rngs: nnx.Rngs | None = None):
    """The net of `config`. `platform` (default: JAX's default backend) picks the convolution
    its layers call: on XLA CPU one whose gradients XLA CPU runs fast (xla_cpu.py)."""
    bn = bn or models.BatchNormConfig(momentum=config.bn_momentum)
    scan_blocks = config.get("scan_blocks", False)
    convolution = xla_cpu.convolution(platform or jax.default_backend(), scan_blocks)
    family = models.FAMILIES[config.model]
    return family.build(config.depth, width=config.width,
                        **{k: config[k] for k in family.options}, num_classes=num_classes,
                        in_channels=in_channels, residual=config.residual,
                        shortcut=config.shortcut, preact=BLOCKS[config.block],
                        dtype=DTYPES[config.dtype], bn=bn, scan_blocks=scan_blocks,
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
        # checked too, before every save (`_check_finite`).
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
    each batch cut inside the call by the feed's own computation, so the host dispatches once
    per K steps; the same numbers, bit for bit on CPU (tests/test_steps_per_call.py).
    """

    def __init__(self, config, backend: parallel.Backend, train_step, feed):
        self.per_call, self.feed = config.get("steps_per_call", 1), feed
        self.called = False
        if self.per_call == 1:
            self._step = backend.compile_step(train_step)
        else:
            batch_of, self._data = traced_batches(feed)
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
        return self._steps(state, self._data, first, count)

    def per_step(self, fetched: dict, count: int) -> list[dict]:
        if self.per_call == 1:
            return [fetched]
        return [jax.tree.map(lambda rows: rows[i], fetched) for i in range(count)]


def traced_batches(feed):
    """(batch_of, data): the feed's batch computation `feed.train_batch(step)` as a pure
    `batch_of(data, step)` of the device arrays it reads (`data`), to be traced into a compiled
    program. Traced once with the step abstract; the arrays (the training set, its mean, the
    keys) become arguments of the program rather than constants compiled into it."""
    closed, shapes = jax.make_jaxpr(feed.train_batch, return_shape=True)(0)
    tree = jax.tree.structure(shapes)

    def batch_of(data, step):
        return jax.tree.unflatten(tree, jax_core.jaxpr_as_fun(
            jax_core.ClosedJaxpr(closed.jaxpr, data))(step))

    return batch_of, list(closed.consts)


def create_feed(config, backend: parallel.Backend):
    """The training data as the loop sees it: on the devices (CIFAR-sized sets, data.py) or
    streamed from the hosts, each process reading its share (ImageNet, pipeline.py). With
    several seeds in one program (`backend.seeds`), one batch per seed (its own order and
    augmentation), stacked."""
    if pipeline.is_streamed(config.dataset):
        if backend.seeds:
            raise ConfigError(f"{config.dataset} is streamed: train its seeds as separate runs")
        return pipeline.StreamFeed(config, backend)
    ds = data.load(config.dataset, validation_size=config.validation_size,
                   tfds_data_dir=config.tfds_data_dir or None,
                   image_size=config.get("image_size", 0),
                   train_size=config.get("train_size", 0))
    return data.DeviceFeed(ds, config, backend)


def restore_trained(workdir: str | pathlib.Path, step: int | None = None):
    """(graphdef, train state, config, dataset, the step read) of a run's latest readable
    checkpoint, or of checkpoint `step` (`resnet_jax.load` is the public way in). The dataset
    is None for streamed datasets (ImageNet): they are never loaded whole.

    Reads only (a damaged newest checkpoint stays where it is, for the run's own rerun to deal
    with) and prints which step it loaded, and so whether it is the one summary.json reports.
    """
    wanted, workdir = step, pathlib.Path(workdir)
    if not (workdir / "config.json").exists():
        raise ConfigError(f"{workdir} holds no run (no config.json): pass a run's --workdir")
    config = ml_collections.ConfigDict(read_run_json(workdir / "config.json"))
    _check_keys(workdir / "config.json", config)
    data_dir = config.tfds_data_dir or None
    if pipeline.is_streamed(config.dataset):
        ds, num_classes, in_channels = None, pipeline.num_classes(config.dataset, data_dir), 3
    else:
        ds = data.load(config.dataset, validation_size=config.validation_size,
                       tfds_data_dir=data_dir, image_size=config.get("image_size", 0),
                       train_size=config.get("train_size", 0))
        num_classes, in_channels = ds.num_classes, ds.train.images.shape[-1]
    model = create_model(config, num_classes=num_classes, in_channels=in_channels)
    graphdef, state = create_train_state(model, create_optimizer(config),
                                         create_lr_schedule(config))
    if not (workdir / "checkpoints").is_dir():
        raise ConfigError(f"{workdir} has no checkpoints: train it first")
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints,
                                read_only=True)
    try:
        latest = checkpointer.latest_step()
        step, restored, _, unreadable = checkpointer.read_latest(
            state, None if wanted is None else (wanted,))
    except SetupMismatch as e:
        raise ConfigError(f"{workdir} holds checkpoints of a different setup ({e}): the data "
                          "or code changed since it was trained") from None
    finally:
        checkpointer.close()
    if restored is None and wanted is not None and latest is not None:
        raise ConfigError(f"checkpoint {wanted} of {workdir} "
                          + ("cannot be read" if unreadable else "does not exist")
                          + f": pick another step, e.g. the latest, {latest}")
    if restored is None:
        raise ConfigError(f"{workdir} has no readable checkpoint: train it first")
    summary = (read_run_json(workdir / "summary.json") if (workdir / "summary.json").exists()
               else {})
    print(f"loaded checkpoint {step} of {workdir}" + (
        f" (its summary.json says step {summary['step']}: the newer checkpoints could not be "
        "read)" if wanted is None and summary.get("step", step) > step else ""), flush=True)
    return graphdef, restored, config, ds, step


def _config_defaults(config) -> ml_collections.ConfigDict:
    """The defaults of the config file of a run's `config` (a dict or ConfigDict)."""
    return (imagenet if config.get("model") == "imagenet" else cifar).get_config()


def _check_keys(path: pathlib.Path, config) -> None:
    """Refuses a run's config that lacks a key of its config file's defaults: one written
    before the key was added, whose value the run was trained with is not known here."""
    defaults = _config_defaults(config)
    missing = sorted(set(defaults.keys()) - set(config.keys()))
    if missing:
        raise ConfigError(
            f"{path} has no {', '.join(missing)} (written before these keys existed): add "
            "them with the values the run was trained with (the defaults: "
            + ", ".join(f"{k}={defaults[k]!r}" for k in missing) + ")")


# --- The loop ------------------------------------------------------------------------------


def _check_workdir(workdir: pathlib.Path, config) -> None:
    """Refuses an unwritable workdir or one holding a run of a different config."""
    probe = workdir if workdir.exists() else next(p for p in workdir.parents if p.exists())
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ConfigError(f"workdir {workdir} is not writable: pass a --workdir you can write to")
    saved = workdir / "config.json"
    if saved.exists():
        changed = resume_changes(read_run_json(saved), json.loads(config.to_json()))
        if changed:
            raise ConfigError(
                f"workdir {workdir} holds a run with a different config ({', '.join(changed)}): "
                "use a new --workdir or the original values")


DATASET_JSON = "dataset.json"  # beside config.json: the facts of the data a run trains on


def _dataset_facts(feed) -> dict:
    """What a run's checkpoints and data order depend on beyond its config: a folder that gained
    a class or some images, or was resized, is other data under the same name."""
    return {"num_classes": feed.num_classes, "image_shape": list(feed.image_shape),
            "num_train": feed.num_train}


def _check_dataset(workdir: pathlib.Path, facts: dict) -> None:
    """Refuses a workdir whose run trained on other data (dataset.json, written by `_train`)."""
    path = workdir / DATASET_JSON
    if not path.exists():  # a new run, or one from before dataset.json: its checkpoints tell
        return
    old = read_run_json(path)
    changed = [f"{k} {old.get(k)} -> {v}" for k, v in facts.items() if old.get(k) != v]
    if changed:
        raise ConfigError(f"workdir {workdir} holds a run on different data ({', '.join(changed)})"
                          ": use a new --workdir, or the data it was trained on")


def _check_finite(fetched_metrics: list[dict], step: int) -> None:
    """Stops at a non-finite loss or a step that left non-finite parameters (`finite`)."""
    loss_ok = all(np.all(np.isfinite(m["loss"])) for m in fetched_metrics)
    if not (loss_ok and all(np.all(m["finite"]) for m in fetched_metrics)):
        raise FloatingPointError(
            f"{'loss is' if not loss_ok else 'parameters are'} not finite by step {step}; "
            "training stopped and the last good checkpoint is kept: train in a new --workdir "
            "with a lower learning_rate or warmup_steps (this one refuses a changed config)")


def _write_json(path: pathlib.Path, obj) -> None:
    if jax.process_index() != 0:
        return
    write_atomically(path, json.dumps(obj, indent=2) + "\n")  # a full disk: no half a file


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       restart: bool = False) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the summary.
    `restart`: when checkpoints exist but none can be read, set them aside, start from step 0."""
    return train_runs([config], [workdir], restart=restart)[0]


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


def _check_one_config_in_every_process(configs) -> None:
    """Stops every process of a job launched with different configs before anything is written:
    one with another learning_rate would train with it unseen (process 0 writes config.json),
    one with another total_steps would leave the others waiting in a collective."""
    values = {key + (f" (run {k})" if len(configs) > 1 else ""): json.dumps(value)
              for k, c in enumerate(configs) for key, value in json.loads(c.to_json()).items()}
    differing = parallel.differing_from_process_0(values)
    if differing:
        raise ConfigError("the processes of this job have different configs (" + "; ".join(
            f"process {p} differs from process 0 in {', '.join(keys)}"
            for p, keys in differing.items()) + "): launch every process with the same command")


def train_runs(configs: list, workdirs: list, *, restart: bool = False) -> list[dict]:
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
    _check_one_config_in_every_process(configs)
    summaries = [None] * len(configs)
    for k, (c, w) in enumerate(zip(configs, workdirs)):
        _check_workdir(w, c)
        if (w / "summary.json").exists():
            summary = read_run_json(w / "summary.json")
            if summary["step"] >= c.total_steps:
                if jax.process_index() == 0:
                    print(f"run in {w} already finished at step {summary['step']} "
                          f"(test error {summary['test/error']:.2f}%)", flush=True)
                summaries[k] = summary
    todo = [k for k, s in enumerate(summaries) if s is None]
    if todo:
        trained = _train([configs[k] for k in todo], [workdirs[k] for k in todo], restart)
        for k, summary in zip(todo, trained):
            summaries[k] = summary
    return summaries


def _train(configs: list, workdirs: list[pathlib.Path], restart: bool) -> list[dict]:
    """Trains runs that passed `train_runs`' checks from their common step; their summaries."""
    with contextlib.ExitStack() as held:  # the workdirs' locks, released however it ends
        training = _Training(held, configs, workdirs, restart)
        training.loop()
        return [_finish(c, w, record, training.feed.num_classes)
                for c, w, record in zip(configs, workdirs, training.final_records())]


class _Training:
    """One training program: its runs (one, or several seeds at once: `parallel.Backend.seeds`),
    their data, compiled step, checkpoints and outputs. Built by checking everything that can
    refuse the runs before writing anything; `loop` then trains them from their common step."""

    def __init__(self, held: contextlib.ExitStack, configs: list, workdirs: list[pathlib.Path],
                 restart: bool):
        config = self.config = configs[0]
        self.workdirs = workdirs
        # Several runs are several seeds in one program; one run has no seed axis.
        seeds = tuple(c.seed for c in configs) if len(configs) > 1 else ()
        try:
            backend = self.backend = parallel.create_backend(
                config.parallelism, config.batch_size, config.num_devices, seeds=seeds)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # Data before anything is written: a bad dataset must fail first.
        self.feed = create_feed(config, backend)
        if self.feed.num_train < config.batch_size:
            raise ConfigError(f"dataset {config.dataset} has {self.feed.num_train} training "
                              f"images, fewer than batch_size={config.batch_size}: lower "
                              "batch_size")
        facts = _dataset_facts(self.feed)
        self.locks = _lock_workdirs(held, configs, workdirs, facts)
        graphdef, state, train_step = make_training(
            config, backend, num_classes=self.feed.num_classes,
            in_channels=self.feed.in_channels)
        self.calls = TrainCalls(config, backend, train_step, self.feed)
        self.checkpointers = [Checkpointer(w / "checkpoints", keep=config.keep_checkpoints)
                              for w in workdirs]
        self.start, state, windows = _restore(self.checkpointers, workdirs, backend, state,
                                              restart, config.total_steps)
        # Only now that every check has passed: a refused rerun leaves the run as it was.
        for c, w in zip(configs, workdirs):
            _write_json(w / "config.json", json.loads(c.to_json()))
            _write_json(w / DATASET_JSON, facts)
            if jax.process_index() == 0:  # the net's input, for `resnet_jax.load` and eval
                self.feed.preprocessing.save(w)
        self.writers = [MetricsWriter(w, total_steps=config.total_steps,
                                      label=f"seed {c.seed}: " if backend.seeds else "",
                                      config=json.loads(c.to_json()))
                        for c, w in zip(configs, workdirs)]
        for writer in self.writers:
            writer.truncate(self.start)
        # The step of each run's last record: the record after the warm-up's end names it.
        self.logged = [writer.last_record().get("step", 0) for writer in self.writers]
        for w, window, logged in zip(workdirs, windows, self.logged):
            if window is None and logged < self.start:
                print(f"checkpoint {self.start} in {w} holds no record window (written by an "
                      f"older version): the next record averages the steps from "
                      f"{self.start} on, not from {logged}", flush=True)
        # Each run's steps since its last record that are not in `pending` (restored ones).
        self.carried = [_window_steps(w or _EMPTY_WINDOW) for w in windows]
        self.eval_step = jax.jit(backend.map_seeds(make_eval_step(graphdef), (0, None, None)),
                                 compiler_options=backend.compiler_options)
        self.state = backend.put_state(state)
        self.records = [{} for _ in workdirs]  # each run's last record written here
        self.clock = _Clock(self.start, config)
        self.profile = _Profile(config, workdirs[0], self.start)
        self._evaluate_lost_final_records()

    def loop(self) -> None:
        """call -> log -> evaluate -> save, from the runs' common step to `total_steps`; each
        call trains up to `steps_per_call` steps (`TrainCalls`) and ends where a step is logged,
        evaluated or saved (`_call_end`)."""
        config, pending, watch = self.config, [], PreemptionWatch()
        try:
            step = self.start
            while step < config.total_steps:
                done = self._call_end(step)
                with self.profile.step(step):
                    self.state, metrics = self.calls(self.state, step, done - step)
                self.profile.stepped(done - 1, (self.state, metrics))
                pending.append((metrics, done - step))  # on the device until a record needs it
                if len(pending) > 2:
                    # Let the host run at most two calls ahead: a deeper queue gains nothing, and
                    # on simulated CPU devices it can starve a device of threads in a collective.
                    jax.block_until_ready(pending[-3][0])
                self.clock.stepped(done, metrics)
                last = done == config.total_steps
                evaluate = done % config.eval_every_steps == 0 or last
                save = done % config.checkpoint_every_steps == 0 or last
                preempted = not last and watch.reached(done)  # every process, at every call
                if done % config.log_every_steps == 0 or evaluate:
                    fetched, pending = self._fetch(pending), []
                    _check_finite(fetched, done)
                    speed = self.clock.speed(done)  # of the train steps alone: before evaluating
                    evaluated = (self.clock.aside("eval_seconds", self.evaluate, whole=last)
                                 if evaluate else None)
                    self.log(done, fetched, speed, evaluated)
                if save or preempted:
                    fetched = self._fetch(pending)
                    _check_finite(fetched, done)  # never checkpoint a NaN
                    self.clock.aside("checkpoint_seconds", self.save, done, fetched)
                if preempted:
                    raise Preempted(done, self.workdirs[0], watch.signum)
                step = done
        finally:
            self.profile.close()  # a run stopped inside the window still leaves its trace
            self.feed.close()
            watch.close()
            for closable in (*self.checkpointers, *self.writers):
                closable.close()

    def _call_end(self, step: int) -> int:
        """The step after the call that starts at `step`: `steps_per_call` steps later, or
        sooner at the next step that ends the run, is logged, evaluated or saved, or starts or
        ends the profile, so that those fall between calls (a call then trains fewer steps)."""
        c = self.config
        ends = [(step // every + 1) * every for every in
                (c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps)]
        ends += [end for end in self.profile.edges if end > step]
        return min(step + self.calls.per_call, c.total_steps, *ends)

    def _fetch(self, pending: list[tuple]) -> list[dict]:
        """The metrics of the calls in `pending` on the host, one dict per step, in order."""
        fetched = jax.device_get([metrics for metrics, _ in pending])
        return [m for f, (_, count) in zip(fetched, pending)
                for m in self.calls.per_step(f, count)]

    def log(self, done: int, fetched: list[dict], speed, evaluated: list[dict] | None) -> None:
        """Writes each run's record of the steps since the last (`fetched`, their metrics): loss
        and error averaged over them, the rest (lr, diagnostics) of the last; and `evaluated`."""
        _check_locks(self.locks)
        rate, seconds_left = speed
        timings = self.clock.take_timings()
        per_step = [self.backend.runs_of(m) for m in fetched]
        for k, writer in enumerate(self.writers):
            own = [runs[k] for runs in per_step]
            window = self.carried[k] + own
            record = {**per_layer_metrics(own[-1]),
                      "train/loss": np.mean([m["loss"] for m in window]),
                      "train/error": np.mean([m["error"] for m in window])}
            del record["loss"], record["error"], record["finite"]
            warmup_end = int(record.pop("warmup_end_step"))
            if self.logged[k] < warmup_end <= done:
                record["warmup_end_step"] = warmup_end  # the last step warmed up
            self.logged[k] = done
            record["time"] = time.time()
            if rate is not None:
                record["examples_per_sec"] = rate * self.config.batch_size
            record |= (evaluated[k] if evaluated else {}) | timings
            writer.write(done, record)
            writer.progress(done, record, seconds_left)
            self.records[k] = record
        self.carried = [[] for _ in self.workdirs]

    def evaluate(self, whole: bool) -> list[dict]:
        """Each run's error (%) and loss on every evaluation split; `whole`: all of each split,
        else the fixed subset (`eval_subset`)."""
        global_state = self.backend.get_state(self.state)
        out = [{} for _ in self.workdirs]
        for name in self.feed.eval_names:
            sums = [self.eval_step(global_state, b, self.feed.mean)
                    for b in self.feed.eval_batches(name, whole)]
            for k, (loss, wrong, count) in enumerate(self.backend.runs_of(
                    jax.device_get(sum(sums)))):
                out[k] |= {f"{name}/error": 100.0 * wrong / count, f"{name}/loss": loss / count}
        return out

    def save(self, done: int, fetched: list[dict]) -> None:
        """Checkpoints each run at `done` with its record window: the steps since its last
        record, those restored and `fetched` (the metrics of the steps not yet logged)."""
        _check_locks(self.locks)
        global_state = self.backend.get_state(self.state)
        per_step = [self.backend.runs_of(m) for m in fetched]
        for k, (checkpointer, state) in enumerate(zip(self.checkpointers,
                                                      self.backend.runs_of(global_state))):
            window = self.carried[k] + [runs[k] for runs in per_step]
            checkpointer.save(done, state, {key: [float(m[key]) for m in window]
                                            for key in _EMPTY_WINDOW})

    def _evaluate_lost_final_records(self) -> None:
        """A run restored at its last step whose final record is lost (killed between its last
        checkpoint and the record) gets its final state evaluated again; the training error
        stays the last one logged (a mean over steps that are not trained again)."""
        lasts = [writer.last_record() for writer in self.writers]
        lost = [k for k, last in enumerate(lasts) if self.start == self.config.total_steps
                and not (last.get("step") == self.start and "test/error" in last)]
        if lost:
            evaluated = self.evaluate(whole=True)
            for k in lost:
                print(f"run in {self.workdirs[k]} is at its last step {self.start} but its final "
                      f"record is lost: evaluating it (train error of step "
                      f"{lasts[k].get('step')})", flush=True)
                self.records[k] = {"train/loss": lasts[k].get("train/loss", np.nan),
                                   "train/error": lasts[k].get("train/error", np.nan),
                                   **evaluated[k]}

    def final_records(self) -> list[dict]:
        """Each run's last record: written here, else (nothing trained now) its file's."""
        return [record or writer.last_record()
                for record, writer in zip(self.records, self.writers)]


class _Clock:
    """The loop's wall-clock measurements (metrics.TIMING_KEYS): the train steps' speed, with
    evaluations and saves kept out, and the seconds those took."""

    def __init__(self, start: int, config):
        self.total_steps, self.batch_size = config.total_steps, config.batch_size
        self.t_start, self.step_start = None, start
        self.seconds_aside = 0.0  # since t_start, spent evaluating and checkpointing
        self.timings = {}  # seconds per kind since the last record

    def stepped(self, done: int, metrics) -> None:
        if self.t_start is None:  # the first step compiles: measure speed from after it
            jax.block_until_ready(metrics)
            self.t_start, self.step_start = time.perf_counter(), done

    def speed(self, done: int) -> tuple[float | None, float | None]:
        """(train steps per second, seconds left) at step `done`; None before a timed step."""
        if done <= self.step_start:
            return None, None
        elapsed, steps = time.perf_counter() - self.t_start, done - self.step_start
        return steps / (elapsed - self.seconds_aside), (self.total_steps - done) * elapsed / steps

    def aside(self, key: str, fn, *args, **kwargs):
        """`fn(...)`, its seconds added to `key` and kept out of the speed."""
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
        self.seconds_aside += seconds
        self.timings[key] = self.timings.get(key, 0.0) + seconds
        return result

    def take_timings(self) -> dict:
        """The seconds per kind since the last record (eval_seconds, checkpoint_seconds)."""
        out = {k: self.timings[k] for k in ("eval_seconds", "checkpoint_seconds")
               if k in self.timings}
        self.timings = {}
        return out


class _Profile:
    """`profile_steps=(first, end)`: a jax.profiler trace of train steps first..end-1 written
    to WORKDIR/profile (TensorBoard's profile plugin reads its .xplane.pb, ui.perfetto.dev its
    perfetto_trace.json.gz). Each step is a `train_step` step annotation with its number, so the
    viewers mark and time the steps (with `steps_per_call` > 1, each call: its steps together,
    named by the first). Only the steps this run trains are traced: a resume past
    the window traces nothing, one inside it the rest, and a run ending inside it stops there.

    Process 0 traces (the profiler is per process and needs no other to take part; every
    process writing the same folder would collide); several seeds in one program trace once,
    into the first run's workdir."""

    def __init__(self, config, workdir: pathlib.Path, start: int):
        first, end = config.get("profile_steps", ()) or (0, 0)
        steps = range(max(first, start), min(end, config.total_steps))
        # Where the trace starts and stops, on every process alike (all make the same calls):
        # calls of several steps end there.
        self.edges = (steps.start, steps.stop) if steps else ()
        self.window = steps if jax.process_index() == 0 else range(0)
        self.dir, self.tracing, self.last = workdir / "profile", False, None

    def step(self, step: int):
        """Around one call of the train step (one step, or with `steps_per_call` several, from
        `step` on): starts the trace at the window's first step, names the call by `step`."""
        if step not in self.window:  # off (an empty window) or outside it: this test only
            return contextlib.nullcontext()
        if step == self.window.start:
            jax.profiler.start_trace(self.dir, create_perfetto_trace=True)
            self.tracing = True
        self.last = step
        return jax.profiler.StepTraceAnnotation("train_step", step_num=step)

    def stepped(self, step: int, outputs) -> None:
        """After the dispatch of the call whose last step is `step`: at the window's last step,
        waits for `outputs` so that the device work is in the trace, then writes it."""
        if self.tracing:
            self.last = step
        if self.tracing and step + 1 == self.window.stop:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()
            print(f"profile of steps {self.window.start}-{self.last} -> {self.dir}", flush=True)


def _lock_workdirs(held: contextlib.ExitStack, configs, workdirs, facts: dict) -> list:
    """Creates and locks each run's workdir (held until `held` closes), checking again that it
    holds this config's run on this data: another trainer may have just written it. The locks,
    for `_check_locks`."""
    locks = []
    for c, w in zip(configs, workdirs):
        w.mkdir(parents=True, exist_ok=True)
        try:
            locks.append(held.enter_context(WorkdirLock(w)))
        except WorkdirBusy as e:
            raise ConfigError(str(e)) from None
        _check_workdir(w, c)
        _check_dataset(w, facts)
    return locks


def _check_locks(locks) -> None:
    """Before a write: each workdir is still this trainer's (`WorkdirLock.check`)."""
    for lock in locks:
        try:
            lock.check()
        except WorkdirBusy as e:
            raise ConfigError(str(e)) from None


def _restore(checkpointers, workdirs, backend, state, restart: bool, total_steps: int):
    """(start step, state, windows): each run's latest readable checkpoint, all at one step,
    stacked as `state` is, and each run's record window (`Checkpointer.save`; None for a
    checkpoint written without one); none: (0, `state`, empty windows)."""
    restored = []
    for w, checkpointer, initial in zip(workdirs, checkpointers, backend.runs_of(state)):
        try:
            restored.append(checkpointer.restore_latest(initial, restart=restart))
        except SetupMismatch as e:  # a changed dataset or model, not damage: nothing is moved
            raise ConfigError(f"workdir {w} holds checkpoints of a different setup ({e}): use a "
                              "new --workdir, or the data and config it was trained with") from None
        except NoneReadable as e:
            raise ConfigError(f"{e}: rerun with --restart to set them aside and train from step "
                              "0, or use a new --workdir") from None
    steps = {None if r is None else int(r[0].step) for r in restored}
    if len(steps) > 1:
        raise ConfigError(
            f"runs trained in one program must resume from one step, but their checkpoints are "
            f"at {', '.join(str(r and int(r[0].step)) for r in restored)}: train them "
            "separately")
    start = steps.pop() or 0
    if start > total_steps:  # its summary would name a step it is not at
        raise ConfigError(f"workdir {workdirs[0]} holds checkpoint {start}, past total_steps="
                          f"{total_steps}: pass --config.total_steps={start} or more, or use a "
                          "new --workdir")
    if restored[0] is None:
        return 0, state, [_EMPTY_WINDOW for _ in workdirs]
    for w in workdirs:
        print(f"resuming from step {start} in {w}", flush=True)
    return start, backend.stack_runs([r[0] for r in restored]), [r[1] for r in restored]


# A run's record window: the loss and error of each step since its last record, which the next
# record averages (`_Training.log`); stored with each checkpoint, so that a run resumed at a step
# between two records logs what an unbroken run logs.
_EMPTY_WINDOW = {"loss": [], "error": []}


def _window_steps(window: dict) -> list[dict]:
    """A stored record window as the loop keeps it: one {loss, error} per step, float32 as the
    train step returned them (so that the record's mean is the unbroken run's, bit for bit)."""
    return [{"loss": np.float32(loss), "error": np.float32(error)}
            for loss, error in zip(window["loss"], window["error"], strict=True)]


def _finish(config, workdir: pathlib.Path, final: dict, num_classes: int) -> dict:
    """Writes and returns the summary of a run whose last record is `final` (a run restored at
    its last step, killed before writing its summary, trained nothing now: its last record)."""
    summary = {"step": config.total_steps, "train/error": float(final["train/error"]),
               "train/loss": float(final["train/loss"]), "test/error": float(final["test/error"])}
    if "val/error" in final:
        summary["val/error"] = float(final["val/error"])
    # Not converged: the net did not train (the paper's failed runs), its final training error
    # (the last logging window's mean) at least `not_converged_fraction_of_chance` of chance's.
    threshold = config.not_converged_fraction_of_chance * 100.0 * (1 - 1 / num_classes)
    summary["not_converged_from_train_error"] = threshold
    summary["converged"] = summary["train/error"] < threshold
    summary_path = workdir / "summary.json"
    _write_json(summary_path, summary)
    if jax.process_index() == 0:  # one result line per run, not one per process
        print(f"finished: train error {summary['train/error']:.2f}%, "
              f"test error {summary['test/error']:.2f}%"
              + ("" if summary["converged"] else " (not converged)") + f" -> {summary_path}",
              flush=True)
    return summary
