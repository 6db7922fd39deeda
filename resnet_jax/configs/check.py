"""Config validation: everything about a config that can be checked before touching data or
disk (`check_config`), and the keys every config has (`missing_keys`). A failed check is a
one-line ConfigError (errors.py)."""

from __future__ import annotations

import pathlib

import ml_collections

from resnet_jax import models, optim, parallel, pipeline, xla_cpu
from resnet_jax.configs import cifar, imagenet
from resnet_jax.errors import ConfigError


def _defaults(config) -> ml_collections.ConfigDict:
    """The defaults of `config`'s config file: the owner of every key's default value."""
    return (imagenet if config.get("model") == "imagenet" else cifar).get_config()


def missing_keys(config) -> list[str]:
    """The keys of `config`'s config file that `config` lacks, sorted: the code reads every key
    as an attribute, its default being the config file's."""
    return sorted(set(_defaults(config).keys()) - set(config.keys()))


def check_config(config: ml_collections.ConfigDict) -> None:
    """Everything that can be checked before touching data or disk."""
    def need(ok, message):
        if not ok:
            raise ConfigError(message)

    missing = missing_keys(config)
    need(not missing, f"the config has no {', '.join(missing)}: start it from a config file's "
         "get_config() (resnet_jax/configs/), which sets every key")
    family = models.FAMILIES.get(config.model)
    try:  # the net (family, depth, widths, shortcut) and the parallelism: checked by their owners
        models.check_architecture(config.model, config.depth, width=config.width,
                                  shortcut=config.shortcut, ablation=dict(
                                      norm=config.norm, norm_groups=config.norm_groups,
                                      residual_init=config.residual_init,
                                      residual=config.residual,
                                      preact=models.BLOCKS.get(config.block, False)),
                                  **{k: config[k] for k in family.options} if family else {})
        parallel.check_parallelism(config.parallelism)
        optim.check_config(config)
        xla_cpu.check_convolution(config.cpu_convolution)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    need(config.block in models.BLOCKS,
         f"unknown block {config.block!r}: use {' or '.join(models.BLOCKS)}")
    need(config.dtype in models.DTYPES,
         f"unknown dtype {config.dtype!r}: use {' or '.join(models.DTYPES)}")
    for key in ("total_steps", "batch_size", "log_every_steps", "eval_every_steps",
                "checkpoint_every_steps", "eval_batch_size", "keep_checkpoints"):
        need(config[key] > 0, f"{key}={config[key]} must be positive")
    need(config.input_threads > 0 and config.input_workers >= 0,
         f"input_threads={config.input_threads} must be positive and "
         f"input_workers={config.input_workers} at least 0")
    need(not pipeline.is_streamed(config.dataset) or config.image_size > 0,
         f"{config.dataset} is streamed and needs a positive image_size: use "
         "resnet_jax/configs/imagenet.py or set --config.image_size")
    need(config.image_size >= 0,
         f"image_size={config.image_size} must be >= 0 (0 = the dataset's own size)")
    need(config.train_size >= 0,
         f"train_size={config.train_size} must be >= 0 (0 = the whole training split)")
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
    profile = tuple(config.profile_steps)
    need(profile == () or (len(profile) == 2 and all(isinstance(s, int) for s in profile)
                           and 0 <= profile[0] < profile[1]),
         f"profile_steps={profile} must be () (off) or (first, end), 0 <= first < end: traces "
         "train steps first..end-1, e.g. --config.profile_steps='(100,110)'")
    need(not profile or profile[0] < config.total_steps,
         f"profile_steps={profile} starts at or past total_steps={config.total_steps}: pick "
         "steps the run trains")
    steps_per_call = config.steps_per_call
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


def check_keys(path: pathlib.Path, config) -> None:
    """Refuses a run's config that lacks a key of its config file's defaults: one written
    before the key was added, whose value the run was trained with is not known here."""
    missing = missing_keys(config)
    defaults = _defaults(config)
    if missing:
        raise ConfigError(
            f"{path} has no {', '.join(missing)} (written before these keys existed): add "
            "them with the values the run was trained with (the defaults: "
            + ", ".join(f"{k}={defaults[k]!r}" for k in missing) + ")")
