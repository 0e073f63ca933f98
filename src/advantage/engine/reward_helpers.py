"""Built-in reward functions (TRL signature), usable by name in `reward.functions`.

Extra parameters come from `reward.kwargs` (passed to every function as keyword arguments).
"""

from __future__ import annotations

import re

import torch

from ..core import shaping


def completion_text(completion) -> str:
    """The text of a completion: a string, or the last message of a conversation."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


def exact_match(prompts, completions, answer, **kwargs) -> list[float | None]:
    """1.0 when the stripped completion equals the `answer` column, else 0.0 (None where a row's
    answer is None). `answer` is required, so a dataset without the column fails at setup."""
    return [
        None if a is None else float(completion_text(c).strip() == str(a).strip())
        for c, a in zip(completions, answer, strict=True)
    ]


def format_regex(prompts, completions, format_pattern: str = r"(?s).*", **kwargs) -> list[float]:
    """1.0 when the completion fully matches `format_pattern` (from reward.kwargs), else 0.0."""
    pattern = re.compile(format_pattern)
    return [float(bool(pattern.fullmatch(completion_text(c)))) for c in completions]


def length_penalty(
    prompts,
    completions,
    completion_ids,
    target_length: int = 0,
    length_penalty_coef: float = 0.01,
    **kwargs,
) -> list[float]:
    """`-coef · max(0, len - target)` in tokens: a linear penalty beyond `target_length`."""
    return [-length_penalty_coef * max(0, len(ids) - target_length) for ids in completion_ids]


def overlong_penalty(
    prompts,
    completions,
    completion_ids,
    max_completion_length: int = 64,
    overlong_buffer: int = 16,
    **kwargs,
) -> list[float]:
    """DAPO's soft overlong punishment (arXiv:2503.14476 eq. 13): 0 up to L_max - L_buffer,
    then linearly down to -1 at L_max, and -1 beyond (`advantage.core.shaping`)."""
    lengths = torch.tensor([len(ids) for ids in completion_ids])
    return shaping.overlong_penalty(lengths, max_completion_length, overlong_buffer).tolist()


def math_answer(prompts, completions, answer, **kwargs) -> list[float | None]:
    """1.0 when the completion's final answer equals the `answer` column mathematically
    (`math-verify`: LaTeX, fractions, sets...), else 0.0. Needs `pip install 'advantage[math]'`."""
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ImportError("math_answer needs math-verify: pip install 'advantage[math]'") from e
    out: list[float | None] = []
    for c, a in zip(completions, answer, strict=True):
        if a is None:
            out.append(None)
            continue
        gold, pred = parse(str(a)), parse(completion_text(c))
        out.append(float(bool(gold) and bool(pred) and verify(gold, pred)))
    return out


HELPERS = {
    "exact_match": exact_match,
    "format_regex": format_regex,
    "length_penalty": length_penalty,
    "overlong_penalty": overlong_penalty,
    "math_answer": math_answer,
}
