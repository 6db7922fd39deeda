"""A whole `resnet-jax train` run against its train step alone, on real images:

    python -m benchmarks.loop_rate --data=/tmp/data/cifar10_jpeg --sizes=16,32 --steps=1000

For each image size, one config (ResNet-20 on the image folder at that size; at 16x16 the
Fig. 6 CPU preset's net and batch, `cifar16-12k`: filters 8/16/32, batch 64; at 32x32 the
paper's: filters 16/32/64, batch 128), and three numbers:
- step: `resnet_jax.bench.Step` of that config, best and median of `--rounds` rounds of 10
  steps, the rounds taken before and after the run (no input pipeline, no evaluation, no
  logging);
- loop: the same as the run's records give it, `examples_per_sec` (the loop's own measure of
  its train steps: the input pipeline and the host's work per step included, evaluations and
  checkpoints kept out), the median over the records after the first;
- run: `resnet-jax train` of `--steps` steps in a fresh process, with the preset's logging and
  a test evaluation every `--steps`/2 steps (2,000 test images; the last on all 10,000) and a
  checkpoint at the end; images trained over the wall time from the first record to the last
  (compilation and the decoding of the images before the first step are left out, as a long
  run amortises them), and over the whole process's wall time.
`--set=KEY=VALUE` (repeatable) changes the config of both, e.g. `--set=steps_per_call=8` or
`--set=cpu_convolution=onednn` (the step alone calls one step at a time whatever
steps_per_call says). The ratios loop/step and run/step, against the step's median round (the
loop's number is a median too; against the best round they read low by the rounds' spread), say
what the loop costs: issue 25 asks that it lose no more than 10 % to the step. Only a run on
otherwise idle cores measures the code: the load average before and after is printed.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from resnet_jax import allocator
from resnet_jax.cli import ArgumentParser, int_list
from resnet_jax.rundir import METRICS_JSONL

NETS = {16: ["--config.base_width=8", "--config.batch_size=64", "--config.learning_rate=0.05"],
        32: ["--config.batch_size=128"]}


def main(argv=None) -> int:
    if argv is None:  # the step alone under the allocator the run it is compared with gets
        allocator.preload()
    parser = ArgumentParser("benchmarks.loop_rate", __doc__)
    parser.add_argument("--data", required=True, help="the CIFAR-10 image folder "
                        "(../shared/datasets/cifar10_jpeg.tar.gz, extracted)")
    parser.add_argument("--sizes", type=int_list, default="16,32", help="image sizes: 16, 32")
    parser.add_argument("--steps", type=int, default=1000, help="train steps of each run")
    parser.add_argument("--rounds", type=int, default=3, help="step-alone rounds, before and after")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override of the step and the run; repeat for more")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if bad := [s for s in args.set if "=" not in s]:
        parser.error(f"--set={bad[0]} is not KEY=VALUE, e.g. --set=steps_per_call=8")
    if not os.path.isdir(args.data):
        parser.error(f"--data={args.data} is not a folder: extract "
                     "../shared/datasets/cifar10_jpeg.tar.gz and pass its cifar10_jpeg folder")
    if unknown := sorted(set(args.sizes) - set(NETS)):
        parser.error(f"--sizes: no net for {unknown}; pick from {sorted(NETS)}")
    if args.steps < 20 or args.steps % 10:
        parser.error(f"--steps={args.steps}: pass a multiple of 10 of at least 20")
    import jax

    from resnet_jax import bench
    from resnet_jax.configs import cifar, typed
    from resnet_jax.metrics import EVAL_SECONDS, EXAMPLES_PER_SEC, TIME

    load = os.getloadavg()
    rows = []
    for size in args.sizes:
        overrides = [f"--config.image_size={size}", *NETS[size], "--config.num_devices=1",
                     *(f"--config.{s}" for s in args.set)]
        config = cifar.get_config(f"depth=20,dataset=folder:{args.data}")
        for o in overrides:
            key, value = o.removeprefix("--config.").split("=", 1)
            if key not in config:
                parser.error(f"--set={key}=...: no config key {key!r}")
            try:
                config[key] = typed(value, config[key])
            except ValueError:
                kind = type(config[key]).__name__
                parser.error(f"--set={key}={value}: needs a value of type {kind}, like its "
                             f"default {config[key]!r}")
        config.log_diagnostics = False  # as the preset
        step = bench.Step(config)
        seconds = [step.time(10) for _ in range(args.rounds)]
        with tempfile.TemporaryDirectory() as workdir:
            log, every = args.steps // 10, args.steps // 2
            command = [sys.executable, "-m", "resnet_jax.main", "train",
                       f"--config=resnet_jax/configs/cifar.py:depth=20,dataset=folder:{args.data}",
                       *overrides, "--config.log_diagnostics=False",
                       f"--config.total_steps={args.steps}", f"--config.log_every_steps={log}",
                       f"--config.eval_every_steps={every}", "--config.eval_subset=2000",
                       f"--config.checkpoint_every_steps={args.steps}", f"--workdir={workdir}"]
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            process_s = time.perf_counter() - start
            with open(os.path.join(workdir, METRICS_JSONL)) as f:
                records = [json.loads(line) for line in f]
        seconds += [step.time(10) for _ in range(args.rounds)]
        batch = config.batch_size
        first, last = records[0], records[-1]
        row = {"size": size, "net": step.net, "batch": batch, "steps": args.steps,
               "set": args.set,
               "step_images_per_sec": batch / min(seconds),
               "step_median_images_per_sec": batch / statistics.median(seconds),
               "loop_images_per_sec": statistics.median(r[EXAMPLES_PER_SEC]
                                                        for r in records[1:]),
               "run_images_per_sec": (last["step"] - first["step"]) * batch
               / (last[TIME] - first[TIME]),
               "process_images_per_sec": args.steps * batch / process_s,
               "eval_seconds": sum(r.get(EVAL_SECONDS, 0) for r in records[1:]),
               "step_rounds_ms": [1e3 * s for s in seconds]}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"device: {jax.devices()[0].device_kind} (JAX {jax.__version__}), {args.steps} steps "
          f"per run; load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print("| size | net, batch | step alone, images/s: best, median | loop | run | "
          "whole process | loop / step | run / step |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        step = r["step_median_images_per_sec"]
        print(f"| {r['size']}x{r['size']} | {r['net']}, {r['batch']} | "
              f"{r['step_images_per_sec']:.0f}, {step:.0f} | "
              f"{r['loop_images_per_sec']:.0f} | {r['run_images_per_sec']:.0f} | "
              f"{r['process_images_per_sec']:.0f} | {r['loop_images_per_sec'] / step:.2f} | "
              f"{r['run_images_per_sec'] / step:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
