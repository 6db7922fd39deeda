"""Sweeps end to end: the study sweep files on their smoke preset, grids, placement, failures,
signals, and the paper preset's sweep."""

import json
import os
import pathlib

import pytest

from experiments import layer_responses, runner, sweep, sweep_root
from experiments.declaration import Run
from experiments.sweeps import degradation, preact, shortcuts
from experiments.sweeps.presets import PRESETS
from tests.test_data import write_prepared_tfds

REPO = pathlib.Path(__file__).resolve().parents[1]
DEGRADATION = "--sweep=experiments/sweeps/degradation.py:preset=smoke"


def run_sweep(runs, root, **kwargs):
    """runner.run_sweep on runs declared here (their configs built as the sweep builds them)."""
    runs = sweep.named(runs)
    runner.run_sweep(runs, sweep.build_and_check(runs), root, **kwargs)


def shared(n):
    """N slots over every local device: `--processes=N`."""
    from experiments.placement import Slot

    return [Slot("cpu", (), {})] * n


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    assert sweep.main([DEGRADATION, f"--root={root}"]) == 0
    return root


def test_smoke_degradation_sweep_writes_its_report(smoke_root):
    for name in ("report.md", "report.csv", "report.json", "curves.png", "curves.pdf"):
        assert (smoke_root / name).stat().st_size > 0
    numbers = json.loads((smoke_root / "report.json").read_text())
    assert len(numbers["table"]) == 4  # plain and residual x depths 8 and 14
    declared = json.loads((smoke_root / "sweep.json").read_text())
    assert declared["sweep"] == DEGRADATION
    assert declared["report"]["by"] == ["residual", "depth"]
    assert not declared["report"]["reference"]["comparable"]  # the paper's scale only
    # Each run's directory name states its arguments.
    assert (smoke_root / "depth=14,residual=false,width=1,dataset=digits,seed=0" /
            "summary.json").exists()
    assert len(declared["runs"]) == 4


def test_rerun_trains_only_what_is_missing(smoke_root, capsys):
    victim = smoke_root / "depth=8,residual=true,width=1,dataset=digits,seed=0"
    others = {p: p.stat().st_mtime_ns for p in smoke_root.glob("*/summary.json") if
              p.parent != victim}
    (victim / "summary.json").unlink()
    capsys.readouterr()
    assert sweep.main([DEGRADATION, f"--root={smoke_root}"]) == 0
    out = capsys.readouterr().out
    assert "[sweep] 3/4 done, 0 running, 1 left" in out
    assert "resuming from step 6" in out  # the interrupted run resumed from its checkpoint
    assert (victim / "summary.json").exists()
    assert all(p.stat().st_mtime_ns == t for p, t in others.items())


def test_paper_preset_is_the_papers_sweep():
    runs = degradation.get_sweep("preset=paper").runs
    assert len(runs) == 5 * 2 * 5 + 5  # 20-110 plain and residual, 5 seeds; ResNet-1202
    config = next(r for r in runs if r.arg.startswith("depth=110,residual=true")).build()
    assert (config.total_steps, tuple(config.lr_boundaries_steps)) == (64_000, (32_000, 48_000))
    assert (config.warmup_steps, config.batch_size, config.dataset) == (2_000, 128, "cifar10")
    assert next(r for r in runs if r.arg.startswith("depth=56")).build().warmup_steps == 0
    assert not any(r.arg.startswith("depth=1202,residual=false") for r in runs)
    # Only ResNet-1202 runs its blocks under scan (compile time flat in depth).
    assert [r.build().depth for r in runs if r.build().scan_blocks] == 5 * [1202]


