"""launch/: the dry runs print complete gcloud, srun and sbatch commands, which run each path and
value as one argument and nothing else; --dry-run is honoured wherever it is; missing variables
are one line naming the variable; the local launcher returns the first failure and stops the others.
(The local launcher running a real 2-process job: tests/test_distributed.py.)
"""
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = {"TPU_NAME": "resnet-v4-32", "ZONE": "us-central2-b", "ACCELERATOR_TYPE": "v4-32",
       "WORKDIR": "/mnt/shared/runs/r50"}


# This Python first: the launchers ask `python3 -m experiments.sweep --list` for a sweep's runs.
PATH = f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"
SLURM = ["NODES", "GPUS_PER_NODE", "TASKS_PER_NODE", "VENV", "PARTITION", "ACCOUNT"]


def launch(script, *args, cwd=REPO, **variables):
    base = {k: v for k, v in os.environ.items() if k not in TPU and k not in SLURM}
    return subprocess.run([REPO / "launch" / script, *args], cwd=cwd,
                          env={**base, "PATH": PATH, **variables},
                          capture_output=True, text=True, timeout=120)


# A config value that a shell would split or refuse unquoted.
STEPS = "--config.lr_boundaries_steps=(32000, 48000)"
CIFAR = "resnet_jax/configs/cifar.py:depth=8"
PAPER = "--sweep=experiments/sweeps/degradation.py:preset=paper"


def fakes(tmp_path):
    """Two folders of stand-ins to put first on PATH. cloud/: gcloud, sbatch and srun that only
    record being called, in tmp_path/calls (sbatch answers a job id). worker/: gcloud ... ssh
    --command=C that runs C the way each worker's shell does (bash -c C), srun that runs its
    command, and python, python3, resnet-jax and tar that print their name, their directory and
    their argv, one a line."""
    cloud, worker = tmp_path / "cloud", tmp_path / "worker"
    calls = shlex.quote(str(tmp_path / "calls"))
    programs = {cloud / name: f'echo "{name} $*" >> {calls}\n' for name in ["gcloud", "srun"]}
    programs[cloud / "sbatch"] = f'echo "sbatch $*" >> {calls}\necho 1234\n'
    programs[worker / "gcloud"] = ('for arg; do [[ $arg == --command=* ]] && '
                                   'exec bash -c "${arg#--command=}"; done; exit 1\n')
    programs[worker / "srun"] = 'exec "$@"\n'
    for name in ["python", "python3", "resnet-jax", "tar"]:
        programs[worker / name] = f'echo "{name} in $PWD"; printf "%s\\n" "$@"\n'
    for path, body in programs.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
    return cloud, worker


def this_python3(folder):
    """folder/python3: this Python (with this project installed) under that name."""
    python3 = folder / "python3"
    python3.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python3.chmod(0o755)


def on_path(folder):
    return f"{folder}:{PATH}"


def shell(command, cwd, path, **variables):
    """Runs a printed command as a shell does, with `path` as PATH."""
    return subprocess.run(["bash", "-c", command], cwd=cwd, env={**os.environ, "PATH": path,
                          **variables}, capture_output=True, text=True, timeout=60)


def batch_scripts(dry_run_output):
    """The batch scripts slurm.sh --dry-run prints, in order."""
    parts = dry_run_output.split("# --- batch script ---\n")[1:]
    return [part.split("# --- submitted with ---")[0] for part in parts]


