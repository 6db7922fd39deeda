"""Facts about the networks: exact parameter counts, plain twins, shortcuts, BN groups, MACs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resnet_jax import models, summary

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
    jaxpr = jax.make_jaxpr(
        lambda s, x: models.forward(nnx.merge(graphdef, s), x, train=False)[0])(
        state, jnp.ones((1, 32, 32, 3)))
    convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert convs and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in convs)


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
