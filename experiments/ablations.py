"""Ablations around the degradation result, each declared as a list of config arguments.

    python -m experiments.ablations --study=shortcuts --preset=digits --root=runs/shortcuts
    python -m experiments.ablations --study=preact --preset=paper --root=runs/preact

Studies:
  shortcuts  He et al. 2015, Table 3's question asked on CIFAR: identity shortcuts with zero
             padding (A), projections where the shape changes (B) or everywhere (C), for
             ResNet-20, 56 and 110. The paper found B slightly better than A and C marginally
             better than B on ImageNet, and chose A for CIFAR.
  preact     He et al. 2016: original (post-activation) vs pre-activation blocks at 110 layers
             (basic blocks) and 164 layers (bottlenecks, projection shortcuts). The 2016 paper
             reports 6.61 -> 6.37 % (110) and 5.93 -> 5.46 % (164) CIFAR-10 test error.
The schedule, data and seeds come from a degradation preset (`--preset`); the smoke preset
shrinks every net to its smallest depth. Writes ablation_<study>.md/.csv/.json into ROOT.
"""

from __future__ import annotations

import csv
import json
import pathlib
import sys

from experiments.common import collect, mean_std, not_converged, seed_statistics
from experiments.degradation import PRESETS  # the ablations run at a degradation preset's scale
from experiments.sweep import Run, run_sweep_command
from resnet_jax.cli import ArgumentParser


def study_args(study: str, small: bool) -> list[tuple[str, int]]:
    """(config argument, depth) of each variant; `small` swaps in the smallest depths."""
    if study == "shortcuts":
        depths = (8, 14) if small else (20, 56, 110)
        return [(f"depth={d},shortcut={s}", d) for d in depths for s in "ABC"]
    basic, bottleneck = (8, 11) if small else (110, 164)
    return ([(f"depth={basic},block={b}", basic) for b in ("post", "pre")]
            + [(f"depth={bottleneck},bottleneck=true,shortcut=B,block={b}", bottleneck)
               for b in ("post", "pre")])


STUDIES = ("shortcuts", "preact")


def runs(study: str, preset_name: str, dataset: str | None = None) -> list[Run]:
    preset = PRESETS[preset_name]
    base = "" if preset.base_width == 16 else f",base_width={preset.base_width}"
    return [Run(f"{arg},width={preset.width}{base},dataset={dataset or preset.dataset},"
                f"seed={seed}", preset.schedule(depth))
            for arg, depth in study_args(study, preset_name == "smoke")
            for seed in range(preset.seeds)]


def report(root: pathlib.Path, study: str, title: str) -> list[dict]:
    results = collect(root)
    if not results:
        raise SystemExit(f"ablations: error: no finished runs under {root}: run without "
                         "--plot-only first")
    variants = {}
    for r in results:
        variants.setdefault(r["name"].rsplit(",seed=", 1)[0], []).append(r)
    rows = [{"variant": name, **seed_statistics(group)} for name, group in variants.items()]
    stem = root / f"ablation_{study}"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    # As in the degradation table: statistics over the runs that converged, the others apart.
    lines = [f"# {title}", "", "| variant | runs | not converged | train error % | "
             "test error % |", "|---|---:|---|---:|---:|"]
    lines += [f"| {r['variant']} | {r['seeds']} | {not_converged(r)} | {mean_std(r, 'train')} | "
              f"{mean_std(r, 'test')} |" for r in rows]
    failed = [r for r in results if not r["summary"].get("converged", True)]
    if failed:
        lines += ["", "Not converged (left out of the statistics above):", "",
                  "| run | train error % | test error % |", "|---|---:|---:|"]
        lines += [f"| {r['name']} | {r['summary']['train/error']:.2f} | "
                  f"{r['summary']['test/error']:.2f} |" for r in failed]
    pathlib.Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    pathlib.Path(f"{stem}.json").write_text(json.dumps({"title": title, "table": rows},
                                                       indent=2) + "\n")
    print("\n".join(lines))
    return rows


def main(argv=None) -> int:
    parser = ArgumentParser("experiments.ablations", __doc__)
    parser.add_argument("--study", choices=STUDIES, required=True,
                        help="shortcuts: options A, B, C (Table 3's question); preact: post- vs "
                             "pre-activation blocks (He et al. 2016)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="digits",
                        help="schedule, data and seeds of a degradation preset")
    parser.add_argument("--root", required=True,
                        help="directory of the study's runs and its ablation_<study> tables")
    parser.add_argument("--dataset", help="override the preset's dataset")
    parser.add_argument("--processes", type=int, default=1, help="runs trained at once")
    parser.add_argument("--seeds-per-program", type=int, default=1,
                        help="train up to this many seeds of one net in one program "
                             "(vmapped on GPU/TPU, a loop on CPU)")
    parser.add_argument("--plot-only", action="store_true", help="rewrite the table, train nothing")
    args = parser.parse_args(argv)
    root = pathlib.Path(args.root)
    title = (f"Ablation '{args.study}', {args.dataset or PRESETS[args.preset].dataset}"
             f" ({args.preset} preset)")
    from resnet_jax.train import ConfigError

    try:
        if not args.plot_only:  # a report also after failed runs, which it leaves out
            return run_sweep_command("ablations", runs(args.study, args.preset, args.dataset),
                                     root, processes=args.processes,
                                     seeds_per_program=args.seeds_per_program,
                                     report=lambda: report(root, args.study, title))
        report(root, args.study, title)
    except ConfigError as e:  # a run's damaged config.json or summary.json
        print(f"ablations: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
