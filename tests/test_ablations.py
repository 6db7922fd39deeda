"""Issue 29's ablation keys against their definitions: GroupNorm and no normalisation; the
residual-branch inits (zero_gamma, fixup, skipinit); the optimisers and schedules against optax
itself; old runs without the keys; bad values as one-line errors through the CLI."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from resnet_jax import models, optim, rundir, step, train
from resnet_jax.configs.check import check_config
from resnet_jax.configs import ADDED_KEYS, cifar
from tests.test_cli import TINY, assert_usage_error, run_cli

X = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))


def net(depth=8, **kwargs):
    return models.cifar_resnet(depth, rngs=nnx.Rngs(0), **kwargs)


# --- Normalisation --------------------------------------------------------------------------------


def test_group_norm_is_flax_group_norm_in_float32():
    x = 3.0 * jax.random.normal(jax.random.key(0), (2, 4, 4, 16)) + 1.0
    ours = models.GroupNorm(16, 4)
    ours.scale.set_value(jnp.linspace(0.5, 2.0, 16))
    ours.bias.set_value(jnp.linspace(-1.0, 1.0, 16))
    flax_gn = nnx.GroupNorm(16, num_groups=4, epsilon=1e-5, rngs=nnx.Rngs(0))
    flax_gn.scale.set_value(ours.scale[...])
    flax_gn.bias.set_value(ours.bias[...])
    np.testing.assert_allclose(ours(x, train=True), flax_gn(x), rtol=1e-5, atol=1e-5)
    # Per example: another example in the batch changes nothing; bfloat16 in, bfloat16 out.
    np.testing.assert_array_equal(ours(x[:1], train=False), ours(x, train=True)[:1])
    assert ours(x.astype(jnp.bfloat16), train=True).dtype == jnp.bfloat16


def test_norm_changes_only_the_normalisation_parameters():
    batch, group, none = (net(norm=n, norm_groups=4) for n in ("batch", "group", "none"))
    # Group norm: the same scale and bias per channel, no running statistics.
    assert models.count_params(group) == models.count_params(batch)
    assert not jax.tree.leaves(nnx.state(group, nnx.BatchStat))
    assert not jax.tree.leaves(nnx.state(none, nnx.BatchStat))
    # ResNet-8 normalises the stem (16) and 2 layers per block at 16, 32, 64 channels.
    assert models.count_params(batch) - models.count_params(none) == 2 * (16 + 2 * (16 + 32 + 64))
    # The same kernels (the same random draws): only the normalisation differs.
    kernels = lambda m: [v for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))  # noqa: E731
                         if p[-1] == "kernel"]
    for a, b in zip(kernels(batch), kernels(none), strict=True):
        np.testing.assert_array_equal(a.get_value(), b.get_value())


# --- Residual-branch initialisation ---------------------------------------------------------------


def _blocks_compute_their_shortcut(model, preact):
    """Each block on a random input of its shape computes what its shortcut alone computes
    (through the post-activation block's final ReLU), in training and evaluation mode."""
    for block in model.blocks:
        cin = block.convs[0].in_features
        x = 2.0 * jax.random.normal(jax.random.key(2), (4, 8, 8, cin)) + 0.5
        for mode in (True, False):
            got, _ = nnx.capture(block, nnx.Intermediate)(x, train=mode)
            sc = block.shortcut
            if preact:
                source = x if not (sc.project or sc.changes_shape) else \
                    nnx.relu(block.bns[0](x, train=mode))
                want = sc(source, train=mode)
            else:
                want = nnx.relu(sc(x, train=mode))
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("init, norm, preact", [
    ("zero_gamma", "batch", False), ("zero_gamma", "group", True), ("skipinit", "batch", False),
    ("skipinit", "none", True), ("fixup", "none", False)])
def test_residual_inits_start_every_branch_at_exactly_zero(init, norm, preact):
    model = net(14, residual_init=init, norm=norm, norm_groups=4, preact=preact)
    for mode in (True, False):
        _, diagnostics = models.forward(model, X, train=mode)
        np.testing.assert_array_equal(diagnostics["branch_ratio"], np.zeros(6))
    _blocks_compute_their_shortcut(model, preact)
    standard = net(14, norm=norm, norm_groups=4, preact=preact)
    _, diagnostics = models.forward(standard, X, train=True)
    assert np.all(diagnostics["branch_ratio"] > 0.1)  # the fact is not vacuous


@pytest.mark.parametrize("depth, kwargs, branches, m", [
    (20, dict(), 9, 2),  # basic blocks: L^(-1/2)
    (11, dict(bottleneck=True, shortcut="B"), 3, 3),  # bottlenecks: L^(-1/4); B projects
])
def test_fixup_scales_follow_its_formula_for_the_depth(depth, kwargs, branches, m):
    fixup = net(depth, norm="none", residual_init="fixup", **kwargs)
    standard = net(depth, norm="none", **kwargs)  # the same random draws, He et al.'s scale
    factor = branches ** (-1.0 / (2 * m - 2))
    assert len(fixup.blocks) == branches and all(len(b.convs) == m for b in fixup.blocks)
    for f, s in zip(fixup.blocks, standard.blocks, strict=True):
        for c_f, c_s in zip(f.convs[:-1], s.convs[:-1]):
            np.testing.assert_allclose(c_f.kernel[...], c_s.kernel[...] * factor, rtol=1e-6)
        np.testing.assert_array_equal(f.convs[-1].kernel[...], 0.0)  # the branch's last layer
        if f.shortcut.project:  # not in the branch: He et al.'s init
            np.testing.assert_array_equal(f.shortcut.conv.kernel[...], s.shortcut.conv.kernel[...])
        np.testing.assert_array_equal(f.fixup_bias[...], np.zeros(2 * m))
        assert float(f.fixup_scale[...]) == 1.0
    np.testing.assert_array_equal(fixup.stem.kernel[...], standard.stem.kernel[...])
    for p in (fixup.head.kernel, fixup.head.bias):  # the classifier starts at 0
        np.testing.assert_array_equal(p[...], 0.0)
    # The added scalars: 2m biases and a multiplier per branch, a bias after the stem and one
    # before the classifier.
    assert models.count_params(fixup) - models.count_params(standard) == (2 * m + 1) * branches + 2


def test_parameter_counts_change_by_exactly_the_added_scalars():
    standard = models.count_params(net(20))
    assert models.count_params(net(20, residual_init="zero_gamma")) == standard
    assert models.count_params(net(20, residual_init="skipinit")) == standard + 9  # one per branch
    assert models.count_params(net(20, residual_init="skipinit", scan_blocks=True)) == standard + 9


@pytest.mark.parametrize("kwargs, words", [
    (dict(residual=False, residual_init="skipinit"), ["residual_init=skipinit", "plain"]),
    (dict(residual=False, residual_init="zero_gamma"), ["residual_init=zero_gamma", "plain"]),
    (dict(residual=False, norm="none", residual_init="fixup"), ["residual_init=fixup", "plain"]),
    (dict(norm="batch", residual_init="fixup"), ["norm=none"]),
    (dict(norm="none", residual_init="fixup", preact=True), ["block=post"]),
    (dict(norm="none", residual_init="zero_gamma"), ["norm=none has none"]),
    (dict(norm="layer"), ["unknown norm 'layer'", "batch, group, none"]),
    (dict(residual_init="zero"),
     ["unknown residual_init", "standard, zero_gamma, fixup, skipinit"]),
    (dict(norm="group", norm_groups=3), ["norm_groups=3", "16"]),
])
def test_the_nets_refuse_what_they_lack_in_one_line(kwargs, words):
    with pytest.raises(ValueError) as e:
        net(**kwargs)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


# --- Optimisers and schedules against optax -------------------------------------------------------

PARAMS = {"conv": {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 2, 4))},
          "bn": {"scale": jnp.linspace(0.5, 1.5, 4), "bias": jnp.linspace(-0.2, 0.2, 4)},
          "gain": jnp.asarray(0.3)}


