"""What the studies share: reading a sweep's runs and summarising their seeds.

Standard library only at import (a launcher lists a study's runs with any Python); `read_runs`
imports JAX (resnet_jax.metrics) when it reads runs. The names and reading of a run's files are
resnet_jax/rundir.py's, which runs failed experiments/sweep_root.py's.
"""

from __future__ import annotations

import pathlib
import statistics

from experiments.sweep_root import failures
from resnet_jax.rundir import CONFIG_JSON, FAILURE, METRICS_JSONL, SUMMARY_JSON, read_run_json


def read_runs(root: pathlib.Path) -> list[dict]:
    """Every run directory under `root` (one holding config.json, summary.json or failure.json),
    by name, each with its `state`: "finished" (summary.json), "failed" (failure.json and no
    summary.json: its last attempt failed, `reason` says why) or "unfinished" (neither: training,
    stopped, or killed). Each has its `config` (None where a failed run wrote none), `summary`
    (finished runs; else None), `curve` (the metrics.jsonl records; [] if none) and, for the
    studies of plain and residual nets, `depth`, `residual` and `seed` from its config. A damaged
    config.json or summary.json is a ConfigError naming it."""
    from resnet_jax.metrics import read_records  # late: it imports JAX

    failed = failures(root)
    names = sorted({p.parent.name for pattern in (CONFIG_JSON, SUMMARY_JSON, FAILURE)
                    for p in root.glob(f"*/{pattern}")})
    out = []
    for name in names:
        run_dir = root / name
        config = (read_run_json(run_dir / CONFIG_JSON)
                  if name not in failed or (run_dir / CONFIG_JSON).exists() else None)
        finished = (run_dir / SUMMARY_JSON).exists()
        metrics = run_dir / METRICS_JSONL
        out.append({
            "name": name, "state": "finished" if finished else
            "failed" if name in failed else "unfinished", "reason": failed.get(name),
            "config": config, "summary": read_run_json(run_dir / SUMMARY_JSON) if finished
            else None,
            # As the trainer reads it: a line cut short by a killed process is left out.
            "curve": read_records(metrics) if metrics.exists() else [],
            **{key: (config or {}).get(key) for key in ("depth", "residual", "seed")}})
    return out


def collect(root: pathlib.Path) -> list[dict]:
    """Every finished run under root: its config, curves and summary (`read_runs`)."""
    return [r for r in read_runs(root) if r["state"] == "finished"]


def converged(run: dict) -> bool:
    """Whether a finished run trained (summary.json `converged`; older summaries: yes)."""
    return run["summary"].get("converged", True)


def spread(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, std) of `values`: None for the mean of none and the std of fewer than 2."""
    return (statistics.fmean(values) if values else None,
            statistics.stdev(values) if len(values) > 1 else None)


def group_statistics(group: list[dict], metric: str = "test/error") -> dict:
    """Over the finished runs of one group that converged: mean, std (None below 2 runs), median
    and best (lowest) of the final `metric`, and of the training error. The runs that did not
    converge are counted and their seeds named, not averaged in (as the paper reports failed runs
    apart)."""
    ok = [r for r in group if converged(r)]
    row = {"runs": len(group), "converged_runs": len(ok),
           "not_converged_seeds": [r["seed"] for r in group if not converged(r)]}
    for prefix, key in (("", metric), ("train_", "train/error")):
        values = [r["summary"][key] for r in ok]
        mean, std = spread(values)
        row |= {f"{prefix}mean": mean, f"{prefix}std": std,
                f"{prefix}median": statistics.median(values) if values else None}
    row["best"] = min((r["summary"][metric] for r in ok), default=None)
    return row


def mean_std(n: int, mean: float | None, std: float | None) -> str:
    """'6.70 +- 0.22 (n=4)' over n converged runs; one run: its value alone; none: '-'."""
    if not n:
        return "-"
    return f"{mean:.2f}" if n == 1 else f"{mean:.2f} +- {std:.2f} (n={n})"


def not_converged(row: dict) -> str:
    seeds = row["not_converged_seeds"]
    return f"{len(seeds)} (seed {', '.join(map(str, seeds))})" if seeds else ""
