"""The degradation experiment end to end on its smoke preset, its sweep, and the paper preset."""

import json
import os
import pathlib

import pytest

from experiments import degradation, layer_responses
from experiments.sweep import Run, run_sweep
from tests.test_data import write_prepared_tfds

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    assert degradation.main(["--preset=smoke", f"--root={root}"]) == 0
    return root


def test_smoke_preset_writes_figure_table_and_numbers(smoke_root):
    for name in ("degradation.png", "degradation.pdf", "degradation.md", "degradation.csv",
                 "degradation.json"):
        assert (smoke_root / name).stat().st_size > 0
    numbers = json.loads((smoke_root / "degradation.json").read_text())
    assert [r["net"] for r in numbers["table"]] == ["plain-8", "plain-14", "ResNet-8",
                                                     "ResNet-14"]
    assert len(numbers["runs"]) == 4
    table = (smoke_root / "degradation.md").read_text()
    assert "| plain-14 | 1 |" in table
    # Each run's directory name states its arguments.
    assert (smoke_root / "depth=14,residual=false,width=1,dataset=digits,seed=0" /
            "summary.json").exists()


def test_rerun_trains_only_what_is_missing(smoke_root, capsys):
    victim = smoke_root / "depth=8,residual=true,width=1,dataset=digits,seed=0"
    others = {p: p.stat().st_mtime_ns for p in smoke_root.glob("*/summary.json") if
              p.parent != victim}
    (victim / "summary.json").unlink()
    capsys.readouterr()
    assert degradation.main(["--preset=smoke", f"--root={smoke_root}"]) == 0
    out = capsys.readouterr().out
    assert "[sweep] 3/4 done, 0 running, 1 left" in out
    assert "resuming from step 6" in out  # the interrupted run resumed from its checkpoint
    assert (victim / "summary.json").exists()
    assert all(p.stat().st_mtime_ns == t for p, t in others.items())


def test_plot_only_redraws_without_training(smoke_root, capsys):
    (smoke_root / "degradation.png").unlink()
    assert degradation.main(["--preset=smoke", f"--root={smoke_root}", "--plot-only"]) == 0
    assert (smoke_root / "degradation.png").exists()
    assert "[sweep]" not in capsys.readouterr().out


def test_plot_only_on_an_empty_root_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no finished runs under"):
        degradation.main(["--preset=smoke", f"--root={tmp_path}", "--plot-only"])


def test_failed_runs_are_named_not_averaged():
    ok = {"converged": True, "train/error": 5.0, "test/error": 7.0}
    bad = {"converged": False, "train/error": 89.0, "test/error": 90.0}
    results = [{"depth": 110, "residual": False, "seed": s, "summary": summary}
               for s, summary in enumerate([ok, bad])]
    (row,) = degradation.table(results)
    assert row["not_converged_seeds"] == [1]


def test_paper_preset_is_the_papers_sweep():
    runs = degradation.PRESETS["paper"].runs()
    assert len(runs) == 5 * 2 * 5 + 5  # 20-110 plain and residual, 5 seeds; ResNet-1202
    config = next(r for r in runs if r.arg.startswith("depth=110,residual=true")).build()
    assert (config.total_steps, tuple(config.lr_boundaries_steps)) == (64_000, (32_000, 48_000))
    assert (config.warmup_steps, config.batch_size, config.dataset) == (400, 128, "cifar10")
    assert next(r for r in runs if r.arg.startswith("depth=56")).build().warmup_steps == 0
    assert not any(r.arg.startswith("depth=1202,residual=false") for r in runs)
    # Only ResNet-1202 runs its blocks under scan (compile time flat in depth).
    assert [r.build().depth for r in runs if r.build().scan_blocks] == 5 * [1202]


def test_paper_preset_trains_from_tfds(tmp_path):
    """The paper preset's first run, shrunk, through the real tfds.data_source path."""
    write_prepared_tfds(tmp_path / "tfds", "cifar10", n_train=64, n_test=16)
    run = degradation.PRESETS["paper"].runs()[0]
    run = Run(run.arg, {**run.overrides, "total_steps": 2, "batch_size": 16,
                        "log_every_steps": 1, "eval_every_steps": 2,
                        "checkpoint_every_steps": 2, "tfds_data_dir": str(tmp_path / "tfds")})
    run_sweep([run], tmp_path / "root")
    summary = json.loads((tmp_path / "root" / run.name / "summary.json").read_text())
    assert summary["step"] == 2


