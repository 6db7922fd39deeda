"""The command line, kept thin: parse flags, call `train.train_and_evaluate` or `summary`.

    resnet-jax train   --config=resnet_jax/configs/cifar.py:depth=56,residual=false --workdir=DIR
    resnet-jax summary [--config=...] [--json]
    resnet-jax eval    --workdir=DIR [--step=N] [--dataset=NAME]
    resnet-jax --help, resnet-jax COMMAND --help: the commands, a command's flags

Config flags are ml_collections': `--config=FILE[:ARGS]` then `--config.KEY=VALUE` overrides.
Bad input ends in one line naming the problem and the fix, with exit status 2.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import json
import logging
import os
import pathlib
import re
import select
import signal
import sys
import textwrap
from collections.abc import Callable

from absl import flags
from ml_collections import ConfigDict, config_flags

from resnet_jax import allocator, cli, peers
from resnet_jax.errors import USER_ERRORS, ConfigError

# Every flag of every command: name -> (absl DEFINE_*, default, value shown in help, help line).
# Each command defines only its own (COMMANDS), so that another command's flag is refused.
FLAGS = {
    "config": (None, None, "FILE[:ARGS]", "config file and get_config's arguments, e.g. "
               "resnet_jax/configs/cifar.py:depth=56,residual=false; then --config.KEY=VALUE"),
    "workdir": (flags.DEFINE_string, None, "DIR", "the run's directory: config.json, "
                "metrics.jsonl, checkpoints/, tensorboard/, summary.json"),
    "json": (flags.DEFINE_bool, False, "", "print one JSON object instead of a table"),
    "depths": (flags.DEFINE_list, [], "D,D,...", "these depths instead of the config's"),
    "seeds": (flags.DEFINE_list, [], "K,K,...", "also time K seeds trained at once in one "
              "program, for each K given (e.g. 1,8)"),
    "steps": (flags.DEFINE_integer, 20, "N", "timed steps per net (default 20)"),
    "step": (flags.DEFINE_integer, None, "N", "the checkpoint to evaluate (default: the latest)"),
    "restart": (flags.DEFINE_bool, False, "", "when the workdir's checkpoints exist but none "
                "can be read, set them aside (<step>.damaged) and train from step 0"),
    "dataset": (flags.DEFINE_string, None, "NAME", "evaluate on this dataset instead of the "
                "run's: same classes and image shape, e.g. folder:/data/cifar10.1"),
}
CONFIG_DIR = pathlib.Path(__file__).parent / "configs"

class UsageError(Exception):
    pass


def _resolve_config_path(argv: list[str]) -> list[str]:
    """Lets `--config=resnet_jax/configs/cifar.py` work from any directory once installed."""
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            path, sep, rest = arg[len("--config="):].partition(":")
            if not pathlib.Path(path).exists() and (CONFIG_DIR / pathlib.Path(path).name).exists():
                arg = f"--config={CONFIG_DIR / pathlib.Path(path).name}{sep}{rest}"
        out.append(arg)
    return out


def parse_flags(argv: list[str], command: str):
    """`command`'s flags, fresh per call (so tests can call main() repeatedly): (config or None,
    flags). An argument that is not a flag is refused: absl would return it unused."""
    argv = ["resnet-jax", *_resolve_config_path(argv)]
    fv = flags.FlagValues()
    config_flag = None
    for name in COMMANDS[command].flags:
        define, default, _, help_ = FLAGS[name]
        if name == "config":
            config_flag = config_flags.DEFINE_config_file(
                name, None, help_, flag_values=fv, lock_config=True, sys_argv=argv)
        else:
            define(name, default, help_, flag_values=fv)
    try:
        stray = fv(argv)[1:]
        if stray:
            raise UsageError(_stray_message(stray, command))
        config = config_flag.value if config_flag is not None else None
        if config is not None:
            config.keys()  # a config file that failed to load raises only when first used
            if not isinstance(config, ConfigDict):  # a dict: every key is read as an attribute
                raise UsageError(f"get_config() of {_config_path(argv)} returned a "
                                 f"{type(config).__name__}, not an ml_collections.ConfigDict: "
                                 "return ml_collections.ConfigDict(...), as resnet_jax/configs/"
                                 "cifar.py does")
        return config, fv
    except OSError:
        raise UsageError(f"config file {_config_path(argv)} not found: pass --config=resnet_jax/"
                         "configs/cifar.py[:ARGS] or another file in resnet_jax/configs/") from None
    except (AttributeError, KeyError) as e:  # ml_collections' answer to an unknown --config.KEY
        if "has no attribute 'get_config'" in str(e):  # a Python file, but no config file
            raise UsageError(f"{_config_path(argv)} has no get_config(): pass a config file, "
                             "e.g. --config=resnet_jax/configs/cifar.py[:ARGS]") from None
        text = str(e).replace("\\", "")
        key = re.search(r"[A-Za-z_][\w.]*", text)
        hint = re.search(r'Did you mean "([\w.]+)"', text)
        raise UsageError(
            f"config key {key.group(0) if key else text!r} does not exist"
            + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
            + ": use a key of the config file (resnet_jax/configs/)") from None
    except flags.UnrecognizedFlagError as e:
        owners = [n for n, c in COMMANDS.items() if e.flagname in c.flags]
        raise UsageError(
            f"unknown flag --{e.flagname}"
            + (f" (a flag of {' and '.join(owners)})" if owners else "")
            + f": see resnet-jax {command} --help") from None
    except flags.Error as e:
        # An override names its flag in the outer message; an error raised inside get_config
        # arrives wrapped, and its innermost cause says what is wrong.
        if str(e).startswith("flag --config."):
            raise UsageError(str(e).splitlines()[0]) from None
        cause = e
        while cause.__cause__ is not None or (cause.__context__ is not None
                                              and not cause.__suppress_context__):
            cause = cause.__cause__ or cause.__context__
        text = str(cause).strip()
        raise UsageError(text.splitlines()[-1] if text else str(e).splitlines()[0]) from None


def _config_path(argv: list[str]) -> str:
    """The file of the --config flag in `argv`."""
    return next((a.split("=", 1)[1].partition(":")[0] for a in argv
                 if a.startswith("--config=")), "")


def _stray_message(stray: list[str], command: str) -> str:
    """`train ... total_steps=100` would otherwise train all 64k steps: name the argument, and
    the flag it was probably meant to be."""
    key, is_pair, _ = stray[0].partition("=")
    if is_pair and key in COMMANDS[command].flags:
        hint = f"did you mean --{stray[0]}?"
    elif is_pair and "config" in COMMANDS[command].flags:
        hint = f"config keys are set as --config.{stray[0]}"
    else:
        hint = f"resnet-jax {command} takes flags only (resnet-jax {command} --help)"
    return (f"unexpected argument{'s' * (len(stray) > 1)} {', '.join(map(repr, stray))}: "
            + hint)


def _train(argv) -> int:
    if peers.needs_supervisor():  # one of several processes: a peer's death is one line
        return peers.supervise([sys.executable, "-m", "resnet_jax.main", "train", *argv],
                               _workdir(argv))
    peers.stop_with_parent()  # when this is that supervisor's child
    # First of all: a stop signal at any moment before the training loop (whose own handler
    # checkpoints instead) must end the run with its line.
    previous = {s: signal.signal(s, _stop_outside_the_loop) for s in cli.STOP_SIGNALS}
    try:
        config, fv = parse_flags(argv, "train")
        if config is None or fv.workdir is None:
            raise UsageError("train needs --config=FILE[:ARGS] and --workdir=DIR, e.g. "
                             "--config=resnet_jax/configs/cifar.py:depth=20 --workdir=runs/r20")
        from resnet_jax import parallel, train  # imported late: JAX starts only when there is work

        parallel.initialize_distributed()  # a no-op unless launched as several processes
        parallel.use_compilation_cache()
        try:
            train.train_and_evaluate(config, fv.workdir, restart=fv.restart)
        except Exception as e:
            peers.exit_if_lost(e)
            raise
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop_outside_the_loop(signum, frame) -> None:
    """Ends `train` at once, with one line and exit 128 + `signum`, on a stop signal that comes
    before or after its training loop. Not KeyboardInterrupt: raised wherever Python happens to
    be, it is lost inside a callback that JAX runs from the garbage collector (the run then
    trains to its end), and an interpreter unwinding while XLA's threads still run can end in a
    segmentation fault. What the run wrote so far is whole, as after a kill -9 (files are
    renamed into place, checkpoints too, and the lock ends with the process)."""
    with contextlib.suppress(Exception):  # stdout may be mid-write in the code interrupted
        sys.stdout.flush()
    os.write(sys.stderr.fileno(), (
        f"resnet-jax: {cli.stopped(signum)} outside the training loop, so no checkpoint was "
        "taken; rerun the same command to continue\n").encode())
    os._exit(128 + signum)


def _summary(argv) -> int:
    config, fv = parse_flags(argv, "summary")
    from resnet_jax import summary

    if config is None:
        rows = summary.standard_nets()
        if fv.json:
            print(json.dumps({"nets": list(rows)}))
        else:  # a row as each net is counted
            for line in summary.table_lines(rows, ["name", "family", "weighted_layers", "params",
                                                   "macs"], summary.STANDARD_WIDTHS):
                print(line, flush=True)
        return 0
    info = summary.describe_config(config)
    if fv.json:
        print(json.dumps(info))
    else:
        print(summary.format_table(info["layers"], ["path", "kind", "shape", "params"]))
        print(f"\nweighted layers {info['weighted_layers']}  |  parameters {info['params']:,}  |"
              f"  multiply-adds per {'x'.join(map(str, info['image_shape']))} image "
              f"{info['macs']:,}")
    return 0


def _bench(argv) -> int:
    config, fv = parse_flags(argv, "bench")
    if config is None:
        raise UsageError("bench needs --config=FILE[:ARGS], e.g. "
                         "--config=resnet_jax/configs/cifar.py:depth=20 --depths=20,56,110")
    from resnet_jax import bench

    try:
        seeds = [int(k) for k in fv.seeds] or [1]
    except ValueError:
        seeds = [0]
    if min(seeds) < 1:
        raise UsageError(f"--seeds={','.join(fv.seeds)}: pass positive integers, e.g. --seeds=1,8")
    rows = []
    for depth in fv.depths or [config.depth]:
        config = copy.deepcopy(config)
        with config.unlocked():
            try:
                config.depth = int(depth)
            except ValueError:
                raise UsageError(f"--depths has {depth!r}: pass integers, e.g. "
                                 "--depths=20,56,110") from None
        for k in seeds:
            try:
                # 1: the ordinary step; K > 1: K nets in one program (Backend.map_seeds).
                rows.append(bench.measure(config, steps=fv.steps, num_seeds=k if k > 1 else 0))
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if not fv.json:
                print(bench.markdown(rows[-1:]).splitlines()[-1] if len(rows) > 1
                      else bench.markdown(rows), flush=True)
    if fv.json:
        print(json.dumps({"rows": rows}))
    return 0


def _eval(argv) -> int:
    """The final evaluation of training (the whole test and validation splits), on a checkpoint;
    writes only DIR/eval-<step>[-<dataset>].json."""
    _, fv = parse_flags(argv, "eval")
    if fv.workdir is None:
        raise UsageError("eval needs --workdir=DIR of a trained run, e.g. --workdir=runs/r20")
    import jax

    from resnet_jax import data, parallel, pipeline, rundir, step, train, trained

    parallel.use_compilation_cache()
    workdir = pathlib.Path(fv.workdir)
    graphdef, state, config, ds, at = trained.restore_trained(workdir, fv.step)
    preprocessing = trained.read_preprocessing(workdir, config, ds)  # the run's own input
    backend = step.create_backend(config)
    other = fv.dataset if fv.dataset not in (None, config.dataset) else None
    if other is None:
        feed = train.create_feed(config, backend) if ds is None else data.DeviceFeed(
            ds, config, backend)
    else:
        if ds is None or pipeline.is_streamed(other):
            raise UsageError(f"--dataset={other}: eval on another dataset needs in-memory "
                             f"datasets (CIFAR-sized, digits, folders), not {config.dataset} "
                             "and another streamed one")
        evaluated = data.load(other, tfds_data_dir=config.tfds_data_dir or None,
                              image_size=config.image_size)
        have, need = ((d.num_classes, d.test.images.shape[1:]) for d in (evaluated, ds))
        if have != need:
            raise UsageError(
                f"--dataset={other} has {have[0]} classes of {'x'.join(map(str, have[1]))} "
                f"images, but the run in {workdir} learnt {need[0]} classes of "
                f"{'x'.join(map(str, need[1]))} images ({config.dataset}): pass a dataset of "
                "the same classes and image shape")
        feed = data.DeviceFeed(evaluated, config, backend)
    mean = jax.device_put(preprocessing.mean, backend.replicated)
    eval_step = jax.jit(step.make_eval_step(graphdef), compiler_options=backend.compiler_options)
    state = jax.device_put(state, backend.replicated)
    result = {"step": at, "dataset": other or config.dataset}
    try:  # training's final evaluation (`Training.evaluate`), so the numbers are equal
        (numbers,) = step.evaluate(eval_step, state, feed, mean, backend, whole=True)
    finally:
        feed.close()
    result |= {key: float(value) for key, value in numbers.items()}
    slug = "" if other is None else "-" + re.sub(r"[^\w.]+", "_", other).strip("_")
    path = workdir / rundir.eval_json(at, slug)
    if jax.process_index() == 0:
        rundir.write_json(path, result)
    print(f"step {at} on {result['dataset']}: " + ", ".join(
        f"{name} error {result[f'{name}/error']:.2f}% (loss {result[f'{name}/loss']:.4f})"
        for name in feed.eval_names) + f" -> {path}", flush=True)
    return 0


@dataclasses.dataclass(frozen=True)
class Command:
    run: Callable[[list[str]], int]
    usage: str
    about: str  # one line
    flags: tuple[str, ...]  # names in FLAGS
    example: str


COMMANDS = {
    "train": Command(_train, "--config=FILE[:ARGS] --workdir=DIR [--config.KEY=VALUE ...] "
                     "[--restart]", "train one net, resuming its --workdir if it holds a run",
                     ("config", "workdir", "restart"),
                     "resnet-jax train --config=resnet_jax/configs/cifar.py:depth=20,"
                     "dataset=digits --workdir=runs/r20 --config.total_steps=400"),
    "summary": Command(_summary, "[--config=FILE[:ARGS]] [--json]",
                       "layers, parameters and multiply-adds of a net (no config: "
                       "the paper's nets)", ("config", "json"),
                       "resnet-jax summary --config=resnet_jax/configs/cifar.py:depth=56"),
    "bench": Command(_bench, "--config=FILE[:ARGS] [--depths=20,56,110] [--seeds=1,8] "
                     "[--steps=20] [--json]", "time the train step: images/s, compile time, FLOPs",
                     ("config", "depths", "seeds", "steps", "json"),
                     "resnet-jax bench --config=resnet_jax/configs/cifar.py --depths=20,56,110"),
    "eval": Command(_eval, "--workdir=DIR [--step=N] [--dataset=NAME]",
                    "test (and validation) error and loss of a run's checkpoint, "
                    "written to DIR/eval-<step>.json", ("workdir", "step", "dataset"),
                    "resnet-jax eval --workdir=runs/r20 --step=400"),
}


def _help(command: str | None = None) -> str:
    if command is None:
        return "\n".join([
            "usage: resnet-jax COMMAND [--FLAG=VALUE ...]   (resnet-jax COMMAND --help: its flags)",
            "", "commands:", *(f"  {name:<8} {c.about}" for name, c in COMMANDS.items()),
            "", "examples:", *(f"  {c.example}" for c in COMMANDS.values())])
    c = COMMANDS[command]
    lines = [f"usage: resnet-jax {command} {c.usage}", "", c.about[0].upper() + c.about[1:] + ".",
             "", "flags:"]
    for name in c.flags:
        shown = f"--{name}" + (f"={FLAGS[name][2]}" if FLAGS[name][2] else "")
        lines += textwrap.wrap(FLAGS[name][3], 96, initial_indent=f"  {shown:<20}  ",
                               subsequent_indent=" " * 24, break_on_hyphens=False)
    lines += ["", "example:", f"  {c.example}"]
    if command == "train":
        from resnet_jax.configs import cifar

        shown = lambda v: (f"({','.join(map(str, v))})" if isinstance(v, tuple)  # noqa: E731
                           else str(v) if v != "" else "''")
        keys = " ".join(f"{key}={shown(value)}" for key, value in cifar.get_config().items())
        lines += ["", "config keys (--config.KEY=VALUE), with the defaults of "
                  "resnet_jax/configs/cifar.py, which says what each means (ImageNet: "
                  "imagenet.py):",
                  *textwrap.wrap(keys, 96, initial_indent="  ", subsequent_indent="  ",
                                 break_long_words=False, break_on_hyphens=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command itself, not a call from Python
        allocator.preload()
    try:
        status = _main(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # here, not at exit, where a reader that left would be reported
        return status
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        # `resnet-jax --help | head -1`: the reader has what it wanted. Stop as a Unix tool stops
        # on SIGPIPE (Python ignores it), quietly; stdout goes to /dev/null so that the exit's
        # flush of what is left has nowhere to fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe or socket whose reading end was closed: the broken pipe was
    stdout's, not a data loader's or a coordinator's."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no stdout, or one with no file (captured)
        return False


def _raised_by(module: str, name: str) -> type[BaseException]:
    """The exception class `module.name` when a command has imported `module`, else one nothing
    raises: what a module never imported cannot have raised. Used as an except clause's type,
    which Python evaluates only when an exception arrives, so that `summary` does not import
    the training stack (Orbax, optax, grain) just to name the errors it might catch."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name) if loaded is not None else _NeverRaised


