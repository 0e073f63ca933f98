"""Policy objectives (core/objectives.py): hand-computed tensors and properties."""

import math

import pytest
import torch

from advantage.core import aggregate, policy_loss
from advantage.core.objectives import OBJECTIVES, sequence_log_ratio

LN = math.log


def _random(B=6, T=5, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths.unsqueeze(-1)
    old = -torch.rand(B, T, generator=g) * 2
    logp = (old + torch.randn(B, T, generator=g) * spread).requires_grad_(True)
    adv = torch.randn(B, T, generator=g)
    return logp, old, adv, mask


def test_registry_lists_valid_names():
    assert set(OBJECTIVES) == {"ppo_clip", "gspo", "gspo_token", "cispo", "pg"}
    with pytest.raises(ValueError, match="valid names: cispo, gspo, gspo_token, pg, ppo_clip"):
        OBJECTIVES["gpso"]


def test_ppo_clip_is_policy_loss():
    logp, old, adv, mask = _random()
    ours, m1 = OBJECTIVES["ppo_clip"](logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    ref, m2 = policy_loss(logp, old, adv, mask, 0.2, 0.28)
    torch.testing.assert_close(ours, ref)
    assert m1.keys() == m2.keys()


def _gspo_example():
    # row 0: valid token ratios [2, 0.72], 3rd token masked (garbage) → s_0 = sqrt(2·0.72) = 1.2
    # row 1: token ratios [0.5, 0.5, 2] → s_1 = (0.5)^(1/3) = 0.7937
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]])
    ratios = torch.tensor([[2.0, 0.72, 1.0], [0.5, 0.5, 2.0]])
    logp = (old + ratios.log()).clone()
    logp[0, 2] = 7.0  # padding value: must not count
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([1.0, -2.0])
    return logp.requires_grad_(True), old, adv, mask


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_gspo_hand_computed(name):
    logp, old, adv, mask = _gspo_example()
    torch.testing.assert_close(
        sequence_log_ratio(logp, old, mask), torch.tensor([LN(1.2), LN(0.5) / 3])
    )
    loss, metrics = OBJECTIVES[name](logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # row 0: A = 1,  s = 1.2 ∈ [0.8, 1.28]   → max(-1.2, -1.2) = -1.2 on both valid tokens
    # row 1: A = -2, s = 0.7937 < 0.8       → max(1.5874, 0.8·2 = 1.6) = 1.6 (clipped low)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -1.2, 0.0], [1.6, 1.6, 1.6]]))
    assert metrics["clip_frac/low"].item() == pytest.approx(3 / 5)  # row 1's 3 of 5 valid tokens
    assert metrics["clip_frac/high"].item() == 0.0
    # seq_mean_token_mean = (-1.2 + 1.6)/2; row 1 is clipped (no gradient); row 0:
    # ∂/∂logp_t of (1/2)·(-A·s_0) = -(1/2)·s_0/|y_0| = -(1/2)·(1.2/2) = -0.3   (gspo)
    # gspo_token: (1/2)·(1/2)·Σ_t -A·s_{0,t}, ∂s_{0,t}/∂logp_t = s_0 → -(1/4)·1.2 = -0.3
    aggregate(loss, mask, "seq_mean_token_mean").backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.3, -0.3, 0.0], [0.0, 0.0, 0.0]]))


def test_gspo_dual_clip_bounds_negative_advantages():
    # one token, ratio 10, A = -1: clipped loss max(10, 1.2) = 10, dual clip c = 3 → 3
    loss, metrics = OBJECTIVES["gspo"](
        torch.tensor([[LN(10.0)]]),
        torch.zeros(1, 1),
        torch.tensor([-1.0]),
        torch.ones(1, 1, dtype=torch.bool),
        dual_clip=3.0,
    )
    torch.testing.assert_close(loss, torch.tensor([[3.0]]))
    assert metrics["clip_frac/dual"].item() == 1.0