def test_paper_preset_trains_from_tfds(tmp_path):
    """The paper preset's first run, shrunk, through the real tfds.data_source path."""
    write_prepared_tfds(tmp_path / "tfds", "cifar10", n_train=64, n_test=16)
    run = degradation.get_sweep("preset=paper").runs[0]
    # Batch-norm groups of 8 in a batch of 16: the preset's grouping (64 of 128), shrunk too.
    run = Run(run.arg, {**run.overrides, "total_steps": 2, "batch_size": 16, "bn_group_size": 8,
                        "log_every_steps": 1, "eval_every_steps": 2,
                        "checkpoint_every_steps": 2, "tfds_data_dir": str(tmp_path / "tfds")})
    run_sweep([run], tmp_path / "root")
    summary = json.loads((tmp_path / "root" / run.name / "summary.json").read_text())
    assert summary["step"] == 2


def test_cifar16_cpu_preset_trains_at_16x16_without_diagnostics(tmp_path):
    """The CPU-scale Fig. 6 preset: its schedule, and its first run, shrunk, trains on 16x16
    pixel-block means of CIFAR-10 (here a prepared TFDS copy of 32x32 images)."""
    preset = PRESETS["cifar16-cpu"]
    runs = {r.arg.split(",width")[0]: r.build() for r in preset.runs() if r.arg.endswith("seed=1")}
    assert len(preset.runs()) == 20  # 5 depths x plain/residual x 2 seeds
    assert {(c.image_size, c.base_width, c.total_steps, c.log_diagnostics) for c in runs.values()
            } == {(16, 8, 6_000, False)}
    assert tuple(runs["depth=56,residual=true"].lr_boundaries_steps) == (3_000, 4_500)
    assert runs["depth=110,residual=true"].warmup_steps == 187  # 2,000 of 64k, scaled
    write_prepared_tfds(tmp_path / "tfds", "cifar10", n_train=64, n_test=16)
    run = preset.runs()[0]
    run = Run(run.arg, {**run.overrides, "total_steps": 2, "batch_size": 16,
                        "log_every_steps": 1, "eval_every_steps": 2, "checkpoint_every_steps": 2,
                        "tfds_data_dir": str(tmp_path / "tfds")})
    run_sweep([run], tmp_path / "root")
    workdir = tmp_path / "root" / run.name
    assert json.loads((workdir / "dataset.json").read_text())["image_shape"] == [16, 16, 3]
    record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    assert not any(key.startswith(("response_std", "branch_ratio")) for key in record)


def test_sweep_runs_several_processes_at_once(tmp_path):
    runs = [Run(f"depth=8,residual={r},dataset=digits",
                {"total_steps": 2, "batch_size": 16, "log_every_steps": 1,
                 "eval_every_steps": 2, "checkpoint_every_steps": 2})
            for r in ("true", "false")]
    run_sweep(runs, tmp_path, slots=shared(2))
    for run in runs:
        assert json.loads((tmp_path / run.name / "summary.json").read_text())["step"] == 2


def test_layer_responses_of_the_smoke_sweep(smoke_root):
    assert layer_responses.main([f"--root={smoke_root}", "--depths=8,14",
                                 "--num-images=32"]) == 0
    out = json.loads((smoke_root / "layer_responses.json").read_text())
    assert out["batch_norm"].startswith("precise BN: statistics recomputed from 1024 training")
    stds = out["response_std"]
    # One std per 3x3 layer: the stem and two per block (depth - 2 = 2 per block x blocks).
    assert {k: len(v) for k, v in stds.items()} == {"plain-8": 7, "ResNet-8": 7,
                                                    "plain-14": 13, "ResNet-14": 13}
    assert all(v > 0 for values in stds.values() for v in values)
    assert (smoke_root / "layer_responses.png").stat().st_size > 0


