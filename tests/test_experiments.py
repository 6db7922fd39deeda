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
    assert (config.warmup_steps, config.batch_size, config.dataset) == (2_000, 128, "cifar10")
    assert next(r for r in runs if r.arg.startswith("depth=56")).build().warmup_steps == 0
    assert not any(r.arg.startswith("depth=1202,residual=false") for r in runs)
    # Only ResNet-1202 runs its blocks under scan (compile time flat in depth).
    assert [r.build().depth for r in runs if r.build().scan_blocks] == 5 * [1202]


def test_paper_preset_trains_from_tfds(tmp_path):
    """The paper preset's first run, shrunk, through the real tfds.data_source path."""
    write_prepared_tfds(tmp_path / "tfds", "cifar10", n_train=64, n_test=16)
    run = degradation.PRESETS["paper"].runs()[0]
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
    preset = degradation.PRESETS["cifar16-cpu"]
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
    run_sweep(runs, tmp_path, processes=2)
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


TINY = {"total_steps": 2, "batch_size": 16, "log_every_steps": 1, "eval_every_steps": 2,
        "checkpoint_every_steps": 2}
NAN = {**TINY, "learning_rate": 1e39}  # inf in float32: NaN from the first update on


def test_a_failed_run_is_named_and_the_rest_of_the_sweep_trains(tmp_path, capsys):
    """A NaN in the first run: the second still trains, the report leaves the failed run out
    and names it, and the sweep ends with the failed run's directory and reason, exit 2."""
    from experiments.sweep import failures, run_sweep_command

    bad, good = (Run(f"depth=8,dataset=digits,seed={s}", o) for s, o in ((1, NAN), (2, TINY)))
    report = lambda: degradation.report(tmp_path, "one failed run")  # noqa: E731
    assert run_sweep_command("degradation", [bad, good], tmp_path, report=report) == 2
    out, err = capsys.readouterr()
    assert "[sweep] 1/2 done, 1 failed, 0 running, 0 left" in out
    assert "Traceback" not in out + err
    assert "1 of 2 runs failed" in err
    (line,) = [x for x in err.splitlines() if x.startswith(f"  {tmp_path / bad.name}: ")]
    assert "not finite by step" in line
    assert json.loads((tmp_path / good.name / "summary.json").read_text())["step"] == 2
    assert not (tmp_path / bad.name / "summary.json").exists()
    assert list(failures(tmp_path)) == [bad.name]
    numbers = json.loads((tmp_path / "degradation.json").read_text())
    assert [r["name"] for r in numbers["runs"]] == [good.name]
    assert list(numbers["failed_runs"]) == [bad.name]


def test_a_failed_run_does_not_stop_a_sweep_of_several_processes(tmp_path):
    """The failed run's subprocess exits 2; the two others train, the third after it."""
    from experiments.sweep import Stopped

    bad = Run("depth=8,dataset=digits,seed=1", NAN)
    good = [Run(f"depth=8,dataset=digits,seed={s}", TINY) for s in (2, 3)]
    with pytest.raises(Stopped) as stopped:
        run_sweep([bad, *good], tmp_path, processes=2)
    assert stopped.value.exit_status == 2
    assert list(stopped.value.failed) == [bad.name]
    assert "not finite by step" in stopped.value.failed[bad.name]
    assert str(tmp_path / bad.name / "log.txt") in stopped.value.failed[bad.name]
    for run in good:
        assert json.loads((tmp_path / run.name / "summary.json").read_text())["step"] == 2


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc: Linux)."""
    out = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    """Whether `pid` is still a `resnet-jax train` process (not a zombie, not a reused pid)."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and b"resnet_jax.main" in pathlib.Path(f"/proc/{pid}/cmdline"
                                                                     ).read_bytes()
    except OSError:
        return False


