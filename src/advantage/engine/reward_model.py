"""A reward model: an `AutoModelForSequenceClassification` with one label scoring
`prompt + completion` texts. The one module both `advantage rm` (training it) and RL scoring
(`reward.model`) use, so the text a model is trained on is the text it scores."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core import RunningMoments
from .configlib import ConfigError
from .models import load_tokenizer


def load_reward_model(
    path: str,
    trust_remote_code: bool = False,
    new_head: bool = False,
    field: str = "reward.model",
    tokenizer_path: str | None = None,
):
    """A one-label sequence classifier and its tokenizer (the folder's, or `tokenizer_path`),
    right-padded.

    `new_head=True` (training one, `advantage rm`) initialises the score head when the folder
    holds a causal LM; otherwise every weight must come from the folder: a head that is missing
    from the checkpoint (or has another shape) would score with random weights, so it is refused.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    tokenizer = load_tokenizer(tokenizer_path or path, trust_remote_code)
    tokenizer.padding_side = "right"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # missing weights are reported below, in one line
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=1,
            dtype=torch.float32,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info["missing_keys"])
    mismatched = sorted(str(k[0]) for k in info["mismatched_keys"])  # e.g. a 2-label head
    if (missing or mismatched) and not new_head:
        why = (
            f"missing from the checkpoint: {', '.join(missing[:3])}; a plain causal LM?"
            if missing
            else f"of another shape in the checkpoint: {', '.join(mismatched[:3])}"
        )
        raise ConfigError(
            f"{field}: the folder {path!r} has no trained one-label score head ({why}); train a "
            "reward model on it with `advantage rm` and give its RUN_DIR/final"
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def reward_model_texts(tokenizer, prompts: list, completions: list) -> list[str]:
    """`prompt + completion` texts (conversations through the chat template)."""
    return [
        _as_text(p, tokenizer) + _as_text(c, tokenizer)
        for p, c in zip(prompts, completions, strict=True)
    ]


def _as_text(x, tokenizer) -> str:
    """Plain text of a prompt/completion (conversational ones through the chat template)."""
    if isinstance(x, str):
        return x
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(x, tokenize=False)
    return "".join(m["content"] for m in x)


def score(model, tokenizer, prompts: list, completions: list) -> torch.Tensor:
    """Reward `[N]` of each (prompt, completion) pair (with gradient when enabled)."""
    enc = tokenizer(
        reward_model_texts(tokenizer, prompts, completions), return_tensors="pt", padding=True
    )
    return model(**enc).logits[:, 0].float()


class RewardModel:
    """A trained reward model used as a reward function (TRL signature).

    `normalize=True` maps its scores through running statistics of every score seen so far
    (`(r - mean)/std`, global across ranks; saved in checkpoints).
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 32,
        trust_remote_code: bool = False,
        normalize: bool = False,
    ) -> None:
        self.model, self.tokenizer = load_reward_model(path, trust_remote_code)
        self.model.eval().requires_grad_(False)
        self.batch_size = batch_size
        self.moments = RunningMoments() if normalize else None
        self.__name__ = f"reward_model({Path(path).name})"

    @torch.no_grad()
    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        b = self.batch_size
        out = torch.cat(
            [
                score(self.model, self.tokenizer, prompts[i : i + b], completions[i : i + b])
                for i in range(0, len(prompts), b)
            ]
        )
        if self.moments is not None:
            out = self.moments.normalize(out)
        return out.tolist()

    def state_dict(self) -> dict:
        return {} if self.moments is None else self.moments.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.moments is not None and state:
            self.moments.load_state_dict(state)
