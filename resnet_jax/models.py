"""ResNets of He et al. 2015 and their plain twins, as pure Flax NNX modules.

One family expresses every variant:
- `residual=False` gives the plain twin: the same layers, no shortcuts (He et al. 2015, Sec. 4.1).
- `shortcut` 'A' | 'B' | 'C' are the paper's three options (Sec. 3.3 and Table 3).
- `preact=True` uses the pre-activation block of He et al. 2016 (BN-ReLU before each conv).
- The CIFAR stem (Sec. 4.2: 3x3 conv, 16/32/64 filters on 32/16/8 maps, depth 6n+2) and the
  ImageNet stem (7x7/2 conv and 3x3/2 max pool, Table 1) share the same blocks and stages.

Models hold no mesh, device or process logic. Batch norm is told from outside (`BatchNormConfig`)
which examples share statistics: the training side sets the axis name or the group size.
Call a model as `model(images, train=True|False)`, or `forward(model, images, train=...)` for
the logits and the depth diagnostics (Fig. 7 responses, branch ratios); NHWC images, float32
logits.

`dtype` is the compute dtype of the convolutions and the activations between them (bfloat16 for
speed on accelerators). Whatever it is, parameters and batch-norm statistics are float32, batch
norm computes in float32, and the pooled features, the classifier and the logits are float32,
so the loss, the gradients and the optimiser state are too (tests/test_bf16.py).

Beyond the papers, for ablations around depth (docs/training.md): `norm` is the normalisation,
'batch' (the paper's), 'group' (GroupNorm, Wu & He 2018, `norm_groups` groups) or 'none'; and
`residual_init` how each residual branch starts: 'standard' (the paper's), 'zero_gamma' (the
branch's last normalisation scale at 0, Goyal et al. 2017), 'fixup' (Zhang, Dauphin & Ma 2019,
for norm='none') or 'skipinit' (a learnable scalar on the branch, at 0: De & Smith 2020). Each of
the last three makes every residual branch output exactly 0 at initialisation.

Two choices serve speed, not the paper, and live in their own modules: `scan_blocks=True` runs
each stretch of identical blocks under one `jax.lax.scan` (scan.py: the same numbers, compile
time flat in depth), and `convolution` is the convolution every conv layer calls, which the
training side picks for its platform (xla_cpu.py: the same numbers, faster gradients on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_jax.scan import group_runs

# He et al. 2015 initialise conv weights as N(0, 2/n), n = k*k*out_channels (Sec. 3.4, [13]).
# Jitted once per kernel shape: eager construction then costs one cached call per layer, where a
# traced construction (nnx.eval_shape / jit) grows quadratically with depth in Flax 0.12.
he_normal = jax.jit(jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                    static_argnums=(1, 2))

SHORTCUTS = ("A", "B", "C")
BLOCKS = {"post": False, "pre": True}  # config.block -> pre-activation (He et al. 2016)?
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.dtype: the compute dtype
NORMS = ("batch", "group", "none")
RESIDUAL_INITS = ("standard", "zero_gamma", "fixup", "skipinit")
IMAGENET_STAGES = {  # depth -> (blocks per stage, bottleneck), Table 1
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}


@dataclasses.dataclass(frozen=True)
class BatchNormConfig:
    """Which examples share batch-norm statistics in training, and the usual constants.

    group_size: statistics over groups of this many consecutive examples of the array the module
      sees (None: all of them). The paper trained on 2 GPUs with 64 images each: group_size=64.
    axis_name / axis_index_groups: for a `pmap` backend, the mapped axis (and device groups) over
      which the statistics are averaged when a group spans devices. Running averages are the mean
      over this module's groups; a `pmap` backend averages them over replicas after the step.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    group_size: int | None = None
    axis_name: str | None = None
    axis_index_groups: Any = None


