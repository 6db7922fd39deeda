"""A convolution XLA CPU differentiates fast: what the models' conv layers call on CPU.

Nothing here changes a number: the forward pass is `jax.lax.conv_general_dilated`, and the
gradients are the same convolutions XLA would run, stated so that XLA CPU runs them on its fast
path (bit-identical gradients, tests/test_models.py). The training side picks the convolution
for its platform (`convolution`, called from `step.create_model`) and hands it to the model
(`models.ResNet(convolution=...)`); the model itself never asks which backend it runs on.

Two XLA CPU behaviours (JAX 0.10.2's XLA) are answered here, each with the way to tell it is gone:

1. XLA CPU's fast (Eigen) convolution takes NHWC x HWIO operands only. JAX differentiates a
   convolution into convolutions with other dimension orders, and XLA CPU rewrites those into
   the NHWC x HWIO form (cpu/conv_canonicalization.cc) only in a program's entry computation,
   not inside loops: in scanned blocks (`scan.BlockRun`) they ran as generic loop nests, a
   ResNet-20 train step 10x slower (benchmarks/RESULTS.md, commit 478c88c). `_nhwc_conv` states
   the backward pass in that form itself. It can go when a scanned step built with
   `convolution=jax.lax.conv_general_dilated` runs as fast as with this one:
   `resnet-jax bench --config=resnet_jax/configs/cifar.py --config.scan_blocks=True` before and
   after swapping the return value of `convolution`.
2. XLA CPU fuses the elementwise ops that produce a weight gradient's operands (batch norm, ReLU,
   the residual stream) into the transposes that feed it, and runs the fusion as a strided loop:
   up to 60 ms for one 8 MB transpose (ResNet-20, batch 128) against 1.6 ms for the transpose
   alone. A `lax.cond` is a fusion boundary XLA keeps (optimization barriers are removed before
   fusion), so the transposes read arrays that already exist (`materialize`): 156 -> 205
   images/s on ResNet-20 (benchmarks/RESULTS.md). It can go when the same bench gives the same
   images/s with `materialize=False` on CPU.

A third, the YNNPACK compiler options, is set per compiled program: parallel.CPU_COMPILER_OPTIONS.

Beside these, an opt-in (`config.cpu_convolution='onednn'`): Eigen itself is the slow part,
its weight gradients on about one thread, and no XLA option of this jaxlib hands convolutions to
oneDNN, so `onednn_conv_general_dilated` calls oneDNN through XLA FFI (onednn.py). Equal to
float32 rounding, not bit for bit, hence not the default.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from resnet_jax import onednn

NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


# config.cpu_convolution: what runs a float32 convolution on CPU. 'eigen': XLA's own (the
# default, every committed number); 'onednn': oneDNN through XLA FFI (onednn.py), equal to
# float32 rounding and 1.6-3.3x faster per layer on 2 cores (benchmarks/RESULTS.md, 2026-12-07).
CPU_CONVOLUTIONS = ("eigen", "onednn")


def check_convolution(cpu_convolution: str) -> None:
    """Raises ValueError (one line) for an unknown `cpu_convolution`, or 'onednn' where oneDNN
    cannot be built or loaded. Whatever the platform: asking JAX which one it is would start
    its backend, too early for a multi-process run or a sweep's parent process."""
    if cpu_convolution not in CPU_CONVOLUTIONS:
        raise ValueError(f"cpu_convolution={cpu_convolution!r}: use one of "
                         f"{', '.join(CPU_CONVOLUTIONS)}")
    if cpu_convolution == "onednn":
        ok, why = onednn.available()
        if not ok:
            raise ValueError(f"cpu_convolution='onednn': {why}; or use cpu_convolution=eigen")


