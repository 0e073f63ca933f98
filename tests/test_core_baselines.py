"""Baselines and normalisation scopes on hand-computed tensors, the seed examples and properties."""

import pytest
import torch

from advantage.core import (
    BASELINES,
    EMABaseline,
    MovingAverageBaseline,
    group_mean_advantages,
    group_normalize,
    group_std,
    leave_one_out_advantages,
    make_baseline,
    masked_whiten,
)


def test_group_mean_hand_computed():
    s = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 16.0])  # G = 3
    expected = torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0])
    torch.testing.assert_close(group_mean_advantages(s, 3), expected)


def test_seed_001_rloo_worked_example():
    # Seed 001 lays rewards out completion-major: row = completion k, column = prompt.
    completion_major = torch.tensor(
        [[1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [5.0, 6.0, 7.0], [8.0, 9.0, 10.0]]
    )  # [K=4, P=3]
    # Our API is prompt-major [P, G]: transpose, then flatten so sequence i = p·G + k.
    scores = completion_major.T.reshape(-1)
    adv = leave_one_out_advantages(scores, group_size=4).view(3, 4)  # [P, G]
    # completion 0 of prompt 0: 1 - (2+5+8)/3 = -4
    assert abs(adv[0, 0].item() - (-4.0)) < 1e-6
    # completion 2 of prompt 1: 6 - (2+3+9)/3 = 4/3
    assert abs(adv[1, 2].item() - 4.0 / 3.0) < 1e-6
    # and the whole thing against the seed's vectorised form (in its own layout)
    baseline = (completion_major.sum(0) - completion_major) / 3
    torch.testing.assert_close(adv.T, completion_major - baseline)


def test_rloo_identity_equals_scaled_group_mean():
    torch.manual_seed(0)
    for G in (2, 3, 5, 8):
        s = torch.randn(4 * G)
        torch.testing.assert_close(
            leave_one_out_advantages(s, G), G / (G - 1) * group_mean_advantages(s, G)
        )


def test_leave_one_out_group_size_one_raises():
    with pytest.raises(ValueError, match="at least 2 completions"):
        leave_one_out_advantages(torch.tensor([1.0, 2.0]), 1)


def test_batch_not_multiple_of_group_size_raises():
    with pytest.raises(ValueError, match="not a multiple of the group size 4"):
        group_mean_advantages(torch.zeros(6), 4)


def test_unscored_samples_left_out_of_group_statistics():
    s = torch.tensor([1.0, 3.0, 100.0, 0.0])  # G = 4; sample 2 has no score
    valid = torch.tensor([True, True, False, True])
    # mean over {1, 3, 0} = 4/3
    torch.testing.assert_close(
        group_mean_advantages(s, 4, valid), torch.tensor([-1 / 3, 5 / 3, 0.0, -4 / 3])
    )
    # leave-one-out with n = 3: 1 - (3+0)/2 = -0.5, 3 - 0.5 = 2.5, 0 - 2 = -2
    torch.testing.assert_close(
        leave_one_out_advantages(s, 4, valid), torch.tensor([-0.5, 2.5, 0.0, -2.0])
    )


def test_group_std_bessel_and_population():
    s = torch.tensor([1.0, 3.0, 5.0, 7.0])  # G = 4, mean 4, Σ(dev²) = 20
    torch.testing.assert_close(group_std(s, 4, unbiased=True), torch.full((4,), (20 / 3) ** 0.5))
    torch.testing.assert_close(group_std(s, 4, unbiased=False), torch.full((4,), 5**0.5))


def test_group_normalize_hand_computed():
    s = torch.tensor([1.0, -1.0, 0.0, 0.0])  # G = 2: std(1, -1) = sqrt(2) with Bessel
    centred = group_mean_advantages(s, 2)
    out = group_normalize(centred, s, 2, eps=1e-4)
    r2 = 2**0.5
    torch.testing.assert_close(out, torch.tensor([1 / (r2 + 1e-4), -1 / (r2 + 1e-4), 0.0, 0.0]))


def test_seed_004_grpo_advantages_invariant_to_positive_affine_map():
    # rewards {1, -1} and {1, 0} give the same GRPO advantages (up to ε)
    a = torch.tensor([1.0, -1.0, 1.0, -1.0])
    b = torch.tensor([1.0, 0.0, 1.0, 0.0])
    grpo = lambda s: group_normalize(group_mean_advantages(s, 4), s, 4, eps=1e-8)  # noqa: E731
    torch.testing.assert_close(grpo(a), grpo(b))
    torch.manual_seed(0)
    s = torch.randn(24)
    for scale, shift in [(3.0, 7.0), (0.5, -2.0), (10.0, 0.0)]:
        torch.testing.assert_close(grpo(scale * s + shift), grpo(s), rtol=1e-4, atol=1e-5)


def test_group_with_equal_rewards_gives_zero_advantage_no_nan():
    s = torch.tensor([0.7, 0.7, 0.7, 1.0, 0.0, 0.5])  # first group all equal
    out = group_normalize(group_mean_advantages(s, 3), s, 3, eps=1e-4)
    assert torch.isfinite(out).all()
    assert (out[:3] == 0).all()
    # even with ε = 0 there is no NaN: 0 / 0 is avoided because the centred value is exactly 0
    assert torch.isfinite(leave_one_out_advantages(s, 3)).all()


@pytest.mark.parametrize("value", [0.1, -7.3, 100.1, 1000.3])
@pytest.mark.parametrize("G", [3, 6, 7, 8])
def test_constant_group_of_inexact_scores_gives_exactly_zero(value, G):
    # G copies of 0.1 average to 0.1 ± 1 ulp in fp32; that residue over σ + ε (σ itself
    # residue) must not become an advantage: found by an independent check (100.1, G = 6 gave
    # 0.13 before)
    s = torch.cat([torch.full((G,), value), torch.linspace(-1.0, 2.0, G)])
    valid = torch.ones(2 * G, dtype=torch.bool)
    valid[G - 1] = False  # an unscored member does not make the group non-constant
    for mask in (None, valid):
        assert (group_std(s, G, mask)[:G] == 0).all()
        assert (group_mean_advantages(s, G, mask)[:G] == 0).all()
        assert (leave_one_out_advantages(s, G, mask)[:G] == 0).all()
        out = group_normalize(group_mean_advantages(s, G, mask), s, G, mask, eps=1e-6)
        assert (out[:G] == 0).all() and (out[G:] != 0).any()


def test_zero_epsilon_leaves_zero_std_groups_at_zero_not_nan():
    from advantage.core import batch_std_normalize

    s = torch.tensor([0.7, 0.7, 0.7, 1.0, 0.0, 0.5])
    out = group_normalize(group_mean_advantages(s, 3), s, 3, eps=0.0)
    assert (out[:3] == 0).all() and torch.isfinite(out).all()
    torch.testing.assert_close(out[3:], torch.tensor([0.5, -0.5, 0.0]) / 0.5)  # σ = 0.5
    flat = torch.full((4,), 2.5)
    assert (batch_std_normalize(group_mean_advantages(flat, 2), flat, eps=0.0) == 0).all()


def test_group_std_of_huge_fp32_scores_does_not_overflow():
    # (1e20)² overflows fp32: σ was inf and every advantage 0, silently (an adversarial probe)
    s = torch.tensor([1e20, 3e20, 2e20, 0.0], dtype=torch.float32)
    out = group_normalize(group_mean_advantages(s, 4), s, 4)
    expected = (s.double() - s.double().mean()) / s.double().std()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0)


