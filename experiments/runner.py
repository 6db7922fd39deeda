"""Trains a sweep's runs: in this process, or as subprocesses, each in a slot of its own.

`run_sweep(runs, configs, root, slots=...)` trains every run that has no finished `summary.json`
in `ROOT/<name>`, resuming interrupted runs from their checkpoints: one after another in this
process (`slots=None`), or one subprocess per slot at a time (`placement.Slot`: the environment
that pins a run to its devices; N unpinned slots are `--processes=N`). It prints progress over
the whole sweep: runs done, failed, running, left, and the time left. A run that fails (a NaN, a
bad dataset, a crash) is recorded in its directory's `failure.json` and the others train; the
sweep then names each failed run with its reason and ends in `Stopped` (exit 2). SIGTERM,
SIGINT or SIGHUP to the sweep stops its runs at a checkpoint (tests/test_experiments.py,
tests/test_faults_processes.py).
Declaring a sweep and its command line: experiments/sweep.py.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
import traceback

from experiments.declaration import Run
from experiments.placement import Slot
from experiments.sweep_root import REPO, record_failure
from resnet_jax import rundir
from resnet_jax.cli import STOP_SIGNALS as SIGNAL_WORDS, stopped as signal_stopped
from resnet_jax.errors import USER_ERRORS
from resnet_jax.rundir import FAILURE, LOG_TXT
# A run's exit status when a signal stopped it: 128 + the signal (at a checkpoint, or with its
# line before the training loop), or minus the signal (ended by it before Python could answer).
STOP_SIGNALS = {status: signum for signum in SIGNAL_WORDS
                for status in (128 + signum, -signum)}
# Runs the command of a run with the kernel's promise of a SIGTERM once the sweep's process ends,
# however it ends (kill -9 included; PR_SET_PDEATHSIG, Linux): the run checkpoints and stops
# rather than train on with no sweep to report it, and a rerun finds it stopped. The setting
# survives the exec into the run; set here rather than in a preexec_fn, which forking a
# multithreaded process makes unsafe. A run whose sweep ended before the setting took does not
# start. Elsewhere (no prctl) the run starts as it is.
_STOP_WITH_SWEEP = [sys.executable, "-c", "import ctypes, os, signal, sys\n"
                    "try: ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"  # 1: PR_SET_PDEATHSIG
                    "except AttributeError: pass\n"
                    "if os.getppid() != int(sys.argv[1]): sys.exit(128 + signal.SIGTERM)\n"
                    "os.execv(sys.argv[2], sys.argv[2:])"]


class Stopped(Exception):
    """The sweep ended before training every run: it or a run was preempted (SIGTERM) or
    interrupted (SIGINT), the runs under way stopping at a checkpoint (`exit_status` 143 or 130);
    or runs failed while the others trained (2). `failed` maps each failed run's name to its
    reason. Rerunning the sweep trains only what is missing."""

    def __init__(self, message: str, exit_status: int, root: pathlib.Path | None = None,
                 failed: dict | None = None):
        self.exit_status, self.failed = exit_status, dict(failed or {})
        if self.failed and exit_status != 2:
            message += "; these runs had failed before:"
        super().__init__("\n".join([message] + [f"  {root / name}: {reason}"
                                                 for name, reason in self.failed.items()]))


class Progress:
    """Runs done, running and left over the whole sweep, and the time left: extrapolated by
    cost = iterations x depth, since a 110-layer run is not a 20-layer one."""

    def __init__(self, total: int, todo: dict):
        self.total, self.done, self.failures = total, total - len(todo), 0
        self.cost = {name: c.total_steps * c.depth for name, c in todo.items()}
        self.start, self.done_cost, self.running = time.time(), 0, {}

    def finished(self, name: str) -> None:
        self.done, self.done_cost = self.done + 1, self.done_cost + self.cost[name]
        self.running.pop(name, None)
        self.report()

    def failed(self, name: str) -> None:
        self.failures += 1
        self.cost.pop(name)  # out of the time left, which the time spent on it still slows
        self.running.pop(name, None)
        self.report()

    def report(self) -> None:
        left = self.total - self.done - self.failures - len(self.running)
        eta = ""
        if self.done_cost:
            remaining = sum(self.cost.values()) - self.done_cost
            eta = (f", about {(time.time() - self.start) / self.done_cost * remaining / 60:.0f}"
                   " min left")
        failed = f"{self.failures} failed, " if self.failures else ""
        print(f"[sweep] {self.done}/{self.total} done, {failed}{len(self.running)} running, "
              f"{left} left{eta}", flush=True)


def seed_groups(todo: list[Run], configs: dict, root: pathlib.Path, size: int) -> list[list[Run]]:
    """`todo` in groups of at most `size` runs that differ only in their seed and resume from
    the same step: each group trains in one program. Order is kept within and across groups."""
    groups: dict = {}
    for run in todo:
        key = (rundir.seed_group(configs[run.name].to_dict()), rundir.latest_step(root / run.name))
        groups.setdefault(key, []).append(run)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def run_sweep(runs: list[Run], configs: dict, root: pathlib.Path, *,
              slots: list[Slot] | None = None, seeds_per_program: int = 1) -> None:
    """Trains every unfinished run of `runs` (their ConfigDicts in `configs`, by name) under
    `root`: here, or one subprocess per slot at a time. Raises Stopped if the sweep or a run is
    preempted (SIGTERM) or interrupted (SIGINT), and at the end if runs failed.
    `seeds_per_program=K`: runs that differ only in their seed train K at a time in one compiled
    program (in this process only), and fail together."""
    if seeds_per_program < 1 or (seeds_per_program > 1 and slots):
        raise ValueError(f"--seeds-per-program={seeds_per_program} with runs in subprocesses: "
                         "use 1, or more than 1 only with the runs in this process")
    root.mkdir(parents=True, exist_ok=True)
    todo = []
    for run in runs:
        if rundir.finished_summary(root / run.name, configs[run.name].total_steps) is not None:
            # Stale: recorded while the run trained on in a process no sweep watched, which
            # then finished it.
            (root / run.name / FAILURE).unlink(missing_ok=True)
        else:
            todo.append(run)
    progress = Progress(len(runs), {r.name: configs[r.name] for r in todo})
    progress.report()
    failed: dict[str, str] = {}
    if slots:
        _run_in_subprocesses(list(todo), root, slots, progress, failed)
    else:
        _run_here(seed_groups(todo, configs, root, seeds_per_program), configs, root, progress,
                  failed)
    if failed:
        raise Stopped(f"{len(failed)} of {len(runs)} runs failed, the others are trained; rerun "
                      "the sweep to retry the failed ones once their cause is fixed (a fix that "
                      "changes a run's config needs its directory removed first):", 2, root,
                      failed)


def _run_here(groups: list[list[Run]], configs: dict, root: pathlib.Path, progress: Progress,
              failed: dict) -> None:
    """Trains each group of runs in this process; a failure is recorded in `failed`."""
    import jax

    from resnet_jax import train
    from resnet_jax.checkpoint import Preempted

    for group in groups:
        names = [run.name for run in group]
        for name in names:
            progress.running[name] = None
            (root / name / FAILURE).unlink(missing_ok=True)
        print(f"[sweep] {', '.join(names)}", flush=True)
        try:
            train.train_runs([configs[n] for n in names], [str(root / n) for n in names])
        except Preempted as e:
            raise Stopped(f"{e} (runs {', '.join(names)}); rerun the sweep to finish them",
                          128 + e.signum, root, failed) from None
        except KeyboardInterrupt:  # before their training loop began, which checkpoints instead
            raise Stopped(f"interrupted (SIGINT) while starting runs {', '.join(names)}; rerun "
                          "the sweep to finish what is missing", 130, root, failed) from None
        except Exception as e:  # noqa: BLE001 - one run's failure, whatever it is, ends only it
            reason = _reason(e)
            for name in names:
                print(f"[sweep] {name} failed: {reason}", flush=True)
                failed[name] = reason
                if jax.process_index() == 0:
                    record_failure(root / name, reason)
                progress.failed(name)
            continue
        for name in names:
            progress.finished(name)


def _reason(e: Exception) -> str:
    """One line for a run's failure in this process; the traceback too where it is a bug."""
    if isinstance(e, USER_ERRORS):
        return str(e)
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    traceback.print_exc()
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def _log_reason(log: pathlib.Path, offset: int, status: int) -> str:
    """One line for a run's failure in a subprocess: what it said last in its log (after
    `offset`, where this attempt began), else how it ended."""
    lines = [line.strip() for line in log.read_bytes()[offset:].decode(errors="replace")
             .splitlines() if line.strip()]
    said = [line[len("resnet-jax: "):] for line in lines if line.startswith("resnet-jax: ")]
    if said:
        reason = said[-1].removeprefix("error: ")
    elif status < 0:
        reason = f"killed by {signal.Signals(-status).name}"
    else:
        reason = lines[-1] if lines else "no output"
    return f"{reason} (exit {status}; log: {log})"


