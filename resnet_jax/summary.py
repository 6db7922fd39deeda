"""What a network is: its layers, trainable parameters and multiply-adds per image.

Multiply-adds are counted from the traced program itself (every convolution and matrix product
of a forward pass on one image), so they cannot drift from the model code. Nets are built for
their shapes only (`nnx.eval_shape`): no initial value is computed or compiled, so a look at
ResNet-152 costs a trace, not seconds of initialisers.
"""

from __future__ import annotations

import functools
from typing import Iterable, Iterator

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet_jax import models
from resnet_jax.configs import net_name
from resnet_jax.scan import BlockRun


def count_macs(fn, *args) -> int:
    """Multiply-adds of the convolutions and matrix products in `fn(*args)`."""
    return jaxpr_macs(jax.make_jaxpr(fn)(*args).jaxpr)


def jaxpr_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            out = eqn.outvars[0].aval.shape
            kernel = eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, spatial dims...)
            per_output = np.prod([kernel[d] for d in rhs_spec[1:]])
            # A gradient through a strided conv dilates its input with zeros (lhs_dilation):
            # count the products with real inputs, about 1 / prod(dilation) of the dense ones.
            holes = np.prod(eqn.params["lhs_dilation"] or (1,))
            total += int(np.prod(out)) * int(per_output) // int(holes)
        elif name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += int(np.prod(eqn.outvars[0].aval.shape)) * int(
                np.prod([lhs[d] for d in lhs_contract]))
        else:
            subs = [jaxpr_macs(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params)]
            if name == "cond":  # one branch runs
                total += max(subs)
            else:  # a scan's body runs `length` times, a pmapped function on each device; a
                # while loop's trip count is unknown here and counts once
                times = {"scan": "length", "xla_pmap": "axis_size"}.get(name)
                total += (eqn.params[times] if times else 1) * sum(subs)
    return total


def layers(model: nnx.Module) -> list[dict]:
    """One row per conv, BN and dense layer in order: path, kind, parameter shape, parameters.
    A BlockRun's layers get one row per block: `blocks/1[k]/convs/0` for its block k."""
    rows, nodes = [], list(nnx.iter_graph(model))
    runs = [path for path, node in nodes if isinstance(node, BlockRun)]
    for path, node in nodes:
        if isinstance(node, BlockRun):
            block = layers(node.block)
            rows += [{**r, "path": f"{'/'.join(map(str, path))}[{k}]/{r['path']}",
                      "shape": r["shape"][1:], "params": r["params"] // node.length}
                     for k in range(node.length) for r in block]
        elif isinstance(node, (nnx.Conv, nnx.Linear, models.BatchNorm, models.GroupNorm)) \
                and not any(path[:len(run)] == run for run in runs):
            params = jax.tree.leaves(nnx.state(node, nnx.Param))
            shape = tuple(node.kernel.shape) if hasattr(node, "kernel") else params[0].shape
            rows.append({"path": "/".join(map(str, path)), "kind": type(node).__name__,
                         "shape": list(shape), "params": int(sum(p.size for p in params))})
    return rows


def describe(model: nnx.Module, image_shape) -> dict:
    """Counts for one image of `image_shape` (H, W, C)."""
    graphdef, state = nnx.split(model)

    def forward(state, x):
        return models.forward(nnx.merge(graphdef, state), x, train=False)[0]

    rows = layers(model)
    # Weighted layers as the paper counts depth: convs on the main path and the dense layer.
    depth = sum(1 for r in rows if r["kind"] in ("Conv", "Linear") and "shortcut" not in r["path"])
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    return {"weighted_layers": depth, "params": models.count_params(model),
            "macs": count_macs(forward, abstract, x), "image_shape": list(image_shape), "layers": rows}


class ShapeOnlyRngs:
    """Stands in for `nnx.Rngs` when a net is built under `nnx.eval_shape` for its shapes only:
    every `params` key is the same. A traced `nnx.Rngs` advances its counter through an
    assignment that, in Flax 0.12, builds an error message walking the whole program traced so
    far: quadratic in depth (ResNet-1202 took 217 s to build on 2 busy cores). Make one per
    build: the key is made in the first call's trace."""

    def __init__(self):
        self.key = None

    def params(self) -> jax.Array:
        if self.key is None:
            self.key = jax.random.key(0)
        return self.key


def describe_config(config) -> dict:
    """`describe` for the model and dataset of a training config."""
    from resnet_jax import data
    from resnet_jax.configs.check import check_config
    from resnet_jax.step import create_model

    check_config(config)
    image_shape, num_classes = data.shape_of(config.dataset)
    if config.image_size:  # streamed sets are cropped to image_size
        image_shape = (config.image_size, config.image_size, image_shape[-1])
    model = nnx.eval_shape(lambda: create_model(
        config, num_classes=num_classes, in_channels=image_shape[-1], rngs=ShapeOnlyRngs()))
    return {"config": f"{config.model} depth={config.depth} residual={config.residual} "
                      f"shortcut={config.shortcut} block={config.block} width={config.width}"
                      + (f" base_width={config.base_width}" if config.model == "cifar" else ""),
            **describe(model, image_shape)}


# Wide enough for the largest counts of the default nets (ResNet-152's), so that rows can print
# as they are counted; a wider cell shifts only its own row.
STANDARD_WIDTHS = {"name": len("ResNet-1202"), "family": len("imagenet"),
                   "params": len("60,192,808"), "macs": len("11,513,626,624")}


def standard_nets(cifar_depths=(20, 32, 44, 56, 110, 1202),
                  imagenet_depths=(18, 34, 50, 101, 152)) -> Iterator[dict]:
    """The paper's nets with their exact counts, one at a time: CIFAR (option A, 10 classes),
    ImageNet (option B). Built with identical blocks scanned (`scan_blocks`): the same layers,
    parameters and multiply-adds as the unrolled nets (tests/test_models.py), traced once per
    run of blocks instead of once per block."""
    nets = [("cifar", depth, residual) for depth in cifar_depths for residual in (True, False)]
    nets += [("imagenet", depth, residual) for depth in imagenet_depths
             for residual in ((True, False) if depth <= 34 else (True,))]
    for family, depth, residual in nets:
        build = models.cifar_resnet if family == "cifar" else functools.partial(
            models.imagenet_resnet, shortcut="B")
        model = nnx.eval_shape(lambda: build(depth, residual=residual, scan_blocks=True,
                                             rngs=ShapeOnlyRngs()))
        d = describe(model, (32, 32, 3) if family == "cifar" else (224, 224, 3))
        yield {"name": net_name(depth, residual), "family": family,
               **{k: d[k] for k in ("weighted_layers", "params", "macs")}}


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [_cells(r, columns) for r in rows]
    return "\n".join(table_lines(rows, columns, {
        c: max([0, *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)}))


def table_lines(rows: Iterable[dict], columns: list[str], widths: dict) -> Iterator[str]:
    """Header, rule, then each row's line as the row arrives; columns right-aligned, each at
    least as wide as its header and `widths[column]`."""
    widths = [max(len(c), widths.get(c, 0)) for c in columns]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    yield line(columns)
    yield line(["-" * w for w in widths])
    for r in rows:
        yield line(_cells(r, columns))


def _cells(row: dict, columns: list[str]) -> list[str]:
    return [f"{row[c]:,}" if isinstance(row[c], int) else str(row[c]) for c in columns]
