"""Checkpoints: Orbax, one directory `WORKDIR/checkpoints/<step>` per save, atomic by design.

Orbax writes each step into a temporary directory and renames it when complete, so a killed
process never leaves a checkpoint that looks finished. Restoring walks back from the newest step
and says so when it has to skip a damaged one.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: pathlib.Path, *, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self.manager.wait_until_finished()

    def restore_latest(self, target):
        """The newest checkpoint that restores, with `target`'s structure and shardings.

        Returns None when there is none. A damaged newest step is reported and skipped.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
            except Exception as e:  # noqa: BLE001 - any failure to read means "damaged"
                print(f"checkpoint {step} could not be read ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}); falling back to the previous one",
                      flush=True)
        return None

    def close(self) -> None:
        self.manager.close()