def _run_in_subprocesses(queue: list[Run], root: pathlib.Path, slots: list[Slot],
                         progress: Progress, failed: dict) -> None:
    """Trains `queue`, one run per slot at a time, each with its slot's environment. A stop
    signal to the sweep (SIGTERM, SIGINT, SIGHUP) starts nothing new and goes on to every run,
    which checkpoints and stops; the sweep waits for each, then raises Stopped, leaving no run
    behind; a sweep killed outright takes its runs with it (`_STOP_WITH_SWEEP`). A run stopped by
    a signal of its own starts nothing new either. A run still training in a process this sweep
    did not start (a killed sweep's, stopping) is waited for, and named, not failed."""
    from resnet_jax.checkpoint import WorkdirLock

    running, received, told, stopped, waiting = progress.running, [], set(), {}, set()
    free = list(slots)

    def pass_on(signum=None, frame=None):
        if signum is not None and not received:
            received.append(signum)
        for name, (proc, *_) in list(running.items()) if received else []:
            if name not in told:
                proc.send_signal(received[0])
                told.add(name)

    previous = {s: signal.signal(s, pass_on) for s in SIGNAL_WORDS}
    try:
        while queue or running:
            if received or stopped:
                queue.clear()
            for run in list(queue):
                if not free:
                    break
                workdir = root / run.name
                holder = WorkdirLock.holder(workdir)
                if holder:
                    if run.name not in waiting:
                        print(f"[sweep] {run.name} is in use by another trainer ({holder}): "
                              "waiting for it to end", flush=True)
                        waiting.add(run.name)
                    continue
                queue.remove(run)
                slot = free.pop(0)
                workdir.mkdir(parents=True, exist_ok=True)
                (workdir / FAILURE).unlink(missing_ok=True)
                log = open(workdir / LOG_TXT, "ab")
                offset = (workdir / LOG_TXT).stat().st_size
                log.write(f"[sweep] {run.name} on {slot.describe()}\n".encode())
                log.flush()
                env = dict(os.environ, PYTHONPATH=str(REPO), **slot.env)
                command = [*_STOP_WITH_SWEEP, str(os.getpid()), *run.command(workdir)]
                running[run.name] = (subprocess.Popen(command, stdout=log,
                                                      stderr=subprocess.STDOUT, env=env),
                                     log, offset, slot)
                progress.report()
            pass_on()  # also to a run started just as the signal came
            time.sleep(1)
            for name, (proc, log, offset, slot) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                free.append(slot)
                status = proc.returncode
                if status == 0:
                    progress.finished(name)
                elif status in STOP_SIGNALS:
                    stopped[name] = status
                    del running[name]
                else:
                    failed[name] = _log_reason(root / name / LOG_TXT, offset, status)
                    print(f"[sweep] {name} failed: {failed[name]}", flush=True)
                    record_failure(root / name, failed[name])
                    progress.failed(name)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for proc, log, *_ in running.values():  # only after an error in this loop
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            log.close()
    if received or stopped:
        signum = received[0] if received else STOP_SIGNALS[next(iter(stopped.values()))]
        said = ", ".join(f"run {name} was {SIGNAL_WORDS[STOP_SIGNALS[status]]} (exit {status})"
                         for name, status in stopped.items())
        raise Stopped(f"{said or signal_stopped(signum)}: see each "
                      f"run's log.txt under {root}; rerun the sweep to finish what is missing",
                      128 + signum, root, failed)
