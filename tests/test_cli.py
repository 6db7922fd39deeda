"""Tests for the command line (resnet_jax.main): one-line errors that write nothing, resuming a
run exactly where it stopped, refusing a changed config, and `summary`'s exact counts.

Training runs are tiny (ResNet-8 on the bundled 8x8 digits, 20 steps of 32 images) and share one
finished run (`finished_run`); tests that change a run work on a copy of it.
"""
import contextlib
import functools
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from flax import nnx

from resnet_jax import models, summary
from resnet_jax.main import main

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "resnet_jax/configs/cifar.py"
TINY = [f"--config={CONFIG}:depth=8,dataset=digits", "--config.batch_size=32",
        "--config.total_steps=20", "--config.log_every_steps=5", "--config.eval_every_steps=10",
        "--config.checkpoint_every_steps=10"]
RUN_FILES = ("config.json", "checkpoints", "metrics.jsonl", "summary.json")


def train_argv(workdir, *overrides):
    return ["train", *TINY, f"--workdir={workdir}", *overrides]


def run_cli(capsys, argv):
    """main(argv) in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_usage_error(rc, out, err, *words):
    """Exit 2 and exactly one stderr line `resnet-jax: error: ...` containing every word."""
    assert rc == 2
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("resnet-jax: error: ")
    for word in words:
        assert word in lines[0]


def assert_no_run(workdir: pathlib.Path):
    """Nothing a later rerun could resume from or compare against."""
    assert not any((workdir / name).exists() for name in RUN_FILES), sorted(os.listdir(workdir))


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def snapshot(workdir):
    """Every file's bytes, by relative path: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(workdir)): p.read_bytes()
            for p in sorted(workdir.rglob("*")) if p.is_file()}


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def simulate_crash_after_step_10(workdir):
    """As if killed after step 20's metrics were written but before its checkpoint and summary."""
    (workdir / "summary.json").unlink()
    shutil.rmtree(workdir / "checkpoints" / "20")


def train_quietly(tmp_path_factory, argv):
    """main(argv) from a module-scoped fixture (no capsys there): (exit status, stdout)."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("RESNET_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "resnet_jax_cache"))
        rc = main(argv)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An unbroken 20-step run: checkpoints at 10 and 20, metrics every 5, test error every 10."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    rc, _ = train_quietly(tmp_path_factory, train_argv(workdir))
    assert rc == 0
    return workdir


@pytest.fixture(scope="module")
def resumed_after_crash(tmp_path_factory, finished_run):
    """A copy of `finished_run` crashed after step 10's checkpoint, then rerun: (workdir, stdout)."""
    workdir = copy_run(finished_run, tmp_path_factory.mktemp("crashed") / "run")
    simulate_crash_after_step_10(workdir)
    rc, out = train_quietly(tmp_path_factory, train_argv(workdir))
    assert rc == 0
    return workdir, out


# --- Bad input: one line, exit 2, nothing written ------------------------------------------

BAD_INPUTS = {  # id -> (arguments after `train`, words the error must contain)
    "depth-not-6n+2": ([f"--config={CONFIG}:depth=21,dataset=digits"], ["6n+2", "21"]),
    "unknown-dataset": ([f"--config={CONFIG}:depth=8,dataset=nope"], ["'nope'", "digits"]),
    "unknown-block": ([*TINY, "--config.block=mid"], ["block", "'mid'"]),
    "unknown-shortcut": ([f"--config={CONFIG}:depth=8,dataset=digits,shortcut=D"],
                         ["shortcut", "'D'"]),
    "missing-folder-dataset": ([f"--config={CONFIG}:depth=8,dataset=folder:/does/not/exist"],
                               ["/does/not/exist"]),
    "unknown-config-key": ([*TINY, "--config.totl_steps=5"], ["totl_steps", "'total_steps'"]),
    "unknown-get-config-argument": ([f"--config={CONFIG}:foo=1"], ["foo=1", "depth"]),
    "non-integer-override": ([*TINY, "--config.total_steps=abc"], ["total_steps", "abc"]),
    "missing-config-file": (["--config=no/such/config_file.py"], ["config file", "not found"]),
}


@pytest.mark.parametrize("args,words", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, words):
    workdir = tmp_path / "run"
    rc, out, err = run_cli(capsys, ["train", *args, f"--workdir={workdir}"])
    assert_usage_error(rc, out, err, *words)
    assert not workdir.exists()


def test_non_integer_config_argument_is_named(tmp_path, capsys):
    workdir = tmp_path / "run"
    rc, out, err = run_cli(capsys, ["train", f"--config={CONFIG}:depth=abc",
                                    f"--workdir={workdir}"])
    assert_usage_error(rc, out, err, "depth=abc", "integer")
    assert not workdir.exists()


def test_missing_config_file_is_named(tmp_path, capsys):
    missing = tmp_path / "my_config.py"
    rc, out, err = run_cli(capsys, ["train", f"--config={missing}", f"--workdir={tmp_path}/run"])
    assert_usage_error(rc, out, err, str(missing))


