"""launch/slurm.sh against a real SLURM: this machine as a CPU-only cluster (Debian's munge,
slurmctld and slurmd), its slurm.conf written here into a temporary directory (SLURM_CONF), the
daemons shared by every test of this module and stopped at its end with every job and process
they started. The jobs are submitted exactly as docs/scaling.md shows a user: `launch/slurm.sh run`
and `sweep`, then scontrol, scancel and the files the jobs leave.

The cluster has two nodes, both on this host: HOST, this host's name (partition cpu, the
default), and HOST-2 (with it, partition two). SLURM runs several slurmd on one host when each
node has its own port (`slurmd -N NAME`). JAX joins the processes of one job at the first node's
name, so that node is the one whose name reaches this host (a node named localhost is refused:
"Duplicated NodeHostName").

Skipped, with one line saying why, where the packages are not installed (.ci/run installs them as
root: apt-get install slurmctld slurmd slurm-client munge) or the daemons cannot start.
"""
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.test_distributed import GRAD_RTOL, records

REPO = pathlib.Path(__file__).resolve().parents[1]
PROGRAMS = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo"]
CONFIG = "resnet_jax/configs/cifar.py:depth=8,dataset=digits"
# tests/test_distributed.py's runs (lr 1e-5: why, there), here as launch/slurm.sh's overrides.
STEPS = 4
OVERRIDES = ["--config.batch_size=16", f"--config.total_steps={STEPS}",
             "--config.log_every_steps=1", "--config.eval_every_steps=2",
             "--config.checkpoint_every_steps=2", "--config.learning_rate=1e-5"]
TRAIN = [sys.executable, "-m", "resnet_jax.main", "train", f"--config={CONFIG}", *OVERRIDES]
ONE_DEVICE, TWO_DEVICES = "", "--xla_force_host_platform_device_count=2"
NODES = [socket.gethostname(), socket.gethostname() + "-2"]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}

