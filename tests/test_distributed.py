"""Multi-host on one machine: launch/local.sh starts 2 processes with 4 CPU devices each, which
jax.distributed joins into one 8-device job (collectives over gloo). It must train exactly what
one process with 8 devices trains on the same global batch, with one set of logs.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from resnet_jax import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--config=resnet_jax/configs/cifar.py:depth=8,dataset=digits", "--config.batch_size=32",
        "--config.total_steps=8", "--config.log_every_steps=2", "--config.eval_every_steps=4",
        "--config.checkpoint_every_steps=4"]
TRAIN = [sys.executable, "-m", "resnet_jax.main", "train", *ARGS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def env(**extra):
    base = {k: v for k, v in os.environ.items() if not k.startswith("JAX_NUM_PROC")}
    return {**base, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **extra}


def records(workdir):
    out = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for r in out:
        r.pop("examples_per_sec", None)
    return out


def restore(workdir, step):
    return checkpoint.read(workdir / "checkpoints", step)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    two = subprocess.run(
        ["bash", "launch/local.sh", "2", *TRAIN, f"--workdir={root / 'two'}"], cwd=REPO,
        env=env(DEVICES_PER_PROCESS="4", PORT=str(free_port()), LOG_DIR=str(root)),
        capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr + (root / "process-1.log").read_text()
    one = subprocess.run([*TRAIN, f"--workdir={root / 'one'}"], cwd=REPO,
                         env=env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    return root, two


def test_two_processes_train_what_one_process_trains(runs):
    root, _ = runs
    two, one = records(root / "two"), records(root / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [2, 4, 6, 8]
    for a, b in zip(two, one):
        assert a.keys() == b.keys()
        for key in a:  # the same sums, reduced in another order across processes
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    final_two, final_one = restore(root / "two", 8), restore(root / "one", 8)
    for x, y in zip(jax.tree.leaves(final_two), jax.tree.leaves(final_one), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_one_process_writes_the_logs(runs):
    root, two = runs
    # Process 0 prints progress; process 1 trains as well but reports nothing but its finish.
    assert two.stdout.count("step 8/8") == 1
    assert "step 8/8" not in (root / "process-1.log").read_text()
    assert "finished" in (root / "process-1.log").read_text()
    assert len((root / "two" / "metrics.jsonl").read_text().splitlines()) == 4
    assert json.loads((root / "two" / "summary.json").read_text())["step"] == 8


def test_pmap_is_refused_across_processes(monkeypatch):
    from resnet_jax import parallel

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError) as e:
        parallel.create_backend("pmap", 32)
    assert str(e.value) == ("parallelism=pmap runs in one process here, but this job has 2: "
                            "use parallelism=jit across processes")


def test_sigterm_stops_every_process_at_one_step_with_a_checkpoint(tmp_path):
    """As SLURM or a TPU maintenance event does: every process gets SIGTERM (here from the
    launcher, which passes it on); JAX's preemption service picks the step they all stop at."""
    workdir, port = tmp_path / "run", str(free_port())
    long_run = ["bash", "launch/local.sh", "2", *TRAIN, "--config.total_steps=100000",
                "--config.log_every_steps=5", f"--workdir={workdir}"]
    launcher = subprocess.Popen(long_run, cwd=REPO, env=env(PORT=port, LOG_DIR=str(tmp_path)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert launcher.poll() is None, launcher.communicate()
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode != 0
    logs = [err, (tmp_path / "process-1.log").read_text()]
    stops = [[line for line in log.splitlines() if "preempted (SIGTERM) at step" in line]
             for log in logs]
    assert all(len(s) == 1 for s in stops), logs
    steps = {int(s[0].split("at step ")[1].split(":")[0]) for s in stops}
    assert len(steps) == 1  # one step for both processes
    step = steps.pop()
    assert step in [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    # Resuming is the single-process code path (tests/test_faults.py).
