"""Run any sweep, declared in a sweep file or on the command line, on the hardware at hand.

    python -m experiments.sweep --sweep=experiments/sweeps/degradation.py:preset=digits --root=runs/deg
    python -m experiments.sweep --grid=depth=20,56 --grid=learning_rate=0.02,0.05 --seeds=3 \\
        --config=resnet_jax/configs/cifar.py:dataset=digits --config.total_steps=400 --root=runs/lr
    python -m experiments.sweep --sweep=... --root=DIR --devices-per-run=1   # one run per GPU
    python -m experiments.sweep --sweep=... --root=DIR --dry-run              # the plan only

A sweep file (experiments/sweeps/*.py) has `get_sweep(arg)`, `arg` being the text after the
colon, returning a list of `Run(arg, overrides, config=...)`: a config file's argument string and
config overrides, or a `Sweep(runs, report={...})` that also sets the report's defaults. A grid
(`--grid=KEY=V1,V2,...`, repeated; `--seeds=N`) is every combination, on the config of
`--config=FILE[:ARGS]`; keys the config file takes as arguments (depth, residual, seed, ...) go
after its colon, the others are overrides. `--config.KEY=VALUE` overrides every run of any sweep.

Each run trains in ROOT/<name>, its name being its argument string (plus the overrides that tell
it apart from a run of the same argument), so the directory says what ran. Rerunning a sweep
trains only what is missing (finished runs are skipped, interrupted ones resume); a failed run is
named with its reason and the others go on, with exit status 2 at the end. A second sweep into a
ROOT in use is refused (ROOT/sweep.lock; --index and --shard sweeps share it). Once every run has
trained or failed, `experiments.report` writes the sweep's table and figures into ROOT (its
defaults: ROOT/sweep.json, written here). Where runs train:
  (default)            one after another in this process, over every local device;
  --processes=N        N at a time, each a process over every local device;
  --devices-per-run=K  one run per K local accelerators at a time, each pinned to its own
                       (CUDA_VISIBLE_DEVICES, TPU_VISIBLE_CHIPS, or simulated CPU devices: see
                       experiments/placement.py); --devices=0,1,... to choose them;
  --index=I, --shard=I/N   run I of --list only, or every N-th run from I (job arrays, hosts):
                       launch/slurm.sh and launch/tpu.sh build on these.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import pathlib
import sys

from experiments import placement
from experiments.common import SWEEP_JSON
from experiments.runner import (FAILURE, REPO, Stopped, failures, is_finished,
                                latest_checkpoint)
from resnet_jax import allocator
from resnet_jax.cli import ArgumentParser

DEFAULT_CONFIG = "resnet_jax/configs/cifar.py"


class SweepError(ValueError):
    """A sweep that cannot run as declared. str(e) is one line naming the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Run:
    arg: str  # e.g. "depth=56,residual=false,seed=1": the config file's argument string
    overrides: dict = dataclasses.field(default_factory=dict)
    config: str = DEFAULT_CONFIG
    dirname: str = ""  # set by `named` where the argument alone does not tell runs apart

    @property
    def name(self) -> str:
        return self.dirname or self.arg.replace("/", "_").replace(":", "_")

    def build(self):
        """The run's ConfigDict: the config file's get_config(arg) plus the overrides. An
        unknown key or a value of the wrong type is a SweepError."""
        config = _config_module(self.config).get_config(self.arg)
        for key, value in self.overrides.items():
            if key not in config:
                raise SweepError(f"run {self.name}: unknown config key {key!r}: "
                                 f"use one of {', '.join(sorted(config))}")
            try:
                config[key] = tuple(value) if isinstance(value, list) else value
            except (TypeError, ValueError) as e:
                raise SweepError(f"run {self.name}: {key}={value!r} does not fit the config's "
                                 f"{type(config[key]).__name__} ({e})") from None
        return config

    def command(self, workdir: pathlib.Path) -> list[str]:
        """The same run as a `resnet-jax train` command line."""
        cmd = [sys.executable, "-m", "resnet_jax.main", "train",
               f"--config={REPO / self.config}:{self.arg}", f"--workdir={workdir}"]
        for key, value in self.overrides.items():
            value = f"({','.join(map(str, value))},)" if isinstance(value, (tuple, list)) else value
            cmd.append(f"--config.{key}={value}")
        return cmd


