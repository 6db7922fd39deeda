"""How long `resnet-jax summary` takes as a user meets it, in fresh processes on this machine:

    python -m benchmarks.summary_time --rounds=2 --against=/tmp/old

Each round times, in its own process with its imports: the whole table (`resnet-jax summary`,
to its first row and to its end), one net (`resnet-jax summary` of ResNet-152's config), and in
one more process each of the paper's nets after the imports (`summary.standard_nets` of one
depth: its residual and plain net). `--against=DIR` times another checkout the same way, in turn
within each round so that a busy machine's drift hits both alike (e.g. `git worktree add
/tmp/old COMMIT`), and says whether the two tables hold the same numbers. Prints the median
wall and CPU seconds over the rounds as a markdown table.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

from resnet_jax.cli import ArgumentParser

REPO = pathlib.Path(__file__).resolve().parents[1]
ONE_NET = ["summary", "--config=resnet_jax/configs/imagenet.py:depth=152", "--json"]
NETS = [("cifar", d) for d in (20, 32, 44, 56, 110, 1202)] + [
    ("imagenet", d) for d in (18, 34, 50, 101, 152)]
# Runs in the checkout's own interpreter process: times `standard_nets` one depth at a time.
PER_NET = f"""
import json, time
from resnet_jax import summary
for family, depth in {NETS!r}:
    wall, cpu = time.perf_counter(), time.process_time()
    rows = list(summary.standard_nets(cifar_depths=(depth,) if family == "cifar" else (),
                                      imagenet_depths=(depth,) if family == "imagenet" else ()))
    print(json.dumps({{"net": " + ".join(r["name"] for r in rows),
                      "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}}),
          flush=True)
"""


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(checkout: pathlib.Path, args: list[str]) -> tuple[list[tuple[float, str]], float, float]:
    """`python ARGS` in `checkout`: (each stdout line with its wall time since the start, wall
    seconds, CPU seconds)."""
    cpu, start = child_cpu(), time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=checkout, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(checkout)})
    lines = [(time.perf_counter() - start, line.rstrip("\n")) for line in proc.stdout]
    if proc.wait():
        raise SystemExit(f"summary_time: error: {' '.join(args)} failed in {checkout}")
    return lines, time.perf_counter() - start, child_cpu() - cpu


def measure(checkout: pathlib.Path) -> dict[str, tuple[float, float]]:
    """{measure: (wall s, CPU s)} of one round, and the table's rows under "rows"."""
    lines, wall, cpu = run(checkout, ["-m", "resnet_jax.main", "summary"])
    out = {"table: first row": (lines[2][0], float("nan")), "table: all rows": (wall, cpu),
           "rows": [line.split() for _, line in lines[2:]]}
    _, wall, cpu = run(checkout, ["-m", "resnet_jax.main", *ONE_NET])
    out["one net: ResNet-152 config"] = (wall, cpu)
    for _, line in run(checkout, ["-c", PER_NET])[0]:
        row = json.loads(line)
        out[f"in process: {row['net']}"] = (row["wall"], row["cpu"])
    return out


def main(argv=None) -> int:
    parser = ArgumentParser("benchmarks.summary_time", __doc__)
    parser.add_argument("--rounds", type=int, default=2, help="times every measure is taken")
    parser.add_argument("--against", help="another checkout to time in turn, e.g. an older commit")
    args = parser.parse_args(argv)
    checkouts = {"this": REPO}
    if args.against:
        against = pathlib.Path(args.against).resolve()
        if not (against / "resnet_jax" / "summary.py").is_file():
            parser.error(f"--against={args.against} has no resnet_jax/summary.py: pass a "
                         "checkout, e.g. one made by git worktree add /tmp/old COMMIT")
        checkouts["against"] = against
    if args.rounds < 1:
        parser.error(f"--rounds={args.rounds}: pass a positive integer")
    rounds = {name: [] for name in checkouts}
    for _ in range(args.rounds):
        for name, checkout in checkouts.items():
            rounds[name].append(measure(checkout))
            print(f"[summary_time] {name}: table in {rounds[name][-1]['table: all rows'][0]:.1f} "
                  "s", file=sys.stderr, flush=True)
    median = lambda name, key, i: statistics.median(r[key][i] for r in rounds[name])  # noqa: E731
    print(f"{args.rounds} rounds; median wall s / CPU s (user + system, all threads)")
    print("| measure | " + " | ".join(map(str, checkouts.values())) + " |\n|---|"
          + "---:|" * len(checkouts))
    for key in (k for k in rounds["this"][0] if k != "rows"):
        print(f"| {key} | " + " | ".join(
            f"{median(n, key, 0):.1f} / "
            + ("-" if math.isnan(median(n, key, 1)) else f"{median(n, key, 1):.1f}")
            for n in checkouts) + " |")
    if args.against:
        same = rounds["this"][0]["rows"] == rounds["against"][0]["rows"]
        print(f"\nthe two tables hold the same numbers: {'yes' if same else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
