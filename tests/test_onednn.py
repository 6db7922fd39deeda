"""The oneDNN convolution (resnet_jax/onednn.py, config.cpu_convolution='onednn'): its forward
pass and both gradients equal XLA's to float32 rounding; anything it does not cover goes to
XLA's; without g++ or oneDNN it says why in one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import onednn, xla_cpu
from resnet_jax.configs import cifar

needs_onednn = pytest.mark.skipif(not onednn.available()[0],
                                  reason=f"oneDNN convolution unavailable: "
                                         f"{onednn.available()[1]} (.ci/run installs g++ and "
                                         "libdnnl-dev as root)")
EPS = np.finfo(np.float32).eps

# (batch, side, in, out, kernel, stride, padding): the CIFAR stages' layers (He et al. 2015,
# Sec. 4.2) and their stride-2 transitions, option B's 1x1 projection, the CIFAR stem on RGB and
# the ImageNet stem (7x7/2, Table 1).
SHAPES = [(4, 32, 16, 16, 3, 1, 1), (4, 32, 16, 32, 3, 2, 1), (4, 16, 32, 32, 3, 1, 1),
          (4, 16, 32, 64, 3, 2, 1), (4, 8, 64, 64, 3, 1, 1), (4, 32, 16, 32, 1, 2, 0),
          (4, 32, 3, 16, 3, 1, 1), (2, 32, 3, 64, 7, 2, 3)]


def _conv(conv, strides, pad):
    return lambda x, w: conv(x, w, strides, [(pad, pad)] * 2, dimension_numbers=xla_cpu.NHWC_HWIO)


@needs_onednn
@pytest.mark.parametrize("n,side,cin,cout,k,s,pad", SHAPES)
def test_forward_and_gradients_equal_xla_to_float32_rounding(n, side, cin, cout, k, s, pad):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, side, side, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
    ref = _conv(jax.lax.conv_general_dilated, (s, s), pad)
    y, ref_vjp = jax.vjp(ref, x, w)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    got_y, got_vjp = jax.vjp(jax.jit(_conv(xla_cpu.onednn_conv_general_dilated, (s, s), pad)),
                             x, w)
    # Each output is a sum of K products; two float32 orders of it differ by at most
    # 2 K eps times the same sum over absolute values (the standard bound).
    _, abs_vjp = jax.vjp(ref, jnp.abs(x), jnp.abs(w))
    bounds = [ref(jnp.abs(x), jnp.abs(w)), *abs_vjp(jnp.abs(dy))]
    lengths = [k * k * cin, k * k * cout, n * y.shape[1] * y.shape[2]]
    for name, want, got, bound, length in zip(("y", "dx", "dw"), (y, *ref_vjp(dy)),
                                              (got_y, *jax.jit(got_vjp)(dy)), bounds, lengths):
        assert got.shape == want.shape and got.dtype == jnp.float32, name
        err = np.abs(np.asarray(got) - np.asarray(want))
        assert np.all(err <= 2 * length * EPS * np.asarray(bound)), name
        # And in practice a few ULPs of the largest value: a wrong index would not pass.
        assert err.max() <= 1e-5 * np.abs(np.asarray(want)).max(), name


@needs_onednn
def test_vmap_and_several_devices_at_once():
    """Batched weights (one net per seed under vmap) and programs on 4 devices at once, whose
    calls into oneDNN run concurrently, give what XLA's convolution gives."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 2, 8, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 3, 3, 16, 16)), jnp.float32)

    def loss(conv):
        return lambda x, w: jnp.sum(_conv(conv, (1, 1), 1)(x, w) ** 2)

    def grads(conv):
        return jax.vmap(jax.grad(loss(conv), (0, 1)))

    want = grads(jax.lax.conv_general_dilated)(x, w)
    for got in (jax.jit(grads(xla_cpu.onednn_conv_general_dilated))(x, w),
                jax.pmap(jax.grad(loss(xla_cpu.onednn_conv_general_dilated), (0, 1)),
                         devices=jax.devices()[:4])(x, w)):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_other_convolutions_go_to_xla():
    """bfloat16 and string padding are not oneDNN's here: the result is XLA's, bit for bit,
    without building anything."""
    x, w = jnp.ones((2, 8, 8, 4), jnp.bfloat16), jnp.ones((3, 3, 4, 4), jnp.bfloat16)
    for args in (((1, 1), [(1, 1), (1, 1)]), ((1, 1), "SAME")):
        got = xla_cpu.onednn_conv_general_dilated(x, w, *args,
                                                  dimension_numbers=xla_cpu.NHWC_HWIO)
        want = xla_cpu.conv_general_dilated(x, w, *args, dimension_numbers=xla_cpu.NHWC_HWIO)
        np.testing.assert_array_equal(got, want)


