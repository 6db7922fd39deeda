"""A time model on paper (issue 17, item 5): the paper's schedules predicted on one H100, one TPU
v5e chip and a v5e-8 from counted FLOPs per step, the host's overhead per step and stated
utilisation assumptions, with the host cores the ImageNet input needs:

    python -m benchmarks.time_model --input-rate=input_rate.json --json=OUT
    python -m benchmarks.time_model --host-ms=1.35 --steps-per-call=8 --measured=bench-bfloat16.json

Per step, on `chips` chips of peak P FLOP/s (the vendor's dense figure for the dtype) at an
assumed model-FLOPs utilisation u (a low-high range, `UTILISATION`, each with its source):
    device time = FLOPs per step / (chips x P x u)
    host time   = host_ms / steps_per_call  (dispatching the compiled step; the issue measured
                  1.0-1.35 ms per call on this project's 2-core CPU, so `--host-ms` defaults to
                  the upper end; a measured K-steps-per-call figure replaces it)
    step time   = max(device, host): JAX dispatches asynchronously, so the host prepares the next
                  step while the device runs this one (the sum would be the pessimistic bound)
and the schedule takes steps x step time (evaluation and checkpoints not counted). FLOPs per
step: 2 x the multiply-adds of every convolution and matrix product of the traced train step
(forward and backward), counted as `resnet-jax bench` counts them. ImageNet's input needs
(images/s per accelerator) x (CPU s per image, benchmarks/input_rate.py) host cores.
`--measured` bench JSONs (e.g. from benchmarks/gpu_check.sh) fill the "measured" column with
their ms per step times the schedule's steps; without them it stays empty.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

from resnet_jax.cli import ArgumentParser, int_list
from resnet_jax.configs import net_name

CIFAR_SCHEDULE = (64_000, 128)  # iterations and batch of He et al. 2015, Sec. 4.2


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    kind: str  # whose utilisation applies (UTILISATION) and which bench devices it matches
    chips: int
    peak: dict  # dtype -> dense FLOP/s per chip as JAX runs it by default
    matches: tuple[str, ...]  # jax device_kind substrings a measured row may come from


# H100 SXM (NVIDIA's H100 data sheet; its table gives "with sparsity" figures, twice these):
# bfloat16 989.4 TFLOP/s; float32 convolutions and matrix products run as TF32 under JAX's
# default precision ("TF32 on recent GPUs", JAX docs, Matmul precision), 494.7 TFLOP/s.
# TPU v5e (Cloud TPU docs, "TPU v5e"): 197 TFLOP/s bfloat16 per chip, 8 chips per host. float32
# is not predicted there: its products run as one bfloat16 pass under JAX's default precision,
# at the same peak, but its activations move twice the bytes, and nothing here says how much
# that costs.
H100 = {"bfloat16": 989.4e12, "float32": 494.7e12}
V5E = {"bfloat16": 197e12}
ACCELERATORS = (
    Accelerator("1 H100", "H100", 1, H100, ("H100", "H200")),
    Accelerator("1 TPU v5e", "TPU v5e", 1, V5E, ("TPU v5 lite", "TPU v5e")),
    Accelerator("TPU v5e-8", "TPU v5e-8", 8, V5E, ("TPU v5 lite", "TPU v5e")),
)

# (family, accelerator kind) -> (low, high, where it comes from). ResNet-50 training costs 24.5
# GFLOP per image by this count (3 x 2 x 4.09 G multiply-adds).
UTILISATION = {
    ("imagenet", "H100"): (0.10, 0.19, (
        "high: NVIDIA DeepLearningExamples (PyTorch ResNet-50 v1.5, DGX A100, 1 GPU) trains "
        "2,470 images/s in mixed precision = 60.5 TFLOP/s = 19 % of the A100's 312; low: an "
        "assumption, as the H100 has 3.2x the A100's bf16 FLOP/s but 1.7x its memory bandwidth "
        "(3.35 against 2.0 TB/s) and batch norm and ReLU passes are bound by bandwidth")),
    ("imagenet", "TPU v5e"): (0.25, 0.40, (
        "high: Flax's examples/imagenet (ResNet-50, bf16, batch 1024) ran 100 epochs on a TPU "
        "v3-8 (4 chips of 123 TFLOP/s) in 4.4 h with its evaluations = 8,090 images/s = 198 "
        "TFLOP/s = 40 %; low: an assumption, as a v5e chip has 1.6x a v3 chip's FLOP/s but "
        "0.9x its memory bandwidth (819 against 900 GB/s)")),
    ("imagenet", "TPU v5e-8"): (0.20, 0.40, (
        "as one v5e chip; low end lowered for 32 images per chip (batch 256 over 8) and the "
        "gradient all-reduce: an assumption")),
    ("cifar", "H100"): (0.01, 0.05, (
        "an assumption, no published figure found: 16-64 channels on 32x32 images fill few of "
        "the H100's 132 SMs, and a step is hundreds of small kernels; the first bench row "
        "(fraction_of_peak) replaces it")),
    ("cifar", "TPU v5e"): (0.02, 0.10, (
        "an assumption, no published figure found: channel counts of 16-64 use at most a "
        "quarter of a 128x128 systolic array's width; the first bench row replaces it")),
    ("cifar", "TPU v5e-8"): (0.005, 0.05, (
        "an assumption: 16 images per chip (batch 128 over 8) and a gradient all-reduce each "
        "step; the first run replaces it")),
}


@dataclasses.dataclass(frozen=True)
class Net:
    family: str  # "cifar" or "imagenet"
    depth: int
    steps: int
    batch: int
    gflops_per_step: float


def count_gflops(family: str, depth: int, batch: int) -> float:
    """FLOPs per train step of `batch` images (float32 config, 1 device, no diagnostics), as
    `resnet-jax bench` counts them, in GFLOP."""
    from resnet_jax import bench, summary
    from resnet_jax.configs import cifar, imagenet

    config = {"cifar": cifar, "imagenet": imagenet}[family].get_config(f"depth={depth}")
    config.batch_size, config.num_devices, config.log_diagnostics = batch, 1, False
    backend, state, step, images = bench.prepare(config)
    traced = backend.trace(step, state, images)
    return 2.0 * summary.jaxpr_macs(traced.jaxpr.jaxpr) / 1e9


def nets(cifar_depths, imagenet_depths, count=count_gflops) -> list[Net]:
    """The paper's schedules: CIFAR 64k iterations of 128; ImageNet per configs/imagenet.py
    (90 epochs of 1.28M images at batch 256)."""
    from resnet_jax.configs import imagenet

    out = [Net("cifar", d, *CIFAR_SCHEDULE, count("cifar", d, CIFAR_SCHEDULE[1]))
           for d in cifar_depths]
    for d in imagenet_depths:
        c = imagenet.get_config(f"depth={d}")
        out.append(Net("imagenet", d, c.total_steps, c.batch_size,
                       count("imagenet", d, c.batch_size)))
    return out


def predict(net: Net, acc: Accelerator, dtype: str, *, host_ms: float, steps_per_call: int,
            cpu_s_per_image: float | None) -> dict:
    """One row of the model: step time and schedule time at the high and the low utilisation."""
    low, high, _ = UTILISATION[(net.family, acc.kind)]
    host_s = host_ms / 1e3 / steps_per_call
    row = {"net": net_name(net.depth, True), "on": acc.name, "dtype": dtype, "steps": net.steps,
           "batch": net.batch, "gflops_per_step": net.gflops_per_step,
           "utilisation": (low, high), "host_ms_per_step": 1e3 * host_s}
    for end, u in (("fast", high), ("slow", low)):
        device_s = net.gflops_per_step * 1e9 / (acc.chips * acc.peak[dtype] * u)
        step_s = max(device_s, host_s)
        row[end] = {"device_ms_per_step": 1e3 * device_s, "bound": "device" if device_s >= host_s
                    else "host", "hours": net.steps * step_s / 3600,
                    "images_per_sec": net.batch / step_s}
        if net.family == "imagenet" and cpu_s_per_image:
            row[end]["host_cores"] = row[end]["images_per_sec"] * cpu_s_per_image
    return row


def measured(rows: list[dict], bench_rows: list[dict]) -> None:
    """Fills row["measured"] from bench rows of the same net, dtype and batch on a matching
    device: ms per step x the schedule's steps."""
    for row in rows:
        acc = next(a for a in ACCELERATORS if a.name == row["on"])
        for b in bench_rows:
            if (b["net"] == row["net"] and b["dtype"] == row["dtype"] and b["batch"] == row["batch"]
                    and b.get("seeds", 1) == 1 and b["devices"] == acc.chips
                    and any(m in b["device"] for m in acc.matches)):
                row["measured"] = {"device": b["device"], "ms_per_step": b["ms_per_step"],
                                   "hours": row["steps"] * b["ms_per_step"] / 3.6e6}


