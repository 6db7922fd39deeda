"""Any sweep's report from its run directories: a table, a figure, the curves, TensorBoard HParams.

    python -m experiments.report --root=runs/degradation-digits
    python -m experiments.report --root=DIR --by=depth,shortcut --metric=val/error
    python -m experiments.report --root=DIR --x=depth --panels=residual --title="Fig. 6, digits"
    python -m experiments.report --root=DIR --gap=depth:20,56

Reads ROOT/<run>/ (config.json, metrics.jsonl, summary.json, failure.json) of a finished or a
partial sweep and ROOT/sweep.json's `report` section (`by`, `x`, `panels`, `metric`, `title`,
`gap`, `reference`), which the flags override. Defaults: `by` = the config keys whose values differ
between the runs except the seed and keys that follow from those before them in the config (the
warm-up steps of a depth); `metric` = test/error; `x` = the first `by` key with numeric values;
no panels. Writes into ROOT:
  report.md/.csv/.json  per group of runs with the same `by` values: runs, runs that converged,
      mean +- std (none below 2 runs), median and best (lowest) of the final metric, the training
      error's mean +- std, the seeds that did not converge; the runs that did not converge (a
      final training error of at least 90 % of chance's: summary.json `converged: false`) listed
      apart and left out of every statistic, the failed runs with their reasons, the unfinished
      ones. A reference (sweep.json) marked comparable stands beside the statistic of the same
      kind (mean +- std of n beside our mean, best of n beside our best), else in a section of
      its own, marked not comparable. With `gap` KEY:A,B (a `by` key and two of its values),
      the gap over iterations: for each combination of the other `by` keys, at every step where
      all their converged runs have the metric, the training error and the metric of KEY=A and
      of KEY=B (mean +- std over runs) and B's mean minus A's (when does the deeper net pass?).
  report_<metric>.png/.pdf  the metric against `x`, one line per combination of the other `by`
      keys, error bars one std, each converged run a faint point (x: not converged).
  curves.png/.pdf  training curves as in He et al. 2015, Fig. 6: training error dashed, the
      metric bold, against iterations; one colour per group, one panel per value of `panels`.
  events.out.tfevents.hparams  the columns of TensorBoard's HParams dashboard (`by` keys and
      seed; final train, test and validation error); each run's session is in its own
      tensorboard/ beside its curves: tensorboard --logdir=ROOT
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
import re
import shutil
import struct
import sys

from experiments.common import (converged, group_statistics, mean_std, not_converged, read_runs,
                                spread)
from resnet_jax import rundir
from resnet_jax.cli import ArgumentParser
from resnet_jax.errors import ConfigError
from resnet_jax.files import write_atomically

DEFAULT_METRIC = "test/error"
HPARAMS_METRICS = ("train/error", "test/error", "val/error")
# Settings stated above the table when every run shares them: what the numbers are at.
SETUP_KEYS = ("dataset", "image_size", "total_steps", "batch_size", "learning_rate",
              "bn_group_size", "width", "base_width")


class ReportError(ValueError):
    """Input the report cannot use; str(e) is one line naming the problem and the fix."""


# --- Reading -------------------------------------------------------------------------------


def read_sweep(root: pathlib.Path) -> dict:
    """ROOT/sweep.json, or {} where there is none (roots from before it); a damaged one is a
    ReportError naming it."""
    path = root / rundir.SWEEP_JSON
    if not path.exists():
        return {}
    fix = "restore it or rerun the sweep to write it again"
    try:
        sweep = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{path} cannot be read or is not JSON ({e}): {fix}") from None
    if not _well_formed(sweep):
        raise ReportError(f"{path} is not a sweep record (an object whose 'report' holds "
                          "keys, names and reference rows of 'where' and numbers): " + fix)
    return sweep


def _well_formed(sweep) -> bool:
    """sweep.json's shape, as far as the report reads it."""
    if not (isinstance(sweep, dict) and isinstance(sweep.get("runs") or [], list)
            and isinstance(sweep.get("report") or {}, dict)):
        return False
    report = sweep.get("report") or {}
    by, reference = report.get("by") or [], report.get("reference") or {}
    rows = reference.get("rows") or [] if isinstance(reference, dict) else None
    return (all(isinstance(report.get(k) or "", str)
                for k in ("x", "panels", "metric", "title", "gap"))
            and (isinstance(by, str) or isinstance(by, list)
                 and all(isinstance(k, str) for k in by))
            and isinstance(rows, list)
            and all(isinstance(r, dict) and isinstance(r.get("where"), dict)
                    and is_number(r.get("mean"))
                    and all(r.get(k) is None or is_number(r[k]) for k in ("n", "std", "best"))
                    for r in rows))


