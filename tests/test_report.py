"""experiments/report.py on run directories written by hand: no training, so each test is quick."""

import json
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

from experiments import report as report_module
from resnet_jax.configs import cifar

REPO = pathlib.Path(__file__).resolve().parents[1]
OUTPUTS = ("report.md", "report.csv", "report.json", "curves.png", "curves.pdf",
           "events.out.tfevents.hparams")


def make_run(root, depth=20, residual=True, seed=0, train=10.0, test=12.0, converged=True,
             state="finished", **config_args):
    """A run directory as the trainer leaves it: the whole config (cifar.py's, 20 iterations),
    metrics.jsonl every 5 iterations with the test error every 10, and by `state` a summary.json
    (finished), a failure.json (failed) or neither (unfinished: 10 of 20 iterations)."""
    arg = ",".join([f"depth={depth}", f"residual={str(residual).lower()}",
                    *(f"{k}={v}" for k, v in config_args.items()), f"seed={seed}"])
    run = root / arg
    run.mkdir(parents=True)
    config = json.loads(cifar.get_config(arg).to_json()) | {"total_steps": 20, "dataset": "digits"}
    (run / "config.json").write_text(json.dumps(config))
    records = [{"step": s, "train/error": train + 20 - s, "train/loss": 0.1 * (train + 20 - s)}
               | ({"test/error": test + 20 - s, "val/error": test + 21 - s} if s % 10 == 0 else {})
               for s in (5, 10, 15, 20)]
    if state == "unfinished":
        records = records[:2]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if state == "finished":
        (run / "summary.json").write_text(json.dumps(
            {"step": 20, "train/error": train, "train/loss": 0.1 * train, "test/error": test,
             "val/error": test + 1, "not_converged_from_train_error": 81.0,
             "converged": converged}))
    elif state == "failed":
        (run / "failure.json").write_text(json.dumps({"reason": "loss is NaN at step 7"}))
    return run


def write_sweep(root, report=None, runs=()):
    (root / "sweep.json").write_text(json.dumps(
        {"sweep": "experiments/sweeps/test.py", "overrides": {"total_steps": 20},
         "runs": list(runs), "report": report or {}}))


def row_of(rows, **values):
    [row] = [r for r in rows if all(r[k] == v for k, v in values.items())]
    return row


def table_line(md, first_cells):
    """The line of the first table of `md` that starts with these cells."""
    return next(line for line in md.splitlines() if line.startswith(f"| {first_cells} |"))


def cells(line):
    return [c.strip() for c in line.split("|")[1:-1]]


# Test errors of four seeds per net; seed 4 of ResNet-56 does not train.
ERRORS = {(20, False): [14.0, 15.5, 13.0, 16.25], (20, True): [9.0, 8.5, 10.25, 9.75],
          (56, False): [20.0, 22.5, 21.0, 19.5], (56, True): [8.0, 7.25, 9.5, 8.75]}


@pytest.fixture
def sweep(tmp_path):
    for (depth, residual), tests in ERRORS.items():
        for seed, test in enumerate(tests):
            make_run(tmp_path, depth, residual, seed, train=test - 2, test=test)
    make_run(tmp_path, 56, True, 4, train=88.5, test=90.0, converged=False)
    return tmp_path


def test_table_holds_each_groups_statistics_over_the_converged_runs(sweep):
    rows = report_module.report(sweep, by=["residual", "depth"])
    assert [(r["residual"], r["depth"]) for r in rows] == [
        (False, 20), (False, 56), (True, 20), (True, 56)]
    for (depth, residual), tests in ERRORS.items():
        row = row_of(rows, depth=depth, residual=residual)
        assert row["mean"] == pytest.approx(np.mean(tests))
        assert row["std"] == pytest.approx(np.std(tests, ddof=1))
        assert row["median"] == pytest.approx(np.median(tests))
        assert row["best"] == min(tests)
        assert row["train_mean"] == pytest.approx(np.mean(tests) - 2)
        assert row["train_std"] == pytest.approx(np.std(tests, ddof=1))
    # The run that did not train is counted and named, not averaged in.
    resnet56 = row_of(rows, depth=56, residual=True)
    assert (resnet56["runs"], resnet56["converged_runs"], resnet56["not_converged_seeds"]) == (
        5, 4, [4])
    saved = json.loads((sweep / "report.json").read_text())
    assert saved["table"] == json.loads(json.dumps(rows))
    assert saved["not_converged_runs"] == ["depth=56,residual=true,seed=4"]
    assert (saved["by"], saved["metric"], saved["x"]) == (["residual", "depth"], "test/error",
                                                          "depth")
    csv_lines = (sweep / "report.csv").read_text().splitlines()
    assert csv_lines[0].startswith("residual,depth,runs,converged_runs,not_converged_seeds,mean")
    assert len(csv_lines) == 5
    md = (sweep / "report.md").read_text()
    assert cells(table_line(md, "true | 56"))[2:] == [
        "5", "1 (seed 4)", f"{np.mean(ERRORS[56, True]) - 2:.2f} +- "
        f"{np.std(ERRORS[56, True], ddof=1):.2f} (n=4)",
        f"{np.mean(ERRORS[56, True]):.2f} +- {np.std(ERRORS[56, True], ddof=1):.2f} (n=4)",
        "7.25 (best of 4)"]
    apart = md.split("## Not converged")[1]
    assert "| depth=56,residual=true,seed=4 | 4 | 88.50 | 90.00 |" in apart


