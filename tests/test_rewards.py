"""Reward functions: TRL signature, None, weights, multi-reward modes, and clear errors."""

import asyncio
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from advantage.core.scores import combine_rewards
from advantage.engine.configlib import ConfigError
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
    # an adversarial probe: finite in Python, inf as the float32 scores (or an OverflowError)
    with pytest.raises(RewardError, match=r"'big' returned 1e\+39 for sample 2 .*float32's range"):
        _call(lambda_named("big", lambda prompts, completions, **kw: [1.0, 0.0, 1e39, 0.0]))
    with pytest.raises(RewardError, match=r"'huge' returned 1000000.* for sample 0 .*float32"):
        _call(lambda_named("huge", lambda prompts, completions, **kw: [10**400, 0, 0, 0]))
    with pytest.raises(RewardError, match=r"returned 'yes' \(str\) for sample 0"):
        _call(lambda_named("text", lambda prompts, completions, **kw: ["yes", 1.0, 1.0, 1.0]))
    with pytest.raises(RewardError, match="expected a list of 4 floats"):
        _call(lambda_named("scalar", lambda prompts, completions, **kw: 1.0))
    with pytest.raises(RewardError, match=r"returned '1.0' \(str\); expected a list of 4 floats"):
        _call(lambda_named("string", lambda prompts, completions, **kw: "1.0"))


@pytest.mark.parametrize(
    "returned",
    [
        np.array([1.0, 0.0, 0.5, 2.0]),  # a NumPy array
        [np.float32(1.0), np.int64(0), np.float64(0.5), 2],  # NumPy scalars
        torch.tensor([1.0, 0.0, 0.5, 2.0]),  # a tensor
        [torch.tensor(1.0), torch.tensor(0), 0.5, 2.0],  # 0-d tensors
        (1.0, 0.0, 0.5, 2.0),  # a tuple
        (x for x in [1.0, 0.0, 0.5, 2.0]),  # a generator
    ],
)
def test_what_trl_accepts_is_accepted(returned):
    """TRL's GRPOTrainer takes any sequence that `torch.tensor(..., dtype=float32)` takes."""
    fn = lambda_named("numpyish", lambda prompts, completions, **kw: returned)
    assert _call(fn) == [1.0, 0.0, 0.5, 2.0]


def test_bools_score_one_and_zero():
    fn = lambda_named("verifier", lambda prompts, completions, **kw: [True, False, np.True_, None])
    assert _call(fn) == [1.0, 0.0, 1.0, None]


def test_timeout():
    def slow(prompts, completions, **kw):
        time.sleep(2)
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"longer than reward.timeout=0.2s"):
        _call(slow, timeout=0.2)


def lambda_named(name, fn):
    fn.__name__ = name
    return fn


ROOT = Path(__file__).resolve().parents[1]


