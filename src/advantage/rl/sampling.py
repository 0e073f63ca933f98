"""Steps 1–2 of the loop: sample this rank's prompts × G completions, and score them.

Dynamic sampling (DAPO, arXiv:2503.14476) sets aside groups whose scores are all equal (their
advantages would be 0) and draws new prompts; every rank keeps drawing while any rank is short,
so ranks stay in lockstep; a batch still short after `rollout.max_sampling_tries` is filled up
with set-aside groups, so its size never changes.
"""

from __future__ import annotations

import time

import torch

from ..core import overlong_penalty
from ..engine.parallel import global_sums
from ..engine.rewards import score_samples
from ..engine.rollout import Rollout
from ..engine.sampling import Sampled
from .records import ScoredRollout
from .setup import Run


def rollout_and_score(run: Run) -> ScoredRollout:
    """This rank's `P_local` prompts × G completions, scored (B = P_local·G, prompt-major)."""
    cfg, sizes = run.config, run.sizes
    G, P_local, rank = sizes.G, sizes.P_local, run.dist.rank
    kept: list[ScoredRollout] = []
    reserve: list[ScoredRollout] = []
    n_groups, tries, dropped, seconds, reward_seconds = 0, 0, 0, 0.0, 0.0
    dynamic = run.algo.dynamic_sampling
    max_tries = cfg.rollout.max_sampling_tries if dynamic else 1
    while tries < max_tries:
        if not global_sums([float(n_groups < P_local)])[0]:  # no rank is short
            break
        tries += 1
        rows = run.prompts.take(sizes.P)[rank * P_local : (rank + 1) * P_local]
        t0 = time.perf_counter()
        prompts = [r[cfg.data.prompt_field] for r in rows]
        sampled = run.sampler.sample(rows, prompts, G, run.sampling)
        seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        part = score(run, sampled, rows)
        reward_seconds += time.perf_counter() - t0
        if dynamic:
            part, constant = part.split_constant_groups(G)
            if constant is not None:
                dropped += len(constant.rows)
                reserve.append(constant)
        if part is not None:
            kept.append(part)
            n_groups += len(part.rows)
    parts = kept + reserve  # set-aside groups only fill what is missing
    batch = ScoredRollout.concat(parts, run.tokenizer.pad_token_id, keep_groups=P_local, G=G)
    batch.rollout_seconds, batch.reward_seconds = seconds, reward_seconds
    batch.tries, batch.dropped_groups = tries, dropped
    return batch


def overlong_lengths(run: Run, rollout: Rollout) -> tuple[torch.Tensor, int]:
    """What DAPO's overlong shaping measures, and the budget it measures it against: each
    completion's tokens against `rollout.max_new_tokens`; in episodes, where that budget is a
    turn's, each episode's tokens after the prompt (the model's and the environment's, as
    verl's multi-turn DAPO counts the response) against `rollout.max_episode_tokens`, which
    `build_run` requires there."""
    if not run.episodic:
        return rollout.completion_lengths, run.config.rollout.max_new_tokens
    return rollout.completion_mask.sum(-1), run.config.rollout.max_episode_tokens


def score(run: Run, sampled: Sampled, rows: list[dict]) -> ScoredRollout:
    """The reward sources on the G samples of each row, then the shaping of the scores:
    the missing-EOS penalty and DAPO's overlong punishment (`algo.overlong_fraction`)."""
    cfg, rollout = run.config, sampled.rollout
    scores = score_samples(run.rewards, rows, cfg.data.prompt_field, run.sizes.G, sampled)
    if cfg.reward.missing_eos_penalty:  # completions that never ended
        scores.scores = scores.scores - cfg.reward.missing_eos_penalty * rollout.truncated.float()
    if run.algo.overlong_fraction:
        lengths, max_len = overlong_lengths(run, rollout)
        penalty = overlong_penalty(lengths, max_len, run.algo.overlong_fraction * max_len)
        scores.scores = scores.scores + torch.where(scores.score_mask, penalty, 0.0)
    return ScoredRollout(
        rollout=rollout,
        rows=rows,
        scores=scores,
        completions=sampled.texts,
        conversations=sampled.completions if run.episodic else None,
    )
