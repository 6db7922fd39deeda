"""Config files and their checks (resnet_jax/configs/): one line per bad setting, one parser of
typed key=value text for config arguments and sweep overrides alike."""

import pytest

from experiments import sweep
from experiments.declaration import SweepError
from resnet_jax.configs import cifar, parse_arg, typed
from resnet_jax.configs.check import check_config, missing_keys
from resnet_jax.errors import ConfigError


@pytest.mark.parametrize("key, value", [("warmup_until_error", -1.0), ("warmup_steps", -5),
                                        ("warmup_error_window_steps", 0),
                                        ("not_converged_fraction_of_chance", 0.0)])
def test_bad_warmup_or_convergence_settings_are_one_line_errors(key, value):
    c = cifar.get_config("depth=110")
    c[key] = value
    with pytest.raises(ConfigError, match=f"{key}={value}"):
        check_config(c)


def test_a_config_without_a_key_of_its_config_file_is_one_line():
    """Defaults belong to the config file alone: code reads every key, so a config that lacks
    one is refused before anything runs, naming it."""
    c = cifar.get_config("depth=8")
    del c["steps_per_call"]
    assert missing_keys(c) == ["steps_per_call"]
    with pytest.raises(ConfigError, match="the config has no steps_per_call: start it from"):
        check_config(c)


def test_config_arguments_and_sweep_overrides_read_values_alike():
    for raw, default, value in [("true", False, True), ("0", True, False), ("56", 20, 56),
                                ("0.05", 0.1, 0.05), ("(1,2)", (5, 6), (1, 2)), ("B", "A", "B")]:
        assert typed(raw, default) == value
        assert sweep.parse_value("key", raw, default) == value
    assert parse_arg("depth=56,residual=false", depth=20, residual=True) == {
        "depth": 56, "residual": False}
    with pytest.raises(ValueError, match="config argument residual=maybe must be true or false"):
        parse_arg("residual=maybe", residual=True)
    with pytest.raises(ValueError, match="config argument depth=x must be an integer"):
        parse_arg("depth=x", depth=20)
    with pytest.raises(SweepError, match=r"flip=maybe is not true or false \(the config's flip"):
        sweep.parse_value("flip", " maybe ", True)
