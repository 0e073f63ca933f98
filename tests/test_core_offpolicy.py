"""Engine/trainer off-policy correction (core/offpolicy.py): hand-computed tensors, properties."""

import math

import pytest
import torch

from advantage.core.offpolicy import CORRECTION_LEVELS, CORRECTION_MODES, rollout_correction

LN = math.log


def _example():
    # token ratios r = π_old/μ: row 0 [2, 0.5, 4] all valid (product 4, geometric mean 4^(1/3));
    # row 1 [1.5] then two masked tokens whose log-ratio (30) must never count
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]])
    log_r = torch.tensor([[LN(2.0), LN(0.5), LN(4.0)], [LN(1.5), 30.0, 30.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    return old, old - log_r, mask


def _run(**kw):
    old, engine, mask = _example()
    return rollout_correction(old, engine, mask, **kw)


def test_no_correction():
    w, keep, m = _run(mode="none")
    _, _, mask = _example()
    torch.testing.assert_close(w, mask.float())
    assert torch.equal(keep, mask)
    # gap = (ln 2 + ln 2 + ln 4 + ln 1.5)/4 = 0.7945; ratio mean = (2 + 0.5 + 4 + 1.5)/4 = 2
    assert m["rollout/logprob_gap"].item() == pytest.approx((4 * LN(2) + LN(1.5)) / 4, rel=1e-6)
    assert m["rollout/is_ratio_mean"].item() == pytest.approx(2.0)
    assert m["rollout/is_weight_mean"].item() == pytest.approx(1.0)


def test_token_tis_hand_computed():
    w, keep, m = _run(mode="tis", level="token", high=3.0)
    # min(r, 3): [2, 0.5, 3], [1.5]; one of 4 valid tokens capped
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 3.0], [1.5, 0.0, 0.0]]))
    assert torch.equal(keep, _example()[2])
    assert m["rollout/is_capped_frac"].item() == pytest.approx(0.25)
    assert m["rollout/is_weight_mean"].item() == pytest.approx((2 + 0.5 + 3 + 1.5) / 4)
    w, _, m = _run(mode="tis", level="token", low=0.6, high=3.0)  # OpenRLHF's two-sided clamp
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.6, 3.0], [1.5, 0.0, 0.0]]))
    assert m["rollout/is_capped_frac"].item() == pytest.approx(0.5)


def test_token_mis_hand_computed():
    w, keep, m = _run(mode="mis", level="token", low=0.6, high=3.0)
    # 0.5 < 0.6 and 4 > 3 are dropped; kept tokens keep their ratio as weight
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.0, 0.0]]))
    assert keep.tolist() == [[True, False, False], [True, False, False]]
    assert m["rollout/is_masked_frac"].item() == pytest.approx(2 / 4)
    assert m["rollout/is_masked_seq_frac"].item() == pytest.approx(1 / 2)


def test_sequence_levels_hand_computed():
    # sequence ratio = product: row 0: 2·0.5·4 = 4, row 1: 1.5
    w, keep, m = _run(mode="tis", level="sequence", high=3.0)
    torch.testing.assert_close(w, torch.tensor([[3.0, 3.0, 3.0], [1.5, 0.0, 0.0]]))
    assert m["rollout/is_capped_frac"].item() == pytest.approx(3 / 4)  # row 0's 3 tokens
    w, keep, m = _run(mode="mis", level="sequence", low=0.5, high=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]]))
    assert keep.tolist() == [[False, False, False], [True, False, False]]
    assert m["rollout/is_masked_frac"].item() == pytest.approx(3 / 4)
    assert m["rollout/is_masked_seq_frac"].item() == pytest.approx(1 / 2)
    # geometric mean: row 0: 4^(1/3) = 1.5874 ∈ [0.5, 2] → kept
    w, keep, _ = _run(mode="mis", level="sequence_mean", low=0.5, high=2.0)
    g = 4.0 ** (1 / 3)
    torch.testing.assert_close(w, torch.tensor([[g, g, g], [1.5, 0.0, 0.0]]))
    assert torch.equal(keep, _example()[2])


def test_log_ratio_clamped_to_20():
    old = torch.zeros(1, 2)
    engine = torch.tensor([[-30.0, -30.0]])  # token log-ratio 30 (clamped), sequence sum 60
    mask = torch.ones(1, 2, dtype=torch.bool)
    for level in ("token", "sequence"):
        w, _, _ = rollout_correction(old, engine, mask, mode="tis", level=level, high=math.inf)
        torch.testing.assert_close(w, torch.full((1, 2), math.exp(20.0)))


def test_names_and_bounds_are_checked():
    old, engine, mask = _example()
    assert set(CORRECTION_MODES) == {"none", "tis", "mis"}
    assert set(CORRECTION_LEVELS) == {"token", "sequence", "sequence_mean"}
    with pytest.raises(ValueError, match="valid names: mis, none, tis"):
        rollout_correction(old, engine, mask, mode="icepop")
    with pytest.raises(ValueError, match="valid names: sequence, sequence_mean, token"):
        rollout_correction(old, engine, mask, mode="tis", level="seq")
    with pytest.raises(ValueError, match=r"low=3\.0 must not exceed high=2\.0"):
        rollout_correction(old, engine, mask, mode="mis", low=3.0, high=2.0)


# --- properties -------------------------------------------------------------------------------


def _random(B=8, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths.unsqueeze(-1)
    old = -torch.rand(B, T, generator=g) * 2
    engine = old + torch.randn(B, T, generator=g) * 0.3
    return old, engine, mask


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_mean"])
def test_mis_with_bounds_including_every_ratio_drops_nothing(level):
    old, engine, mask = _random()
    plain, keep_plain, _ = rollout_correction(old, engine, mask, mode="tis", level=level)
    w, keep, m = rollout_correction(old, engine, mask, mode="mis", level=level, low=1e-6, high=1e6)
    assert torch.equal(keep, mask) and torch.equal(keep_plain, mask)
    torch.testing.assert_close(w, plain)  # the plain (untruncated) IS weight
    assert m["rollout/is_masked_frac"].item() == 0.0
    _, keep_tight, _ = rollout_correction(
        old, engine, mask, mode="mis", level=level, low=0.9, high=1.1
    )
    assert (keep_tight != mask).any()  # the bounds can drop, so the check above can fail


def test_sequence_tis_with_infinite_cap_is_the_sequence_ratio():
    old, engine, mask = _random()
    w, _, m = rollout_correction(old, engine, mask, mode="tis", level="sequence", high=math.inf)
    seq_ratio = torch.exp(((old - engine) * mask).sum(-1))  # Π_t π_old/μ over valid tokens
    torch.testing.assert_close(w, torch.where(mask, seq_ratio.unsqueeze(-1), 0.0))
    assert m["rollout/is_capped_frac"].item() == 0.0


@pytest.mark.parametrize("mode", ["none", "tis", "mis"])
@pytest.mark.parametrize("level", ["token", "sequence", "sequence_mean"])
def test_identical_logprobs_need_no_correction(mode, level):
    old, _, mask = _random()
    w, keep, _ = rollout_correction(old, old.clone(), mask, mode=mode, level=level, low=0.5, high=2)
    torch.testing.assert_close(w, mask.float())
    assert torch.equal(keep, mask)


def test_weights_are_detached():
    old, engine, mask = _random()
    old = old.requires_grad_(True)
    w, _, _ = rollout_correction(old, engine, mask, mode="tis", high=2.0)
    assert not w.requires_grad
