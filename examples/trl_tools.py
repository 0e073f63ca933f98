"""Multi-turn training with a tool and an environment written as for TRL's `GRPOTrainer`
(`tools=[...]`, `environment_factory=...`), unchanged: the built-in calculator task.

A tool is a plain function with type hints and a Google-style docstring (its JSON schema comes
from `transformers.utils.get_json_schema`). An environment is a class: `reset(**row)` starts an
episode, its public methods are its tools, `get_reward()` scores the episode. Reward functions get
each episode's messages as `completions` (assistant turns and tool replies), as in TRL.

    .venv/bin/python examples/trl_tools.py [--environment] [key=value ...]
"""

import ast
import operator
import sys

import advantage

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


# --- a TRL-style tool ------------------------------------------------------------------------
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression of integers with + - *.

    Args:
        expression: the expression, e.g. "37*48"
    """

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not an integer expression: {expression!r}")

    return str(value(ast.parse(expression, mode="eval").body))


# --- a TRL-style environment ----------------------------------------------------------------
class CalculatorEnv:
    def reset(self, **row):
        self.calls = 0
        return None  # nothing to add to the prompt

    def calculator(self, expression: str) -> str:
        """Evaluate an arithmetic expression of integers with + - *.

        Args:
            expression: the expression, e.g. "37*48"
        """
        self.calls += 1
        return calculator(expression)

    def get_reward(self) -> float:
        return -0.1 * max(0, self.calls - 1)  # one call is all it takes


# --- a TRL-style reward function: the episode's messages, the dataset's answer column -------
def correct(prompts, completions, answer, **kwargs):
    """1 when the model's last turn is the answer. Not the last message: an episode cut inside a
    tool's reply (rollout.max_episode_tokens) ends on that reply."""
    last = [
        next(m["content"] for m in reversed(c) if m["role"] == "assistant") for c in completions
    ]
    return [1.0 if text.strip() == a else 0.0 for text, a in zip(last, answer)]


if __name__ == "__main__":
    config = {
        "algorithm": "grpo",
        "model": {"name_or_path": "builtin:tiny-calculator"},
        "data": {"train": "builtin:calculator"},
        "rollout": {
            "num_generations": 8,
            "prompts_per_step": 16,
            "max_new_tokens": 24,
            "max_turns": 3,
            # the tiny model's call format: <calc>EXPRESSION</calc>, answered as <r>RESULT</r>
            "tool_call_format": "<calc>(?P<arguments>.*?)</calc>",
            "tool_call_stop": "</calc>",
            "reply_template": "<r>{content}</r>",
        },
        "train": {"steps": 10, "lr": 3e-4},
        "log": {"run_dir": "runs/trl_tools", "progress": False},
        "eval": {"size": 200},
    }
    overrides = [a for a in sys.argv[1:] if a != "--environment"]
    if "--environment" in sys.argv:
        kwargs = {"environment_factory": CalculatorEnv}
    else:
        kwargs = {"tools": [calculator]}
    result = advantage.train(config, reward_funcs=[correct], overrides=overrides, **kwargs)
    before, after = result.eval_before, result.eval_after
    print(
        f"held-out accuracy: {before['eval/accuracy']:.1%} -> {after['eval/accuracy']:.1%}; "
        f"tool-call rate {before['eval/tool_call_rate']:.1%} -> {after['eval/tool_call_rate']:.1%}"
    )
