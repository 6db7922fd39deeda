"""Faults between processes, each against the behaviour docs/failures.md promises: a stop signal
before the training loop, a hang-up (a closed terminal), a sweep killed or started twice, and
the processes of one job that disagree on their config or lose a peer.

Every run is a real process: `resnet-jax train` (ResNet-8 on digits, as in tests/test_faults.py),
a sweep of them, or 2 processes joined by launch/local.sh. Where a fault depends on timing, the
test waits for a line the process prints at the moment wanted, then causes it.
"""
import fcntl
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from resnet_jax import rundir
from tests.test_distributed import free_port
from tests.test_experiments import sweep_file
from tests.test_faults import REPO, checkpoint_steps, command, env, last_stderr_line, train


def wait_for_line(proc, text):
    """Reads `proc`'s stdout up to the first line holding `text`; fails if it ends first."""
    for line in proc.stdout:
        if text in line:
            return line
    raise AssertionError(f"{text!r} never printed: {proc.communicate()}")


# `resnet-jax ARGS...` that, once restored, waits before its training loop for up to 10 minutes
# (Training.evaluate_lost_final_records is the last thing before the loop): a signal sent after
# its line lands in that window however busy the cores are.
HELD_BEFORE_THE_LOOP = [sys.executable, "-c", (
    "import runpy, time\n"
    "from resnet_jax import train\n"
    "original = train.Training.evaluate_lost_final_records\n"
    "def held(self):\n"
    "    original(self)\n"
    "    print('held before the training loop', flush=True)\n"
    "    time.sleep(600)\n"
    "train.Training.evaluate_lost_final_records = held\n"
    "runpy.run_module('resnet_jax.main', run_name='__main__', alter_sys=True)\n")]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM],
                         ids=["SIGINT", "SIGHUP", "SIGTERM"])
