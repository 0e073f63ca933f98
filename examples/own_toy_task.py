"""A toy task of your own, from nothing: a tiny model whose tokenizer knows the task's characters
(`advantage.make_tiny_model`), a warm start by SFT, then GRPO with your reward function.

The task: upper-case a word of the letters a-f (`cab=` → `CAB`); held-out words are never seen
in training. A short warm start leaves room for RL: on 2 CPU cores (≈3 min) held-out accuracy
went 58.0% -> 77.5%.

    .venv/bin/python examples/own_toy_task.py [key=value ...]

`key=value` overrides the RL config; `sft.key=value` the SFT config (e.g. `sft.train.steps=50`).
"""

import json
import random
import string
import sys
from pathlib import Path

import advantage

WORK = Path("runs/own_toy_task")


def upper_correct(prompts, completions, answer, **kwargs):  # TRL's signature
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


def write_data(folder: Path) -> None:
    """train.jsonl and eval.jsonl: {prompt, completion (for SFT), answer (for the reward)}."""
    rng = random.Random(0)
    words = sorted({"".join(rng.choices("abcdef", k=rng.randint(2, 5))) for _ in range(3000)})
    rng.shuffle(words)
    for name, part in (("eval", words[:200]), ("train", words[200:])):
        rows = [{"prompt": f"{w}=", "completion": w.upper(), "answer": w.upper()} for w in part]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    sft_overrides = [a.removeprefix("sft.") for a in sys.argv[1:] if a.startswith("sft.")]
    rl_overrides = [a for a in sys.argv[1:] if not a.startswith("sft.")]
    WORK.mkdir(parents=True, exist_ok=True)
    write_data(WORK)
    data = {"train": str(WORK / "train.jsonl"), "eval": str(WORK / "eval.jsonl")}

    # 1. a freshly initialised tiny Qwen2 (≈2.4M parameters) with a character tokenizer
    model = WORK / "init"
    if not (model / "config.json").is_file():
        advantage.make_tiny_model(model, size="tiny", chars=string.ascii_letters + "=")

    # 2. a short warm start by SFT: a model trained from scratch wants lr ≈ 1e-3 (2e-5, the
    #    default, suits pretrained models). A rerun reuses it (sft never writes over a run).
    warm = WORK / "sft" / "final"
    if not (warm / "config.json").is_file():
        advantage.sft(
            {
                "model": {"name_or_path": str(model)},
                "data": data,
                "train": {"steps": 40, "batch_size": 32, "lr": 1e-3, "warmup_steps": 10},
                "log": {"run_dir": str(WORK / "sft"), "progress": False, "every": 50},
            },
            overrides=sft_overrides,
        )

    # 3. GRPO with the reward function, judged on the held-out words before and after (1e-4:
    #    at 3e-4 this tiny model's first updates undid much of its warm start)
    result = advantage.train(
        {
            "model": {"name_or_path": str(warm)},
            "data": data,
            "rollout": {"num_generations": 8, "prompts_per_step": 16, "max_new_tokens": 8},
            "train": {"steps": 30, "lr": 1e-4, "warmup_steps": 5},
            "log": {"run_dir": str(WORK / "grpo"), "progress": False},
            "eval": {"size": 200},
        },
        reward_funcs=[upper_correct],
        overrides=rl_overrides,
    )
    if result.eval_after:  # (a rerun of a finished run: its logged evaluations)
        print(
            f"held-out accuracy: {result.eval_before['eval/accuracy']:.1%} -> "
            f"{result.eval_after['eval/accuracy']:.1%}"
        )