def test_cispo_hand_computed():
    # old = ln 0.5; ratios [1.5, 0.5, 1.1] → logp = ln [0.75, 0.25, 0.55]; ε_low 0.2, ε_high 0.28
    old = torch.full((1, 3), LN(0.5))
    logp = torch.tensor([[LN(0.75), LN(0.25), LN(0.55)]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, metrics = OBJECTIVES["cispo"](logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # weights r̂ = clip(ρ, 0.8, 1.28) = [1.28, 0.8, 1.1]; L = -r̂·A·logp
    expected = [-1.28 * 1 * LN(0.75), -0.8 * -1 * LN(0.25), -1.1 * 2 * LN(0.55)]
    torch.testing.assert_close(loss, torch.tensor([expected]))  # [0.3682, -1.1090, 1.3152]
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.28, 0.8, -2.2]]))  # -r̂·A
    assert metrics["clip_frac/low"].item() == pytest.approx(1 / 3)
    assert metrics["clip_frac/high"].item() == pytest.approx(1 / 3)


def test_pg_hand_computed():
    logp = torch.tensor([[LN(0.5), LN(0.25)]], requires_grad=True)
    old = torch.zeros(1, 2)
    adv = torch.tensor([2.0])
    loss, _ = OBJECTIVES["pg"](logp, old, adv, torch.tensor([[True, False]]))
    torch.testing.assert_close(loss, torch.tensor([[-2.0 * LN(0.5), 0.0]]))  # 1.3863, masked 0
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, 0.0]]))


def test_approx_kl_is_the_same_number_for_every_objective():
    logp, old, adv, mask = _random()
    kls = [OBJECTIVES[n](logp, old, adv, mask)[1]["approx_kl"] for n in OBJECTIVES]
    for kl in kls:
        torch.testing.assert_close(kl, kls[0])
    assert kls[0] > 0


@pytest.mark.parametrize("name", ["cispo", "pg"])
def test_dual_clip_rejected_where_it_has_no_meaning(name):
    logp, old, adv, mask = _random()
    with pytest.raises(ValueError, match="dual_clip"):
        OBJECTIVES[name](logp, old, adv, mask, dual_clip=3.0)


# --- properties -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OBJECTIVES.names()))
def test_masked_tokens_get_zero_loss_and_zero_gradient(name):
    logp, old, adv, mask = _random(spread=1.0)
    loss, _ = OBJECTIVES[name](logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert (loss[~mask] == 0).all()
    loss.sum().backward()
    assert (logp.grad[~mask] == 0).all()
    assert (logp.grad[mask] != 0).any()


@pytest.mark.parametrize("name", sorted(OBJECTIVES.names()))
def test_extra_padding_changes_nothing(name):
    logp, old, adv, mask = _random()
    loss, _ = OBJECTIVES[name](logp, old, adv, mask)
    pad = lambda x, v: torch.cat([x, torch.full((x.shape[0], 3), v, dtype=x.dtype)], -1)  # noqa: E731
    padded, _ = OBJECTIVES[name](
        pad(logp.detach(), 4.0), pad(old, -9.0), pad(adv, 5.0), pad(mask, False)
    )
    torch.testing.assert_close(padded[:, : logp.shape[1]], loss.detach())


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_gspo_on_length_one_sequences_is_token_ppo(dual_clip):
    logp, old, adv, _ = _random(B=32, T=1, spread=0.5)
    mask = torch.ones(32, 1, dtype=torch.bool)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip)
    for name in ("gspo", "gspo_token"):
        ours, _ = OBJECTIVES[name](logp, old, adv, mask, **kw)
        (g_ours,) = torch.autograd.grad(ours.sum(), logp)
        ref, _ = OBJECTIVES["ppo_clip"](logp, old, adv, mask, **kw)
        (g_ref,) = torch.autograd.grad(ref.sum(), logp)
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(g_ours, g_ref)
        assert (g_ref != 0).any() and (g_ref == 0).any()  # both clipped and unclipped tokens