@dataclasses.dataclass(frozen=True)
class Sweep:
    runs: list
    # experiments.report's defaults: by, x, panels, metric, title, reference (its docstring)
    report: dict = dataclasses.field(default_factory=dict)


# --- Declaring --------------------------------------------------------------------------------


def _path(spec: str, what: str) -> pathlib.Path:
    """A config or sweep file as given (from here), else from the checkout."""
    for path in (pathlib.Path(spec), REPO / spec):
        if path.is_file():
            return path.resolve()
    raise SweepError(f"{what} {spec} does not exist: give a path from here or from {REPO}")


def _import(path: pathlib.Path, name: str):
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # sweep files import experiments.sweeps.presets
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_config_modules = {}  # (path, mtime): the config file, run once however many runs it serves


def _config_module(config: str):
    path = _path(config, "config file")
    key = (path, path.stat().st_mtime_ns)
    if key not in _config_modules:
        _config_modules[key] = _import(path, "sweep_config")
    return _config_modules[key]


def load_sweep(spec: str) -> Sweep:
    """FILE[:ARG] -> the file's get_sweep(ARG), as a Sweep."""
    path, _, arg = spec.partition(":")
    module = _import(_path(path, "sweep file"), "sweep_file")
    if not callable(getattr(module, "get_sweep", None)):
        raise SweepError(f"sweep file {path} has no get_sweep(arg): define one that returns the "
                         "runs (see experiments/sweeps/)")
    try:
        sweep = module.get_sweep(arg or None)
    except ValueError as e:
        raise SweepError(f"{spec}: {e}") from None
    sweep = sweep if isinstance(sweep, Sweep) else Sweep(list(sweep))
    bad = [r for r in sweep.runs if not isinstance(r, Run)]
    if bad:
        raise SweepError(f"{path}: get_sweep returned {bad[0]!r}, not a Run: return "
                         "Run(arg, overrides) for each run")
    return sweep


def split_values(raw: str) -> list[str]:
    """'20,56' -> ['20', '56']; commas inside parentheses stay: '(1,2),(3,4)'."""
    out, depth, current = [], 0, ""
    for char in raw:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += char
    return out + [current]


def parse_value(key: str, raw: str, default):
    """A command-line value as the type of the config's `default`; a SweepError otherwise."""
    raw = raw.strip()
    kind = type(default)
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if kind in (tuple, list):
            element = type(default[0]) if default else int
            items = [v for v in raw.strip("()[]").split(",") if v.strip()]
            return tuple(parse_value(key, v, element()) for v in items)
        return kind(raw) if kind in (int, float) else raw
    except (ValueError, SweepError):
        raise SweepError(f"{key}={raw} is not {'true or false' if kind is bool else 'a ' + kind.__name__}"
                         f" (the config's {key} is {default!r})") from None


