"""Faults of resuming beyond tests/test_faults.py: step folders that hold no checkpoint, the
record window a resume takes over (several seeds in one program, pmap, checkpoints of older
versions) and a train.lock deleted under a running trainer. Same runs as there: ResNet-8 on
the bundled digits, real `resnet-jax train` processes where the fault needs one."""
import fcntl
import shutil
import subprocess
import sys

import pytest

from resnet_jax import train as train_module
from resnet_jax.configs import cifar
from tests.test_faults import (REPO, checkpoint_steps, env, last_stderr_line, records, start,
                               train, wait_for_records)


def test_a_folder_without_a_checkpoint_is_skipped_and_restart_keeps_the_readable_ones(tmp_path):
    """An empty step folder, or one without `default/`, newer than the checkpoints: skipped
    with a line by `eval` and by a resume (once, it made every checkpoint unreadable)."""
    workdir = tmp_path / "run"
    proc = train(workdir, "--config.total_steps=20")
    assert proc.returncode == 0, proc.stderr
    (workdir / "checkpoints" / "25").mkdir()
    (workdir / "checkpoints" / "27").mkdir()
    (workdir / "checkpoints" / "27" / "_CHECKPOINT_METADATA").write_text("{}")

    proc = subprocess.run([sys.executable, "-m", "resnet_jax.main", "eval",
                           f"--workdir={workdir}"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"loaded checkpoint 20 of {workdir}" in proc.stdout
    assert "checkpoints/27 holds no checkpoint (no default/); skipped" in proc.stdout

    # --restart reads as a plain resume does: checkpoint 20 is read, and kept.
    proc = train(workdir, "--config.total_steps=30", "--restart")
    assert proc.returncode == 0, proc.stderr
    assert "checkpoints/25 holds no checkpoint" in proc.stdout
    assert "resuming from step 20" in proc.stdout
    assert checkpoint_steps(workdir) == [10, 20, 30]
    assert (workdir / "checkpoints" / "25.damaged").is_dir()  # out of the way of step 25's save
    assert [r["step"] for r in records(workdir)] == [4, 8, 12, 16, 20, 24, 28, 30]


def window_config(seed=0, **overrides):
    """6 steps, a record at 4 and 6, checkpoints at 3 and 6: step 3 lies inside a window."""
    c = cifar.get_config(f"depth=8,dataset=digits,seed={seed}")
    c.update(batch_size=32, total_steps=6, log_every_steps=4, eval_every_steps=6,
             checkpoint_every_steps=3, eval_subset=100, log_diagnostics=False, **overrides)
    return c


def resume_at_3(unbroken, resumed):
    """`resumed`: `unbroken` as kill -9 leaves it after checkpoint 3."""
    shutil.copytree(unbroken, resumed)
    (resumed / "summary.json").unlink()
    shutil.rmtree(resumed / "checkpoints" / "6")


@pytest.mark.parametrize("overrides, seeds", [({"parallelism": "pmap", "num_devices": 2}, [0]),
                                              ({"steps_per_call": 2}, [0, 1])],
                         ids=["pmap", "two-seeds-in-one-program"])
def test_a_run_resumed_between_two_records_logs_what_the_unbroken_run_logs(tmp_path, overrides,
                                                                         seeds):
    """Checkpoint 3's record window (steps 1-3) goes into the record of step 4, as in the
    unbroken run: the same records and summaries, bit for bit, for each run of the program."""
    configs = [window_config(seed, **overrides) for seed in seeds]
    unbroken = [tmp_path / f"unbroken{s}" for s in seeds]
    resumed = [tmp_path / f"resumed{s}" for s in seeds]
    summaries = train_module.train_runs(configs, unbroken)
    for u, r in zip(unbroken, resumed):
        resume_at_3(u, r)
    assert train_module.train_runs(configs, resumed) == summaries
    for u, r in zip(unbroken, resumed):
        assert [x["step"] for x in records(u)] == [4, 6]
        assert records(r) == records(u)


def test_a_checkpoint_without_a_record_window_resumes_and_says_so(tmp_path, capsys):
    """A checkpoint of a version before the window: the run resumes, and its next record
    averages the steps trained since, as it says."""
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    summary = train_module.train_and_evaluate(window_config(), str(unbroken))
    resume_at_3(unbroken, resumed)
    shutil.rmtree(resumed / "checkpoints" / "3" / "window")
    capsys.readouterr()
    assert train_module.train_and_evaluate(window_config(), str(resumed))["test/error"] == (
        summary["test/error"])
    assert (f"checkpoint 3 in {resumed} holds no record window (written by an older version): "
            "the next record averages the steps from 3 on, not from 0") in capsys.readouterr().out
    first = records(resumed)[0]
    assert first["step"] == 4 and first["train/loss"] != records(unbroken)[0]["train/loss"]
    assert records(resumed)[1:] == records(unbroken)[1:]


def test_a_deleted_train_lock_is_taken_again_and_a_trainer_that_lost_it_stops(tmp_path):
    """`rm train.lock` under a running trainer: it locks a new one before its next write, so a
    second trainer is still refused; if another trainer holds the new file first, the running
    one stops with one line instead of writing beside it."""
    workdir = tmp_path / "run"
    first = start(workdir, "--config.total_steps=100000",
                  "--config.checkpoint_every_steps=100000")
    lock = workdir / "train.lock"
    try:
        wait_for_records(first, workdir, 1)
        lock.unlink()
        # Taken again before the next record (two: one may have been checked before the unlink).
        lines = len((workdir / "metrics.jsonl").read_text().splitlines())
        wait_for_records(first, workdir, lines + 2)
        assert lock.exists()
        proc = train(workdir, "--config.total_steps=20")
        assert proc.returncode == 2, proc.stdout
        assert f"in use by another trainer (pid {first.pid} on " in last_stderr_line(proc.stderr)

        while True:  # another trainer's lock in its place (unless the first is quicker again)
            lock.unlink(missing_ok=True)
            other = lock.open("a+")
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                other.close()
        other.write("pid 1 on elsewhere\n")
        other.flush()
        out, err = first.communicate(timeout=300)
        other.close()
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 2, err
    assert f"warning: {lock} was deleted or replaced while training: locked again" in out
    assert "Traceback" not in err
    assert last_stderr_line(err) == (
        f"resnet-jax: error: {lock} was deleted and another trainer took the workdir (pid 1 on "
        "elsewhere): this one stops here, writing nothing more; let the other one finish, or "
        "stop it and rerun")


# A few programs, each compiled through the compilation cache as `resnet-jax` uses it.
COMPILE = ("from resnet_jax import parallel\n"
           "parallel.use_compilation_cache()\n"
           "import jax, jax.numpy as jnp\n"
           "for k in range(3):\n"
           "    jax.jit(lambda x: jnp.sin(x) * k)(jnp.ones((4 + k,))).block_until_ready()\n")
# Files limited to 1 kB, less than an entry (a full disk), as tests/test_faults.SMALL_FILES does.
TINY_FILES = [sys.executable, "-c", "import os, resource, signal, sys; "
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)); "
              "os.execv(sys.executable, sys.argv[1:])"]