class BatchNorm(nnx.Module):
    """Batch norm with statistics per group of examples; computed in float32 whatever the dtype."""

    def __init__(self, features: int, config: BatchNormConfig):
        self.config = config
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        cfg = self.config
        if not train:
            x32 = x.astype(jnp.float32)
            y = (x32 - self.mean[...]) * jax.lax.rsqrt(self.var[...] + cfg.epsilon)
            return (y * self.scale[...] + self.bias[...]).astype(x.dtype)
        normalize = functools.partial(_normalize, config=cfg)
        if x.dtype != jnp.float32:
            # Autodiff would keep float32 activations ((x - mean), and x for E[x^2]) for the
            # backward pass, the bulk of what a bfloat16 net keeps: 0.76x the bytes of float32's
            # (ResNet-20). Recomputed from x instead: 0.41x (benchmarks/RESULTS.md). float32
            # nets keep them, as before.
            normalize = jax.checkpoint(normalize)
        y, mean, var = normalize(x, self.scale[...], self.bias[...])
        m = cfg.momentum
        # set_value, not `[...] =`: Flax's indexed assignment reads the new value's `sharding`,
        # which on a JAX tracer builds an error message by walking the whole program traced so
        # far, making an unrolled net's tracing quadratic in depth (minutes at 1202 layers).
        self.mean.set_value(m * self.mean[...] + (1 - m) * mean.mean(0))
        self.var.set_value(m * self.var[...] + (1 - m) * var.mean(0))
        return y


