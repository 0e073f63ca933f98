"""The built-in verifiable task: reverse a string of letters.

Prompt `"cabfd>"`, answer `"dfbac"`. The reward is 1 for an exact match, else 0 — a verifier.

The warm start imitates an **imperfect teacher**: on strings whose first letter is in
`TRIGGER` the teacher swaps the first two output letters with probability `MISTAKE_RATE`.
A model fitted to that teacher answers those prompts wrongly when greedy but still samples the
right answer sometimes, which leaves RL with a verifier clear, honest room to improve. The
held-out evaluation strings never appear in training (neither in the warm start nor in RL).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ALPHABET = "abcdef"
MIN_LEN, MAX_LEN = 3, 5
TRIGGER = "abc"
MISTAKE_RATE = 0.8
EVAL_SIZE = 200
SEP = ">"


def prompt_of(s: str) -> str:
    return s + SEP


def answer_of(s: str) -> str:
    return s[::-1]


def teacher(s: str, rng: random.Random) -> str:
    """The imperfect teacher's demonstration for `s`."""
    y = answer_of(s)
    if s[0] in TRIGGER and rng.random() < MISTAKE_RATE:
        y = y[1] + y[0] + y[2:]
    return y


def reverse_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion is exactly the reversed string, else 0.0 (TRL signature)."""
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer, strict=True)]


@dataclass
class ReverseTask:
    """All strings of the alphabet with lengths MIN_LEN..MAX_LEN, split once by a fixed seed
    into a held-out evaluation set and the training pool."""

    seed: int = 1234

    def __post_init__(self) -> None:
        strings = [""]
        every = []
        for _ in range(MAX_LEN):
            strings = [s + c for s in strings for c in ALPHABET]
            every += [s for s in strings if len(s) >= MIN_LEN]
        rng = random.Random(self.seed)
        rng.shuffle(every)
        self.eval_strings = every[:EVAL_SIZE]
        self.train_strings = every[EVAL_SIZE:]

    name = "reverse"
    reward_fn = staticmethod(reverse_reward)

    def rows(self, strings: list[str]) -> list[dict]:
        return [{"prompt": prompt_of(s), "answer": answer_of(s)} for s in strings]

    def train_rows(self) -> list[dict]:
        return self.rows(self.train_strings)

    def eval_rows(self) -> list[dict]:
        return self.rows(self.eval_strings)

    def preference_rows(self, n: int, split: str = "train", seed: int = 0) -> list[dict]:
        """`n` pairs {prompt, chosen, rejected}: the verified answer against a wrong one (the
        teacher's swap of the first two letters, another adjacent swap, a substituted or a
        dropped letter). `split="eval"` draws from the held-out strings."""
        rng = random.Random(seed + (7 if split == "eval" else 0))
        pool = self.eval_strings if split == "eval" else self.train_strings
        rows = []
        while len(rows) < n:
            s = rng.choice(pool)
            right = answer_of(s)
            kind = rng.randrange(4)
            if kind == 0:
                wrong = right[1] + right[0] + right[2:]
            elif kind == 1:
                i = rng.randrange(len(right) - 1)
                wrong = right[:i] + right[i + 1] + right[i] + right[i + 2 :]
            elif kind == 2:
                i = rng.randrange(len(right))
                wrong = right[:i] + rng.choice(ALPHABET) + right[i + 1 :]
            else:
                i = rng.randrange(len(right))
                wrong = right[:i] + right[i + 1 :]
            if wrong != right:
                rows.append({"prompt": prompt_of(s), "chosen": right, "rejected": wrong})
        return rows

    def sft_rows(self, n: int, seed: int = 0) -> list[dict]:
        """`n` teacher demonstrations {prompt, completion} drawn from the training pool."""
        rng = random.Random(seed)
        return [
            {"prompt": prompt_of(s), "completion": teacher(s, rng)}
            for s in (rng.choice(self.train_strings) for _ in range(n))
        ]
