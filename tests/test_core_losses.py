"""Policy/value losses, log-probs, entropy and aggregation on hand-computed tensors."""

import math

import pytest
import torch

from advantage.core import (
    AGGREGATIONS,
    aggregate,
    entropy_from_logits,
    logprobs_from_logits,
    policy_loss,
    value_loss,
)


def test_logprobs_from_logits_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11)
    ids = torch.randint(0, 11, (2, 3))
    expected = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, ids), expected)
    # hand-computed: logits [0, ln 3] → p = [1/4, 3/4]
    two = torch.tensor([[[0.0, math.log(3.0)]]])
    torch.testing.assert_close(
        logprobs_from_logits(two, torch.tensor([[1]])), torch.tensor([[math.log(0.75)]])
    )


def test_entropy_from_logits_hand_computed():
    uniform = torch.zeros(1, 1, 4)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.tensor([[math.log(4.0)]]))
    two = torch.tensor([[[0.0, math.log(3.0)]]])  # p = [1/4, 3/4]
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(entropy_from_logits(two), torch.tensor([[h]]))


def test_entropy_from_logits_precise_on_large_vocabularies():
    # logsumexp(z) - Σ p·z cancels two large terms in fp32 (2e-5 off here); -Σ p·log p does not
    z = 10 * torch.randn(
        2, 8, 32000, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    exact = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    assert (entropy_from_logits(z.float()).double() - exact).abs().max() < 3e-6
    assert entropy_from_logits(z).dtype == torch.float64
    torch.testing.assert_close(entropy_from_logits(z), exact, rtol=0, atol=1e-12)


def test_policy_loss_hand_computed_clip_low_high():
    # ratios [1.5, 0.5, 1.1, 0.9]; ε_low = 0.2, ε_high = 0.28
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.9]])
    logp, old = ratio.log(), torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, -2.0, 2.0]])
    m = torch.ones(1, 4, dtype=torch.bool)
    loss, metrics = policy_loss(logp, old, adv, m, clip_low=0.2, clip_high=0.28)
    # t0: A>0, ρ=1.5 → max(-1.5, -1.28) = -1.28 (clipped high)
    # t1: A<0, ρ=0.5 → max(0.5, 0.8) = 0.8 (clipped low)
    # t2: A<0, ρ=1.1 → max(2.2, 2.2) = 2.2; t3: A>0, ρ=0.9 → max(-1.8, -1.8) = -1.8
    torch.testing.assert_close(loss, torch.tensor([[-1.28, 0.8, 2.2, -1.8]]))
    assert metrics["clip_frac/high"].item() == pytest.approx(0.25)
    assert metrics["clip_frac/low"].item() == pytest.approx(0.25)


def test_dual_clip_bounds_negative_advantages():
    torch.manual_seed(0)
    logp = torch.randn(64, 8) * 3
    old = torch.randn(64, 8)
    adv = torch.randn(64, 8)
    m = torch.ones(64, 8, dtype=torch.bool)
    loss, metrics = policy_loss(logp, old, adv, m, 0.2, 0.2, dual_clip=3.0)
    neg = adv < 0
    assert (loss[neg] <= 3.0 * adv[neg].abs() + 1e-6).all()
    plain, _ = policy_loss(logp, old, adv, m, 0.2, 0.2)
    torch.testing.assert_close(loss[~neg], plain[~neg])  # positive advantages untouched
    assert metrics["clip_frac/dual"] > 0
    # hand-computed: ρ = 10, A = -1 → plain loss 10, dual clip c = 3 → 3
    one, _ = policy_loss(
        torch.tensor([[math.log(10.0)]]),
        torch.zeros(1, 1),
        torch.tensor([[-1.0]]),
        torch.ones(1, 1, dtype=torch.bool),
        dual_clip=3.0,
    )
    torch.testing.assert_close(one, torch.tensor([[3.0]]))
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(logp, old, adv, m, dual_clip=0.5)


def test_ratio_one_gives_plain_policy_gradient():
    torch.manual_seed(0)
    logp = torch.randn(3, 5, requires_grad=True)
    adv = torch.randn(3, 5)
    m = torch.ones(3, 5, dtype=torch.bool)
    loss, _ = policy_loss(logp, logp.detach(), adv, m)
    aggregate(loss, m, "token_mean").backward()
    torch.testing.assert_close(logp.grad, -adv / 15)


def test_masked_tokens_get_zero_loss_and_zero_gradient():
    logp = torch.tensor([[0.1, 5.0, float("nan")]], requires_grad=True)
    m = torch.tensor([[1, 0, 0]], dtype=torch.bool)
    loss, _ = policy_loss(logp, torch.zeros(1, 3), torch.ones(1, 3), m)
    assert loss[0, 1] == 0 and loss[0, 2] == 0
    total = aggregate(loss, m, "token_mean")
    total.backward()
    assert torch.isfinite(total)
    assert logp.grad[0, 1] == 0 and logp.grad[0, 2] == 0 and logp.grad[0, 0] != 0


