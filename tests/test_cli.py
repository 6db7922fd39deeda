"""Tests for the command line (resnet_jax.main): one-line errors that write nothing, resuming a
run exactly where it stopped, refusing a changed config, and `summary`'s exact counts.

Training runs are tiny (ResNet-8 on the bundled 8x8 digits, 20 steps of 32 images) and share one
finished run (`finished_run`); tests that change a run work on a copy of it.
"""
import contextlib
import functools
import importlib
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from flax import nnx

from resnet_jax import models, summary
from resnet_jax.main import main
from resnet_jax.errors import ConfigError

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
    "negative-learning-rate": ([*TINY, "--config.learning_rate=-0.1"], ["learning_rate=-0.1"]),
    "negative-warmup-learning-rate": ([*TINY, "--config.warmup_learning_rate=-0.01"],
                                      ["warmup_learning_rate=-0.01"]),
    "negative-momentum": ([*TINY, "--config.momentum=-0.9"], ["momentum=-0.9", "[0, 1)"]),
    "momentum-of-one": ([*TINY, "--config.momentum=1.0"], ["momentum=1.0", "[0, 1)"]),
    "negative-bn-momentum": ([*TINY, "--config.bn_momentum=-0.1"],
                             ["bn_momentum=-0.1", "[0, 1)"]),
    "bn-momentum-of-one": ([*TINY, "--config.bn_momentum=1.0"], ["bn_momentum=1.0", "[0, 1)"]),
    "negative-weight-decay": ([*TINY, "--config.weight_decay=-0.0001"],
                              ["weight_decay=-0.0001"]),
    "negative-lr-decay-factor": ([*TINY, "--config.lr_decay_factor=-0.1"],
                                 ["lr_decay_factor=-0.1"]),
    "negative-lr-boundary": ([*TINY, "--config.lr_boundaries_steps=(-5,10)"],
                             ["lr_boundaries_steps=(-5, 10)", "negative"]),
    "negative-num-devices": ([*TINY, "--config.num_devices=-1"], ["num_devices=-1", "0 = all"]),
    "zero-base-width": ([f"--config={CONFIG}:depth=8,dataset=digits,base_width=0"],
                        ["base_width=0"]),
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