def flatten(config: dict, prefix: str = "") -> dict:
    """A config's keys as --config flags name them: nested ConfigDicts as 'outer.inner'."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def hashable(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def default_by(configs: list[dict]) -> list[str]:
    """The config keys whose values differ between runs, in config order, except the seed and a
    key whose value follows from the keys kept before it (warm-up steps from the depth)."""
    keys = list(dict.fromkeys(k for c in configs for k in c))
    by = []
    for key in keys:
        if key == "seed" or len({hashable(c.get(key)) for c in configs}) < 2:
            continue
        follows = {}
        for c in configs:
            follows.setdefault(tuple(hashable(c.get(k)) for k in by), set()).add(
                hashable(c.get(key)))
        if by and all(len(values) == 1 for values in follows.values()):
            continue
        by.append(key)
    return by


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sort_key(value):
    """Numbers (and bools: false before true) in order, then everything else as text."""
    if isinstance(value, (int, float)):
        return (0, value, "")
    return (1, 0, "" if value is None else str(hashable(value)))


def text(value) -> str:
    """A config value as a config argument writes it: true/false, lists as JSON."""
    if isinstance(value, bool):
        return str(value).lower()
    return "-" if value is None else str(hashable(value))


def label(values: dict) -> str:
    return ", ".join(f"{k}={text(v)}" for k, v in values.items())


def metric_label(metric: str) -> str:
    """'test error %' for test/error: how the tables and figures name a metric."""
    return metric.replace("/", " ") + (" %" if metric.endswith("error") else "")


def slug(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", metric).strip("_")


# --- The numbers ---------------------------------------------------------------------------


def matches(where: dict, group: list[dict]) -> bool:
    """Whether a reference row is about this group: every run has its `where` values."""
    return all(r["flat"].get(k, KeyError) == v for r in group for k, v in where.items())


def table(groups: list[tuple[dict, list[dict]]], metric: str, reference: dict | None) -> list[dict]:
    """One row per group: its key values, then `group_statistics`; with a comparable
    reference, the reference row about the group beside them."""
    rows = []
    for values, group in groups:
        row = values | group_statistics(group, metric)
        entry = next((e for e in reference["rows"] if matches(e["where"], group)),
                     None) if reference and reference["comparable"] else None
        if entry is not None:
            row |= {"reference_n": entry.get("n", 1), "reference_mean": entry["mean"],
                    "reference_std": entry.get("std"), "reference_best": entry.get("best")}
        rows.append(row)
    return rows


def parse_gap(flag: str, gap: str, by: list[str], groups) -> tuple[str, object, object]:
    """KEY:A,B -> (KEY, A's value, B's value) as the runs hold them; KEY must be a `by` key and A
    and B two of its values."""
    key, _, pair = gap.partition(":")
    values = pair.split(",")
    if not key or len(values) != 2 or not all(values):
        raise ReportError(f"{flag}={gap} is not KEY:A,B: name a --by key and two of its values, "
                          "such as depth:20,56")
    _check_key(flag, key, by, "one of the keys the runs are grouped by (--by)")
    present = {text(v[key]): v[key] for v, _ in groups}
    for value in values:
        if value not in present:
            raise ReportError(f"{flag}={gap}: no finished run has {key}={value}: use two of "
                              + ", ".join(text(v) for v in sorted(present.values(), key=sort_key)))
    return key, present[values[0]], present[values[1]]


def gap_tables(groups, key: str, a, b, metric: str) -> list[dict]:
    """For each combination of the other `by` keys with runs at both KEY=a and KEY=b: at every
    step where every converged run of both has `metric`, the mean and std over runs of the
    training error and of the metric at a and at b, and b's mean minus a's."""
    by_rest = {}
    for values, group in groups:
        rest = tuple((k, hashable(v)) for k, v in values.items() if k != key)
        by_rest.setdefault(rest, {})[hashable(values[key])] = (values, group)
    tables = []
    for side in by_rest.values():
        if hashable(a) not in side or hashable(b) not in side:
            continue
        pair = [[r for r in side[hashable(v)][1] if converged(r)] for v in (a, b)]
        if not all(pair):
            continue
        at = [[{c["step"]: c for c in r["curve"] if metric in c and "train/error" in c}
               for r in runs] for runs in pair]
        steps = sorted(set.intersection(*(set(curve) for runs in at for curve in runs)))
        rows = []
        for step in steps:
            row = {"step": step}
            for prefix, name in (("train", "train/error"), ("metric", metric)):
                for which, curves in zip("ab", at):
                    row[f"{prefix}_{which}_mean"], row[f"{prefix}_{which}_std"] = spread(
                        [curve[step][name] for curve in curves])
                row[f"{prefix}_gap"] = row[f"{prefix}_b_mean"] - row[f"{prefix}_a_mean"]
            rows.append(row)
        where = {k: v for k, v in side[hashable(a)][0].items() if k != key}
        tables.append({"where": where, "runs": [len(runs) for runs in pair], "rows": rows})
    return tables


def gap_markdown(tables: list[dict], key: str, a, b, metric: str) -> list[str]:
    name = metric_label(metric)
    lines = ["", f"## The gap over iterations: {key}={text(b)} minus {key}={text(a)}", "",
             f"Mean +- std over the converged runs at each step where all of them have the "
             f"{name.removesuffix(' %')}; training error as logged there (the mean over the "
             "batches since the last log)."]
    if not tables:
        return lines + ["", f"No combination of the other keys has converged runs at both "
                        f"{key}={text(a)} and {key}={text(b)}."]
    for t in tables:
        n_a, n_b = t["runs"]
        head = [f"train error %, {key}={text(a)} (n={n_a})", f"{key}={text(b)} (n={n_b})",
                f"{text(b)} minus {text(a)}", f"{name}, {key}={text(a)}", f"{key}={text(b)}",
                f"{text(b)} minus {text(a)}"]
        lines += ["", f"**{label(t['where'])}**" if t["where"] else "**all runs**", "",
                  "| iterations | " + " | ".join(head) + " |", "|---:" * 7 + "|"]
        for r in t["rows"]:
            cells = [f"{r['step']:,}"]
            for prefix in ("train", "metric"):
                for side in "ab":
                    mean, std = r[f"{prefix}_{side}_mean"], r[f"{prefix}_{side}_std"]
                    cells.append(f"{mean:.2f}" + (f" +- {std:.2f}" if std is not None else ""))
                cells.append(f"{r[f'{prefix}_gap']:+.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def reference_cells(entry: dict) -> tuple[str, str]:
    """(mean cell, best cell) of a reference row: '6.61 +- 0.16 (n=5)', '6.43 (best of 5)'; a
    single run is no best of several."""
    n = entry.get("n", 1)
    spread = f" +- {entry['std']:.2f}" if entry.get("std") is not None else ""
    best = entry.get("best")
    return (f"{entry['mean']:.2f}{spread} (n={n})",
            f"{best:.2f} (best of {n})" if best is not None else "")


def setup_line(runs: list[dict], by: list[str]) -> str:
    """The settings every run shares, of those that say what the numbers are at."""
    shared = []
    for key in SETUP_KEYS:
        values = {hashable(r["flat"].get(key, None)) for r in runs}
        if key not in by and len(values) == 1 and None not in values:
            shared.append(f"{key}={text(runs[0]['flat'][key])}")
    return f"Every run: {', '.join(shared)}." if shared else ""


def markdown(title: str, rows: list[dict], by: list[str], metric: str, sweep: dict,
             runs: list[dict], reference: dict | None) -> str:
    finished = [r for r in runs if r["state"] == "finished"]
    apart = [r for r in finished if not converged(r)]
    failed = [r for r in runs if r["state"] == "failed"]
    unfinished = [r for r in runs if r["state"] in ("unfinished", "not started")]
    thresholds = sorted({r["summary"]["not_converged_from_train_error"] for r in finished
                         if "not_converged_from_train_error" in r["summary"]})
    limit = (" (" + " / ".join(f"{t:.2f} %" for t in thresholds) + " here)") if thresholds else ""
    counts = [f"{len(finished)} finished"]
    counts += [f"{len(apart)} of them not converged"] if apart else []
    counts += [f"{len(failed)} failed"] if failed else []
    counts += [f"{len(unfinished)} unfinished"] if unfinished else []
    lines = [f"# {title}", ""]
    if sweep.get("sweep"):
        lines += [f"Sweep: `{sweep['sweep']}`.", ""]
    lines += [" ".join(filter(None, [
        f"{len(runs)} runs: {', '.join(counts)}.", setup_line(finished, by),
        f"Final {metric} (summary.json) per group of runs with the same "
        f"{', '.join(by) or 'config'}: means, stds, medians and bests are over the runs that "
        "converged; a run that did not (did not train: a final training error of at least 90 % "
        f"of chance-level error{limit}) is counted, listed apart and left out."])), ""]

    comparable = bool(reference and reference["comparable"])
    best = comparable or any(r["converged_runs"] > 1 for r in rows)
    name = metric_label(metric)
    header = [*by, "runs", "not converged", "train error %", name]
    header += [f"reference, {name}"] if comparable else []
    header += [f"{name}, best"] + (["reference, best"] if comparable else []) if best else []
    lines += ["| " + " | ".join(header) + " |",
              "|" + "---|" * len(by) + "---:|---|---:|" + "---:|" * (len(header) - len(by) - 3)]
    for r in rows:
        n = r["converged_runs"]
        ref_mean, ref_best = (reference_cells({k.removeprefix("reference_"): v
                                               for k, v in r.items() if k.startswith("reference_")})
                              if "reference_n" in r else ("", ""))
        cells = [*(text(r[k]) for k in by), str(r["runs"]), not_converged(r),
                 mean_std(n, r["train_mean"], r["train_std"]),
                 mean_std(n, r["mean"], r["std"])]
        cells += [ref_mean] if comparable else []
        if best:
            cells.append(f"{r['best']:.2f} (best of {n})" if n else "-")
            cells += [ref_best] if comparable else []
        lines.append("| " + " | ".join(cells) + " |")
    if comparable:
        lines += ["", f"Reference: {reference['source']}. Each of its numbers "
                  "stands beside ours of the same kind: its mean (+- std) of n runs beside our "
                  "mean, its best of n beside our best."]
    if apart:
        lines += ["", "## Not converged (left out of the statistics above)", "",
                  f"| run | seed | train error % | {name} |", "|---|---:|---:|---:|"]
        lines += [f"| {r['name']} | {text(r['seed'])} | {r['summary']['train/error']:.2f} | "
                  f"{r['summary'][metric]:.2f} |" for r in apart]
    if failed:
        lines += ["", "## Failed (no result; a rerun of the sweep retries them)", "",
                  "| run | reason |", "|---|---|"]
        lines += [f"| {r['name']} | {r['reason']} |" for r in failed]
    if unfinished:
        lines += ["", "## Unfinished (a rerun of the sweep finishes them)", "",
                  "| run | state |", "|---|---|"]
        lines += [f"| {r['name']} | {progress(r)} |" for r in unfinished]
    if reference and not comparable:
        lines += ["", f"## Reference ({reference['source']}): not comparable "
                  "with this table's scale", "", f"| where | {name} | best |", "|---|---:|---:|"]
        lines += [f"| {label(e['where'])} | " + " | ".join(reference_cells(e)) + " |"
                  for e in reference["rows"]]
    return "\n".join(lines) + "\n"


def progress(run: dict) -> str:
    if run["state"] == "not started":
        return "not started"
    total = (run["config"] or {}).get("total_steps")
    step = run["curve"][-1]["step"] if run["curve"] else 0
    return f"step {step} of {total}" if total else f"step {step}"


def csv_text(rows: list[dict]) -> str:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                      for k, v in r.items()} for r in rows)
    return out.getvalue()


# --- Figures -------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, root: pathlib.Path, stem: str) -> None:
    for ext in ("png", "pdf"):
        write_atomically(root / f"{stem}.{ext}",
                         lambda f, ext=ext: fig.savefig(f, format=ext, dpi=130))


def _colors(plt, n: int) -> list:
    return list(plt.cm.viridis_r([0.15 + 0.75 * i / max(1, n - 1) for i in range(n)]))


def plot_metric(groups, rows, x: str, metric: str, root: pathlib.Path, title: str) -> None:
    """The metric against `x`: a line per combination of the other `by` keys through the means
    of the converged runs, error bars one std, each run a faint point (x: not converged)."""
    plt = _pyplot()
    numeric = all(is_number(values[x]) for values, _ in groups)
    ticks = sorted({hashable(values[x]) for values, _ in groups}, key=sort_key)
    at = (lambda v: v) if numeric else (lambda v: ticks.index(hashable(v)))
    lines = {}
    for (values, group), row in zip(groups, rows):
        lines.setdefault(label({k: v for k, v in values.items() if k != x}), []).append(
            (values[x], group, row))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for color, (name, points) in zip(_colors(plt, len(lines)), lines.items()):
        points.sort(key=lambda p: sort_key(p[0]))
        means = [(at(v), row["mean"], row["std"] or 0.0) for v, _, row in points
                 if row["mean"] is not None]
        if means:
            ax.errorbar(*zip(*means), fmt="-o", color=color, capsize=3, lw=1.8,
                        label=name or metric)
        else:  # in the legend all the same: its runs' crosses need a name
            ax.plot([], [], "x", color=color, label=f"{name or metric} (none converged)")
        for v, group, _ in points:
            for r in group:
                ax.plot(at(v), r["summary"][metric], "o" if converged(r) else "x", color=color,
                        alpha=0.45, ms=4)
    if any(not converged(r) for _, group in groups for r in group):
        ax.plot([], [], "x", color="grey", label="not converged: left out")
    if not numeric:
        ax.set_xticks(range(len(ticks)), [text(t) for t in ticks])
    ax.set_xlabel(x)
    ax.set_ylabel(f"final {metric_label(metric)}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, root, f"report_{slug(metric)}")
    plt.close(fig)


def plot_curves(groups, panels: str | None, metric: str, root: pathlib.Path, title: str) -> None:
    """He et al. 2015, Fig. 6 layout: per group its runs' training error dashed and the metric
    bold against iterations; one panel per value of `panels` (plain and residual nets)."""
    plt = _pyplot()
    keys = (sorted({hashable(v[panels]) for v, _ in groups}, key=sort_key) if panels
            else [None])
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), sharey=True,
                             squeeze=False)
    dashed = metric != "train/error" and metric.endswith("error")
    for ax, key in zip(axes[0], keys):
        inside = [(v, g) for v, g in groups if not panels or hashable(v[panels]) == key]
        for color, (values, group) in zip(_colors(plt, len(inside)), inside):
            name = label({k: v for k, v in values.items() if k != panels}) or "runs"
            for i, r in enumerate(group):
                if dashed:
                    train = [(c["step"], c["train/error"]) for c in r["curve"]
                             if "train/error" in c]
                    if train:
                        ax.plot(*zip(*train), "--", lw=1, color=color)
                points = [(c["step"], c[metric]) for c in r["curve"] if metric in c]
                if points:
                    ax.plot(*zip(*points), "-o", lw=2.2, ms=3, color=color,  # o: one eval shows
                            label=name if i == 0 else None)
        ax.set_title(f"{panels}={text(key)}" if panels else title, fontsize=10)
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel may have no curves
            ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"{metric_label(metric)} (bold)"
                          + ("; training error % (dashed)" if dashed else ""))
    if panels:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, root, "curves")
    plt.close(fig)


HPARAMS_EXPERIMENT = "events.out.tfevents.hparams"  # in ROOT: TensorBoard reads *tfevents*


def export_hparams(finished: list[dict], by: list[str], root: pathlib.Path) -> None:
    """The columns of TensorBoard's HParams dashboard over the sweep (`tensorboard
    --logdir=ROOT`): one experiment summary in ROOT/events.out.tfevents.hparams naming the
    `by` keys and the seed, each with the values the finished runs take and whether they
    differ, and the final errors. The sessions themselves, each run's whole config, are in the
    runs' own tensorboard/ folders beside their curves (written by training, metrics.py), so
    that every run is listed once; the metrics are the last points of those curves. Rewritten
    whole each time; the ROOT/hparams/ of older reports, a second copy of every run, is
    removed."""
    from tensorboardX.proto.api_pb2 import (DataType, Experiment, HParamInfo, MetricInfo,
                                            MetricName)
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboardX.record_writer import masked_crc32c

    from resnet_jax.metrics import hparams  # late: JAX

    values = [hparams(r["config"]) for r in finished]
    infos = []
    for key in [*by, "seed"]:
        taken = sorted({v[key] for v in values if key in v}, key=sort_key)
        kind = ("DATA_TYPE_BOOL" if all(isinstance(v, bool) for v in taken) else
                "DATA_TYPE_FLOAT64" if all(is_number(v) for v in taken) else "DATA_TYPE_STRING")
        info = HParamInfo(name=key, type=DataType.Value(kind))
        for v in taken:
            value = info.domain_discrete.values.add()
            if kind == "DATA_TYPE_BOOL":
                value.bool_value = v
            elif kind == "DATA_TYPE_FLOAT64":
                value.number_value = v
            else:
                value.string_value = str(v)
        # HParamInfo.differs (field 7, bool) is newer than tensorboardX's copy of the proto:
        # appended as raw wire bytes, which protobuf keeps as an unknown field and writes out.
        infos.append(HParamInfo.FromString(info.SerializeToString()
                                           + (b"\x38\x01" if len(taken) > 1 else b"")))
    metrics = [MetricInfo(name=MetricName(tag=k)) for k in HPARAMS_METRICS
               if any(k in r["summary"] for r in finished)]
    content = HParamsPluginData(experiment=Experiment(hparam_infos=infos, metric_infos=metrics),
                                version=0).SerializeToString()
    summary = Summary(value=[Summary.Value(tag="_hparams_/experiment", metadata=SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name="hparams", content=content)))])

    def record(data: bytes) -> bytes:  # TFRecord framing: length, its CRC, data, its CRC
        length = struct.pack("<Q", len(data))
        return (length + struct.pack("<I", masked_crc32c(length)) + data
                + struct.pack("<I", masked_crc32c(data)))

    write_atomically(root / HPARAMS_EXPERIMENT, b"".join(record(e.SerializeToString()) for e in (
        Event(wall_time=0, file_version="brain.Event:2"), Event(wall_time=0, summary=summary))))
    shutil.rmtree(root / "hparams", ignore_errors=True)


# --- The report ----------------------------------------------------------------------------


def _check_key(flag: str, key: str, allowed: list[str], what: str) -> None:
    if key not in allowed:
        raise ReportError(f"{flag}={key} is not {what}: use one of "
                          f"{', '.join(allowed) or '(none)'}")


def report(root, *, by=None, metric=None, x=None, panels=None, title=None,
           gap=None) -> list[dict]:
    """Writes report.md/.csv/.json, report_<metric>.png/.pdf, curves.png/.pdf and the HParams of
    the runs under `root` and prints report.md; the table's rows. Arguments left None come from
    ROOT/sweep.json's `report` section, else the defaults (module docstring). Bad input (a
    missing root, an unknown key or metric, no finished run, a damaged sweep.json) is a
    ReportError, a damaged config.json or summary.json a ConfigError (both ValueErrors,
    one line each), raised before anything is written."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise ReportError(f"--root={root} is no directory: pass the root of a sweep's runs")
    sweep = read_sweep(root)
    spec = sweep.get("report") or {}
    runs = read_runs(root)
    present = {r["name"] for r in runs}  # sweep.json names every run of the sweep, as its dir
    runs += [{"name": name, "state": "not started", "config": None, "curve": []}
             for name in dict.fromkeys(sweep.get("runs", [])) if name not in present]
    finished = [r for r in runs if r["state"] == "finished"]
    if not finished:
        others = ", ".join(f"{sum(r['state'] == s for r in runs)} {s}"
                           for s in ("failed", "unfinished", "not started")
                           if any(r["state"] == s for r in runs))
        raise ReportError(f"no finished runs under {root}" + (f" ({others})" if others else "")
                          + ": train the sweep first (python -m experiments.sweep)")
    configured = [r for r in runs if r["config"] is not None]
    for r in configured:
        r["flat"] = flatten(r["config"])
    keys = list(dict.fromkeys(k for r in configured for k in r["flat"]))

    def option(name, given):  # the flag's value, else sweep.json's, and where it came from
        if given is not None:
            return given, f"--{name}"
        return spec.get(name), f"{root / rundir.SWEEP_JSON}'s report.{name}"

    (by, by_from), (metric, metric_from) = option("by", by), option("metric", metric)
    (x, x_from), (panels, panels_from) = option("x", x), option("panels", panels)
    gap, gap_from = option("gap", gap)
    by = by.split(",") if isinstance(by, str) else by
    by = [k for k in by if k] if by is not None else default_by([r["flat"] for r in configured])
    for key in by:
        _check_key(by_from, key, keys, "a config key of these runs")
    metrics = [k for k in finished[0]["summary"] if "/" in k
               and all(is_number(r["summary"].get(k)) for r in finished)]
    metric = metric or DEFAULT_METRIC
    _check_key(metric_from, metric, metrics, "in every finished run's summary.json")
    if by_from.startswith("--"):  # sweep.json's x, panels and gap belong to its own `by`
        x, panels = (key if key_from.startswith("--") or key in by else None
                     for key, key_from in ((x, x_from), (panels, panels_from)))
        gap = gap if gap_from.startswith("--") or (gap or "").partition(":")[0] in by else None
    x = x or next((k for k in by if all(is_number(r["flat"].get(k)) for r in finished)), None)
    for flag, key in ((x_from, x), (panels_from, panels)):
        if key:
            _check_key(flag, key, by, "one of the keys the runs are grouped by (--by)")
    title = title or spec.get("title") or f"{root.name}: {metric} by {', '.join(by) or 'config'}"
    reference = spec.get("reference") and {"source": "not named", "comparable": False,
                                           **spec["reference"],
                                           "rows": spec["reference"].get("rows") or []}

    grouped = {}
    for r in finished:
        grouped.setdefault(tuple(hashable(r["flat"].get(k)) for k in by), []).append(r)
    groups = [({k: group[0]["flat"].get(k) for k in by}, group) for _, group in
              sorted(grouped.items(), key=lambda item: [sort_key(v) for v in item[0]])]
    rows = table(groups, metric, reference)
    md = markdown(title, rows, by, metric, sweep, runs, reference)
    gaps = None
    if gap:
        key, a, b = parse_gap(gap_from, gap, by, groups)
        gaps = {"key": key, "from": a, "to": b,
                "tables": gap_tables(groups, key, a, b, metric)}
        md += "\n".join(gap_markdown(gaps["tables"], key, a, b, metric)) + "\n"
    write_atomically(root / "report.md", md)
    write_atomically(root / "report.csv", csv_text(rows))
    write_atomically(root / "report.json", json.dumps({
        "title": title, "sweep": sweep.get("sweep"), "by": by, "metric": metric, "x": x,
        "panels": panels, "table": rows,
        "runs": [{"name": r["name"], **{k: r["flat"].get(k) for k in [*by, "seed"]},
                  "summary": r["summary"]}
                 for r in finished],
        "not_converged_runs": [r["name"] for r in finished if not converged(r)],
        "failed_runs": {r["name"]: r["reason"] for r in runs if r["state"] == "failed"},
        "unfinished_runs": {r["name"]: progress(r) for r in runs
                            if r["state"] in ("unfinished", "not started")},
        "reference": reference, "gap": gaps}, indent=2) + "\n")
    if x:
        plot_metric(groups, rows, x, metric, root, title)
    plot_curves(groups, panels, metric, root, title)
    export_hparams(finished, by, root)
    print(md, end="")
    return rows


def main(argv=None) -> int:
    parser = ArgumentParser("experiments.report", __doc__)
    parser.add_argument("--root", required=True, help="the sweep's directory: ROOT/<run>/")
    parser.add_argument("--by", help="comma-separated config keys to group runs by (default: "
                        "sweep.json's, else the keys that differ between runs, seed aside)")
    parser.add_argument("--metric", help=f"summary.json key to tabulate (default: sweep.json's, "
                        f"else {DEFAULT_METRIC})")
    parser.add_argument("--x", help="the figure's x axis, one of the --by keys (default: "
                        "sweep.json's, else the first numeric one; none: no figure)")
    parser.add_argument("--panels", help="one curves panel per value of this --by key "
                        "(default: sweep.json's, else one panel)")
    parser.add_argument("--title", help="table and figure title (default: sweep.json's, else "
                        "ROOT's name, the metric and the keys)")
    parser.add_argument("--gap", help="KEY:A,B (a --by key and two of its values, such as "
                        "depth:20,56): B minus A in training error and the metric at each "
                        "evaluated step, per combination of the other keys (default: "
                        "sweep.json's, else none)")
    args = parser.parse_args(argv)

    try:
        report(args.root, by=args.by, metric=args.metric, x=args.x, panels=args.panels,
               title=args.title, gap=args.gap)
    except (ReportError, ConfigError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
