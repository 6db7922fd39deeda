"""`steps_per_call=K`: K train steps per compiled call compute what K calls of one step do, bit
for bit on CPU: the records, the checkpoints, the warm-up's switch and the learning-rate steps
inside a call, a resume, 2 devices under pmap and under jit with several seeds in one program."""

import json
import pathlib
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import checkpoint, parallel, train
from resnet_jax.configs.check import check_config
from resnet_jax.errors import ConfigError
from resnet_jax.step import TrainCalls, make_training
from resnet_jax.configs import cifar
from resnet_jax.metrics import TIMING_KEYS


def config(**overrides):
    """ResNet-8 on 8x8 digits, 14 steps: lr 0.05 until the mean error of the last 3 batches is
    below 90 % (at most 7 steps), then 0.1, divided by 10 at steps 9 and 13; a record and an
    evaluation at steps 7 and 14."""
    c = cifar.get_config("depth=8,dataset=digits")
    c.update(batch_size=32, total_steps=14, log_every_steps=7, eval_every_steps=7,
             checkpoint_every_steps=14, keep_checkpoints=8, eval_subset=100, num_devices=1,
             warmup_learning_rate=0.05, warmup_until_error=90.0, warmup_steps=7,
             warmup_error_window_steps=3, lr_boundaries_steps=(9, 13), lr_decay_factor=0.1)
    c.update(overrides)
    return c


def records(workdir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_same_leaves(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_several_steps_per_call_train_what_single_steps_train(tmp_path, monkeypatch):
    """K=1, K=8 from step 0, and K=4 resumed from K=1's checkpoint at step 7: the same records,
    summaries and final checkpoints. Calls end early where a step is logged, evaluated or saved
    (7 and 14), and the loop asks for preemption once per call. The warm-up's switch (by the
    rule, at a step from 3 to 6) and the learning-rate steps at 9 and 13 fall inside calls."""
    calls, asked = [], []
    call = TrainCalls.__call__
    monkeypatch.setattr(TrainCalls, "__call__", lambda self, state, first, count: (
        calls.append((first, count)) or call(self, state, first, count)))
    reached = train.PreemptionWatch.reached
    monkeypatch.setattr(train.PreemptionWatch, "reached",
                        lambda self, step: asked.append(step) or reached(self, step))

    single = tmp_path / "single"
    summary = train.train_and_evaluate(config(checkpoint_every_steps=7), str(single))
    assert calls == [(t, 1) for t in range(14)] and asked == list(range(1, 14))
    calls.clear()
    asked.clear()

    together = tmp_path / "together"
    assert train.train_and_evaluate(config(steps_per_call=8), str(together)) == summary
    assert calls == [(0, 7), (7, 7)]
    assert asked == [7]  # once per call, none at the last step
    calls.clear()

    resumed = tmp_path / "resumed"
    shutil.copytree(single, resumed)
    (resumed / "summary.json").unlink()
    shutil.rmtree(resumed / "checkpoints" / "14")
    # steps_per_call may change on resume (RESUMABLE_KEYS), as checkpoint_every_steps may.
    assert train.train_and_evaluate(config(steps_per_call=4), str(resumed)) == summary
    assert calls == [(7, 4), (11, 3)]

    expected = records(single)
    assert [r["step"] for r in expected] == [7, 14] and "test/error" in expected[0]
    (end,) = [r["warmup_end_step"] for r in expected if "warmup_end_step" in r]
    assert 3 <= end < 7  # by the rule, before the cap: inside the call (0, 7)
    assert records(together) == expected and records(resumed) == expected
    final = checkpoint.read(single / "checkpoints", 14)
    assert int(final["warmup_end_step"]) == end
    assert_same_leaves(checkpoint.read(together / "checkpoints", 14), final)
    assert_same_leaves(checkpoint.read(resumed / "checkpoints", 14), final)


@pytest.mark.parametrize("parallelism, seeds", [("pmap", ()), ("jit", (3, 5))])
def test_calls_of_several_steps_on_two_devices(parallelism, seeds):
    """The metrics and state of 7 single steps and of calls of 4, 1 and 2 steps, and of 3 and 4,
    on 2 devices, each cutting its share of every batch inside the call: under pmap, and under
    jit with two seeds in one program. Epochs of 5 steps: the call of 2 starts the second epoch
    (its order from the host), the call of 4 crosses into it (its order drawn inside)."""
    c = config(parallelism=parallelism, num_devices=2, warmup_until_error=0.0, batch_size=256)
    backend = parallel.create_backend(parallelism, c.batch_size, 2, seeds=seeds)
    feed = train.create_feed(c, backend)
    _, initial, train_step = make_training(c, backend, num_classes=10, in_channels=1)

    def run(steps_per_call, counts):
        c.steps_per_call = steps_per_call
        calls = TrainCalls(c, backend, train_step, feed)
        state, metrics, first = backend.put_state(jax.tree.map(jnp.copy, initial)), [], 0
        for count in counts:
            state, m = calls(state, first, count)
            metrics += calls.per_step(jax.device_get(m), count)
            first += count
        return jax.device_get(backend.get_state(state)), metrics

    state, metrics = run(1, [1] * 7)
    assert np.all(state.step == 7)
    assert_same_leaves(run(4, [4, 1, 2]), (state, metrics))
    assert_same_leaves(run(4, [3, 4]), (state, metrics))
    assert feed.steps_per_epoch == 5
    if seeds:  # two seeds, two nets: a mix-up of their rows would show
        assert metrics[-1]["loss"][0] != metrics[-1]["loss"][1]


@pytest.mark.parametrize("step, profile_steps, end", [
    (0, (), 8), (8, (), 12), (12, (), 20), (20, (), 24), (24, (), 30), (48, (), 50),
    (0, (3, 6), 3), (3, (3, 6), 6), (6, (3, 6), 12)])
def test_calls_end_where_a_step_is_logged_evaluated_saved_or_profiled(step, profile_steps, end,
                                                                      monkeypatch):
    """Where the call of up to 8 steps that starts at `step` ends (`Training.call_end`), with
    records every 20 steps, evaluations every 12, checkpoints every 30, 50 steps in all, and a
    profile of steps `profile_steps`: on every process of a job alike (process 0 traces, the
    others do not, and all must make the same calls)."""
    c = config(steps_per_call=8, total_steps=50, log_every_steps=20, eval_every_steps=12,
               checkpoint_every_steps=30, profile_steps=profile_steps)
    for process in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda: process)
        training = types.SimpleNamespace(config=c, calls=types.SimpleNamespace(per_call=8),
                                         profile=train.Profile(c, pathlib.Path("unused"), 0))
        assert train.Training.call_end(training, step) == end


@pytest.mark.parametrize("overrides, message", [
    ({"steps_per_call": 0}, r"^steps_per_call=0 must be a positive integer"),
    ({"steps_per_call": 4, "dataset": "imagenet2012", "image_size": 32},
     r"^steps_per_call=4 needs a dataset on the devices, but imagenet2012 is streamed"),
])
def test_bad_steps_per_call_is_a_one_line_error(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        check_config(config(**overrides))
    assert "\n" not in str(e.value)