def test_train_without_workdir_is_one_line(capsys):
    rc, out, err = run_cli(capsys, ["train", *TINY])
    assert_usage_error(rc, out, err, "--workdir")


def test_workdir_under_a_file_is_not_writable(tmp_path, capsys):
    # A path under a regular file cannot be created, even by root (chmod does not stop root).
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    rc, out, err = run_cli(capsys, train_argv(afile / "run"))
    assert_usage_error(rc, out, err, "writable", str(afile / "run"))
    assert afile.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0500")
def test_read_only_workdir_parent_is_not_writable(tmp_path, capsys):
    parent = tmp_path / "read_only"
    parent.mkdir(mode=0o500)
    try:
        rc, out, err = run_cli(capsys, train_argv(parent / "run"))
        assert_usage_error(rc, out, err, "writable")
        assert os.listdir(parent) == []
    finally:
        parent.chmod(0o700)


def test_bad_input_exits_nonzero_as_a_process(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "resnet_jax.main", "train",
         f"--config={CONFIG}:depth=21,dataset=digits", f"--workdir={workdir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert_usage_error(proc.returncode, proc.stdout, proc.stderr, "6n+2")
    assert not workdir.exists()


# --- A run, its outputs, and resuming it ---------------------------------------------------


def test_run_writes_config_metrics_checkpoints_and_summary(finished_run):
    assert json.loads((finished_run / "config.json").read_text())["total_steps"] == 20
    records = metrics(finished_run)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert [r["step"] for r in records if "test/error" in r] == [10, 20]
    assert {"train/loss", "train/error", "lr"} <= records[0].keys()
    assert all("examples_per_sec" in r for r in records[1:])
    assert checkpoint_steps(finished_run) == [10, 20]
    assert any((finished_run / "tensorboard").iterdir())
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["step"] == 20
    assert summary["train/loss"] == pytest.approx(records[-1]["train/loss"], abs=1e-6)
    assert summary["test/error"] == pytest.approx(records[-1]["test/error"], abs=1e-6)


def test_rerun_of_finished_run_changes_nothing_and_longer_run_resumes(finished_run, tmp_path,
                                                                      capsys):
    workdir = copy_run(finished_run, tmp_path / "run")
    before = snapshot(workdir)

    rc, out, err = run_cli(capsys, train_argv(workdir))
    assert rc == 0, err
    assert "already finished" in out
    assert snapshot(workdir) == before

    rc, out, err = run_cli(capsys, train_argv(workdir, "--config.total_steps=30"))
    assert rc == 0, err
    assert "resuming from step 20" in out
    records = metrics(workdir)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert records[:4] == metrics(finished_run)  # The first 20 steps are kept as they were.
    assert json.loads((workdir / "summary.json").read_text())["step"] == 30
    assert checkpoint_steps(workdir)[-1] == 30


def test_crashed_run_resumes_from_last_checkpoint_and_matches_unbroken_run(resumed_after_crash,
                                                                           finished_run):
    workdir, out = resumed_after_crash
    assert "resuming from step 10" in out
    records = metrics(workdir)
    assert [r["step"] for r in records] == [5, 10, 15, 20]  # No duplicates of 15 or 20.
    unbroken = metrics(finished_run)
    assert records[:2] == unbroken[:2]  # Kept from before the crash.
    # Data order and augmentation are functions of (seed, step): the same numbers on CPU.
    assert records[-1]["train/loss"] == pytest.approx(unbroken[-1]["train/loss"], abs=1e-6)
    assert records[-1]["test/error"] == pytest.approx(unbroken[-1]["test/error"], abs=1e-6)
    assert checkpoint_steps(workdir) == [10, 20]
    summary = json.loads((workdir / "summary.json").read_text())
    unbroken_summary = json.loads((finished_run / "summary.json").read_text())
    assert summary.keys() == unbroken_summary.keys()
    for key, value in unbroken_summary.items():
        assert summary[key] == pytest.approx(value, abs=1e-6), key


def test_crashed_run_rewrites_every_record_as_unbroken_run(resumed_after_crash, finished_run):
    workdir, _ = resumed_after_crash
    for resumed, unbroken in zip(metrics(workdir), metrics(finished_run), strict=True):
        for key in ("train/loss", "train/error"):
            assert resumed[key] == pytest.approx(unbroken[key], abs=1e-6), (resumed["step"], key)


def test_logged_loss_is_mean_over_all_steps_since_last_log(finished_run, tmp_path, capsys):
    # log_every_steps does not change what is computed: with 1 every step's loss is logged.
    workdir = tmp_path / "every_step"
    rc, _, err = run_cli(capsys, train_argv(workdir, "--config.total_steps=5",
                                            "--config.log_every_steps=1"))
    assert rc == 0, err
    per_step = [r["train/loss"] for r in metrics(workdir)]
    assert len(per_step) == 5
    logged = metrics(finished_run)[0]
    assert logged["step"] == 5
    assert logged["train/loss"] == pytest.approx(sum(per_step) / 5, abs=1e-6)


@pytest.mark.parametrize("state", ["finished", "crashed"])
def test_changed_config_on_resume_is_refused(finished_run, tmp_path, capsys, state):
    workdir = copy_run(finished_run, tmp_path / "run")
    if state == "crashed":
        simulate_crash_after_step_10(workdir)
    before = snapshot(workdir)
    rc, out, err = run_cli(capsys, train_argv(workdir, "--config.learning_rate=0.05"))
    assert_usage_error(rc, out, err, "learning_rate", str(workdir))
    assert "total_steps" not in err  # Only keys that change what is computed are named.
    assert snapshot(workdir) == before


# --- summary ---------------------------------------------------------------------------------


@pytest.mark.slow  # 54-60 s on 2 CPU cores: builds and traces all 19 nets, ResNet-1202 too.
def test_summary_of_standard_nets_has_paper_parameter_counts(capsys, monkeypatch):
    # Every net's count is checked in tests/test_models.py; here the command, on fewer nets
    # (ResNet-1202 and ResNet-152 alone take a minute to build on 2 cores).
    from resnet_jax import summary

    fewer = functools.partial(summary.standard_nets, cifar_depths=(20, 110),
                              imagenet_depths=(50,))
    monkeypatch.setattr(summary, "standard_nets", fewer)
    rc, out, err = run_cli(capsys, ["summary", "--json"])
    assert rc == 0, err
    nets = {n["name"]: n for n in json.loads(out)["nets"]}
    assert nets["ResNet-20"]["params"] == 269_722
    assert nets["plain-110"]["params"] == 1_727_962
    assert nets["ResNet-50"]["params"] == 25_557_032
    assert nets["ResNet-50"]["weighted_layers"] == 50


def test_summary_of_config_counts_resnet56(capsys):
    rc, out, err = run_cli(capsys, ["summary", f"--config={CONFIG}:depth=56", "--json"])
    assert rc == 0, err
    info = json.loads(out)
    assert info["params"] == 853_018
    assert info["weighted_layers"] == 56
    assert info["macs"] > 0


# --- bench ---------------------------------------------------------------------------------


def test_bench_reports_throughput_compile_time_and_flops(capsys):
    rc, out, err = run_cli(capsys, ["bench", f"--config={CONFIG}:depth=8", "--depths=8,14",
                                    "--steps=2", "--config.batch_size=16", "--json"])
    assert rc == 0, err
    rows = json.loads(out)["rows"]
    assert [r["net"] for r in rows] == ["ResNet-8", "ResNet-14"]
    for r in rows:
        assert r["images_per_sec"] > 0 and r["compile_s"] > 0 and r["devices"] == 8
        assert r["images_per_sec"] == pytest.approx(16e3 / r["ms_per_step"])
    # Model FLOPs: the forward pass, the input gradients and the weight gradients, each as
    # many multiply-adds as the forward pass (strided layers' input gradients counted without
    # the zeros), at 2 FLOPs each.
    for r, depth in zip(rows, (8, 14)):
        macs = summary.describe(models.cifar_resnet(depth, rngs=nnx.Rngs(0)), (32, 32, 3))["macs"]
        assert r["gflops_per_step"] * 1e9 == pytest.approx(3 * 2 * 16 * macs, rel=1e-9)


@pytest.mark.parametrize("args, words", [
    (["--depths=9"], ["6n+2"]), (["--depths=twenty"], ["--depths", "integers"]), ([], [])])
def test_bench_bad_input_is_one_line(capsys, args, words):
    config = [f"--config={CONFIG}:depth=8"] if args else []
    rc, out, err = run_cli(capsys, ["bench", *config, *args])
    assert_usage_error(rc, out, err, *(words or ["bench needs --config"]))


def test_xla_options_ab_times_every_variant(capsys):
    from benchmarks import xla_options

    rc = xla_options.main(["--depth=8", "--batch=16", "--steps=1", "--rounds=2",
                           "--variant=same={}"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| variant")}
    assert set(rows) == {"default", "xla", "same"}
    assert float(rows["default"][2]) == 1.0
    assert all(len(r[3].split(", ")) == 2 for r in rows.values())  # one rate per round


@pytest.mark.parametrize("argv, words", [
    (["--variant=onednn"], ["NAME=JSON"]), (["--variant=a=[1]"], ["NAME=JSON"]),
    (["--depth=9"], ["6n+2"]),
    (["--variant=bad={\"xla_no_such_option\": 1}"], ["variant bad does not compile"])])
def test_xla_options_bad_input_is_one_line(capsys, argv, words):
    from benchmarks import xla_options

    rc = xla_options.main(["--batch=16", "--steps=1", "--rounds=1", *argv])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("xla_options: error: ")
    assert all(w in err for w in words), err


def test_pytorch_reference_is_the_same_network():
    """Same parameter count as ours (He et al.'s 0.27M for ResNet-20), when torch is installed."""
    torch_reference = pytest.importorskip("benchmarks.torch_reference")
    for depth, params in [(20, 269_722), (56, 853_018)]:
        for residual in (True, False):
            model = torch_reference.CifarResNet(depth, residual)
            assert sum(p.numel() for p in model.parameters()) == params
            out = model(torch_reference.torch.zeros(2, 3, 32, 32))
            assert tuple(out.shape) == (2, 10)
