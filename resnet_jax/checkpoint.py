"""Checkpoints: Orbax, one directory `WORKDIR/checkpoints/<step>` per save, atomic by design.

Orbax writes each step into a temporary directory and renames it when complete, so a killed
process never leaves a checkpoint that looks finished. A step holds the train state (item
`default`) and the training metrics of the steps since the last logged record (item `window`),
so that a resumed run logs what an unbroken one does. Restoring walks back from the newest step
and says so when it has to skip a damaged one, or a folder that holds no checkpoint; a checkpoint
of a different setup is not damage, and is refused. `WorkdirLock` keeps a second trainer out of
a workdir in use. `PreemptionWatch` turns a preemption notice (SIGTERM), an interrupt (SIGINT,
Ctrl-C) or a hang-up (SIGHUP) into a checkpoint and a clean stop (tests/test_faults.py).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pathlib
import signal
import socket
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from resnet_jax.cli import STOP_SIGNALS, stopped
from resnet_jax.rundir import SWEEP_LOCK, TRAIN_LOCK

log = logging.getLogger(__name__)


def _orbax():
    """orbax.checkpoint, imported at first use: it takes a third of a second, which commands
    that import this module through train.py but never checkpoint (`resnet-jax summary`) need
    not pay."""
    import orbax.checkpoint

    return orbax.checkpoint


class _ReadOnlyIsNoNews(logging.Filter):
    """Drops Orbax's 'Given directory is read only' warning, which every read-only manager logs:
    reading a run without touching it (`resnet-jax eval`, analyses) is what read_only is for,
    not something to warn a user of."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


class RestoreError(ValueError):
    """Checkpoints that exist but cannot be resumed from here. str(e) is one line."""


class SetupMismatch(RestoreError):
    """A checkpoint of another model or dataset (other shapes or structure): not damage."""


class NoneReadable(RestoreError):
    """Checkpoints exist, and none of them can be read."""


# What a failed checkpoint write says, as Orbax and TensorStore word it, and its errno.
WRITE_FAILURES = {"No space left on device": errno.ENOSPC, "File too large": errno.EFBIG,
                  "Permission denied": errno.EACCES, "Read-only file system": errno.EROFS,
                  "Disk quota exceeded": errno.EDQUOT}


# The items of a step: the train state, and the record window (JSON; absent in checkpoints of
# versions before it, which hold `default` alone in the same layout).
STATE, WINDOW = "default", "window"


