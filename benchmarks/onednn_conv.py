"""One convolution layer of each CIFAR ResNet stage, forward pass and both gradients, timed in
XLA's convolution (resnet_jax.xla_cpu, Eigen), in oneDNN through XLA FFI (resnet_jax.onednn) and
in PyTorch (channels_last, eager):

    python -m benchmarks.onednn_conv --batch=128 --iters=10 --rounds=5

3x3 convolutions, stride 1, 16/32/64 channels on 32/16/8 maps (He et al. 2015, Sec. 4.2). Each
pass of each implementation is timed `iters` calls at a time, all of them in turns, for `rounds`
rounds; the best round counts, so that a burst of other work on shared cores hits all alike.
Prints milliseconds per call, the ratios and the load average before and after. oneDNN runs
one OpenMP thread per call unless OMP_NUM_THREADS is set (resnet_jax/onednn.py).
"""

from __future__ import annotations

import functools
import os
import time

from benchmarks import import_torch
from resnet_jax.cli import ArgumentParser

SHAPES = [(32, 16), (16, 32), (8, 64)]  # (map side, channels) of the three stages


def _jax_passes(conv, batch, side, channels):
    """fwd, dx, dw of `conv` as jitted thunks, with their inputs bound."""
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    x = jax.numpy.asarray(rng.standard_normal((batch, side, side, channels)), "float32")
    w = jax.numpy.asarray(rng.standard_normal((3, 3, channels, channels)), "float32")
    dy = jax.numpy.asarray(rng.standard_normal((batch, side, side, channels)), "float32")

    def f(x, w):
        return conv(x, w, (1, 1), [(1, 1), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC"))

    fwd = jax.jit(f)
    dx = jax.jit(lambda x, w, dy: jax.vjp(lambda x: f(x, w), x)[1](dy)[0])
    dw = jax.jit(lambda x, w, dy: jax.vjp(lambda w: f(x, w), w)[1](dy)[0])
    return {"fwd": lambda: fwd(x, w).block_until_ready(),
            "dx": lambda: dx(x, w, dy).block_until_ready(),
            "dw": lambda: dw(x, w, dy).block_until_ready()}


def _torch_passes(torch, batch, side, channels):
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(batch, channels, side, side).to(memory_format=cl)
    w = torch.randn(channels, channels, 3, 3).to(memory_format=cl)
    dy = torch.randn(batch, channels, side, side).to(memory_format=cl)

    def backward(mask):
        return torch.ops.aten.convolution_backward(dy, x, w, None, [1, 1], [1, 1], [1, 1],
                                                   False, [0, 0], 1, mask)

    return {"fwd": lambda: torch.nn.functional.conv2d(x, w, None, 1, 1),
            "dx": lambda: backward([True, False, False]),
            "dw": lambda: backward([False, True, False])}


def main(argv=None) -> int:
    parser = ArgumentParser("benchmarks.onednn_conv", __doc__)
    parser.add_argument("--batch", type=int, default=128, help="images per call")
    parser.add_argument("--iters", type=int, default=10, help="calls per pass and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds in turns; the best counts")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    args = parser.parse_args(argv)
    from resnet_jax import onednn, xla_cpu

    ok, why = onednn.available()
    if not ok:
        print(f"oneDNN convolution unavailable: {why}")
        return 2
    torch = None if args.no_torch else import_torch("onednn_conv")
    load = os.getloadavg()
    impls = {"eigen": functools.partial(_jax_passes, xla_cpu.conv_general_dilated, args.batch),
             "onednn": functools.partial(_jax_passes, xla_cpu.onednn_conv_general_dilated,
                                         args.batch)}
    if torch is not None:
        impls["torch"] = lambda s, c: _torch_passes(torch, args.batch, s, c)
    thunks = {(impl, shape, p): fn for impl, make in impls.items() for shape in SHAPES
              for p, fn in make(*shape).items()}
    for fn in thunks.values():  # compile and warm up
        fn(), fn()
    best = {k: float("inf") for k in thunks}
    for _ in range(args.rounds):
        for key, fn in thunks.items():
            start = time.perf_counter()
            for _ in range(args.iters):
                fn()
            best[key] = min(best[key], (time.perf_counter() - start) / args.iters * 1e3)
    print(f"batch {args.batch}, best of {args.rounds} rounds x {args.iters} calls, ms per call")
    print("| layer | pass | " + " | ".join(impls) + " | eigen / onednn |"
          + (" torch / onednn |" if torch is not None else ""))
    print("|---|---|" + "---:|" * (len(impls) + 1 + (torch is not None)))
    for side, c in SHAPES:
        for p in ("fwd", "dx", "dw", "sum"):
            ms = {i: (sum(best[(i, (side, c), q)] for q in ("fwd", "dx", "dw")) if p == "sum"
                      else best[(i, (side, c), p)]) for i in impls}
            row = f"| {side}x{side}x{c} | {p} | " + " | ".join(f"{ms[i]:.2f}" for i in impls)
            row += f" | {ms['eigen'] / ms['onednn']:.2f} |"
            if torch is not None:
                row += f" {ms['torch'] / ms['onednn']:.2f} |"
            print(row)
    print(f"load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f} (2 = two busy cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
