"""It learns: GRPO and PPO on the built-in task raise held-out accuracy from the warm start.

Learning is judged by greedy accuracy on 200 held-out prompts, before and after: a deterministic
function of the weights. The training reward of a few steps at temperature 1 is not asserted on:
its curve is noisy enough that the CPU's kernels (which change the warm-started model and every
sample) flipped a "reward rises" check on a machine whose held-out accuracy rose 0.69 → 0.84.
The margin (+0.10) is several standard errors of a 200-prompt accuracy (≈0.035) above zero and
well below the gains seen: 14 steps gave +0.15 (GRPO) and +0.24 (PPO) on the machine of issue 13;
these 20 steps gave 0.595 → 0.995 and 0.595 → 0.95 on a 2-core AVX512-BF16 machine.
"""

import pytest

from advantage.rl.config import load_config
from advantage.rl.trainer import Trainer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("preset", ["grpo", "ppo"])
def test_held_out_accuracy_rises(preset, run_dir):
    cfg = load_config(
        None,
        [
            f"algorithm={preset}",
            "model.name_or_path=builtin:tiny-reverse",
            "data.train=builtin:reverse",
            f"log.run_dir={run_dir}",
            "log.progress=false",
            "log.tensorboard=false",
            "log.report=false",
            "rollout.prompts_per_step=16",
            "rollout.num_generations=8",
            "rollout.max_new_tokens=8",
            "train.steps=20",
            "train.lr=3e-4",
            "train.critic_lr=1e-4",
            "eval.size=200",
            "checkpoint.save_final=false",
        ],
    )
    result = Trainer(cfg).fit()
    before, after = result.eval_before["eval/accuracy"], result.eval_after["eval/accuracy"]
    print(preset, "held-out accuracy", before, "->", after)
    assert after >= before + 0.10, (before, after)
