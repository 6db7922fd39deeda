"""The host's cost per train step, and what `steps_per_call` saves of it, on this machine:

    python -m benchmarks.host_overhead --rounds=5
    python -m benchmarks.host_overhead --counts=8,32 --calls=256 --loop-steps=1280 --rounds=5

Two measurements, each repeated `--rounds` times with the variants interleaved in every round,
so that the machine's drift hits them alike; the medians are printed as markdown rows.
1. The step alone: a ResNet-8 of base width 4 on a fixed batch of 8 random 32x32 images (1
   device, float32, no depth diagnostics), timed as `--calls` calls of the compiled step
   (`Backend.compile_step`), and as calls of K steps each inside one compiled loop
   (`Backend.compile_steps`, the same fixed batch every step) for each K of `--counts`. The
   per-call time per step minus the in-loop time per step is what one call costs the host.
   Both wall-clock time and the process's CPU time (all its threads) are taken: on a machine
   that other jobs share, CPU time is the steadier measure of this process's own work.
2. The training loop: `train.train_and_evaluate` of the same net on 8x8 digits (batch 8,
   `--loop-steps` steps, one record at the end) with steps_per_call=1 and each K of
   `--counts`, its steps/s as the loop measures it (`examples_per_sec` / batch: compilation,
   evaluation and checkpoints excluded). With K=1 the loop makes two calls per step (the batch
   cut and the step); with K > 1 one call per K steps, the batches cut inside.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import sys
import tempfile
import time

from resnet_jax.cli import ArgumentParser, int_list


def step_config(batch: int):
    from resnet_jax.configs import cifar

    c = cifar.get_config("depth=8,base_width=4,dataset=synthetic")
    c.update(batch_size=batch, num_devices=1, log_diagnostics=False)
    return c


def time_step(config, counts: list[int], calls: int, rounds: int) -> dict[str, dict]:
    """Wall and CPU seconds per step of the compiled step called once per step ('per call') and
    inside a compiled loop of K steps per call ('K in one call'): {variant: {'wall': [per
    round], 'cpu': [per round]}}."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from resnet_jax import parallel, step

    backend = parallel.create_backend("jit", config.batch_size, 1)
    _, state, train_step = step.make_training(config, backend, num_classes=10, in_channels=3)
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        {"image": rng.normal(size=(config.batch_size, 32, 32, 3)).astype(np.float32),
         "label": rng.integers(0, 10, config.batch_size).astype(np.int32)},
        backend.data_sharding)
    single = backend.compile_step(train_step)
    same_batch = lambda data, carry, step: (data, carry)  # noqa: E731  (no feed)
    loops = {k: backend.compile_steps(train_step, same_batch, k) for k in counts}
    state = backend.put_state(jax.tree.map(jnp.copy, state))

    def run_single(state, n):
        for _ in range(n):
            state, metrics = single(state, batch)
        return state, metrics

    def run_loop(k):
        def run(state, n):
            for i in range(n // k):
                state, metrics = loops[k](state, batch, (), i * k, k)
            return state, metrics
        return run

    variants = {"per call": run_single} | {f"{k} in one call": run_loop(k) for k in counts}
    for run in variants.values():  # compile and warm up
        state, metrics = run(state, max(counts))
        jax.block_until_ready((state, metrics))
    seconds = {name: {"wall": [], "cpu": []} for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            state, metrics = run(state, calls)
            jax.block_until_ready((state, metrics))
            seconds[name]["wall"].append((time.perf_counter() - start) / calls)
            seconds[name]["cpu"].append((time.process_time() - start_cpu) / calls)
    return seconds


def loop_rate(steps_per_call: int, total_steps: int, batch: int) -> float:
    """Train steps per second of the training loop on digits, as its last record reports."""
    from resnet_jax import train
    from resnet_jax.configs import cifar
    from resnet_jax.metrics import EXAMPLES_PER_SEC
    from resnet_jax.rundir import METRICS_JSONL

    c = cifar.get_config("depth=8,base_width=4,dataset=digits")
    c.update(batch_size=batch, num_devices=1, log_diagnostics=False, total_steps=total_steps,
             log_every_steps=total_steps, eval_every_steps=total_steps,
             checkpoint_every_steps=total_steps, eval_subset=100, steps_per_call=steps_per_call)
    with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(io.StringIO()):
        train.train_and_evaluate(c, workdir)
        with open(f"{workdir}/{METRICS_JSONL}") as f:
            last = json.loads(f.read().splitlines()[-1])
    return last[EXAMPLES_PER_SEC] / batch


def main(argv=None) -> int:
    parser = ArgumentParser("benchmarks.host_overhead", __doc__)
    parser.add_argument("--counts", type=int_list, default="8,32",
                        help="steps per call K to compare with 1")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--calls", type=int, default=256,
                        help="steps timed per variant and round (a multiple of every K)")
    parser.add_argument("--loop-steps", type=int, default=1280,
                        help="steps of each training-loop run (a multiple of every K)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions")
    args = parser.parse_args(argv)
    counts = args.counts
    if min(args.batch, args.rounds, args.calls, args.loop_steps) < 1:
        print(f"host_overhead: error: --batch, --rounds, --calls and --loop-steps must be "
              f"positive, not {args.batch}, {args.rounds}, {args.calls}, {args.loop_steps}: "
              "e.g. the defaults", file=sys.stderr)
        return 2
    if not counts or min(counts) < 2 or any(args.calls % k or args.loop_steps % k for k in counts):
        print(f"host_overhead: error: --counts={','.join(map(str, counts))} must be integers >= 2 dividing "
              f"--calls={args.calls} and --loop-steps={args.loop_steps}: e.g. --counts=8,32",
              file=sys.stderr)
        return 2

    import jax

    seconds = time_step(step_config(args.batch), counts, args.calls, args.rounds)
    rates = {k: [] for k in [1, *counts]}
    for _ in range(args.rounds):
        for k in rates:
            rates[k].append(loop_rate(k, args.loop_steps, args.batch))

    print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}, {args.rounds} rounds; "
          f"ResNet-8, base width 4, batch {args.batch}")
    largest = f"{max(counts)} in one call"
    for clock in ("wall", "cpu"):
        print(f"\n| the step (32x32, fixed batch), {clock} | median ms per step | minus "
              f"{largest} | per round, ms |\n|---|---:|---:|---|")
        inner = statistics.median(seconds[largest][clock])
        for name, values in seconds.items():
            median = statistics.median(values[clock])
            print(f"| {name} | {1e3 * median:.3f} | {1e3 * (median - inner):+.3f} | "
                  f"{', '.join(f'{1e3 * v:.3f}' for v in values[clock])} |")
    print("\n| training loop (8x8 digits) | median steps/s | ms per step | per round, steps/s |"
          "\n|---|---:|---:|---|")
    for k, values in rates.items():
        median = statistics.median(values)
        print(f"| steps_per_call={k} | {median:.0f} | {1e3 / median:.3f} | "
              f"{', '.join(f'{v:.0f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
