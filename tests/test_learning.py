"""Reward goes up: GRPO and PPO on the built-in task from the warm-started tiny model."""

import pytest

from advantage.rl.config import load_config
from advantage.rl.trainer import Trainer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("preset", ["grpo", "ppo"])
def test_mean_reward_rises(preset, run_dir):
    cfg = load_config(
        None,
        [
            f"algorithm={preset}",
            "model.name_or_path=builtin:tiny-reverse",
            "data.train=builtin:reverse",
            f"log.run_dir={run_dir}",
            "log.progress=false",
            "log.tensorboard=false",
            "rollout.prompts_per_step=16",
            "rollout.num_generations=8",
            "rollout.max_new_tokens=8",
            "train.steps=14",
            "train.lr=3e-4",
            "train.critic_lr=1e-4",
            "eval.size=100",
            "checkpoint.save_final=false",
        ],
    )
    result = Trainer(cfg).fit()
    rewards = [m["reward/mean"] for m in result.metrics]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    print(
        preset,
        "reward",
        [round(r, 3) for r in rewards],
        "eval",
        result.eval_before,
        result.eval_after,
    )
    assert last > first + 0.08, rewards
    assert result.eval_after["eval/accuracy"] > result.eval_before["eval/accuracy"] + 0.1
