"""A trained net in a user's own code (resnet_jax.load, docs/trained.md): predictions equal to
training's own evaluation, the preprocessing saved with the run, old runs still loading, and the
plain Orbax + NNX recipe of docs/trained.md run as written there.

One tiny run (ResNet-8 on digits downsampled to 4x4, 20 steps), shared by every test here.
"""
import json
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import resnet_jax
from resnet_jax import data
from resnet_jax.main import main

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "trained.md"
ARGV = ["train", "--config=resnet_jax/configs/cifar.py:depth=8,dataset=digits",
        "--config.image_size=4", "--config.validation_size=100", "--config.batch_size=32",
        "--config.total_steps=20", "--config.log_every_steps=10"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESNET_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "resnet_jax_cache"))
        assert main([*ARGV, f"--workdir={workdir}"]) == 0
    return workdir


def wrong_in_summary(workdir, split="test") -> int:
    """The number of wrong predictions summary.json's error (%) stands for."""
    ds = data.load("digits", validation_size=100)
    n = len((ds.test if split == "test" else ds.validation).labels)
    error = json.loads((workdir / "summary.json").read_text())[f"{split}/error"]
    return round(error * n / 100)


def test_predict_on_the_test_split_gets_summarys_test_error_exactly(run):
    net = resnet_jax.load(run)
    test = data.load("digits").test  # 8x8: the dataset's own size; the run trained at 4x4
    assert test.images.dtype == np.uint8 and test.images.shape[1] == 8
    assert int((net.predict(test.images) != test.labels).sum()) == wrong_in_summary(run)
    # Already downsampled images, and another batch size: the same predictions.
    small = data.downsample(test, 4).images
    np.testing.assert_array_equal(net.predict(small, batch_size=7), net.predict(test.images))
    val = net.dataset.validation  # the held-out examples, as the run held them out
    assert int((net.predict(val.images) != val.labels).sum()) == wrong_in_summary(run, "val")


def test_load_gives_the_config_weights_as_plain_dicts_and_the_step(run):
    net = resnet_jax.load(run)
    assert (net.config.depth, net.step, net.config.image_size) == (8, 20, 4)
    assert type(net.params) is dict and type(net.batch_stats) is dict
    assert net.params["head"]["kernel"].shape == (64, 10)
    assert set(net.batch_stats["stem_bn"]) == {"mean", "var"}


def test_the_model_refuses_raw_pixels(run):
    """Raw uint8 images gave 83 % test error without a word (issue 26)."""
    net = resnet_jax.load(run)
    with pytest.raises(TypeError, match="preprocessing"):
        net.model(data.load("digits").test.images[:4], train=False)


def test_the_preprocessing_is_saved_when_training_starts(run):
    ds = data.load("digits", validation_size=100, image_size=4)
    with np.load(run / data.PREPROCESSING) as saved:
        assert sorted(saved) == ["image_size", "mean"]
        assert int(saved["image_size"]) == 4
        np.testing.assert_array_equal(saved["mean"], data.mean_image(ds.train.images))


def test_a_run_from_before_the_preprocessing_file_loads_and_says_so_once(run, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / data.PREPROCESSING).unlink()
    before = sorted(p.relative_to(old) for p in old.rglob("*"))
    capsys.readouterr()
    net = resnet_jax.load(old)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{old} has no preprocessing.npz (trained before it was saved): recomputed "
                   "its mean image from the training set"]
    test = data.load("digits").test
    assert int((net.predict(test.images) != test.labels).sum()) == wrong_in_summary(run)
    assert sorted(p.relative_to(old) for p in old.rglob("*")) == before  # nothing written
    assert main(["eval", f"--workdir={old}"]) == 0  # and eval, too
    assert json.loads((old / "eval-20.json").read_text())["test/error"] == json.loads(
        (run / "summary.json").read_text())["test/error"]


def doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_the_docs_resnet_jax_block_runs(run, capsys):
    (block, *_) = doc_blocks()
    scope = {}
    exec(block.replace('"runs/r20"', repr(str(run))), scope)
    assert f"test error {100 * wrong_in_summary(run) / 300:.2f}%" in capsys.readouterr().out
    assert scope["logits"].shape == (300, 10)


def test_the_docs_plain_orbax_recipe_needs_no_resnet_jax_and_predicts_the_same(run):
    _, restore, to_nnx = doc_blocks()
    restore = restore.replace('"runs/r20"', repr(str(run)))
    # As written, in a Python of its own: resnet_jax is never imported.
    check = restore + "\nimport sys\nassert 'resnet_jax' not in sys.modules\nprint(len(params))"
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          cwd=run.parent)
    assert proc.returncode == 0, proc.stderr
    scope = {}
    exec(restore + to_nnx, scope)
    test = data.load("digits").test
    np.testing.assert_array_equal(scope["predict"](test.images),
                                  resnet_jax.load(run).predict(test.images))


def test_a_damaged_preprocessing_file_is_one_line_naming_it(run, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    path = damaged / data.PREPROCESSING
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(data.DataError, match=f"cannot read {path} .*: delete it"):
        resnet_jax.load(damaged)
    path.unlink()  # as it says: then recomputed
    assert resnet_jax.load(damaged).step == 20


def test_the_readmes_load_example_runs_and_prints_summarys_test_error(run, capsys):
    [block] = [b for b in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(),
                                     re.S) if "resnet_jax.load(" in b]
    exec(block.replace('"runs/r20"', repr(str(run))), {})
    printed = float(capsys.readouterr().out.splitlines()[-1])
    assert printed == pytest.approx(json.loads((run / "summary.json").read_text())["test/error"])