def test_layer_responses_with_the_running_statistics_say_so(smoke_root):
    """6 steps leave the running averages near their initial values: measured with them, the
    responses differ from those with statistics recomputed from training images."""
    args = [f"--root={smoke_root}", "--depths=8", "--num-images=32"]
    read = lambda: json.loads((smoke_root / "layer_responses.json").read_text())  # noqa: E731
    assert layer_responses.main([*args, "--precise-bn-images=64"]) == 0
    precise = read()
    assert layer_responses.main([*args, "--precise-bn-images=0"]) == 0
    running = read()
    assert running["batch_norm"] == "evaluation mode with the running BN statistics from training"
    assert precise["precise_bn_images"] == 64 and running["precise_bn_images"] == 0
    assert running["response_std"]["plain-8"] != pytest.approx(precise["response_std"]["plain-8"],
                                                              rel=1e-2)


def test_layer_responses_without_runs_is_a_clear_error(tmp_path, capsys):
    assert layer_responses.main([f"--root={tmp_path}"]) == 2
    assert "sweeps/degradation.py first" in capsys.readouterr().err


def test_study_sweep_files_declare_the_papers_variants():
    args = [r.arg.split(",width")[0] for r in shortcuts.get_sweep("preset=paper").runs
            if r.arg.endswith("seed=0")]
    assert args[:3] == ["depth=20,shortcut=A", "depth=20,shortcut=B", "depth=20,shortcut=C"]
    assert len(args) == 9
    runs = preact.get_sweep("preset=paper").runs
    assert [r.arg.split(",width")[0] for r in runs if r.arg.endswith("seed=0")] == [
        "depth=110,block=post", "depth=110,block=pre",
        "depth=164,bottleneck=true,shortcut=B,block=post",
        "depth=164,bottleneck=true,shortcut=B,block=pre"]
    assert len(runs) == 4 * 5  # 5 seeds
    assert len(shortcuts.get_sweep("preset=digits,seeds=3").runs) == 27
    assert preact.get_sweep("preset=paper").report["reference"]["comparable"]
    with pytest.raises(ValueError, match="unknown preset 'big': use one of paper"):
        shortcuts.get_sweep("preset=big")


def test_preact_sweep_smoke(tmp_path):
    # One device a run: four nets to compile, and the 8-device path is the smoke_root's.
    assert sweep.main(["--sweep=experiments/sweeps/preact.py:preset=smoke", f"--root={tmp_path}",
                       "--config.num_devices=1"]) == 0
    rows = json.loads((tmp_path / "report.json").read_text())["table"]
    assert sorted((r["block"], r["depth"]) for r in rows) == [
        ("post", 8), ("post", 11), ("pre", 8), ("pre", 11)]
    assert (tmp_path / "report.md").exists()


def test_sigterm_to_a_sweep_stops_its_runs_at_a_checkpoint(tmp_path):
    """The sweep passes SIGTERM on to the runs it started; each checkpoints and stops, and the
    sweep ends naming the run, with 143, so a rerun finishes only what is missing."""
    import signal
    import subprocess
    import sys
    import time

    script = ("import pathlib, sys\n"
              "from experiments.runner import Stopped\n"
              "from experiments.placement import Slot\n"
              "from tests.test_experiments import Run, run_sweep\n"
              "run = Run('depth=8,dataset=digits', {'total_steps': 100000, 'batch_size': 32,\n"
              "          'log_every_steps': 5, 'eval_every_steps': 100000})\n"
              "try:\n"
              f"    run_sweep([run], pathlib.Path({str(tmp_path)!r}), "
              "slots=[Slot('cpu', (), {})] * 2)\n"
              "except Stopped as e:\n"
              "    print(e, file=sys.stderr); sys.exit(e.exit_status)\n")
    sweep = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "XLA_FLAGS": ""})
    metrics = tmp_path / "depth=8,dataset=digits" / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert sweep.poll() is None, sweep.communicate()
        time.sleep(0.05)
    sweep.send_signal(signal.SIGTERM)
    _, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 143, err
    assert "run depth=8,dataset=digits was preempted (exit 143)" in err
    log = (tmp_path / "depth=8,dataset=digits" / "log.txt").read_text()
    assert "preempted (SIGTERM) at step" in log
    assert any(p.name.isdigit() for p in (tmp_path / "depth=8,dataset=digits" /
                                          "checkpoints").iterdir())