def test_a_python_file_that_is_no_config_file_is_named(tmp_path):
    """In a process of its own: ml_collections loads every config file as one module name, so
    in this process the file would take over the get_config of the config loaded before it."""
    proc = subprocess.run([sys.executable, "-m", "resnet_jax.main", "train",
                           "--config=resnet_jax/files.py", f"--workdir={tmp_path}/run"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert_usage_error(proc.returncode, proc.stdout, proc.stderr,
                       "resnet_jax/files.py has no get_config()", "configs/cifar.py")
    assert not (tmp_path / "run").exists()


def test_a_get_config_returning_a_dict_is_named(tmp_path, capsys):
    config = tmp_path / "my_config.py"
    config.write_text("def get_config():\n    return {'depth': 8}\n")
    rc, out, err = run_cli(capsys, ["train", f"--config={config}", f"--workdir={tmp_path}/run"])
    assert_usage_error(rc, out, err, str(config), "returned a dict", "ConfigDict")
    assert not (tmp_path / "run").exists()


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


# --- Unreadable files: the file and the fix, never advice about a different file ------------


def folder_with_broken_link(root):
    from tests.test_data import make_tree

    make_tree(root)
    link = root / "train" / "ant" / "gone.png"
    link.symlink_to(root / "nowhere.png")
    return link


def test_broken_image_link_is_named_as_a_read(tmp_path, capsys):
    link = folder_with_broken_link(tmp_path / "tree")
    workdir = tmp_path / "run"
    rc, out, err = run_cli(capsys, train_argv(workdir, f"--config.dataset=folder:{tmp_path}/tree"))
    assert_usage_error(rc, out, err, f"cannot read {link}", "broken")
    assert "could not write" not in err and "--workdir" not in err
    assert not workdir.exists()


def test_unwritable_data_cache_names_the_variable_not_the_workdir(tmp_path, capsys,
                                                                  monkeypatch):
    from tests.test_data import make_tree

    make_tree(tmp_path / "tree")
    (tmp_path / "afile").write_text("")  # a cache under a file: unwritable even for root
    monkeypatch.setenv("RESNET_JAX_CACHE", str(tmp_path / "afile" / "cache"))
    workdir = tmp_path / "run"
    rc, out, err = run_cli(capsys, train_argv(workdir, f"--config.dataset=folder:{tmp_path}/tree"))
    assert_usage_error(rc, out, err, "$RESNET_JAX_CACHE", str(tmp_path / "afile" / "cache"))
    assert "--workdir" not in err
    assert not workdir.exists()


@pytest.mark.parametrize("errno_, where, is_write", [
    (13, "elsewhere", False), (5, "workdir", False), (13, "workdir", True),
    (28, "elsewhere", True), (32, "elsewhere", False)])  # EACCES, EIO, EACCES, ENOSPC, EPIPE
def test_os_error_is_described_as_a_write_only_when_it_is_one(tmp_path, capsys, monkeypatch,
                                                              errno_, where, is_write):
    from resnet_jax import train

    workdir = tmp_path / "run"
    path = (workdir if where == "workdir" else tmp_path / "data") / "some.file"

    def fail(*args, **kwargs):
        raise OSError(errno_, os.strerror(errno_), str(path))

    monkeypatch.setattr(train, "train_and_evaluate", fail)
    rc, out, err = run_cli(capsys, train_argv(workdir))
    assert_usage_error(rc, out, err, str(path), os.strerror(errno_))
    assert ("could not write" in err) == is_write
    assert ("--workdir" in err) == is_write


# --- Damaged run files: one line naming the file, in a run and in a sweep ------------------


def cut(path):
    text = path.read_text()
    path.write_text(text[:len(text) // 2])


def drop_step(path):
    """Valid JSON that lost a key its readers use (an edit, another tool's rewrite)."""
    summary = json.loads(path.read_text())
    del summary["step"]
    path.write_text(json.dumps(summary))


@pytest.mark.parametrize("name, damage, fix", [("summary.json", cut, "delete it"),
                                               ("summary.json", drop_step, "delete it"),
                                               ("config.json", cut, "new --workdir")])
def test_cut_run_json_is_one_line_naming_it(finished_run, tmp_path, capsys, name, damage, fix):
    workdir = copy_run(finished_run, tmp_path / "run")
    damage(workdir / name)
    before = snapshot(workdir)
    rc, out, err = run_cli(capsys, train_argv(workdir))
    assert_usage_error(rc, out, err, str(workdir / name), fix)
    assert snapshot(workdir) == before
    if name == "summary.json":  # The advice works: the run is evaluated and finished again.
        (workdir / name).unlink()
        rc, _, err = run_cli(capsys, train_argv(workdir))
        assert rc == 0, err
        assert (json.loads((workdir / name).read_text())
                == json.loads((finished_run / name).read_text()))


def run_hparams(workdir):
    """The HParams sessions in a run's own TensorBoard folder: (start infos, end infos, scalars)."""
    from tests.test_report import hparams_data

    [events] = (workdir / "tensorboard").glob("events.out.tfevents.*")
    found, scalars = hparams_data(events)
    assert "_hparams_/experiment" not in found  # the sweep's report names the columns, once
    return (found.get("_hparams_/session_start_info", []),
            found.get("_hparams_/session_end_info", []), scalars)


@pytest.mark.parametrize("run", ["finished", "resumed"])
def test_a_run_is_its_own_hparams_session_beside_its_curves(finished_run, resumed_after_crash,
                                                            run):
    """Its config as the session's hparams (integers as the numbers they are), started once and
    ended once however often it resumed; its final errors are the last points of its curves."""
    from tests.test_report import hparam_values

    workdir = finished_run if run == "finished" else resumed_after_crash[0]
    starts, ends, scalars = run_hparams(workdir)
    [start], [end] = starts, ends
    values = hparam_values(start.session_start_info)
    config = json.loads((workdir / "config.json").read_text())
    assert values["depth"] == 8 and values["total_steps"] == 20 and values["dataset"] == "digits"
    assert values["residual"] is True and values["lr_boundaries_steps"] == json.dumps(
        config["lr_boundaries_steps"])
    assert set(values) == {k for k, v in config.items() if v is not None}
    assert end.session_end_info.status == 1  # STATUS_SUCCESS
    summary = json.loads((workdir / "summary.json").read_text())
    assert scalars["test/error"][-1] == (20, pytest.approx(summary["test/error"]))


def test_load_names_a_cut_config(finished_run, tmp_path):
    import resnet_jax

    workdir = copy_run(finished_run, tmp_path / "run")
    cut(workdir / "config.json")
    with pytest.raises(ConfigError, match=str(workdir / "config.json")):
        resnet_jax.load(workdir)


@pytest.mark.parametrize("name, damage", [("summary.json", cut), ("summary.json", drop_step),
                                          ("config.json", cut)])
@pytest.mark.parametrize("command", ["sweep", "report", "layer_responses"])
def test_cut_run_json_in_a_sweep_is_one_line_naming_it(finished_run, tmp_path, capsys, command,
                                                       name, damage):
    from experiments import layer_responses, report, sweep

    if (command, name) == ("layer_responses", "summary.json"):
        pytest.skip("layer_responses reads no summary")
    # The finished run as the unfinished run of a sweep (30 steps): the sweep reads both files.
    workdir = copy_run(finished_run, tmp_path / "root" / "depth=8,dataset=digits,seed=0")
    damage(workdir / name)
    root = f"--root={tmp_path / 'root'}"
    capsys.readouterr()
    rc = {"sweep": lambda: sweep.main(["--grid=seed=0", f"--config={CONFIG}:depth=8,dataset=digits",
                                       "--config.batch_size=32", "--config.total_steps=30", root]),
          "report": lambda: report.main([root]),
          "layer_responses": lambda: layer_responses.main([root, "--depths=8"])}[command]()
    out, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and str(workdir / name) in lines[0], err


@pytest.mark.parametrize("damage", [json.dumps({"step": 25, "train/loss": 1.0})[:12].encode(),
                                    b'{"step": 25, "train/loss": \xff\xfe}\n', b"[1, 2]\n",
                                    b'"a string"\n{"no step": 1}\n'],
                         ids=["cut", "not UTF-8", "a list", "no object with a step"])
def test_report_reads_a_cut_or_damaged_metrics_line_as_the_trainer_does(finished_run, tmp_path,
                                                                          damage):
    """A run killed mid-write leaves half a line at the end of metrics.jsonl; its resume drops
    it (metrics.MetricsWriter.records), and a report of the sweep leaves it out the same way.
    So are damaged lines (bytes that are not UTF-8, JSON that is no record), wherever they are."""
    from experiments import common
    from resnet_jax.metrics import MetricsWriter

    workdir = copy_run(finished_run, tmp_path / "root" / "run")
    complete = metrics(workdir)
    lines = (workdir / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (workdir / "metrics.jsonl").write_bytes(b"".join(lines[:2]) + damage.rstrip(b"\n") + b"\n"
                                            + b"".join(lines[2:]) + damage)
    [run] = common.collect(tmp_path / "root")
    assert run["curve"] == complete
    assert MetricsWriter(workdir, total_steps=20).records() == complete


# --- A run, its outputs, and resuming it ---------------------------------------------------


def test_run_writes_config_metrics_checkpoints_and_summary(finished_run):
    assert json.loads((finished_run / "config.json").read_text())["total_steps"] == 20
    records = metrics(finished_run)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert [r["step"] for r in records if "test/error" in r] == [10, 20]
    assert {"train/loss", "train/error", "lr"} <= records[0].keys()
    assert all("examples_per_sec" in r for r in records[1:])
    # Timing: the train step's rate apart from the evaluations and saves, and when each record
    # was written.
    assert all(r["time"] > 1.7e9 for r in records)
    assert [r["step"] for r in records if "eval_seconds" in r] == [10, 20]
    assert [r["step"] for r in records if "checkpoint_seconds" in r] == [15]  # the save at 10
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


def test_summary_of_standard_nets_has_paper_parameter_counts(capsys, monkeypatch):
    # Every net's count is checked in tests/test_models.py; here the command, on fewer nets
    # (all 19: benchmarks/summary_time.py).
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


def test_summary_table_prints_each_net_as_it_is_counted(capsys, monkeypatch):
    fewer = functools.partial(summary.standard_nets, cifar_depths=(20,), imagenet_depths=(18,))
    monkeypatch.setattr(summary, "standard_nets", fewer)
    describe, printed = summary.describe, []

    def describe_after_reading_stdout(*args):
        printed.append(capsys.readouterr().out)  # what was out before this net was counted
        return describe(*args)

    monkeypatch.setattr(summary, "describe", describe_after_reading_stdout)
    capsys.readouterr()
    assert main(["summary"]) == 0
    lines = ("".join(printed) + capsys.readouterr().out).splitlines()
    assert [line.split() for line in lines[2:]] == [
        ["ResNet-20", "cifar", "20", "269,722", "40,551,040"],
        ["plain-20", "cifar", "20", "269,722", "40,551,040"],
        ["ResNet-18", "imagenet", "18", "11,689,512", "1,814,073,344"],
        ["plain-18", "imagenet", "18", "11,515,688", "1,794,805,760"]]
    assert len({len(line) for line in lines}) == 1  # aligned
    # The header and rule, then one more row before each next net.
    assert [len("".join(printed[:k]).splitlines()) for k in (1, 2, 3, 4)] == [2, 3, 4, 5]


def test_summary_of_config_computes_and_compiles_nothing(capsys):
    """Shapes and counts come from abstract evaluation, the same as a built net's: no initial
    value is computed, no program compiled (eager initialisers took 17-23 s per ImageNet net)."""
    import jax

    compiled = []

    def on_compile(event, secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(on_compile)
    try:  # width=5: shapes that no other test has compiled in this process
        rc, out, err = run_cli(capsys, ["summary", f"--config={CONFIG}:depth=14,width=5",
                                        "--json"])
    finally:
        jax.monitoring.unregister_event_duration_listener(on_compile)
    assert rc == 0, err
    assert compiled == []
    info = json.loads(out)
    built = summary.describe(models.cifar_resnet(14, width=5, rngs=nnx.Rngs(0)), (32, 32, 3))
    assert {k: v for k, v in info.items() if k != "config"} == json.loads(json.dumps(built))


def test_summary_of_config_imports_no_checkpointing_or_input_pipeline():
    """Orbax and grain (which imports Orbax) took about a fifth of `resnet-jax summary`'s time
    for one net (benchmarks/summary_time.py): counting a net needs neither."""
    code = ("import sys; from resnet_jax.main import main; "
            f"main(['summary', '--config={CONFIG}:depth=8', '--json']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'orbax', 'grain'}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"


# --- compilation cache ---------------------------------------------------------------------


def train_in_a_fresh_process(workdir, compile_cache):
    """A 4-step TINY run as its own `resnet-jax train` process, with this compilation cache."""
    argv = train_argv(workdir, "--config.total_steps=4", "--config.log_every_steps=2",
                      "--config.eval_every_steps=4", "--config.checkpoint_every_steps=4")
    proc = subprocess.run([sys.executable, "-m", "resnet_jax.main", *argv], cwd=REPO,
                          env={**os.environ, "RESNET_JAX_COMPILE_CACHE": str(compile_cache)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr


def computed(workdir):
    """What a run computed, without its timings."""
    keep = ("step", "train", "test", "validation", "grad_norm", "lr", "response_std",
            "branch_ratio")
    return ([{k: v for k, v in r.items() if k.split("/")[0] in keep} for r in metrics(workdir)],
            json.loads((workdir / "summary.json").read_text()))


def test_second_run_compiles_nothing_and_computes_the_same(tmp_path):
    cache = tmp_path / "compile-cache"
    train_in_a_fresh_process(tmp_path / "first", cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit_train_step") for name in entries), entries
    train_in_a_fresh_process(tmp_path / "second", cache)
    # Every program of the second run came from the cache (a compiled one would be written).
    assert sorted(p.name for p in cache.iterdir()) == entries
    # Bit for bit: a program loaded from the cache is the program compiled.
    assert computed(tmp_path / "second") == computed(tmp_path / "first")


def test_compile_cache_sits_next_to_the_data_cache_and_is_off_with_one_setting(tmp_path,
                                                                                 monkeypatch):
    import jax

    from resnet_jax import parallel

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    before = {k: getattr(jax.config, k) for k in keys}
    try:
        monkeypatch.setenv("RESNET_JAX_COMPILE_CACHE", "off")
        assert parallel.use_compilation_cache() is None
        assert {k: getattr(jax.config, k) for k in keys} == before
        monkeypatch.delenv("RESNET_JAX_COMPILE_CACHE")
        monkeypatch.setenv("RESNET_JAX_CACHE", str(tmp_path))
        assert parallel.use_compilation_cache() == str(tmp_path / "jax-compile")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax-compile")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0  # CPU programs too
    finally:
        for key, value in before.items():
            jax.config.update(key, value)


def test_unwritable_compile_cache_is_one_line_and_the_run_goes_on(tmp_path, capsys,
                                                                   monkeypatch):
    import jax

    from resnet_jax import parallel

    (tmp_path / "afile").write_text("")  # a directory under a file: unwritable even for root
    monkeypatch.setenv("RESNET_JAX_COMPILE_CACHE", str(tmp_path / "afile" / "cache"))
    before = jax.config.jax_compilation_cache_dir
    assert parallel.use_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir == before
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(tmp_path / "afile" / "cache") in err[0], err
    assert "RESNET_JAX_COMPILE_CACHE" in err[0] and "off" in err[0]


def test_sweeps_use_the_compile_cache(tmp_path):
    import jax

    from experiments import sweep

    assert sweep.run_sweep_command(lambda: None, tmp_path / "root", {}, report=False,
                                   total=0) == 0
    assert jax.config.jax_compilation_cache_dir == os.environ["RESNET_JAX_COMPILE_CACHE"]


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


    assert_phases(err, [("compiling the train step of ResNet-8",
                         "compiled the train step of ResNet-8"),
                        ("running the first 2 train steps of ResNet-8 (not timed)",
                         "ran the first train steps of ResNet-8"),
                        ("compiling the train step of ResNet-14",
                         "compiled the train step of ResNet-14"),
                        ("running the first 2 train steps of ResNet-14 (not timed)",
                         "ran the first train steps of ResNet-14")])


def assert_phases(err: str, phases: list[tuple[str, str]]) -> list[str]:
    """stderr announces each long phase (metrics.Phase) once, in this order: a line starting
    `start` and ending ` ...` as it starts, one starting `end in <time>` as it ends, before the
    next starts; returns the end lines."""
    pattern = re.compile(r".* \.\.\.$|.*? in (\d+\.\ds|\d+m\d\ds)(: .*)?$")
    said = [line for line in err.splitlines() if pattern.match(line)]
    expected = [(start, " ...") for start, _ in phases], [(end + " in ", "") for _, end in phases]
    assert len(said) == 2 * len(phases), err
    for i, line in enumerate(said):
        prefix, suffix = expected[i % 2][i // 2]
        assert line.startswith(prefix) and line.endswith(suffix), (i, line, err)
    return said[1::2]


def test_a_first_run_says_what_it_waits_for(tmp_path, capsys):
    """Decoding a folder into the cache, compiling, the first step: each announced on stderr
    as it starts and timed as it ends, once each, in order; the cache's path and size named."""
    from tests.test_data import make_tree

    make_tree(tmp_path / "tree", per_class=(8, 2), size=(8, 8))
    workdir = tmp_path / "run"
    rc, out, err = run_cli(capsys, train_argv(workdir, f"--config.dataset=folder:{tmp_path}/tree",
                                              "--config.batch_size=8", "--config.total_steps=2",
                                              "--config.eval_every_steps=2"))
    assert rc == 0, err
    folder = f"folder:{tmp_path}/tree"
    decoded, *_ = assert_phases(err, [
        (f"decoding {folder} into the data cache ", f"decoded {folder}"),
        ("compiling the train step", "compiled the train step"),
        ("running the first train step", "ran the first train step")])
    cache = next(pathlib.Path(os.environ["RESNET_JAX_CACHE"]).glob("folder-*.npz"))
    assert decoded.endswith(f": 30 images -> {cache} ({cache.stat().st_size / 1e6:.0f} MB)")
    rc, out, err = run_cli(capsys, train_argv(workdir, f"--config.dataset=folder:{tmp_path}/tree",
                                              "--config.batch_size=8", "--config.total_steps=4",
                                              "--config.eval_every_steps=2"))
    assert rc == 0, err  # decoded once: the cache is read
    assert_phases(err, [("compiling the train step", "compiled the train step"),
                        ("running the first train step", "ran the first train step")])


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
    # An option that changes nothing is told apart from one that does (XLA's defaults put
    # convolutions in YNNPACK, the project's keep them in Eigen).
    assert rows["same"][4] == "same as default" and rows["xla"][4] == "differs"
    assert "ynn" not in rows["default"][5].split(";")[0] and "ynn" in rows["xla"][5], rows


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


# --- Help, stray arguments, evaluating a run, install hints, packaging ----------------------

COMMAND_FLAGS = {"train": ["--config", "--workdir"], "summary": ["--config", "--json"],
                 "bench": ["--config", "--depths", "--seeds", "--steps", "--json"],
                 "eval": ["--workdir", "--step", "--dataset"]}


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["help"]])
def test_help_lists_the_commands_with_examples(capsys, argv):
    rc, out, err = run_cli(capsys, argv)
    assert rc == 0 and err == ""
    for command in COMMAND_FLAGS:
        assert re.search(rf"^  {command}  +\S", out, re.M), out  # one line of description each
    assert "resnet-jax train --config=resnet_jax/configs/cifar.py:" in out  # an example


@pytest.mark.parametrize("form", ["--help", "-h", "help"])
@pytest.mark.parametrize("command", COMMAND_FLAGS)
def test_command_help_lists_its_flags_and_an_example(tmp_path, capsys, command, form):
    argv = ["help", command] if form == "help" else [command, f"--workdir={tmp_path}/run", form]
    rc, out, err = run_cli(capsys, argv)
    assert rc == 0 and err == ""
    listed = re.findall(r"^  (--\w+)\S*  +\S", out, re.M)  # a flag, then its description
    assert set(COMMAND_FLAGS[command]) <= set(listed), out
    assert re.search(rf"^  resnet-jax {command} --", out, re.M), out  # an example
    assert not (tmp_path / "run").exists()


def test_train_help_says_where_the_config_keys_are(capsys):
    rc, out, _ = run_cli(capsys, ["train", "--help"])
    assert rc == 0
    assert "resnet_jax/configs/cifar.py" in out and "--config.KEY=VALUE" in out
    # Every key of the default config, with its default.
    assert "total_steps=64000" in out and "lr_boundaries_steps=(32000,48000)" in out
    assert "weight_decay=0.0001" in out and "tfds_data_dir=''" in out


@pytest.mark.parametrize("command, args, words", [
    ("train", ["total_steps=100"], ["'total_steps=100'", "--config.total_steps=100"]),
    ("train", ["runs/x"], ["'runs/x'"]),
    ("train", ["--depths=8"], ["depths", "resnet-jax train --help"]),  # another command's flag
    ("summary", ["depth=56"], ["'depth=56'", "--config.depth=56"]),
    ("bench", ["steps=2"], ["'steps=2'", "--steps=2"]),
    ("eval", ["step=10"], ["'step=10'", "--step=10"])])
def test_stray_argument_is_one_line_naming_it(tmp_path, capsys, command, args, words):
    workdir = tmp_path / "run"
    argv = {"train": TINY + [f"--workdir={workdir}"], "summary": [f"--config={CONFIG}"],
            "bench": [f"--config={CONFIG}:depth=8", "--steps=1"],
            "eval": [f"--workdir={workdir}"]}[command]
    rc, out, err = run_cli(capsys, [command, *argv, *args])
    assert_usage_error(rc, out, err, *words)
    assert out == "" and not workdir.exists()


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"],
                                  ["summary", f"--config={CONFIG}:depth=8"]])
def test_output_to_a_reader_that_left_ends_quietly(argv):
    """`resnet-jax --help | head -1`: head leaves after a line, and every later write to the
    pipe fails. That is the reader's choice, not an error: no traceback, and the exit status of
    a Unix tool stopped by SIGPIPE (141)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has left before the first write: the same, without a race
    try:
        proc = subprocess.run([sys.executable, "-m", "resnet_jax.main", *argv], cwd=REPO,
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")


ENTRY_POINTS = ["experiments.sweep", "experiments.report", "experiments.layer_responses",
                "benchmarks.accuracy_ab", "benchmarks.compare", "benchmarks.summary_time",
                "benchmarks.xla_options", "benchmarks.input_rate", "benchmarks.time_model",
                "benchmarks.host_overhead", "benchmarks.onednn_conv"]


def documented_options(help_text: str) -> dict[str, str]:
    """argparse's option list: {--flag: its description}."""
    options, name = {}, None
    for line in help_text.split("options:\n", 1)[1].splitlines():
        if re.match(r"  -", line):
            signature, _, description = line.strip().partition("  ")
            name = max(re.findall(r"-[-\w]+", signature), key=len)
            options[name] = description.strip()
        elif line.startswith("    ") and name:
            options[name] = (options[name] + " " + line.strip()).strip()
        else:
            name = None
    return options


@pytest.mark.parametrize("module", ["resnet_jax.main", *ENTRY_POINTS])
def test_every_entry_point_has_help_as_a_process(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    if module == "resnet_jax.main":
        assert "resnet-jax train --config=" in proc.stdout
        return
    assert proc.stdout.startswith(f"usage: python -m {module} ")
    options = documented_options(proc.stdout)
    assert len(options) > 2 and all(options.values()), options  # each flag described
    assert re.search(rf"^ +python -m {module} --", proc.stdout, re.M), proc.stdout  # an example


@pytest.mark.parametrize("module, args", [
    ("experiments.sweep", ["--grid=depth=8"]), ("experiments.report", []),
    ("experiments.layer_responses", []), ("benchmarks.accuracy_ab", ["--dataset=digits"]),
    ("benchmarks.compare", []), ("benchmarks.xla_options", [])])
def test_every_entry_point_refuses_a_stray_argument_in_one_line(capsys, tmp_path, module, args):
    main_ = importlib.import_module(module).main
    root = [f"--root={tmp_path}"] if module.startswith("experiments") or args else []
    with pytest.raises(SystemExit) as exit_:
        main_([*root, *args, "total_steps=100"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert len(err.splitlines()) == 1 and "'total_steps=100'" in err, err
    assert err.startswith(f"{module.split('.')[1]}: error: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("module, args", [
    ("experiments.layer_responses", ["--depths=20,5b"]),
    ("benchmarks.input_rate", ["--data=unused", "--threads=1,two"]),
    ("benchmarks.input_rate", ["--data=unused", "--workers=x"]),
    ("benchmarks.time_model", ["--depths=20,x"]),
    ("benchmarks.time_model", ["--imagenet-depths=5 0"]),
    ("benchmarks.host_overhead", ["--counts=8,3 2"])])
def test_a_list_of_integers_that_is_not_is_one_line_naming_the_flag(capsys, tmp_path, module,
                                                                    args):
    """The comma-separated integer flags share one parse (resnet_jax.cli.int_list)."""
    main_ = importlib.import_module(module).main
    root = [f"--root={tmp_path}"] if module.startswith("experiments") else []
    with pytest.raises(SystemExit) as exit_:
        main_([*root, *args])
    out, err = capsys.readouterr()
    flag = args[-1].split("=")[0]
    assert exit_.value.code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert f"argument {flag}: " in err and "comma-separated integers" in err, err
    assert list(tmp_path.iterdir()) == []


def test_unprepared_cifar10_gives_the_commands_and_the_offline_choices(tmp_path, capsys):
    workdir = tmp_path / "run"
    rc, out, err = run_cli(capsys, ["train", f"--config={CONFIG}:depth=8,dataset=cifar10",
                                    f"--config.tfds_data_dir={tmp_path / 'tfds'}",
                                    f"--workdir={workdir}"])
    assert_usage_error(rc, out, err, "pip install -e '.[prepare]'",
                       "tfds build cifar10 --file_format=array_record", "dataset=digits",
                       "dataset=folder:")
    assert not workdir.exists()


def test_every_install_hint_names_the_checkout():
    """A hint that installs the project by its name (resnet_jax and extras in brackets) would
    install whatever the package index has under that name, not this checkout."""
    hints = []
    for folder, subfolders, names in os.walk(REPO):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d != "build"]
        for name in names:
            if name.endswith((".py", ".md", ".sh")):
                text = pathlib.Path(folder, name).read_text()
                hints += re.findall(r"pip install[^\n]*resnet_jax\[[^\n]*", text)
    assert not hints


def pyproject():
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_wheel_holds_only_resnet_jax():
    import setuptools

    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = setuptools.find_packages(where=REPO, include=include)
    assert "resnet_jax.configs" in packages
    assert all(p.split(".")[0] == "resnet_jax" for p in packages), packages


def test_declared_bounds_hold_and_the_tested_versions_are_recorded():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = pyproject()["project"]
    # jax (since 0.7) and flax (since 0.11) have no Python 3.10.
    assert not SpecifierSet(project["requires-python"]).contains("3.10")
    requirements = {r.name.lower().replace("_", "-"): r for r in map(
        Requirement, project["dependencies"] + project["optional-dependencies"]["test"])}
    # optax.tree (train.py) appeared in optax 0.2.5; nnx.capture (models.py) in flax 0.12.6.
    assert not requirements["optax"].specifier.contains("0.2.4")
    assert not requirements["flax"].specifier.contains("0.12.5")
    assert "tensorboard" in project["optional-dependencies"]
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    for name, requirement in requirements.items():
        assert requirement.specifier.contains(pins[name]), (name, pins[name])
    assert "-c constraints.txt" in (REPO / ".ci" / "run").read_text()


def test_license_and_citation():
    import yaml

    assert "Apache License" in (REPO / "LICENSE").read_text()
    assert pyproject()["project"]["license"] == "Apache-2.0"
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    paper = citation["preferred-citation"]
    assert paper["title"] == "Deep Residual Learning for Image Recognition"
    assert [a["family-names"] for a in paper["authors"]] == ["He", "Zhang", "Ren", "Sun"]
    assert "1512.03385" in str(paper)


def test_eval_equals_the_final_evaluation_and_writes_only_its_file(finished_run, tmp_path,
                                                                   capsys):
    workdir = copy_run(finished_run, tmp_path / "run")
    before = snapshot(workdir)
    rc, out, err = run_cli(capsys, ["eval", f"--workdir={workdir}"])
    assert rc == 0, err
    after = snapshot(workdir)
    result = json.loads(after.pop("eval-20.json"))
    assert after == before  # read-only on the run: no renames, no checkpoint writes
    summary = json.loads((workdir / "summary.json").read_text())
    assert result["step"] == 20 and result["dataset"] == "digits"
    assert result["test/error"] == pytest.approx(summary["test/error"], abs=1e-6)
    assert result["test/loss"] == pytest.approx(metrics(workdir)[-1]["test/loss"], abs=1e-6)
    assert f"test error {summary['test/error']:.2f}%" in out
    assert str(workdir / "eval-20.json") in out


def test_eval_says_nothing_of_reading_read_only(finished_run, tmp_path):
    """Orbax warns 'Given directory is read only' for every read-only checkpoint manager, and
    reading without touching the run is what eval promises: no warning for it."""
    workdir = copy_run(finished_run, tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "resnet_jax.main", "eval", f"--workdir={workdir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    assert "read only" not in proc.stderr and "read_only" not in proc.stderr, proc.stderr


def test_eval_of_an_earlier_checkpoint_equals_its_evaluation_in_training(finished_run, tmp_path,
                                                                         capsys):
    workdir = copy_run(finished_run, tmp_path / "run")
    rc, _, err = run_cli(capsys, ["eval", f"--workdir={workdir}", "--step=10"])
    assert rc == 0, err
    result = json.loads((workdir / "eval-10.json").read_text())
    logged = next(r for r in metrics(workdir) if r["step"] == 10)
    assert result["step"] == 10
    for key in ("test/error", "test/loss"):
        assert result[key] == pytest.approx(logged[key], abs=1e-6), key


@pytest.mark.parametrize("args, words", [
    (["--step=15"], ["checkpoint 15", "does not exist", "latest, 20"]),
    (["--step=10"], ["checkpoint 10", "cannot be read", "latest, 20"]),  # damaged, below
    (["--dataset=synthetic"], ["--dataset=synthetic", "32x32x3", "8x8x1", "digits"]),
    ([], None)])
def test_eval_bad_input_is_one_line_and_changes_nothing(finished_run, tmp_path, capsys, args,
                                                        words):
    workdir = copy_run(finished_run, tmp_path / "run")
    for path in (workdir / "checkpoints" / "10").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\0garbage")
    before = snapshot(workdir)
    if words is None:  # not a run
        workdir, words = tmp_path, ["holds no run", str(tmp_path)]
    rc, out, err = run_cli(capsys, ["eval", f"--workdir={workdir}", *args])
    assert_usage_error(rc, out, err, *words)
    assert snapshot(tmp_path / "run") == before


def test_eval_of_a_config_without_a_key_added_later_is_one_line(finished_run, tmp_path, capsys):
    """A run of a version before a key existed: its value is not known, so it is asked for."""
    workdir = copy_run(finished_run, tmp_path / "run")
    config = json.loads((workdir / "config.json").read_text())
    del config["validation_size"]
    (workdir / "config.json").write_text(json.dumps(config))
    before = snapshot(workdir)
    rc, out, err = run_cli(capsys, ["eval", f"--workdir={workdir}"])
    assert_usage_error(rc, out, err, str(workdir / "config.json"), "has no validation_size",
                       "validation_size=0")
    assert snapshot(workdir) == before


def test_eval_on_another_dataset_keeps_the_runs_preprocessing(tmp_path, capsys):
    from PIL import Image

    from tests.test_data import make_tree

    make_tree(tmp_path / "a", per_class=(8, 3), size=(8, 8))
    workdir = tmp_path / "run"
    rc, _, err = run_cli(capsys, [
        "train", f"--config={CONFIG}:depth=8,dataset=folder:{tmp_path / 'a'}",
        "--config.batch_size=8", "--config.total_steps=2", "--config.log_every_steps=1",
        "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2",
        f"--workdir={workdir}"])
    assert rc == 0, err
    # b: a's test images, but black training images. The evaluation must normalise with the
    # run's mean image (a's), as training did, so its numbers equal the run's final ones.
    shutil.copytree(tmp_path / "a" / "test", tmp_path / "b" / "test")
    for path in (tmp_path / "a" / "train").rglob("*.png"):
        black = tmp_path / "b" / path.relative_to(tmp_path / "a")
        black.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(black)
    rc, out, err = run_cli(capsys, ["eval", f"--workdir={workdir}",
                                    f"--dataset=folder:{tmp_path / 'b'}"])
    assert rc == 0, err
    written = list(workdir.glob("eval-2-*.json"))
    assert len(written) == 1 and "b" in written[0].name
    result = json.loads(written[0].read_text())
    assert result["dataset"] == f"folder:{tmp_path / 'b'}"
    assert result["test/error"] == pytest.approx(
        json.loads((workdir / "summary.json").read_text())["test/error"], abs=1e-6)
    assert result["test/loss"] == pytest.approx(metrics(workdir)[-1]["test/loss"], abs=1e-6)


@pytest.mark.parametrize("against, message", [
    ("missing.json", "cannot read it as an accuracy_ab.json"),
    ("benchmarks/results/accuracy_ab/accuracy_ab.json", "ran another recipe (dataset differ)")])
def test_accuracy_ab_against_another_recipe_is_one_line(capsys, tmp_path, against, message):
    """--against reads PyTorch's runs of the same recipe only; anything else stops before a
    run starts, nothing written."""
    from benchmarks import accuracy_ab

    with pytest.raises(SystemExit) as exit_:
        accuracy_ab.main(["--dataset=digits", f"--root={tmp_path / 'ab'}",
                          f"--against={REPO / against if '/' in against else tmp_path / against}"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert message in err and err.startswith("accuracy_ab: error: --against="), err
    assert list(tmp_path.iterdir()) == []