def test_gap_over_iterations_between_two_values_of_a_key(sweep):
    report_module.report(sweep, by=["residual", "depth"], gap="depth:20,56")
    saved = json.loads((sweep / "report.json").read_text())["gap"]
    assert (saved["key"], saved["from"], saved["to"]) == ("depth", 20, 56)
    assert [t["where"] for t in saved["tables"]] == [{"residual": False}, {"residual": True}]
    for t in saved["tables"]:
        residual = t["where"]["residual"]
        a, b = ERRORS[20, residual], ERRORS[56, residual]
        # The run that did not train (ResNet-56 seed 4) is left out, as in the table.
        assert t["runs"] == [4, 4]
        assert [r["step"] for r in t["rows"]] == [10, 20]  # where the test error was evaluated
        for r in t["rows"]:
            after = 20 - r["step"]  # make_run's curves fall to the final errors by step 20
            assert r["metric_a_mean"] == pytest.approx(np.mean(a) + after)
            assert r["metric_b_std"] == pytest.approx(np.std(b, ddof=1))
            assert r["train_b_mean"] == pytest.approx(np.mean(b) - 2 + after)
            assert r["train_gap"] == pytest.approx(np.mean(b) - np.mean(a))
            assert r["metric_gap"] == pytest.approx(np.mean(b) - np.mean(a))
    md = (sweep / "report.md").read_text()
    section = md.split("## The gap over iterations: depth=56 minus depth=20")[1]
    residual = section.split("**residual=true**")[1]
    gap = np.mean(ERRORS[56, True]) - np.mean(ERRORS[20, True])
    line = next(x for x in residual.splitlines() if x.startswith("| 20 |"))
    assert cells(line)[3] == cells(line)[6] == f"{gap:+.2f}"
    assert cells(line)[4] == (f"{np.mean(ERRORS[20, True]):.2f} +- "
                              f"{np.std(ERRORS[20, True], ddof=1):.2f}")


def test_gap_from_sweep_json_and_its_one_run_sides(tmp_path):
    make_run(tmp_path, 20, True, 0, train=10.0, test=12.0)
    make_run(tmp_path, 56, True, 0, train=8.0, test=9.5)
    write_sweep(tmp_path, {"gap": "depth:20,56"})
    report_module.report(tmp_path)
    [t] = json.loads((tmp_path / "report.json").read_text())["gap"]["tables"]
    assert t["where"] == {} and t["runs"] == [1, 1]
    assert t["rows"][-1]["metric_gap"] == pytest.approx(-2.5)
    assert t["rows"][-1]["metric_a_std"] is None
    assert "| 20 | 10.00 | 8.00 | -2.00 | 12.00 | 9.50 | -2.50 |" in (
        tmp_path / "report.md").read_text()


def test_by_defaults_to_the_keys_that_vary_seed_and_following_keys_aside(tmp_path):
    """Depth 110 warms up (cifar.py: warmup_steps, warmup_until_error follow the depth): those
    keys vary too, but group nothing the depth does not."""
    for depth in (20, 110):
        for residual in (False, True):
            for seed in (0, 1):
                make_run(tmp_path, depth, residual, seed, test=10.0 + depth / 10 + seed)
    rows = report_module.report(tmp_path)
    assert [(r["depth"], r["residual"], r["runs"]) for r in rows] == [
        (20, False, 2), (20, True, 2), (110, False, 2), (110, True, 2)]
    assert json.loads((tmp_path / "report.json").read_text())["by"] == ["depth", "residual"]
    configs = [{"depth": 20, "seed": 0, "warm": 0, "lr": 0.1, "name": "a"},
               {"depth": 20, "seed": 1, "warm": 0, "lr": 0.2, "name": "b"},
               {"depth": 56, "seed": 0, "warm": 9, "lr": 0.1, "name": "c"},
               {"depth": 56, "seed": 1, "warm": 9, "lr": 0.1, "name": "c"}]
    assert report_module.default_by(configs) == ["depth", "lr"]  # warm, name: follow them


