"""Convolutions through oneDNN on CPU: an opt-in drop-in for `jax.lax.conv_general_dilated`.

XLA CPU (JAX 0.10.2) runs convolutions in Eigen, its weight gradients effectively on one
thread; none of its options reaches oneDNN for them (benchmarks/RESULTS.md, 2026-12-07). This
module calls oneDNN itself, through three XLA FFI custom calls (onednn_conv.cc): the forward
pass, the data gradient and the weight gradient of a 2-D float32 NHWC x HWIO convolution.

The library is compiled on first use with g++ against the oneDNN headers (Debian:
`apt-get install libdnnl-dev`) into ~/.cache/resnet_jax (or $RESNET_JAX_CACHE), named by a hash
of the source and jaxlib's version, so each process after the first only loads it. `available()`
says whether that works here and, if not, why.

The numbers are not bit-identical to XLA's convolution (oneDNN sums in another order): equal to
float32 rounding (tests/test_onednn.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import data

SOURCE = Path(__file__).with_name("onednn_conv.cc")
_TARGETS = {"resnet_jax_onednn_conv_fwd": "OnednnConvForward",
            "resnet_jax_onednn_conv_bwd_data": "OnednnConvBackwardData",
            "resnet_jax_onednn_conv_bwd_weights": "OnednnConvBackwardWeights"}

_lock = threading.Lock()
state: dict = {}  # "error": why not (str), or "library": the loaded CDLL (a test swaps it)


def _build(rebuild: bool = False) -> Path:
    """The compiled library, built now unless a build of this source is cached (or
    `rebuild`)."""
    import jaxlib
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + jaxlib.__version__.encode()).hexdigest()[:16]
    library = data.cache_dir() / f"onednn_conv-{tag}.so"
    if library.exists() and not rebuild:
        return library
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) to build the oneDNN convolution")
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        out = Path(tmp) / library.name
        cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
               "-Wno-attributes", "-Wno-return-type", f"-I{jax.ffi.include_dir()}",
               str(SOURCE), "-o", str(out), "-ldnnl"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [l for l in done.stderr.splitlines()
                      if "error" in l or "cannot find" in l] or [done.stderr]
            raise RuntimeError(f"could not build the oneDNN convolution (is libdnnl-dev "
                               f"installed?): {errors[0].strip()}")
        os.replace(out, library)  # atomic: concurrent first uses each build, one wins
    return library


def _load():
    with _lock:
        if not state:
            try:
                path = _build()
                # Debian's oneDNN runs on OpenMP (libgomp), whose threads spin after each
                # parallel region by default, taking the cores from XLA's own threads between
                # the convolutions: 3-4x slower convolutions on 2 busy cores (RESULTS.md).
                # libgomp reads this once, as it is loaded: here, with libdnnl, unless PyTorch
                # (which brings its own libgomp) was imported first.
                os.environ.setdefault("OMP_WAIT_POLICY", "passive")
                try:
                    library = ctypes.CDLL(str(path))
                except OSError:  # built against another oneDNN, since replaced: once more
                    library = ctypes.CDLL(str(_build(rebuild=True)))
                # OpenMP's thread count per call (OMP_NUM_THREADS, else every core): on 2 idle
                # cores a ResNet-20 step ran at 1.66x Eigen's images/s so against 1.10x with one
                # thread per call; on busy cores one thread per call (OMP_NUM_THREADS=1) did
                # better, as XLA runs a layer's two gradients at once (RESULTS.md).
                library.OnednnConvSetThreads(0)
                for target, symbol in _TARGETS.items():
                    jax.ffi.register_ffi_target(
                        target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
                state["library"] = library
            except (OSError, RuntimeError) as e:
                state["error"] = str(e)
    return state


def available() -> tuple[bool, str]:
    """Whether the oneDNN convolution can run here (building it if needed), and if not, why."""
    state = _load()
    return "library" in state, state.get("error", "")


def _call(target, shape, a, b, strides, padding):
    ok, why = available()
    if not ok:
        raise RuntimeError(why)
    (ph_lo, ph_hi), (pw_lo, pw_hi) = padding
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method="sequential")(
        a, b, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
        pad_h_lo=np.int64(ph_lo), pad_h_hi=np.int64(ph_hi), pad_w_lo=np.int64(pw_lo),
        pad_w_hi=np.int64(pw_hi))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x, w, strides, padding):
    """The convolution NHWC x HWIO -> NHWC of float32 `x` and `w` with `strides` (2 ints) and
    `padding` (2 (low, high) pairs), differentiable in both."""
    n, h, wd, _ = x.shape
    kh, kw, _, o = w.shape
    (ph_lo, ph_hi), (pw_lo, pw_hi) = padding
    out = (n, (h + ph_lo + ph_hi - kh) // strides[0] + 1,
           (wd + pw_lo + pw_hi - kw) // strides[1] + 1, o)
    return _call("resnet_jax_onednn_conv_fwd", out, x, w, strides, padding)


def _conv_fwd(x, w, strides, padding):
    return conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, dy):
    x, w = residuals
    dx = _call("resnet_jax_onednn_conv_bwd_data", x.shape, dy, w, strides, padding)
    dw = _call("resnet_jax_onednn_conv_bwd_weights", w.shape, x, dy, strides, padding)
    return dx, dw


conv.defvjp(_conv_fwd, _conv_bwd)