def test_group_mean_advantages_have_zero_mean_and_constant_shift_changes_nothing():
    torch.manual_seed(0)
    s = torch.randn(32)
    adv = group_mean_advantages(s, 8).view(4, 8)
    torch.testing.assert_close(adv.mean(-1), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(group_mean_advantages(s + 5.0, 8), adv.view(-1), atol=1e-5, rtol=0)


def test_ema_baseline_hand_computed_and_state_dict():
    ema = EMABaseline(alpha=0.9)
    # step 1: b = mean = 2 (first batch initialises)
    torch.testing.assert_close(ema(torch.tensor([1.0, 3.0]), 2), torch.tensor([-1.0, 1.0]))
    # step 2: mean 12, b = 0.9·2 + 0.1·12 = 3
    torch.testing.assert_close(ema(torch.tensor([10.0, 14.0]), 2), torch.tensor([7.0, 11.0]))
    restored = EMABaseline(alpha=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.value == pytest.approx(3.0) and restored.alpha == 0.9


def test_moving_average_baseline_hand_computed_and_state_dict():
    ma = MovingAverageBaseline()
    torch.testing.assert_close(ma(torch.tensor([1.0, 3.0]), 1), torch.tensor([-1.0, 1.0]))
    # all scores so far {1, 3, 5, 7}: b = 4
    torch.testing.assert_close(ma(torch.tensor([5.0, 7.0]), 1), torch.tensor([1.0, 3.0]))
    other = MovingAverageBaseline()
    other.load_state_dict(ma.state_dict())
    torch.testing.assert_close(other(torch.tensor([4.0, 4.0]), 1), torch.zeros(2))


def test_baseline_registry_names_and_factory():
    assert set(BASELINES.names()) == {
        "none",
        "critic",
        "group_mean",
        "leave_one_out",
        "moving_average",
        "ema",
    }
    assert make_baseline("ema", ema_alpha=0.5).alpha == 0.5
    s = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(make_baseline("none")(s, 2), s)
    with pytest.raises(ValueError, match="valid names"):
        make_baseline("median")


def test_masked_whiten_hand_computed():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, -5.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    # valid {1, 2, 3, 4}: μ = 2.5, Σ dev² = 5, σ² = 5/3 (Bessel)
    out = masked_whiten(x, m, eps=0.0, unbiased=True)
    sd = (5 / 3) ** 0.5
    expected = torch.tensor([[-1.5 / sd, -0.5 / sd, 0.0], [0.5 / sd, 1.5 / sd, 0.0]])
    torch.testing.assert_close(out, expected)
    out_pop = masked_whiten(x, m, eps=0.0, unbiased=False)
    torch.testing.assert_close(out_pop[0, 0], torch.tensor(-1.5 / 1.25**0.5))
    kept_mean = masked_whiten(x, m, eps=0.0, shift_mean=False)
    torch.testing.assert_close(kept_mean[0, 0], torch.tensor(-1.5 / sd + 2.5))


def test_masked_whiten_empty_rows_and_constant_input_no_nan():
    m = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    out = masked_whiten(torch.tensor([[2.0, 2.0], [float("nan"), 5.0]]), m)
    assert torch.isfinite(out).all() and (out == 0).all()
    empty = masked_whiten(torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.bool))
    assert (empty == 0).all()