class _NeverRaised(Exception):
    pass


def _main(argv: list[str]) -> int:
    if argv and argv[0] in ("--help", "-h", "help"):
        if argv[1:2] and argv[1] not in COMMANDS:
            argv = argv[1:]  # an unknown command, said below
        else:
            print(_help(argv[1] if argv[1:2] else None))
            return 0
    if not argv or argv[0] not in COMMANDS:
        said = f"unknown command {argv[0]!r}" if argv else "no command"
        print(f"resnet-jax: error: {said}: use {', '.join(COMMANDS)} (resnet-jax --help)",
              file=sys.stderr)
        return 2
    if "--help" in argv or "-h" in argv:
        print(_help(argv[0]))
        return 0
    try:
        return COMMANDS[argv[0]].run(argv[1:])
    except (UsageError, *USER_ERRORS) as e:
        print(f"resnet-jax: error: {e}", file=sys.stderr)
        _nothing_more_at_exit()
        return 2
    except _raised_by("resnet_jax.checkpoint", "Preempted") as e:
        print(f"resnet-jax: {e}", file=sys.stderr)
        return 128 + e.signum  # 143 for SIGTERM, what schedulers expect; 130 for SIGINT
    except KeyboardInterrupt:  # Ctrl-C in another command (train stops at once instead)
        print("resnet-jax: interrupted (SIGINT)", file=sys.stderr)
        return 130
    except OSError as e:
        if isinstance(e, BrokenPipeError) and _stdout_reader_gone():
            raise  # no error of the command: main stops quietly
        print(f"resnet-jax: error: {_describe_os_error(e, argv)}", file=sys.stderr)
        _nothing_more_at_exit()
        return 2