def test_seed_groups_hold_seeds_of_one_net_up_to_the_program_size(tmp_path):
    from experiments.runner import seed_groups

    runs = [Run(f"depth=8,dataset=digits,seed={s}") for s in (0, 1, 2)]
    runs.insert(1, Run("depth=8,residual=false,dataset=digits,seed=0"))
    configs = {r.name: r.build() for r in runs}
    names = lambda groups: [[r.name.split(",")[-1] for r in g] for g in groups]  # noqa: E731
    assert names(seed_groups(runs, configs, tmp_path, 2)) == [
        ["seed=0", "seed=1"], ["seed=2"], ["seed=0"]]  # the plain net differs in more than seed
    assert names(seed_groups(runs, configs, tmp_path, 1)) == [
        ["seed=0"], ["seed=1"], ["seed=2"], ["seed=0"]]
    # A run with a checkpoint resumes alone: runs in one program start from one step.
    (tmp_path / runs[2].name / "checkpoints" / "4").mkdir(parents=True)
    assert names(seed_groups(runs, configs, tmp_path, 3)) == [
        ["seed=0", "seed=2"], ["seed=0"], ["seed=1"]]


def test_sweep_hands_seeds_of_one_net_to_one_program(tmp_path, monkeypatch):
    from resnet_jax import train

    tiny = {"total_steps": 2, "batch_size": 16, "log_every_steps": 1, "eval_every_steps": 2,
            "checkpoint_every_steps": 2}
    runs = [Run(f"depth=8,dataset=digits,seed={s}", tiny) for s in (0, 1)]
    groups = []
    # Only the hand-over is checked here: tests/test_train.py trains seeds in one program.
    monkeypatch.setattr(train, "train_runs", lambda configs, workdirs: groups.append(
        ([c.seed for c in configs], [pathlib.Path(w).name for w in workdirs])))
    run_sweep(runs, tmp_path, seeds_per_program=2)
    assert groups == [([0, 1], [runs[0].name, runs[1].name])]
    with pytest.raises(ValueError, match="more than 1 only with the runs in this process"):
        run_sweep(runs, tmp_path, slots=shared(2), seeds_per_program=2)


TINY = {"total_steps": 2, "batch_size": 16, "log_every_steps": 1, "eval_every_steps": 2,
        "checkpoint_every_steps": 2}
NAN = {**TINY, "learning_rate": 1e39}  # inf in float32: NaN from the first update on


def sweep_file(path: pathlib.Path, runs: str) -> str:
    """A sweep file at `path` whose get_sweep returns `runs` (Python source), as --sweep=."""
    path.write_text("from experiments.sweep import Run\n"
                    f"TINY = {TINY!r}\nNAN = {NAN!r}\n"
                    f"def get_sweep(arg=None):\n    return {runs}\n")
    return f"--sweep={path}"


def test_a_failed_run_is_named_and_the_rest_of_the_sweep_trains(tmp_path, capsys):
    """A NaN in the first run: the second still trains, the report leaves the failed run out
    and names it, and the sweep ends with the failed run's directory and reason, exit 2."""
    root = tmp_path / "root"
    spec = sweep_file(tmp_path / "s.py", "[Run('depth=8,dataset=digits,seed=1', NAN), "
                                         "Run('depth=8,dataset=digits,seed=2', TINY)]")
    bad, good = "depth=8,dataset=digits,seed=1", "depth=8,dataset=digits,seed=2"
    assert sweep.main([spec, f"--root={root}"]) == 2
    out, err = capsys.readouterr()
    assert "[sweep] 1/2 done, 1 failed, 0 running, 0 left" in out
    assert "Traceback" not in out + err
    assert "1 of 2 runs failed" in err
    (line,) = [x for x in err.splitlines() if x.startswith(f"  {root / bad}: ")]
    assert "not finite by step" in line
    assert json.loads((root / good / "summary.json").read_text())["step"] == 2
    assert not (root / bad / "summary.json").exists()
    assert list(sweep_root.failures(root)) == [bad]
    numbers = json.loads((root / "report.json").read_text())
    assert list(numbers["failed_runs"]) == [bad]
    assert [r["runs"] for r in numbers["table"]] == [1]


