"""The command line, kept thin: parse flags, call `train.train_and_evaluate` or `summary`.

    resnet-jax train   --config=resnet_jax/configs/cifar.py:depth=56,residual=false --workdir=DIR
    resnet-jax summary [--config=...] [--json]

Config flags are ml_collections': `--config=FILE[:ARGS]` then `--config.KEY=VALUE` overrides.
Bad input ends in one line naming the problem and the fix, with exit status 2.
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
import sys

from absl import flags
from ml_collections import config_flags

USAGE = ("usage: resnet-jax train --config=FILE[:ARGS] --workdir=DIR [--config.KEY=VALUE ...]\n"
         "       resnet-jax summary [--config=FILE[:ARGS]] [--json]\n"
         "       resnet-jax bench --config=FILE[:ARGS] [--depths=20,56,110] [--seeds=1,8] "
         "[--steps=20] [--json]")
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


def _parse(argv: list[str]):
    """Fresh flags per call (so tests can call main() repeatedly): (config or None, flags)."""
    argv = ["resnet-jax", *_resolve_config_path(argv)]
    fv = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. resnet_jax/configs/cifar.py:depth=56,residual=false",
        flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints, summary.",
                        flag_values=fv)
    flags.DEFINE_bool("json", False, "summary, bench: print one JSON object.", flag_values=fv)
    flags.DEFINE_list("depths", [], "bench: these depths instead of the config's.",
                      flag_values=fv)
    flags.DEFINE_integer("steps", 20, "bench: timed steps per net.", flag_values=fv)
    flags.DEFINE_list("seeds", [], "bench: also time K seeds trained at once in one program, "
                      "for each K given (e.g. 1,8).", flag_values=fv)
    try:
        fv(argv)
        config = config_flag.value
        if config is not None:
            config.keys()  # a config file that failed to load raises only when first used
        return config, fv
    except OSError:
        path = next((a.split("=", 1)[1].partition(":")[0] for a in argv
                     if a.startswith("--config=")), "")
        raise UsageError(f"config file {path} not found: pass --config=resnet_jax/configs/"
                         "cifar.py[:ARGS] or another file in resnet_jax/configs/") from None
    except (AttributeError, KeyError) as e:  # ml_collections' answer to an unknown --config.KEY
        text = str(e).replace("\\", "")
        key = re.search(r"[A-Za-z_][\w.]*", text)
        hint = re.search(r'Did you mean "([\w.]+)"', text)
        raise UsageError(
            f"config key {key.group(0) if key else text!r} does not exist"
            + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
            + ": use a key of the config file (resnet_jax/configs/)") from None
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


def _train(argv) -> int:
    config, fv = _parse(argv)
    if config is None or fv.workdir is None:
        raise UsageError("train needs --config=FILE[:ARGS] and --workdir=DIR, e.g. "
                         "--config=resnet_jax/configs/cifar.py:depth=20 --workdir=runs/r20")
    from resnet_jax import parallel, train  # imported late: JAX starts only when there is work

    parallel.initialize_distributed()  # a no-op unless launched as several processes (launch/)
    train.train_and_evaluate(config, fv.workdir)
    return 0


def _summary(argv) -> int:
    config, fv = _parse(argv)
    from resnet_jax import summary

    if config is None:
        rows = summary.standard_nets()
        if fv.json:
            print(json.dumps({"nets": rows}))
        else:
            print(summary.format_table(rows, ["name", "family", "weighted_layers", "params",
                                              "macs"]))
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
    config, fv = _parse(argv)
    if config is None:
        raise UsageError("bench needs --config=FILE[:ARGS], e.g. "
                         "--config=resnet_jax/configs/cifar.py:depth=20 --depths=20,56,110")
    from resnet_jax import bench, train

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
                rows.append(bench.measure(config, steps=fv.steps, seeds=k if k > 1 else 0))
            except ValueError as e:
                raise train.ConfigError(str(e)) from None
            if not fv.json:
                print(bench.markdown(rows[-1:]).splitlines()[-1] if len(rows) > 1
                      else bench.markdown(rows), flush=True)
    if fv.json:
        print(json.dumps({"rows": rows}))
    return 0


COMMANDS = {"train": _train, "summary": _summary, "bench": _bench}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        said = f"unknown command {argv[0]!r}" if argv else "no command"
        print(f"resnet-jax: error: {said}: use train, summary or bench\n{USAGE}", file=sys.stderr)
        return 2
    from resnet_jax.checkpoint import Preempted
    from resnet_jax.data import DataError
    from resnet_jax.train import ConfigError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except (UsageError, ConfigError, DataError, FloatingPointError) as e:
        print(f"resnet-jax: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"resnet-jax: {e}", file=sys.stderr)
        return 143  # 128 + SIGTERM: what schedulers expect of a terminated job
    except OSError as e:  # a full disk or a directory that stopped being writable mid-run
        print(f"resnet-jax: error: could not write {e.filename or ''}: "
              f"{e.strerror or e}: free space or pass a --workdir you can write to; "
              "the run's last complete checkpoint is kept", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