def grid_sweep(config: str, grid: list[str], seeds: int | None) -> Sweep:
    """Every combination of the `--grid=KEY=V1,V2` values (and seeds 0..seeds-1) on `config`."""
    path, _, base_arg = config.partition(":")
    module = _config_module(path)
    arg_keys = getattr(module, "ARGS", {})
    base = module.get_config(base_arg or None)
    axes: dict[str, list[str]] = {}
    for item in grid:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SweepError(f"--grid={item} is not KEY=V1,V2,...: e.g. --grid=depth=20,56")
        if key not in arg_keys and key not in base:
            raise SweepError(f"--grid={item}: unknown key {key!r}: use a config key, e.g. "
                             f"{', '.join(sorted(set(arg_keys) | set(base))[:12])}, ...")
        if key in axes:
            raise SweepError(f"--grid={key}=... is given twice: give each key once, "
                             "with all its values")
        values = [v.strip() for v in split_values(raw) if v.strip()]
        if not values:
            raise SweepError(f"--grid={item} has no values: e.g. --grid={key}=V1,V2")
        axes[key] = values
    if seeds is not None:
        if "seed" in axes:
            raise SweepError("--seeds and --grid=seed=... both set the seeds: use one")
        axes["seed"] = [str(s) for s in range(seeds)]
    if not axes:
        raise SweepError("the sweep has no runs: give --grid=KEY=V1,V2,... (and --seeds=N) or "
                         "--sweep=FILE")
    base_items = [i for i in filter(None, (base_arg or "").split(","))
                  if i.partition("=")[0].strip() not in axes]
    runs = []
    for values in itertools.product(*axes.values()):
        chosen = dict(zip(axes, values))
        arg = ",".join(base_items + [f"{k}={v}" for k, v in chosen.items() if k in arg_keys])
        overrides = {k: parse_value(k, v, base[k]) for k, v in chosen.items()
                     if k not in arg_keys}
        runs.append(Run(arg, overrides, config=path))
    by = [k for k in axes if k != "seed" and len(axes[k]) > 1]
    return Sweep(runs, report={"by": by} if by else {})


def named(runs: list[Run]) -> list[Run]:
    """Runs of the same argument string get the overrides that tell them apart in their name
    (e.g. 'depth=20,seed=0,learning_rate=0.05'). Two runs left with one name are a SweepError."""
    by_arg: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        by_arg.setdefault(run.name, []).append(i)
    out = list(runs)
    for indices in by_arg.values():
        keys = [k for k in dict.fromkeys(k for i in indices for k in runs[i].overrides)
                if len({repr(runs[i].overrides.get(k)) for i in indices}) > 1]
        for i in indices if keys else ():
            suffix = "".join(f",{k}={_text(runs[i].overrides.get(k))}" for k in keys)
            out[i] = dataclasses.replace(runs[i], dirname=(runs[i].name + suffix)
                                         .replace("/", "_").replace(":", "_"))
    seen: dict[str, int] = {}
    for i, run in enumerate(out):
        if run.name in seen:
            raise SweepError(f"runs {seen[run.name]} and {i} of the sweep both train in "
                             f"ROOT/{run.name}: make their arguments or overrides differ")
        seen[run.name] = i
    return out


def _text(value) -> str:
    return f"({','.join(map(str, value))})" if isinstance(value, (tuple, list)) else str(value)


def declare(args, config_overrides: list[str]) -> Sweep:
    """The sweep of the command line: a sweep file or a grid, `--config.KEY=V` on every run,
    each run named."""
    if args.sweep and (args.grid or args.seeds is not None):
        raise SweepError("--sweep and --grid/--seeds both declare runs: use a sweep file or a "
                         "grid (a sweep file takes its own seeds, e.g. :seeds=3)")
    if args.sweep:
        sweep = load_sweep(args.sweep)
    else:
        sweep = grid_sweep(args.config or DEFAULT_CONFIG, args.grid, args.seeds)
    if not sweep.runs:
        raise SweepError(f"the sweep {args.sweep} has no runs: its get_sweep returned none")
    common = {}
    for item in config_overrides:
        key, sep, raw = item[len("--config."):].partition("=")
        if not sep:
            raise SweepError(f"{item} is not --config.KEY=VALUE")
        common[key] = raw
    runs = []
    for run in sweep.runs:
        defaults = _config_module(run.config).get_config(run.arg) if common else {}
        for key in common:
            if key not in defaults:
                raise SweepError(f"--config.{key}: unknown config key {key!r}: use one of "
                                 f"{', '.join(sorted(defaults))}")
        runs.append(dataclasses.replace(run, overrides={
            **run.overrides, **{k: parse_value(k, v, defaults[k]) for k, v in common.items()}}))
    return Sweep(named(runs), sweep.report)