def test_grouping_by_a_key_given_on_the_command_line_pools_the_rest(sweep):
    """--by overrides sweep.json's; its panels key, now pooled, is dropped, not an error."""
    write_sweep(sweep, {"by": ["residual", "depth"], "x": "depth", "panels": "residual"})
    rows = report_module.report(sweep, by=["depth"])
    saved = json.loads((sweep / "report.json").read_text())
    assert (saved["by"], saved["x"], saved["panels"]) == (["depth"], "depth", None)
    assert [(r["depth"], r["runs"], r["converged_runs"]) for r in rows] == [(20, 8, 8),
                                                                             (56, 9, 8)]
    assert rows[0]["mean"] == pytest.approx(np.mean(ERRORS[20, False] + ERRORS[20, True]))


def test_one_seed_has_no_spread(tmp_path):
    make_run(tmp_path, 20, True, 0, train=7.0, test=8.9)
    make_run(tmp_path, 56, True, 0, train=6.0, test=7.2)
    rows = report_module.report(tmp_path)
    assert [(r["depth"], r["std"]) for r in rows] == [(20, None), (56, None)]
    md = (tmp_path / "report.md").read_text()
    assert cells(table_line(md, "20"))[1:] == ["1", "", "7.00", "8.90"]
    assert "+-" not in md and "best of" not in md


def test_failed_and_unfinished_runs_are_listed_and_left_out(sweep, capsys):
    make_run(sweep, 20, True, 7, state="failed")
    make_run(sweep, 20, True, 8, state="unfinished")
    write_sweep(sweep, runs=["depth=20,residual=true,seed=9"])  # not started: no directory yet
    rows = report_module.report(sweep, by=["residual", "depth"])
    assert row_of(rows, depth=20, residual=True)["runs"] == 4
    saved = json.loads((sweep / "report.json").read_text())
    assert saved["failed_runs"] == {"depth=20,residual=true,seed=7": "loss is NaN at step 7"}
    assert saved["unfinished_runs"] == {"depth=20,residual=true,seed=8": "step 10 of 20",
                                        "depth=20,residual=true,seed=9": "not started"}
    md = capsys.readouterr().out
    assert md == (sweep / "report.md").read_text()
    assert "| depth=20,residual=true,seed=7 | loss is NaN at step 7 |" in md.split("## Failed")[1]
    assert "| depth=20,residual=true,seed=8 | step 10 of 20 |" in md.split("## Unfinished")[1]
    assert "20 runs: 17 finished, 1 of them not converged, 1 failed, 2 unfinished." in md


REFERENCE = {"source": "He et al. 2015, Table 6", "rows": [
    {"where": {"residual": True, "depth": 56}, "n": 5, "mean": 6.61, "std": 0.16, "best": 6.43},
    {"where": {"residual": True, "depth": 20}, "n": 1, "mean": 8.75}]}


def test_a_comparable_reference_stands_beside_the_statistic_of_its_kind(sweep):
    write_sweep(sweep, {"by": ["residual", "depth"], "reference": REFERENCE | {"comparable": True},
                        "title": "Plain vs residual"})
    rows = report_module.report(sweep)
    resnet56 = row_of(rows, depth=56, residual=True)
    assert (resnet56["reference_n"], resnet56["reference_mean"], resnet56["reference_std"],
            resnet56["reference_best"]) == (5, 6.61, 0.16, 6.43)
    assert "reference_n" not in row_of(rows, depth=56, residual=False)
    md = (sweep / "report.md").read_text()
    assert md.startswith("# Plain vs residual\n")
    header = cells(md.splitlines()[md.splitlines().index(next(
        x for x in md.splitlines() if x.startswith("| residual |")))])
    assert header[5:] == ["test error %", "reference, test error %", "test error %, best",
                          "reference, best"]
    line = cells(table_line(md, "true | 56"))
    assert line[6:] == ["6.61 +- 0.16 (n=5)", "7.25 (best of 4)", "6.43 (best of 5)"]
    # A single reference run beside our mean, and no best of several beside our best.
    assert cells(table_line(md, "true | 20"))[6:] == ["8.75 (n=1)", "8.50 (best of 4)", ""]
    assert cells(table_line(md, "false | 20"))[6] == ""
    assert "not comparable" not in md and "reference_best" in (sweep / "report.csv").read_text()


