"""One generic runner for any sweep: a list of runs, each a config argument string plus overrides.

An experiment declares its sweep as data (see `experiments/degradation.py`):

    Run(config="resnet_jax/configs/cifar.py", arg="depth=56,residual=false,seed=1",
        overrides={"total_steps": 4000, "lr_boundaries_steps": (2000, 3000)})

and `run_sweep(runs, root)` trains every run that has no `summary.json` yet in `ROOT/<name>`
(`<name>` is the argument string, so the directory says what ran), resuming interrupted runs from
their checkpoints, one after another in this process or `processes` at once in subprocesses.
It prints progress over the whole sweep: runs done, running, left, and the time left.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


class Stopped(Exception):
    """The sweep stopped before its end (a run was preempted or failed); `exit_status` is the
    run's. Rerunning the sweep trains only what is missing."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


@dataclasses.dataclass(frozen=True)
class Run:
    arg: str  # e.g. "depth=56,residual=false,seed=1": also the run's directory name
    overrides: dict = dataclasses.field(default_factory=dict)
    config: str = "resnet_jax/configs/cifar.py"

    @property
    def name(self) -> str:
        return self.arg.replace("/", "_").replace(":", "_")

    def build(self):
        """The run's ConfigDict: the config file's get_config(arg) plus the overrides."""
        spec = importlib.util.spec_from_file_location("sweep_config", REPO / self.config)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(self.arg)
        for key, value in self.overrides.items():
            config[key] = value
        return config

    def command(self, workdir: pathlib.Path) -> list[str]:
        """The same run as a `resnet-jax train` command line."""
        cmd = [sys.executable, "-m", "resnet_jax.main", "train",
               f"--config={REPO / self.config}:{self.arg}", f"--workdir={workdir}"]
        for key, value in self.overrides.items():
            value = f"({','.join(map(str, value))},)" if isinstance(value, (tuple, list)) else value
            cmd.append(f"--config.{key}={value}")
        return cmd


def is_finished(workdir: pathlib.Path, total_steps: int) -> bool:
    path = workdir / "summary.json"
    return path.exists() and json.loads(path.read_text())["step"] >= total_steps


def run_sweep_command(prog: str, runs: list[Run], root: pathlib.Path, *,
                      processes: int = 1, seeds_per_program: int = 1) -> int:
    """`run_sweep` for an experiment's command line: joins a multi-process job when launched as
    one, and turns a bad config, bad data or a stopped run into one line; the exit status."""
    from resnet_jax import parallel
    from resnet_jax.data import DataError
    from resnet_jax.train import ConfigError

    parallel.initialize_distributed()  # a no-op unless launched as several processes
    try:
        run_sweep(runs, root, processes=processes, seeds_per_program=seeds_per_program)
    except (ConfigError, DataError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_status
    return 0


class Progress:
    """Runs done, running and left over the whole sweep, and the time left: extrapolated by
    cost = iterations x depth, since a 110-layer run is not a 20-layer one."""

    def __init__(self, total: int, todo: dict):
        self.total, self.done = total, total - len(todo)
        self.cost = {name: c.total_steps * c.get("depth", 1) for name, c in todo.items()}
        self.start, self.done_cost, self.running = time.time(), 0, {}

    def finished(self, name: str) -> None:
        self.done, self.done_cost = self.done + 1, self.done_cost + self.cost[name]
        self.running.pop(name, None)
        self.report()

    def report(self) -> None:
        left = self.total - self.done - len(self.running)
        eta = ""
        if self.done_cost:
            remaining = sum(self.cost.values()) - self.done_cost
            eta = (f", about {(time.time() - self.start) / self.done_cost * remaining / 60:.0f}"
                   " min left")
        print(f"[sweep] {self.done}/{self.total} done, {len(self.running)} running, "
              f"{left} left{eta}", flush=True)


def latest_checkpoint(workdir: pathlib.Path) -> int | None:
    ckpts = workdir / "checkpoints"
    steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
    return max(steps, default=None)


def seed_groups(todo: list[Run], configs: dict, root: pathlib.Path, size: int) -> list[list[Run]]:
    """`todo` in groups of at most `size` runs that differ only in their seed and resume from
    the same step: each group trains in one program. Order is kept within and across groups."""
    groups: dict = {}
    for run in todo:
        config = configs[run.name].to_dict()
        config.pop("seed")
        key = (json.dumps(config, sort_keys=True, default=str), latest_checkpoint(root / run.name))
        groups.setdefault(key, []).append(run)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def run_sweep(runs: list[Run], root: pathlib.Path, *, processes: int = 1,
              seeds_per_program: int = 1) -> None:
    """Trains every unfinished run of `runs` under `root`; raises Stopped if one is preempted
    (SIGTERM) or fails. `seeds_per_program=K`: runs that differ only in their seed train K at a
    time in one compiled program (in this process; not with processes > 1)."""
    from resnet_jax import train  # late: a --plot-only caller never starts JAX
    from resnet_jax.checkpoint import Preempted

    if seeds_per_program < 1 or (seeds_per_program > 1 and processes > 1):
        raise ValueError(f"seeds_per_program={seeds_per_program} with processes={processes}: "
                         "use seeds_per_program >= 1, and more than 1 only with one process")
    root.mkdir(parents=True, exist_ok=True)
    configs = {r.name: r.build() for r in runs}
    todo = [r for r in runs if not is_finished(root / r.name, configs[r.name].total_steps)]
    progress = Progress(len(runs), {r.name: configs[r.name] for r in todo})
    progress.report()
    if processes <= 1:
        for group in seed_groups(todo, configs, root, seeds_per_program):
            names = [run.name for run in group]
            for name in names:
                progress.running[name] = None
            print(f"[sweep] {', '.join(names)}", flush=True)
            try:
                train.train_runs([configs[n] for n in names], [str(root / n) for n in names])
            except Preempted as e:
                raise Stopped(f"{e} (runs {', '.join(names)}); rerun the sweep to finish them",
                              143) from None
            for name in names:
                progress.finished(name)
        return

    queue = list(todo)

    def pass_on_sigterm(signum, frame):  # the runs checkpoint and stop; the loop sees them go
        queue.clear()
        for proc, _ in progress.running.values():
            proc.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, pass_on_sigterm)
    try:
        _run_in_subprocesses(queue, root, processes, progress)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_in_subprocesses(queue: list[Run], root: pathlib.Path, processes: int,
                         progress: Progress) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    running, failure = progress.running, None
    while queue or running:
        while queue and len(running) < processes:
            run = queue.pop(0)
            (root / run.name).mkdir(parents=True, exist_ok=True)
            log = open(root / run.name / "log.txt", "a")
            running[run.name] = (subprocess.Popen(run.command(root / run.name), stdout=log,
                                                  stderr=subprocess.STDOUT, env=env), log)
            progress.report()
        time.sleep(1)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            if not proc.returncode:
                progress.finished(name)
                continue
            del running[name]
            if failure is None:  # start nothing new; the runs under way finish or stop
                what = "was preempted" if proc.returncode == 143 else "failed"
                failure = Stopped(f"run {name} {what} (exit {proc.returncode}): see "
                                  f"{root / name / 'log.txt'}; rerun the sweep to finish what "
                                  "is missing", proc.returncode)
                queue.clear()
    if failure is not None:
        raise failure