def _time(hours: float) -> str:
    return f"{hours * 60:.1f} min" if hours < 1 else f"{hours:.1f} h"


def markdown(rows: list[dict]) -> str:
    lines = ["| net | on | dtype | GFLOP/step | utilisation assumed | device ms/step | host "
             "ms/step | bound | PREDICTION: schedule time | images/s | host cores for input "
             "| measured |", "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        fast, slow = r["fast"], r["slow"]
        cores = (f"{fast['host_cores']:.0f} / {slow['host_cores']:.0f}"
                 if "host_cores" in fast else "- (data on device)")
        m = r.get("measured")
        lines.append(
            f"| {r['net']} | {r['on']} | {r['dtype']} | {r['gflops_per_step']:,.1f} | "
            f"{100 * r['utilisation'][1]:.1f} / {100 * r['utilisation'][0]:.1f} % | "
            f"{fast['device_ms_per_step']:.3g} / {slow['device_ms_per_step']:.3g} | "
            f"{r['host_ms_per_step']:.3g} | {fast['bound']} / {slow['bound']} | "
            f"{_time(fast['hours'])} / {_time(slow['hours'])} | "
            f"{fast['images_per_sec']:,.0f} / {slow['images_per_sec']:,.0f} | {cores} | "
            + (f"{_time(m['hours'])} ({m['device']})" if m else "") + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = ArgumentParser("benchmarks.time_model", __doc__)
    parser.add_argument("--depths", type=int_list, default="20,56,110",
                        help="CIFAR ResNet depths")
    parser.add_argument("--imagenet-depths", type=int_list, default="50",
                        help="ImageNet ResNet depths")
    parser.add_argument("--dtypes", default="bfloat16,float32",
                        help="dtypes to predict (float32: on the H100 only)")
    parser.add_argument("--host-ms", type=float, default=1.35,
                        help="host overhead per call of the compiled step, ms (issue 17)")
    parser.add_argument("--steps-per-call", type=int, default=1,
                        help="train steps per compiled call (host overhead divides by it)")
    parser.add_argument("--input-rate",
                        help="benchmarks.input_rate JSON: its pipeline CPU s per image")
    parser.add_argument("--measured", action="append", default=[],
                        help="resnet-jax bench --json output to fill the measured column")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    cifar_depths, imagenet_depths = args.depths, args.imagenet_depths
    dtypes = [d for d in args.dtypes.split(",") if d]
    if not dtypes or any(d not in H100 for d in dtypes):
        parser.error(f"--dtypes={args.dtypes}: pass bfloat16, float32 or both")
    if args.host_ms < 0 or args.steps_per_call < 1:
        parser.error("--host-ms takes a number >= 0 and --steps-per-call an integer >= 1")
    cpu_s_per_image = None
    if args.input_rate:
        try:
            rate = json.loads(pathlib.Path(args.input_rate).read_text())
            cpu_s_per_image = rate["serial_cpu_s_per_image"]["pipeline"]
        except (OSError, ValueError, KeyError) as e:
            parser.error(f"--input-rate={args.input_rate} is not a benchmarks.input_rate JSON "
                         f"({type(e).__name__}): pass the file its --json wrote")
    bench_rows = []
    for path in args.measured:
        try:
            bench_rows += json.loads(pathlib.Path(path).read_text())["rows"]
        except (OSError, ValueError, KeyError) as e:
            parser.error(f"--measured={path} is not a resnet-jax bench --json output "
                         f"({type(e).__name__}): pass the file bench --json wrote")

    rows = [predict(net, acc, dtype, host_ms=args.host_ms, steps_per_call=args.steps_per_call,
                    cpu_s_per_image=cpu_s_per_image)
            for net in nets(cifar_depths, imagenet_depths) for acc in ACCELERATORS
            for dtype in dtypes if dtype in acc.peak]
    measured(rows, bench_rows)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"host_ms": args.host_ms, "steps_per_call": args.steps_per_call,
             "cpu_s_per_image": cpu_s_per_image,
             "utilisation": {f"{f} on {k}": v for (f, k), v in UTILISATION.items()},
             "rows": rows}, indent=1) + "\n")
    print("PREDICTION (benchmarks/time_model.py): fast / slow = at the high / low utilisation "
          f"assumed; host {args.host_ms} ms per call, {args.steps_per_call} step(s) per call"
          + (f"; input {1e3 * cpu_s_per_image:.2f} CPU ms per image" if cpu_s_per_image else ""))
    print(markdown(rows))
    print("\nUtilisation assumed, and where it comes from:")
    for (family, kind), (low, high, source) in UTILISATION.items():
        print(f"- {family} on {kind}: {100 * low:g}-{100 * high:g} %: {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
