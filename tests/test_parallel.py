"""The same global batch gives the same step on 1 device and on 8, under jit and under pmap."""

import json

import jax
import numpy as np
import pytest

from resnet_jax import parallel, train
from resnet_jax.step import create_training
from resnet_jax.configs import cifar

BATCH = 32


def config(**overrides):
    c = cifar.get_config("depth=8")
    # lr 1, no momentum, no decay: the parameter change of one step is minus the gradient.
    c.learning_rate, c.momentum, c.weight_decay = 1.0, 0.0, 0.0
    c.batch_size = BATCH
    for k, v in overrides.items():
        c[k] = v
    return c


def one_step(cfg, backend_name, num_devices, batch):
    backend = parallel.create_backend(backend_name, cfg.batch_size, num_devices)
    _, state, step = create_training(cfg, backend, num_classes=10, in_channels=3)
    before = jax.device_get(state)
    new_state, metrics = step(backend.put_state(state), jax.device_put(batch,
                                                                       backend.data_sharding))
    after = jax.device_get(backend.get_state(new_state))
    grads = jax.tree.map(lambda a, b: a - b, before.params, after.params)
    return {"loss": float(metrics["loss"]), "grads": grads, "stats": after.batch_stats}


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(BATCH, 16, 16, 3)).astype(np.float32),
            "label": rng.integers(0, 10, BATCH).astype(np.int32)}


def assert_same(a, b, atol=1e-5):
    assert abs(a["loss"] - b["loss"]) < atol
    for x, y in zip(jax.tree.leaves(a["grads"]), jax.tree.leaves(b["grads"])):
        np.testing.assert_allclose(x, y, atol=atol, rtol=1e-4)
    for x, y in zip(jax.tree.leaves(a["stats"]), jax.tree.leaves(b["stats"])):
        np.testing.assert_allclose(x, y, atol=atol, rtol=1e-4)


def test_eight_simulated_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("backend", ["jit", "pmap"])
def test_sharded_step_equals_single_device_step(backend, batch):
    reference = one_step(config(), "jit", 1, batch)
    sharded = one_step(config(parallelism=backend), backend, 8, batch)
    assert_same(sharded, reference)
    assert max(np.abs(g).max() for g in jax.tree.leaves(reference["grads"])) > 1e-3


@pytest.mark.parametrize("group", [2, 8])
def test_grouped_batch_norm_is_the_same_on_every_backend(group, batch):
    """Groups inside a device (2 of 4 examples) and across devices (8: pmap's device groups)."""
    cfg = config(bn_group_size=group)
    reference = one_step(cfg, "jit", 1, batch)
    assert_same(one_step(cfg, "jit", 8, batch), reference)
    assert_same(one_step(cfg, "pmap", 8, batch), reference)
    # Grouping changes the gradients, so the comparisons above could have failed.
    whole = one_step(config(), "jit", 1, batch)
    diff = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(whole["grads"]),
                                                   jax.tree.leaves(reference["grads"])))
    assert diff > 1e-3


def test_pmap_rejects_groups_that_do_not_tile_devices():
    backend = parallel.create_backend("pmap", 32, 8)  # 4 examples per device
    with pytest.raises(ValueError, match="bn_group_size"):
        backend.batch_norm_groups(6)


def test_batch_must_split_over_devices():
    with pytest.raises(ValueError, match="does not split over 8 devices"):
        parallel.create_backend("jit", 12, 8)


def run_losses(workdir, parallelism, num_devices):
    cfg = cifar.get_config("depth=8,dataset=synthetic")
    cfg.batch_size, cfg.total_steps, cfg.log_every_steps = 32, 6, 2
    cfg.eval_every_steps = cfg.checkpoint_every_steps = 6
    cfg.parallelism, cfg.num_devices = parallelism, num_devices
    train.train_and_evaluate(cfg, str(workdir))
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines]


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
    return run_losses(tmp_path_factory.mktemp("single"), "jit", 1)


@pytest.mark.parametrize("backend", ["jit", "pmap"])
def test_training_run_matches_single_device_run(tmp_path, backend, single_device_losses):
    """The issue's acceptance check: whole runs on synthetic data, 1 device vs 8."""
    losses = run_losses(tmp_path, backend, 8)
    assert len(losses) == 3
    np.testing.assert_allclose(losses, single_device_losses, rtol=1e-4)


def test_cpu_steps_leave_convolutions_to_xla(batch):
    """On CPU the compiled step keeps its convolutions out of XLA's YNNPACK fusions, where the
    weight gradients ran about 12x slower (parallel.CPU_COMPILER_OPTIONS); other platforms get
    XLA's defaults."""
    assert parallel.compiler_options("gpu") is None
    backend = parallel.create_backend("jit", BATCH, 1)
    assert backend.compiler_options == parallel.CPU_COMPILER_OPTIONS
    _, state, step = create_training(config(), backend, num_classes=10, in_channels=3)
    hlo = step.lower(state, batch).compile().as_text()
    fusions = [line for line in hlo.splitlines() if line.lstrip().startswith("%ynn_fusion")]
    assert fusions, "the options keep YNNPACK's reductions, so some fusions must be there"
    assert not [f for f in fusions if "conv_general_dilated" in f]
    assert "convolution(" in hlo
