"""Optimisers and learning-rate schedules by name: `config.optimizer` and `config.schedule`.

Each optimiser is an optax chain (`OPTIMIZERS`, one entry per name, as `models.FAMILIES` is for
nets) whose learning rate is not built in but passed to every update,
`tx.update(grads, opt_state, params, learning_rate=lr)`: where the warm-up ends is part of the
train state (`LrSchedule`), not a function of the optimiser's step count. With a constant rate
each computes what the optax optimiser of its name computes (tests/test_optim.py).

Weight decay follows each optimiser's usual recipe (docs/training.md):
- sgd, nesterov: an L2 term on every parameter, batch-norm scales and biases included, as in the
  paper's SGD (and Torch's fb.resnet.torch, which it trained with);
- adamw, lars: decoupled decay (and for LARS the trust ratio) on the conv and dense kernels
  only, not on normalisation scales, biases or the scalars of fixup and skipinit, as the usual
  large-batch recipes do (Goyal et al. 2017 leave batch norm's scale and bias out of the decay;
  LARS implementations since You et al. 2017 leave them and the biases out of decay and trust
  ratio alike).

Schedules (`SCHEDULES`): the learning rate after the warm-up, as a function of the step. 'step'
is the paper's (`learning_rate` times `lr_decay_factor` per boundary passed), 'cosine' decays
`learning_rate` to 0 at `total_steps` along a half cosine (Loshchilov & Hutter 2017) starting
where the warm-up ends at the latest, `warmup_steps`. The warm-up before either is
`warmup_shape`: 'constant' at `warmup_learning_rate` (the paper's ResNet-110), or 'linear' from
`warmup_learning_rate` to `learning_rate` over `warmup_steps` (Goyal et al. 2017); either may be
ended early by the paper's error rule (`warmup_until_error`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


def scale_by_learning_rate() -> optax.GradientTransformationExtraArgs:
    """-learning_rate times the updates, the rate given to each update as an argument."""

    def update(updates, state, params=None, *, learning_rate, **extra_args):
        del params, extra_args
        return jax.tree.map(lambda u: jnp.asarray(-learning_rate, u.dtype) * u, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def kernels(params):
    """True on the conv and dense kernels (parameters of 2 or more dimensions), False on
    normalisation scales, biases and scalars: what adamw and lars decay."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optimiser as a config names it: `build(config)` gives its optax chain with the
    learning rate passed to each update (`scale_by_learning_rate`); `keys` are the config keys
    it reads beyond learning_rate, for docs and checks."""

    build: Callable[..., optax.GradientTransformationExtraArgs]
    keys: tuple[str, ...]


def _sgd(config, nesterov: bool = False):
    # The paper's SGD: weight decay as an L2 gradient term on every parameter, then momentum.
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.trace(decay=config.momentum, nesterov=nesterov),
                       scale_by_learning_rate())


def _adamw(config):
    # optax.adamw's chain (Loshchilov & Hutter 2019): b1 is `momentum`.
    return optax.chain(optax.scale_by_adam(b1=config.momentum, b2=config.adam_b2),
                       optax.add_decayed_weights(config.weight_decay, mask=kernels),
                       scale_by_learning_rate())


def _lars(config):
    # optax.lars's chain (You et al. 2017): decay and trust ratio on the kernels, the rate
    # applied before the momentum.
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=kernels),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=config.lars_trust_coefficient,
                                                eps=0.0), kernels),
        scale_by_learning_rate(),
        optax.trace(decay=config.momentum))


# A new optimiser: its chain above and one entry here (docs/training.md lists them).
OPTIMIZERS = {
    "sgd": Optimizer(_sgd, ("momentum", "weight_decay")),
    "nesterov": Optimizer(lambda config: _sgd(config, nesterov=True), ("momentum", "weight_decay")),
    "adamw": Optimizer(_adamw, ("momentum", "adam_b2", "weight_decay")),
    "lars": Optimizer(_lars, ("momentum", "lars_trust_coefficient", "weight_decay")),
}
WARMUP_SHAPES = ("constant", "linear")


def create_optimizer(config) -> optax.GradientTransformationExtraArgs:
    return OPTIMIZERS[config.optimizer].build(config)


@dataclasses.dataclass(frozen=True)
class LrSchedule:
    """`schedule` after a warm-up of shape `warmup_shape` (module docstring).

    The warm-up lasts `warmup_steps` steps. With `warmup_until_error` > 0 it follows the paper's
    rule for ResNet-110 (lr 0.01 "until the training error is below 80 %", about 400 iterations,
    then 0.1) and `warmup_steps` is its cap: it ends after the first step at which the training
    error is below `warmup_until_error`. The training error here is the mean error (%) of the
    last `warmup_error_window_steps` global batches, each measured in its own train step before
    the update (the paper does not say; one batch's error is noisy), judged only once that many
    steps have run. The train state holds where the warm-up ends and the errors it is judged on
    (`step.TrainState`), so every process and every resume switches at the same step.
    """

    learning_rate: float
    lr_decay_factor: float
    lr_boundaries_steps: tuple[int, ...]
    warmup_learning_rate: float
    warmup_steps: int
    warmup_until_error: float
    warmup_error_window_steps: int
    schedule: str = "step"
    warmup_shape: str = "constant"
    total_steps: int = 0  # where 'cosine' reaches 0

    def __call__(self, step, warmup_end_step=None):
        """The learning rate of `step` (0-based) when the warm-up ends at `warmup_end_step`
        (the first step at the full rate; by default `warmup_steps`)."""
        lr = SCHEDULES[self.schedule](self, step)
        end = self.warmup_steps if warmup_end_step is None else warmup_end_step
        warm = (self.warmup_learning_rate if self.warmup_shape == "constant" else
                optax.linear_schedule(self.warmup_learning_rate, self.learning_rate,
                                      self.warmup_steps)(step))
        return jnp.where(step < end, warm, lr)

    def end_warmup(self, step, warmup_end_step, recent_errors, error):
        """(warmup_end_step, recent_errors) after `step`, whose global batch had `error` %."""
        window = self.warmup_error_window_steps
        recent_errors = recent_errors.at[step % window].set(error)
        if not self.warmup_until_error:
            return warmup_end_step, recent_errors
        ends = ((step < warmup_end_step) & (step + 1 >= window)
                & (jnp.mean(recent_errors) < self.warmup_until_error))
        return jnp.where(ends, step + 1, warmup_end_step), recent_errors


def _step_decay(s: LrSchedule, step):
    """The paper's: `learning_rate` times `lr_decay_factor` per boundary passed (Sec. 4.2)."""
    boundaries = jnp.asarray(s.lr_boundaries_steps or [np.iinfo(np.int32).max], jnp.int32)
    return s.learning_rate * s.lr_decay_factor ** jnp.sum(step >= boundaries)


def _cosine_decay(s: LrSchedule, step):
    """`learning_rate` from `warmup_steps` down to 0 at `total_steps` along a half cosine."""
    decay = optax.cosine_decay_schedule(s.learning_rate, max(s.total_steps - s.warmup_steps, 1))
    return decay(jnp.maximum(step - s.warmup_steps, 0))


SCHEDULES = {"step": _step_decay, "cosine": _cosine_decay}


def create_lr_schedule(config) -> LrSchedule:
    return LrSchedule(config.learning_rate, config.lr_decay_factor,
                      tuple(config.lr_boundaries_steps), config.warmup_learning_rate,
                      config.warmup_steps, config.warmup_until_error,
                      config.warmup_error_window_steps, config.schedule, config.warmup_shape,
                      config.total_steps)


def check_config(config) -> None:
    """Raises ValueError (one line: the key and its choices or range) for an optimiser,
    schedule or warm-up the registries lack, or a setting of theirs out of range."""
    for key, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                         ("warmup_shape", WARMUP_SHAPES)):
        if config[key] not in choices:
            raise ValueError(f"unknown {key} {config[key]!r}: use one of {', '.join(choices)}")
    if not 0 <= config.adam_b2 < 1:
        raise ValueError(f"adam_b2={config.adam_b2} must be in [0, 1) (Adam's: 0.999)")
    if not config.lars_trust_coefficient > 0:
        raise ValueError(f"lars_trust_coefficient={config.lars_trust_coefficient} must be "
                         "positive (You et al.: 0.001)")
