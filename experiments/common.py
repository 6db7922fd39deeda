"""What the studies share: reading finished runs and summarising their seeds.

Standard library only at import (a launcher lists a study's runs with any Python); `collect`
imports resnet_jax when it reads runs.
"""

from __future__ import annotations

import pathlib
import statistics


def collect(root: pathlib.Path) -> list[dict]:
    """Every finished run under root: its arguments, curves and summary. A damaged config.json
    or summary.json is a ConfigError naming it."""
    from resnet_jax.metrics import read_records
    from resnet_jax.train import read_run_json

    out = []
    for summary_path in sorted(root.glob("*/summary.json")):
        run_dir = summary_path.parent
        config = read_run_json(run_dir / "config.json")
        records = read_records(run_dir / "metrics.jsonl")  # as the trainer reads it: cut lines out
        out.append({"name": run_dir.name, "depth": config["depth"],
                    "residual": config["residual"], "seed": config["seed"], "config": config,
                    "summary": read_run_json(summary_path), "curve": records})
    return out


def seed_statistics(group: list[dict]) -> dict:
    """Over the seeds of one net that converged: mean, std (None below 2 seeds), median and the
    best (lowest) test error. The seeds that did not converge are counted and named, not
    averaged in (as the paper reports failed runs apart)."""
    converged = [r for r in group if r["summary"].get("converged", True)]
    row = {"seeds": len(group), "converged_seeds": len(converged),
           "not_converged_seeds": [r["seed"] for r in group
                                   if not r["summary"].get("converged", True)]}
    for split in ("train", "test"):
        values = [r["summary"][f"{split}/error"] for r in converged]
        row[f"{split}_mean"] = statistics.fmean(values) if values else None
        row[f"{split}_std"] = statistics.stdev(values) if len(values) > 1 else None
        row[f"{split}_median"] = statistics.median(values) if values else None
    row["test_best"] = min(values) if values else None
    return row


def mean_std(row: dict, split: str) -> str:
    """'6.70 +- 0.22 (n=4)' over the converged seeds; one seed: its error alone; none: '-'."""
    n, mean, std = row["converged_seeds"], row[f"{split}_mean"], row[f"{split}_std"]
    if not n:
        return "-"
    return f"{mean:.2f}" if n == 1 else f"{mean:.2f} +- {std:.2f} (n={n})"


def not_converged(row: dict) -> str:
    seeds = row["not_converged_seeds"]
    return f"{len(seeds)} (seed {', '.join(map(str, seeds))})" if seeds else ""
