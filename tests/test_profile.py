"""`profile_steps`: a jax.profiler trace of the steps asked for, read back from its files."""

import contextlib
import gzip
import json
import pathlib

import jax
import pytest

from resnet_jax import train
from resnet_jax.configs.check import check_config
from resnet_jax.errors import ConfigError
from resnet_jax.configs import cifar


def config(total_steps: int, profile_steps=()):
    c = cifar.get_config("depth=8,dataset=digits")
    c.update(batch_size=16, total_steps=total_steps, log_every_steps=total_steps,
             eval_every_steps=total_steps, checkpoint_every_steps=total_steps,
             log_diagnostics=False, profile_steps=profile_steps)
    return c


def traced_steps(workdir: pathlib.Path) -> list[int]:
    """The step numbers of the `train_step` annotations in the newest trace of `workdir`, and a
    check that the Perfetto copy names the step too."""
    folder = max((workdir / "profile" / "plugins" / "profile").iterdir(),
                 key=lambda p: p.stat().st_mtime)
    (xplane,) = folder.glob("*.xplane.pb")
    events = [event for plane in jax.profiler.ProfileData.from_file(str(xplane)).planes
              for line in plane.lines for event in line.events if event.name == "train_step"]
    perfetto = json.loads(gzip.decompress((folder / "perfetto_trace.json.gz").read_bytes()))
    assert "train_step" in {e.get("name") for e in perfetto["traceEvents"]}
    return sorted(dict(event.stats)["step_num"] for event in events)


def test_profile_traces_the_steps_asked_for_and_names_the_train_step(tmp_path, capsys):
    c = config(4, (2, 10))  # the run ends inside the window
    c.num_devices = 1  # what is traced does not depend on it; one device compiles faster
    train.train_and_evaluate(c, str(tmp_path))
    assert traced_steps(tmp_path) == [2, 3]
    assert "profile of steps 2-3 -> " in capsys.readouterr().out


@pytest.mark.parametrize("profile_steps, total_steps, start, stop, expected", [
    ((), 4, 0, 4, []),  # off
    ((1, 3), 5, 0, 5, ["start", 1, 2, "stop"]),
    ((2, 10), 4, 0, 4, ["start", 2, 3, "stop"]),  # the run ends inside the window
    ((1, 10), 5, 3, 5, ["start", 3, 4, "stop"]),  # resumed inside it: the rest
    ((1, 3), 5, 4, 5, []),  # resumed past it
    ((1, 10), 5, 0, 3, ["start", 1, 2, "stop"]),  # stopped inside it (preempted, an error)
])
def test_the_steps_traced(monkeypatch, tmp_path, profile_steps, total_steps, start, stop,
                          expected):
    """What the loop's calls of `Profile` start, name and stop (the trace itself replaced),
    for a run that trains steps start..stop-1 of total_steps."""
    calls = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda *a, **k: calls.append("start"))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append("stop"))
    monkeypatch.setattr(jax.profiler, "StepTraceAnnotation",
                        lambda name, step_num: calls.append(step_num) or contextlib.nullcontext())
    profile = train.Profile(config(total_steps, profile_steps), tmp_path, start)
    for step in range(start, stop):
        with profile.step(step):
            pass
        profile.stepped(step, ())
    profile.close()  # as the loop's `finally` does
    assert calls == expected


@pytest.mark.parametrize("steps", [(-1, 3), (3, 3), (5, 2), (1, 2, 3), (1,), (4, 10)])
def test_bad_profile_steps_are_one_line_errors(steps):
    with pytest.raises(ConfigError, match=r"^profile_steps=\(") as e:
        check_config(config(4, steps))
    assert "\n" not in str(e.value)
