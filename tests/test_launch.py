"""launch/: the dry runs print complete gcloud, srun and sbatch commands; missing variables are one
line naming the variable; the local launcher returns the first failure and stops the others.
(The local launcher running a real 2-process job: tests/test_distributed.py.)
"""
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = {"TPU_NAME": "resnet-v4-32", "ZONE": "us-central2-b", "ACCELERATOR_TYPE": "v4-32",
       "WORKDIR": "/mnt/shared/runs/r50"}


def launch(script, *args, **variables):
    base = {k: v for k, v in os.environ.items() if k not in TPU}
    return subprocess.run(["bash", f"launch/{script}", *args], cwd=REPO, env={**base, **variables},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", ["local.sh", "tpu.sh", "slurm.sh"])
def test_scripts_are_strict_and_documented(script):
    text = (REPO / "launch" / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n# ")
    assert "set -euo pipefail" in text
    assert "--dry-run" in text


@pytest.mark.parametrize("command, expected", [
    (["create"], "gcloud compute tpus tpu-vm create resnet-v4-32 --zone=us-central2-b "
                 "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"),
    (["setup"], "gcloud compute tpus tpu-vm ssh resnet-v4-32 --zone=us-central2-b --worker=all "
                "--command=tar\\ xzf\\ resnet_jax.tar.gz\\ \\&\\&\\ python3\\ -m\\ pip\\ install"),
    (["run", "resnet_jax/configs/cifar.py:depth=110", "--config.batch_size=1024"],
     "gcloud compute tpus tpu-vm ssh resnet-v4-32 --zone=us-central2-b --worker=all "
     "--command=cd\\ resnet_jax\\ \\&\\&\\ RESNET_JAX_DISTRIBUTED=1\\ python3\\ -m\\ "
     "resnet_jax.main\\ train\\ --config=resnet_jax/configs/cifar.py:depth=110\\ "
     "--workdir=/mnt/shared/runs/r50\\ --config.batch_size=1024"),
    (["sweep", "paper"], "RESNET_JAX_DISTRIBUTED=1\\ python3\\ -m\\ experiments.degradation\\ "
                         "--preset=paper\\ --root=/mnt/shared/runs/r50"),
    (["copy", "results/"], "gcloud compute tpus tpu-vm scp --recurse "
                           "resnet-v4-32:/mnt/shared/runs/r50 results/ --zone=us-central2-b "
                           "--worker=0"),
    (["delete"], "gcloud compute tpus tpu-vm delete resnet-v4-32 --zone=us-central2-b --quiet"),
])
def test_tpu_dry_run_prints_complete_gcloud_commands(command, expected):
    proc = launch("tpu.sh", "--dry-run", *command, **TPU, SPOT="1")
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout


def test_tpu_setup_ships_this_checkout_to_every_worker():
    out = launch("tpu.sh", "--dry-run", "setup", **TPU).stdout.splitlines()
    assert out[0].startswith(f"git -C {REPO} archive --format=tar.gz --prefix=resnet_jax/ -o ")
    assert out[1].startswith("gcloud compute tpus tpu-vm scp /tmp/resnet_jax-")
    assert out[1].endswith("resnet-v4-32:resnet_jax.tar.gz --zone=us-central2-b --worker=all ")
    assert "pip\\ install\\ -e\\ resnet_jax" in out[2]


@pytest.mark.parametrize("script, args, variable", [
    ("tpu.sh", ["create"], "TPU_NAME"), ("tpu.sh", ["run", "x.py"], "WORKDIR"),
    ("slurm.sh", ["run", "x.py"], "WORKDIR")])
def test_a_missing_variable_is_one_line_naming_it(script, args, variable):
    variables = {"TPU_NAME": "t", "ZONE": "z"} if variable == "WORKDIR" else {}
    proc = launch(script, "--dry-run", *args, **variables)
    assert proc.returncode == 2
    assert proc.stdout == ""
    line, = proc.stderr.splitlines()
    assert line.startswith(f"{script}: error: {variable} is not set: export {variable}=")


def test_unknown_command_is_named():
    proc = launch("tpu.sh", "--dry-run", "start", **TPU)
    assert proc.returncode == 2
    assert "unknown command 'start'" in proc.stderr


def test_slurm_run_is_one_srun_over_every_gpu():
    proc = launch("slurm.sh", "--dry-run", "run", "resnet_jax/configs/cifar.py:depth=56",
                  "--config.batch_size=512", WORKDIR="/shared/r56", NODES="2", GPUS_PER_NODE="4",
                  PARTITION="gpu", VENV="/shared/venv")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=TERM@120", "#SBATCH --requeue",
                 "source /shared/venv/bin/activate", "export RESNET_JAX_DISTRIBUTED=1  # "
                 "jax.distributed.initialize() reads SLURM's variables"]:
        assert any(x.startswith(line) for x in lines), line
    assert ("srun python -m resnet_jax.main train --config=resnet_jax/configs/cifar.py:depth=56 "
            "--workdir=/shared/r56 --config.batch_size=512 ") in lines
    assert "sbatch --parsable " in lines


def test_slurm_sweep_is_a_job_array_over_every_run_then_the_report():
    proc = launch("slurm.sh", "--dry-run", "sweep", "paper", WORKDIR="/shared/sweep")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # The paper preset: 5 depths x plain/residual x 5 seeds, and ResNet-1202 x 5 seeds.
    assert "#SBATCH --array=0-54%16" in lines
    assert ("python -m experiments.degradation --preset=paper --root=/shared/sweep "
            "--index=$SLURM_ARRAY_TASK_ID") in lines
    assert "sbatch --parsable --dependency=afterok:JOBID " in lines
    assert ("python -m experiments.degradation --preset=paper --root=/shared/sweep "
            "--plot-only") in lines


def test_local_dry_run_names_every_process():
    proc = launch("local.sh", "--dry-run", "2", "resnet-jax", "train", "--workdir=runs/a b",
                  PORT="12999", DEVICES_PER_PROCESS="4")
    assert proc.returncode == 0, proc.stderr
    first, second, wait = proc.stdout.splitlines()
    assert first.startswith("env JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 "
                            "JAX_COORDINATOR_ADDRESS=localhost:12999 ")
    assert "--xla_force_host_platform_device_count=4" in first
    assert first.endswith("resnet-jax train --workdir=runs/a\\ b  &")
    assert "JAX_PROCESS_ID=1 " in second and second.endswith("> ./process-1.log 2>&1 &")
    assert wait == "wait"


def test_local_launcher_returns_the_first_failure_and_stops_the_others(tmp_path):
    pid_file = tmp_path / "process-0.pid"
    code = ("import os, pathlib, sys, time\n"
            f"pid_file = pathlib.Path({str(pid_file)!r})\n"
            "if os.environ['JAX_PROCESS_ID'] == '0':\n"
            "    pid_file.write_text(str(os.getpid())); time.sleep(300)\n"
            "while not pid_file.exists(): time.sleep(0.05)\n"
            "sys.exit(4)")
    proc = launch("local.sh", "2", sys.executable, "-c", code, LOG_DIR=str(tmp_path))
    assert proc.returncode == 4
    # The launcher stopped process 0 and waited for it: it is gone when the launcher returns.
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_local_launcher_rejects_a_bad_process_count():
    proc = launch("local.sh", "two", "true")
    assert proc.returncode == 2
    assert "N=two is not a positive integer" in proc.stderr
