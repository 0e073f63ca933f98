"""Train with reward functions written exactly as for TRL's `GRPOTrainer`, unchanged.

`reward_len` is the example of TRL's GRPOTrainer documentation (the "reward_len" quick start);
`reverse_accuracy` reads a dataset column by name, as TRL passes every extra column as a keyword.

    .venv/bin/python examples/trl_reward_function.py [key=value ...]
"""

import sys

import advantage


# --- copied from TRL's GRPOTrainer docs, not modified --------------------------------------
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


# --- a TRL-style verifier using the dataset's "answer" column --------------------------------
def reverse_accuracy(prompts, completions, completion_ids, answer, **kwargs):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


if __name__ == "__main__":
    config = {
        "algorithm": "grpo",
        "model": {"name_or_path": "builtin:tiny-reverse"},
        "data": {"train": "builtin:reverse"},
        "rollout": {"num_generations": 8, "prompts_per_step": 16, "max_new_tokens": 8},
        # weights: accuracy matters, the length shaping a little (one weight per function)
        "reward": {"weights": [1.0, 0.01]},
        "train": {"steps": 20, "lr": 3e-4},
        "log": {"run_dir": "runs/trl_reward_function", "progress": False},
        "eval": {"size": 200},
    }
    result = advantage.train(
        config, reward_funcs=[reverse_accuracy, reward_len], overrides=sys.argv[1:]
    )
    print(
        f"held-out accuracy: {result.eval_before['eval/accuracy']:.1%} -> "
        f"{result.eval_after['eval/accuracy']:.1%}"
    )