def sbatch_arguments(script):
    """The arguments sbatch reads from a script's #SBATCH lines, as Slurm's src/sbatch/opt.c
    (_get_argument) reads them: an unquoted blank ends an argument even after a backslash, a
    backslash takes the next character as it is, quotes group, an unquoted # ends the line; the
    lines end at the first line that is not a comment. Returns one list of arguments per line."""
    lines = []
    for line in script.splitlines():
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.lstrip().startswith("#"):
                break
            continue
        args, word, quote, escaped = [], "", None, False
        for char in line[len("#SBATCH"):]:
            if not quote and char.isspace():
                if word:
                    args.append(word)
                word, escaped = "", False
                continue
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
                continue
            elif quote:
                if char == quote:
                    quote = None
                    continue
            elif char in "\"'":
                quote = char
                continue
            elif char == "#":
                break
            word += char
        assert quote is None, f"sbatch refuses an unmatched quote: {line}"
        if word:
            args.append(word)
        lines.append(args)
    return lines


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
    (["sweep", PAPER], "RESNET_JAX_DISTRIBUTED=1\\ python3\\ -m\\ experiments.sweep\\ "
                       f"{PAPER}\\ --root=/mnt/shared/runs/r50"),
    (["copy", "results/"], "gcloud compute tpus tpu-vm scp --recurse "
                           "resnet-v4-32:/mnt/shared/runs/r50 results/ --zone=us-central2-b "
                           "--worker=0"),
    (["delete"], "gcloud compute tpus tpu-vm delete resnet-v4-32 --zone=us-central2-b --quiet"),
])
def test_tpu_dry_run_prints_complete_gcloud_commands(command, expected):
    proc = launch("tpu.sh", "--dry-run", *command, **TPU, SPOT="1")
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout


def test_tpu_sweep_per_chip_gives_each_worker_its_share_then_reports():
    proc = launch("tpu.sh", "--dry-run", "sweep-per-chip", "--grid=depth=20,56", "--seeds=3",
                  **TPU, WORKERS="4")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 5
    for w, line in enumerate(lines[:4]):
        assert f"--worker={w} " in line
        assert (f"python3\\ -m\\ experiments.sweep\\ --grid=depth=20\\\\\\,56\\ --seeds=3\\ "
                f"--root=/mnt/shared/runs/r50\\ --devices-per-run=1\\ --platform=tpu\\ "
                f"--shard={w}/4\\ --no-report") in line, line
    assert "--worker=0 " in lines[4] and "experiments.report\\ --root=/mnt/shared/runs/r50" in lines[4]
    proc = launch("tpu.sh", "--dry-run", "sweep-per-chip", PAPER, **TPU)
    assert proc.returncode == 2 and "WORKERS is not set" in proc.stderr


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
                 "#SBATCH --open-mode=append",
                 "source /shared/venv/bin/activate", "export RESNET_JAX_DISTRIBUTED=1  # "
                 "jax.distributed.initialize() reads SLURM's variables"]:
        assert any(x.startswith(line) for x in lines), line
    assert ("srun python3 -m resnet_jax.main train --config=resnet_jax/configs/cifar.py:depth=56 "
            "--workdir=/shared/r56 --config.batch_size=512") in lines
    assert "sbatch --parsable " in lines


@pytest.mark.parametrize("variables, tasks", [({"GPUS_PER_NODE": "0"}, 1),
                                              ({"GPUS_PER_NODE": "0", "TASKS_PER_NODE": "2"}, 2)])
def test_slurm_on_a_cpu_partition_requests_no_gpu(variables, tasks):
    run = launch("slurm.sh", "--dry-run", "run", CIFAR, WORKDIR="/shared/r8", **variables)
    sweep = launch("slurm.sh", "--dry-run", "sweep", "--grid=depth=8,14", WORKDIR="/shared/s",
                   **variables)
    assert run.returncode == sweep.returncode == 0, run.stderr + sweep.stderr
    assert f"#SBATCH --ntasks-per-node={tasks}" in run.stdout.splitlines()
    assert "#SBATCH --ntasks=1" in sweep.stdout.splitlines()
    assert "gpu" not in run.stdout + sweep.stdout


@pytest.mark.parametrize("variables, error", [
    ({"TASKS_PER_NODE": "2"}, "TASKS_PER_NODE=2 with GPUS_PER_NODE=8: JAX gives each SLURM task "
                              "one GPU"),
    ({"GPUS_PER_NODE": "-1"}, "GPUS_PER_NODE=-1: set it to an integer of at least 0"),
    ({"GPUS_PER_NODE": "0", "TASKS_PER_NODE": "0"}, "TASKS_PER_NODE=0: set it to an integer of "
                                                    "at least 1"),
    ({"NODES": "two"}, "NODES=two: set it to an integer of at least 1"),
    ({"TERM_BEFORE_LIMIT": "2m"}, "TERM_BEFORE_LIMIT=2m: set it to an integer of at least 1"),
])
def test_slurm_refuses_a_bad_count(variables, error):
    proc = launch("slurm.sh", "--dry-run", "run", CIFAR, WORKDIR="/shared/r8", **variables)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"slurm.sh: error: {error}" + proc.stderr.split(error)[1]
    assert len(proc.stderr.splitlines()) == 1


