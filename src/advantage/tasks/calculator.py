"""The built-in multi-turn task: multiply two two-digit numbers, with a calculator tool.

Prompt `"37*48="`, answer `"1776"`, for every a, b in 10..99; a fixed seed holds out
`EVAL_SIZE` problems. An episode is plain text (no chat template):

    37*48=<calc>37*48</calc><r>1776</r>1776<eos>      a call, the tool's reply, the answer
    37*48=1850<eos>                                    a direct answer (a guess)

The model's first turn either calls the tool, `<calc>EXPRESSION</calc>` (the turn ends at the stop
string `</calc>`), or answers and ends with EOS. After a call the environment appends the tool's
result as `<r>RESULT</r>` (`reply_template`) and the model's next turn is the answer and EOS. The
reward is 1 when the last model turn is the answer, else 0: correctness only.

The warm start imitates an **imperfect teacher**: on problems whose first factor has an even tens
digit it calls the tool with probability 0.9, otherwise 0.2; when it does not call it guesses
`a * round(b, -1)`, right only when b is a multiple of 10. A model fitted to it calls the tool on
about half the problems when greedy and guesses (wrongly) on the rest, yet still samples a call
sometimes everywhere: RL on correctness alone can teach it to always call.
"""

from __future__ import annotations

import ast
import operator
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

from ..engine.configlib import ConfigError

FACTORS = range(10, 100)
EVAL_SIZE = 200
CALL_RATE_EVEN_TENS, CALL_RATE_ODD_TENS = 0.9, 0.2
SEP = "="
TOOL_CALL_FORMAT = r"<calc>(?P<arguments>.*?)</calc>"
TOOL_CALL_STOP = "</calc>"
REPLY_TEMPLATE = "<r>{content}</r>"
MAX_EXPRESSION_CHARS = 200

OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression of integers.

    Args:
        expression: Integers combined with +, -, *, / and parentheses, e.g. "37*48".

    Returns:
        The value: an integer when exact, else a decimal.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    value = _evaluate(tree.body)
    return str(value.numerator) if value.denominator == 1 else str(float(value))


def _evaluate(node: ast.AST) -> Fraction:
    """Numbers and + - * / only: names, calls, attributes, ... are refused, never evaluated."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ZeroDivisionError("division by zero")
        return OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"not allowed in an expression: {ast.unparse(node)!r}")


def prompt_of(a: int, b: int) -> str:
    return f"{a}*{b}{SEP}"


def call_text(expression: str) -> str:
    return f"<calc>{expression}{TOOL_CALL_STOP}"


def teacher(a: int, b: int, rng: random.Random) -> list[list]:
    """The imperfect teacher's demonstration as (text, trainable) segments; EOS follows."""
    rate = CALL_RATE_EVEN_TENS if (a // 10) % 2 == 0 else CALL_RATE_ODD_TENS
    if rng.random() < rate:
        expression = f"{a}*{b}"
        result = calculator(expression)
        return [
            [call_text(expression), True],
            [REPLY_TEMPLATE.format(content=result), False],  # the environment's tokens
            [result, True],
        ]
    return [[str(a * round(b, -1)), True]]  # a guess, right only when b % 10 == 0


def final_answer(completion) -> str:
    """The last model turn's text: a string, or the last assistant message of an episode."""
    if isinstance(completion, str):
        return completion
    said = [m for m in completion if m.get("role") == "assistant"]
    return (said[-1].get("content") or "") if said else ""


def calculator_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the last model turn is exactly the answer, else 0.0 (TRL signature; a completion
    is the episode's messages after the prompt, or a plain string)."""
    return [
        1.0 if final_answer(c).strip() == a else 0.0
        for c, a in zip(completions, answer, strict=True)
    ]


@dataclass
class CalculatorTask:
    """All products a*b of two-digit numbers, split once by a fixed seed into a held-out
    evaluation set and the training pool."""

    seed: int = 1234

    name = "calculator"
    reward_fn = staticmethod(calculator_reward)
    tools: ClassVar[list] = [calculator]
    tool_call_format = TOOL_CALL_FORMAT
    tool_call_stop = TOOL_CALL_STOP
    reply_template = REPLY_TEMPLATE

    def __post_init__(self) -> None:
        pairs = [(a, b) for a in FACTORS for b in FACTORS]
        random.Random(self.seed).shuffle(pairs)
        self.eval_pairs = pairs[:EVAL_SIZE]
        self.train_pairs = pairs[EVAL_SIZE:]

    def rows(self, pairs: list[tuple[int, int]]) -> list[dict]:
        return [{"prompt": prompt_of(a, b), "answer": str(a * b)} for a, b in pairs]

    def train_rows(self) -> list[dict]:
        return self.rows(self.train_pairs)

    def eval_rows(self) -> list[dict]:
        return self.rows(self.eval_pairs)

    def sft_rows(self, n: int, seed: int = 0) -> list[dict]:
        """`n` teacher demonstrations {prompt, completion: segments} from the training pool."""
        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            a, b = rng.choice(self.train_pairs)
            rows.append({"prompt": prompt_of(a, b), "completion": teacher(a, b, rng)})
        return rows

    def preference_rows(self, n: int, split: str = "train", seed: int = 0) -> list[dict]:
        raise ConfigError(
            "builtin:calculator has no preference pairs; train a reward model on builtin:reverse "
            "or on your own {prompt, chosen, rejected} rows"
        )
