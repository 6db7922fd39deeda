"""Interleaved A/B of XLA compiler options on resnet_jax's train step, on this machine:

    python -m benchmarks.xla_options --depth=20 --batch=128 --rounds=3 \\
        --variant='onednn={"xla_cpu_use_onednn": true}' [--variant=NAME=JSON ...]

Variants: `default` (the project's choice, `parallel.compiler_options`), `xla` (XLA's own
defaults) and each `--variant NAME=JSON`, whose options are added to the project's choice. All
are compiled first; then every round times `--steps` steps of each variant in turn, so that the
machine's drift hits them alike. Prints the median images/s per variant and its ratio to
`default` (1 device, float32, no depth diagnostics), and what XLA made of it: whether the
optimised program differs from `default`'s at all (an option this jaxlib accepts but does not act
on leaves it the same: such a variant's ratio is noise), and which library each convolution and
dot runs in (`programs`).
"""

from __future__ import annotations

import collections
import json
import re
import statistics
import sys

from resnet_jax.cli import ArgumentParser

EXAMPLE = "--variant='onednn={\"xla_cpu_use_onednn\": true}'"


def parse_variant(text: str) -> tuple[str, dict] | None:
    name, sep, options = text.partition("=")
    try:
        parsed = json.loads(options) if sep and name else None
    except json.JSONDecodeError:
        parsed = None
    return (name, parsed) if isinstance(parsed, dict) else None


def programs(hlo: str) -> str:
    """Where an optimised CPU program's convolutions and dots run, e.g. 'conv: 20 eigen, 40 ynn;
    dot: 2 ynn': the computations that back a library fusion (`__ynn_fusion`, `__onednn...`,
    `__xnn...`) name it; the rest are XLA's own (Eigen) kernels."""
    counts = collections.Counter()
    library = {}  # computation name -> its library, from the fusions that call it
    for line in hlo.splitlines():
        target = re.search(r'"?kind"?[:=]"?(__\w+?)_fusion', line)
        called = re.search(r"calls=(%?[\w.\-]+)", line)
        if target and called:
            library[called.group(1).lstrip("%")] = target.group(1).strip("_")
    where = "eigen"
    for line in hlo.splitlines():
        head = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head:
            where = library.get(head.group(1), "eigen")
        for op in ("convolution", "dot"):
            if re.search(rf"\s{op}\(", line):
                counts[op, where] += 1
    return "; ".join(f"{op}: " + ", ".join(f"{n} {lib}" for (o, lib), n in sorted(counts.items())
                                          if o == op)
                     for op in ("convolution", "dot") if any(o == op for o, _ in counts))


def computations(hlo: str) -> str:
    """An optimised program's computations, without its source locations (file and stack-frame
    tables, `metadata={...}`): two compilations of one program from different call sites, or
    one read back from the compilation cache, compare equal."""
    body = hlo[hlo.find("\n%"):] if "\n%" in hlo else hlo[hlo.find("\nENTRY"):]
    return re.sub(r", metadata=\{[^{}]*\}", "", body)


def main(argv=None) -> int:
    parser = ArgumentParser("benchmarks.xla_options", __doc__)
    parser.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth (6n+2)")
    parser.add_argument("--batch", type=int, default=128, help="images per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times every variant is timed, interleaved")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="XLA options added to the project's, as a JSON object; repeatable")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"xla_options: error: {message}", file=sys.stderr)
        return 2

    import jax

    from resnet_jax import bench, parallel
    from resnet_jax.configs import cifar

    base = parallel.compiler_options(jax.devices()[0].platform) or {}
    variants = {"default": dict(base), "xla": {}}
    for text in args.variant:
        parsed = parse_variant(text)
        if parsed is None:
            return fail(f"--variant={text!r} is not NAME=JSON object: pass e.g. {EXAMPLE}")
        variants[parsed[0]] = {**base, **parsed[1]}

    config = cifar.get_config(f"depth={args.depth}")
    config.batch_size, config.num_devices, config.log_diagnostics = args.batch, 1, False
    runs, hlo = {}, {}
    for name, options in variants.items():
        try:
            _, state, step, batch = bench.prepare(config, xla_options=options)
            step = step.lower(state, batch).compile()
            hlo[name] = step.as_text()
        except jax.errors.JaxRuntimeError as e:
            return fail(f"variant {name} does not compile ({str(e).splitlines()[0]}): "
                        "fix or drop its options")
        except ValueError as e:  # a config this project refuses, e.g. depth not 6n+2
            return fail(str(e))
        runs[name] = [step, state, batch]

    rates = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            step, state, batch = run
            state, _ = bench.time_steps(step, state, batch, 1)  # untimed: clears the caches
            run[1], seconds = bench.time_steps(step, state, batch, args.steps)
            rates[name].append(args.batch / seconds)

    reference = statistics.median(rates["default"])
    print(f"ResNet-{args.depth}, batch {args.batch}, {jax.devices()[0].device_kind}, "
          f"JAX {jax.__version__}, {args.rounds} rounds of {args.steps} steps")
    print("| variant | median images/s | x default | per round | program | programs |\n"
          "|---|---:|---:|---|---|---|")
    for name, values in rates.items():
        median = statistics.median(values)
        same = "default" if name == "default" else (
            "same as default" if computations(hlo[name]) == computations(hlo["default"])
            else "differs")
        print(f"| {name} | {median:.1f} | {median / reference:.2f} | "
              f"{', '.join(f'{v:.0f}' for v in values)} | {same} | {programs(hlo[name])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
