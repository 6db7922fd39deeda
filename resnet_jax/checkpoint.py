"""Checkpoints: Orbax, one directory `WORKDIR/checkpoints/<step>` per save, atomic by design.

Orbax writes each step into a temporary directory and renames it when complete, so a killed
process never leaves a checkpoint that looks finished. Restoring walks back from the newest step
and says so when it has to skip a damaged one. `PreemptionWatch` turns a preemption notice
(SIGTERM) into a checkpoint and a clean stop (tests/test_faults.py).
"""

from __future__ import annotations

import errno
import logging
import pathlib
import re
import signal
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: pathlib.Path, *, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self.directory = directory.absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Writes `step`; a failed write (a full disk) leaves only Orbax's temporary directory,
        which no restore mistakes for a checkpoint, and raises OSError."""
        try:
            self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - Orbax and TensorStore wrap OS errors variously
            reason = re.search(r"(No space left on device|File too large|Permission denied|"
                               r"Read-only file system|Disk quota exceeded)", str(e))
            raise OSError(errno.EIO, f"checkpoint {step} was not written "
                          f"({reason.group(1) if reason else type(e).__name__})",
                          str(self.directory)) from e

    def restore_latest(self, target):
        """The newest checkpoint that restores, with `target`'s structure and shardings.

        Returns None when there is none. A damaged newer step is reported and moved aside to
        `<step>.damaged` (kept for inspection, out of the way of the step's next save).
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored, damaged = None, []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
                break
            except Exception as e:  # noqa: BLE001 - any failure to read means "damaged"
                damaged.append(step)
                print(f"checkpoint {step} could not be read ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}); falling back to the previous one",
                      flush=True)
        if damaged:
            if jax.process_index() == 0:
                for step in damaged:
                    path = self.directory / str(step)
                    path.rename(path.with_name(f"{step}.damaged"))
            multihost_utils.sync_global_devices("checkpoint: damaged steps moved aside")
            self.manager.reload()
        return restored

    def close(self) -> None:
        self.manager.close()


def read(directory: str | pathlib.Path, step: int):
    """Checkpoint `step` under `directory` as NumPy arrays, whatever devices or processes wrote
    it: for analyses and tests, not for resuming (that is `Checkpointer.restore_latest`)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.CheckpointManager(pathlib.Path(directory).absolute(),
                               item_handlers=ocp.StandardCheckpointHandler()) as manager:
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              manager.item_metadata(step))
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    return jax.tree.map(np.asarray, restored)


class Preempted(Exception):
    """Training stopped on a preemption notice after checkpointing `step`."""

    def __init__(self, step: int, workdir: pathlib.Path):
        super().__init__(f"preempted (SIGTERM) at step {step}: checkpoint saved in {workdir}; "
                         "rerun the same command to continue")
        self.step = step


class PreemptionWatch:
    """Whether a preemption notice (SIGTERM) has arrived, asked once per step by every process.

    One process: a SIGTERM handler sets a flag. Several: JAX's preemption service (started by
    `jax.distributed.initialize`) picks one step at which all of them stop together; processes
    stopping at different steps on their own would leave the others waiting in a collective.
    """

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self.noticed = False
        self._previous = None
        if not self.multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.noticed = True

    def reached(self, step: int) -> bool:
        if self.multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.noticed

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