def _optax_reference(name, c):
    kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    lr = c.learning_rate
    return {
        "sgd": optax.chain(optax.add_decayed_weights(c.weight_decay),
                           optax.sgd(lr, momentum=c.momentum)),
        "nesterov": optax.chain(optax.add_decayed_weights(c.weight_decay),
                                optax.sgd(lr, momentum=c.momentum, nesterov=True)),
        "adamw": optax.adamw(lr, b1=c.momentum, b2=c.adam_b2, weight_decay=c.weight_decay,
                             mask=kernels),
        "lars": optax.lars(lr, weight_decay=c.weight_decay, weight_decay_mask=kernels,
                           trust_coefficient=c.lars_trust_coefficient, trust_ratio_mask=kernels,
                           momentum=c.momentum),
    }[name]


@pytest.mark.parametrize("name", list(optim.OPTIMIZERS))
def test_each_optimizer_is_its_optax_namesake(name):
    c = cifar.get_config()
    c.update(optimizer=name, learning_rate=0.05, weight_decay=0.01)
    ours, reference = step.create_optimizer(c), _optax_reference(name, c)
    p_ours = p_ref = PARAMS
    s_ours, s_ref = ours.init(PARAMS), reference.init(PARAMS)
    for k in range(4):
        grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(10 + k), p.shape), PARAMS)
        u_ours, s_ours = ours.update(grads, s_ours, p_ours, learning_rate=c.learning_rate)
        u_ref, s_ref = reference.update(grads, s_ref, p_ref)
        p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
        jax.tree.map(np.testing.assert_array_equal, p_ours, p_ref)  # bit for bit