def test_value_loss_hand_computed():
    v = torch.tensor([[1.0, 0.0]])
    v_old = torch.tensor([[0.5, 0.0]])
    R = torch.tensor([[0.0, 2.0]])
    m = torch.ones(1, 2, dtype=torch.bool)
    loss, metrics = value_loss(v, v_old, R, m, clip=0.2)
    # t0: V_clip = 0.5 + 0.2 = 0.7; max(1², 0.7²) = 1 → 0.5;  t1: 0.5·4 = 2
    torch.testing.assert_close(loss, torch.tensor([[0.5, 2.0]]))
    # with V moving away, the clipped term dominates: V = 0.0, V_old = 1.0, R = 2 → V_clip 0.8
    loss2, _ = value_loss(
        torch.tensor([[0.0]]),
        torch.tensor([[1.0]]),
        torch.tensor([[2.0]]),
        torch.ones(1, 1, dtype=torch.bool),
        clip=0.2,
    )
    torch.testing.assert_close(loss2, torch.tensor([[0.5 * 4.0]]))
    unclipped, _ = value_loss(v, v_old, R, m, clip=None)
    torch.testing.assert_close(unclipped, torch.tensor([[0.5, 2.0]]))
    assert "value_clip_frac" in metrics


def test_aggregations_hand_computed():
    L = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    # Σ L·m = 10 + 30 = 40 over 6 tokens
    assert aggregate(L, m, "token_mean").item() == pytest.approx(40 / 6)
    # per-row means 2.5, 15, 0 (empty row counts in S = 3)
    assert aggregate(L, m, "seq_mean_token_mean").item() == pytest.approx(17.5 / 3)
    # per-row sums 10, 30, 0
    assert aggregate(L, m, "seq_mean_token_sum").item() == pytest.approx(40 / 3)
    # Dr. GRPO: 40 / (3·T_max); T_max defaults to T = 4, or the generation budget
    assert aggregate(L, m, "seq_mean_token_sum_norm").item() == pytest.approx(40 / 12)
    assert aggregate(L, m, "seq_mean_token_sum_norm", max_len=8).item() == pytest.approx(40 / 24)
    assert set(AGGREGATIONS.names()) == {
        "token_mean",
        "seq_mean_token_mean",
        "seq_mean_token_sum",
        "seq_mean_token_sum_norm",
    }


def test_all_empty_mask_gives_zero_not_nan():
    L = torch.randn(2, 3)
    m = torch.zeros(2, 3, dtype=torch.bool)
    for mode in AGGREGATIONS:
        out = aggregate(L, m, mode)
        assert out.item() == 0.0, mode


@pytest.mark.parametrize(
    "mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
)
def test_micro_batches_with_global_counts_equal_full_batch(mode):
    torch.manual_seed(0)
    B, T = 8, 6
    w = torch.randn(B, T, requires_grad=True)
    m = torch.rand(B, T) > 0.3
    full = aggregate(w.square(), m, mode, max_len=10)
    (g_full,) = torch.autograd.grad(full, w)
    num_tokens, num_seqs = m.sum(), B
    total = 0.0
    for rows in (slice(0, 3), slice(3, 5), slice(5, 8)):  # uneven micro-batches
        total = total + aggregate(
            w[rows].square(), m[rows], mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=10
        )
    (g_micro,) = torch.autograd.grad(total, w)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(g_micro, g_full)
    if mode == "token_mean":  # without the global count the micro-batch mean is wrong
        naive = sum(aggregate(w[r].square(), m[r], mode) for r in (slice(0, 3), slice(3, 8))) / 2
        assert not torch.allclose(naive, full)


def test_policy_objective_composes_clip_kl_entropy_and_tis():
    from advantage.core import kl_k3, policy_objective

    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = logp.detach()  # ρ = 1
    ref = torch.tensor([[-1.5, -2.0]])
    adv = torch.tensor([[2.0, -1.0]])
    ent = torch.tensor([[0.5, 0.25]])
    engine = torch.tensor([[-1.0, -2.0 - math.log(3.0)]])  # π_train/π_engine = [1, 3]
    m = torch.ones(1, 2, dtype=torch.bool)
    loss, metrics = policy_objective(
        logp,
        old,
        adv,
        m,
        ref_logprobs=ref,
        kl_coef=0.1,
        kl_estimator="k3",
        entropy=ent,
        entropy_coef=0.01,
        engine_logprobs=engine,
        correction="tis",
        correction_high=2.0,
    )
    # L = w·(-A·ρ) + β·k3 - c·H, w = min([1, 3], 2) = [1, 2]
    k3 = kl_k3(logp.detach(), ref)
    expected = torch.tensor([[1 * -2.0, 2 * 1.0]]) + 0.1 * k3 - 0.01 * ent
    torch.testing.assert_close(loss.detach(), expected)
    assert metrics["rollout/is_weight_mean"].item() == pytest.approx(1.5)
    assert metrics["rollout/logprob_gap"].item() == pytest.approx(math.log(3.0) / 2)
    # the KL term carries gradient: d(β·k3)/dlogp = β·(1 - exp(-lr)), lr = logp - ref
    loss.sum().backward()
    lr = torch.tensor([0.5, 0.0])
    torch.testing.assert_close(logp.grad[0], torch.tensor([-2.0, 2.0]) + 0.1 * (1 - torch.exp(-lr)))