def compile_some(cache, *wrapper):
    proc = subprocess.run([*wrapper, sys.executable, "-c", COMPILE], cwd=REPO,
                          env={**env(), "RESNET_JAX_COMPILE_CACHE": str(cache)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.splitlines()


def test_damaged_compile_cache_entries_are_removed_and_written_again(tmp_path):
    cache = tmp_path / "cache"
    assert compile_some(cache) == []
    entries = sorted(cache.glob("*-cache"))
    assert len(entries) >= 3
    entries[0].write_bytes(b"")  # what a full disk left before entries were written whole
    entries[1].write_bytes(entries[1].read_bytes()[:100])
    entries[2].write_bytes(b"\0garbage" * 100)
    [line] = compile_some(cache)
    assert line.startswith(f"warning: removed unreadable entries of the compilation cache {cache} ")
    assert line.endswith("; compiling them again")
    assert compile_some(cache) == []  # written again, whole
    assert sorted(cache.glob("*-cache")) == entries


def test_a_full_disk_leaves_no_cut_compile_cache_entry(tmp_path):
    cache = tmp_path / "cache"
    [line] = compile_some(cache, *TINY_FILES)
    assert line.startswith(f"warning: cannot write to the compilation cache {cache} (File too "
                           "large)")
    assert sorted(cache.iterdir()) == []  # no entry, cut or whole, and no temporary
    assert compile_some(cache) == []
