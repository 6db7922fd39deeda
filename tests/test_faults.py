"""Faults a long run meets, each against the behaviour docs/failures.md promises: preemption
(SIGTERM) and Ctrl-C (SIGINT), kill -9 at any moment, a damaged latest checkpoint or none
readable, a NaN loss or NaN parameters, a full disk, changed data, a second trainer on the
workdir, a lost final record and a lowered total_steps. (A config changed between a run and its
resume: tests/test_cli.py.)

Every run here is a real `python -m resnet_jax.main train` process on one CPU device: ResNet-8 on
the bundled digits, 60 steps of 32, checkpoints every 10, records every 4 (so that most
checkpoints fall between two records). Resumed runs must end bit-identical to an unbroken one:
data order and augmentation are functions of (seed, step), and each checkpoint holds the
metrics of the steps since the last record.
"""
import json
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from resnet_jax import checkpoint, metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--config=resnet_jax/configs/cifar.py:depth=8,dataset=digits", "--config.batch_size=32",
        "--config.total_steps=60", "--config.log_every_steps=4", "--config.eval_every_steps=30",
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


def env():
    """ENV with this test session's decoded-data cache (conftest.py), where one is set."""
    return {**ENV, "RESNET_JAX_CACHE": os.environ.get("RESNET_JAX_CACHE", "")}


def train(workdir, *overrides, small_files=False):
    cmd = command(workdir, *overrides)
    if small_files:
        cmd = SMALL_FILES + cmd
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)


def start(workdir, *overrides):
    return subprocess.Popen(command(workdir, *overrides), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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
        for key in metrics.TIMING_KEYS:
            r.pop(key, None)
    return out


def checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def restore(workdir, step):
    return checkpoint.read(workdir / "checkpoints", step)


def tensorboard_scalars(workdir):
    """{tag: [(step, value), ...]} from every TensorBoard event file, read as TFRecords (a
    length, its CRC, an Event proto, its CRC) in file-name order, as TensorBoard reads them."""
    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):  # not the run's HParams session
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def assert_tensorboard_holds_the_records(workdir):
    """TensorBoard holds each record of metrics.jsonl once, nothing else, and the run's
    HParams session started once (ended at most once)."""
    from tests.test_cli import run_hparams

    starts, ends, _ = run_hparams(workdir)
    assert len(starts) == 1 and len(ends) <= 1
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    want = {}
    for record in lines:
        for key, value in record.items():
            if key not in ("step", "time"):  # TensorBoard has its own wall time
                want.setdefault(key, []).append((record["step"], float(np.float32(value))))
    assert tensorboard_scalars(workdir) == want


def assert_bit_identical(workdir, reference):
    assert records(workdir) == records(reference)
    assert_tensorboard_holds_the_records(workdir)
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


