"""The RLHF chain of seed 002 on the built-in task, nothing downloaded (`advantage chain`):

1. SFT     the tiny Qwen2 imitates an imperfect teacher          (builtin:tiny-reverse)
2. RM      a reward model from the SFT model, trained on pairs made by the task's verifier
3. PPO     policy and frozen reference from the SFT model, the learned reward model, a critic;
           held-out accuracy before → after, judged by the verifier (never seen by PPO)
"""

from __future__ import annotations

import time
from pathlib import Path

from ..engine.config_files import load_config
from ..rl.trainer import train
from ..tasks import model_path
from .rm import RMConfig, finished_rm, run_rm


def run_chain(run_dir: str | Path = "runs/chain", overrides: list[str] | None = None) -> dict:
    run_dir = Path(run_dir)
    start = time.perf_counter()
    sft_model = model_path("builtin:tiny-reverse")  # 1. SFT (cached after the first run)
    rm_cfg = load_config(
        RMConfig,
        None,
        [
            f"model.name_or_path={sft_model}",
            "data.train=builtin:reverse",
            f"log.run_dir={run_dir / 'rm'}",
            "log.progress=false",
            "train.steps=300",
            "train.lr=1e-4",
            "train.batch_size=32",
            "pairs=6000",
        ],
    )
    rm = finished_rm(run_dir / "rm") or run_rm(rm_cfg)  # 2. reward model (a rerun keeps it)
    print(
        f"reward model: held-out pairwise accuracy {100 * rm['eval_pairwise_accuracy_before']:.1f}% -> "
        f"{100 * rm['eval_pairwise_accuracy']:.1f}% ({rm['eval_pairs']} pairs, {rm['seconds']:.0f}s)"
    )
    ppo = train(
        None,
        overrides=[  # 3. PPO with the four models of seed 002
            "algorithm=ppo",
            f"model.name_or_path={sft_model}",
            "data.train=builtin:reverse",
            f"reward.model={rm['final']}",
            "reward.functions=[]",
            "reward.model_normalize=true",
            "eval.functions=[builtin]",
            "rollout.num_generations=8",
            "rollout.prompts_per_step=16",
            "rollout.max_new_tokens=8",
            "train.steps=40",
            "train.lr=3e-4",
            "train.critic_lr=1e-4",
            f"log.run_dir={run_dir / 'ppo'}",
            "log.progress=false",
            *(overrides or []),
        ],
    )
    before, after = ppo.eval_before["eval/accuracy"], ppo.eval_after["eval/accuracy"]
    print(
        f"PPO with the learned reward model: held-out accuracy {100 * before:.1f}% -> "
        f"{100 * after:.1f}% (PPO {ppo.seconds:.0f}s; whole chain {time.perf_counter() - start:.0f}s)"
    )
    return {"rm": rm, "ppo_before": before, "ppo_after": after, "ppo_seconds": ppo.seconds}
