"""A sweep as declared: its runs (`Run`: a config file, its argument string and overrides) and
the report's defaults (`Sweep`), and the config and sweep files they are read from.

Sweep files (experiments/sweeps/) build on this module, the runner trains its runs and sweep.py
declares them from the command line. Standard library only at import: a launcher lists a study's
runs (`python -m experiments.sweep --sweep=FILE --list`) with any Python.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import sys

from experiments.sweep_root import REPO

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
        config = config_module(self.config).get_config(self.arg)
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


def find(spec: str, what: str) -> pathlib.Path:
    """A config or sweep file as given (from here), else from the checkout; else a SweepError."""
    for path in (pathlib.Path(spec), REPO / spec):
        if path.is_file():
            return path.resolve()
    raise SweepError(f"{what} {spec} does not exist: give a path from here or from {REPO}")


def import_file(path: pathlib.Path, name: str):
    """The Python file at `path` as a module named `name`."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # sweep files import experiments.sweeps.presets
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_config_modules = {}  # (path, mtime): the config file, run once however many runs it serves


def config_module(config: str):
    """The config file `config` (a path from here or from the checkout), imported."""
    path = find(config, "config file")
    key = (path, path.stat().st_mtime_ns)
    if key not in _config_modules:
        _config_modules[key] = import_file(path, "sweep_config")
    return _config_modules[key]