def test_sigint_to_a_sweep_of_several_processes_leaves_no_child_behind(tmp_path):
    """Ctrl-C (SIGINT) to the sweep reaches its runs: each checkpoints and stops, the sweep
    waits for them and ends with 130, and no run is left training on its own."""
    import signal
    import subprocess
    import sys
    import time

    script = ("import pathlib, sys\n"
              "from experiments.sweep import Run, run_sweep_command\n"
              "runs = [Run(f'depth=8,dataset=digits,seed={s}', {'total_steps': 100000,\n"
              "        'batch_size': 32, 'log_every_steps': 5, 'eval_every_steps': 100000})\n"
              "        for s in (1, 2)]\n"
              "sys.exit(run_sweep_command('sweep', runs, pathlib.Path("
              f"{str(tmp_path)!r}), processes=2))\n")
    sweep = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "XLA_FLAGS": ""})
    dirs = [tmp_path / f"depth=8,dataset=digits,seed={s}" for s in (1, 2)]
    children = []
    try:
        while not all((d / "metrics.jsonl").exists()
                      and (d / "metrics.jsonl").read_text().count("\n") >= 2 for d in dirs):
            assert sweep.poll() is None, sweep.communicate()
            time.sleep(0.05)
        children = child_pids(sweep.pid)
        assert len(children) == 2
        sweep.send_signal(signal.SIGINT)
        _, err = sweep.communicate(timeout=300)
        assert not [pid for pid in children if alive(pid)]
        assert sweep.returncode == 130, err
        assert "Traceback" not in err
        assert "was interrupted (exit 130)" in err.strip().splitlines()[-1]
        for d in dirs:
            assert "interrupted (SIGINT) at step" in (d / "log.txt").read_text()
            assert any(p.name.isdigit() for p in (d / "checkpoints").iterdir())
    finally:
        sweep.kill()
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# --- Table 6: like with like, failed runs apart, the paper's numbers in their own place ------


def fake_run(root, depth, residual, seed, train, test, converged, bn_group_size=64):
    """A finished run's files as `collect` reads them, with the given final errors."""
    run = root / f"depth={depth},residual={str(residual).lower()},seed={seed}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(
        {"depth": depth, "residual": residual, "seed": seed, "batch_size": 128,
         "bn_group_size": bn_group_size}))
    (run / "summary.json").write_text(json.dumps(
        {"step": 10, "train/error": train, "test/error": test, "converged": converged,
         "not_converged_from_train_error": 81.0}))
    (run / "metrics.jsonl").write_text(json.dumps(
        {"step": 10, "train/error": train, "test/error": test}) + "\n")


def table_line(md: str, net: str) -> str:
    """The net's line in the first table of `md` (the main one)."""
    return next(x for x in md.splitlines() if x.startswith(f"| {net} |"))


def test_paper_table_puts_each_paper_number_beside_the_same_statistic(tmp_path):
    """ResNet-110: the paper's mean +- std of 5 beside ours over the converged runs, its best of
    5 beside our best; ResNet-20: its one run beside our mean. A run that did not train is
    listed apart and left out of the mean."""
    for seed, (train, test) in enumerate([(0.5, 6.5), (0.6, 6.7), (0.4, 6.6), (0.7, 7.0)]):
        fake_run(tmp_path, 110, True, seed, train, test, True)
    fake_run(tmp_path, 110, True, 4, 89.0, 90.0, False)
    fake_run(tmp_path, 20, True, 0, 1.0, 8.9, True)
    rows = degradation.report(tmp_path, "paper", paper=True)
    r110 = next(r for r in rows if r["net"] == "ResNet-110")
    assert r110["test_mean"] == pytest.approx(6.7)  # 90 % left out
    assert (r110["seeds"], r110["not_converged_seeds"], r110["test_best"]) == (5, [4], 6.5)
    assert (r110["paper_n"], r110["paper_mean"], r110["paper_std"], r110["paper_best"]) == (
        5, 6.61, 0.16, 6.43)
    md = (tmp_path / "degradation.md").read_text()
    cells = [c.strip() for c in table_line(md, "ResNet-110").split("|")[1:-1]]
    # net | runs | not converged | train | test mean | paper mean | test best | paper best
    assert cells[1:] == ["5", "1 (seed 4)", "0.55 +- 0.13 (n=4)", "6.70 +- 0.22 (n=4)",
                         "6.61 +- 0.16 (n=5)", "6.50 (best of 4)", "6.43 (best of 5)"]
    cells = [c.strip() for c in table_line(md, "ResNet-20").split("|")[1:-1]]
    assert cells[4:6] == ["8.90", "8.75 (n=1)"]  # one run beside one run, no +- 0.00
    assert cells[7] == ""  # the paper's single run is no best of several
    assert "+- 0.00" not in md
    # The failed run, apart, with its errors; the header states the BN groups.
    assert "| ResNet-110 | 4 | 89.00 | 90.00 |" in md
    assert "bn_group_size=64" in md.split("| net |")[0]
    assert json.loads((tmp_path / "degradation.json").read_text())["table"][-1]["paper_best"] \
        == 6.43


