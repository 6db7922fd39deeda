"""JAX (resnet_jax's train step) and PyTorch (benchmarks/torch_reference.py) side by side, from
one run on the same machine, with the ratio:

    python -m benchmarks.compare --depths=20,56,110 --batch=128 --steps=20 --rounds=3 [--json=F]

Each net is timed in every PyTorch mode (eager, torch.compile; NCHW and channels_last), all of
them compiled first and then timed in turns, `steps` steps each, for `rounds` rounds: each
framework's best round counts, so that a burst of other work hits both alike. The ratio is JAX
images/s over the best PyTorch mode's. The load average before and after is printed: on CPU,
only a run on otherwise idle cores measures the code. On a GPU add --dtype=bfloat16 for JAX's bfloat16
compute (PyTorch runs float32 here, so compare float32 rows for like with like).
"""

from __future__ import annotations

import json
import os
import sys

from benchmarks import import_torch
from resnet_jax import allocator
from resnet_jax.cli import ArgumentParser


def main(argv=None) -> int:
    if argv is None:  # both frameworks get the allocator the commands get (resnet_jax.allocator)
        allocator.preload()
    parser = ArgumentParser("benchmarks.compare", __doc__)
    parser.add_argument("--depths", default="20,56,110", help="CIFAR ResNet depths")
    parser.add_argument("--batch", type=int, default=128, help="images per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per net, mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds, taken in turns")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="JAX's compute dtype (PyTorch runs float32)")
    parser.add_argument("--modes", default="eager,compile",
                        help="PyTorch modes: eager, compile")
    parser.add_argument("--cpu-convolutions", default="eigen",
                        help="JAX's config.cpu_convolution on CPU, one row each: eigen, onednn")
    parser.add_argument("--json", help="also write every row to this file")
    args = parser.parse_args(argv)
    torch = import_torch("compare")
    if torch is None:
        return 2
    import jax

    from benchmarks import torch_reference
    from resnet_jax import bench
    from resnet_jax.configs import cifar

    load = os.getloadavg()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, lines = [], ["| net | JAX images/s | best PyTorch images/s (mode) | JAX / PyTorch | "
                       "JAX compile s |", "|---|---:|---:|---:|---:|"]
    for depth in map(int, args.depths.split(",")):
        ours = []
        for conv in args.cpu_convolutions.split(","):
            config = cifar.get_config(f"depth={depth}")
            config.batch_size, config.dtype, config.num_devices = args.batch, args.dtype, 1
            config.log_diagnostics = False  # the reference computes none
            config.cpu_convolution = conv
            ours.append(bench.Step(config))
        peers = [torch_reference.Step(depth, batch_size=args.batch, mode=mode, channels_last=cl,
                                      device=device)
                 for mode in args.modes.split(",") for cl in (False, True)]
        steps = [*ours, *peers]
        seconds = [[] for _ in steps]
        for _ in range(args.rounds):
            for times, step in zip(seconds, steps):
                times.append(step.time(args.steps))
        timed = [step.row(min(times)) | {"rounds_ms": [1e3 * t for t in times]}
                 for step, times in zip(steps, seconds)]
        ours, theirs = timed[:len(ours)], timed[len(ours):]
        best = max(theirs, key=lambda r: r["images_per_sec"])
        for row, conv in zip(ours, args.cpu_convolutions.split(",")):
            row |= {"framework": "jax", "jax": jax.__version__, "cpu_convolution": conv}
            net = row["net"] + (f" ({conv})" if args.cpu_convolutions != "eigen" else "")
            lines.append(f"| {net} | {row['images_per_sec']:.0f} | "
                         f"{best['images_per_sec']:.0f} ({best['mode']}) | "
                         f"{row['images_per_sec'] / best['images_per_sec']:.2f} | "
                         f"{row['compile_s']:.1f} |")
        rows += [*ours, *theirs]
        for r in theirs:
            print(f"  pytorch {r['net']} {r['mode']}: {r['images_per_sec']:.0f} images/s",
                  file=sys.stderr, flush=True)
    print(f"device: {jax.devices()[0].device_kind} (JAX {jax.__version__}), "
          f"torch {torch.__version__} on {device}, batch {args.batch}, {args.dtype} JAX, "
          f"best of {args.rounds} rounds of {args.steps} steps; load average before "
          f"{load[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
