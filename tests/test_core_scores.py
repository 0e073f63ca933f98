"""Multi-reward combination (core/scores.py) and the `batch_std` scope (core/normalize.py)."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from advantage.core import group_mean_advantages
from advantage.core.normalize import batch_std_normalize, masked_std
from advantage.core.scores import REWARD_COMBINATIONS, combine_rewards

NAN = float("nan")
X = 0.5 / (math.sqrt(0.5) + 1e-4)  # one member of a 2-group {a, a+1}: 0.5/(σ + ε), σ = √0.5


def _example():
    # F = 2 functions, B = 4 samples, G = 2; NaN marks "returned None" and is never read
    values = torch.tensor([[1.0, 0.0, 1.0, NAN], [0.5, 1.5, 2.0, NAN]])
    present = ~values.isnan()
    return values, present, torch.tensor([1.0, 2.0])


def test_sum_then_normalize_hand_computed():
    values, present, w = _example()
    scores, mask = combine_rewards(values, present, w, 2, "sum_then_normalize")
    # [1 + 2·0.5, 0 + 2·1.5, 1 + 2·2, nothing scored]
    torch.testing.assert_close(scores, torch.tensor([2.0, 3.0, 5.0, 0.0]))
    assert mask.tolist() == [True, True, True, False]
    clipped, _ = combine_rewards(values, present, w, 2, "sum_then_normalize", clip=2.5)
    torch.testing.assert_close(clipped, torch.tensor([2.0, 2.5, 2.5, 0.0]))


def test_normalize_then_sum_hand_computed():
    values, present, w = _example()
    scores, mask = combine_rewards(values, present, w, 2, "normalize_then_sum")
    # f0: group {1, 0} → [+X, -X]; group {1, None} has one value → 0
    # f1: group {0.5, 1.5} → [-X, +X]; group {2, None} → 0
    # s = [X - 2X, -X + 2X, 0, 0]
    torch.testing.assert_close(scores, torch.tensor([-X, X, 0.0, 0.0]))
    assert mask.tolist() == [True, True, True, False]


def test_normalize_then_sum_near_float32s_limit_is_finite():
    # an adversarial probe: rewards of ±3e38 (finite, allowed) overflowed the group's float32
    # sums, and the scores came out 0 without a word; the statistics now run in float64
    values = torch.tensor([[3e38, -3e38, 3e38, -3e38]])
    scores, _ = combine_rewards(values, torch.ones(1, 4, dtype=torch.bool), torch.ones(1), 4,
                                "normalize_then_sum")  # fmt: skip
    # mean 0, Bessel σ = 3e38·√(4/3): each r̂ = ±√3/2 (the ε of 1e-4 is nothing beside σ)
    expected = torch.tensor([1.0, -1.0, 1.0, -1.0]) * math.sqrt(3) / 2
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=0)


def test_trl_normalize_then_sum_hand_computed():
    values, present, w = _example()
    scores, mask = combine_rewards(values, present, w, 2, "trl_normalize_then_sum")
    # the sums [-X, X, 0] over the 3 scored samples: mean 0, Bessel std √((X² + X² + 0)/2) = X
    # → [-X, X, 0]/(X + 1e-4); the unscored sample stays 0
    torch.testing.assert_close(scores, torch.tensor([-X, X, 0.0, 0.0]) / (X + 1e-4))
    assert mask.tolist() == [True, True, True, False]


def test_unknown_mode_lists_valid_names():
    values, present, w = _example()
    assert set(REWARD_COMBINATIONS) == {
        "sum_then_normalize",
        "normalize_then_sum",
        "trl_normalize_then_sum",
    }
    with pytest.raises(ValueError, match="valid names: normalize_then_sum, sum_then_normalize"):
        combine_rewards(values, present, w, 2, "gdpo")


def _random(F=3, P=4, G=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(F, P * G, generator=g) * 2 + 1
    present = torch.rand(F, P * G, generator=g) > 0.25
    present[:, 0] = False  # one sample no function scores
    return values, present, torch.tensor([1.0, 0.5, 2.0][:F]), G


def test_absent_values_are_never_read():
    values, present, w, G = _random()
    poisoned = torch.where(present, values, torch.tensor(float("inf")))
    for mode in REWARD_COMBINATIONS:
        a, _ = combine_rewards(values, present, w, G, mode)
        b, _ = combine_rewards(poisoned, present, w, G, mode)
        torch.testing.assert_close(a, b)


def test_normalizing_modes_ignore_a_positive_affine_change_of_one_function():
    values, present, w, G = _random()
    changed = values.clone()
    changed[1] = 3.0 * changed[1] - 7.0
    for mode in ("normalize_then_sum", "trl_normalize_then_sum"):
        a, _ = combine_rewards(values, present, w, G, mode)
        b, _ = combine_rewards(changed, present, w, G, mode)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # equal up to ε = 1e-4
    a, _ = combine_rewards(values, present, w, G, "sum_then_normalize")
    b, _ = combine_rewards(changed, present, w, G, "sum_then_normalize")
    assert not torch.allclose(a, b)


def test_trl_mode_differs_from_ours():
    values, present, w, G = _random()
    ours, _ = combine_rewards(values, present, w, G, "normalize_then_sum")
    trl, mask = combine_rewards(values, present, w, G, "trl_normalize_then_sum")
    assert not torch.allclose(ours, trl)
    assert trl[mask].mean().abs() < 1e-6  # re-centred over the scored batch


# --- the batch_std scope ----------------------------------------------------------------------


def test_masked_std_hand_computed():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    valid = torch.tensor([True, True, True, False])
    assert masked_std(x, valid).item() == pytest.approx(1.0)  # {1,2,3}: Σ(x-2)² = 2, /(3-1)
    assert masked_std(x, valid, unbiased=False).item() == pytest.approx(math.sqrt(2 / 3))
    assert masked_std(x, torch.tensor([True, False, False, False])).item() == 0.0  # n = 1


def test_batch_std_normalize_hand_computed():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    adv = group_mean_advantages(scores, 2)  # [-0.5, 0.5, -0.5, 0.5]
    # batch std (Bessel) of [1, 2, 3, 4] = √(5/3) = 1.2910
    out = batch_std_normalize(adv, scores)
    torch.testing.assert_close(
        out, torch.tensor([-0.5, 0.5, -0.5, 0.5]) / (math.sqrt(5 / 3) + 1e-4)
    )
    # without sample 3: group {3} alone → advantage 0; std of [1, 2, 3] = 1
    valid = torch.tensor([True, True, True, False])
    adv = group_mean_advantages(scores, 2, valid)
    out = batch_std_normalize(adv, scores, valid)
    torch.testing.assert_close(out, torch.tensor([-0.5, 0.5, 0.0, 0.0]) / (1 + 1e-4))


# --- 2 processes equal 1 ----------------------------------------------------------------------


def _compute(values, present, w, G):
    scores = torch.where(present, values, 0.0)[0]
    valid = present[0]
    return {
        "trl": combine_rewards(values, present, w, G, "trl_normalize_then_sum")[0],
        "batch_std": batch_std_normalize(group_mean_advantages(scores, G, valid), scores, valid),
    }


def _worker(rank, world, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    values, present, w, G = _random()
    cols = slice(rank * values.shape[1] // world, (rank + 1) * values.shape[1] // world)
    torch.save(_compute(values[:, cols], present[:, cols], w, G), os.path.join(tmp, f"r{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    values, present, w, G = _random()
    single = _compute(values, present, w, G)
    for key, expected in single.items():
        got = torch.cat([parts[0][key], parts[1][key]])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=key)
    half = values.shape[1] // 2  # local-only statistics differ, so the test can fail
    local = _compute(values[:, :half], present[:, :half], w, G)
    assert not torch.allclose(local["trl"], single["trl"][:half])
