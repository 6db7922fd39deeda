"""A process of a multi-process job whose peer died says so in one line, exit status 75.

JAX ends such a process itself: its coordination client aborts it (SIGABRT) from a thread of its
own, after a Gloo traceback, as soon as the coordinator (process 0) is gone, or about a minute
after another process stopped sending heartbeats. Python cannot intercept either. So
`resnet-jax train`, when launched as one of several processes (JAX_NUM_PROCESSES > 1), runs
under a small parent (`supervise`, standard library only, no JAX): the trainer is its child,
with the same command. The parent passes stdout through untouched, stop signals on (SIGTERM,
SIGINT, SIGHUP: the child checkpoints as before), and stderr through line by line, except what
follows the first sign of a lost peer (a Gloo connection reset by it, an error of the
coordination service, or a traceback ending in one). If the child then dies, of a signal or
with `PEER_LOST`, the parent keeps the child's stderr in WORKDIR/process-I.stderr.log and prints
one line naming the process that stopped answering (`message`); any other end of the child
passes through unchanged, held lines included, exit status and signal alike.

The child ends at once on a lost peer that Python sees (`exit_if_lost`: a collective that
fails), instead of waiting out the heartbeat timeout in JAX's shutdown at exit, only to abort.
A single process has no parent and no peer: nothing here runs.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pathlib
import re
import signal
import subprocess
import sys

from resnet_jax.cli import STOP_SIGNALS

# EX_TEMPFAIL of sysexits.h: nothing is wrong with the run, and the same command continues it.
PEER_LOST = 75
# Set in the child's environment, to the parent's pid: the child trains instead of supervising.
SUPERVISED = "RESNET_JAX_SUPERVISED"

# How a lost peer shows in a process's stderr, as Gloo and JAX 0.10's distributed runtime word
# it: a collective's connection reset by the process that died; an error logged by the
# coordination service or its client (the coordinator unreachable, its process dead; a task that
# stopped sending heartbeats; the abort that follows), which a healthy job never logs.
_GLOO_LOST = re.compile(r"Gloo\b.*\b(Connection (reset|closed) by peer|Broken pipe)")
_SIGNS = re.compile(_GLOO_LOST.pattern + r"|^[WEF]\d{4} [\d:.]+ +\d+ (coordination_service\w*|"
                    r"preemption_sync_manager)\.cc:\d+\]|JAX distributed service detected fatal")
# Which process it was: one that stopped sending heartbeats, or the coordinator (process 0)
# that this process's coordination client can no longer reach.
_HEARTBEATS = re.compile(r"Task (\d+) heartbeat timeout|stopped sending heartbeats\):\s*(\d+)")
_COORDINATOR_GONE = re.compile(r"Failed to send RPC to coordination service|leader task was "
                               r"preempted/died|coordination service: UNAVAILABLE: Socket closed")


def message(this: int, count: int, dead: int | None, coordinator: str | None,
            log: pathlib.Path | None = None) -> str:
    """The line: which process stopped answering (None: unknown, with more than 2 processes),
    what this one does, and how to go on."""
    if dead is None:
        who = f"another process of the {count}"
    else:
        who = f"process {dead} of {count}" + (
            f" (the coordinator, {coordinator})" if dead == 0 and coordinator else "")
    kept = f", keeping its stderr in {log}" if log else ""
    return (f"{who} stopped answering, so this process ({this} of {count}) stops too{kept}. "
            "The run's last checkpoint is kept: rerun the job to resume")


def dead_process(text: str, this: int, count: int) -> int | None:
    """The process that `text` (this process's stderr) says stopped answering, else the only
    other one, else None."""
    named = _HEARTBEATS.search(text)
    if named:
        return int(named.group(1) or named.group(2))
    if this != 0 and _COORDINATOR_GONE.search(text):
        return 0
    return 1 - this if count == 2 else None


def _errors(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def exit_if_lost(error: BaseException) -> None:
    """Ends this process at once, exit status PEER_LOST, when `error` (or what caused it) is a
    collective whose peer is gone; otherwise returns. Under `supervise` the parent says so (the
    error goes to its log), else the line is printed here. Skips the exit's shutdown of JAX's
    distributed client, which would wait out the heartbeat timeout and then abort."""
    cause = next((str(e) for e in _errors(error) if _GLOO_LOST.search(str(e))), None)
    if cause is None:
        return
    import jax

    if os.environ.get(SUPERVISED):
        print(cause, file=sys.stderr)
    else:
        this, count = jax.process_index(), jax.process_count()
        print("resnet-jax: error: " + message(this, count, dead_process(cause, this, count),
                                              os.environ.get("JAX_COORDINATOR_ADDRESS")),
              file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(PEER_LOST)


def needs_supervisor(env=os.environ) -> bool:
    """Whether this process is one of several of a job (launch/local.sh, or any launcher
    setting JAX_NUM_PROCESSES) and not yet the child of `supervise`."""
    try:
        return int(env.get("JAX_NUM_PROCESSES") or 1) > 1 and not env.get(SUPERVISED)
    except ValueError:  # the child reports it, as an unsupervised process would
        return False


def stop_with_parent() -> None:
    """In `supervise`'s child: dies with its parent (SIGKILL, PR_SET_PDEATHSIG, Linux), so that
    a kill -9 of the process a launcher started still ends its trainer, as before there was a
    parent. A child whose parent already ended does not start. Elsewhere: nothing."""
    import ctypes

    if not os.environ.get(SUPERVISED):
        return
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except AttributeError:  # no prctl (not Linux)
        return
    if os.getppid() != int(os.environ[SUPERVISED]):
        os._exit(128 + signal.SIGKILL)


def supervise(command: list[str], workdir: str | None) -> int:
    """Runs `command` (this process's own, which then trains) as a child and returns its exit
    status, or this module's line and PEER_LOST when its peer died (above). A child that a
    signal ended ends this process with the same signal."""
    env = {**os.environ, SUPERVISED: str(os.getpid())}
    child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    forwarded = {s: signal.signal(s, lambda signum, _: child.send_signal(signum))
                 for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        # The log: the child's stderr, its last lines where a long run wrote more.
        kept, held, lost = collections.deque(maxlen=100_000), [], False
        for line in child.stderr:
            kept.append(line)
            if lost or held:
                held.append(line)
                lost = lost or bool(_SIGNS.search(line.decode(errors="replace")))
                # A traceback ends at its first unindented line after the first: the error.
                if not lost and len(held) > 1 and not line[:1].isspace():
                    _write(held)
                    held = []
            elif line.startswith(b"Traceback (most recent call last):"):
                held = [line]
            elif _SIGNS.search(line.decode(errors="replace")):
                held, lost = [line], True
            else:
                _write([line])
        status = child.wait()
    finally:
        for s, handler in forwarded.items():
            signal.signal(s, handler)
    if lost and (status < 0 or status == PEER_LOST):
        this, count = int(os.environ.get("JAX_PROCESS_ID", 0)), int(env["JAX_NUM_PROCESSES"])
        text = b"".join(kept).decode(errors="replace")
        log = _keep(text, workdir, this)
        if log is None:  # nowhere to keep it: shown instead
            _write(held)
        print("resnet-jax: error: " + message(this, count, dead_process(text, this, count),
                                              os.environ.get("JAX_COORDINATOR_ADDRESS"), log),
              file=sys.stderr, flush=True)
        return PEER_LOST
    _write(held)
    if status < 0:  # as the child ended: a launcher sees the same signal (local.sh names it)
        with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    return status if status >= 0 else 128 - status


def _write(lines: list[bytes]) -> None:
    sys.stderr.buffer.write(b"".join(lines))
    sys.stderr.flush()


def _keep(text: str, workdir: str | None, this: int) -> pathlib.Path | None:
    """WORKDIR/process-THIS.stderr.log holding `text`, or None where it cannot be written."""
    if not workdir:
        return None
    path = pathlib.Path(workdir) / f"process-{this}.stderr.log"
    try:
        path.write_text(text)
    except OSError:
        return None
    return path
