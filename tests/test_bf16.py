"""dtype=bfloat16: convolutions and activations in bfloat16; parameters, batch-norm statistics,
the loss, the gradients and the optimiser state in float32; and a short run that trains as the
float32 run does."""

import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from resnet_jax import models, parallel, train
from resnet_jax.step import TrainCalls, make_training
from resnet_jax.configs import cifar

BATCH = 32


def config(dtype: str, **overrides):
    c = cifar.get_config("depth=8,dataset=digits")
    c.update(batch_size=BATCH, num_devices=1, dtype=dtype, **overrides)
    return c


def dtypes(tree) -> set:
    return {np.dtype(x.dtype) for x in jax.tree.leaves(tree)}


def equations(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs inside it (jit, cond, scan, custom rules)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for inner in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's Jaxpr
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


def saved_activations(graphdef, state, images, capsys) -> list[tuple[str, int]]:
    """(dtype, rank) of each array of rank >= 4 that autodiff keeps for the backward pass of
    the training loss."""
    labels = jnp.zeros((len(images),), jnp.int32)

    def loss(params):
        model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
        logits, _ = models.forward(model, images, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(loss, state.params)
    shapes = re.findall(r"^(\w+)\[([\d,]*)\]", capsys.readouterr().out, re.M)
    return [(dtype, len(dims.split(","))) for dtype, dims in shapes
            if len(dims.split(",")) >= 4]


@pytest.mark.parametrize("block", ["post", "pre"])
def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state(block, capsys):
    backend = parallel.create_backend("jit", BATCH, 1)
    graphdef, state, train_step = make_training(config("bfloat16", block=block), backend,
                                                      num_classes=10, in_channels=1)
    f32, bf16 = np.dtype("float32"), np.dtype("bfloat16")
    assert dtypes(state.params) == dtypes(state.batch_stats) == dtypes(state.opt_state) == {f32}
    batch = {"image": jax.ShapeDtypeStruct((BATCH, 8, 8, 1), jnp.float32),
             "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
    new_state, metrics = jax.eval_shape(train_step, state, batch)
    assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)
    assert metrics["loss"].dtype == f32 and metrics["grad_norm"].dtype == f32

    eqns = list(equations(jax.make_jaxpr(train_step)(state, batch).jaxpr))
    # 7 convolutions (the stem and 2 per block), each forward, input and weight gradient.
    convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
    assert len(convs) == 3 * 7
    assert {v.aval.dtype for e in convs for v in [*e.invars, *e.outvars]} == {bf16}
    # ReLUs on activations: the stem's and 2 per block (post), or 2 per block and the head's
    # (pre); the only max over arrays of rank 4.
    relus = [e for e in eqns if e.primitive.name == "max" and e.outvars[0].aval.ndim == 4]
    assert len(relus) == 7 and {e.outvars[0].aval.dtype for e in relus} == {bf16}
    # The classifier: forward, input and weight gradient.
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3 and {v.aval.dtype for e in dots for v in e.outvars} == {f32}

    # What autodiff keeps of the activations is bfloat16 (and ReLU masks), never float32: the
    # float32 net of the same graph keeps float32 ones, so this could fail.
    images = jnp.zeros((BATCH, 8, 8, 1), jnp.float32)
    kept = saved_activations(graphdef, state, images, capsys)
    assert kept and "f32" not in {dtype for dtype, _ in kept}
    graphdef32, state32, _ = make_training(config("float32", block=block), backend,
                                                 num_classes=10, in_channels=1)
    assert "f32" in {dtype for dtype, _ in saved_activations(graphdef32, state32, images, capsys)}


def last_errors(dtype: str, steps: int = 300, window: int = 100) -> float:
    """Mean training error (%) over the last `window` of `steps` steps of ResNet-8 on digits
    (seed 0, batch 32, lr 0.1), 100 steps per compiled call."""
    c = config(dtype, log_diagnostics=False, steps_per_call=100)
    backend = parallel.create_backend("jit", BATCH, 1)
    feed = train.create_feed(c, backend)
    _, state, train_step = make_training(c, backend, num_classes=10, in_channels=1)
    calls = TrainCalls(c, backend, train_step, feed)
    state, errors = backend.put_state(state), []
    for first in range(0, steps, 100):
        state, metrics = calls(state, first, 100)
        errors += [m["error"] for m in calls.per_step(jax.device_get(metrics), 100)]
    return float(np.mean(errors[-window:]))


def test_bfloat16_reaches_the_float32_training_error():
    """Within 4 points, after 300 steps. bfloat16 keeps 8 significant bits, so its run leaves
    float32's path within a few steps, as a run with another seed would: the yardstick is how
    much this error varies between seeds. Measured with this setup (train_and_evaluate, the
    same numbers): float32 12.3, 13.9, 15.0 and 16.0 % for seeds 0-3 (sd 1.6 points), bfloat16
    minus float32 +1.3, -1.1, -1.2 and -0.9 points. 4 points is 2.5 sd: a run that trains as
    float32 does passes, one that trains worse by more than seeds explain fails."""
    reference = last_errors("float32")
    assert reference < 25  # it trained: chance is 90 %
    assert abs(last_errors("bfloat16") - reference) < 4