def test_a_function_that_never_returns_times_out_and_the_process_exits():
    code = """
import time
from advantage.engine.rewards import RewardError, RewardSource, call_reward_function

def forever(prompts, completions, **kw):
    while True:
        time.sleep(0.05)

try:
    call_reward_function(RewardSource("forever", forever), ["a>"], ["b"], [[1]], {}, timeout=0.5)
except RewardError as e:
    print(e)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )  # before: the worker thread kept the process alive after the error (TimeoutExpired here)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'forever' took longer than reward.timeout=0.5s" in out.stdout


def test_async_function_that_blocks_its_loop_times_out():
    async def blocking(prompts, completions, **kw):
        time.sleep(6)  # blocks the event loop: asyncio.wait_for cannot interrupt it
        return [0.0] * len(completions)

    start = time.perf_counter()
    with pytest.raises(RewardError, match=r"'blocking' took longer than reward.timeout=0.3s"):
        _call(blocking, timeout=0.3)
    assert time.perf_counter() - start < 5  # cut off, not waited for


def test_on_timeout_skip_scores_the_batch_none(caplog):
    def slow(prompts, completions, **kw):
        time.sleep(6)
        return [0.0] * len(completions)

    rc = RewardComputer(  # a timeout the fast source meets on a busy machine too
        [RewardSource("slow", slow), RewardSource("trl", trl_style)], timeout=2, on_timeout="skip"
    )
    with caplog.at_level("WARNING", logger="advantage"):
        out = rc(PROMPTS, COMPLETIONS, IDS, {}, group_size=2)
    assert "'slow' took longer than reward.timeout=2s" in caplog.text
    assert "reward.on_timeout=skip" in caplog.text
    assert out.per_source_mask[0].tolist() == [False] * 4  # slow: None for the whole batch
    torch.testing.assert_close(out.scores, torch.tensor([2.0, 2.0, 2.0, 2.0]))  # trl alone


@pytest.mark.slow
def test_async_reward_inside_a_running_event_loop(run_dir):
    """A notebook runs an event loop: `advantage.train` is called from inside it."""
    import advantage
    from helpers import small_config

    async def async_len(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [float(len(c)) for c in completions]

    async def notebook_cell():
        return advantage.train(
            None, reward_funcs=[async_len], overrides=small_config(run_dir, "train.steps=1")
        )

    result = asyncio.run(notebook_cell())
    assert len(result.metrics) == 1 and "reward/async_len" in result.metrics[0]


def constant(name, value):
    return lambda_named(name, lambda prompts, completions, **kw: [value] * len(completions))


def test_a_weight_beyond_float32_is_refused_when_the_sources_are_built():
    # an adversarial probe: 1e39 passes check_finite but is inf as the float32 weights
    with pytest.raises(ConfigError, match=r"reward.weights\[1\]: 1e\+39 \(the weight of 'b'\)"):
        RewardComputer([RewardSource("a", trl_style), RewardSource("b", trl_style, weight=1e39)])


def test_a_weighted_sum_that_overflows_names_the_sources_weights_and_sample():
    # each reward and weight fits float32, their combination does not: 3e38 + 0.5·3e38 = inf
    # (before: a silent inf score, then "non-finite loss or gradient; update skipped")
    a = lambda_named("a", lambda prompts, completions, **kw: [0.0, 0.0, 3e38, 1.0])
    rc = RewardComputer([RewardSource("a", a), RewardSource("b", constant("b", 3e38), weight=0.5)])
    with pytest.raises(RewardError) as e:
        rc(PROMPTS, COMPLETIONS, IDS, {}, group_size=2)
    assert str(e.value) == (
        "the weighted sum of reward functions 'a' (weight 1, returned 3e+38) and 'b' (weight 0.5, "
        "returned 3e+38) is inf for sample 2 (prompt 'cd>'); combined rewards must stay within "
        "float32's range, |s| <= 3.4e38: scale these rewards or reward.weights down"
    )


def test_a_normalized_combination_that_overflows_names_the_mode():
    # each function normalised within its group of 2 to ±1/sqrt(2) (ε aside), then
    # 3e38·0.707 + 3e38·0.707 = 4.2e38 > 3.4e38: inf
    rc = RewardComputer(
        [
            RewardSource("a", lambda_named("a", lambda completions, **kw: [0, 1, 0, 1]), 3e38),
            RewardSource("b", lambda_named("b", lambda completions, **kw: [0, 1, 0, 1]), 3e38),
        ],
        "normalize_then_sum",
    )
    with pytest.raises(
        RewardError,
        match=r"^the normalize_then_sum combination \(reward.multi_reward\) of reward functions "
        r"'a' \(weight 3e\+38, returned 0\) and 'b' \(weight 3e\+38, returned 0\) is -?inf "
        r"for sample 0 \(prompt 'ab>'\)",
    ):
        rc(PROMPTS, COMPLETIONS, IDS, {}, group_size=2)


def test_returning_none_for_the_whole_batch_says_none_goes_inside_the_list():
    with pytest.raises(RewardError) as e:
        _call(lambda_named("nothing", lambda prompts, completions, **kw: None))
    assert str(e.value) == (
        "reward function 'nothing' returned None; expected a list of 4 floats, one per "
        "completion, with None in the list for a completion it does not score"
    )


def test_a_function_without_kwargs_is_refused_when_the_sources_are_built():
    def no_kwargs(completions):
        return [1.0] * len(completions)

    # before: accepted here, then "raised TypeError on sample 0 ... unexpected keyword
    # argument 'prompts'" after the model loaded and the first rollout
    with pytest.raises(ConfigError) as e:
        RewardComputer([RewardSource("no_kwargs", no_kwargs)])
    assert str(e.value) == (
        "reward function 'no_kwargs' does not take the keyword argument(s) prompts, "
        "completion_ids that every reward call passes; add **kwargs to its parameters, as "
        "TRL's reward functions have: def no_kwargs(completions, **kwargs)"
    )

    # the dataset's columns are passed too
    def names_all(prompts, completions, completion_ids, answer):
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    rc = RewardComputer([RewardSource("names_all", names_all)])  # every call argument named
    rc.check_columns({"answer"})
    out = rc(PROMPTS, COMPLETIONS, IDS, {"answer": ["ba", "ba", "dc", "dc"]}, group_size=2)
    assert out.scores.tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ConfigError, match=r"'names_all' does not take the dataset column\(s\) id"):
        rc.check_columns({"answer", "id"})
    # reward.kwargs and the sampler's arguments (environments) as well
    with pytest.raises(ConfigError, match=r"'names_all' does not take .* environments, scale"):
        RewardComputer(
            [RewardSource("names_all", names_all)],
            extra={"scale": 2},
            sampler_arguments=("environments",),
        )


def test_two_functions_of_one_name_get_distinct_metric_names(caplog):
    # fa/r.py:score and fb/r.py:score: before, both were 'score' and shared reward/score
    with caplog.at_level("WARNING", logger="advantage"):
        rc = RewardComputer(
            [
                RewardSource("score", constant("score", 1.0), origin="fa/r.py:score"),
                RewardSource("score", constant("score", 0.0), origin="fb/r.py:score"),
                RewardSource("score_2", constant("score_2", 0.5)),  # already taken
            ]
        )
    assert [s.name for s in rc.sources] == ["score", "score_3", "score_2"]
    assert (
        "reward sources 'score' (fa/r.py:score) and 'score_3' (fb/r.py:score) had one name"
        in caplog.text
    )
    out = rc(PROMPTS, COMPLETIONS, IDS, {}, group_size=2)
    assert out.names == ["score", "score_3", "score_2"]
    assert out.per_source[:, 0].tolist() == [1.0, 0.0, 0.5]


def test_reward_funcs_replacing_the_configs_functions_say_so(tmp_path, caplog):
    # a probe: advantage.train(cfg, reward_funcs=[f]) dropped reward.functions of the config
    # without a word
    from advantage.rl.config import load_config
    from advantage.rl.rewarding import make_reward_computer
    from helpers import length_reward, small_config

    cfg = load_config(None, small_config(tmp_path, "reward.functions=[exact_match]"))
    with caplog.at_level("WARNING", logger="advantage"):
        rc = make_reward_computer(cfg, [length_reward])
    assert [s.name for s in rc.sources] == ["length_reward"]
    assert "reward_funcs given to the Python API replace reward.functions=['exact_match']" in (
        caplog.text
    )