def test_a_failed_run_does_not_stop_a_sweep_of_several_processes(tmp_path):
    """The failed run's subprocess exits 2; the two others train, the third after it."""
    from experiments.runner import Stopped

    bad = Run("depth=8,dataset=digits,seed=1", NAN)
    good = [Run(f"depth=8,dataset=digits,seed={s}", TINY) for s in (2, 3)]
    with pytest.raises(Stopped) as stopped:
        run_sweep([bad, *good], tmp_path, slots=shared(2))
    assert stopped.value.exit_status == 2
    assert list(stopped.value.failed) == [bad.name]
    assert "not finite by step" in stopped.value.failed[bad.name]
    assert str(tmp_path / bad.name / "log.txt") in stopped.value.failed[bad.name]
    for run in good:
        assert json.loads((tmp_path / run.name / "summary.json").read_text())["step"] == 2


def test_paper_preset_sets_bn_groups_of_64_and_the_warmup_rule():
    runs = {r.arg.split(",width")[0]: r.build() for r in degradation.get_sweep("preset=paper").runs
            if r.arg.endswith("seed=0")}
    assert {c.bn_group_size for c in runs.values()} == {64}
    deep, shallow = runs["depth=110,residual=true"], runs["depth=56,residual=true"]
    assert (deep.warmup_until_error, deep.warmup_steps, deep.warmup_learning_rate) == (
        80.0, 2_000, 0.01)
    assert (shallow.warmup_until_error, shallow.warmup_steps) == (0.0, 0)
    assert runs["depth=1202,residual=true"].warmup_until_error == 80.0
    # CPU presets keep BN over the whole batch and scale the cap with the schedule.
    digits = PRESETS["digits"].runs()[-1].build()
    assert (digits.depth, digits.bn_group_size, digits.warmup_steps) == (110, 0, 12)


# --- Declaring a sweep: grids, names, bad input -------------------------------------------------


def declare(*argv):
    """The sweep the command line declares, without training."""
    import argparse

    args = argparse.Namespace(sweep=None, grid=[], seeds=None, config=None)
    overrides = [a for a in argv if a.startswith("--config.")]
    for a in argv:
        key, _, value = a[2:].partition("=")
        if key == "grid":
            args.grid.append(value)
        elif key == "seeds":
            args.seeds = int(value)
        elif key in ("sweep", "config"):
            setattr(args, key, value)
    return sweep.declare(args, overrides)


def test_a_grid_puts_config_arguments_after_the_colon_and_the_rest_in_overrides():
    declared = declare("--grid=depth=8,14", "--grid=learning_rate=0.02,0.1", "--seeds=2",
                       "--config=resnet_jax/configs/cifar.py:dataset=digits,depth=20",
                       "--config.total_steps=40", "--config.lr_boundaries_steps=(20,30)")
    runs = declared.runs
    assert len(runs) == 8
    assert runs[0].arg == "dataset=digits,depth=8,seed=0"  # depth=20 of --config gives way
    assert runs[0].overrides == {"learning_rate": 0.02, "total_steps": 40,
                                 "lr_boundaries_steps": (20, 30)}
    # Runs of one argument string are told apart by the overrides that differ between them.
    assert [r.name for r in runs[:4]] == [
        "dataset=digits,depth=8,seed=0,learning_rate=0.02",
        "dataset=digits,depth=8,seed=1,learning_rate=0.02",
        "dataset=digits,depth=8,seed=0,learning_rate=0.1",
        "dataset=digits,depth=8,seed=1,learning_rate=0.1"]
    config = runs[-1].build()
    assert (config.depth, config.seed, config.learning_rate, config.total_steps) == (
        14, 1, 0.1, 40)
    assert declared.report == {"by": ["depth", "learning_rate"]}
    # The warm-up rule follows the grid's depth, as it does a config argument's.
    (deep,) = declare("--grid=depth=110").runs
    assert deep.build().warmup_until_error == 80.0


