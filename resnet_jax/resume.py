"""Refusing and resuming a run, the part that needs the devices: each workdir locked and checked
again once locked, the latest readable checkpoint restored with damaged ones set aside, and the
record window stored with each checkpoint so that a resumed run logs what an unbroken one does.
What needs no devices (file names, the config and dataset checks) is rundir.py; a lost final
record is evaluated again by the loop (`train.Training`).
"""

from __future__ import annotations

import contextlib

import numpy as np

from resnet_jax import rundir
from resnet_jax.checkpoint import NoneReadable, SetupMismatch, WorkdirBusy, WorkdirLock
from resnet_jax.errors import ConfigError


def lock_workdirs(held: contextlib.ExitStack, configs, workdirs, facts: dict) -> list:
    """Creates and locks each run's workdir (held until `held` closes), checking again that it
    holds this config's run on this data: another trainer may have just written it. The locks,
    for `check_locks`."""
    locks = []
    for c, w in zip(configs, workdirs):
        w.mkdir(parents=True, exist_ok=True)
        try:
            locks.append(held.enter_context(WorkdirLock(w)))
        except WorkdirBusy as e:
            raise ConfigError(str(e)) from None
        rundir.check_workdir(w, c)
        rundir.check_dataset(w, facts)
    return locks


def check_locks(locks) -> None:
    """Before a write: each workdir is still this trainer's (`WorkdirLock.check`)."""
    for lock in locks:
        try:
            lock.check()
        except WorkdirBusy as e:
            raise ConfigError(str(e)) from None


def restore(checkpointers, workdirs, backend, state, restart: bool, total_steps: int):
    """(start step, state, windows): each run's latest readable checkpoint, all at one step,
    stacked as `state` is, and each run's record window (`Checkpointer.save`; None for a
    checkpoint written without one); none: (0, `state`, empty windows)."""
    restored = []
    for w, checkpointer, initial in zip(workdirs, checkpointers, backend.runs_of(state)):
        try:
            restored.append(checkpointer.restore_latest(initial, restart=restart))
        except SetupMismatch as e:  # a changed dataset or model, not damage: nothing is moved
            raise ConfigError(f"workdir {w} holds checkpoints of a different setup ({e}): use a "
                              "new --workdir, or the data and config it was trained with") from None
        except NoneReadable as e:
            raise ConfigError(f"{e}: rerun with --restart to set them aside and train from step "
                              "0, or use a new --workdir") from None
    steps = {None if r is None else int(r[0].step) for r in restored}
    if len(steps) > 1:
        raise ConfigError(
            f"runs trained in one program must resume from one step, but their checkpoints are "
            f"at {', '.join(str(r and int(r[0].step)) for r in restored)}: train them "
            "separately")
    start = steps.pop() or 0
    if start > total_steps:  # its summary would name a step it is not at
        raise ConfigError(f"workdir {workdirs[0]} holds checkpoint {start}, past total_steps="
                          f"{total_steps}: pass --config.total_steps={start} or more, or use a "
                          "new --workdir")
    if restored[0] is None:
        return 0, state, [EMPTY_WINDOW for _ in workdirs]
    for w in workdirs:
        print(f"resuming from step {start} in {w}", flush=True)
    return start, backend.stack_runs([r[0] for r in restored]), [r[1] for r in restored]


# A run's record window: the loss and error of each step since its last record, which the next
# record averages (`train.Training.log`); stored with each checkpoint, so that a run resumed at a
# step between two records logs what an unbroken run logs.
EMPTY_WINDOW = {"loss": [], "error": []}


def window_steps(window: dict) -> list[dict]:
    """A stored record window as the loop keeps it: one {loss, error} per step, float32 as the
    train step returned them (so that the record's mean is the unbroken run's, bit for bit)."""
    return [{"loss": np.float32(loss), "error": np.float32(error)}
            for loss, error in zip(window["loss"], window["error"], strict=True)]
