"""He et al. 2015, Fig. 1 and Fig. 6 (and Table 6): plain vs residual nets at 20-110 layers.

    python -m experiments.degradation --preset=digits --root=runs/degradation-digits
    python -m experiments.degradation --preset=cifar-cpu --dataset=folder:/data/cifar10 --root=DIR
    python -m experiments.degradation --preset=paper --root=DIR          # GPU/TPU, TFDS cifar10
    python -m experiments.degradation --root=DIR --plot-only             # redraw from DIR
    python -m experiments.degradation --preset=paper --root=DIR --index=I  # run I only (job arrays)

Runs every missing run of the preset's sweep (finished runs are skipped, interrupted ones resume),
then writes into ROOT: degradation.png/.pdf (training error dashed, test error bold, against
iterations; one panel for plain nets, one for residual nets, as in Fig. 6), degradation.md/.csv
(final errors per depth: mean +- std, median and best over the seeds that converged) and
degradation.json (every number). A run that did not train (summary.json `converged: false`: a
final training error of at least 90 % of chance's, `not_converged_fraction_of_chance`) is
counted and listed apart, not averaged in. Only the `paper` preset's table puts the paper's
Table 6 beside its own numbers, each beside the statistic of the same kind (ResNet-110: best of
5 beside the best, mean +- std of 5 beside the mean; the other depths: one run beside the mean);
every other table keeps the paper's CIFAR-10 numbers in a section of their own.

Presets:
  paper      CIFAR-10 from TFDS, 64k iterations, 5 seeds, batch-norm statistics per 64 images
             (the paper's 2 GPUs x 64), warm-up for 110 and deeper by the paper's rule (lr 0.01
             until the training error of the last 20 batches is below 80 %, at most 2,000
             iterations), plus ResNet-1202. Expected (Table 6): ResNet-20/32/44/56 test error
             8.75/7.51/7.17/6.97 % (one run each), ResNet-110 6.43 % best and 6.61 +- 0.16 %
             mean of 5 runs, 1202: 7.93 %; plain nets get worse with depth. Wall time not yet
             measured on a GPU here.
  cifar-cpu  real CIFAR-10 (folder: copy or TFDS), the same depths, 1 seed, 500 iterations of 64
             at lr 0.05, filters 8/16/32. About an hour on 2 CPU cores (81 min measured on 2 EPYC
             cores with other work sharing them); shows deeper plain nets training worse and every
             ResNet below its plain twin (experiments/results/cifar-cpu, README).
  cifar16-cpu  CIFAR-10 at 16x16 (pixel-block means, `image_size=16`), the same depths, 2 seeds,
             6,000 iterations of 64 at lr 0.05, filters 8/16/32, no per-layer diagnostics: the
             search for both halves of Fig. 6 on a CPU (experiments/results/cifar16-cpu/). About
             6 hours on 2 CPU cores: run it in pieces with --index.
  digits     scikit-learn's 8x8 digits (offline), the same depths, 1 seed, 400 iterations of 64 at
             lr 0.02; under 15 minutes on 2 CPU cores.
  smoke      seconds, for tests.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import sys

from experiments.common import collect, mean_std, not_converged, seed_statistics
from experiments.sweep import Run, failures, run_sweep_command
from resnet_jax.cli import ArgumentParser
from resnet_jax.configs import net_name, warmup

# He et al. 2015, Table 6: CIFAR-10 test error (%) of the residual nets. ResNet-110 was trained 5
# times ("best (mean +- std)"); every other net once (n = 1: `mean` is that run's error).
PAPER_TABLE6 = {20: {"n": 1, "mean": 8.75}, 32: {"n": 1, "mean": 7.51},
                44: {"n": 1, "mean": 7.17}, 56: {"n": 1, "mean": 6.97},
                110: {"n": 5, "mean": 6.61, "std": 0.16, "best": 6.43},
                1202: {"n": 1, "mean": 7.93}}
PAPER_SCALE = ("He et al. 2015, Table 6: CIFAR-10, 64k iterations of 128 images, 16/32/64 "
               "filters; plain nets only in Fig. 6, plain-110 above 60 %")


@dataclasses.dataclass(frozen=True)
class Preset:
    dataset: str
    depths: tuple[int, ...] = (20, 32, 44, 56, 110)
    residual_only_depths: tuple[int, ...] = ()
    seeds: int = 1
    total_steps: int = 64_000
    batch_size: int = 128
    learning_rate: float = 0.1  # the paper's; tiny sets with short schedules need less
    width: int = 1
    base_width: int = 16  # the paper's 16/32/64 filters; narrower for CPU-scale sweeps
    # Batch-norm statistics per this many images of each global batch (0: all of it); the
    # paper's 2 GPUs x 64 images are 64.
    bn_group_size: int = 0
    log_every_steps: int = 100
    eval_every_steps: int = 2_000
    eval_subset: int = 0  # test images per evaluation before the last (0 = all; the last: all)
    image_size: int = 0  # 0: the dataset's own; 16 on CIFAR: pixel-block means, 4x cheaper steps
    log_diagnostics: bool = True  # per-layer diagnostics in every record; off saves CPU time
    # Blocks under scan from this depth: ResNet-1202 compiles in seconds, not minutes; the step
    # is about 5 % slower on CPU, so shallower nets stay unrolled (benchmarks/RESULTS.md).
    scan_from_depth: int = 200

    def schedule(self, depth: int) -> dict:
        """Config overrides: the paper's schedule scaled to `total_steps` iterations."""
        s = self.total_steps
        return {
            "total_steps": s, "batch_size": self.batch_size,
            "learning_rate": self.learning_rate, "warmup_learning_rate": self.learning_rate / 10,
            "lr_boundaries_steps": (s // 2, s * 3 // 4),  # 32k and 48k of 64k, scaled
            **warmup(depth, s),  # the paper's rule for ResNet-110 and deeper, scaled
            "bn_group_size": self.bn_group_size,
            "log_every_steps": self.log_every_steps, "eval_every_steps": self.eval_every_steps,
            "eval_subset": self.eval_subset,
            "image_size": self.image_size, "log_diagnostics": self.log_diagnostics,
            "checkpoint_every_steps": self.eval_every_steps,
            "scan_blocks": depth >= self.scan_from_depth,
        }

    def runs(self, dataset: str | None = None) -> list[Run]:
        runs = []
        base = "" if self.base_width == 16 else f",base_width={self.base_width}"
        for depth in sorted(self.depths + self.residual_only_depths):
            for residual in (False, True):
                if residual or depth not in self.residual_only_depths:
                    runs += [Run(f"depth={depth},residual={str(residual).lower()},"
                                 f"width={self.width}{base},dataset={dataset or self.dataset},"
                                 f"seed={seed}", self.schedule(depth))
                             for seed in range(self.seeds)]
        return runs


PRESETS = {
    "paper": Preset(dataset="cifar10", residual_only_depths=(1202,), seeds=5, bn_group_size=64),
    # Sized by timing single steps on 2 EPYC cores (batch 64, base width 8): 0.21 s for 20
    # layers, 0.64 s for 56, 1.68 s for 110. Batch 64 at the paper's lr scaled to it (0.05):
    # more updates in the same time than 128. Evaluations before the last use 2,000 test images.
    "cifar-cpu": Preset(dataset="cifar10", total_steps=500, batch_size=64, learning_rate=0.05,
                        base_width=8, log_every_steps=25, eval_every_steps=125,
                        eval_subset=2_000),
    # Both halves of Fig. 6 need the deeper ResNets past the point where they overtake the
    # shallower ones, which 500 iterations at 32x32 are not (ResNet-20 is the best ResNet there).
    # At 16x16 a step costs a quarter; the iterations are what the measurements in
    # experiments/results/cifar16-cpu/README.md show the crossing needs. Hours on 2 CPU cores:
    # run it in pieces with --index (each piece resumes and is skipped once finished).
    "cifar16-cpu": Preset(dataset="cifar10", total_steps=6_000, batch_size=64, learning_rate=0.05,
                          base_width=8, image_size=16, seeds=2, log_every_steps=100,
                          eval_every_steps=1_000, eval_subset=2_000, log_diagnostics=False),
    # lr 0.02: at 0.1, 400 iterations on 1,497 8x8 images leave even residual nets of 44+ layers
    # far from trained (ResNet-56: 72 % training error after 120 iterations at 0.1, 25 % at 0.02;
    # plain-56 stays at 83 % either way), which would hide what the figure is about.
    "digits": Preset(dataset="digits", total_steps=400, batch_size=64, learning_rate=0.02,
                     log_every_steps=20, eval_every_steps=100),
    "smoke": Preset(dataset="digits", depths=(8, 14), total_steps=6, batch_size=32,
                    log_every_steps=2, eval_every_steps=6),
}


# --- Results -------------------------------------------------------------------------------


def table(results: list[dict], paper: bool = False) -> list[dict]:
    """Final errors per (net, depth) over the seeds that converged; with `paper`, the paper's
    Table 6 entry of each residual net beside them."""
    rows = []
    keys = sorted({(r["residual"], r["depth"]) for r in results})
    for residual, depth in keys:
        group = [r for r in results if (r["residual"], r["depth"]) == (residual, depth)]
        row = {"net": net_name(depth, residual), "depth": depth,
               "residual": residual, **seed_statistics(group)}
        if paper and residual and depth in PAPER_TABLE6:
            entry = PAPER_TABLE6[depth]
            row |= {"paper_n": entry["n"], "paper_mean": entry["mean"],
                    "paper_std": entry.get("std"), "paper_best": entry.get("best")}
        rows.append(row)
    return rows


def paper_cells(entry: dict) -> tuple[str, str]:
    """(mean cell, best cell) of a Table 6 entry: '6.61 +- 0.16 (n=5)', '6.43 (best of 5)'."""
    spread = f" +- {entry['std']:.2f}" if entry.get("std") is not None else ""
    best = entry.get("best")
    return (f"{entry['mean']:.2f}{spread} (n={entry['n']})",
            f"{best:.2f} (best of {entry['n']})" if best is not None else "")


def setup_text(results: list[dict]) -> str:
    """What the numbers are over: the batch-norm groups and what "not converged" means."""
    groups = []
    for group, batch in sorted({(r["config"].get("bn_group_size", 0), r["config"]["batch_size"])
                                for r in results}):
        groups.append(f"groups of {group} images of each global batch of {batch}, "
                      f"bn_group_size={group}" if group and group < batch else
                      f"the whole global batch of {batch}, bn_group_size={group}")
    thresholds = sorted({r["summary"]["not_converged_from_train_error"] for r in results
                         if "not_converged_from_train_error" in r["summary"]})
    limit = (" (" + " / ".join(f"{t:.2f} %" for t in thresholds) + " here)") if thresholds else ""
    return ("Batch-norm statistics over " + "; ".join(groups) + " (the paper: groups of 64, "
            "2 GPUs x 64 images). Means, stds, medians and bests are over the runs that "
            "converged; a run that did not (did not train: a final training error of at least "
            f"90 % of chance-level error{limit}) is counted, listed apart and left out.")


def write_table(rows: list[dict], root: pathlib.Path, title: str, *, setup: str = "",
                failed: list[dict] = (), paper: bool = False) -> None:
    """degradation.md/.csv. `failed`: the runs that did not converge, listed apart; `paper`:
    the paper's numbers beside ours (else in a section of their own, as not comparable)."""
    fields = ["net", "seeds", "converged_seeds", "train_mean", "train_std", "train_median",
              "test_mean", "test_std", "test_median", "test_best", "not_converged_seeds"]
    fields += ["paper_n", "paper_mean", "paper_std", "paper_best"] if paper else []
    with open(root / "degradation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    best = paper or any(r["converged_seeds"] > 1 for r in rows)
    header = ["net", "runs", "not converged", "train error %", "test error %"]
    header += ["paper, test error %"] if paper else []
    header += ["test error %, best"] + (["paper, best"] if paper else []) if best else []
    lines = [f"# {title}", "", setup, "", "| " + " | ".join(header) + " |",
             "|---|---:|---|" + "---:|" * (len(header) - 3)]
    for r in rows:
        cells = [r["net"], str(r["seeds"]), not_converged(r), mean_std(r, "train"),
                 mean_std(r, "test")]
        paper_mean, paper_best = (paper_cells({"n": r["paper_n"], "mean": r["paper_mean"],
                                               "std": r["paper_std"], "best": r["paper_best"]})
                                  if "paper_n" in r else ("", ""))
        cells += [paper_mean] if paper else []
        if best:
            n = r["converged_seeds"]
            cells.append(f"{r['test_best']:.2f} (best of {n})" if n else "-")
            cells += [paper_best] if paper else []
        lines.append("| " + " | ".join(cells) + " |")
    if paper:
        lines += ["", f"Paper: {PAPER_SCALE}. ResNet-110: best of 5 runs beside our best, mean "
                  "+- std of 5 beside our mean; the other depths: one run each, beside our mean."]
    if failed:
        lines += ["", "## Not converged (left out of the statistics above)", "",
                  "| net | seed | train error % | test error % |", "|---|---:|---:|---:|"]
        lines += [f"| {net_name(r['depth'], r['residual'])} | {r['seed']} | "
                  f"{r['summary']['train/error']:.2f} | {r['summary']['test/error']:.2f} |"
                  for r in failed]
    if not paper:
        lines += ["", f"## The paper's numbers ({PAPER_SCALE}): not comparable with this "
                  "table's scale", "", "| net | test error % | best |", "|---|---:|---:|"]
        lines += [f"| ResNet-{d} | " + " | ".join(paper_cells(e)) + " |"
                  for d, e in PAPER_TABLE6.items()]
    (root / "degradation.md").write_text("\n".join(lines) + "\n")


def plot(results: list[dict], root: pathlib.Path, title: str) -> None:
    """Fig. 6 layout: plain (left) and residual (right); train error dashed, test error bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r["depth"] for r in results})
    colors = dict(zip(depths, plt.cm.viridis_r([0.15 + 0.75 * i / max(1, len(depths) - 1)
                                                for i in range(len(depths))])))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, residual in zip(axes, (False, True)):
        for depth in depths:
            runs = [r for r in results if r["residual"] == residual and r["depth"] == depth]
            for i, r in enumerate(runs):
                label = net_name(depth, residual) if i == 0 else None
                steps = [c["step"] for c in r["curve"]]
                ax.plot(steps, [c["train/error"] for c in r["curve"]], "--", lw=1,
                        color=colors[depth])
                test = [(c["step"], c["test/error"]) for c in r["curve"] if "test/error" in c]
                ax.plot(*zip(*test), "-", lw=2.2, color=colors[depth], label=label)
        ax.set_title("residual nets" if residual else "plain nets")
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel may have no runs
            ax.legend(fontsize=8)
    axes[0].set_ylabel("error (%)  — dashed: training, bold: test")
    fig.suptitle(title)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(root / f"degradation.{ext}", dpi=130)
    plt.close(fig)


def report(root: pathlib.Path, title: str, paper: bool = False) -> list[dict]:
    """Writes the table, figure and numbers of the finished runs under `root`; `paper`: the
    paper's Table 6 beside them (the `paper` preset only)."""
    results = collect(root)
    if not results:
        raise SystemExit(f"degradation: error: no finished runs under {root}: run without "
                         "--plot-only first")
    rows = table(results, paper)
    failed = [r for r in results if not r["summary"].get("converged", True)]
    write_table(rows, root, title, setup=setup_text(results), failed=failed, paper=paper)
    plot(results, root, title)
    (root / "degradation.json").write_text(json.dumps(
        {"title": title, "table": rows,
         "runs": [{k: r[k] for k in ("name", "depth", "residual", "seed", "summary")}
                  for r in results], "failed_runs": failures(root),
         "not_converged_runs": [r["name"] for r in failed],
         "paper_table6": {"source": PAPER_SCALE, "test_error": PAPER_TABLE6}},
        indent=2) + "\n")
    print((root / "degradation.md").read_text())
    return rows


def main(argv=None) -> int:
    parser = ArgumentParser("experiments.degradation", __doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="digits",
                        help="paper (GPU/TPU), cifar-cpu (an hour on 2 cores), cifar16-cpu (hours: "
                             "in pieces with --index), digits (offline, minutes), smoke "
                             "(seconds); the module docstring has each")
    parser.add_argument("--root", required=True, help="directory of the sweep's runs and outputs")
    parser.add_argument("--dataset", help="override the preset's dataset, e.g. folder:/data/c10")
    parser.add_argument("--processes", type=int, default=1, help="runs trained at once")
    parser.add_argument("--seeds-per-program", type=int, default=1,
                        help="train up to this many seeds of one net in one program "
                             "(vmapped on GPU/TPU, a loop on CPU)")
    parser.add_argument("--plot-only", action="store_true", help="redraw from ROOT, train nothing")
    parser.add_argument("--title", help="figure and table title (default: preset and dataset)")
    parser.add_argument("--list", action="store_true", help="print the sweep's runs, one a line")
    parser.add_argument("--index", type=int,
                        help="train only run INDEX of --list (a job array's task) and draw nothing")
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    root = pathlib.Path(args.root)
    dataset = args.dataset or preset.dataset
    title = args.title or f"Plain vs residual nets, {dataset} ({args.preset} preset)"
    paper = args.preset == "paper"  # the only scale at which the paper's numbers compare
    runs = preset.runs(dataset)
    if args.list:
        print("\n".join(run.name for run in runs))
        return 0
    if args.index is not None:
        if not 0 <= args.index < len(runs):
            print(f"degradation: error: --index={args.index} is out of range: the {args.preset} "
                  f"preset has runs 0 to {len(runs) - 1} (see --list)", file=sys.stderr)
            return 2
        runs = [runs[args.index]]
    from resnet_jax.train import ConfigError  # late: --list needs no JAX

    try:
        if not args.plot_only:  # a report also after failed runs: degradation.json names them
            return run_sweep_command("degradation", runs, root, processes=args.processes,
                                     seeds_per_program=args.seeds_per_program,
                                     report=None if args.index is not None else
                                     lambda: report(root, title, paper))
        report(root, title, paper)
    except ConfigError as e:  # a run's damaged config.json or summary.json
        print(f"degradation: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
