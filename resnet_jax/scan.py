"""Identical blocks under one `jax.lax.scan`: compile time flat in depth, the same numbers.

`models.ResNet(scan_blocks=True)` holds each stretch of identical consecutive blocks (in the
paper's nets every block of a stage after the first) as one `BlockRun`: one `Block` whose
variables carry a leading axis, one row per block, called as one scan over the rows. XLA then
compiles one block per run and the train state holds one leaf per variable per run, so neither
compile time nor the optimizer's program grows with depth: ResNet-1202 compiles in seconds, not
minutes, for a CPU step about 5 % slower (benchmarks/RESULTS.md), hence off by default.

The rows are the blocks' own initial values, so a scanned net starts from the numbers of its
unrolled twin and computes what it computes (tests/test_models.py); only the state's layout
differs (`blocks/i/block/...` with a leading axis instead of one `blocks/i/...` per block).
Diagnostics come back in block order, one value per block and layer.

On XLA CPU the scanned convolutions need `xla_cpu.conv_general_dilated` to run at the unrolled
speed (its docstring says why); the training side passes it in.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx


class BlockRun(nnx.Module):
    """Consecutive identical blocks held as one block with stacked variables, run by a scan."""

    def __init__(self, blocks: list[nnx.Module]):
        self.length = len(blocks)
        graphdef, _ = nnx.split(blocks[0])
        stacked = jax.tree.map(lambda *v: jnp.stack(v), *(nnx.state(b) for b in blocks))
        self.block = nnx.merge(graphdef, stacked)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        with _captures_detached(self.block):
            graphdef, params, stats, rest = nnx.split(self.block, nnx.Param, nnx.BatchStat, ...)

        def body(x, rows):
            block = nnx.merge(graphdef, *rows, rest, copy=True)
            y, sown = nnx.capture(block, nnx.Intermediate)(x, train=train)
            return y, (nnx.state(block, nnx.BatchStat), sown)

        x, (stats, sown) = jax.lax.scan(body, x, (params, stats))
        nnx.update(self.block, stats)
        for path, var in nnx.to_flat_state(sown):
            # `Module.sow` accumulates a tuple in call order, here each entry one value per row:
            # block-major order is what the unrolled blocks would have sown one by one.
            self.sow(nnx.Intermediate, path[-1], jnp.stack(var.get_value(), 1).reshape(-1))
        return x


def group_runs(blocks: list[nnx.Module]) -> list[nnx.Module]:
    """`blocks` in order, each stretch of two or more identical consecutive ones as a BlockRun."""
    signatures, out, i = [_signature(b) for b in blocks], [], 0
    while i < len(blocks):
        j = i + 1
        while j < len(blocks) and signatures[j] == signatures[i]:
            j += 1
        out.append(blocks[i] if j - i == 1 else BlockRun(blocks[i:j]))
        i = j
    return out


def _signature(block: nnx.Module):
    """Equal for two blocks that describe the same computation on different numbers: the
    graph, and the structure, shapes and dtypes of the state."""
    graph, state = nnx.split(block)
    leaves, structure = jax.tree.flatten(state)
    return graph, structure, tuple((v.shape, v.dtype) for v in leaves)


@contextlib.contextmanager
def _captures_detached(module: nnx.Module):
    """Takes `nnx.capture`'s per-module collectors off `module` for the duration, so that it
    splits into a graph the scan body can merge. The block's sown values never go there in the
    meantime; the run sows them after the scan.

    Answers a Flax 0.12.8 limitation: an enclosing capture (as in `models.forward`) puts a
    collector (`__captures__`, a private attribute) on every module, and `nnx.merge` cannot
    rebuild a graph holding both those and an `nnx.List`. It can go when, on a newer Flax,
    tests/test_models.py's scanned-vs-unrolled test passes with this context manager made a
    no-op (it splits a captured BlockRun)."""
    detached = [(m, m.__captures__) for _, m in nnx.iter_modules(module)
                if "__captures__" in vars(m)]
    for m, _ in detached:
        delattr(m, "__captures__")
    try:
        yield
    finally:
        for m, captures in detached:
            m.__captures__ = nnx.data(captures)