def test_cpu_scale_table_keeps_the_paper_apart_and_one_seed_has_no_spread(tmp_path):
    fake_run(tmp_path, 20, True, 0, 54.6, 52.8, True, bn_group_size=0)
    fake_run(tmp_path, 20, False, 0, 64.9, 62.4, True, bn_group_size=0)
    fake_run(tmp_path, 56, False, 0, 88.8, 88.9, False, bn_group_size=0)
    rows = degradation.report(tmp_path, "cifar-cpu")
    assert not any(k.startswith("paper") for r in rows for k in r)
    md = (tmp_path / "degradation.md").read_text()
    main_table = md.split("\n\n")[2]
    assert "8.75" not in main_table and "paper" not in main_table.lower()
    assert table_line(main_table, "ResNet-20").split("|")[4:6] == [" 54.60 ", " 52.80 "]
    assert "+-" not in main_table
    # plain-56 did not train: no mean, counted and listed apart.
    assert table_line(main_table, "plain-56").split("|")[2:6] == [" 1 ", " 1 (seed 0) ", " - ",
                                                                  " - "]
    assert "| plain-56 | 0 | 88.80 | 88.90 |" in md
    # The paper's numbers in their own labelled section, not beside these.
    paper = md.split("## ")[-1]
    assert paper.startswith("The paper's numbers") and "not comparable" in paper
    assert "| ResNet-20 | 8.75 (n=1) |" in paper
    assert "whole global batch" in md.split("| net |")[0]
    csv_header = (tmp_path / "degradation.csv").read_text().splitlines()[0]
    assert "paper" not in csv_header


def test_paper_preset_sets_bn_groups_of_64_and_the_warmup_rule():
    runs = {r.arg.split(",width")[0]: r.build() for r in degradation.PRESETS["paper"].runs()
            if r.arg.endswith("seed=0")}
    assert {c.bn_group_size for c in runs.values()} == {64}
    deep, shallow = runs["depth=110,residual=true"], runs["depth=56,residual=true"]
    assert (deep.warmup_until_error, deep.warmup_steps, deep.warmup_learning_rate) == (
        80.0, 2_000, 0.01)
    assert (shallow.warmup_until_error, shallow.warmup_steps) == (0.0, 0)
    assert runs["depth=1202,residual=true"].warmup_until_error == 80.0
    # CPU presets keep BN over the whole batch and scale the cap with the schedule.
    digits = degradation.PRESETS["digits"].runs()[-1].build()
    assert (digits.depth, digits.bn_group_size, digits.warmup_steps) == (110, 0, 12)


def test_ablation_table_leaves_failed_runs_out_and_one_seed_has_no_spread(tmp_path):
    from experiments import ablations

    fake_run(tmp_path, 8, True, 0, 10.0, 12.0, True)
    fake_run(tmp_path, 8, True, 1, 12.0, 14.0, True)
    fake_run(tmp_path, 8, True, 2, 88.0, 90.0, False)
    fake_run(tmp_path, 14, True, 0, 20.0, 22.0, True)
    rows = ablations.report(tmp_path, "preact", "t")
    assert [(r["seeds"], r["test_mean"]) for r in rows] == [(1, 22.0), (3, 13.0)]
    md = (tmp_path / "ablation_preact.md").read_text()
    assert "| depth=14,residual=true | 1 |  | 20.00 | 22.00 |" in md
    assert ("| depth=8,residual=true | 3 | 1 (seed 2) | 11.00 +- 1.41 (n=2) | "
            "13.00 +- 1.41 (n=2) |") in md
    assert "| depth=8,residual=true,seed=2 | 88.00 | 90.00 |" in md
