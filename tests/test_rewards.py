"""Reward functions: TRL signature, None, weights, multi-reward modes, and clear errors."""

import math

import pytest
import torch

from advantage.core.scores import combine_rewards
from advantage.engine.rewards import (
    RewardComputer,
    RewardError,
    RewardSource,
    call_reward_function,
)

PROMPTS = ["ab>", "ab>", "cd>", "cd>"]
COMPLETIONS = ["ba", "xx", "dc", "cd"]
IDS = [[1], [2], [3], [4]]


def test_combine_sum_then_normalize_with_none_and_weights():
    per_source = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.0, 0.0, 2.0]])
    present = torch.tensor([[True, True, False, True], [True, False, False, True]])  # None = False
    scores, mask = combine_rewards(
        per_source, present, torch.tensor([1.0, 2.0]), group_size=2, mode="sum_then_normalize"
    )
    # sample 0: 1 + 2·0.5 = 2; sample 1: 0; sample 2: nobody scored it; sample 3: 1 + 4 = 5
    torch.testing.assert_close(scores, torch.tensor([2.0, 0.0, 0.0, 5.0]))
    assert mask.tolist() == [True, True, False, True]


def test_combine_normalize_then_sum_and_clip():
    per_source = torch.tensor([[1.0, 0.0, 3.0, 3.0], [10.0, 20.0, 0.0, 1.0]])
    present = torch.ones(2, 4, dtype=torch.bool)
    scores, _ = combine_rewards(per_source, present, torch.ones(2), 2, "normalize_then_sum")
    # each function within each group of 2, (r - mean)/(σ + 1e-4) with σ over n-1:
    # f1 [1, 0 | 3, 3] → [z, -z | 0, 0] with z = 0.5/(sqrt(0.5) + 1e-4)
    # f2 [10, 20 | 0, 1] → [-y, y | -z, z] with y = 5/(sqrt(50) + 1e-4)
    z = 0.5 / (0.5**0.5 + 1e-4)
    y = 5.0 / (50**0.5 + 1e-4)
    torch.testing.assert_close(scores, torch.tensor([z - y, y - z, -z, z]), atol=1e-6, rtol=0)
    clipped, _ = combine_rewards(
        torch.tensor([[5.0, -7.0]]),
        torch.ones(1, 2, dtype=torch.bool),
        torch.ones(1),
        2,
        "sum_then_normalize",
        clip=2.0,
    )
    torch.testing.assert_close(clipped, torch.tensor([2.0, -2.0]))


def trl_style(completions, **kwargs):  # exactly TRL's documented shape
    return [float(len(c)) for c in completions]


async def async_reward(prompts, completions, **kwargs):
    return [1.0 for _ in completions]


def test_sync_and_async_functions_receive_columns():
    seen = {}

    def reads_columns(prompts, completions, completion_ids, answer, **kwargs):
        seen["answer"] = answer
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    rc = RewardComputer(
        [
            RewardSource("reads", reads_columns),
            RewardSource("trl", trl_style),
            RewardSource("async", async_reward),
        ],
        "sum_then_normalize",
        None,
        None,
    )
    out = rc(PROMPTS, COMPLETIONS, IDS, {"answer": ["ba", "ba", "dc", "dc"]}, group_size=2)
    assert seen["answer"] == ["ba", "ba", "dc", "dc"]
    torch.testing.assert_close(out.scores, torch.tensor([4.0, 3.0, 4.0, 3.0]))
    assert out.names == ["reads", "trl", "async"]


def _call(fn, **extra):
    return call_reward_function(
        RewardSource(fn.__name__, fn), PROMPTS, COMPLETIONS, IDS, {}, **extra
    )


def test_raising_function_names_function_and_sample():
    def picky(prompts, completions, **kw):
        return [1.0 / (len(c) - 2 if c == "dc" else 1) for c in completions]  # ZeroDivision on "dc"

    with pytest.raises(
        RewardError, match=r"'picky' raised ZeroDivisionError on sample 2 \(prompt 'cd>'\)"
    ):
        _call(picky)


def test_wrong_length_nan_inf_and_non_numbers():
    with pytest.raises(RewardError, match="'short' returned 3 values for 4 completions"):
        _call(lambda_named("short", lambda prompts, completions, **kw: [1.0, 2.0, 3.0]))
    with pytest.raises(RewardError, match="returned nan for sample 1"):
        _call(lambda_named("nan", lambda prompts, completions, **kw: [1.0, math.nan, 0.0, 0.0]))
    with pytest.raises(RewardError, match="returned inf for sample 3"):
        _call(lambda_named("inf", lambda prompts, completions, **kw: [1.0, 0.0, 0.0, math.inf]))
    with pytest.raises(RewardError, match=r"returned 'yes' \(str\) for sample 0"):
        _call(lambda_named("text", lambda prompts, completions, **kw: ["yes", 1.0, 1.0, 1.0]))
    with pytest.raises(RewardError, match="expected a list of 4 floats"):
        _call(lambda_named("scalar", lambda prompts, completions, **kw: 1.0))


def test_timeout():
    import time

    def slow(prompts, completions, **kw):
        time.sleep(2)
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"longer than reward.timeout=0.2s"):
        _call(slow, timeout=0.2)


def lambda_named(name, fn):
    fn.__name__ = name
    return fn