def description(args, config_overrides: list[str]) -> str:
    if args.sweep:
        words = [f"--sweep={args.sweep}"]
    else:
        words = [f"--config={args.config or DEFAULT_CONFIG}"] + [f"--grid={g}" for g in args.grid]
        words += [f"--seeds={args.seeds}"] if args.seeds is not None else []
    return " ".join(words + config_overrides)


# --- Checking ---------------------------------------------------------------------------------


def build_and_check(runs: list[Run]) -> dict:
    """Every run's ConfigDict by name, each checked as `resnet-jax train` checks it: a bad run
    stops the sweep before anything trains."""
    from resnet_jax.train import ConfigError, check_config

    configs = {}
    for run in runs:
        try:
            configs[run.name] = config = run.build()
        except ValueError as e:  # the config file's own argument check
            raise SweepError(f"run {run.name}: {e}") from None
        try:
            check_config(config)
        except ConfigError as e:
            raise SweepError(f"run {run.name}: {e}") from None
    return configs


def check_report(report: dict, configs: dict) -> None:
    """The report's keys (by, x, panels) must be config keys of the runs, checked before they
    train rather than after."""
    keys = set.intersection(*(set(c) for c in configs.values()))
    named = [*report.get("by", []), *(report[k] for k in ("x", "panels") if report.get(k))]
    unknown = [k for k in named if k not in keys]
    if unknown:
        raise SweepError(f"the sweep's report groups by {unknown[0]!r}, which is not a config key "
                         f"of its runs: use e.g. {', '.join(sorted(keys)[:8])}, ...")


def check_root(root: pathlib.Path, runs: list[Run], configs: dict) -> None:
    """Refuses a ROOT that holds runs this sweep does not declare (another sweep's), or a run of
    this sweep's name trained with another config (its non-resumable keys)."""
    from resnet_jax.train import read_run_json, resume_changes

    if root.exists() and not root.is_dir():
        raise SweepError(f"--root={root} is a file: give a directory")
    names = {run.name for run in runs}
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and any(
        (p / f).exists() for f in ("config.json", FAILURE, "checkpoints"))) if root.is_dir() else []
    foreign = [name for name in present if name not in names]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise SweepError(f"{root} holds runs that are not in this sweep ({foreign[0]}{more}): "
                         "another sweep's; give this sweep a --root of its own")
    for run in runs:
        saved = root / run.name / "config.json"
        if saved.exists():
            changed = resume_changes(read_run_json(saved), json.loads(configs[run.name].to_json()))
            if changed:
                raise SweepError(f"{saved.parent} was trained with another {', '.join(changed)} "
                                 "than this sweep declares: give the sweep a new --root, or "
                                 "remove that run's directory to train it again")


def select(runs: list[Run], index: int | None, shard: str | None) -> list[Run]:
    """Run `index` of the list, or the runs of shard 'I/N' (every N-th from I), or all."""
    if index is not None:
        if not 0 <= index < len(runs):
            raise SweepError(f"--index={index} is out of range: this sweep has runs 0 to "
                             f"{len(runs) - 1} (see --list)")
        return [runs[index]]
    if shard is not None:
        i, sep, n = shard.partition("/")
        if not (sep and i.isdigit() and n.isdigit() and int(i) < int(n)):
            raise SweepError(f"--shard={shard} is not I/N with 0 <= I < N: e.g. --shard=0/4")
        return runs[int(i)::int(n)]
    return runs


def make_slots(args) -> list[placement.Slot] | None:
    """Where runs train: None (this process), N shared slots, or pinned ones."""
    if args.processes < 1:
        raise SweepError(f"--processes={args.processes}: use 1 or more")
    if args.devices_per_run is not None and args.processes > 1:
        raise SweepError("--processes and --devices-per-run both say how many runs train at "
                         "once: use one (--devices-per-run runs one per device group)")
    if (args.devices or args.platform) and args.devices_per_run is None:
        raise SweepError("--devices and --platform place runs: add --devices-per-run=K")
    try:
        if args.devices_per_run is not None:
            platform, found = placement.local_accelerators(args.platform)
            devices = [d for d in args.devices.split(",") if d] if args.devices else found
            return placement.slots(platform, devices, args.devices_per_run)
        if args.processes > 1:
            platform, _ = placement.local_accelerators()
            return [placement.Slot(platform, (), placement.shared_env(platform))] * args.processes
    except ValueError as e:
        raise SweepError(str(e)) from None
    return None


