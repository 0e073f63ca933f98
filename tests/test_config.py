"""Config: YAML + key=value overrides, validation errors that name the field."""

import pytest

from advantage.rl.config import Config, ConfigError, config_from, load_config


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
        # found by an adversarial probe: a hang, ~1e4 advantages, a run that trains nothing
        (["train.max_staleness=-1"], r"train.max_staleness must be >= 0, got -1"),
        (["algo.baseline=ema"], r"the group scope .* not algo.baseline=ema"),
        (["algorithm=dr_grpo", "rollout.num_generations=1"], r"group_mean baseline needs .* >= 2"),
        (
            ["algorithm=rloo", "rollout.num_generations=1"],
            r"leave_one_out baseline needs rollout.num_generations >= 2",
        ),
        (["rollout.backend=sglang"], r"rollout.backend: 'sglang' is not one of"),
        (["model.precision=fp8"], r"model.precision"),
        (["rollout"], r"not of the form key=value"),
        # every numeric field is range-checked at load (NaN and inf included)
        (["train.lr=-1"], r"train.lr must be a finite number > 0, got -1.0"),
        (["train.lr=nan"], r"train.lr must be a finite number > 0, got nan"),
        (["train.critic_lr=.inf"], r"train.critic_lr must be a finite number > 0, got inf"),
        (["rollout.top_k=-5"], r"rollout.top_k must be >= 0, got -5"),
        (["rollout.temperature=0"], r"rollout.temperature must be a finite number >= 0.01"),
        (["rollout.temperature=1e-40"], r"rollout.temperature must be a finite number >= 0.01"),
        (["rollout.top_p=1.5"], r"rollout.top_p must be in \(0, 1\], got 1.5"),
        (["train.adam_betas=[0.9]"], r"train.adam_betas must be two numbers, got \[0.9\]"),
        (["train.adam_betas=[0.9, 1.0]"], r"train.adam_betas\[1\] must be in \[0, 1\), got 1.0"),
        (["train.adam_eps=0"], r"train.adam_eps must be a finite number > 0"),
        (["train.weight_decay=-0.1"], r"train.weight_decay must be >= 0"),
        (["train.max_grad_norm=0"], r"train.max_grad_norm must be a finite number > 0"),
        (["train.warmup_steps=-1"], r"train.warmup_steps must be >= 0"),
        (["train.max_nonfinite_steps=0"], r"train.max_nonfinite_steps must be >= 1"),
        (["data.max_prompt_tokens=0"], r"data.max_prompt_tokens must be >= 1"),
        (["reward.timeout=0"], r"reward.timeout must be a finite number > 0"),
        (["reward.clip=-1"], r"reward.clip must be a finite number > 0"),
        (["reward.weights=[1.0, nan]"], r"reward.weights\[1\] must be a finite number"),
        (["reward.model_batch_size=0"], r"reward.model_batch_size must be >= 1"),
        (["log.every=0"], r"log.every must be >= 1, got 0"),
        (["eval.pass_k=-1"], r"eval.pass_k must be >= 0, got -1"),
        (["eval.max_new_tokens=0"], r"eval.max_new_tokens must be >= 1"),
        (["checkpoint.keep=0"], r"checkpoint.keep must be >= 1"),
        (["model.ref_sync_alpha=0"], r"model.ref_sync_alpha must be in \(0, 1\]"),
        (["algo.kl_coef=nan"], r"algo.kl_coef must be a finite number, got nan"),
        (["algo.ema_alpha=2"], r"algo.ema_alpha must be in \[0, 1\]"),
        (["algo.whiten_eps=-1"], r"algo.whiten_eps must be >= 0"),
        (["rollout.stop=['']"], r"rollout.stop\[0\] is an empty string.*remove it"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_rows_in_memory_get_a_short_error_with_what_to_do():
    """TRL takes a Dataset object; here `data.train` is a path. The error names the field, shows
    the value cut short (a 300-row list printed whole was 23,000 characters) and says what to do."""
    rows = [{"prompt": "ab?" * 10, "answer": "1"}] * 300
    with pytest.raises(ConfigError) as error:
        config_from({"data": {"train": rows}})
    message = str(error.value)
    assert message.startswith("data.train: expected a string, got list [{'prompt': ")
    assert "write them to a .jsonl file" in message and len(message) < 300


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")


def test_defaults_validate():
    assert Config().algorithm_spec().name == "grpo"


@pytest.mark.parametrize(
    ("stage", "overrides", "message"),
    [
        ("sft", ["train.lr=-1"], r"train.lr must be a finite number > 0, got -1.0"),
        ("sft", ["train.batch_size=0"], r"train.batch_size must be >= 1"),
        ("sft", ["train.max_length=0"], r"train.max_length must be >= 1"),
        ("rm", ["train.lr=nan"], r"train.lr must be a finite number > 0, got nan"),
        ("rm", ["data.eval_fraction=1.5"], r"data.eval_fraction must be in \(0, 1\), got 1.5"),
        ("rm", ["pairs=0"], r"pairs must be >= 1"),
    ],
)
def test_stage_config_errors_name_the_field(stage, overrides, message):
    from advantage.engine.config_files import load_config as load_stage_config
    from advantage.stages.rm import RMConfig
    from advantage.stages.sft import SFTConfig

    cls = {"sft": SFTConfig, "rm": RMConfig}[stage]
    with pytest.raises(ConfigError, match=message):
        load_stage_config(cls, None, overrides)
