"""The decode loop's per-step choices: the next token of each row (`torch.multinomial`'s draw,
with its log-prob and whether the row's logits are finite), whether every row has ended (on every
rank under lockstep), and the stop strings."""

from __future__ import annotations

import torch

from .base import NonFiniteLogitsError, SamplingParams


def all_ended(done: torch.Tensor, broken: torch.Tensor, across_ranks: bool) -> bool:
    """Whether every row has ended (`across_ranks`: on every rank; one all-reduce). Raises
    NonFiniteLogitsError if a row's logits were not finite (output rows `broken`): under
    lockstep on every rank together, as one rank stopping alone would leave the others
    waiting in the next collective."""
    pending, bad = (~done).sum(), len(broken)
    if across_ranks:
        import torch.distributed as dist

        counts = torch.tensor([float(pending), float(bad)])
        dist.all_reduce(counts)
        pending, bad = counts.tolist()
    if bad:
        raise NonFiniteLogitsError(
            f"the policy's next-token logits are not finite (NaN or inf) for {int(bad)} "
            f"sequences (this rank's rows {broken.tolist()[:8]}): its weights or activations "
            "overflowed (a diverged update: lower train.lr; or a broken checkpoint)"
        )
    return pending == 0


def draw(
    logits: torch.Tensor,
    params: SamplingParams,
    warpers,
    eos: int | None,
    active: torch.Tensor,
    B: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The next token of each decode row `[R]`, its log-prob under logits / T (None when
    greedy), and which rows' logits are not finite (`[R]` bool: an argmax over NaN is token 0,
    so the loop stops on them). The draw is `torch.multinomial`'s own (argmax of p / q, q ~ Exp(1)) with the
    noise drawn for all B rows and taken at the `active` ones: a row gets the same noise
    whether or not ended rows have left the batch."""
    scaled = logits if params.greedy else logits / params.temperature
    sampling = scaled.clone() if (warpers or params.ignore_eos) else scaled
    if params.ignore_eos and eos is not None:
        sampling[:, eos] = -float("inf")
    if params.greedy:
        best, token = sampling.max(-1)
        return token, None, ~torch.isfinite(best)  # a NaN in a row makes its max NaN
    warped = warpers(None, sampling) if warpers else sampling
    probs = torch.softmax(warped, -1)
    noise = torch.empty((B, probs.shape[-1]), device=probs.device).exponential_(1)
    token = (probs / noise[active]).argmax(-1)
    logprob = torch.log_softmax(scaled, -1).gather(-1, token[:, None]).squeeze(-1)
    return token, logprob, ~torch.isfinite(logprob)  # a NaN or an inf in a row: NaN here


def warpers_for(params: SamplingParams):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList()
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    return warpers


def stop_criterion(tokenizer, params: SamplingParams):
    """`stop(ids [R, n], None) -> [R]` bool: a row's text now ends inside one of `params.stop`
    (transformers' `StopStringCriteria`, or `DecodedStops` where it cannot read the tokenizer)."""
    if not params.stop:
        return None
    from transformers.generation.stopping_criteria import StopStringCriteria

    try:
        return StopStringCriteria(tokenizer, list(params.stop))
    except ValueError:  # it probes the vocabulary with "abcdef", which a tokenizer of a
        return DecodedStops(tokenizer, list(params.stop))  # task's own characters may lack


class DecodedStops:
    """Stop strings found in decoded text: a row stops when one of them ends in its last token
    (the tail of the row, decoded with and without that token). Per row and step in Python:
    for tokenizers `StopStringCriteria` cannot take."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.window = max(map(len, stops)) + 8  # tokens: most decode to one character or more

    def __call__(self, ids: torch.Tensor, scores=None) -> torch.Tensor:
        decode = self.tokenizer.decode
        hits = []
        for row in ids.tolist():
            tail = decode(row[-self.window :], skip_special_tokens=True)
            before = decode(row[-self.window : -1], skip_special_tokens=True)
            hits.append(any(s in tail and s not in before for s in self.stops))
        return torch.tensor(hits, dtype=torch.bool, device=ids.device)