def test_sweep_runs_several_processes_at_once(tmp_path):
    runs = [Run(f"depth=8,residual={r},dataset=digits",
                {"total_steps": 2, "batch_size": 16, "log_every_steps": 1,
                 "eval_every_steps": 2, "checkpoint_every_steps": 2})
            for r in ("true", "false")]
    run_sweep(runs, tmp_path, processes=2)
    for run in runs:
        assert json.loads((tmp_path / run.name / "summary.json").read_text())["step"] == 2


def test_layer_responses_of_the_smoke_sweep(smoke_root):
    assert layer_responses.main([f"--root={smoke_root}", "--depths=8,14",
                                 "--num-images=32"]) == 0
    stds = json.loads((smoke_root / "layer_responses.json").read_text())
    # One std per 3x3 layer: the stem and two per block (depth - 2 = 2 per block x blocks).
    assert {k: len(v) for k, v in stds.items()} == {"plain-8": 7, "ResNet-8": 7,
                                                    "plain-14": 13, "ResNet-14": 13}
    assert all(v > 0 for values in stds.values() for v in values)
    assert (smoke_root / "layer_responses.png").stat().st_size > 0


def test_layer_responses_without_runs_is_a_clear_error(tmp_path, capsys):
    assert layer_responses.main([f"--root={tmp_path}"]) == 2
    assert "run python -m experiments.degradation first" in capsys.readouterr().err


def test_ablation_studies_declare_the_papers_variants():
    from experiments import ablations

    args = [a for a, _ in ablations.study_args("shortcuts", small=False)]
    assert args[:3] == ["depth=20,shortcut=A", "depth=20,shortcut=B", "depth=20,shortcut=C"]
    assert len(args) == 9
    preact = [a for a, _ in ablations.study_args("preact", small=False)]
    assert preact == ["depth=110,block=post", "depth=110,block=pre",
                      "depth=164,bottleneck=true,shortcut=B,block=post",
                      "depth=164,bottleneck=true,shortcut=B,block=pre"]
    assert len(ablations.runs("preact", "paper")) == 4 * 5  # 5 seeds


def test_preact_ablation_smoke(tmp_path):
    from experiments import ablations

    assert ablations.main(["--study=preact", "--preset=smoke", f"--root={tmp_path}"]) == 0
    rows = json.loads((tmp_path / "ablation_preact.json").read_text())["table"]
    assert [r["variant"] for r in rows] == [
        "depth=11,bottleneck=true,shortcut=B,block=post,width=1,dataset=digits",
        "depth=11,bottleneck=true,shortcut=B,block=pre,width=1,dataset=digits",
        "depth=8,block=post,width=1,dataset=digits", "depth=8,block=pre,width=1,dataset=digits"]
    assert (tmp_path / "ablation_preact.md").exists()


def test_sigterm_to_a_sweep_stops_its_runs_at_a_checkpoint(tmp_path):
    """The sweep passes SIGTERM on to the runs it started; each checkpoints and stops, and the
    sweep ends naming the run, with 143, so a rerun finishes only what is missing."""
    import signal
    import subprocess
    import sys
    import time

    script = ("import pathlib, sys\n"
              "from experiments.sweep import Run, Stopped, run_sweep\n"
              "run = Run('depth=8,dataset=digits', {'total_steps': 100000, 'batch_size': 32,\n"
              "          'log_every_steps': 5, 'eval_every_steps': 100000})\n"
              "try:\n"
              f"    run_sweep([run], pathlib.Path({str(tmp_path)!r}), processes=2)\n"
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
    from experiments.sweep import seed_groups

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
    with pytest.raises(ValueError, match="more than 1 only with one process"):
        run_sweep(runs, tmp_path, processes=2, seeds_per_program=2)
