"""Config files, each a `get_config(arg)` for one model family (big_vision style).

`parse_arg("depth=56,residual=false", depth=20, residual=True)` turns the string after the config
path's colon into typed values, starting from the family's defaults. Also here, for the config
files and the studies (experiments/) alike: the paper's warm-up rule (`warmup`) and the paper's
names of its nets (`net_name`). Standard library only: a launcher asks a study for its runs
(`python -m experiments.sweep --sweep=FILE --list`) with any Python.
"""

from __future__ import annotations

# He et al. 2015, Sec. 4.2: "In this case [110 layers], we find that the initial learning rate of
# 0.1 is slightly too large to start converging. So we use 0.01 to warm up the training until
# the training error is below 80% (about 400 iterations), and then go back to 0.1."
WARMUP_FROM_DEPTH = 110  # and deeper (ResNet-1202)

# Keys added after runs were first written, whose defaults compute what those runs computed: a
# run's config.json without them reads as holding its config file's defaults
# (train.read_run_json), so that those runs still resume and load. A key whose default would
# change what an old run computes does not belong here: runs without it are refused.
ADDED_KEYS = ("norm", "norm_groups", "residual_init", "optimizer", "adam_b2",
              "lars_trust_coefficient", "schedule", "warmup_shape")
PAPER_TOTAL_STEPS = 64_000


def warmup(depth: int, total_steps: int = PAPER_TOTAL_STEPS) -> dict:
    """The warm-up config keys of a net of `depth` on a schedule of `total_steps` iterations:
    from ResNet-110 on, until the mean training error of the last 20 batches is below 80 %, at
    most 2,000 iterations (5x the paper's 400), both counts scaled from the paper's 64k
    iterations (train.LrSchedule applies the rule); shallower nets do not warm up."""
    warm = depth >= WARMUP_FROM_DEPTH
    return {"warmup_until_error": 80.0 if warm else 0.0,
            "warmup_steps": max(1, 2_000 * total_steps // PAPER_TOTAL_STEPS) if warm else 0,
            "warmup_error_window_steps": max(1, 20 * total_steps // PAPER_TOTAL_STEPS)}


def net_name(depth: int, residual: bool) -> str:
    """The paper's name of a net: 'ResNet-56', or 'plain-56' for its plain twin."""
    return f"{'ResNet' if residual else 'plain'}-{depth}"


def parse_arg(arg: str | None, **defaults):
    """key=value pairs, comma-separated; values take the type of their default."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in defaults:
            raise ValueError(
                f"config argument {item!r} is not key=value with key in {', '.join(defaults)}"
            )
        kind = type(defaults[key])
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={raw} must be true or false")
            values[key] = raw.lower() in ("true", "1")
        elif kind is int:
            try:
                values[key] = int(raw)
            except ValueError:
                raise ValueError(f"config argument {key}={raw} must be an integer") from None
        else:
            values[key] = raw
    return values
