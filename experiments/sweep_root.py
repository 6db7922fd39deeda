"""What a sweep's ROOT holds beyond its runs' own files (resnet_jax/rundir.py): which runs
failed and why, and where the checkout is that its subprocesses and files are found from.

Standard library only, the lowest module of experiments/: the declarations (declaration.py), the
runner, the sweep's command line and the reports all read it.

    ROOT/sweep.json              what the sweep declared, and its report's defaults (sweep.py)
    ROOT/sweep.lock              held by the sweep (checkpoint.WorkdirLock)
    ROOT/<run>/                  a run's directory (rundir.py)
    ROOT/<run>/failure.json      why its last attempt failed (`record_failure`, `failures`)
    ROOT/<run>/log.txt           a run trained in a subprocess: its output
"""

from __future__ import annotations

import json
import pathlib

from resnet_jax.files import write_atomically
from resnet_jax.rundir import FAILURE, SUMMARY_JSON

REPO = pathlib.Path(__file__).resolve().parents[1]


def failures(root: pathlib.Path) -> dict[str, str]:
    """The runs under `root` whose last attempt failed, each with its reason: for reports, which
    leave them out (they have no summary.json)."""
    out = {}
    for path in sorted(root.glob(f"*/{FAILURE}")):
        if not (path.parent / SUMMARY_JSON).exists():
            try:
                out[path.parent.name] = json.loads(path.read_text())["reason"]
            except (OSError, ValueError, KeyError):
                out[path.parent.name] = f"failed ({path} is unreadable)"
    return out


def record_failure(workdir: pathlib.Path, reason: str) -> None:
    """Writes `FAILURE` whole or not at all; failing to (a full disk) only loses the record, since
    the sweep names the run at its end anyway."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        write_atomically(workdir / FAILURE, json.dumps({"reason": reason}) + "\n")
    except OSError:
        pass
