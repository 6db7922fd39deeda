"""Training facts: the schedule, the batches, a loss that falls, and a real CIFAR-10 run."""

import json
import subprocess

import jax
import numpy as np
import pytest

from resnet_jax import data, parallel, train
from resnet_jax.errors import ConfigError
from resnet_jax.step import create_lr_schedule, create_training, per_layer_metrics
from resnet_jax.metrics import TIMING_KEYS
from resnet_jax.configs import cifar
from tests.conftest import SHARED_DATASETS


def test_schedule_is_the_papers():
    c = cifar.get_config("depth=110")
    c.warmup_steps = 400
    lr = create_lr_schedule(c)
    got = [float(lr(s)) for s in (0, 399, 400, 31_999, 32_000, 47_999, 48_000, 63_999)]
    np.testing.assert_allclose(got, [0.01, 0.01, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    # Where the warm-up ended by the rule (the train state holds it), the full rate follows.
    np.testing.assert_allclose([float(lr(s, 123)) for s in (122, 123)], [0.01, 0.1], rtol=1e-6)
    # ResNet-110 warms up by the paper's rule, at most 2,000 iterations; ResNet-56 not at all.
    assert (c.warmup_until_error, c.warmup_error_window_steps) == (80.0, 20)
    assert cifar.get_config("depth=110").warmup_steps == 2_000
    assert cifar.get_config("depth=56").warmup_steps == 0


def test_batches_are_functions_of_seed_and_step():
    images = np.arange(10 * 4 * 4 * 1, dtype=np.uint8).reshape(10, 4, 4, 1)
    labels = np.arange(10, dtype=np.int32)
    mean = np.zeros((4, 4, 1), np.float32)
    key = jax.random.key(0)
    cut = jax.jit(lambda step: data.train_batch(images, labels, mean, key, step, batch_size=5,
                                                padding=1, flip=True))
    a, b = cut(3), cut(3)
    np.testing.assert_array_equal(a["image"], b["image"])
    # One epoch (2 steps of 5) visits every example once; the next epoch reshuffles.
    epoch0 = np.concatenate([cut(0)["label"], cut(1)["label"]])
    epoch1 = np.concatenate([cut(2)["label"], cut(3)["label"]])
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10))
    assert not np.array_equal(epoch0, epoch1)
    assert a["image"].shape == (5, 4, 4, 1)