class Checkpointer:
    def __init__(self, directory: pathlib.Path, *, keep: int, read_only: bool = False):
        ocp = _orbax()
        # Read-only: the settings Orbax would force (with a warning each), given as it wants them.
        keeping = ({"max_to_keep": None, "save_interval_steps": 0} if read_only
                   else {"max_to_keep": keep})
        options = ocp.CheckpointManagerOptions(**keeping, create=not read_only,
                                               read_only=read_only,
                                               enable_async_checkpointing=False)
        self.directory = directory.absolute()
        quiet, absl_log = _ReadOnlyIsNoNews(), logging.getLogger("absl")  # Orbax logs via absl
        absl_log.addFilter(quiet)
        try:
            # The items named up front: a manager left to infer them from the first step it
            # reads takes an empty step folder for a checkpoint of no items and refuses every
            # later step (issue 24).
            self.manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={STATE: ocp.StandardCheckpointHandler(),
                               WINDOW: ocp.JsonCheckpointHandler()})
        finally:
            absl_log.removeFilter(quiet)

    def save(self, step: int, state, window: dict) -> None:
        """Writes `step`: `state` and the record `window` (a JSON object); a failed write (a
        full disk) leaves only Orbax's temporary directory, which no restore mistakes for a
        checkpoint, and raises OSError."""
        args = _orbax().args
        try:
            self.manager.save(step, args=args.Composite(**{STATE: args.StandardSave(state),
                                                           WINDOW: args.JsonSave(window)}),
                              force=True)
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - Orbax and TensorStore wrap OS errors variously
            # The reason's own errno, so that the CLI reports it as the failed write it is.
            reason = next((r for r in WRITE_FAILURES if r in str(e)), None)
            raise OSError(WRITE_FAILURES.get(reason, errno.EIO), f"checkpoint {step} was not "
                          f"written ({reason or type(e).__name__})", str(self.directory)) from e

    def read_latest(self, target, steps: tuple[int, ...] | None = None):
        """(step, state, window, unreadable): the newest checkpoint that restores, with
        `target`'s structure and shardings, and its record window (None in a checkpoint
        written without one); (None, None, None, ...) when none restores. `unreadable`: the
        newer steps that could not be read, each reported. A step folder that holds no
        checkpoint (no `default/`: made by hand, or emptied) is reported and skipped, and is
        not counted as unreadable. Moves nothing: analyses use this directly. With `steps`,
        only those are tried.

        Raises SetupMismatch when a checkpoint that fails to restore holds other shapes or
        another structure than `target`: a changed dataset or model, not damage.
        """
        ocp = _orbax()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        unreadable = []
        for step in sorted((s for s in self.manager.all_steps() if steps is None or s in steps),
                           reverse=True):
            folder = self.directory / str(step)
            if not (folder / STATE).is_dir():
                print(f"checkpoint folder {folder} holds no checkpoint (no {STATE}/); skipped",
                      flush=True)
                continue
            items = {STATE: ocp.args.StandardRestore(abstract)}
            if (folder / WINDOW).is_dir():
                items[WINDOW] = ocp.args.JsonRestore()
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
                return step, restored[STATE], restored.get(WINDOW), unreadable
            except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise variously
                difference = self._difference(step, abstract)
                if difference:
                    raise SetupMismatch(f"checkpoint {step}: {difference}") from e
                unreadable.append(step)
                print(f"checkpoint {step} could not be read ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}); falling back to the previous one",
                      flush=True)
        return None, None, None, unreadable

    def _difference(self, step: int, abstract) -> str | None:
        """The first array of checkpoint `step` whose shape or dtype differs from `abstract`'s,
        or one only either has; None when they agree or the step's metadata cannot be read (then
        the step is damaged). Asked only of a step that failed to restore, so a comparison that
        misses a subtlety of Orbax's tree can never refuse a checkpoint that restores."""
        try:
            metadata = self.manager.item_metadata(step)[STATE]
            stored = _shapes(getattr(metadata, "tree", metadata))  # TreeMetadata in newer Orbax
        except Exception:  # noqa: BLE001 - unreadable metadata is damage
            return None
        wanted = _shapes(abstract)
        if not stored:
            return None
        for path in [*wanted, *sorted(stored.keys() - wanted.keys())]:  # parameters first
            have, need = stored.get(path, "absent"), wanted.get(path, "absent")
            if have != need:
                return f"{path} is {have} where this setup has {need}"
        return None

    def restore_latest(self, target, *, restart: bool = False):
        """(state, window) of the newest checkpoint that restores, with `target`'s structure
        and shardings (`read_latest`).

        Returns None when there is none. A damaged newer step, or a newer folder that holds no
        checkpoint, is moved aside to `<step>.damaged` (kept for inspection, out of the way of
        the step's next save). Raises SetupMismatch for a checkpoint of another setup, and
        NoneReadable when checkpoints exist but none can be read, unless `restart`: then those
        (each tried and failed: no readable one is ever among them) are moved aside and None
        is returned. Nothing is moved when it raises.
        """
        step, restored, window, damaged = self.read_latest(target)
        if restored is None and damaged and not restart:
            raise NoneReadable(f"no checkpoint in {self.directory} could be read (tried "
                               f"{', '.join(map(str, damaged))})")
        empty = [s for s in self.manager.all_steps()
                 if (step is None or s > step) and not (self.directory / str(s) / STATE).is_dir()]
        if restored is None and damaged:
            print(f"--restart: none of checkpoints {', '.join(map(str, damaged))} could be read; "
                  "moving them aside (<step>.damaged) and training from step 0", flush=True)
        if damaged or empty:
            if jax.process_index() == 0:
                for s in [*damaged, *empty]:
                    path, n = self.directory / str(s), 0
                    aside = path.with_name(f"{s}.damaged")
                    while aside.exists():  # set aside before, at an earlier save of this step
                        n += 1
                        aside = path.with_name(f"{s}.damaged.{n}")
                    path.rename(aside)
            multihost_utils.sync_global_devices("checkpoint: damaged steps moved aside")
            self.manager.reload()
        return None if restored is None else (restored, window)

    def close(self) -> None:
        self.manager.close()