@pytest.mark.parametrize("name, decays_all", [("sgd", True), ("nesterov", True),
                                              ("adamw", False), ("lars", False)])
def test_weight_decay_reaches_norm_scales_and_biases_only_where_the_recipe_says(name, decays_all):
    c = cifar.get_config()
    c.update(optimizer=name, weight_decay=0.1)
    tx = step.create_optimizer(c)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS, learning_rate=0.1)
    assert np.all(updates["conv"]["kernel"] != 0)  # kernels always decay
    moved = [bool(np.any(updates[k][n] != 0)) for k, n in (("bn", "scale"), ("bn", "bias"))]
    assert moved == [decays_all] * 2 and bool(updates["gain"] != 0) == decays_all


def _schedule(**overrides):
    c = cifar.get_config()
    c.update({"total_steps": 100, "learning_rate": 0.2, "warmup_learning_rate": 0.02,
              "lr_boundaries_steps": (50, 75), "warmup_steps": 0, **overrides})
    return step.create_lr_schedule(c)


STEPS = jnp.arange(0, 101)


@pytest.mark.parametrize("overrides, reference", [
    (dict(), optax.piecewise_constant_schedule(0.2, {50: 0.1, 75: 0.1})),
    (dict(schedule="cosine"), optax.cosine_decay_schedule(0.2, 100)),
    (dict(schedule="cosine", warmup_steps=10, warmup_shape="linear"),
     optax.warmup_cosine_decay_schedule(0.02, 0.2, 10, 100)),
    (dict(warmup_steps=10, warmup_shape="linear"), optax.join_schedules(
        [optax.linear_schedule(0.02, 0.2, 10),
         lambda s: optax.piecewise_constant_schedule(0.2, {50: 0.1, 75: 0.1})(s + 10)], [10])),
    (dict(warmup_steps=10), optax.join_schedules(  # the paper's constant warm-up
        [optax.constant_schedule(0.02),
         lambda s: optax.piecewise_constant_schedule(0.2, {50: 0.1, 75: 0.1})(s + 10)], [10])),
])
def test_each_schedule_is_its_optax_namesake(overrides, reference):
    np.testing.assert_allclose(jax.vmap(_schedule(**overrides))(STEPS), reference(STEPS),
                               rtol=1e-6, atol=1e-9)


def test_a_warmup_ended_early_by_the_rule_leaves_the_cosine_where_it_was():
    lr = _schedule(schedule="cosine", warmup_steps=10, warmup_shape="linear")
    early = jax.vmap(lambda s: lr(s, 4))(STEPS)
    full = jax.vmap(lr)(STEPS)
    np.testing.assert_array_equal(early[10:], full[10:])
    np.testing.assert_allclose(early[4:10], 0.2, rtol=1e-6)  # the peak until the decay starts


def test_a_cosine_run_refuses_a_changed_total_steps_on_resume():
    old = json.loads(cifar.get_config().to_json())
    for schedule, refused in (("step", []), ("cosine", ["total_steps"])):
        old["schedule"] = schedule
        assert rundir.changed_keys(old, {**old, "total_steps": 1}) == refused


