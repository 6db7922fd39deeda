"""Training-step throughput: `resnet-jax bench --config=FILE:ARGS [--depths=20,56,110]`.

For each net: the real train step of `step.py` (the config's backend, devices, dtype and
diagnostics), compiled once and timed over `steps` steps on a batch already on the devices, so
neither compilation nor the input pipeline is counted. Reported: images/s, ms per step, compile
time (tracing, lowering and XLA's compilation; under pmap, the first step), model FLOPs per
step (convolutions and matrix products, counted in the traced step), the fraction of the
device's peak where `PEAK_FLOPS` knows the device, and memory from XLA's analysis of the
compiled step (`memory_analysis()`, per device): `mb_per_image`, its temporaries (the
activations kept for the backward pass, and scratch) per image on a device, and `device_mb`,
those plus its arguments and outputs (parameters, optimiser state, the batch; donated buffers
once). Run it with `--config.dtype=float32` and `--config.dtype=bfloat16` to compare the two.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from resnet_jax import models, parallel, summary
from resnet_jax.configs.check import check_config
from resnet_jax.step import create_training
from resnet_jax.configs import net_name
from resnet_jax.metrics import Phase

# Dense peak FLOP/s per device by (device_kind substring, dtype), from the vendors' data sheets.
PEAK_FLOPS = {
    ("H100", "bfloat16"): 989e12, ("H100", "float32"): 67e12,  # SXM; fp32 without TF32
    ("H200", "bfloat16"): 989e12, ("H200", "float32"): 67e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float32"): 19.5e12,
    ("TPU v4", "bfloat16"): 275e12, ("TPU v5e", "bfloat16"): 197e12,
    ("TPU v5p", "bfloat16"): 459e12,
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    return next((v for (kind, dt), v in PEAK_FLOPS.items()
                 if kind in device_kind and dt == dtype), None)


def prepare(config, *, num_seeds: int = 0, xla_options: dict | None = None):
    """(backend, state, step, batch): the train step of `config`, not yet compiled, its state
    on the devices and a fixed random batch (3 channels; the family's classes, and image size
    unless the config sets one: models.FAMILIES).
    `num_seeds=K`: K nets at once (seeds config.seed, config.seed + 1, ...), each with its own
    batch. `xla_options`: XLA options instead of `parallel.compiler_options`'s."""
    check_config(config)
    seeds = tuple(range(config.seed, config.seed + num_seeds))
    backend = parallel.create_backend(config.parallelism, config.batch_size, config.num_devices,
                                      seeds=seeds, xla_options=xla_options)
    family = models.FAMILIES[config.model]  # the input the paper feeds the family
    size, classes = config.image_size or family.image_size, family.num_classes
    graphdef, state, step = create_training(config, backend, num_classes=classes, in_channels=3)
    rng = np.random.default_rng(0)
    lead = (num_seeds,) if num_seeds else ()
    batch = jax.device_put(
        {"image": rng.normal(size=(*lead, config.batch_size, size, size, 3)).astype(np.float32),
         "label": rng.integers(0, classes, (*lead, config.batch_size)).astype(np.int32)},
        backend.data_sharding)
    return backend, backend.put_state(state), step, batch


def time_steps(step, state, batch, steps: int):
    """(state, seconds per step) over `steps` calls of a warm `step`, waited for."""
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return state, (time.perf_counter() - start) / steps


class Step:
    """The train step of `config` (see `prepare`), compiled and run `warmup` times: `time(n)`
    times n more steps (the state carries on), `row(seconds)` is the row for a step time. Two
    of these (or one and a peer's) timed in turns, round after round, see the same machine."""

    def __init__(self, config, *, warmup: int = 2, num_seeds: int = 0):
        self.config, self.num_seeds = config, num_seeds
        self.backend, self.state, step, self.batch = prepare(config, num_seeds=num_seeds)
        # A backend that compiles at the first call (pmap) leaves flops and memory uncounted.
        self.flops = self.memory = None
        net = self.net = net_name(config.depth, config.residual)
        start = time.perf_counter()
        with Phase(f"compiling the train step of {net}", f"compiled the train step of {net}"):
            traced = self.backend.trace(step, self.state, self.batch)
            if traced is not None:
                # Model FLOPs: 2 x the multiply-adds of the step's convolutions and matrix
                # products, forward and backward, in its traced program (XLA's cost analysis
                # counts a loop's body once, undercounting scanned blocks, and adds elementwise
                # work). The traced program still holds the first layer's input gradient,
                # which XLA drops: under 0.5 % at 20 layers.
                self.flops = 2.0 * summary.jaxpr_macs(traced.jaxpr.jaxpr)
                step = traced.lower().compile()
                self.memory = step.memory_analysis()
            else:
                self.state, metrics = step(self.state, self.batch)
                jax.block_until_ready(metrics)
        self.step, self.compile_s = step, time.perf_counter() - start
        with Phase(f"running the first {warmup} train steps of {net} (not timed)",
                   f"ran the first train steps of {net}"):
            self.time(warmup)

    def time(self, steps: int) -> float:
        """Seconds per step over `steps` more steps."""
        self.state, seconds = time_steps(self.step, self.state, self.batch, steps)
        return seconds

    def row(self, seconds: float) -> dict:
        config, flops, memory = self.config, self.flops, self.memory
        seeds = max(self.num_seeds, 1)
        device = jax.devices()[0]
        peak = peak_flops(device.device_kind, config.dtype)
        images_per_device = seeds * config.batch_size / self.backend.num_devices
        return {
            "net": self.net,
            "batch": config.batch_size, "seeds": seeds, "dtype": config.dtype,
            "devices": self.backend.num_devices, "device": device.device_kind,
            "images_per_sec": seeds * config.batch_size / seconds,
            "ms_per_step": 1e3 * seconds, "compile_s": self.compile_s,
            "gflops_per_step": flops / 1e9 if flops else None,
            "achieved_tflops": flops / seconds / 1e12 if flops else None,
            "fraction_of_peak": flops / seconds / (peak * self.backend.num_devices)
            if flops and peak else None,
            "mb_per_image": memory.temp_size_in_bytes / images_per_device / 2**20
            if memory else None,
            "device_mb": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                          - memory.alias_size_in_bytes + memory.temp_size_in_bytes) / 2**20
            if memory else None,
        }


def measure(config, *, steps: int = 20, warmup: int = 2, num_seeds: int = 0) -> dict:
    """One row: the train step of `config` (see `prepare`) timed over `steps` steps after
    `warmup`. images/s counts all seeds' batches."""
    step = Step(config, warmup=warmup, num_seeds=num_seeds)
    return step.row(step.time(steps))


def markdown(rows: list[dict]) -> str:
    cols = ["net", "batch", "seeds", "dtype", "devices", "images_per_sec", "ms_per_step", "compile_s",
            "gflops_per_step", "achieved_tflops", "fraction_of_peak", "mb_per_image", "device_mb"]
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
