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

# Keys added after runs were first written, with the values every run before them computed with
# (their defaults): a run's config.json without one reads as holding it (rundir.read_run_json),
# so that those runs still resume and load. The config files take these defaults from here. A key
# whose default would change what an old run computes does not belong here: runs without it are
# refused.
def added_keys(model: str = "cifar") -> dict:
    """The added keys of `model`'s config file ('cifar' or 'imagenet') with their defaults."""
    return dict(norm="batch", norm_groups=32 if model == "imagenet" else 8,
                residual_init="standard", optimizer="sgd", adam_b2=0.999,
                lars_trust_coefficient=0.001, schedule="step", warmup_shape="constant",
                cpu_convolution="eigen")


ADDED_KEYS = tuple(added_keys())
PAPER_TOTAL_STEPS = 64_000


def warmup(depth: int, total_steps: int = PAPER_TOTAL_STEPS) -> dict:
    """The warm-up config keys of a net of `depth` on a schedule of `total_steps` iterations:
    from ResNet-110 on, until the mean training error of the last 20 batches is below 80 %, at
    most 2,000 iterations (5x the paper's 400), both counts scaled from the paper's 64k
    iterations (step.LrSchedule applies the rule); shallower nets do not warm up."""
    warm = depth >= WARMUP_FROM_DEPTH
    return {"warmup_until_error": 80.0 if warm else 0.0,
            "warmup_steps": max(1, 2_000 * total_steps // PAPER_TOTAL_STEPS) if warm else 0,
            "warmup_error_window_steps": max(1, 20 * total_steps // PAPER_TOTAL_STEPS)}


def net_name(depth: int, residual: bool) -> str:
    """The paper's name of a net: 'ResNet-56', or 'plain-56' for its plain twin."""
    return f"{'ResNet' if residual else 'plain'}-{depth}"


def typed(raw: str, default):
    """The text `raw` as a value of `default`'s type: bool (true/false/1/0), int, float, a tuple
    (`(1,2)`, its elements of the type of `default`'s first, else int), or text. A ValueError
    where it is not one; the caller's message names the key."""
    kind = type(default)
    if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(raw)
        return raw.lower() in ("true", "1")
    if kind in (tuple, list):
        element = type(default[0]) if default else int
        items = [v for v in raw.strip("()[]").split(",") if v.strip()]
        return tuple(typed(v.strip(), element()) for v in items)
    return kind(raw) if kind in (int, float) else raw


def parse_arg(arg: str | None, **defaults):
    """key=value pairs, comma-separated; values take the type of their default (`typed`)."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in defaults:
            raise ValueError(
                f"config argument {item!r} is not key=value with key in {', '.join(defaults)}"
            )
        try:
            values[key] = typed(raw, defaults[key])
        except ValueError:
            what = {bool: "true or false", int: "an integer"}.get(type(defaults[key]), "valid")
            raise ValueError(f"config argument {key}={raw} must be {what}") from None
    return values