def test_a_reference_not_comparable_stands_in_a_section_of_its_own(sweep):
    write_sweep(sweep, {"by": ["residual", "depth"], "title": "t",
                        "reference": REFERENCE | {"comparable": False}})
    rows = report_module.report(sweep)
    assert not any(k.startswith("reference") for r in rows for k in r)
    md = (sweep / "report.md").read_text()
    main_table = md.split("\n## ")[0]
    assert "6.61" not in main_table and "reference" not in main_table.lower()
    section = md.split("\n## ")[-1]
    assert section.startswith("Reference (He et al. 2015, Table 6): not comparable")
    assert "| residual=true, depth=56 | 6.61 +- 0.16 (n=5) | 6.43 (best of 5) |" in section
    assert "| residual=true, depth=20 | 8.75 (n=1) |  |" in section
    assert "reference" not in (sweep / "report.csv").read_text().splitlines()[0]
    assert json.loads((sweep / "report.json").read_text())["reference"]["rows"][0]["mean"] == 6.61


def png_width(path):
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def test_figures_of_the_metric_and_of_the_curves(sweep):
    report_module.report(sweep, panels="residual", metric="val/error")
    for name in ("report_val_error.png", "report_val_error.pdf", "curves.png", "curves.pdf"):
        assert (sweep / name).stat().st_size > 1000, name
    two_panels = png_width(sweep / "curves.png")
    report_module.report(sweep)  # one panel
    assert png_width(sweep / "curves.png") < 0.6 * two_panels
    assert (sweep / "report_test_error.png").exists()


