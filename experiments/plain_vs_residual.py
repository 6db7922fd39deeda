"""Train a residual net and its plain twin at one depth and compare their errors.

    python -m experiments.plain_vs_residual --depth=20 --dataset=digits --root=runs/digits

The smallest form of He et al. 2015's comparison (Fig. 6): the same layers with and without
shortcuts, the same data, schedule and seed. Each net trains in ROOT/<name>/ through the normal
`train_and_evaluate` (rerunning resumes or skips finished runs); the table goes to stdout and to
ROOT/comparison.json. The degradation sweep over depths builds on this (experiments/ grows).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from resnet_jax import train
from resnet_jax.configs import cifar


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--steps", type=int, default=600, help="iterations per net")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="runs/plain_vs_residual")
    args = parser.parse_args(argv)

    root = pathlib.Path(args.root)
    results = {}
    for residual in (True, False):
        name = f"{'resnet' if residual else 'plain'}{args.depth}"
        config = cifar.get_config(
            f"depth={args.depth},residual={residual},dataset={args.dataset}")
        # The paper's schedule, shrunk to --steps: lr / 10 at 50 % and 75 % of training.
        config.total_steps = args.steps
        config.lr_boundaries_steps = (args.steps // 2, args.steps * 3 // 4)
        config.batch_size, config.seed = args.batch_size, args.seed
        config.log_every_steps = max(1, args.steps // 10)
        config.eval_every_steps = config.checkpoint_every_steps = max(1, args.steps // 2)
        print(f"== {name} on {args.dataset} ({args.steps} iterations)", flush=True)
        try:
            results[name] = train.train_and_evaluate(config, str(root / name))
        except (train.ConfigError, ValueError) as e:
            print(f"plain_vs_residual: error: {e}", file=sys.stderr)
            return 2

    print(f"\n{'net':>12}  {'train error %':>13}  {'test error %':>12}")
    for name, summary in results.items():
        print(f"{name:>12}  {summary['train/error']:>13.2f}  {summary['test/error']:>12.2f}")
    (root / "comparison.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