SLURM_CONF = """\
ClusterName=resnetjax
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser={user}
AuthType=auth/munge
AuthInfo=socket={dir}/munge.socket
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
# No cgroups in this container: processes tracked by their parents, tasks not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# The nodes as declared here, whatever the host has.
SlurmdParameters=config_overrides
ReturnToService=2
FirstJobId={first_job_id}
NodeName={nodes[0]} NodeAddr=127.0.0.1 Port={ports[0]} CPUs=2 State=UNKNOWN
NodeName={nodes[1]} NodeAddr=127.0.0.1 Port={ports[1]} CPUs=2 State=UNKNOWN
PartitionName=cpu Nodes={nodes[0]} Default=YES MaxTime=INFINITE State=UP
PartitionName=two Nodes={nodes[0]},{nodes[1]} MaxTime=INFINITE State=UP
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Cluster:
    """The daemons of one SLURM cluster on this host, and its commands."""

    def __init__(self, directory: pathlib.Path):
        self.dir = directory
        self.conf = directory / "slurm.conf"
        self.daemons: list[subprocess.Popen] = []
        self.logs: list[str] = []  # each daemon's output, in self.dir

    def env(self, **extra) -> dict:
        """A user's shell with this cluster's SLURM_CONF: no JAX process variables, this venv's
        commands first."""
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("JAX_NUM_PROC", "JAX_PROCESS", "JAX_COORD", "SLURM_"))}
        return {**base, "SLURM_CONF": str(self.conf), "JAX_PLATFORMS": "cpu",
                "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}", **extra}

    def start(self, command: list[str], log: str) -> None:
        self.logs.append(log)
        with open(self.dir / log, "w") as out:
            self.daemons.append(subprocess.Popen(command, env=self.env(), stdout=out,
                                                 stderr=subprocess.STDOUT))

    def command(self, *args, **extra) -> str:
        proc = subprocess.run(args, env=self.env(**extra), capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def launch(self, *args, xla_flags: str, **variables) -> list[str]:
        """launch/slurm.sh ARGS with these variables, from this venv; the job ids it prints."""
        proc = subprocess.run(["launch/slurm.sh", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120,
                              env=self.env(VENV=sys.prefix, GPUS_PER_NODE="0",
                                           XLA_FLAGS=xla_flags, **variables))
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    def jobs(self, job_id: str) -> list[dict]:
        """scontrol's fields of job `job_id` (an array: of each of its tasks)."""
        out = self.command("scontrol", "-o", "show", "job", job_id)
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines()]

    def wait(self, *job_ids: str, timeout: float = 900) -> list[dict]:
        """Waits until every task of these jobs has ended (a guard against a hang, not a time
        limit: minutes on 2 busy cores); their fields."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = [job for i in job_ids for job in self.jobs(i)]
            if all(job["JobState"] in DONE for job in jobs):
                return jobs
            assert time.monotonic() < deadline, jobs
            time.sleep(0.5)

    def processes(self, job_ids=None) -> list[int]:
        """The processes started by this cluster: its daemons' and every job's (those of these
        jobs only, if given), known by the SLURM_CONF or job id in their environment."""
        ours = f"SLURM_CONF={self.conf}".encode()
        wanted = {f"SLURM_{k}={i}".encode() for i in job_ids or [] for k in
                  ["JOB_ID", "ARRAY_JOB_ID"]}
        found = []
        for proc in pathlib.Path("/proc").iterdir():
            try:
                environ = set((proc / "environ").read_bytes().split(b"\0"))
            except (OSError, ValueError):  # not a process, or gone
                continue
            if (wanted & environ) if job_ids else ours in environ:
                found.append(int(proc.name))
        return found

    def stop(self) -> None:
        """Cancels every job, then stops the daemons; kills what is left after 60 s."""
        try:
            subprocess.run(["scancel", f"--user={pwd_name()}"], env=self.env(), timeout=60)
        except (OSError, subprocess.SubprocessError):
            pass
        daemons = {d.pid for d in self.daemons}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(
                pid not in daemons and parent(pid) not in daemons for pid in self.processes()):
            time.sleep(0.5)
        for daemon in reversed(self.daemons):  # slurmd, slurmctld, then munged
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        for pid in self.processes():  # a job step slurmd left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _start(cluster: Cluster) -> str | None:
    """Writes the config and starts the daemons; None, or why the cluster is not up."""
    d = cluster.dir
    key = d / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    (d / "state").mkdir()
    for node in NODES:
        (d / "spool" / node).mkdir(parents=True)
    cluster.conf.write_text(SLURM_CONF.format(
        dir=d, user=pwd_name(), nodes=NODES, ctld_port=free_port(),
        ports=[free_port(), free_port()],
        first_job_id=random.randrange(1000, 1_000_000)))
    cluster.start(["munged", "-F", f"--socket={d}/munge.socket", f"--key-file={key}",
                   f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
                   f"--seed-file={d}/munged.seed"], "munged.out")
    deadline = time.monotonic() + 30
    while not (d / "munge.socket").exists():
        if time.monotonic() > deadline or cluster.daemons[0].poll() is not None:
            return "munged.out: " + last_line(d / "munged.out")
        time.sleep(0.1)
    cluster.start(["slurmctld", "-D"], "slurmctld.out")
    for node in NODES:
        cluster.start(["slurmd", "-D", "-N", node], f"slurmd-{node}.out")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        exited = [log for daemon, log in zip(cluster.daemons, cluster.logs)
                  if daemon.poll() is not None]
        if exited:
            return f"{exited[0]}: " + last_line(d / exited[0])
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=cluster.env(),
                              capture_output=True, text=True)
        if proc.returncode == 0 and dict(line.split() for line in proc.stdout.splitlines()) == {
                node: "idle" for node in NODES}:
            return None
        time.sleep(0.5)
    return "the nodes are not idle after 60 s: " + " / ".join(
        last_line(d / log) for log in cluster.logs)


def parent(pid: int) -> int | None:
    try:  # /proc/PID/stat: "PID (NAME) STATE PPID ...", NAME in parentheses
        return int(pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def pwd_name() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def last_line(path: pathlib.Path) -> str:
    lines = path.read_text().strip().splitlines() if path.exists() else []
    return lines[-1] if lines else f"{path.name} is empty"


@pytest.fixture(scope="module")
def cluster():
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        pytest.skip(f"SLURM is not installed (no {', '.join(missing)}): apt-get install "
                    "slurmctld slurmd slurm-client munge, as .ci/run does")
    try:  # where JAX's processes of a job meet: the first node, this host by its name
        socket.getaddrinfo(NODES[0], None)
    except OSError:
        pytest.skip(f"this host's name {NODES[0]} does not resolve: add it to /etc/hosts")
    # munged wants its socket's directory, and each above it, searchable by everyone.
    directory = pathlib.Path(tempfile.mkdtemp(prefix="resnet-jax-slurm-"))
    directory.chmod(0o755)
    cluster = Cluster(directory)
    try:
        why = _start(cluster)
        if why is not None:
            pytest.skip(f"SLURM does not start here: {why}")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


def log(workdir: pathlib.Path, job_id: str) -> str:
    return (workdir / f"slurm-{job_id}.out").read_text()


def assert_same_training(two: list[dict], one: list[dict]) -> None:
    """Every metric of every step, as tests/test_distributed.py compares them."""
    assert [r["step"] for r in two] == [r["step"] for r in one[:len(two)]]
    for a, b in zip(two, one):
        assert a.keys() == b.keys()
        for key in a:
            rel = GRAD_RTOL if key.startswith("grad_norm") else 1e-5
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-6), (a["step"], key)


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """`run` of one job over 2 processes on one node and over 2 nodes (one process each, one
    CPU device each), and the same training in one process with 2 devices, outside SLURM:
    root/{node,nodes,one}, and the two job ids."""
    root = tmp_path_factory.mktemp("slurm-runs")
    node, = cluster.launch("run", CONFIG, *OVERRIDES, xla_flags=ONE_DEVICE,
                           WORKDIR=str(root / "node"), TASKS_PER_NODE="2")
    nodes, = cluster.launch("run", CONFIG, *OVERRIDES, xla_flags=ONE_DEVICE,
                            WORKDIR=str(root / "nodes"), NODES="2", PARTITION="two")
    one = subprocess.run([*TRAIN, f"--workdir={root / 'one'}"], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env=cluster.env(XLA_FLAGS=TWO_DEVICES))
    assert one.returncode == 0, one.stderr
    jobs = cluster.wait(node, nodes)
    assert [job["JobState"] for job in jobs] == ["COMPLETED"] * 2, (
        log(root / "node", node) + log(root / "nodes", nodes))
    return root, {"node": node, "nodes": nodes}


@pytest.mark.parametrize("where", ["node", "nodes"])
def test_run_over_two_processes_trains_what_one_process_trains(cluster, runs, where):
    root, job_ids = runs
    job, = cluster.jobs(job_ids[where])
    assert (job["NumNodes"], job["NumTasks"]) == ({"node": "1", "nodes": "2"}[where], "2")
    assert job["NodeList"] == {"node": NODES[0], "nodes": ",".join(NODES)}[where]
    two = records(root / where)
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert_same_training(two, records(root / "one"))
    # One job: process 0 alone logs and prints the result, in the job's one log.
    output = log(root / where, job_ids[where])
    assert output.count(f"step {STEPS}/{STEPS}") == output.count("finished: ") == 1, output
    assert json.loads((root / where / "summary.json").read_text())["step"] == STEPS


def test_requeue_resumes_from_the_last_checkpoint(cluster, tmp_path):
    """`scontrol requeue` mid-run: SLURM stops the job (SIGTERM: training checkpoints) and starts
    it again, which resumes; each step is logged once, and the run ends as an unbroken one."""
    steps = 200
    longer = [f"--config.total_steps={steps}", "--config.eval_every_steps=50",
              "--config.checkpoint_every_steps=20"]
    unbroken = subprocess.Popen(  # meanwhile, on the other CPU
        [*TRAIN, *longer, f"--workdir={tmp_path / 'unbroken'}"], cwd=REPO,
        env=cluster.env(XLA_FLAGS=TWO_DEVICES), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    workdir = tmp_path / "requeued"
    job_id, = cluster.launch("run", CONFIG, *OVERRIDES, *longer, xla_flags=TWO_DEVICES,
                             WORKDIR=str(workdir))
    while not (workdir / "checkpoints" / "20").exists():
        job, = cluster.jobs(job_id)
        assert job["JobState"] in {"PENDING", "RUNNING"}, log(workdir, job_id)
        time.sleep(0.1)
    cluster.command("scontrol", "requeue", job_id)
    job, = cluster.wait(job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log(workdir, job_id)
    output = log(workdir, job_id)  # both starts' (--open-mode=append)
    stopped = re.findall(r"preempted \(SIGTERM\) at step (\d+)", output)
    resumed = re.findall(r"resuming from step (\d+)", output)
    assert len(stopped) == 1 and resumed == stopped and 20 <= int(stopped[0]) < steps, output
    requeued = records(workdir)
    assert [r["step"] for r in requeued] == list(range(1, steps + 1))
    _, err = unbroken.communicate(timeout=600)
    assert unbroken.returncode == 0, err
    assert requeued == records(tmp_path / "unbroken")


def test_a_job_at_its_time_limit_checkpoints_and_resumes(cluster, tmp_path):
    """SLURM's SIGTERM TERM_BEFORE_LIMIT seconds before the time limit (1 minute, the least it
    takes): the run checkpoints and ends with 143 before the limit (FAILED, not TIMEOUT); the same
    command, submitted again, resumes there. SLURM checks its clocks about every 30 s and sends
    the signal at the first check that is less than 30 s from the time to send it, so up to 30 s
    early: 1 s before the limit here, so that the signal comes 29 to 59 s into the job, once it
    trains."""
    workdir = tmp_path / "limited"
    args = ["run", CONFIG, "--config.batch_size=16", "--config.total_steps=1000000",
            "--config.log_every_steps=10", "--config.eval_every_steps=1000000",
            "--config.checkpoint_every_steps=1000000"]
    job_id, = cluster.launch(*args, xla_flags=ONE_DEVICE, WORKDIR=str(workdir), TIME="1",
                             TERM_BEFORE_LIMIT="1")
    job, = cluster.wait(job_id)
    output = log(workdir, job_id)
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "143:0"), output
    step, = re.findall(r"preempted \(SIGTERM\) at step (\d+)", output)
    assert (workdir / "checkpoints" / step).is_dir()
    # Continued (here to 2 steps past the checkpoint, where a user would train on).
    total = int(step) + 2
    job_id, = cluster.launch(*args, f"--config.total_steps={total}", xla_flags=ONE_DEVICE,
                             WORKDIR=str(workdir))
    job, = cluster.wait(job_id)
    assert job["JobState"] == "COMPLETED", log(workdir, job_id)
    assert f"resuming from step {step} " in log(workdir, job_id)
    assert json.loads((workdir / "summary.json").read_text())["step"] == total


def test_sweep_cancelled_then_submitted_again_finishes_every_run(cluster, tmp_path):
    """A job array of 4 runs, then the report job. scancel of both while runs train leaves no
    process of theirs on the node; the same command again trains what is missing, and the
    report job writes the report once every run has finished."""
    root = tmp_path / "sweep"
    sweep = ["sweep", f"--config={CONFIG}", "--seeds=4", "--config.batch_size=16",
             "--config.total_steps=100", "--config.log_every_steps=10",
             "--config.eval_every_steps=50", "--config.checkpoint_every_steps=50"]
    array, report = cluster.launch(*sweep, xla_flags=ONE_DEVICE, WORKDIR=str(root))
    runs = [f"depth=8,dataset=digits,seed={seed}" for seed in range(4)]
    deadline = time.monotonic() + 900
    while not any((root / run / "metrics.jsonl").exists() for run in runs):
        assert time.monotonic() < deadline, cluster.jobs(array)
        time.sleep(0.1)
    assert cluster.processes([array])  # a run is training
    cluster.command("scancel", array, report)
    jobs = cluster.wait(array, report)
    assert {job["JobState"] for job in jobs} <= {"CANCELLED", "COMPLETED"}, jobs
    assert "CANCELLED" in {job["JobState"] for job in jobs[:-1]}, jobs  # a run was stopped
    deadline = time.monotonic() + 60  # their processes end once SLURM has killed them
    while cluster.processes([array, report]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cluster.processes([array, report]) == []
    assert not (root / "report.md").exists()

    array, report = cluster.launch(*sweep, xla_flags=ONE_DEVICE, WORKDIR=str(root))
    jobs = cluster.wait(array, report)
    assert len(jobs) == 5, jobs  # 4 array tasks, then the report
    assert {job["JobState"] for job in jobs} == {"COMPLETED"}, jobs
    for run in runs:
        assert json.loads((root / run / "summary.json").read_text())["step"] == 100
    written = json.loads((root / "report.json").read_text())
    assert sorted(r["name"] for r in written["runs"]) == runs
    assert written["unfinished_runs"] == written["failed_runs"] == {}
    assert (root / "report.md").read_text() in log(root, report)  # the report job printed it
