"""Config: YAML + key=value overrides, validation errors that name the field."""

import pytest

from advantage.rl.config import Config, ConfigError, load_config


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm: grpo\nrollout:\n  num_generations: 8\ntrain:\n  lr: 1.0e-5\n")
    cfg = load_config(path, ["algorithm=rloo", "rollout.num_generations=4", "algo.clip_high=0.28"])
    assert cfg.algorithm == "rloo" and cfg.rollout.num_generations == 4 and cfg.train.lr == 1e-5
    algo = cfg.algorithm_spec()
    assert algo.baseline == "leave_one_out" and algo.clip_high == 0.28


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["rollout.num_generation=4"],
            r"unknown config key 'rollout.num_generation'; did you mean 'num_generations'",
        ),
        (
            ["rollout.num_generations=four"],
            r"rollout.num_generations: expected an integer, got 'four'",
        ),
        (["train.lr=fast"], r"train.lr: expected a number"),
        (["rollout.prompts_per_step=3", "train.minibatches=2"], r"must hold whole groups"),
        (["train.minibatches=5"], r"train.minibatches=5 must divide the rollout batch"),
        (["algo.scope=global"], r"algo.scope: 'global' is not one of"),
        (["algorithm=ppo2"], r"unknown preset 'ppo2'"),
        (
            ["algorithm=rloo", "rollout.num_generations=1"],
            r"leave_one_out baseline needs rollout.num_generations >= 2",
        ),
        (["reward.functions=[]"], r"give at least one of reward.functions or reward.model"),
        (["rollout.backend=sglang"], r"rollout.backend: 'sglang' is not one of"),
        (["model.precision=fp8"], r"model.precision"),
        (["rollout"], r"not of the form key=value"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")


def test_defaults_validate():
    assert Config().algorithm_spec().name == "grpo"