def test_the_default_is_xla_own_convolution():
    """Every committed number was computed with Eigen's convolution: the default keeps it."""
    config = cifar.get_config()
    assert config.cpu_convolution == "eigen"
    assert xla_cpu.convolution("cpu", False, config.cpu_convolution) \
        is xla_cpu.conv_general_dilated
    assert xla_cpu.convolution("cpu", False, "onednn") is xla_cpu.onednn_conv_general_dilated
    assert xla_cpu.convolution("gpu", False, "onednn") is jax.lax.conv_general_dilated


def test_without_a_compiler_it_says_why_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn, "state", {})
    monkeypatch.setenv("RESNET_JAX_CACHE", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CXX", "no-such-compiler")
    ok, why = onednn.available()
    assert not ok and why == "no C++ compiler (g++) to build the oneDNN convolution"
    with pytest.raises(ValueError, match=r"^cpu_convolution='onednn': no C\+\+ compiler .*; or "
                                         r"use cpu_convolution=eigen$"):
        xla_cpu.check_convolution("onednn")
    xla_cpu.check_convolution("eigen")  # the default needs nothing
    with pytest.raises(ValueError, match="cpu_convolution='mkl': use one of eigen, onednn"):
        xla_cpu.check_convolution("mkl")


def test_without_onednn_headers_it_says_why_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn, "state", {})
    monkeypatch.setenv("RESNET_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(onednn, "SOURCE", tmp_path / "conv.cc")
    (tmp_path / "conv.cc").write_text('#include "oneapi/dnnl/no_such_header.hpp"\n')
    ok, why = onednn.available()
    assert not ok and why.startswith("could not build the oneDNN convolution (is libdnnl-dev "
                                     "installed?): ") and "no_such_header" in why
    assert "\n" not in why


@needs_onednn
@pytest.mark.parametrize("scan", [False, True])
def test_a_net_with_onednn_convolutions_trains_as_with_xla(scan):
    """A ResNet-14's loss and gradients, blocks unrolled or under `lax.scan` (whose loops XLA
    CPU treats apart, xla_cpu.py): equal to float32 rounding of each convolution, amplified by
    batch norm over 4 images."""
    from flax import nnx

    from resnet_jax import models

    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    labels = jnp.arange(4) % 10

    def loss(model):
        logits, _ = models.forward(model, x, train=True)
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), labels])

    results = []
    for conv in xla_cpu.CPU_CONVOLUTIONS:
        net = models.cifar_resnet(14, scan_blocks=scan, rngs=nnx.Rngs(0),
                                  convolution=xla_cpu.convolution("cpu", scan, conv))
        graph, params, rest = nnx.split(net, nnx.Param, ...)
        step = jax.jit(jax.value_and_grad(lambda p, r: loss(nnx.merge(graph, p, r, copy=True))))
        # Fast to compile, as tests/test_models.py does; both sides compile the same way.
        results.append(step.lower(params, rest).compile(
            {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})(
                params, rest))
    (loss_eigen, grads_eigen), (loss_onednn, grads_onednn) = results
    np.testing.assert_allclose(loss_onednn, loss_eigen, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads_onednn), jax.tree.leaves(grads_eigen)):
        assert float(jnp.abs(got - want).max()) <= 1e-4 * float(jnp.abs(want).max())
