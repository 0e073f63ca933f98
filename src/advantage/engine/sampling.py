"""Sampling for the loop and for evaluation. A sampler turns P dataset rows × n samples into a
`Sampled` record: the `Rollout` tensors the trainer uses, and what the reward functions receive
(TRL's arguments). `SingleTurn` (here): one completion per sample. `Episodes`
(engine/episodes.py): multi-turn episodes with tools or environments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .rollout import Rollout, SamplingParams


@dataclass
class Sampled:
    """P rows × n samples (B = P·n, prompt-major), as the trainer and the rewards need them."""

    rollout: Rollout
    completions: list
    """`[B]` what reward functions get as `completions`: text, or a list of messages
    (conversational prompts; every episode: assistant and tool / user messages, as TRL)."""
    completion_ids: list[list[int]]
    """`[B]` the token ids after the prompt (episodes: the environment's tokens included, as
    TRL passes them)."""
    texts: list[str]
    """`[B]` readable text of each sample (samples.jsonl, the report)."""
    reward_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments of the reward call (`environments` for episodes)."""


Encode = Callable[[object], list[int]]
"""A prompt (text or messages) → its token ids (`engine.data.encode_prompt` with the run's
system prompt, length limit and tools)."""


class SingleTurn:
    """One completion per sample: the prompt and the model's answer."""

    episodic = False

    def __init__(self, backend, tokenizer, encode: Encode) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.encode = encode

    def sample(self, rows: list[dict], prompts: list, n: int, params: SamplingParams) -> Sampled:
        """n samples of each prompt (`rows` unused here: environments need them)."""
        rollout = self.backend.generate([self.encode(p) for p in prompts], n, params)
        ids = [
            row[m].tolist()
            for row, m in zip(rollout.completion_ids, rollout.completion_mask, strict=True)
        ]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        completions = [
            [{"role": "assistant", "content": t}] if isinstance(prompts[i // n], list) else t
            for i, t in enumerate(texts)
        ]
        return Sampled(rollout, completions, ids, texts)