def plan(runs: list[Run], configs: dict, root: pathlib.Path, slots, everything: int) -> str:
    """--dry-run: each run's state and where it would train; nothing is written."""
    failed = failures(root) if root.is_dir() else {}
    lines = [f"{len(runs)} of {everything} runs under {root}, "
             + (f"{len(slots)} at a time: " + "; ".join(
                 f"{s.describe() if s.devices else 'all local devices'}"
                 + (f" ({' '.join(f'{k}={v}' for k, v in s.env.items())})" if s.env else "")
                 for s in slots) if slots else "one after another in this process")]
    for run in runs:
        workdir = root / run.name
        if is_finished(workdir, configs[run.name].total_steps):
            state = "finished"
        elif run.name in failed:
            state = f"failed before ({failed[run.name]}): trains again"
        elif latest_checkpoint(workdir) is not None:
            state = f"resumes from step {latest_checkpoint(workdir)}"
        else:
            state = "trains"
        lines.append(f"  {run.name}: {state}")
        if slots and state != "finished":
            lines.append("    " + " ".join(run.command(workdir)))
    return "\n".join(lines)


def _first_process() -> bool:
    """Whether this is process 0 of a multi-process sweep (or the only one): it writes
    sweep.json. Asks JAX only when JAX found the job itself (RESNET_JAX_DISTRIBUTED)."""
    if os.environ.get("RESNET_JAX_DISTRIBUTED") == "1":
        import jax

        return jax.process_index() == 0
    return os.environ.get("JAX_PROCESS_ID", "0") == "0"


# --- The command line -------------------------------------------------------------------------


def main(argv=None) -> int:
    if argv is None:  # the command itself, not a call from Python
        allocator.preload()
    from experiments.runner import run_sweep

    argv = list(sys.argv[1:] if argv is None else argv)
    config_overrides = [a for a in argv if a.startswith("--config.")]
    argv = [a for a in argv if not a.startswith("--config.")]
    parser = ArgumentParser("experiments.sweep", __doc__)
    parser.add_argument("--sweep", metavar="FILE[:ARG]",
                        help="a sweep file and its get_sweep argument, e.g. "
                             "experiments/sweeps/degradation.py:preset=digits")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="one axis of a grid sweep; repeat for more")
    parser.add_argument("--seeds", type=int, metavar="N", help="grid: seeds 0 to N-1")
    parser.add_argument("--config", metavar="FILE[:ARGS]",
                        help=f"grid: the config of every run (default: {DEFAULT_CONFIG}); "
                             "--config.KEY=VALUE overrides any sweep's runs")
    parser.add_argument("--root", help="directory of the sweep's runs, tables and figures")
    parser.add_argument("--processes", type=int, default=1, help="runs trained at once, each "
                        "over every local device")
    parser.add_argument("--devices-per-run", type=int, metavar="K",
                        help="one run per K local accelerators at a time, pinned to them")
    parser.add_argument("--devices", metavar="ID,ID,...", help="with --devices-per-run: these "
                        "local accelerators (default: every one found)")
    parser.add_argument("--platform", choices=placement.PLATFORMS, help="with --devices-per-run:"
                        " place on this platform instead of the one found")
    parser.add_argument("--seeds-per-program", type=int, default=1,
                        help="train up to this many seeds of one net in one program, in this "
                             "process (vmapped on GPU/TPU, a loop on CPU)")
    parser.add_argument("--list", action="store_true", help="print the runs' names, one a line")
    parser.add_argument("--index", type=int, help="train run INDEX of --list only")
    parser.add_argument("--shard", metavar="I/N", help="train every N-th run from run I only")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, train nothing")
    parser.add_argument("--no-report", action="store_true", help="train, write no report")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds={args.seeds}: use 1 or more")
    if not (args.list or args.root):
        parser.error("--root is required: the directory of the sweep's runs")
    root = pathlib.Path(args.root or ".")
    try:
        sweep = declare(args, config_overrides)
    except SweepError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    if args.list:  # a launcher's count of the runs: no JAX needed for a sweep file's list
        print("\n".join(run.name for run in sweep.runs))
        return 0
    from resnet_jax.train import ConfigError

    try:
        configs = build_and_check(sweep.runs)
        check_report(sweep.report, configs)
        chosen = select(sweep.runs, args.index, args.shard)
        check_root(root, sweep.runs, configs)
        slots = make_slots(args)
        if args.dry_run:
            print(plan(chosen, configs, root, slots, len(sweep.runs)))
            return 0
    except (SweepError, ConfigError) as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    partial = args.index is not None or args.shard is not None
    return run_sweep_command(
        lambda: run_sweep(chosen, configs, root, slots=slots,
                          seeds_per_program=args.seeds_per_program),
        root, {"sweep": description(args, config_overrides), "runs": [r.name for r in sweep.runs],
               "report": sweep.report}, report=not (partial or args.no_report),
        total=len(chosen), partial=partial)