def test_gspo_token_has_gspo_value_and_per_token_gradient():
    logp, old, adv, mask = _random(B=16, T=6, spread=0.2)
    kw = dict(clip_low=0.1, clip_high=0.1)
    seq, m_seq = OBJECTIVES["gspo"](logp, old, adv, mask, **kw)
    tok, m_tok = OBJECTIVES["gspo_token"](logp, old, adv, mask, **kw)
    torch.testing.assert_close(tok, seq)
    assert m_tok.keys() == m_seq.keys()
    for key in m_seq:
        torch.testing.assert_close(m_tok[key], m_seq[key])
    # with token advantages the gradients differ (GSPO-token steers each token) ...
    (g_seq,) = torch.autograd.grad(seq.sum(), logp)
    (g_tok,) = torch.autograd.grad(tok.sum(), logp)
    assert not torch.allclose(g_seq, g_tok)
    # ... with one advantage per sequence they are the same (the paper's remark)
    seq_adv = adv[:, 0]
    grads = []
    for name in ("gspo", "gspo_token"):
        loss, _ = OBJECTIVES[name](logp, old, seq_adv, mask, **kw)
        grads.append(torch.autograd.grad(aggregate(loss, mask, "seq_mean_token_mean"), logp)[0])
    torch.testing.assert_close(grads[0], grads[1])


def test_cispo_gradient_is_its_formula():
    logp, old, adv, mask = _random(B=16, T=6, spread=0.5)
    loss, _ = OBJECTIVES["cispo"](logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    # closed form: ∇(-sg(clip ρ)·A·logp) = -clip(ρ, 0.8, 1.28)·A on valid tokens
    ratio = torch.exp(logp.detach() - old)
    expected = torch.where(mask, -ratio.clamp(0.8, 1.28) * adv, 0.0)
    torch.testing.assert_close(grad, expected)
    assert ((ratio < 0.8) & mask).any() and ((ratio > 1.28) & mask).any()  # clipping exercised


def test_pg_gradient_is_ppo_clip_gradient_at_ratio_one():
    logp, _, adv, mask = _random(B=16, T=6)
    old = logp.detach()  # one epoch, one minibatch: ρ = 1
    grads = []
    for name in ("pg", "ppo_clip", "cispo", "gspo_token"):
        loss, _ = OBJECTIVES[name](logp, old, adv, mask)
        grads.append(torch.autograd.grad(aggregate(loss, mask, "token_mean"), logp)[0])
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])
    # hand check: -A / n on valid tokens
    expected = torch.where(mask, -adv / mask.sum(), 0.0)
    torch.testing.assert_close(grads[0], expected)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_masked_positions_never_reach_a_metric_or_a_valid_gradient(name):
    """NaN or inf at masked positions (log-probs, old log-probs, advantages): ppo_clip's
    approx_kl multiplied them by the mask (NaN), and GSPO's per-sequence ratio carried a NaN
    advantage's 0·NaN into every valid token's gradient (a numerics probe)."""
    logp, old, adv, mask = _random()
    clean = [t.detach().clone() for t in (logp, old, adv)]
    with torch.no_grad():
        old[~mask], adv[~mask] = float("nan"), float("inf")
    poisoned = logp.detach().clone()
    poisoned[~mask] = float("nan")
    results = []
    for lp, o, a in [(clean[0], *clean[1:]), (poisoned, old, adv)]:
        lp = lp.requires_grad_(True)
        loss, metrics = OBJECTIVES[name](lp, o, a, mask)
        aggregate(loss, mask, "token_mean").backward()
        results.append((loss.detach(), metrics, lp.grad))
    (loss_a, metrics_a, grad_a), (loss_b, metrics_b, grad_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    for key, value in metrics_a.items():
        torch.testing.assert_close(metrics_b[key], value, msg=key)
    torch.testing.assert_close(grad_b[mask], grad_a[mask])
