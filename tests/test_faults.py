"""Faults a long run meets, each against the behaviour the README's "what happens when" promises:
preemption (SIGTERM), kill -9 at any moment, a damaged latest checkpoint, a NaN loss and a full
disk. (A config changed between a run and its resume: tests/test_cli.py.)

Every run here is a real `python -m resnet_jax.main train` process on one CPU device: ResNet-8 on
the bundled digits, 60 steps of 32, checkpoints every 10. Resumed runs must end bit-identical to
an unbroken one: data order and augmentation are functions of (seed, step).
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from resnet_jax import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--config=resnet_jax/configs/cifar.py:depth=8,dataset=digits", "--config.batch_size=32",
        "--config.total_steps=60", "--config.log_every_steps=5", "--config.eval_every_steps=30",
        "--config.checkpoint_every_steps=10", "--config.keep_checkpoints=3"]
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # one device, no test overrides


def command(workdir, *overrides):
    return [sys.executable, "-m", "resnet_jax.main", "train", *ARGS, f"--workdir={workdir}",
            *overrides]


# Runs the command after limiting file sizes to 20 kB, as on a nearly full disk (and ignoring
# SIGXFSZ, so a write fails instead of killing the process). In a wrapper rather than a
# preexec_fn: forking the multithreaded test process is unsafe.
SMALL_FILES = [sys.executable, "-c", "import os, resource, signal, sys; "
               "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)); "
               "os.execv(sys.executable, sys.argv[1:])"]


def train(workdir, *overrides, small_files=False):
    cmd = command(workdir, *overrides)
    if small_files:
        cmd = SMALL_FILES + cmd
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def start(workdir):
    return subprocess.Popen(command(workdir), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_records(proc, workdir, count):
    """Blocks until metrics.jsonl holds `count` records (training is under way)."""
    path = workdir / "metrics.jsonl"
    while not (path.exists() and len(path.read_text().splitlines()) >= count):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)


def records(workdir):
    """metrics.jsonl without the timing, which differs between any two runs."""
    out = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for r in out:
        r.pop("examples_per_sec", None)
    return out


def checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def restore(workdir, step):
    return checkpoint.read(workdir / "checkpoints", step)


def assert_bit_identical(workdir, reference):
    assert records(workdir) == records(reference)
    a, b = restore(workdir, 60), restore(reference, 60)
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for name in ("summary.json",):
        assert (workdir / name).read_text() == (reference / name).read_text()


def last_stderr_line(stderr):
    return stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("faults") / "unbroken"
    proc = train(workdir)
    assert proc.returncode == 0, proc.stderr
    return workdir


def test_sigterm_checkpoints_and_exits_cleanly_and_the_rerun_continues(unbroken, tmp_path):
    workdir = tmp_path / "run"
    proc = start(workdir)
    wait_for_records(proc, workdir, 3)  # past step 15, between checkpoints
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    line = last_stderr_line(err)
    assert line.startswith("resnet-jax: preempted (SIGTERM) at step ") and "rerun" in line
    assert "Traceback" not in err
    stopped_at = int(line.split("at step ")[1].split(":")[0])
    assert 15 <= stopped_at < 60
    assert checkpoint_steps(workdir)[-1] == stopped_at  # saved where it stopped
    assert not (workdir / "summary.json").exists()

    proc = train(workdir)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from step {stopped_at}" in proc.stdout
    # The parameters are bit-identical; so is every record unless the stop fell inside a
    # logging window, whose mean the resumed run then takes over the steps it trained itself.
    a, b = restore(workdir, 60), restore(unbroken, 60)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert records(workdir)[-1]["test/error"] == records(unbroken)[-1]["test/error"]
    if stopped_at % 5 == 0:
        assert records(workdir) == records(unbroken)


def test_kill_9_at_any_moment_resumes_bit_identical(unbroken, tmp_path):
    workdir = tmp_path / "run"
    proc = start(workdir)
    wait_for_records(proc, workdir, 3)  # past step 15: one checkpoint behind, mid-window
    proc.kill()  # SIGKILL: no handler runs, files are left as they are
    proc.communicate()
    assert not (workdir / "summary.json").exists()

    proc = train(workdir)
    assert proc.returncode == 0, proc.stderr
    assert_bit_identical(workdir, unbroken)


def test_damaged_or_half_written_latest_checkpoint_falls_back_and_says_so(unbroken, tmp_path):
    """A damaged newest checkpoint, and what kill -9 can leave mid-write: Orbax's temporary
    directory of a newer step and a cut-off metrics record."""
    workdir = tmp_path / "run"
    shutil.copytree(unbroken, workdir)
    (workdir / "summary.json").unlink()
    for path in (workdir / "checkpoints" / "60").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\0garbage")
    shutil.copytree(workdir / "checkpoints" / "50",
                    workdir / "checkpoints" / "70.orbax-checkpoint-tmp-1234")
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 65, "train/lo')
    proc = train(workdir)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint 60 could not be read" in proc.stdout
    assert "falling back to the previous one" in proc.stdout
    assert "resuming from step 50" in proc.stdout
    assert (workdir / "checkpoints" / "60.damaged").is_dir()  # kept for inspection
    assert_bit_identical(workdir, unbroken)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    # lr 1e29 from step 20, then 1e59 (inf in float32) from step 30: the loss turns NaN.
    proc = train(workdir, "--config.lr_boundaries_steps=(20,30)", "--config.lr_decay_factor=1e30")
    assert proc.returncode == 2
    line = last_stderr_line(proc.stderr)
    assert line.startswith("resnet-jax: error: loss is not finite by step ")
    assert "last good checkpoint is kept" in line and "learning_rate" in line
    assert "Traceback" not in proc.stderr
    steps = checkpoint_steps(workdir)
    assert steps[:2] == [10, 20] and steps[-1] < int(line.split("by step ")[1].split(";")[0])
    state = restore(workdir, steps[-1])  # the checkpoint a rerun would resume from: finite
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
    assert not (workdir / "summary.json").exists()


def test_full_disk_is_a_clear_error_and_leaves_nothing_that_looks_finished(tmp_path):
    workdir = tmp_path / "run"
    proc = train(workdir, small_files=True)
    assert proc.returncode == 2
    # Orbax and TensorStore print their own traces from their threads, before or after ours.
    line, = [x for x in proc.stderr.splitlines() if x.startswith("resnet-jax: ")]
    assert line.startswith("resnet-jax: error: could not write ")
    assert "checkpoint 10 was not written (File too large)" in line
    assert "free space" in line
    assert not (workdir / "summary.json").exists()
    assert checkpoint_steps(workdir) == []  # only Orbax's temporary directory, if anything
    assert not list(workdir.glob("*.tmp"))