@pytest.mark.parametrize("seeds", [(), (3, 4)])
def test_the_feed_draws_each_epochs_order_once_and_cuts_the_same_batches(seeds):
    """DeviceFeed draws an epoch's permutation once (data.epoch_order) and hands it to each
    batch: every batch, across epoch boundaries and with seeds in one program, is bit for bit the
    one data.train_batch draws whole (as a program of several steps still does)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
    split = data.Split(images, rng.integers(0, 10, 20).astype(np.int32))
    ds = data.Dataset("t", 10, split, split, None)
    config = cifar.get_config("dataset=digits")
    config.batch_size, config.crop_padding = 8, 2  # 2 steps per epoch, 4 examples left out
    backend = parallel.create_backend("jit", 8, num_devices=2, seeds=seeds)
    feed = data.DeviceFeed(ds, config, backend)
    mean = data.mean_image(images)

    def whole(images, labels, mean, key, step, *, part):  # the order drawn in every batch
        return data.train_batch(images, labels, mean, key, step, batch_size=8, padding=2,
                                flip=config.flip, part=part)

    keys = [jax.random.fold_in(jax.random.key(seed), 1) for seed in seeds or (config.seed,)]
    if seeds:
        one, whole = whole, lambda images, labels, mean, keys, step, *, part: jax.vmap(
            lambda key: one(images, labels, mean, key, step, part=part))(keys)
    reference = backend.compile_batch(whole)  # as DeviceFeed cut batches before
    for step in (0, 1, 2, 3, 7, 2, 9):  # steps out of order and back: each epoch drawn anew
        got = feed.train_batch(step)
        want = reference(images, split.labels, mean, backend.stack_runs(keys), step)
        for k in ("image", "label"):
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
    # The path of steps_per_call > 1: the carry's order is kept within an epoch and drawn anew
    # inside the program where a step starts the next one.
    batch_of, data_, carry_of = feed.traced_batches()
    run = jax.jit(batch_of)
    for start, steps in ((0, (0, 1, 2, 3, 4)), (3, (3, 4, 5)), (7, (7, 8))):
        carry = carry_of(start)
        for step in steps:
            traced, carry = run(data_, carry, step)
            assert int(carry[0]) == step // 2
            for k in ("image", "label"):
                np.testing.assert_array_equal(np.asarray(traced[k]),
                                              np.asarray(feed.train_batch(step)[k]))


def test_augmentation_crops_and_flips():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    mean = np.zeros((8, 8, 3), np.float32)
    out = data.train_batch(images, np.zeros(64, np.int32), mean, jax.random.key(1), 0,
                           batch_size=64, padding=2, flip=True)
    perm_images = images[np.asarray(jax.random.permutation(
        jax.random.split(jax.random.fold_in(jax.random.key(1), 0))[0], 64))]
    x = np.asarray(out["image"])
    src = perm_images.astype(np.float32) / 255.0
    # Each output is its source shifted by at most 2 pixels and maybe mirrored.
    unchanged = [np.allclose(x[i], src[i]) for i in range(64)]
    flipped_only = [np.allclose(x[i], src[i][:, ::-1]) for i in range(64)]
    assert 0 < sum(unchanged) + sum(flipped_only) < 64


def tiny_training(arg: str, parallelism: str, **overrides):
    """ResNet-8 compiled for 8 devices, its state on them, and one fixed random batch of 16."""
    c = cifar.get_config(arg)
    c.batch_size = 16
    c.update(overrides)
    backend = parallel.create_backend(parallelism, 16, 8)
    _, state, step = create_training(c, backend, num_classes=10, in_channels=3)
    rng = np.random.default_rng(0)
    batch = jax.device_put({"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
                            "label": rng.integers(0, 10, 16).astype(np.int32)},
                           backend.data_sharding)
    return backend.put_state(state), step, batch


def test_loss_falls_on_a_fixed_batch():
    state, step, batch = tiny_training("depth=8", "jit")
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.2 * losses[0]
    assert int(state.step) == 30


@pytest.mark.skipif(not (SHARED_DATASETS / "cifar10_jpeg.tar.gz").exists(),
                    reason="needs ../shared/datasets/cifar10_jpeg.tar.gz")
def test_short_real_cifar10_run_learns(tmp_path):
    """5,000 real CIFAR-10 training images (JPEG copy), ResNet-8, 240 steps of 32."""
    subprocess.run(["tar", "xzf", str(SHARED_DATASETS / "cifar10_jpeg.tar.gz"), "-C",
                    str(tmp_path), "--wildcards", "cifar10_jpeg/train/*/0[0-4]??.jpg",
                    "cifar10_jpeg/test/*/00??.jpg"], check=True)
    c = cifar.get_config(f"depth=8,dataset=folder:{tmp_path}/cifar10_jpeg")
    c.batch_size, c.total_steps, c.log_every_steps = 32, 240, 40
    c.num_devices = 1  # 8 simulated devices of 4 images each would only slow it down
    c.eval_every_steps = c.checkpoint_every_steps = 120
    c.eval_subset = 200  # of the 1,000 test images; the final evaluation uses them all
    summary = train.train_and_evaluate(c, str(tmp_path / "run"))
    # Chance is 90 % error on 10 classes.
    assert summary["train/error"] < 72
    assert summary["test/error"] < 75
    records = [json.loads(line)
               for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["train/error"] > summary["train/error"] + 10
    tested = [r for r in records if "test/error" in r]
    assert [r["step"] for r in tested] == [120, 240]
    # Errors come in steps of 100 % / the number of images evaluated: 0.5 % mid-run, 0.1 % at the end.
    assert tested[0]["test/error"] * 2 == pytest.approx(round(tested[0]["test/error"] * 2))
    assert summary["test/error"] * 10 == pytest.approx(round(summary["test/error"] * 10))


@pytest.mark.parametrize("residual, scan", [(True, False), (False, False), (True, True)])
def test_depth_diagnostics_are_in_the_metrics(residual, scan):
    # ResNet-14 scanned: each stage a first block and a run of one more.
    state, step, batch = tiny_training(f"depth={14 if scan else 8},residual={residual}", "pmap",
                                       scan_blocks=scan)
    _, metrics = step(state, batch)
    metrics = per_layer_metrics(jax.device_get(metrics))
    keys = set(metrics)
    blocks = 6 if scan else 3
    assert {"grad_norm/stage1", "grad_norm/stage2", "grad_norm/stage3"} <= keys
    # The stem and 2 convs in each block are 3x3 layers.
    assert {k for k in keys if k.startswith("response_std/")} == {
        f"response_std/layer{i:03d}" for i in range(1 + 2 * blocks)}
    ratios = {k for k in keys if k.startswith("branch_ratio/")}
    assert ratios == ({f"branch_ratio/block{i:03d}" for i in range(blocks)} if residual
                      else set())
    stages = [float(metrics[f"grad_norm/stage{k}"]) for k in (1, 2, 3)]
    # The stages are part of the whole gradient; the stem and head make up the rest.
    assert 0 < np.sqrt(sum(s * s for s in stages)) < float(metrics["grad_norm"])
    assert all(float(metrics[k]) > 0 for k in keys if "/" in k)


@pytest.mark.parametrize("seed_map", ["loop", "vmap"])  # CPU's default; GPU's and TPU's
def test_seeds_in_one_program_train_what_each_seed_trains_alone(tmp_path, monkeypatch, seed_map):
    """Two seeds in one program (train_runs) leave each workdir as the seed's own run does: its
    data order and augmentation, metrics, evaluations, checkpoint and summary."""
    monkeypatch.setattr(parallel, "SEED_MAPS", {"cpu": seed_map})
    def config(seed):
        c = cifar.get_config(f"depth=8,dataset=digits,seed={seed}")
        c.update(batch_size=32, total_steps=4, log_every_steps=2, eval_every_steps=2,
                 checkpoint_every_steps=4, eval_subset=100)
        return c

    together = train.train_runs([config(0), config(1)], [tmp_path / "s0", tmp_path / "s1"])
    alone = train.train_and_evaluate(config(1), str(tmp_path / "alone1"))
    assert together[1] == pytest.approx(alone, rel=1e-5)
    assert together[0]["train/loss"] != pytest.approx(alone["train/loss"], rel=1e-3)
    read = lambda name: [json.loads(line) for line in  # noqa: E731
                         (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(read("s1"), read("alone1"), strict=True):
        for key in a.keys() - TIMING_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    from resnet_jax import checkpoint
    for x, y in zip(jax.tree.leaves(checkpoint.read(tmp_path / "s1" / "checkpoints", 4)),
                    jax.tree.leaves(checkpoint.read(tmp_path / "alone1" / "checkpoints", 4)),
                    strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_seeds_in_one_program_must_differ_only_in_seed(tmp_path):
    a, b = cifar.get_config("depth=8,seed=0"), cifar.get_config("depth=8,seed=1")
    b.learning_rate = 0.2
    with pytest.raises(ConfigError, match="may differ only in seed, not in learning_rate"):
        train.train_runs([a, b], [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ConfigError, match="distinct seeds"):
        train.train_runs([a, a], [tmp_path / "a", tmp_path / "b"])
    assert not list(tmp_path.iterdir())


def test_warmup_ends_after_the_first_window_below_the_error_threshold():
    """The paper's rule in the compiled step: lr 0.01 until the mean training error of the last
    3 batches is below 50 %, then 0.1; every device holds the same switch (pmap)."""
    state, step, batch = tiny_training("depth=8", "pmap", warmup_until_error=50.0,
                                       warmup_steps=25, warmup_error_window_steps=3)
    errors, lrs = [], []
    for _ in range(12):
        state, metrics = step(state, batch)
        errors.append(float(metrics["error"]))
        lrs.append(float(metrics["lr"]))
    end = next(t + 1 for t in range(2, 12) if np.mean(errors[t - 2:t + 1]) < 50.0)
    assert 3 <= end < 12  # ended by the rule, not by the cap of 25
    np.testing.assert_array_equal(np.asarray(state.warmup_end_step), [end] * 8)
    np.testing.assert_allclose(lrs, [0.01] * end + [0.1] * (12 - end), rtol=1e-6)


def test_warmup_switch_is_recorded_and_a_run_resumed_across_it_equals_the_unbroken_one(
        tmp_path):
    import shutil

    from resnet_jax import checkpoint

    c = cifar.get_config("depth=8,dataset=digits")
    c.update(batch_size=32, total_steps=12, log_every_steps=1, eval_every_steps=12,
             checkpoint_every_steps=2, keep_checkpoints=6, warmup_learning_rate=0.05,
             warmup_until_error=82.0, warmup_steps=12, warmup_error_window_steps=3,
             log_diagnostics=False)
    unbroken = tmp_path / "unbroken"
    summary = train.train_and_evaluate(c, str(unbroken))
    read = lambda w: [json.loads(line)  # noqa: E731
                      for line in (w / "metrics.jsonl").read_text().splitlines()]
    records = read(unbroken)
    # The switch: on the record of the last step warmed up, by the rule over the logged errors.
    (end,) = [int(r["warmup_end_step"]) for r in records if "warmup_end_step" in r]
    errors = [r["train/error"] for r in records]
    assert end == next(t + 1 for t in range(2, 12) if np.mean(errors[t - 2:t + 1]) < 82.0)
    assert 3 <= end < 12 and records[end - 1]["warmup_end_step"] == end
    np.testing.assert_allclose([r["lr"] for r in records], [0.05] * end + [0.1] * (12 - end),
                               rtol=1e-6)
    # Crashed before the switch: only the checkpoints before it survive.
    resumed = tmp_path / "resumed"
    shutil.copytree(unbroken, resumed)
    (resumed / "summary.json").unlink()
    for path in (resumed / "checkpoints").iterdir():
        if int(path.name) >= end:
            shutil.rmtree(path)
    assert train.train_and_evaluate(c, str(resumed)) == pytest.approx(summary, rel=1e-6)
    keys = lambda rs: [r.keys() - TIMING_KEYS for r in rs]  # noqa: E731
    assert keys(read(resumed)) == keys(records)
    for a, b in zip(read(resumed), records, strict=True):
        for key in a.keys() - TIMING_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    final = [checkpoint.read(w / "checkpoints", 12) for w in (resumed, unbroken)]
    assert int(final[0]["warmup_end_step"]) == end
    for x, y in zip(*map(jax.tree.leaves, final), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_not_converged_means_the_net_did_not_train_relative_to_chance(tmp_path):
    """`converged: false` when the final training error is at least 90 % of chance's error:
    81 % on 10 classes, 89.1 % on 100; a net that trains badly has converged."""
    c = cifar.get_config("depth=8")
    final = {"train/loss": 2.0, "test/error": 85.0}
    for classes, error, converged in [(10, 80.5, True), (10, 81.0, False), (100, 85.0, True),
                                      (100, 89.2, False)]:
        summary = train.finish(c, tmp_path, {**final, "train/error": error}, classes)
        assert summary["converged"] is converged, (classes, error)
        assert json.loads((tmp_path / "summary.json").read_text())["converged"] is converged
    assert summary["not_converged_from_train_error"] == pytest.approx(89.1)
