"""Facts about the networks: exact parameter counts, plain twins, shortcuts, BN groups, MACs;
identical blocks under scan computing what the unrolled loop computes."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resnet_jax import models, summary, xla_cpu
from resnet_jax.scan import BlockRun

# He et al. 2015: CIFAR nets with option A, 10 classes; ImageNet nets with option B, 1000 classes.
CIFAR_PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}
IMAGENET_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160,
                   152: 60_192_808}


def abstract(fn):
    return nnx.eval_shape(lambda: fn(rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("depth", CIFAR_PARAMS)
def test_cifar_counts_and_plain_twin(depth):
    res = abstract(lambda rngs: models.cifar_resnet(depth, rngs=rngs))
    plain = abstract(lambda rngs: models.cifar_resnet(depth, residual=False, rngs=rngs))
    assert models.count_params(res) == CIFAR_PARAMS[depth]
    assert models.count_params(plain) == CIFAR_PARAMS[depth]
    # The same layers in the same places: only the (parameter-free) shortcuts differ.
    shapes = lambda m: jax.tree.map(lambda x: x.shape, nnx.state(m, nnx.Param))  # noqa: E731
    assert shapes(res) == shapes(plain)


@pytest.mark.parametrize("depth", IMAGENET_PARAMS)
def test_imagenet_counts(depth):
    model = abstract(lambda rngs: models.imagenet_resnet(depth, shortcut="B", rngs=rngs))
    assert models.count_params(model) == IMAGENET_PARAMS[depth]


def test_shortcut_options_add_projections_where_the_paper_says():
    count = lambda s: models.count_params(  # noqa: E731
        abstract(lambda rngs: models.cifar_resnet(20, shortcut=s, rngs=rngs)))
    # B: 1x1 projections + BN at the two stage changes (16->32, 32->64).
    assert count("B") - count("A") == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    # C: a projection on all 9 blocks.
    per_block = [16 * 16 + 32] * 3 + [16 * 32 + 64] + [32 * 32 + 64] * 2 + [32 * 64 + 128] + \
        [64 * 64 + 128] * 2
    assert count("C") - count("A") == sum(per_block)


def test_option_a_shortcut_subsamples_and_zero_pads():
    sc = models.Shortcut(16, 32, 2, "A", preact=False, bn=models.BatchNormConfig(), dtype=jnp.float32,
                         rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    y = sc(x, train=True)
    assert y.shape == (2, 4, 4, 32)
    np.testing.assert_array_equal(y[..., :16], x[:, ::2, ::2, :])
    assert not np.any(y[..., 16:])
    assert nnx.state(sc, nnx.Param) == nnx.State({})


def test_plain_net_has_no_shortcut_path():
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    res = models.cifar_resnet(8, rngs=nnx.Rngs(0))
    plain = models.cifar_resnet(8, residual=False, rngs=nnx.Rngs(0))
    # Same initial weights, different function: the residual net adds its shortcuts.
    assert not np.allclose(models.forward(res, x, train=False)[0],
                           models.forward(plain, x, train=False)[0])


@pytest.mark.parametrize("preact", [False, True])
@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
def test_forward_shapes(preact, shortcut):
    model = models.cifar_resnet(8, shortcut=shortcut, preact=preact, num_classes=7,
                                in_channels=1, rngs=nnx.Rngs(0))
    assert models.forward(model, jnp.ones((2, 8, 8, 1)), train=True)[0].shape == (2, 7)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = models.cifar_resnet(8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype("float32")}
    out, _ = models.forward(model, jnp.ones((2, 32, 32, 3)), train=True)
    assert out.dtype == jnp.float32
    graphdef, state = nnx.split(model)
    hlo = jax.jit(lambda s, x: models.forward(nnx.merge(graphdef, s), x, train=False)[0]).lower(
        state, jnp.ones((1, 32, 32, 3))).as_text()
    # Each convolution's result type ends its line, e.g. `-> tensor<1x32x32x16xbf16>`.
    convs = [line for line in hlo.splitlines() if "stablehlo.convolution" in line]
    assert len(convs) == 7 and all(line.rstrip().endswith("xbf16>") for line in convs), convs


def test_grouped_batch_norm_uses_per_group_statistics():
    bn = models.BatchNorm(3, models.BatchNormConfig(group_size=4, momentum=0.0))
    x = jax.random.normal(jax.random.key(0), (8, 5, 5, 3))
    x = x.at[4:].multiply(3.0).at[4:].add(2.0)  # the second group has other statistics
    y = np.asarray(bn(x, train=True))
    for g in (y[:4], y[4:]):
        np.testing.assert_allclose(g.mean(axis=(0, 1, 2)), 0, atol=1e-5)
        np.testing.assert_allclose(g.var(axis=(0, 1, 2)), 1, atol=1e-3)
    # Running statistics (momentum 0 here) are the average of the two groups' statistics.
    groups = np.asarray(x).reshape(2, 4 * 5 * 5, 3)
    np.testing.assert_allclose(bn.mean[...], groups.mean(1).mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], groups.var(1).mean(0), rtol=1e-4)
    # Whole-batch statistics would not normalise each group.
    whole = models.BatchNorm(3, models.BatchNormConfig())
    assert abs(np.asarray(whole(x, train=True))[:4].mean()) > 0.1


def test_depth_rules_are_one_line_errors():
    with pytest.raises(ValueError, match="6n\\+2"):
        models.cifar_resnet(21, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Table 1"):
        models.imagenet_resnet(20, rngs=nnx.Rngs(0))


def test_summary_counts_layers_params_and_macs():
    model = models.cifar_resnet(20, rngs=nnx.Rngs(0))
    info = summary.describe(model, (32, 32, 3))
    assert info["weighted_layers"] == 20
    assert info["params"] == CIFAR_PARAMS[20]
    # Independent count: every 3x3 conv is H*W*9*Cin*Cout on its output map, plus the dense layer.
    convs = [(32, 3, 16)] + [(32, 16, 16)] * 6 + [(16, 16, 32)] + [(16, 32, 32)] * 5 + \
        [(8, 32, 64)] + [(8, 64, 64)] * 5
    assert info["macs"] == sum(h * h * 9 * ci * co for h, ci, co in convs) + 64 * 10


def test_bottleneck_cifar_nets_count_their_depth():
    """ResNet-164 of He et al. 2016: 18 bottlenecks per stage, 64/128/256 outputs."""
    model = models.cifar_resnet(164, bottleneck=True, preact=True, shortcut="B",
                                rngs=nnx.Rngs(0))
    info = summary.describe(model, (32, 32, 3))
    assert info["weighted_layers"] == 164
    assert model.head.in_features == 256
    with pytest.raises(ValueError, match="9n\\+2"):
        models.cifar_resnet(32, bottleneck=True, rngs=nnx.Rngs(0))


# --- Blocks under jax.lax.scan (scan_blocks=True): the same numbers, one compiled block per run.


def _train_and_eval(model, x, labels):
    """One compiled pass: gradients, logits, updated batch statistics and diagnostics in
    training mode; logits and diagnostics in evaluation mode. XLA's backend optimisations are
    off to keep the tests fast; both sides of each comparison compile the same way."""
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def run(params, stats):
        def loss_fn(params):
            m = nnx.merge(graphdef, params, stats, copy=True)
            logits, diagnostics = models.forward(m, x, train=True)
            loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
            return loss, (logits, nnx.state(m, nnx.BatchStat), diagnostics)

        grads, train_out = jax.grad(loss_fn, has_aux=True)(params)
        eval_out = models.forward(nnx.merge(graphdef, params, stats, copy=True), x, train=False)
        return grads, train_out, eval_out

    compiled = jax.jit(run).lower(params, stats).compile(
        {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
    return compiled(params, stats)


def _in_scanned_layout(unrolled: nnx.State, scanned_model) -> dict:
    """An unrolled net's state (or gradients) as the scanned net holds it: each run's blocks
    stacked under `blocks/i/block`."""
    tree = nnx.to_pure_dict(unrolled)
    if "blocks" not in tree:  # e.g. the batch statistics of a net without batch norm
        return tree
    blocks, first = {}, 0
    for i, entry in enumerate(scanned_model.blocks):
        if isinstance(entry, BlockRun):
            rows = [tree["blocks"][first + k] for k in range(entry.length)]
            blocks[i] = {"block": jax.tree.map(lambda *v: jnp.stack(v), *rows)}
            first += entry.length
        else:
            blocks[i], first = tree["blocks"][first], first + 1
    return tree | {"blocks": blocks}


@pytest.mark.parametrize("depth, kwargs", [
    (14, dict()),  # post-activation, option A; the first stage one run of 2 blocks
    (14, dict(preact=True, residual=False, bn=models.BatchNormConfig(group_size=2))),
    (29, dict(bottleneck=True, preact=True, shortcut="B")),  # 3 per stage, 2 of them a run
    (14, dict(norm="none", residual_init="fixup")),  # scalars stacked per run (issue 29)
    (14, dict(preact=True, norm="group", norm_groups=4, residual_init="skipinit")),
])
def test_scanned_blocks_compute_what_the_unrolled_loop_computes(depth, kwargs):
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    labels = jnp.arange(4) % 10
    # Each with the convolution training picks for it on this platform (xla_cpu.py).
    nets = {scan: models.cifar_resnet(depth, scan_blocks=scan, rngs=nnx.Rngs(0),
                                      convolution=xla_cpu.convolution(jax.default_backend(), scan),
                                      **kwargs)
            for scan in (False, True)}
    scanned_net = nets[True]
    assert any(isinstance(b, BlockRun) for b in scanned_net.blocks)
    # A scanned net starts from its unrolled twin's numbers, only stacked.
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(scanned_net)),
                 _in_scanned_layout(nnx.state(nets[False]), scanned_net))
    # The same layers and multiply-adds as `resnet-jax describe` counts them.
    described = [summary.describe(nets[scan], (16, 16, 3)) for scan in (False, True)]
    assert [{k: d[k] for k in ("weighted_layers", "params", "macs")} for d in described] == 2 * [
        {k: described[0][k] for k in ("weighted_layers", "params", "macs")}]
    assert len(described[1]["layers"]) == len(described[0]["layers"])
    unrolled, scanned = (_train_and_eval(nets[scan], x, labels) for scan in (False, True))
    (grads_u, (logits_u, stats_u, diag_u), (eval_u, eval_diag_u)) = unrolled
    (grads_s, (logits_s, stats_s, diag_s), (eval_s, eval_diag_s)) = scanned
    # The same values, bit for bit or within an ulp or two where XLA fuses the scan's body
    # differently from the unrolled blocks.
    same = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=0)
    same(logits_s, logits_u)
    same(eval_s, eval_u)
    # The same updated statistics, and the diagnostics per block and layer in the same order.
    jax.tree.map(same, nnx.to_pure_dict(stats_s), _in_scanned_layout(stats_u, scanned_net))
    for got, want in ((diag_s, diag_u), (eval_diag_s, eval_diag_u)):
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
        jax.tree.map(same, got, want)
    blocks = 3 * ((depth - 2) // (9 if kwargs.get("bottleneck") else 6))
    assert len(diag_u["branch_ratio"]) == (0 if kwargs.get("residual") is False else blocks)
    assert len(diag_u["response_std"]) == (0 if kwargs.get("preact") else depth - 1)
    # Gradients reach every block's own row; the scan's backward pass sums in another order,
    # so they agree to float32 rounding.
    want = _in_scanned_layout(grads_u, scanned_net)
    got = nnx.to_pure_dict(grads_s)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g_s, g_u in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g_s, g_u, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(g_u))))


def test_scanned_train_step_does_not_grow_with_depth():
    """The lowered train step (forward, backward, diagnostics) holds one copy of each distinct
    block under scan_blocks=True: as many convolutions at 32 layers as at 20."""
    from resnet_jax.step import (create_lr_schedule, create_optimizer, create_train_state,
                                 make_train_step)
    from resnet_jax.configs import cifar

    config = cifar.get_config()
    schedule = create_lr_schedule(config)
    tx = create_optimizer(config)
    batch = {"image": jnp.zeros((2, 16, 16, 3)), "label": jnp.zeros((2,), jnp.int32)}

    def convolutions(depth, scan):
        model = models.cifar_resnet(depth, scan_blocks=scan, rngs=nnx.Rngs(0),
                                    convolution=xla_cpu.convolution("cpu", scan))
        graphdef, state = create_train_state(model, tx, schedule)
        step = make_train_step(graphdef, tx, schedule, stage_of_block=model.stage_of_block)
        text = jax.jit(step).lower(state, batch).as_text()
        return re.findall(r"dim_numbers = (\[[^]]*\]x\[[^]]*\]->\[[^]]*\])", text)

    scanned = convolutions(20, scan=True)
    assert len(convolutions(32, scan=True)) == len(scanned)
    assert len(convolutions(32, scan=False)) > len(convolutions(20, scan=False)) > len(scanned)
    # Gradients too are NHWC x HWIO convolutions, the only form XLA CPU runs fast inside a loop.
    assert set(scanned) == {"[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"}


@pytest.mark.parametrize("k, stride, size", [(3, 2, 8), (1, 2, 8), (7, 2, 11)])
def test_canonical_gradient_convolutions_equal_jaxs(k, stride, size):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    w = jax.random.normal(jax.random.key(1), (k, k, 3, 5))
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, xla_cpu.NHWC_HWIO)

    def loss(conv_fn):
        return lambda x, w: jnp.sum(jnp.sin(conv_fn(x, w, (stride, stride), [(k // 2, k // 2)] * 2,
                                                    dimension_numbers=dn)))

    want = jax.jit(jax.grad(loss(jax.lax.conv_general_dilated), (0, 1)))(x, w)
    got = jax.jit(jax.grad(loss(xla_cpu.conv_general_dilated), (0, 1)))(x, w)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def _reference_preact_block(block, x, changes):
    """He et al. 2016's pre-activation block written out in jax.numpy / lax, from the block's
    kernels (initial BN: scale 1, bias 0, batch statistics). Where the shape changes (and on
    every projection) BN-ReLU comes before the split and the shortcut takes its output, as in
    the paper's reference code (resnet-1k-layers); elsewhere the identity takes the raw input."""
    def bn_relu(v):
        mean, var = v.mean((0, 1, 2)), v.var((0, 1, 2))
        return jnp.maximum((v - mean) * jax.lax.rsqrt(var + 1e-5), 0.0)

    def conv(v, c):
        w = c.kernel[...]
        pad = w.shape[0] // 2
        stride = c.strides if isinstance(c.strides, tuple) else (c.strides,) * 2
        return jax.lax.conv_general_dilated(v, w, stride, [(pad, pad)] * 2,
                                            dimension_numbers=xla_cpu.NHWC_HWIO)

    pre = bn_relu(x)
    y = conv(pre, block.convs[0])
    for c in block.convs[1:]:
        y = conv(bn_relu(y), c)
    if block.shortcut.project:
        return y + conv(pre, block.shortcut.conv)
    s = block.shortcut.stride
    source = pre if changes else x
    source = source[:, ::s, ::s, :]
    return y + jnp.pad(source, ((0, 0), (0, 0), (0, 0), (0, y.shape[-1] - source.shape[-1])))


