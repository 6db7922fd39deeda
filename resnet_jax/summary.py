"""What a network is: its layers, trainable parameters and multiply-adds per image.

Multiply-adds are counted from the traced program itself (every convolution and matrix product
of a forward pass on one image), so they cannot drift from the model code.
"""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet_jax import models


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
    runs = [path for path, node in nodes if isinstance(node, models.BlockRun)]
    for path, node in nodes:
        if isinstance(node, models.BlockRun):
            rows += [{**r, "path": f"{'/'.join(map(str, path))}[{k}]/{r['path']}",
                      "shape": r["shape"][1:], "params": r["params"] // node.length}
                     for k in range(node.length) for r in layers(node.block)]
        elif isinstance(node, (nnx.Conv, nnx.Linear, models.BatchNorm)) and not any(
                path[:len(run)] == run for run in runs):
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


def describe_config(config) -> dict:
    """`describe` for the model and dataset of a training config."""
    from resnet_jax import data, train

    train.check_config(config)
    image_shape, num_classes = data.shape_of(config.dataset)
    if config.get("image_size"):  # streamed sets are cropped to image_size
        image_shape = (config.image_size, config.image_size, image_shape[-1])
    model = train.create_model(config, num_classes=num_classes, in_channels=image_shape[-1])
    return {"config": f"{config.model} depth={config.depth} residual={config.residual} "
                      f"shortcut={config.shortcut} block={config.block} width={config.width}"
                      + (f" base_width={config.base_width}" if config.model == "cifar" else ""),
            **describe(model, image_shape)}


def standard_nets(cifar_depths=(20, 32, 44, 56, 110, 1202),
                  imagenet_depths=(18, 34, 50, 101, 152)) -> list[dict]:
    """The paper's nets with their exact counts: CIFAR (option A, 10 classes), ImageNet (B)."""
    out = []
    for depth in cifar_depths:
        for residual in (True, False):
            model = models.cifar_resnet(depth, residual=residual, rngs=nnx.Rngs(0))
            out.append({"name": f"{'ResNet' if residual else 'plain'}-{depth}", "family": "cifar",
                        **_counts(model, (32, 32, 3))})
    for depth in imagenet_depths:
        for residual in (True, False) if depth <= 34 else (True,):
            model = models.imagenet_resnet(depth, residual=residual, shortcut="B",
                                           rngs=nnx.Rngs(0))
            out.append({"name": f"{'ResNet' if residual else 'plain'}-{depth}",
                        "family": "imagenet", **_counts(model, (224, 224, 3))})
    return out


def _counts(model, image_shape) -> dict:
    d = describe(model, image_shape)
    return {k: d[k] for k in ("weighted_layers", "params", "macs")}


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r[c]) if not isinstance(r[c], int) else f"{r[c]:,}" for c in columns]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])
