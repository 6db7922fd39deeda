"""A run's directory (resnet_jax/rundir.py): what a rerun may change, when a run is finished,
which checkpoint is the latest. Standard library only, so these need no training."""

import json

import pytest

from resnet_jax import rundir
from resnet_jax.configs import cifar
from resnet_jax.errors import ConfigError


def test_a_resume_may_change_only_the_resumable_keys(tmp_path):
    old = rundir.config_json(cifar.get_config("depth=8"))
    new = dict(old, total_steps=99, eval_every_steps=7, learning_rate=0.5, depth=14)
    assert rundir.changed_keys(old, new) == ["depth", "learning_rate"]
    rundir.write_json(tmp_path / rundir.CONFIG_JSON, old)
    rundir.check_workdir(tmp_path, cifar.get_config("depth=8"))  # the same config resumes
    with pytest.raises(ConfigError, match=r"holds a run with a different config \(depth\)"):
        rundir.check_workdir(tmp_path, cifar.get_config("depth=14"))


def test_runs_of_one_program_differ_only_in_their_seed():
    a, b = (rundir.config_json(cifar.get_config(f"depth=8,seed={s}")) for s in (0, 1))
    assert rundir.seed_group(a) == rundir.seed_group(b)
    assert rundir.changed_keys(a, b, rundir.SEED_KEYS) == []
    assert rundir.changed_keys(a, dict(b, width=2), rundir.SEED_KEYS) == ["width"]
    assert rundir.seed_group(a) != rundir.seed_group(dict(b, width=2))


def test_a_run_is_finished_at_its_summarys_step_or_later(tmp_path):
    assert rundir.finished_summary(tmp_path, 10) is None
    summary = {"step": 10, "train/error": 1.0, "test/error": 2.0}
    (tmp_path / rundir.SUMMARY_JSON).write_text(json.dumps(summary))
    assert rundir.finished_summary(tmp_path, 10) == summary
    assert rundir.finished_summary(tmp_path, 11) is None  # a longer run trains on
    (tmp_path / rundir.SUMMARY_JSON).write_text('{"step": 10}')
    with pytest.raises(ConfigError, match="has no 'train/error', 'test/error': delete it"):
        rundir.finished_summary(tmp_path, 10)


def test_the_latest_checkpoint_is_the_newest_step_folder(tmp_path):
    assert rundir.latest_step(tmp_path) is None
    for name in ("10", "20", "30.damaged", "40.orbax-checkpoint-tmp-1"):
        (tmp_path / rundir.CHECKPOINTS / name).mkdir(parents=True)
    assert rundir.latest_step(tmp_path) == 20