@pytest.mark.parametrize("shortcut, cin, cout, stride, bottleneck", [
    ("A", 4, 8, 2, False),  # a stage's first block: subsample and zero-pad
    ("A", 4, 16, 1, True),  # ResNet-164's first block with option A: channels only
    ("A", 8, 8, 1, False),  # identity: the raw input
    ("B", 4, 8, 2, False),
    ("C", 8, 8, 1, False),
])
def test_preact_shortcut_takes_the_preactivated_input_where_the_shape_changes(
        shortcut, cin, cout, stride, bottleneck):
    block = models.Block(cin, cout, stride, bottleneck=bottleneck, residual=True,
                         shortcut=shortcut, preact=True, bn=models.BatchNormConfig(),
                         dtype=jnp.float32, rngs=nnx.Rngs(0))
    # Far from zero mean and unit variance, so that BN-ReLU changes the input a lot.
    x = 3.0 * jax.random.normal(jax.random.key(0), (4, 8, 8, cin)) + 1.0
    want = _reference_preact_block(block, x, changes=stride != 1 or cin != cout)
    got, _ = nnx.capture(block, nnx.Intermediate)(x, train=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_precise_batch_stats_average_the_batch_statistics_without_momentum(scan):
    """Stale running statistics (here nonsense) replaced by the plain average of the batch
    statistics in training mode: over one batch, evaluation mode then computes exactly what
    training mode computes on it; over two, the stem's are the mean of the two batches'."""
    model = models.cifar_resnet(14, scan_blocks=scan, rngs=nnx.Rngs(0))
    stale = jax.tree.map(lambda v: jnp.full_like(v, 1e3), nnx.state(model, nnx.BatchStat))
    nnx.update(model, stale)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8, 3))
    models.precise_batch_stats(model, [x[0]])
    train_logits, _ = models.forward(nnx.clone(model), x[0], train=True)
    eval_logits, _ = models.forward(model, x[0], train=False)
    np.testing.assert_allclose(eval_logits, train_logits, rtol=1e-4, atol=1e-4)
    models.precise_batch_stats(model, list(x))
    stem = [model.stem(b) for b in x]
    np.testing.assert_allclose(model.stem_bn.mean[...],
                               np.mean([s.mean((0, 1, 2)) for s in stem], 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.stem_bn.var[...],
                               np.mean([s.var((0, 1, 2)) for s in stem], 0), rtol=1e-4)
    # The model's own momentum is kept for training.
    assert model.stem_bn.config.momentum == 0.9