def test_slurm_signal_before_the_time_limit_is_settable():
    proc = launch("slurm.sh", "--dry-run", "run", CIFAR, WORKDIR="/shared/r8",
                  TERM_BEFORE_LIMIT="30", TIME="1")
    assert proc.returncode == 0, proc.stderr
    assert {"#SBATCH --signal=TERM@30", "#SBATCH --time=1"} <= set(proc.stdout.splitlines())


def test_slurm_relative_workdir_is_made_absolute_where_it_was_given(tmp_path):
    # The jobs start in the repository: the run and its SLURM log go where the user stood.
    cloud, worker = fakes(tmp_path)
    proc = launch("slurm.sh", "--dry-run", "run", CIFAR, cwd=tmp_path, WORKDIR="runs/r8",
                  PATH=on_path(cloud))
    assert proc.returncode == 0, proc.stderr
    script, = batch_scripts(proc.stdout)
    assert [f"--output={tmp_path}/runs/r8/slurm-%j.out"] in sbatch_arguments(script)
    job = shell(script, tmp_path, on_path(worker))
    assert f"--workdir={tmp_path}/runs/r8" in job.stdout.splitlines(), job.stderr


def test_slurm_sweep_lists_its_runs_with_the_venvs_python3(tmp_path):
    # From a shell where no venv is active and `python` does not exist: VENV's python3 lists the
    # runs; without VENV, python3 does.
    cloud, _ = fakes(tmp_path)
    path = f"{cloud}:/usr/bin:/bin"
    assert subprocess.run(["bash", "-c", "command -v python"], env={"PATH": path}).returncode
    proc = launch("slurm.sh", "--dry-run", "sweep", "--grid=depth=8,14,20", WORKDIR="/shared/s",
                  VENV=sys.prefix, PATH=path)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --array=0-2%16" in proc.stdout.splitlines()
    (tmp_path / "bin").mkdir()
    this_python3(tmp_path / "bin")
    proc = launch("slurm.sh", "--dry-run", "sweep", "--grid=depth=8,14", WORKDIR="/shared/s",
                  PATH=f"{tmp_path / 'bin'}:{path}")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --array=0-1%16" in proc.stdout.splitlines()


def test_slurm_sweep_is_a_job_array_over_every_run_then_the_report():
    proc = launch("slurm.sh", "--dry-run", "sweep", PAPER, WORKDIR="/shared/sweep")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # The paper preset: 5 depths x plain/residual x 5 seeds, and ResNet-1202 x 5 seeds.
    assert "#SBATCH --array=0-54%16" in lines
    assert "#SBATCH --gpus-per-task=1" in lines
    assert (f"srun python3 -m experiments.sweep {PAPER} --root=/shared/sweep "
            "--index=$SLURM_ARRAY_TASK_ID --no-report") in lines
    assert "sbatch --parsable --dependency=afterok:JOBID " in lines
    assert "python3 -m experiments.report --root=/shared/sweep" in lines