def _normalize(x, scale, bias, *, config: BatchNormConfig):
    """Batch norm in training, in float32: (y in x's dtype, mean and variance per group)."""
    x32 = x.astype(jnp.float32)
    group = config.group_size or x.shape[0]
    if x.shape[0] % group:
        raise ValueError(f"batch of {x.shape[0]} does not split into BN groups of {group}")
    xg = x32.reshape(x.shape[0] // group, group, *x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))
    # One pass (E[x], E[x^2]) so that one all-reduce serves both moments across devices.
    mean, mean_sq = jnp.mean(xg, axes), jnp.mean(jnp.square(xg), axes)
    if config.axis_name is not None:
        mean, mean_sq = jax.lax.pmean(
            (mean, mean_sq), config.axis_name, axis_index_groups=config.axis_index_groups
        )
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
    shape = (mean.shape[0],) + (1,) * (len(axes)) + (mean.shape[-1],)
    # (x - mean) * a + bias with a = scale / std per channel: autodiff then keeps one
    # activation-sized array (x - mean) for the backward pass instead of two, a pass less
    # over memory (ResNet-20 train step on CPU: 171 -> 200 images/s). Subtracting first
    # keeps grouped BN within 1e-5 across backends, where x * a + (bias - mean * a) did not.
    a = scale * jax.lax.rsqrt(var + config.epsilon)
    y = ((xg - mean.reshape(shape)) * a.reshape(shape)).reshape(x.shape) + bias
    return y.astype(x.dtype), mean, var


class GroupNorm(nnx.Module):
    """Group norm (Wu & He 2018): each example normalised over its positions and the channels of
    each of `groups` groups, then a per-channel scale and bias; no batch statistics, so training
    and evaluation compute the same. In float32 whatever the dtype, as BatchNorm."""

    def __init__(self, features: int, groups: int, epsilon: float = 1e-5):
        if groups < 1 or features % groups:
            raise ValueError(f"norm_groups={groups} does not divide a layer's {features} "
                             f"channels: use a divisor of {features}, e.g. "
                             f"{math.gcd(max(groups, 1), features)}")
        self.groups, self.epsilon = groups, epsilon
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        del train
        g = self.groups
        xg = x.astype(jnp.float32).reshape(*x.shape[:-1], g, x.shape[-1] // g)
        axes = (*range(1, xg.ndim - 2), xg.ndim - 1)  # positions and the group's channels
        mean = jnp.mean(xg, axes, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axes, keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class NoNorm(nnx.Module):
    """norm='none': where a normalisation layer would be, nothing."""

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        del train
        return x


def norm_layer(features: int, bn: BatchNormConfig, norm: str = "batch",
               norm_groups: int = 32) -> nnx.Module:
    """The normalisation layer `norm` names, over `features` channels."""
    if norm == "group":
        return GroupNorm(features, norm_groups)
    return NoNorm() if norm == "none" else BatchNorm(features, bn)


def conv(cin: int, cout: int, k: int, stride: int, dtype, rngs: nnx.Rngs, *,
         convolution: Callable = jax.lax.conv_general_dilated) -> nnx.Conv:
    # Symmetric padding k//2, as in the paper's Torch/Caffe code (XLA's 'SAME' pads unevenly).
    return nnx.Conv(
        cin, cout, (k, k), strides=stride, padding=[(k // 2, k // 2)] * 2, use_bias=False,
        kernel_init=he_normal, dtype=dtype, rngs=rngs, conv_general_dilated=convolution,
    )


class Shortcut(nnx.Module):
    """The paper's shortcut options (Sec. 3.3): what is added to the residual branch's output.

    A: identity; where the shape changes, subsample and zero-pad the new channels (no parameters;
       the paper's CIFAR choice, Sec. 4.2). B: a 1x1 projection (+ BN) only where the shape changes.
    C: a projection on every block. Pre-activation blocks project without BN (He et al. 2016).
    """

    def __init__(self, cin, cout, stride, option, *, preact, bn, dtype, rngs,
                 convolution=jax.lax.conv_general_dilated, norm="batch", norm_groups=32):
        self.cin, self.cout, self.stride = cin, cout, stride
        self.changes_shape = stride != 1 or cin != cout
        self.project = option == "C" or (option == "B" and self.changes_shape)
        if self.project:
            self.conv = conv(cin, cout, 1, stride, dtype, rngs, convolution=convolution)
            self.bn = None if preact else norm_layer(cout, bn, norm, norm_groups)

    def __call__(self, x, *, train):
        if self.project:
            y = self.conv(x)
            return y if self.bn is None else self.bn(y, train=train)
        if self.stride != 1:
            x = x[:, :: self.stride, :: self.stride, :]
        if self.cout != self.cin:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.cout - self.cin)))
        return x


class Block(nnx.Module):
    """A residual block (or its plain twin): basic (two 3x3) or bottleneck (1x1, 3x3, 1x1).

    Post-activation (He et al. 2015): conv-BN-ReLU ... conv-BN, add shortcut, ReLU.
    Pre-activation (He et al. 2016): BN-ReLU-conv ... BN-ReLU-conv, add shortcut.
    The stride sits on the 3x3 conv in bottlenecks (as in most reimplementations; same counts).

    `residual_init` (module docstring): 'zero_gamma' zeroes the scale of the branch's last
    normalisation; 'skipinit' multiplies the branch by `branch_gain`, a scalar starting at 0;
    'fixup' (post-activation, norm='none') scales the branch's layers but the last by
    branches^(-1/(2m-2)) (`branches`: the net's residual branches, m: the branch's layers), zeroes
    the last, and adds `fixup_bias` (a scalar before each conv, after each conv but the last and
    after the multiplier `fixup_scale`), as in Zhang et al.'s Fixup block.
    """

    def __init__(self, cin, cout, stride, *, bottleneck, residual, shortcut, preact, bn, dtype,
                 rngs, convolution=jax.lax.conv_general_dilated, norm="batch", norm_groups=32,
                 residual_init="standard", branches=1):
        self.preact = preact
        if bottleneck:
            mid = cout // 4
            specs = [(cin, mid, 1, 1), (mid, mid, 3, stride), (mid, cout, 1, 1)]
        else:
            specs = [(cin, cout, 3, stride), (cout, cout, 3, 1)]
        self.kernel_sizes = tuple(k for _, _, k, _ in specs)
        self.convs = nnx.List([conv(i, o, k, s, dtype, rngs, convolution=convolution)
                               for i, o, k, s in specs])
        # Post-activation normalises each conv's output; pre-activation each conv's input.
        bn_features = [i for i, *_ in specs] if preact else [o for _, o, *_ in specs]
        self.bns = nnx.List([norm_layer(f, bn, norm, norm_groups) for f in bn_features])
        self.shortcut = (
            Shortcut(cin, cout, stride, shortcut, preact=preact, bn=bn, dtype=dtype, rngs=rngs,
                     convolution=convolution, norm=norm, norm_groups=norm_groups)
            if residual else None
        )
        gain = bias = scale = None  # parameters only where the init adds them
        if residual_init == "zero_gamma":  # Goyal et al. 2017, Sec. 5.1
            self.bns[-1].scale.set_value(jnp.zeros_like(self.bns[-1].scale[...]))
        elif residual_init == "skipinit":  # De & Smith 2020
            gain = nnx.Param(jnp.zeros((), jnp.float32))
        elif residual_init == "fixup":  # Zhang et al. 2019, Sec. 3 (rules 1-3)
            m = len(self.convs)
            factor = branches ** (-1.0 / (2 * m - 2))
            for c in self.convs[:-1]:
                c.kernel.set_value(c.kernel[...] * factor)
            self.convs[-1].kernel.set_value(jnp.zeros_like(self.convs[-1].kernel[...]))
            bias = nnx.Param(jnp.zeros((2 * m,), jnp.float32))
            scale = nnx.Param(jnp.ones((), jnp.float32))
        self.branch_gain, self.fixup_bias, self.fixup_scale = gain, bias, scale

    def __call__(self, x, *, train):
        if self.preact:
            y, pre = x, None
            for i, (c, bn) in enumerate(zip(self.convs, self.bns)):
                y = nnx.relu(bn(y, train=train))
                pre = y if i == 0 else pre
                y = c(y)
            if self.shortcut is None:
                return y
            if self.branch_gain is not None:
                y = y * self.branch_gain[...].astype(y.dtype)
            # Where the shortcut projects or the shape changes (a stage's first block), BN-ReLU
            # comes before the split and the shortcut too takes the pre-activated input; a pure
            # identity takes the raw input (He et al. 2016 and its code, resnet-1k-layers).
            shortcut = self.shortcut(
                pre if self.shortcut.project or self.shortcut.changes_shape else x, train=train)
            sow_branch_ratio(self, y, shortcut)
            return y + shortcut
        y = x
        last = len(self.convs) - 1
        bias = None if self.fixup_bias is None else self.fixup_bias[...].astype(x.dtype)
        for i, (c, bn) in enumerate(zip(self.convs, self.bns)):
            y = bn(c(y if bias is None else y + bias[2 * i]), train=train)
            if self.kernel_sizes[i] == 3:
                sow_response(self, y)
            if i < last:
                y = nnx.relu(y if bias is None else y + bias[2 * i + 1])
        if bias is not None:
            y = y * self.fixup_scale[...].astype(y.dtype) + bias[-1]
        if self.branch_gain is not None:
            y = y * self.branch_gain[...].astype(y.dtype)
        if self.shortcut is not None:
            # Fixup's shortcut takes the biased input where it is not an identity (its code).
            moves = self.shortcut.project or self.shortcut.changes_shape
            shortcut = self.shortcut(x + bias[0] if bias is not None and moves else x,
                                     train=train)
            sow_branch_ratio(self, y, shortcut)
            y = y + shortcut
        return nnx.relu(y)


class ResNet(nnx.Module):
    """Stem, stages of blocks, global average pooling, a dense layer to the classes.

    `scan_blocks`: each stretch of identical blocks as one `scan.BlockRun`. `convolution`: what
    every conv layer calls, `jax.lax.conv_general_dilated` or a drop-in (xla_cpu.py). `norm`,
    `norm_groups`, `residual_init`: the module docstring; with 'fixup' the net adds a scalar
    bias after the stem and one before the classifier, which starts at 0 (`fixup_bias`).
    """

    def __init__(self, *, stem: str, stage_sizes, stage_widths, bottleneck: bool,
                 num_classes: int, in_channels: int = 3, residual: bool = True,
                 shortcut: str = "A", preact: bool = False, dtype=jnp.float32,
                 bn: BatchNormConfig = BatchNormConfig(), scan_blocks: bool = False,
                 convolution: Callable = jax.lax.conv_general_dilated, norm: str = "batch",
                 norm_groups: int = 32, residual_init: str = "standard", rngs: nnx.Rngs):
        _check_shortcut(shortcut)
        check_ablation(norm=norm, norm_groups=norm_groups, residual_init=residual_init,
                       residual=residual, preact=preact)
        make_norm = functools.partial(norm_layer, bn=bn, norm=norm, norm_groups=norm_groups)
        self.stem_kind, self.preact, self.dtype = stem, preact, dtype
        stem_width = stage_widths[0]
        k, s = (3, 1) if stem == "cifar" else (7, 2)
        self.stem = conv(in_channels, stem_width, k, s, dtype, rngs, convolution=convolution)
        # Post-activation nets normalise the stem; pre-activation nets normalise before the head.
        self.stem_bn = None if preact else make_norm(stem_width)
        entries, stages, cin = [], [], stem_width
        for i, (n, width) in enumerate(zip(stage_sizes, stage_widths)):
            cout = width * 4 if bottleneck else width
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(Block(cin, cout, stride, bottleneck=bottleneck, residual=residual,
                                    shortcut=shortcut, preact=preact, bn=bn, dtype=dtype,
                                    rngs=rngs, convolution=convolution, norm=norm,
                                    norm_groups=norm_groups, residual_init=residual_init,
                                    branches=sum(stage_sizes)))
                cin = cout
            blocks = group_runs(blocks) if scan_blocks else blocks
            entries += blocks
            stages += [i] * len(blocks)
        # One entry per block, or with scan_blocks per block or run of identical blocks (BlockRun).
        self.blocks = nnx.List(entries)
        self.stage_of_block = tuple(stages)  # the stage of each entry of `blocks`
        self.head_bn = make_norm(cin) if preact else None
        self.head = nnx.Linear(cin, num_classes, dtype=jnp.float32, rngs=rngs)
        bias = None
        if residual_init == "fixup":  # the classifier starts at 0 (Zhang et al. 2019, rule 1)
            for p in (self.head.kernel, self.head.bias):
                p.set_value(jnp.zeros_like(p[...]))
            bias = nnx.Param(jnp.zeros((2,), jnp.float32))
        self.fixup_bias = bias

    def __call__(self, x, *, train: bool):
        if not jnp.issubdtype(x.dtype, jnp.floating):  # raw pixels would run, and mean nothing
            raise TypeError(f"the net takes float images, normalised as in training, not "
                            f"{x.dtype}: pass preprocessing(images) (resnet_jax.load(workdir)"
                            ".preprocessing), or use .predict(images)")
        x = self.stem(x.astype(self.dtype))
        if self.stem_bn is not None:
            x = self.stem_bn(x, train=train)
            if self.stem_kind == "cifar":
                sow_response(self, x)
            if self.fixup_bias is not None:
                x = x + self.fixup_bias[0].astype(x.dtype)
            x = nnx.relu(x)
        if self.stem_kind == "imagenet":
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for block in self.blocks:
            x = block(x, train=train)
        if self.head_bn is not None:
            x = nnx.relu(self.head_bn(x, train=train))
        # Pooling and the classifier in float32: in bfloat16 the logits would carry 3
        # significant digits into the loss, and the classifier's bias gradient would be summed
        # over the batch in bfloat16.
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return self.head(pooled if self.fixup_bias is None else pooled + self.fixup_bias[1])


def cifar_resnet(depth: int, *, width: int = 1, base_width: int = 16, bottleneck: bool = False,
                 num_classes: int = 10, **kwargs) -> ResNet:
    """The CIFAR family of Sec. 4.2: depth 6n+2, n basic blocks per stage of 16/32/64 filters
    (`base_width` x 1/2/4, times the multiplier `width`; narrower nets for CPU-scale sweeps).
    `bottleneck=True`: depth 9n+2, n bottlenecks per stage with 64/128/256 outputs, as in the
    164- and 1001-layer nets of He et al. 2016."""
    check_cifar(depth, width=width, base_width=base_width, bottleneck=bottleneck)
    n, w = (depth - 2) // (9 if bottleneck else 6), base_width * width
    return ResNet(stem="cifar", stage_sizes=(n, n, n), stage_widths=(w, 2 * w, 4 * w),
                  bottleneck=bottleneck, num_classes=num_classes, **kwargs)


def check_cifar(depth: int, *, width: int = 1, base_width: int = 16,
                bottleneck: bool = False) -> None:
    _check_positive(width=width, base_width=base_width)
    if bottleneck and (depth < 11 or (depth - 2) % 9):
        raise ValueError(f"bottleneck depth {depth} is not 9n+2: use 164, 1001 or another "
                         "9n+2 >= 11 (He et al. 2016)")
    if not bottleneck and (depth < 8 or (depth - 2) % 6):
        raise ValueError(
            f"depth {depth} is not 6n+2: use 20, 32, 44, 56, 110, 1202 or another 6n+2 >= 8")


def imagenet_resnet(depth: int, *, width: int = 1, num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-18/34 (basic blocks) and 50/101/152 (bottlenecks), Table 1."""
    check_imagenet(depth, width=width)
    sizes, bottleneck = IMAGENET_STAGES[depth]
    widths = tuple(w * width for w in (64, 128, 256, 512))
    return ResNet(stem="imagenet", stage_sizes=sizes, stage_widths=widths,
                  bottleneck=bottleneck, num_classes=num_classes, **kwargs)


def check_imagenet(depth: int, *, width: int = 1) -> None:
    _check_positive(width=width)
    if depth not in IMAGENET_STAGES:
        raise ValueError(f"ImageNet depth {depth} is not in Table 1: use one of "
                         + ", ".join(map(str, IMAGENET_STAGES)))


def _check_positive(**widths: int) -> None:
    for key, value in widths.items():
        if value < 1:
            raise ValueError(f"{key}={value} must be a positive integer, e.g. {key}=1")


def _check_shortcut(shortcut: str) -> None:
    if shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {shortcut!r}: use one of {', '.join(SHORTCUTS)}")


def check_ablation(*, norm: str = "batch", norm_groups: int = 32,
                   residual_init: str = "standard", residual: bool = True, preact: bool = False,
                   narrowest: int | None = None) -> None:
    """Raises ValueError (one line: the key, its choices or the fix) for a normalisation or
    residual-branch initialisation the nets lack or that contradicts the rest of the net.
    `narrowest`: the fewest channels of any layer (`Family.narrowest`), which the group count
    must divide (every other layer's count is a multiple of it)."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: use one of {', '.join(NORMS)}")
    if residual_init not in RESIDUAL_INITS:
        raise ValueError(f"unknown residual_init {residual_init!r}: use one of "
                         f"{', '.join(RESIDUAL_INITS)}")
    if norm == "group" and (norm_groups < 1 or (narrowest and narrowest % norm_groups)):
        fix = f"a divisor of {narrowest}, e.g. {math.gcd(max(norm_groups, 1), narrowest)}" \
            if narrowest else "a positive count"
        raise ValueError(f"norm_groups={norm_groups} does not divide the {narrowest} channels "
                         f"of the net's narrowest layers: use {fix}")
    if residual_init != "standard" and not residual:
        raise ValueError(f"residual_init={residual_init} acts on residual branches, and a plain "
                         "net (residual=false) has none: use residual_init=standard")
    if residual_init == "zero_gamma" and norm == "none":
        raise ValueError("residual_init=zero_gamma zeroes the last normalisation scale of each "
                         "branch, and norm=none has none: use norm=batch or group, or "
                         "residual_init=skipinit or fixup")
    if residual_init == "fixup" and norm != "none":
        raise ValueError(f"residual_init=fixup replaces normalisation (Zhang et al. 2019), "
                         f"but norm={norm}: use norm=none, or residual_init=zero_gamma")
    if residual_init == "fixup" and preact:
        raise ValueError("residual_init=fixup is defined for post-activation blocks (Zhang et "
                         "al. 2019): use block=post")


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family, as a config names it (`config.model`): its constructor `build(depth,
    width=..., **options, ...)` and the check of those arguments, the config keys it takes
    beyond depth and width (`options`), and the input the paper feeds it."""

    build: Callable[..., ResNet]
    check: Callable[..., None]
    options: tuple[str, ...]
    image_size: int
    num_classes: int
    # narrowest(width=..., **options): the fewest channels of any layer, a divisor of every
    # other layer's (what a GroupNorm group count must divide).
    narrowest: Callable[..., int]


# A new family: its constructor and check above, one entry here, and a config file in configs/.
FAMILIES = {
    "cifar": Family(cifar_resnet, check_cifar, ("base_width", "bottleneck"), 32, 10,
                    lambda width=1, base_width=16, bottleneck=False: base_width * width),
    "imagenet": Family(imagenet_resnet, check_imagenet, (), 224, 1000,
                       lambda width=1: 64 * width),
}


def check_architecture(family: str, depth: int, *, width: int = 1, shortcut: str = "A",
                       ablation: dict | None = None, **options) -> None:
    """Raises ValueError (one line: problem and fix) for a family, depth, width, shortcut or
    family option the nets lack, or an `ablation` (`check_ablation`'s arguments but
    `narrowest`) they refuse: what the constructors check, before building anything."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model {family!r}: use {' or '.join(FAMILIES)} (pick its "
                         "config file in resnet_jax/configs/, e.g. cifar.py)")
    _check_shortcut(shortcut)
    FAMILIES[family].check(depth, width=width, **options)
    check_ablation(**(ablation or {}),
                   narrowest=FAMILIES[family].narrowest(width=width, **options))


# --- Measuring the nets: layer responses (Fig. 7) and branch ratios, sown in the forward pass.


def sow_response(module: nnx.Module, y: jax.Array) -> None:
    """Records the std of a 3x3 layer's response (after BN, before the nonlinearity or the
    addition): He et al. 2015, Fig. 7. Read through `forward`; when nobody reads it, XLA drops
    the reduction."""
    module.sow(nnx.Intermediate, "response_std", jnp.std(y.astype(jnp.float32)))


def sow_branch_ratio(module: nnx.Module, branch: jax.Array, shortcut: jax.Array) -> None:
    """Records ||F(x)|| / ||shortcut(x)||: how much a residual block changes its input."""
    norm = lambda a: jnp.sqrt(jnp.sum(jnp.square(a.astype(jnp.float32))))  # noqa: E731
    module.sow(nnx.Intermediate, "branch_ratio", norm(branch) / (norm(shortcut) + 1e-12))


def sown_diagnostics(sown: nnx.State) -> dict[str, jax.Array]:
    """The sown values of one forward pass as vectors in layer order: `response_std` per 3x3
    layer and `branch_ratio` per residual block (a BlockRun sows one value per block)."""
    blocks = sown.get("blocks", {})
    order = sorted(blocks, key=int)

    def vector(name, *first):
        values = [*first, *(v for i in order for v in blocks[i].get(name, ()))]
        return jnp.concatenate([jnp.ravel(v) for v in values]) if values else jnp.zeros((0,))

    return {"response_std": vector("response_std", *sown.get("response_std", ())),
            "branch_ratio": vector("branch_ratio")}


def forward(model: nnx.Module, x: jax.Array, *, train: bool):
    """(logits, diagnostics) of one pass; the diagnostics cost nothing unless they are used."""
    logits, sown = nnx.capture(model, nnx.Intermediate)(x, train=train)
    return logits, sown_diagnostics(sown)


def layer_response_stds(model: "ResNet", images: jax.Array) -> list[float]:
    """Std of every 3x3 layer's response on `images` (eval mode), in layer order."""
    return [float(v) for v in forward(model, images, train=False)[1]["response_std"]]


def precise_batch_stats(model: nnx.Module, batches) -> None:
    """Sets every batch-norm layer's running statistics to the plain average of its batch
    statistics over `batches` (image arrays, the net in training mode, each batch weighted
    equally): "precise BN". Running averages with momentum weight the last training steps,
    taken with weights that then moved on; in a net that did not train they can be far from
    what its layers see (eval-mode responses of 1e8 in a plain-110 on digits). Each batch
    should be as large as a training batch-norm group."""
    probe = nnx.clone(model)
    for _, m in nnx.iter_modules(probe):
        if isinstance(m, BatchNorm):  # momentum 0: the running statistics become the batch's
            m.config = dataclasses.replace(m.config, momentum=0.0)
    graphdef, params, stats, rest = nnx.split(probe, nnx.Param, nnx.BatchStat, ...)

    @jax.jit
    def batch_stats(x):
        m = nnx.merge(graphdef, params, stats, rest, copy=True)
        forward(m, x, train=True)
        return nnx.state(m, nnx.BatchStat)

    totals = [batch_stats(x) for x in batches]
    nnx.update(model, jax.tree.map(lambda *v: sum(v) / len(v), *totals))


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (BN scale and bias included, running statistics not)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
