"""The statistics of a batch of episodes (`episode/*`, `tools/*` metrics)."""

from __future__ import annotations

from .parallel import global_mean
from .rollout import Rollout


def episode_metrics(rollout: Rollout, conversations: list[list[dict]]) -> dict[str, float]:
    """Statistics of B episodes: model turns, length (all tokens after the prompt), the
    environment's share of those tokens, truncation, tool calls per episode, the share of
    episodes with a tool call, and the shares of tool replies that are errors / timeouts.
    With a gym environment (`rollout.turn_rewards`), also `episode/env_reward`: the mean over
    every rank's episodes of the sum of the per-turn rewards its `step` returned (they go into
    the advantages, not into the scores behind `reward/mean`)."""
    n = max(len(conversations), 1)
    extra = {}
    if rollout.turn_rewards is not None:  # the same on every rank: a collective is safe
        per_episode = (rollout.turn_rewards.float() * rollout.completion_mask).sum(-1)
        extra["episode/env_reward"] = global_mean(per_episode)
    tokens = float(rollout.completion_mask.sum())
    env_tokens = tokens - float(rollout.model_mask.sum())
    replies = [m for c in conversations for m in c if m.get("role") == "tool"]
    calls = max(len(replies), 1)
    return {
        "episode/turns": sum(m["role"] == "assistant" for c in conversations for m in c) / n,
        "episode/length": tokens / n,
        "episode/env_token_share": env_tokens / max(tokens, 1.0),
        "episode/truncated": float(rollout.truncated.float().mean()),
        "tools/calls_per_episode": len(replies) / n,
        "tools/call_rate": sum(any(m["role"] == "tool" for m in c) for c in conversations) / n,
        "tools/errors": sum(_is_error(str(m["content"])) for m in replies) / calls,
        "tools/timeouts": sum("timed out" in str(m["content"]) for m in replies) / calls,
        **extra,
    }


def _is_error(reply: str) -> bool:
    """A tool reply that reports a failure: ours (`error: ...`) or TRL's (`{'error': ...}`)."""
    return reply.startswith(("error:", "{'error':"))