def test_slurm_sweep_of_a_grid_and_bad_sweeps():
    proc = launch("slurm.sh", "--dry-run", "sweep", "--grid=depth=20,56", "--grid=residual=true,false",
                  "--seeds=3", "--config.total_steps=4000", WORKDIR="/shared/grid")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --array=0-11%16" in proc.stdout.splitlines()
    proc = launch("slurm.sh", "--dry-run", "sweep", "--grid=dpth=20", WORKDIR="/shared/grid")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "unknown key 'dpth'" in proc.stderr
    proc = launch("slurm.sh", "--dry-run", "sweep", PAPER, "--root=/x", WORKDIR="/shared/grid")
    assert proc.returncode == 2 and "WORKDIR is the sweep's root" in proc.stderr


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
    # One line names the process that ended, not its peers' tracebacks alone.
    assert proc.stderr.splitlines()[0].startswith("local.sh: process 1 of 2 (pid ")
    assert ") ended with exit status 4: stopping the others" in proc.stderr.splitlines()[0]
    # The launcher stopped process 0 and waited for it: it is gone when the launcher returns.
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_local_launcher_rejects_a_bad_process_count():
    proc = launch("local.sh", "two", "true")
    assert proc.returncode == 2
    assert "N=two is not a positive integer" in proc.stderr


@pytest.mark.parametrize("command", ["setup", "run", "sweep"])
def test_tpu_workers_get_every_path_and_value_whole(tmp_path, command):
    # The printed gcloud command, run by a shell, hands each worker's shell a --command that runs
    # the program with exactly these arguments, and nothing else.
    cloud, worker = fakes(tmp_path)
    home = tmp_path / "home"  # where each worker's shell starts
    repo_dir = "my repo; touch injected"
    (home / repo_dir).mkdir(parents=True)
    workdir = f"/mnt/my runs/r1; touch {home}/injected"
    args = {"setup": ["setup"], "run": ["run", CIFAR, STEPS], "sweep": ["sweep", PAPER, STEPS]
            }[command]
    proc = launch("tpu.sh", "--dry-run", *args, **TPU | {"WORKDIR": workdir},
                  REPO_DIR=repo_dir, PATH=on_path(cloud))
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "calls").exists()
    ssh, = [line for line in proc.stdout.splitlines() if " ssh " in line]
    workers = shell(ssh, home, on_path(worker))
    in_repo = f"python3 in {home / repo_dir}"
    assert workers.stdout.splitlines() == {
        "setup": [f"tar in {home}", "xzf", "resnet_jax.tar.gz",
                  f"python3 in {home}", "-m", "pip", "install", "-U", "jax[tpu]",
                  f"python3 in {home}", "-m", "pip", "install", "-e", repo_dir],
        "run": [in_repo, "-m", "resnet_jax.main", "train", f"--config={CIFAR}",
                f"--workdir={workdir}", STEPS],
        "sweep": [in_repo, "-m", "experiments.sweep", PAPER, STEPS, f"--root={workdir}"],
    }[command], workers.stderr
    assert not (home / "injected").exists()


def test_tpu_copy_refuses_a_workdir_that_scp_would_split(tmp_path):
    # scp hands a remote path to the worker's shell (or, since OpenSSH 9, reads it as it is), so
    # no quoting is right for both: refused before gcloud is called.
    cloud, _ = fakes(tmp_path)
    proc = launch("tpu.sh", "copy", str(tmp_path / "results"),
                  **TPU | {"WORKDIR": f"/mnt/my runs/r1; touch {tmp_path}/injected"},
                  PATH=on_path(cloud))
    assert proc.returncode == 2
    line, = proc.stderr.splitlines()
    assert line.startswith("tpu.sh: error: copy cannot hand WORKDIR=")
    assert not (tmp_path / "calls").exists()