def _shapes(tree) -> dict[str, str]:
    """'params/head/kernel' -> 'float32 (64, 10)', for each array of a tree of arrays,
    ShapeDtypeStructs or Orbax metadata."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        if keys and keys[-1] == "value":  # nnx.Variable's field: no part of the name
            keys.pop()
        out["/".join(keys)] = f"{np.dtype(leaf.dtype).name} {tuple(leaf.shape)}"
    return out


class WorkdirBusy(RuntimeError):
    """Another trainer holds the workdir. str(e) is one line naming it."""


# Who locks a directory (`WorkdirLock`): the lock's file in it, and the refusal of a second.
LOCKS = {"trainer": (TRAIN_LOCK, "workdir {dir} is in use by another trainer ({holder}): wait "
                     "for it to end, or use a new --workdir"),
         "sweep": (SWEEP_LOCK, "{dir} is in use by another sweep ({holder}): wait for it to "
                   "end, or give this sweep a --root of its own")}


def _written_holder(file) -> str:
    """Who holds a lock file, as its holder wrote it into the file."""
    file.seek(0)
    return file.read().strip() or "pid unknown"


def _in_every_process(holder: str, who: str) -> str:
    """Process 0's answer (its lock's holder, or "") in every process, so that every process
    stops, not only process 0."""
    if jax.process_count() > 1:
        busy = multihost_utils.broadcast_one_to_all(np.int32(bool(holder)))
        holder = holder or (f"{who} (see process 0's log)" if busy else "")
    return holder


class WorkdirLock:
    """Holds `WORKDIR/train.lock` for a run's life: a second trainer on the workdir is refused,
    with the first one's pid and host, instead of both writing every step twice. A sweep holds
    `ROOT/sweep.lock` (`user="sweep"`) the same way; sweeps of some of its runs (`--index`,
    `--shard`: a job array's tasks) hold it `shared`, beside each other but not beside a whole
    sweep.

    `fcntl.flock` on an open file: the kernel releases it when the process ends, however it ends
    (kill -9 included), so no stale lock is ever left to clear. Only process 0 locks, as only it
    writes; the others learn its answer. Linux emulates flock on NFS with POSIX locks, which the
    NFS lock manager shares between hosts; a mount without working locks cannot guard a workdir:
    NFS mounted with `nolock` locks per host only, without a word, and where flock fails (some
    FUSE mounts) a warning is printed and the run goes on unguarded.

    A lock file deleted under a running trainer (`rm`, a cleanup script) would let a second one
    in: `check`, before each write, takes a deleted file again, and stops this trainer if
    another one has taken the workdir meanwhile.
    """

    def __init__(self, workdir: pathlib.Path, *, user: str = "trainer", shared: bool = False):
        name, refusal = LOCKS[user]
        self.path, self._file, holder = workdir / name, None, ""
        self._mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        if jax.process_index() == 0:
            holder = self._acquire(self._mode)
        holder = _in_every_process(holder, f"another {user}")
        if holder:
            raise WorkdirBusy(refusal.format(dir=workdir, holder=holder))

    @staticmethod
    def holder(workdir: pathlib.Path) -> str:
        """Who holds `workdir`'s lock now ("" when no one does), asked without waiting and
        without holding it longer than the asking: for a sweep, whether a run of its is still
        training in a process it did not start (one a killed sweep left)."""
        try:
            file = (workdir / LOCKS["trainer"][0]).open()
        except OSError:  # no lock file: never trained
            return ""
        with file:
            try:
                fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _written_holder(file)
            except OSError:  # a file system without locks: nothing to learn
                return ""
        return ""

    def _acquire(self, mode: int) -> str:
        """Takes the lock and writes who holds it; returns "" or the holder that has it."""
        file = self.path.open("a+")
        try:
            fcntl.flock(file, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            with file:
                return _written_holder(file)
        except OSError as e:
            file.close()
            print(f"warning: cannot lock {self.path} ({e.strerror}): nothing keeps a second "
                  "trainer out of this workdir", flush=True)
            return ""
        file.truncate(0)
        file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self._file = file
        return ""

    def check(self) -> None:
        """Raises WorkdirBusy, in every process, when the lock file is no longer the one
        process 0 locked and another trainer holds the new one; a deleted file is locked again
        (with a warning)."""
        holder = _in_every_process(self._retake() if jax.process_index() == 0 else "",
                                   "another trainer")
        if holder:
            raise WorkdirBusy(f"{self.path} was deleted and another trainer took the workdir "
                              f"({holder}): this one stops here, writing nothing more; let the "
                              "other one finish, or stop it and rerun")

    def _retake(self) -> str:
        """"" while the lock file is the one locked here, or was deleted and is locked again;
        else who holds the file now there."""
        if self._file is None:  # not locked here (a file system without locks)
            return ""
        try:
            if os.path.samestat(os.fstat(self._file.fileno()), os.stat(self.path)):
                return ""
        except FileNotFoundError:
            pass
        self._file.close()
        self._file = None
        holder = self._acquire(self._mode)
        if not holder:
            print(f"warning: {self.path} was deleted or replaced while training: locked again",
                  flush=True)
        return holder

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Releases the lock; the file stays (removing it would let a trainer that opened it
        lock a file no longer there)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def read(directory: str | pathlib.Path, step: int):
    """Checkpoint `step` under `directory` as NumPy arrays, whatever devices or processes wrote
    it: for analyses and tests, not for resuming (that is `Checkpointer.restore_latest`)."""
    ocp = _orbax()
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.CheckpointManager(pathlib.Path(directory).absolute(),
                               item_handlers=ocp.StandardCheckpointHandler()) as manager:
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              manager.item_metadata(step))
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    return jax.tree.map(np.asarray, restored)


class Preempted(Exception):
    """Training stopped on a preemption notice (SIGTERM), an interrupt (SIGINT, Ctrl-C) or a
    hang-up (SIGHUP, a closed terminal) after checkpointing `step`; the CLI exits with
    128 + `signum`, as a shell reports a signal."""

    def __init__(self, step: int, workdir: pathlib.Path, signum: int = signal.SIGTERM):
        super().__init__(f"{stopped(signum)} at step {step}: checkpoint saved in {workdir}; "
                         "rerun the same command to continue")
        self.step, self.signum = step, signum


class PreemptionWatch:
    """Whether a stop signal (cli.STOP_SIGNALS: SIGTERM, SIGINT, SIGHUP) has arrived, asked once
    per step by every process; `signum` is the signal this process got (SIGTERM if none).

    One process: a handler sets a flag. Several: JAX's preemption service (started by
    `jax.distributed.initialize`) picks one step at which all of them stop together; processes
    stopping at different steps on their own would leave the others waiting in a collective.
    That service listens for SIGTERM only, so SIGINT and SIGHUP are passed on to it as one.
    """

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self.noticed = False
        self.signum = signal.SIGTERM
        self._previous = {}
        signals = [s for s in STOP_SIGNALS if not (self.multi_process and s == signal.SIGTERM)]
        if threading.current_thread() is threading.main_thread():
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        if not self.noticed:
            self.noticed, self.signum = True, signum
        if self.multi_process:
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        if self.multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.noticed

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
