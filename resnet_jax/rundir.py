"""A run's directory: its file names, reading and writing its files, and the checks that refuse
or resume a run from what it holds.

Standard library only (tests/test_imports.py): the sweep, its runner and the reports ask a
workdir whether its run is finished, where it stands and whether a config may resume it,
without starting JAX. The checks that need the devices (the lock, damaged checkpoints, the
record windows) are in resume.py.

    WORKDIR/config.json       the run's config (`RESUMABLE_KEYS` may change on a resume)
    WORKDIR/dataset.json      the facts of the data it trains on (`dataset_facts`)
    WORKDIR/preprocessing.npz its input's mean image and size (data.Preprocessing)
    WORKDIR/metrics.jsonl     one record per logged step (metrics.MetricsWriter)
    WORKDIR/tensorboard/      the same records, and the run's HParams session
    WORKDIR/checkpoints/<step>  Orbax checkpoints (checkpoint.py), <step>.damaged set aside
    WORKDIR/summary.json      written when the run finishes (`finished_summary`)
    WORKDIR/profile/          a jax.profiler trace (`profile_steps`)
    WORKDIR/eval-<step>.json  `resnet-jax eval` of a checkpoint
    WORKDIR/train.lock        held while a trainer uses the workdir (checkpoint.WorkdirLock)
    WORKDIR/failure.json, log.txt   a sweep's record of a failed run, a subprocess's output
    ROOT/sweep.json, sweep.lock     a sweep's declaration, and its lock
"""

from __future__ import annotations

import json
import os
import pathlib

from resnet_jax import configs
from resnet_jax.errors import ConfigError
from resnet_jax.files import write_atomically

CONFIG_JSON = "config.json"
DATASET_JSON = "dataset.json"  # beside config.json: the facts of the data a run trains on
PREPROCESSING = "preprocessing.npz"  # written when the run starts training
METRICS_JSONL = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
SUMMARY_JSON = "summary.json"
PROFILE = "profile"
FAILURE = "failure.json"  # in a sweep's run: why its last attempt failed
LOG_TXT = "log.txt"  # in a sweep's run trained in a subprocess: its output
TRAIN_LOCK = "train.lock"  # held by the run's trainer (checkpoint.WorkdirLock)
SWEEP_LOCK = "sweep.lock"  # in a sweep's ROOT: held by the sweep
SWEEP_JSON = "sweep.json"  # in a sweep's ROOT: what it declared, and its report's defaults

# Keys that may change when a run resumes: they do not change what is computed.
RESUMABLE_KEYS = {"total_steps", "log_every_steps", "log_diagnostics", "eval_every_steps",
                  "eval_subset", "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size",
                  "parallelism", "num_devices", "tfds_data_dir", "not_converged_fraction_of_chance",
                  "input_threads", "input_workers", "profile_steps", "steps_per_call",
                  "cpu_convolution"}
# The keys in which runs trained in one program may differ (`parallel.Backend.seeds`).
SEED_KEYS = {"seed"}

# How to get past a damaged file of a run (both are written atomically, so damage comes from
# outside: a cut copy, a full disk on another tool's write, an edit).
_RUN_JSON_FIX = {SUMMARY_JSON: "delete it and rerun to write it again",
                 CONFIG_JSON: "restore it, or train in a new --workdir"}
# What readers of summary.json use (a rerun, sweeps, reports), so that an edited one is named here.
_SUMMARY_KEYS = ("step", "train/error", "test/error")


def eval_json(step: int, slug: str = "") -> str:
    """The file `resnet-jax eval` writes for checkpoint `step` (`slug`: another dataset's)."""
    return f"eval-{step}{slug}.json"


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
    if path.name == SUMMARY_JSON and missing:
        raise ConfigError(f"{path} has no {', '.join(map(repr, missing))}: {fix}")
    if path.name == CONFIG_JSON:  # written before keys whose defaults compute what it ran
        obj |= {k: v for k, v in configs.added_keys(obj.get("model", "")).items()
                if k not in obj}  # after the run's own keys: a report lists them in order
    return obj


def write_json(path: pathlib.Path, obj) -> None:
    """Writes `obj` whole or not at all (a full disk: no half a file). The caller decides which
    process writes (process 0: `train.py`)."""
    write_atomically(path, json.dumps(obj, indent=2) + "\n")


def config_json(config) -> dict:
    """A ConfigDict as config.json holds it."""
    return json.loads(config.to_json())


def resumable_keys(config: dict) -> set[str]:
    """The keys a resume of `config` may change: RESUMABLE_KEYS, but for total_steps where the
    schedule ends there ('cosine', optim.py)."""
    return RESUMABLE_KEYS - ({"total_steps"} if config.get("schedule") == "cosine" else set())


def changed_keys(old: dict, new: dict, may_change=None) -> list[str]:
    """The keys, sorted, whose values differ between two configs as config.json holds them,
    leaving out those that `may_change` (by default: on a resume to `new`, `resumable_keys`)."""
    may_change = resumable_keys(new) if may_change is None else may_change
    return sorted(k for k in old.keys() | new.keys()
                  if k not in may_change and old.get(k) != new.get(k))


def seed_group(config: dict) -> str:
    """What runs trained in one program share: the config without its `SEED_KEYS`."""
    return json.dumps({k: v for k, v in config.items() if k not in SEED_KEYS}, sort_keys=True,
                      default=str)


def check_workdir(workdir: pathlib.Path, config) -> None:
    """Refuses an unwritable workdir or one holding a run of a different config."""
    probe = workdir if workdir.exists() else next(p for p in workdir.parents if p.exists())
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ConfigError(f"workdir {workdir} is not writable: pass a --workdir you can write to")
    saved = workdir / CONFIG_JSON
    if saved.exists():
        changed = changed_keys(read_run_json(saved), config_json(config))
        if changed:
            raise ConfigError(
                f"workdir {workdir} holds a run with a different config ({', '.join(changed)}): "
                "use a new --workdir or the original values")


def dataset_facts(feed) -> dict:
    """What a run's checkpoints and data order depend on beyond its config: a folder that gained
    a class or some images, or was resized, is other data under the same name."""
    return {"num_classes": feed.num_classes, "image_shape": list(feed.image_shape),
            "num_train": feed.num_train}


def check_dataset(workdir: pathlib.Path, facts: dict) -> None:
    """Refuses a workdir whose run trained on other data (dataset.json, written by the loop)."""
    path = workdir / DATASET_JSON
    if not path.exists():  # a new run, or one from before dataset.json: its checkpoints tell
        return
    old = read_run_json(path)
    changed = [f"{k} {old.get(k)} -> {v}" for k, v in facts.items() if old.get(k) != v]
    if changed:
        raise ConfigError(f"workdir {workdir} holds a run on different data ({', '.join(changed)})"
                          ": use a new --workdir, or the data it was trained on")


def finished_summary(workdir: pathlib.Path, total_steps: int) -> dict | None:
    """The summary of the run in `workdir` if it finished at `total_steps` or later, else None.
    A damaged summary.json is a ConfigError naming it."""
    path = workdir / SUMMARY_JSON
    if not path.exists():
        return None
    summary = read_run_json(path)
    return summary if summary["step"] >= total_steps else None


def latest_step(workdir: pathlib.Path) -> int | None:
    """The newest checkpoint step in `workdir`, readable or not (as Orbax lists them: a folder
    named by its step; Orbax's unfinished temporaries and `<step>.damaged` are not steps)."""
    ckpts = workdir / CHECKPOINTS
    steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
    return max(steps, default=None)