def run_sweep_command(train, root: pathlib.Path, declared: dict, *, report: bool,
                      total: int, partial: bool = False) -> int:
    """Joins a multi-process job when launched as one, locks ROOT, writes ROOT/sweep.json, calls
    `train()`, then the report once every run has trained or failed; a stopped sweep in one
    line, failed runs in one line each after the report. The exit status.

    The lock refuses a second sweep into ROOT while this one runs: each would take the other's
    runs, in use, for failed ones. `partial` (some runs: --index, --shard) shares it with other
    partial sweeps, as a job array's tasks train into one ROOT at once."""
    import contextlib

    from resnet_jax import parallel
    from resnet_jax.checkpoint import WorkdirBusy, WorkdirLock
    from resnet_jax.data import DataError
    from resnet_jax.files import write_atomically
    from resnet_jax.train import ConfigError

    def write_report() -> int:
        """The report of the runs that trained; a bad report section of the sweep file or a
        damaged run file: one line, 2."""
        from experiments.report import report as write

        try:
            write(root)
        except (ConfigError, ValueError) as e:
            print(f"sweep: error: the report: {e}", file=sys.stderr)
            return 2
        return 0

    with contextlib.ExitStack() as held:  # ROOT's lock, to the report's end
        try:
            parallel.initialize_distributed()  # a no-op unless launched as several processes
            parallel.use_compilation_cache()  # its subprocesses' `resnet-jax train` too
            if _first_process():
                root.mkdir(parents=True, exist_ok=True)
            held.enter_context(WorkdirLock(root, user="sweep", shared=partial))
            if _first_process():
                write_atomically(root / SWEEP_JSON, json.dumps(declared, indent=2) + "\n")
            train()
        except (WorkdirBusy, ConfigError, DataError, ValueError) as e:
            print(f"sweep: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"sweep: error: {e.strerror or e}: {e.filename or root}", file=sys.stderr)
            return 2
        except Stopped as e:
            if e.exit_status == 2 and report and len(e.failed) < total and _first_process():
                write_report()  # of the runs that trained
            print(f"sweep: {e}", file=sys.stderr)
            return e.exit_status
        except KeyboardInterrupt:  # between runs (a run's own loop checkpoints and stops instead)
            print("sweep: interrupted (SIGINT); rerun the sweep to finish what is missing",
                  file=sys.stderr)
            return 130
        return write_report() if report and _first_process() else 0


if __name__ == "__main__":  # as experiments.sweep, the module sweep files import Run from
    from experiments.sweep import main as sweep_main

    sys.exit(sweep_main())