def _nothing_more_at_exit() -> None:
    """Keeps the error line the last one: a checkpoint Orbax failed to restore leaves its other
    reads as coroutines, which Python finalises at exit and reports as 'Exception ignored in
    <coroutine ...>' with a TensorStore spec of some 40 lines (tests/test_faults.py)."""
    sys.unraisablehook = lambda unraisable: None
    logging.disable(logging.CRITICAL)  # asyncio's "Task exception was never retrieved", too


def _workdir(argv: list[str]) -> str:
    """The --workdir in `argv` (unparsed), or ""."""
    return next((b if a == "--workdir" else a.split("=", 1)[1]
                 for a, b in zip(argv, [*argv[1:], ""])
                 if a == "--workdir" or a.startswith("--workdir=")), "")


# Errors only a write raises: a full disk or quota, a read-only file system, a too large file.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _describe_os_error(e: OSError, argv: list[str]) -> str:
    """One line for an OSError no one turned into a clearer error. A failed write (a full disk,
    a workdir that stopped being writable mid-run) says what is kept and how to go on; anything
    else, a read above all, names its own file and reason."""
    name, workdir = str(e.filename or ""), _workdir(argv)
    in_workdir = bool(name and workdir) and pathlib.Path(name).resolve().is_relative_to(
        pathlib.Path(workdir).resolve())
    if e.errno in WRITE_ERRNOS or (in_workdir and e.errno in (errno.EACCES, errno.EPERM)):
        return (f"could not write {name or workdir}: {e.strerror or e}: free space or pass a "
                "--workdir you can write to; the run's last complete checkpoint is kept")
    return f"{name}: {e.strerror or e}" if name else str(e)


if __name__ == "__main__":
    sys.exit(main())