def test_no_numeric_key_no_metric_figure(tmp_path):
    for block in ("post", "pre"):
        make_run(tmp_path, 8, True, 0, block=block)
    report_module.report(tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["by"] == ["block"]
    assert (tmp_path / "curves.png").exists() and not list(tmp_path.glob("report_*.png"))


def read_events(path):
    """The Event protos of a tfevents file: records of length, its CRC, data, the data's CRC."""
    from tensorboardX.proto.event_pb2 import Event

    data, events = path.read_bytes(), []
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        events.append(Event.FromString(data[12:12 + length]))
        data = data[12 + length + 4:]
    return events


def hparams_data(path):
    """The HParams plugin data in a tfevents file, by tag (_hparams_/experiment,
    _hparams_/session_start_info, ...), one list per tag; and its scalars:
    tag -> [(step, value)]."""
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    found, scalars = {}, {}
    for event in read_events(path):
        for value in event.summary.value:
            if value.tag.startswith("_hparams_/"):
                found.setdefault(value.tag, []).append(
                    HParamsPluginData.FromString(value.metadata.plugin_data.content))
            elif value.HasField("simple_value"):
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found, scalars


def hparam_values(info) -> dict:
    """A SessionStartInfo's hparams as Python values."""
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def experiment_columns(root):
    """ROOT's experiment summary: [(hparam, type, its values, differs)], [metric tags]."""
    found, _ = hparams_data(root / "events.out.tfevents.hparams")
    [data] = found.pop("_hparams_/experiment")
    assert not found
    from tensorboardX.proto.api_pb2 import DataType

    # `differs` (field 7) is newer than tensorboardX's proto: read from the unknown field's bytes.
    return ([(h.name, DataType.Name(h.type), [getattr(v, v.WhichOneof("kind"))
                                              for v in h.domain_discrete.values],
              h.SerializeToString().endswith(b"\x38\x01"))
             for h in data.experiment.hparam_infos],
            [m.name.tag for m in data.experiment.metric_infos])


def test_hparams_name_the_swept_keys_with_their_values_once_for_the_sweep(tmp_path):
    make_run(tmp_path, 20, False, 0, train=11.0, test=12.5)
    make_run(tmp_path, 20, True, 0, train=5.0, test=6.5)
    make_run(tmp_path, 56, True, 1, train=6.0, test=7.5)
    make_run(tmp_path, 56, True, 2, state="failed")
    (tmp_path / "hparams" / "depth=20,residual=true,seed=0").mkdir(parents=True)  # older reports'
    for _ in range(2):  # a rerun rewrites the one file
        report_module.report(tmp_path)
        assert experiment_columns(tmp_path) == (
            [("depth", "DATA_TYPE_FLOAT64", [20, 56], True),
             ("residual", "DATA_TYPE_BOOL", [False, True], True),
             ("seed", "DATA_TYPE_FLOAT64", [0, 1], True)],
            ["train/error", "test/error", "val/error"])
        assert not (tmp_path / "hparams").exists()
        assert [p.name for p in tmp_path.glob("*tfevents*")] == ["events.out.tfevents.hparams"]


def test_hparams_experiment_parses_with_tensorboards_own_proto(tmp_path):
    tensorboard = pytest.importorskip("tensorboard.plugins.hparams.plugin_data_pb2")
    make_run(tmp_path, 20, True, 0)
    make_run(tmp_path, 20, True, 1)
    report_module.report(tmp_path)
    found, _ = hparams_data(tmp_path / "events.out.tfevents.hparams")
    content = found["_hparams_/experiment"][0].SerializeToString()
    experiment = tensorboard.HParamsPluginData.FromString(content).experiment
    assert [(h.name, h.differs) for h in experiment.hparam_infos] == [("seed", True)]


def outputs(root):
    return sorted(p.name for p in root.iterdir() if p.name in OUTPUTS
                  or p.name.startswith("report"))


@pytest.mark.parametrize("case, args, expected", [
    ("by", ["--by=depth,wdith"], "--by=wdith is not a config key of these runs: use one of "
                                 "model, depth, residual"),
    ("x", ["--x=learning_rate"], "--x=learning_rate is not one of the keys the runs are "
                                 "grouped by (--by): use one of depth, residual"),
    ("panels", ["--panels=block"], "--panels=block is not one of the keys"),
    ("metric", ["--metric=test/acc"], "--metric=test/acc is not in every finished run's "
                                      "summary.json: use one of train/error, train/loss, "
                                      "test/error, val/error"),
    ("sweep.json by", [], "sweep.json's report.by=wdith is not a config key"),
    ("gap key", ["--gap=depht:20,56"], "--gap=depht is not one of the keys the runs are grouped "
                                       "by (--by): use one of depth, residual"),
    ("gap value", ["--gap=depth:20,110"], "--gap=depth:20,110: no finished run has depth=110: "
                                          "use two of 20, 56"),
    ("gap form", ["--gap=depth"], "--gap=depth is not KEY:A,B: name a --by key and two of its "
                                  "values, such as depth:20,56"),
    ("missing root", ["--root=/nonexistent/sweep"], "--root=/nonexistent/sweep is no directory"),
    ("config.json", [], "config.json is cut short or not JSON"),
    ("summary.json", [], "summary.json is cut short or not JSON"),
    ("sweep.json", [], "sweep.json cannot be read or is not JSON"),
    ("sweep.json rows", [], "sweep.json is not a sweep record"),
    ("no finished run", [], "no finished runs under"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(sweep, capsys, case, args, expected):
    run = sweep / "depth=20,residual=true,seed=0"
    if case == "sweep.json by":
        write_sweep(sweep, {"by": ["wdith"]})
    elif case in ("config.json", "summary.json"):
        (run / case).write_text('{"depth": 2')
    elif case == "sweep.json":
        (sweep / "sweep.json").write_text('{"report": {')
    elif case == "sweep.json rows":
        write_sweep(sweep, {"reference": {"rows": [{"mean": 6.61}]}})
    elif case == "no finished run":
        for summary in sweep.glob("*/summary.json"):
            summary.unlink()
    assert report_module.main([f"--root={sweep}", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("report: error: ") and expected in err, err
    if case in ("config.json", "summary.json"):
        assert str(run / case) in err
    assert outputs(sweep) == []


def test_no_finished_run_writes_nothing(tmp_path, capsys):
    make_run(tmp_path, 20, True, 0, state="failed")
    make_run(tmp_path, 20, True, 1, state="unfinished")
    assert report_module.main([f"--root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"report: error: no finished runs under {tmp_path} (1 failed, 1 unfinished): "
                   "train the sweep first (python -m experiments.sweep)\n")
    assert outputs(tmp_path) == []


def test_report_command_from_the_repository_root(tmp_path):
    make_run(tmp_path, 20, False, 0, train=11.0, test=12.5)
    make_run(tmp_path, 20, True, 0, train=5.0, test=6.5)
    proc = subprocess.run([sys.executable, "-m", "experiments.report", f"--root={tmp_path}",
                           "--title=From the command line"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (tmp_path / "report.md").read_text()
    assert proc.stdout.startswith("# From the command line\n")
    assert cells(table_line(proc.stdout, "true")) == ["true", "1", "", "5.00", "6.50"]
    assert outputs(tmp_path) == sorted(OUTPUTS)