# Ctrl-C and a closed terminal are treated as a preemption is: a checkpoint, one line, exit
# 128 + the signal's number.
@pytest.mark.parametrize("signum, status, stopped", [(signal.SIGTERM, 143, "preempted (SIGTERM)"),
                                                     (signal.SIGINT, 130, "interrupted (SIGINT)"),
                                                     (signal.SIGHUP, 129, "hung up (SIGHUP)")],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_checkpoints_and_exits_cleanly_and_the_rerun_continues(unbroken, tmp_path, signum,
                                                                          status, stopped):
    workdir = tmp_path / "run"
    proc = start(workdir)
    wait_for_records(proc, workdir, 3)  # past step 12, between checkpoints
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == status, err
    assert "Traceback" not in err
    line = last_stderr_line(err)
    assert line.startswith(f"resnet-jax: {stopped} at step ")
    assert line.endswith("rerun the same command to continue")
    stopped_at = int(line.split("at step ")[1].split(":")[0])
    assert 12 <= stopped_at < 60
    assert checkpoint_steps(workdir)[-1] == stopped_at  # saved where it stopped
    assert not (workdir / "summary.json").exists()

    proc = train(workdir)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from step {stopped_at}" in proc.stdout
    # Wherever it stopped, between two records too (whose mean takes in the steps before the
    # stop, kept with the checkpoint): bit-identical.
    assert_bit_identical(workdir, unbroken)


def test_kill_9_at_any_moment_resumes_bit_identical(unbroken, tmp_path):
    workdir = tmp_path / "run"
    proc = start(workdir)
    wait_for_records(proc, workdir, 3)  # past step 12: checkpoint 10, between two records
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
    assert line.startswith("resnet-jax: error: loss is not finite by step ") or line.startswith(
        "resnet-jax: error: parameters are not finite by step ")
    # The same workdir would refuse a lower learning_rate as a changed config.
    assert "last good checkpoint is kept" in line and "learning_rate" in line
    assert "new --workdir" in line
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
    # Orbax and TensorStore print their own traces from their threads (TensorStore straight to
    # fd 2), before or after ours, and a write of theirs without its newline can come first on
    # our line: ours is the one line from "resnet-jax: " on.
    line, = [x[x.index("resnet-jax: "):] for x in proc.stderr.splitlines() if "resnet-jax: " in x]
    assert line.startswith("resnet-jax: error: could not write ")
    assert "checkpoint 10 was not written (File too large)" in line
    assert "free space" in line
    assert not (workdir / "summary.json").exists()
    assert checkpoint_steps(workdir) == []  # only Orbax's temporary directory, if anything
    assert not list(workdir.glob("*.tmp"))


def test_nan_parameters_are_never_checkpointed(tmp_path):
    """lr 1e39 (inf in float32): step 1's loss is finite, the parameters it leaves are not."""
    workdir = tmp_path / "run"
    proc = train(workdir, "--config.learning_rate=1e39", "--config.checkpoint_every_steps=1")
    assert proc.returncode == 2, proc.stderr
    line = last_stderr_line(proc.stderr)
    assert line.startswith("resnet-jax: error: parameters are not finite by step 1;"), line
    assert "new --workdir" in line
    assert checkpoint_steps(workdir) == []


def make_image_folder(root, classes):
    """root/{train,test}/<class>/<i>.png: 8x8 RGB noise, 8 training and 2 test images a class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 2)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(image).save(root / split / cls / f"{i}.png")


def test_a_changed_dataset_is_refused_and_its_checkpoints_kept(tmp_path):
    """A folder that gained a class: refused before anything is written, whether the workdir
    recorded its dataset (dataset.json) or, as runs of older versions, did not."""
    images, workdir = tmp_path / "images", tmp_path / "run"
    make_image_folder(images, "abc")
    folder = [f"--config.dataset=folder:{images}", "--config.batch_size=8",
              "--config.total_steps=10", "--config.eval_every_steps=10"]
    proc = train(workdir, *folder)
    assert proc.returncode == 0, proc.stderr
    make_image_folder(images, "d")
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.name != "train.lock"}

    proc = train(workdir, *folder, "--config.total_steps=20")
    assert proc.returncode == 2, proc.stdout
    line = last_stderr_line(proc.stderr)
    assert line.startswith(f"resnet-jax: error: workdir {workdir} holds a run on different data")
    assert "num_classes 3 -> 4" in line and "use a new --workdir" in line
    assert "Traceback" not in proc.stderr

    (workdir / "dataset.json").unlink()  # a workdir written before dataset.json existed
    proc = train(workdir, *folder, "--config.total_steps=20")
    assert proc.returncode == 2, proc.stdout
    line = last_stderr_line(proc.stderr)
    assert line.startswith(f"resnet-jax: error: workdir {workdir} holds checkpoints of a "
                           "different setup (checkpoint 10: "), line
    assert "use a new --workdir" in line
    del before[workdir / "dataset.json"]
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.name != "train.lock"} == before


def test_unreadable_checkpoints_stop_the_run_unless_restart_is_asked(unbroken, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(unbroken, workdir)
    (workdir / "summary.json").unlink()
    for step in (40, 50, 60):
        for path in (workdir / "checkpoints" / str(step)).rglob("*"):
            if path.is_file():
                path.write_bytes(b"\0garbage")
    proc = train(workdir)
    assert proc.returncode == 2, proc.stdout
    line = last_stderr_line(proc.stderr)
    assert line.startswith(f"resnet-jax: error: no checkpoint in {workdir / 'checkpoints'} "
                           "could be read (tried 60, 50, 40)"), line
    assert "--restart" in line and "Traceback" not in proc.stderr
    assert checkpoint_steps(workdir) == [40, 50, 60]  # nothing moved

    proc = train(workdir, "--restart")
    assert proc.returncode == 0, proc.stderr
    assert all((workdir / "checkpoints" / f"{s}.damaged").is_dir() for s in (40, 50, 60))
    assert_bit_identical(workdir, unbroken)  # metrics and TensorBoard start over too


def test_a_finished_run_that_lost_its_last_record_evaluates_and_finishes(unbroken, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(unbroken, workdir)
    (workdir / "summary.json").unlink()
    text = (workdir / "metrics.jsonl").read_text()
    (workdir / "metrics.jsonl").write_text(text[:text.rindex('"test/error"')])  # step 60 cut
    proc = train(workdir)
    assert proc.returncode == 0, proc.stderr
    assert "evaluating it" in proc.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    want = json.loads((unbroken / "summary.json").read_text())
    assert summary["step"] == 60 and summary["test/error"] == want["test/error"]
    # Its train error is the last logged one: step 56's.
    assert summary["train/error"] == records(workdir)[-1]["train/error"] == records(unbroken)[-2][
        "train/error"]
    assert "already finished" in train(workdir).stdout


def test_total_steps_below_the_latest_checkpoint_is_refused(unbroken, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(unbroken, workdir)
    (workdir / "summary.json").unlink()
    proc = train(workdir, "--config.total_steps=30")
    assert proc.returncode == 2, proc.stdout
    line = last_stderr_line(proc.stderr)
    assert "checkpoint 60" in line and "total_steps=30" in line, line
    assert not (workdir / "summary.json").exists()
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 60


def test_a_second_trainer_on_one_workdir_is_refused_and_kill_9_frees_the_workdir(tmp_path):
    workdir = tmp_path / "run"
    first = start(workdir, "--config.total_steps=100000",
                  "--config.checkpoint_every_steps=100000")  # never saves before it is killed
    try:
        wait_for_records(first, workdir, 1)
        proc = train(workdir, "--config.total_steps=20")
        assert proc.returncode == 2, proc.stdout
        line = last_stderr_line(proc.stderr)
        assert line.startswith(f"resnet-jax: error: workdir {workdir} is in use by another "
                               f"trainer (pid {first.pid} on "), line
        assert "Traceback" not in proc.stderr
        assert first.poll() is None
    finally:
        first.kill()  # SIGKILL: the kernel releases its lock
        first.communicate()
    proc = train(workdir, "--config.total_steps=10")  # no checkpoint yet: trains from 0
    assert proc.returncode == 0, proc.stderr


def test_load_changes_nothing_and_says_which_step_it_loaded(unbroken, tmp_path, capsys):
    import resnet_jax

    workdir = tmp_path / "run"
    shutil.copytree(unbroken, workdir)
    for path in (workdir / "checkpoints" / "60").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\0garbage")
    before = {str(p): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}
    assert resnet_jax.load(workdir).step == 50
    assert {str(p): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()} == before
    out = capsys.readouterr().out
    assert f"loaded checkpoint 50 of {workdir}" in out
    assert "summary.json says step 60" in out