def convolution(platform: str, scanned: bool, cpu_convolution: str = "eigen") -> Callable:
    """The `jax.lax.conv_general_dilated` a model's conv layers should call on `platform`
    ('cpu', 'gpu', 'tpu'), its blocks `scanned` or not: on CPU the canonical-gradient one with
    materialised transposes, or with `cpu_convolution='onednn'` oneDNN's (`onednn_conv_general_
    dilated`); elsewhere JAX's own, or for scanned blocks the canonical-gradient one without the
    barrier (as since 478c88c; only XLA CPU was measured to need it)."""
    if platform == "cpu":
        return onednn_conv_general_dilated if cpu_convolution == "onednn" else conv_general_dilated
    return _conv_general_dilated_unmaterialized if scanned else jax.lax.conv_general_dilated


def _plain(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
           feature_group_count, precision, kwargs) -> bool:
    """A 2-D NHWC x HWIO convolution with explicit padding, no dilation, no groups."""
    return (lhs.ndim == 4 and feature_group_count == 1 and precision is None
            and not isinstance(padding, str)
            and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
            and all(v is None for v in kwargs.values())
            and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC_HWIO))


def onednn_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                rhs_dilation=None, dimension_numbers=None,
                                feature_group_count=1, precision=None, **kwargs):
    """`jax.lax.conv_general_dilated` through oneDNN (onednn.py) for plain float32 2-D NHWC x
    HWIO convolutions; anything else (bfloat16 included) as `conv_general_dilated`."""
    if (lhs.dtype == rhs.dtype == jnp.float32
            and _plain(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                       feature_group_count, precision, kwargs)):
        return onednn.conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)))
    return conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                dimension_numbers, feature_group_count, precision, **kwargs)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, *,
                         materialize: bool = True, **kwargs):
    """`jax.lax.conv_general_dilated` whose gradients are NHWC x HWIO convolutions too (1. of
    the module docstring), the weight gradient's transposes behind a fusion barrier unless
    `materialize` is False (2.). Anything but a plain 2-D NHWC x HWIO convolution goes to
    `jax.lax.conv_general_dilated` unchanged."""
    if _plain(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
              feature_group_count, precision, kwargs):
        return _nhwc_conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)),
                          materialize)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        precision=precision, **kwargs)


def _conv_general_dilated_unmaterialized(*args, **kwargs):
    """`conv_general_dilated` without the fusion barrier (a module-level function, so that two
    nets built with it have equal graphs)."""
    return conv_general_dilated(*args, materialize=False, **kwargs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _nhwc_conv(x, w, strides, padding, materialize):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC_HWIO)


def _nhwc_conv_fwd(x, w, strides, padding, materialize):
    return _nhwc_conv(x, w, strides, padding, materialize), (x, w)


def _nhwc_conv_bwd(strides, padding, materialize, residuals, dy):
    """The two gradient convolutions XLA's canonicalisation would produce, with explicit
    transposes: the same arithmetic, the same values."""
    x, w = residuals
    dx_padding, dw_padding = [], []
    for d, (k, s, (lo, _)) in enumerate(zip(w.shape[:2], strides, padding)):
        size, out = x.shape[1 + d], dy.shape[1 + d]
        dx_padding.append((k - 1 - lo, size - 1 + lo - (out - 1) * s))
        dw_padding.append((lo, k + (out - 1) * s - size - lo))
    # dx: dy (dilated by the stride) against the kernel flipped in space, in and out swapped.
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx = jax.lax.conv_general_dilated(dy, w_t, (1, 1), dx_padding, lhs_dilation=strides,
                                      dimension_numbers=NHWC_HWIO)
    # dw: input channels as the batch, examples as the features, dy as the (dilated) kernel.
    def transposed(x, dy):
        return x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3)

    if materialize:
        # The fusion barrier (2. of the module docstring). Both branches are the same, so the
        # predicate cannot change the result.
        x_t, dy_t = jax.lax.cond(dy[0, 0, 0, 0] == dy[0, 0, 0, 0], transposed, transposed, x, dy)
    else:
        x_t, dy_t = transposed(x, dy)
    dw = jax.lax.conv_general_dilated(x_t, dy_t, (1, 1), dw_padding, rhs_dilation=strides,
                                      dimension_numbers=NHWC_HWIO)
    return dx, dw.transpose(1, 2, 0, 3)


_nhwc_conv.defvjp(_nhwc_conv_fwd, _nhwc_conv_bwd)
