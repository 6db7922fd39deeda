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
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


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


def run_sweep(runs: list[Run], root: pathlib.Path, *, processes: int = 1) -> None:
    """Trains every unfinished run of `runs` under `root`."""
    from resnet_jax import train  # late: a --plot-only caller never starts JAX

    root.mkdir(parents=True, exist_ok=True)
    todo = [r for r in runs if not is_finished(root / r.name, r.build().total_steps)]
    done_before = len(runs) - len(todo)
    # Time left is extrapolated by cost = iterations x depth: a 110-layer run is not a 20's.
    cost = {r.name: r.build().total_steps * r.build().get("depth", 1) for r in todo}
    start, finished, running, done_cost = time.time(), 0, {}, 0

    def report():
        left = len(todo) - finished - len(running)
        eta = ""
        if done_cost:
            remaining = sum(cost.values()) - done_cost
            eta = f", about {(time.time() - start) / done_cost * remaining / 60:.0f} min left"
        print(f"[sweep] {done_before + finished}/{len(runs)} done, {len(running)} running, "
              f"{left} left{eta}", flush=True)

    report()
    if processes <= 1:
        for run in todo:
            running[run.name] = None
            print(f"[sweep] {run.name}", flush=True)
            train.train_and_evaluate(run.build(), str(root / run.name))
            del running[run.name]
            finished, done_cost = finished + 1, done_cost + cost[run.name]
            report()
        return
    queue = list(todo)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    while queue or running:
        while queue and len(running) < processes:
            run = queue.pop(0)
            (root / run.name).mkdir(parents=True, exist_ok=True)
            log = open(root / run.name / "log.txt", "a")
            running[run.name] = (subprocess.Popen(run.command(root / run.name), stdout=log,
                                                  stderr=subprocess.STDOUT, env=env), log)
            report()
        time.sleep(1)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[name]
                if proc.returncode:
                    raise RuntimeError(f"run {name} failed (exit {proc.returncode}): see "
                                       f"{root / name / 'log.txt'}")
                finished, done_cost = finished + 1, done_cost + cost[name]
                report()