def test_a_stop_signal_before_the_training_loop_is_one_line_and_its_exit_status(tmp_path,
                                                                                signum):
    """Ctrl-C, a closed terminal or a preemption notice while a run starts up (here: as it
    resumes, after restoring and before the loop) stops it at once with its line, exit 128 + the
    signal, and leaves the run as it was: the rerun resumes from the same checkpoint. Before,
    SIGHUP and SIGTERM ended the run without a word, and a SIGINT in that window was lost in a
    callback of JAX's or ended in a segmentation fault. The run is held in that window until
    the signal comes (`HELD_BEFORE_THE_LOOP`): on busy cores a run left to go on had reached its
    loop before the signal arrived."""
    workdir = tmp_path / "run"
    first = train(workdir, "--config.total_steps=10")
    assert first.returncode == 0, first.stderr
    proc = subprocess.Popen(HELD_BEFORE_THE_LOOP + command(workdir)[3:], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(proc, "resuming from step 10")
    wait_for_line(proc, "held before the training loop")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and "Exception ignored" not in err
    what = {signal.SIGINT: "interrupted", signal.SIGHUP: "hung up",
            signal.SIGTERM: "preempted"}[signum]
    assert last_stderr_line(err) == (
        f"resnet-jax: {what} ({signal.Signals(signum).name}) outside the training loop, so no "
        "checkpoint was taken; rerun the same command to continue")
    assert checkpoint_steps(workdir) == [10]
    rerun = train(workdir)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from step 10" in rerun.stdout


# --- Sweeps -----------------------------------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc: Linux)."""
    out = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    """Whether `pid` is still a `resnet-jax train` process (not a zombie, not a reused pid)."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and b"resnet_jax.main" in pathlib.Path(f"/proc/{pid}/cmdline"
                                                                     ).read_bytes()
    except OSError:
        return False


def start_sweep(spec, root, *flags):
    return subprocess.Popen([sys.executable, "-m", "experiments.sweep", spec, f"--root={root}",
                             "--no-report", *flags], cwd=REPO, env=sweep_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def sweep_env():
    return {**env(), "PYTHONPATH": str(REPO)}


def hold_lock(path, text):
    """Takes `path`'s flock as a trainer holds its workdir's, with `text` as its holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file = path.open("a+")
    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    file.write(text)
    file.flush()
    return file


def test_a_second_sweep_into_a_root_is_refused_and_a_run_in_use_is_waited_for(tmp_path):
    """A run still training in a process the sweep did not start (a killed sweep's, stopping;
    here: its lock held by this test) is waited for and named, not failed; a second sweep into
    the same ROOT is refused at the start while the first runs; a finished run keeps no
    failure record. Before, both sweeps exited 2, each naming the other's runs failed."""
    spec = sweep_file(tmp_path / "s.py", "[Run(f'depth=8,dataset=digits,seed={s}', TINY) "
                      "for s in (1, 2)]")
    root = tmp_path / "root"
    busy, free = (root / f"depth=8,dataset=digits,seed={s}" for s in (1, 2))
    lock = hold_lock(busy / "train.lock", "pid 4242 on elsewhere\n")
    first = start_sweep(spec, root, "--processes=2")
    try:
        line = wait_for_line(first, f"{busy.name} is in use by another trainer")
        assert "(pid 4242 on elsewhere): waiting for it to end" in line
        second = subprocess.run([sys.executable, "-m", "experiments.sweep", spec,
                                 f"--root={root}", "--processes=2"], cwd=REPO, env=sweep_env(),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        (said,) = second.stderr.strip().splitlines()
        assert said.startswith(f"sweep: error: {root} is in use by another sweep (pid "
                               f"{first.pid} on ")
        assert said.endswith("give this sweep a --root of its own")
        # Sweeps of some of its runs (a job array's tasks) are refused beside it too.
        shard = subprocess.run([sys.executable, "-m", "experiments.sweep", spec,
                                f"--root={root}", "--index=1"], cwd=REPO, env=sweep_env(),
                               capture_output=True, text=True, timeout=300)
        assert shard.returncode == 2 and "in use by another sweep" in shard.stderr
        lock.close()  # the other trainer ends
        out, err = first.communicate(timeout=600)
        assert first.returncode == 0, out + err
    finally:
        first.kill()
    for run in (busy, free):
        assert json.loads((run / "summary.json").read_text())["step"] == 2
        assert not (run / rundir.FAILURE).exists()
    # A failure recorded while a run trained on unwatched, which then finished it, is stale.
    (busy / rundir.FAILURE).write_text('{"reason": "in use by another trainer"}\n')
    rerun = subprocess.run([sys.executable, "-m", "experiments.sweep", spec, f"--root={root}",
                            "--no-report"], cwd=REPO, env=sweep_env(), capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert not (busy / rundir.FAILURE).exists()


def test_partial_sweeps_share_a_root_that_a_whole_sweep_holds_alone(tmp_path):
    from resnet_jax.checkpoint import WorkdirBusy, WorkdirLock

    with WorkdirLock(tmp_path, user="sweep", shared=True), WorkdirLock(tmp_path, user="sweep",
                                                                        shared=True):
        with pytest.raises(WorkdirBusy):
            WorkdirLock(tmp_path, user="sweep")
    with WorkdirLock(tmp_path, user="sweep"):
        with pytest.raises(WorkdirBusy):
            WorkdirLock(tmp_path, user="sweep", shared=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP, signal.SIGKILL],
                         ids=["SIGINT", "SIGHUP", "kill-9"])
def test_a_stopped_sweep_takes_its_runs_with_it(tmp_path, signum):
    """Ctrl-C (SIGINT), a closed terminal (SIGHUP) or kill -9 of a sweep of several processes:
    each run checkpoints and stops, instead of training on with no sweep to report it. SIGINT
    and SIGHUP the sweep passes on and waits for its runs, then ends with 128 + the signal;
    after kill -9 the kernel sends each run SIGTERM. Before, a killed sweep's runs were left
    training, re-parented to PID 1."""
    spec = sweep_file(tmp_path / "s.py", "[Run(f'depth=8,dataset=digits,seed={s}', "
                      "{'total_steps': 100000, 'batch_size': 32, 'log_every_steps': 5, "
                      "'eval_every_steps': 100000, 'checkpoint_every_steps': 100000}) "
                      "for s in (1, 2)]")
    root = tmp_path / "root"
    sweep = start_sweep(spec, root, "--processes=2")
    dirs = [root / f"depth=8,dataset=digits,seed={s}" for s in (1, 2)]
    children = []
    try:
        while not all((d / "metrics.jsonl").exists()
                      and (d / "metrics.jsonl").read_text().count("\n") >= 2 for d in dirs):
            assert sweep.poll() is None, sweep.communicate()
            time.sleep(0.05)
        children = child_pids(sweep.pid)
        assert len(children) == 2
        sweep.send_signal(signum)
        _, err = sweep.communicate(timeout=300)
        if signum != signal.SIGKILL:  # the sweep waited for its runs
            assert not [pid for pid in children if alive(pid)]
        deadline = time.monotonic() + 300  # a hang guard: they stop within seconds
        while [pid for pid in children if alive(pid)]:
            assert time.monotonic() < deadline, "runs left training after their sweep ended"
            time.sleep(0.1)
        if signum != signal.SIGKILL:
            what = "interrupted" if signum == signal.SIGINT else "hung up"
            assert sweep.returncode == 128 + signum, err
            assert "Traceback" not in err
            assert f"was {what} (exit {128 + signum})" in err.strip().splitlines()[-1]
        stop = {signal.SIGINT: "interrupted (SIGINT)", signal.SIGHUP: "hung up (SIGHUP)",
                signal.SIGKILL: "preempted (SIGTERM)"}[signum]
        for d in dirs:
            assert f"{stop} at step" in (d / "log.txt").read_text()
            assert any(p.name.isdigit() for p in (d / "checkpoints").iterdir())
    finally:
        sweep.kill()
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def start_job(workdir, *overrides, overrides_of_process_1=(), port=None):
    """The 2 processes of one job on this machine (one CPU device each), as launch/local.sh
    starts them, with `overrides` added to the command line, and `overrides_of_process_1` to
    process 1's."""
    port = port or free_port()
    return [subprocess.Popen(command(workdir, *overrides,
                                     *(overrides_of_process_1 if i else ())), cwd=REPO,
                             env={**env(), "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
                                  "JAX_COORDINATOR_ADDRESS": f"localhost:{port}"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in (0, 1)]


def test_processes_of_one_job_with_different_configs_all_stop_before_writing(tmp_path):
    """Process 1 launched with another learning_rate and total_steps: every process stops with
    one line naming the keys, exit 2, before anything is written. Before, another learning_rate
    trained unseen (config.json, written by process 0, said 0.1); another total_steps hung the
    job."""
    workdir = tmp_path / "run"
    job = start_job(workdir, overrides_of_process_1=("--config.learning_rate=0.5",
                                                     "--config.total_steps=80"))
    for proc in job:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 2, err
        assert last_stderr_line(err) == (
            "resnet-jax: error: the processes of this job have different configs (process 1 "
            "differs from process 0 in learning_rate, total_steps): launch every process with the "
            "same command")
    assert not workdir.exists()


def test_a_workdir_in_use_stops_every_process_of_a_job(tmp_path):
    """A job of 2 processes on a workdir another trainer holds: only process 0 takes the lock,
    and both stop with one line and exit 2 (process 1 pointing to process 0's), not process 0
    alone with process 1 waiting in its first collective."""
    workdir = tmp_path / "run"
    with hold_lock(workdir / rundir.TRAIN_LOCK, "pid 4242 on elsewhere\n"):
        job = start_job(workdir, "--config.total_steps=10")
        ends = [proc.communicate(timeout=600) for proc in job]
    refusal = (f"resnet-jax: error: workdir {workdir} is in use by another trainer ({{}}): "
               "wait for it to end, or use a new --workdir")
    for proc, (_, err), holder in zip(job, ends, ["pid 4242 on elsewhere",
                                                  "another trainer (see process 0's log)"]):
        assert proc.returncode == 2, err
        assert last_stderr_line(err) == refusal.format(holder), err
        assert "Traceback" not in err
    assert sorted(p.name for p in workdir.iterdir()) == [rundir.TRAIN_LOCK]


def test_a_process_whose_peer_dies_says_so_in_one_line_and_the_rerun_resumes(tmp_path):
    """kill -9 of one process's trainer (as the OOM killer or a crash ends it): the other
    process stops at once with one line naming it, exit status 75, its stderr (Gloo's error,
    JAX's abort) kept in WORKDIR/process-I.stderr.log; the rerun of the job resumes from the
    last checkpoint. Before, process 1 ended in a Gloo traceback and SIGABRT; process 0 said
    "checkpoint N was not written (ValueError)" and aborted a minute later. Process 1 dies
    first, mid-training, as process 0 saves a checkpoint every step (its collective fails);
    then, as the rerun resumes, process 0, the coordinator (process 1's coordination client
    aborts)."""
    from resnet_jax import peers

    workdir = tmp_path / "run"
    endless = ("--config.total_steps=100000", "--config.checkpoint_every_steps=1")
    for victim, moment in ((1, "/100000 |"), (0, "resuming from step")):
        port = free_port()
        job = start_job(workdir, *endless, port=port)
        try:
            wait_for_line(job[0], moment)
            (trainer,) = child_pids(job[victim].pid)  # its parent is peers.supervise
            os.kill(trainer, signal.SIGKILL)
            survivor = job[1 - victim]
            _, err = survivor.communicate(timeout=60)  # a hang guard: it stops at once
            assert survivor.returncode == peers.PEER_LOST, err
            log = workdir / f"process-{1 - victim}.stderr.log"
            coordinator = f" (the coordinator, localhost:{port})" if victim == 0 else ""
            assert last_stderr_line(err) == (
                f"resnet-jax: error: process {victim} of 2{coordinator} stopped answering, so "
                f"this process ({1 - victim} of 2) stops too, keeping its stderr in {log}. The "
                "run's last checkpoint is kept: rerun the job to resume"), err
            assert "Gloo" not in err and "Traceback" not in err and "not written" not in err
            assert "Gloo" in log.read_text() or "coordination service" in log.read_text()
            job[victim].communicate(timeout=60)
            assert job[victim].returncode == -signal.SIGKILL  # the trainer's end, passed on
        finally:
            for proc in job:
                proc.kill()


# What a survivor's stderr held in those runs (JAX 0.10.2), cut short: the coordinator's death
# as process 1 sees it (the coordination client aborts within a second) ...
COORDINATOR_GONE = """\
W1207 06:20:03.970018   28433 preemption_sync_manager.cc:147] Failed to retrieve preemption \
notice from coordination service: UNAVAILABLE: Socket closed
E1207 06:20:03.970149   28433 coordination_service_agent.cc:289] Polled an error from \
coordination service (this can be an error from this or another task).
F1207 06:20:03.970156   28433 client.h:80] Terminating process because the JAX distributed \
service detected fatal errors. This most likely indicates that another task died; see the other \
task logs for more details. absl::Status: UNAVAILABLE: Failed to send RPC to coordination \
service. Either the leader task was preempted/died/restarted unexpectedly or this task is \
experiencing network issues.
Traceback (most recent call last):
  File "/work/resnet_jax/train.py", line 712, in loop
    jax.block_until_ready(pending[-3][0])
jax.errors.JaxRuntimeError: UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp\
/pair.cc:538] Read error [127.0.0.1]:20196: Connection reset by peer
*** Check failure stack trace: ***
"""
# ... and another process's death as the coordinator sees it, once its heartbeats stop.
HEARTBEATS_STOPPED = """\
E1207 06:21:52.349023   29219 coordination_service.cc:1520] [454548019773789249] Shutdown \
barrier in coordination service has failed:
INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 2 heartbeat timeout. \
This indicates that the remote task has failed, got preempted, or crashed unexpectedly.
F1207 06:21:52.350543   29076 client.h:80] Terminating process because the JAX distributed \
service detected fatal errors. This most likely indicates that another task died
"""
ORDINARY_CRASH = """\
Traceback (most recent call last):
  File "/work/resnet_jax/train.py", line 1, in loop
    raise ValueError("boom")
ValueError: boom
"""


@pytest.mark.parametrize("this, count, stderr, ending, said", [
    (1, 2, COORDINATOR_GONE, "os.abort()", "process 0 of 2 (the coordinator, localhost:5) "
     "stopped answering, so this process (1 of 2)"),
    (0, 3, HEARTBEATS_STOPPED, "os.abort()", "process 2 of 3 stopped answering, so this "
     "process (0 of 3)"),
    (0, 2, ORDINARY_CRASH, "sys.exit(1)", None)], ids=["coordinator", "heartbeats", "crash"])
def test_the_supervisor_turns_a_lost_peer_and_nothing_else_into_its_line(
        tmp_path, capfd, monkeypatch, this, count, stderr, ending, said):
    """peers.supervise on a child that writes what a survivor wrote in a real job, then ends as
    it did: one line naming the process, exit status 75, the stderr kept in the workdir. An
    ordinary crash passes through as it was, traceback and exit status."""
    from resnet_jax import peers

    monkeypatch.setenv("JAX_NUM_PROCESSES", str(count))
    monkeypatch.setenv("JAX_PROCESS_ID", str(this))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:5")
    child = (f"import os, sys; print('step 5/80'); sys.stderr.write('compiling ...\\n' + "
             f"{stderr!r}); sys.stderr.flush(); {ending}")
    status = peers.supervise([sys.executable, "-c", child], str(tmp_path))
    out, err = capfd.readouterr()
    assert out == "step 5/80\n"  # stdout untouched
    log = tmp_path / f"process-{this}.stderr.log"
    if said is None:
        assert status == 1 and err == "compiling ...\n" + stderr and not log.exists()
        return
    assert status == peers.PEER_LOST
    assert err == (f"compiling ...\nresnet-jax: error: {said} stops too, keeping its stderr in "
                   f"{log}. The run's last checkpoint is kept: rerun the job to resume\n")
    assert log.read_text() == "compiling ...\n" + stderr


def test_the_supervisor_passes_stop_signals_on_and_a_childs_signal_back():
    """A stop signal to the supervising parent reaches its trainer (which checkpoints on it;
    tests/test_distributed.py stops a supervised job so), and a trainer that a signal ended
    ends the parent with the same signal, as launch/local.sh reports it."""
    supervised = ("import signal, sys; from resnet_jax import peers; "
                  "sys.exit(peers.supervise([sys.executable, '-c', sys.argv[1]], None))")
    waits = ("import os, signal, sys, time; signal.signal(signal.SIGTERM, lambda s, f: "
             "sys.exit(128 + s)); print('ready', flush=True); time.sleep(60)")
    environ = {**env(), "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    parent = subprocess.Popen([sys.executable, "-c", supervised, waits], cwd=REPO, env=environ,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(parent, "ready")
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 143
    killed = subprocess.run([sys.executable, "-c", supervised, "import os; os.kill(os.getpid(), "
                             "9)"], cwd=REPO, env=environ, capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL and killed.stderr == b""


def test_a_trainer_whose_collective_lost_its_peer_ends_at_once():
    """The trainer's own exit on a collective that lost its peer (peers.exit_if_lost): without a
    supervisor (jobs JAX finds itself: SLURM, TPU) it prints the line; with one, the error, for
    the supervisor's log. Any other error returns, to be raised as before."""
    code = ("import jax, sys; from resnet_jax import peers\n"
            "jax.process_index, jax.process_count = lambda: 1, lambda: 2\n"
            "peers.exit_if_lost(ValueError('disk full'))\n"
            "def save():  # as checkpoint.Checkpointer.save wraps Orbax's error\n"
            "    try:\n"
            "        raise ValueError('UNKNOWN: Gloo AllGather failed: [pair.cc:538] Read error '\n"
            "                         '[127.0.0.1]:944: Connection reset by peer')\n"
            "    except ValueError as e:\n"
            "        raise OSError('checkpoint 4 was not written (ValueError)') from e\n"
            "try:\n"
            "    save()\n"
            "except OSError as e:\n"
            "    peers.exit_if_lost(e)\n")
    said = {}
    for supervised in ("", "4242"):
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                              text=True, timeout=120,
                              env={**env(), "JAX_COORDINATOR_ADDRESS": "localhost:5",
                                   "RESNET_JAX_SUPERVISED": supervised})
        assert proc.returncode == 75, proc.stderr
        said[supervised] = proc.stderr
    assert said[""] == ("resnet-jax: error: process 0 of 2 (the coordinator, localhost:5) "
                        "stopped answering, so this process (1 of 2) stops too. The run's last "
                        "checkpoint is kept: rerun the job to resume\n")
    assert said["4242"].startswith("UNKNOWN: Gloo AllGather failed") and "resnet-jax" not in said[
        "4242"]