@pytest.mark.parametrize("command", ["run", "run without overrides", "sweep"])
def test_slurm_jobs_get_every_path_and_value_whole(tmp_path, command):
    # Each #SBATCH line is one argument to sbatch, the --output path included (a % doubled, since
    # sbatch reads %j there); the batch script, run by bash, runs the program with exactly these
    # arguments, and nothing else (no empty one where there are no overrides).
    cloud, worker = fakes(tmp_path)
    workdir = f"{tmp_path}/100% my runs; touch {tmp_path}/injected"
    venv = tmp_path / "my venv; (jax)"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("true\n")
    this_python3(venv / "bin")  # lists the sweep's runs
    args = {"run": ["run", CIFAR, STEPS], "run without overrides": ["run", CIFAR],
            "sweep": ["sweep", PAPER, STEPS]}[command]
    proc = launch("slurm.sh", "--dry-run", *args, WORKDIR=workdir, VENV=str(venv),
                  PATH=on_path(cloud))
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "calls").exists()
    output = f"--output={tmp_path}/100%% my runs; touch {tmp_path}/injected/slurm-"
    python = [f"python3 in {REPO}", "-m"]
    train = python + ["resnet_jax.main", "train", f"--config={CIFAR}", f"--workdir={workdir}"]
    expected = {
        "run": [(output + "%j.out", train + [STEPS])],
        "run without overrides": [(output + "%j.out", train)],
        "sweep": [(output + "%A_%a.out", python + ["experiments.sweep", PAPER, STEPS,
                                                   f"--root={workdir}", "--index=3",
                                                   "--no-report"]),
                  (output + "%j.out", python + ["experiments.report", f"--root={workdir}"])],
    }[command]
    scripts = batch_scripts(proc.stdout)
    assert len(scripts) == len(expected)
    for script, (output_arg, argv) in zip(scripts, expected):
        lines = sbatch_arguments(script)
        assert all(len(args) == 1 for args in lines), lines
        assert [output_arg] in lines, lines
        job = shell(script, tmp_path, on_path(worker), SLURM_ARRAY_TASK_ID="3")
        assert job.stdout.splitlines() == argv, job.stderr
    assert not (tmp_path / "injected").exists()


def test_slurm_refuses_a_line_break_no_sbatch_line_can_carry(tmp_path):
    cloud, _ = fakes(tmp_path)
    proc = launch("slurm.sh", "run", CIFAR, WORKDIR=f"{tmp_path}/runs\ntouch injected",
                  PATH=on_path(cloud))
    assert proc.returncode == 2
    line, = proc.stderr.splitlines()
    assert line.startswith("slurm.sh: error: WORKDIR holds a line break")
    assert not (tmp_path / "calls").exists() and not (tmp_path / "runs").exists()


def test_local_dry_run_runs_every_path_and_value_whole(tmp_path):
    # The printed lines, run by a shell, start each process with exactly these arguments and
    # send process 1's output to LOG_DIR, and run nothing else.
    _, worker = fakes(tmp_path)
    log_dir = "my logs; touch injected #"
    (tmp_path / log_dir).mkdir()
    workdir = "my runs; touch injected"
    proc = launch("local.sh", "--dry-run", "2", "resnet-jax", "train", f"--workdir={workdir}",
                  STEPS, LOG_DIR=log_dir)
    assert proc.returncode == 0, proc.stderr
    processes = shell(proc.stdout, tmp_path, on_path(worker))
    expected = [f"resnet-jax in {tmp_path}", "train", f"--workdir={workdir}", STEPS]
    assert processes.stdout.splitlines() == expected, processes.stderr
    assert (tmp_path / log_dir / "process-1.log").read_text().splitlines() == expected
    assert not (tmp_path / "injected").exists()


@pytest.mark.parametrize("script, args", [
    ("tpu.sh", ["create", "--dry-run"]),
    ("tpu.sh", ["run", "--dry-run", CIFAR, STEPS]),
    ("tpu.sh", ["delete", "--dry-run"]),
    ("slurm.sh", ["run", CIFAR, STEPS, "--dry-run"]),
    ("slurm.sh", ["sweep", PAPER, "--dry-run"]),
    ("tpu.sh", ["sweep-per-chip", PAPER, "--dry-run"]),
    ("local.sh", ["2", "--dry-run", "touch", "{tmp}/acted"]),
])
def test_dry_run_anywhere_prints_and_never_acts(tmp_path, script, args):
    # Before COMMAND in local.sh (what follows is COMMAND's own), anywhere in the others.
    cloud, _ = fakes(tmp_path)
    workdir = tmp_path / "runs"
    proc = launch(script, *[arg.format(tmp=tmp_path) for arg in args],
                  **TPU | {"WORKDIR": str(workdir)}, PATH=on_path(cloud), WORKERS="2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout
    assert not (tmp_path / "calls").exists()  # no gcloud, sbatch or srun
    assert not workdir.exists() and not (tmp_path / "acted").exists()