# --- Training: resumed across a boundary, old runs ------------------------------------------------


def _tiny(**overrides):
    c = cifar.get_config("depth=8,dataset=digits")
    c.update(batch_size=32, total_steps=8, log_every_steps=1, eval_every_steps=8,
             checkpoint_every_steps=4, log_diagnostics=False, **overrides)
    return c


def _records(workdir):
    skip = {"time", "examples_per_sec", "eval_seconds", "checkpoint_seconds"}
    return [{k: v for k, v in json.loads(line).items() if k not in skip}
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _resume_from_step_4(unbroken, resumed, config):
    shutil.copytree(unbroken, resumed)
    (resumed / "summary.json").unlink()
    shutil.rmtree(resumed / "checkpoints" / "8")
    return train.train_and_evaluate(config, str(resumed))


@pytest.mark.parametrize("overrides", [
    # AdamW, GroupNorm, skipinit: a linear warm-up ending at 3, a cosine to 8.
    dict(optimizer="adamw", learning_rate=0.002, schedule="cosine", warmup_steps=3,
         warmup_shape="linear", norm="group", residual_init="skipinit"),
    # LARS without normalisation, fixup: the paper's boundaries at 3 and 6.
    dict(optimizer="lars", learning_rate=0.1, lr_boundaries_steps=(3, 6), norm="none",
         residual_init="fixup"),
])
def test_a_run_resumed_across_a_schedule_boundary_is_the_unbroken_run(tmp_path, overrides):
    from resnet_jax import checkpoint

    c = _tiny(**overrides)
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    summary = train.train_and_evaluate(c, str(unbroken))
    lrs = [r["lr"] for r in _records(unbroken)]
    assert len(set(lrs[4:])) > 1  # the steps trained again cross a boundary (or decay)
    assert _resume_from_step_4(unbroken, resumed, c) == summary
    assert _records(resumed) == _records(unbroken)
    final = [checkpoint.read(w / "checkpoints", 8) for w in (resumed, unbroken)]
    jax.tree.map(np.testing.assert_array_equal, *final)


def test_a_run_from_before_the_keys_resumes_and_loads_as_the_papers(tmp_path, capsys):
    unbroken = tmp_path / "unbroken"
    summary = train.train_and_evaluate(_tiny(), str(unbroken))
    config = json.loads((unbroken / "config.json").read_text())
    assert {config[k] for k in ("norm", "residual_init", "optimizer", "schedule")} == {
        "batch", "standard", "sgd", "step"}
    old = {k: v for k, v in config.items() if k not in ADDED_KEYS}
    (unbroken / "config.json").write_text(json.dumps(old))
    resumed = tmp_path / "resumed"
    assert _resume_from_step_4(unbroken, resumed, _tiny()) == summary
    assert _records(resumed) == _records(unbroken)
    rc, out, _ = run_cli(capsys, ["eval", f"--workdir={unbroken}"])
    assert rc == 0 and f"test error {summary['test/error']:.2f}%" in out


def test_a_committed_result_from_before_the_keys_reads_as_the_papers():
    """experiments/results/cifar16-12k was trained before the keys existed: its config reads as
    the paper's, passes the checks, and equals what its sweep declares today."""
    from experiments.sweeps.degradation import get_sweep

    run = "depth=20,residual=true,width=1,base_width=8,dataset=folder__tmp_data_cifar10_jpeg,seed=0"
    path = (pathlib.Path(__file__).parents[1] / "experiments/results/cifar16-12k/runs" / run
            / "config.json")
    assert not set(ADDED_KEYS) & set(json.loads(path.read_text()))
    config = rundir.read_run_json(path)
    assert (config["norm"], config["residual_init"], config["optimizer"]) == (
        "batch", "standard", "sgd")
    check_config(ml_collections.ConfigDict(config))
    declared = next(r for r in get_sweep("preset=cifar16-12k,dataset=folder:/tmp/data/"
                                         "cifar10_jpeg").runs if r.name == run)
    assert rundir.changed_keys(config, json.loads(declared.build().to_json())) == []


# --- Bad input through the CLI: one line, exit 2, nothing written ---------------------------------

BAD = {
    "unknown-norm": (["--config.norm=layer"], ["unknown norm 'layer'", "batch, group, none"]),
    "unknown-residual-init": (["--config.residual_init=zeros"],
                              ["unknown residual_init 'zeros'", "fixup, skipinit"]),
    "unknown-optimizer": (["--config.optimizer=adam"],
                          ["unknown optimizer 'adam'", "sgd, nesterov, adamw, lars"]),
    "unknown-schedule": (["--config.schedule=linear"],
                         ["unknown schedule 'linear'", "step, cosine"]),
    "unknown-warmup-shape": (["--config.warmup_shape=cosine"],
                             ["unknown warmup_shape 'cosine'", "constant, linear"]),
    "groups-not-dividing": (["--config.norm=group", "--config.norm_groups=6"],
                            ["norm_groups=6", "16 channels", "e.g. 2"]),
    "fixup-with-batch-norm": (["--config.residual_init=fixup"],
                              ["residual_init=fixup", "norm=none"]),
    "skipinit-on-a-plain-net": (["--config.residual=false", "--config.residual_init=skipinit"],
                                ["plain", "residual_init=skipinit"]),
}


@pytest.mark.parametrize("args, words", BAD.values(), ids=BAD.keys())
def test_bad_ablation_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, words):
    workdir = tmp_path / "run"
    rc, out, err = run_cli(capsys, ["train", *TINY, *args, f"--workdir={workdir}"])
    assert_usage_error(rc, out, err, *words)
    assert not workdir.exists()