def test_config_overrides_reach_every_run_of_a_sweep_file_without_renaming_them():
    runs = declare(DEGRADATION, "--config.dtype=bfloat16", "--config.total_steps=3").runs
    assert {(r.build().dtype, r.build().total_steps) for r in runs} == {("bfloat16", 3)}
    assert [r.name for r in runs] == [r.name for r in degradation.get_sweep("preset=smoke").runs]


def test_split_values_keeps_tuples_whole():
    assert sweep.split_values("(1,2),(3,4)") == ["(1,2)", "(3,4)"]
    assert sweep.parse_value("lr_boundaries_steps", "(1,2)", (5, 6)) == (1, 2)
    assert sweep.parse_value("flip", "false", True) is False


BAD_SWEEPS = {
    "unknown key in a sweep file": (
        "[Run('depth=8,dataset=digits', {'totl_steps': 2})]", [],
        "unknown config key 'totl_steps'"),
    "value of the wrong type in a sweep file": (
        "[Run('depth=8,dataset=digits', {'total_steps': 'many'})]", [],
        "total_steps='many' does not fit the config's int"),
    "bad config argument in a sweep file": (
        "[Run('depth=9,dataset=digits', TINY)]", [], "depth=9"),
    "empty sweep": ("[]", [], "has no runs"),
    "unknown report key in a sweep file": (
        "__import__('experiments.sweep').sweep.Sweep([Run('depth=8,dataset=digits', TINY)], "
        "report={'by': ['dpth']})", [], "the sweep's report groups by 'dpth'"),
    "two runs in one directory": (
        "[Run('depth=8,dataset=digits', TINY), Run('depth=8,dataset=digits', TINY)]", [],
        "both train in ROOT/depth=8,dataset=digits"),
    "unknown grid key": (None, ["--grid=dpth=8,14"], "unknown key 'dpth'"),
    "grid value of the wrong type": (None, ["--grid=learning_rate=fast"],
                                     "learning_rate=fast is not a float"),
    "grid config argument of the wrong type": (None, ["--grid=depth=eight"],
                                               "depth=eight must be an integer"),
    "grid without values": (None, ["--grid=depth="], "has no values"),
    "grid and sweep file": ("[Run('depth=8,dataset=digits', TINY)]", ["--grid=depth=8"],
                            "use a sweep file or a grid"),
    "unknown override": (None, ["--grid=depth=8", "--config.totl_steps=3"],
                         "--config.totl_steps: unknown config key"),
    "too many devices per run": (None, ["--grid=depth=8", "--devices-per-run=9"],
                                 "--devices-per-run=9 but this machine shows 8 cpu device"),
    "bad shard": (None, ["--grid=depth=8", "--shard=2/2"], "--shard=2/2 is not I/N"),
    "index out of range": (None, ["--grid=depth=8,14", "--index=2"],
                           "--index=2 is out of range: this sweep has runs 0 to 1"),
}


@pytest.mark.parametrize("case", BAD_SWEEPS)
def test_bad_sweeps_are_one_line_and_train_nothing(tmp_path, capsys, case):
    runs, argv, message = BAD_SWEEPS[case]
    if runs is not None:
        argv = [sweep_file(tmp_path / "s.py", runs), *argv]
    root = tmp_path / "root"
    capsys.readouterr()
    assert sweep.main([*argv, f"--root={root}"]) == 2
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("sweep: error: "), err
    assert not root.exists() and out == ""


