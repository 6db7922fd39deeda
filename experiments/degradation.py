"""He et al. 2015, Fig. 1 and Fig. 6 (and Table 6): plain vs residual nets at 20-110 layers.

    python -m experiments.degradation --preset=digits --root=runs/degradation-digits
    python -m experiments.degradation --preset=cifar-cpu --dataset=folder:/data/cifar10 --root=DIR
    python -m experiments.degradation --preset=paper --root=DIR          # GPU/TPU, TFDS cifar10
    python -m experiments.degradation --root=DIR --plot-only             # redraw from DIR
    python -m experiments.degradation --preset=paper --root=DIR --index=I  # run I only (job arrays)

Runs every missing run of the preset's sweep (finished runs are skipped, interrupted ones resume),
then writes into ROOT: degradation.png/.pdf (training error dashed, test error bold, against
iterations; one panel for plain nets, one for residual nets, as in Fig. 6), degradation.md/.csv
(final errors per depth: mean +- std and median over seeds, the paper's numbers beside them) and
degradation.json (every number). A run whose final training error stays above
`max_converged_train_error` (80 %) is marked "not converged" rather than averaged in silently.

Presets:
  paper      CIFAR-10 from TFDS, 64k iterations, 5 seeds, warm-up (lr 0.01 for 400 iterations) for
             110 and deeper, plus ResNet-1202. Expected (Table 6): ResNet-20/32/44/56/110 test
             error 8.75/7.51/7.17/6.97/6.43 % (110: 6.61 +- 0.16 over 5 runs), 1202: 7.93 %; plain
             nets get worse with depth. Wall time not yet measured on a GPU here.
  cifar-cpu  real CIFAR-10 (folder: copy or TFDS), the same depths, 1 seed, 500 iterations of 64
             at lr 0.05, filters 8/16/32. About an hour on 2 CPU cores (81 min measured on 2 EPYC
             cores with other work sharing them); shows deeper plain nets training worse and every
             ResNet below its plain twin (experiments/results/cifar-cpu, README).
  digits     scikit-learn's 8x8 digits (offline), the same depths, 1 seed, 400 iterations of 64 at
             lr 0.02; under 15 minutes on 2 CPU cores.
  smoke      seconds, for tests.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import pathlib
import statistics
import sys

from experiments.sweep import Run, run_sweep_command

# He et al. 2015, Table 6 (CIFAR-10 test error, %, best of 5; 110 also as mean +- std).
PAPER_TEST_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}


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
    warmup_from_depth: int = 110  # the paper warms ResNet-110 up at lr 0.01 for 400 iterations
    log_every_steps: int = 100
    eval_every_steps: int = 2_000
    eval_subset: int = 0  # test images per evaluation before the last (0 = all; the last: all)
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
            "warmup_steps": 400 * s // 64_000 if depth >= self.warmup_from_depth else 0,
            "log_every_steps": self.log_every_steps, "eval_every_steps": self.eval_every_steps,
            "eval_subset": self.eval_subset,
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
    "paper": Preset(dataset="cifar10", residual_only_depths=(1202,), seeds=5),
    # Sized by timing single steps on 2 EPYC cores (batch 64, base width 8): 0.21 s for 20
    # layers, 0.64 s for 56, 1.68 s for 110. Batch 64 at the paper's lr scaled to it (0.05):
    # more updates in the same time than 128. Evaluations before the last use 2,000 test images.
    "cifar-cpu": Preset(dataset="cifar10", total_steps=500, batch_size=64, learning_rate=0.05,
                        base_width=8, log_every_steps=25, eval_every_steps=125,
                        eval_subset=2_000),
    # lr 0.02: at 0.1, 400 iterations on 1,497 8x8 images leave even residual nets of 44+ layers
    # far from trained (ResNet-56: 72 % training error after 120 iterations at 0.1, 25 % at 0.02;
    # plain-56 stays at 83 % either way), which would hide what the figure is about.
    "digits": Preset(dataset="digits", total_steps=400, batch_size=64, learning_rate=0.02,
                     log_every_steps=20, eval_every_steps=100),
    "smoke": Preset(dataset="digits", depths=(8, 14), total_steps=6, batch_size=32,
                    log_every_steps=2, eval_every_steps=6),
}


# --- Results -------------------------------------------------------------------------------


def collect(root: pathlib.Path) -> list[dict]:
    """Every finished run under root: its arguments, curves and summary."""
    out = []
    for summary_path in sorted(root.glob("*/summary.json")):
        run_dir = summary_path.parent
        config = json.loads((run_dir / "config.json").read_text())
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        out.append({"name": run_dir.name, "depth": config["depth"],
                    "residual": config["residual"], "seed": config["seed"], "config": config,
                    "summary": json.loads(summary_path.read_text()), "curve": records})
    return out


def seed_statistics(group: list[dict]) -> dict:
    """Mean, std and median over the seeds of one net; the seeds that did not converge."""
    row = {"seeds": len(group),
           "not_converged_seeds": [r["seed"] for r in group
                                   if not r["summary"].get("converged", True)]}
    for split in ("train", "test"):
        values = [r["summary"][f"{split}/error"] for r in group]
        row[f"{split}_mean"] = statistics.fmean(values)
        row[f"{split}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row[f"{split}_median"] = statistics.median(values)
    return row


def table(results: list[dict]) -> list[dict]:
    """Final errors per (net, depth): mean, std and median over seeds; failures named."""
    rows = []
    keys = sorted({(r["residual"], r["depth"]) for r in results})
    for residual, depth in keys:
        group = [r for r in results if (r["residual"], r["depth"]) == (residual, depth)]
        row = {"net": f"{'ResNet' if residual else 'plain'}-{depth}", "depth": depth,
               "residual": residual, **seed_statistics(group)}
        row["paper_test"] = PAPER_TEST_ERROR.get(depth) if residual else None
        rows.append(row)
    return rows


def write_table(rows: list[dict], root: pathlib.Path, title: str) -> None:
    fields = ["net", "seeds", "train_mean", "train_std", "train_median", "test_mean", "test_std",
              "test_median", "paper_test", "not_converged_seeds"]
    with open(root / "degradation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {title}", "",
             "| net | seeds | train error % (mean +- std, median) | test error % (mean +- std, "
             "median) | paper, CIFAR-10 test error % | |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        flag = (f"not converged: seed {', '.join(map(str, r['not_converged_seeds']))}"
                if r["not_converged_seeds"] else "")
        paper = f"{r['paper_test']:.2f}" if r["paper_test"] is not None else ""
        lines.append(f"| {r['net']} | {r['seeds']} | {r['train_mean']:.2f} +- "
                     f"{r['train_std']:.2f}, {r['train_median']:.2f} | {r['test_mean']:.2f} +- "
                     f"{r['test_std']:.2f}, {r['test_median']:.2f} | {paper} | {flag} |")
    lines += ["", "Paper (He et al. 2015, CIFAR-10): plain nets get worse with depth (plain-110 "
              "> 60 % error); ResNet-110 6.61 +- 0.16 % over 5 runs."]
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
                label = f"{'ResNet' if residual else 'plain'}-{depth}" if i == 0 else None
                steps = [c["step"] for c in r["curve"]]
                ax.plot(steps, [c["train/error"] for c in r["curve"]], "--", lw=1,
                        color=colors[depth])
                test = [(c["step"], c["test/error"]) for c in r["curve"] if "test/error" in c]
                ax.plot(*zip(*test), "-", lw=2.2, color=colors[depth], label=label)
        ax.set_title("residual nets" if residual else "plain nets")
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("error (%)  — dashed: training, bold: test")
    fig.suptitle(title)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(root / f"degradation.{ext}", dpi=130)
    plt.close(fig)


def report(root: pathlib.Path, title: str) -> list[dict]:
    results = collect(root)
    if not results:
        raise SystemExit(f"degradation: error: no finished runs under {root}: run without "
                         "--plot-only first")
    rows = table(results)
    write_table(rows, root, title)
    plot(results, root, title)
    (root / "degradation.json").write_text(json.dumps(
        {"title": title, "table": rows,
         "runs": [{k: r[k] for k in ("name", "depth", "residual", "seed", "summary")}
                  for r in results]}, indent=2) + "\n")
    print((root / "degradation.md").read_text())
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="digits")
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
    if not args.plot_only:
        status = run_sweep_command("degradation", runs, root, processes=args.processes,
                                   seeds_per_program=args.seeds_per_program)
        if status or args.index is not None:
            return status
    report(root, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
