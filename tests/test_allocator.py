"""The commands' allocator (resnet_jax/allocator.py): tcmalloc where installed, the same numbers."""
import ctypes.util
import json
import os
import subprocess
import sys

import pytest

from resnet_jax.metrics import TIMING_KEYS
from tests.test_cli import REPO, train_argv

TCMALLOC = ctypes.util.find_library("tcmalloc_minimal")
needs_tcmalloc = pytest.mark.skipif(
    TCMALLOC is None, reason="libtcmalloc_minimal is not installed (Debian: apt install "
    "libtcmalloc-minimal4; .ci/run installs it as root)")
# What the process says of itself once it runs: its pid and whether tcmalloc is mapped.
PROBE = ("import os, sys; from resnet_jax import allocator; print(os.getpid(), flush=True); "
         "allocator.preload(); print(os.getpid(), any('tcmalloc' in line for line in "
         "open('/proc/self/maps')))")


def probe(**env):
    environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "RESNET_JAX_MALLOC")}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=environ | env)


@needs_tcmalloc
def test_the_command_starts_again_with_tcmalloc_in_the_same_process():
    proc = probe()
    assert proc.returncode == 0, proc.stderr
    first, *rest = proc.stdout.split("\n")
    pid = first  # printed before the exec, then again by the command started anew
    assert rest[:2] == [pid, f"{pid} True"], proc.stdout


def test_system_keeps_the_c_librarys_allocator():
    proc = probe(RESNET_JAX_MALLOC="system")
    assert proc.returncode == 0, proc.stderr
    pid = proc.stdout.split()[0]
    assert proc.stdout.split("\n")[:2] == [pid, f"{pid} False"]


def test_an_unknown_allocator_is_one_line():
    proc = probe(RESNET_JAX_MALLOC="jemalloc")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "RESNET_JAX_MALLOC='jemalloc'" in proc.stderr and "system" in proc.stderr


@needs_tcmalloc
def test_a_run_under_tcmalloc_logs_the_numbers_of_one_under_glibc(tmp_path):
    """The allocator changes where arrays live, never what is computed: bit for bit."""
    records = {}
    for choice in ("system", "tcmalloc"):
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        proc = subprocess.run([sys.executable, "-m", "resnet_jax.main",
                               *train_argv(tmp_path / choice)], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env=env | {"RESNET_JAX_MALLOC": choice})
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = (tmp_path / choice / "metrics.jsonl").read_text().splitlines()
        records[choice] = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
                           for line in lines]
    assert len(records["system"]) == 4
    assert records["tcmalloc"] == records["system"]