def test_a_root_holding_another_sweeps_runs_is_refused_and_left_as_it_is(smoke_root, capsys):
    before = sorted(p.name for p in smoke_root.iterdir())
    argv = ["--grid=depth=8", "--config=resnet_jax/configs/cifar.py:dataset=digits",
            f"--root={smoke_root}"]
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert "holds runs that are not in this sweep" in err and "--root of its own" in err
    # A run of the same name trained with another config is refused too.
    argv = [DEGRADATION, "--config.learning_rate=0.5", f"--root={smoke_root}"]
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert "was trained with another learning_rate" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in smoke_root.iterdir()) == before


def test_dry_run_prints_each_runs_state_and_writes_nothing(smoke_root, tmp_path, capsys):
    assert sweep.main([DEGRADATION, f"--root={smoke_root}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"4 of 4 runs under {smoke_root}, one after another")
    assert out.count(": finished") == 4
    root = tmp_path / "new"
    assert sweep.main([DEGRADATION, f"--root={root}", "--dry-run", "--processes=2",
                       "--shard=1/2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 of 4 runs") and out.count(": trains") == 2
    assert "resnet_jax.main train" in out and not root.exists()


def test_list_index_and_shard_select_runs_of_the_whole_sweep(capsys):
    assert sweep.main([DEGRADATION, "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert len(names) == 4
    runs = declare(DEGRADATION).runs
    assert [r.name for r in sweep.select(runs, 3, None)] == names[3:]
    assert [r.name for r in sweep.select(runs, None, "1/3")] == [names[1]]


# --- Where runs train: one per device --------------------------------------------------------


def test_one_run_per_device_group_on_simulated_devices(tmp_path):
    """8 simulated CPU devices, 4 a run: two runs at once, each in a process that sees only its
    4 (num_devices=4 trains; 5 is refused by the run, naming the 4 it sees)."""
    root = tmp_path / "root"
    argv = ["--grid=num_devices=4,5", "--config=resnet_jax/configs/cifar.py:depth=8,dataset=digits",
            *[f"--config.{k}={v}" for k, v in TINY.items()], "--devices-per-run=4",
            f"--root={root}"]
    assert sweep.main(argv) == 2
    ok, refused = root / "depth=8,dataset=digits,num_devices=4", \
        root / "depth=8,dataset=digits,num_devices=5"
    assert json.loads((ok / "summary.json").read_text())["step"] == 2
    assert "only 4 devices are visible" in json.loads((refused / "failure.json").read_text()
                                                      )["reason"]
    slots = {(d / "log.txt").read_text().splitlines()[0] for d in (ok, refused)}
    assert slots == {f"[sweep] {ok.name} on cpu 0,1,2,3",
                     f"[sweep] {refused.name} on cpu 4,5,6,7"}


def test_the_environment_each_run_gets_on_gpus_and_tpus():
    from experiments import placement

    gpus = placement.slots("gpu", ["0", "1", "2", "3"], 1)
    assert [s.env for s in gpus] == [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(4)]
    assert placement.local_accelerators(environ={"CUDA_VISIBLE_DEVICES": "2,3"}) == (
        "gpu", ["2", "3"])
    assert placement.shared_env("gpu") == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    pairs = placement.slots("tpu", [str(i) for i in range(8)], 2)
    assert [s.env["TPU_VISIBLE_CHIPS"] for s in pairs] == ["0,1", "2,3", "4,5", "6,7"]
    assert {s.env["TPU_CHIPS_PER_PROCESS_BOUNDS"] for s in pairs} == {"1,2,1"}
    assert len({s.env["TPU_PROCESS_PORT"] for s in pairs}) == 4  # a port each
    cpu = placement.slots("cpu", ["0", "1", "2", "3"], 2, environ={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_foo=1"})
    assert cpu[1].env == {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=2"}
    with pytest.raises(ValueError, match="sub-slice of 1, 2, 4, 8 chips"):
        placement.slots("tpu", ["0", "1", "2"], 3)


def test_dry_run_on_gpus_pins_each_run_to_its_gpu(tmp_path, capsys):
    argv = [DEGRADATION, f"--root={tmp_path / 'r'}", "--dry-run", "--devices-per-run=1",
            "--platform=gpu", "--devices=0,1,2,3"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        f"4 of 4 runs under {tmp_path / 'r'}, 4 at a time: gpu 0 (CUDA_VISIBLE_DEVICES=0); "
        "gpu 1 (CUDA_VISIBLE_DEVICES=1); gpu 2 (CUDA_VISIBLE_DEVICES=2); "
        "gpu 3 (CUDA_VISIBLE_DEVICES=3)")


# --- The README's own sweep ------------------------------------------------------------------


def readme_command(marker: str) -> list[str]:
    """The README's command line that starts with `marker`, continuation lines joined."""
    import shlex

    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    (line,) = [x for x in text.splitlines() if x.strip().startswith(marker)]
    return shlex.split(line)


def test_the_readmes_two_key_grid_sweep_runs_end_to_end(tmp_path, capsys):
    """The README's grid command as written, its root replaced and 20 of its 100 steps a run
    (a later --config.KEY wins): its 8 runs train and report as 4 cells of 2 seeds."""
    argv = readme_command(".venv/bin/python -m experiments.sweep --grid=")
    root = [a for a in argv if a.startswith("--root=")]
    argv = [a for a in argv[3:] if a not in root] + [f"--root={tmp_path}",
                                                     "--config.total_steps=20"]
    assert sweep.main(argv) == 0
    table = json.loads((tmp_path / "report.json").read_text())["table"]
    assert len(table) == 4 and {r["runs"] for r in table} == {2}  # 2 keys x 2 values, 2 seeds
    configs = [json.loads(p.read_text()) for p in tmp_path.glob("*/config.json")]
    assert sorted((c["depth"], c["learning_rate"], c["seed"]) for c in configs) == [
        (d, lr, seed) for d in (8, 14) for lr in (0.02, 0.1) for seed in (0, 1)]
    assert {(c["dataset"], c["total_steps"], c["log_every_steps"]) for c in configs} == {
        ("digits", 20, 10)}
    # TensorBoard (--logdir=ROOT): each run once, its HParams session beside its curves, and
    # the report's one experiment summary naming the swept keys with their values.
    from tests.test_cli import run_hparams
    from tests.test_report import experiment_columns, hparam_values

    for path in tmp_path.glob("*/config.json"):
        config = json.loads(path.read_text())
        [start], [_], scalars = run_hparams(path.parent)
        values = hparam_values(start.session_start_info)
        assert (values["depth"], values["learning_rate"], values["seed"]) == (
            config["depth"], config["learning_rate"], config["seed"])
        assert scalars["test/error"][-1][0] == 20
    columns, metrics = experiment_columns(tmp_path)
    assert sorted(columns) == [("depth", "DATA_TYPE_FLOAT64", [8, 14], True),
                               ("learning_rate", "DATA_TYPE_FLOAT64", [0.02, 0.1], True),
                               ("seed", "DATA_TYPE_FLOAT64", [0, 1], True)]
    assert metrics == ["train/error", "test/error"]
    assert not (tmp_path / "hparams").exists()
    # Each run said on stderr that it was compiling, and when its first step had run.
    err = capsys.readouterr().err
    assert (err.count("compiled the train step in ") == err.count("ran the first train step in ")
            == 8)


def test_the_readmes_sweep_file_is_declared_as_shown():
    argv = readme_command(".venv/bin/python -m experiments.sweep "
                          "--sweep=experiments/sweeps/lr_depth.py")
    runs = declare(*[a for a in argv if a.startswith("--sweep")]).runs
    assert len(runs) == 12
    assert runs[0].name == "depth=8,dataset=digits,seed=0,learning_rate=0.02"