def test_the_ablation_keys_are_config_file_arguments():
    c = cifar.get_config("depth=8,norm=none,residual_init=fixup")
    assert (c.norm, c.residual_init) == ("none", "fixup")
    check_config(c)


def test_the_normfree_study_declares_batch_norm_against_none_under_each_init():
    from experiments.sweeps import normfree

    runs = normfree.get_sweep("preset=digits,seeds=3").runs
    assert len(runs) == 5 * 6 * 3  # depths 20-110, 6 variants, 3 seeds
    configs = [r.build() for r in runs]
    for c in configs:
        check_config(c)
    variants = {(c.residual, c.norm, c.residual_init) for c in configs}
    assert variants == {(False, "batch", "standard"), (False, "none", "standard"),
                        (True, "batch", "standard"), (True, "none", "standard"),
                        (True, "none", "fixup"), (True, "none", "skipinit")}
    assert {c.depth for c in configs} == {20, 32, 44, 56, 110}
    # Every variant on the same schedule, the paper's warm-up rule included at 110 layers.
    deep = [c for c in configs if c.depth == 110]
    assert {(c.learning_rate, c.warmup_until_error, c.total_steps) for c in deep} == {
        (0.02, 80.0, 400)}
    # The study's command sets the papers' rate for every variant, the warm-up's tenth with it.
    faster = [r.build() for r in normfree.get_sweep(
        "preset=digits,seeds=3,learning_rate=0.1").runs]
    assert {(c.learning_rate, c.warmup_learning_rate) for c in faster} == {(0.1, 0.01)}
    assert [(c.depth, c.residual, c.norm, c.residual_init, c.seed) for c in faster] == [
        (c.depth, c.residual, c.norm, c.residual_init, c.seed) for c in configs]
    with pytest.raises(ValueError, match="learning_rate=-0.1: use a positive rate"):
        normfree.get_sweep("learning_rate=-0.1")


@pytest.mark.parametrize("arg, overrides", [
    ("depth=8,norm=none,residual_init=fixup", {}),
    ("depth=8,norm=group,residual_init=skipinit", dict(optimizer="adamw", learning_rate=0.01)),
])
def test_nets_without_batch_norm_learn_and_train_alike_under_jit_and_pmap(arg, overrides):
    """No batch statistics to average over devices: both backends train the same net."""
    from tests.test_train import tiny_training

    losses = {}
    for parallelism in ("jit", "pmap"):
        state, step, batch = tiny_training(arg, parallelism, log_diagnostics=False, **overrides)
        losses[parallelism] = []
        for _ in range(15):
            state, metrics = step(state, batch)
            losses[parallelism].append(float(np.mean(metrics["loss"])))
    assert losses["jit"][-1] < 0.85 * losses["jit"][0]  # from ln 10 (fixup: zero logits)
    np.testing.assert_allclose(losses["pmap"], losses["jit"], rtol=1e-4)
