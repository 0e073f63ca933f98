"""Our objectives, corrections and reward combinations equal the peers' own formulas.

Each reference below is written here, in plain torch, from the formula as read in the peer's
code (repository, path and function cited above it; versions read: verl b178a3c, TRL f2cd577,
OpenRLHF 3c3be62). Settings are aligned; random inputs; ≤ 1e-6.
"""

import math

import torch

from advantage.core import aggregate, group_mean_advantages
from advantage.core.normalize import batch_std_normalize
from advantage.core.objectives import OBJECTIVES
from advantage.core.offpolicy import rollout_correction
from advantage.core.scores import combine_rewards

TOL = dict(rtol=1e-6, atol=1e-6)
LO, HI = 0.2, 0.28


def _batch(B=8, T=7, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths.unsqueeze(-1)
    old = -torch.rand(B, T, generator=g) * 2
    logp = (old + torch.randn(B, T, generator=g) * spread).requires_grad_(True)
    engine = old + torch.randn(B, T, generator=g) * 0.2
    seq_adv = torch.randn(B, generator=g)
    return logp, old, engine, seq_adv, mask


def _ours(name, logp, old, adv, mask, agg, **kw):
    loss, metrics = OBJECTIVES[name](logp, old, adv, mask, clip_low=LO, clip_high=HI, **kw)
    total = aggregate(loss, mask, agg)
    (grad,) = torch.autograd.grad(total, logp)
    return loss, total, grad, metrics


# --- verl ---------------------------------------------------------------------------------------


def _verl_masked_mean(x, m, axis=None):
    # verl/utils/torch_functional.py masked_mean: Σ x·m / (Σ m + 1e-8)
    return (torch.where(m, x, 0.0)).sum(axis) / (m.sum(axis) + 1e-8)


def _verl_seq_mean_token_mean(loss, m):
    # verl/trainer/ppo/core_algos.py agg_loss("seq-mean-token-mean"), one rank, no global sizes:
    # per-sequence Σ L·m / (Σ m + 1e-8), summed over non-empty sequences / their number
    per_seq = torch.where(m, loss, 0.0).sum(-1) / (m.sum(-1) + 1e-8)
    nonempty = m.sum(-1) > 0
    return (per_seq * nonempty).sum() / nonempty.sum()


def test_gspo_token_equals_verl_compute_policy_loss_gspo():
    # verl/trainer/ppo/core_algos.py compute_policy_loss_gspo: token advantages [B, T],
    # log s_{i,t} = logp - sg(logp) + sg(mean_t m·(logp - old)), clamped above at 10;
    # L = max(-A·s, -A·clip(s, 1-lo, 1+hi)); aggregation forced to seq-mean-token-mean
    logp, old, _, _, mask = _batch()
    adv = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
    lr = logp - old
    seq = torch.where(mask, lr, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)
    log_s = (logp - logp.detach() + seq.detach().unsqueeze(-1)).clamp(max=10.0)
    s = torch.exp(log_s)
    l1, l2 = -adv * s, -adv * s.clamp(1 - LO, 1 + HI)
    verl_loss = torch.maximum(l1, l2)
    verl_total = _verl_seq_mean_token_mean(verl_loss, mask)
    (verl_grad,) = torch.autograd.grad(verl_total, logp)
    verl_clipfrac = _verl_masked_mean((l2 > l1).float(), mask)

    loss, total, grad, metrics = _ours("gspo_token", logp, old, adv, mask, "seq_mean_token_mean")
    torch.testing.assert_close(loss[mask], verl_loss[mask].detach(), **TOL)
    torch.testing.assert_close(total, verl_total.detach(), **TOL)
    torch.testing.assert_close(grad, verl_grad, **TOL)
    # verl's one clip fraction = our low + high (l2 > l1 ⇔ clipped on the side A pushes to)
    ours_clipfrac = metrics["clip_frac/low"] + metrics["clip_frac/high"]
    torch.testing.assert_close(ours_clipfrac, verl_clipfrac, **TOL)
    assert 0 < verl_clipfrac < 1


def test_cispo_equals_verl_compute_policy_loss_cispo():
    # verl/trainer/ppo/core_algos.py compute_policy_loss_cispo: ρ = exp(clamp(logp - old, ±20)),
    # L = -sg(clip(ρ, 1-lo, 1+hi))·A·logp, clip fraction = mean(ρ ≠ clip(ρ)), token-mean
    logp, old, _, seq_adv, mask = _batch(spread=0.5)
    adv = seq_adv.unsqueeze(-1).expand_as(logp)
    ratio = torch.exp((logp - old).clamp(-20, 20))
    clipped = ratio.clamp(1 - LO, 1 + HI)
    verl_loss = -clipped.detach() * adv * logp
    verl_total = torch.where(mask, verl_loss, 0.0).sum() / mask.sum()
    (verl_grad,) = torch.autograd.grad(verl_total, logp)
    verl_clipfrac = _verl_masked_mean((ratio != clipped).float(), mask)

    loss, total, grad, metrics = _ours("cispo", logp, old, seq_adv, mask, "token_mean")
    torch.testing.assert_close(loss[mask], verl_loss[mask].detach(), **TOL)
    torch.testing.assert_close(total, verl_total.detach(), **TOL)
    torch.testing.assert_close(grad, verl_grad, **TOL)
    ours_clipfrac = metrics["clip_frac/low"] + metrics["clip_frac/high"]
    torch.testing.assert_close(ours_clipfrac, verl_clipfrac, **TOL)
    assert 0 < verl_clipfrac < 1


def test_tis_equals_verl_compute_rollout_correction_weights():
    # verl/trainer/ppo/rollout_corr_helper.py compute_rollout_correction_weights:
    # log r = old - rollout; token: exp(clamp(log r, ±20)); sequence: exp(clamp(Σ m·log r, ±20))
    # broadcast; × mask; truncated above at rollout_is_threshold; detached
    _, old, engine, _, mask = _batch()
    threshold = 1.5
    log_r = old - engine
    for level in ("token", "sequence"):
        if level == "token":
            w = torch.exp(log_r.clamp(-20, 20))
        else:
            w = torch.exp(torch.where(mask, log_r, 0.0).sum(-1, keepdim=True).clamp(-20, 20))
            w = w.expand_as(log_r)
        verl_w = (w * mask).clamp(max=threshold)
        ours, keep, _ = rollout_correction(
            old, engine, mask, mode="tis", level=level, high=threshold
        )
        torch.testing.assert_close(ours, verl_w, **TOL)
        assert torch.equal(keep, mask)
        assert (verl_w[mask] == threshold).any() and (verl_w[mask] < threshold).any()


def test_mis_keep_mask_equals_verl_compute_rollout_rejection_mask():
    # verl/trainer/ppo/rollout_corr_helper.py compute_rollout_rejection_mask, k1 options with a
    # "lower_upper" threshold: statistic k1 = -clamp(log r, ±20) (token), its masked sum
    # (seq_sum_k1) or masked mean (seq_mean_k1, Σ/(n + 1e-8)); kept iff
    # ln(lower) ≤ statistic ≤ ln(upper), i.e. lower ≤ 1/r ≤ upper: the bounds apply to 1/r,
    # so verl's "0.8_1.5" is our low = 1/1.5, high = 1/0.8 (the same set when lower = 1/upper)
    _, old, engine, _, mask = _batch(B=32, T=5)
    lower, upper = 0.8, 1.5
    k1 = -(old - engine).clamp(-20, 20)
    stats = {
        "token": k1,
        "sequence": torch.where(mask, k1, 0.0).sum(-1, keepdim=True).expand_as(k1),
        "sequence_mean": _verl_masked_mean(k1, mask, -1).unsqueeze(-1).expand_as(k1),
    }
    for level, stat in stats.items():
        verl_keep = mask & (stat >= math.log(lower)) & (stat <= math.log(upper))
        _, keep, _ = rollout_correction(
            old, engine, mask, mode="mis", level=level, low=1 / upper, high=1 / lower
        )
        assert torch.equal(keep, verl_keep), level
        assert (verl_keep != mask).any(), level  # some are dropped, so the check can fail


# --- TRL ----------------------------------------------------------------------------------------


def test_gspo_equals_trl_sequence_importance_sampling():
    # trl/trainer/grpo_trainer.py GRPOTrainer._compute_loss, importance_sampling_level="sequence",
    # loss_type="grpo", beta=0: log w = Σ m·(logp - old) / clamp(Σ m, 1) of shape (B, 1),
    # L = -min(w·A, clip(w, 1-ε_low, 1+ε_high)·A), A (B, 1);
    # loss = mean_i (Σ_t L·m / clamp(Σ_t m, 1))
    logp, old, _, seq_adv, mask = _batch(B=32, spread=0.5)
    m = mask.float()
    log_w = ((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    w = torch.exp(log_w).unsqueeze(-1)
    a = seq_adv.unsqueeze(1)
    per_token = -torch.min(w * a, w.clamp(1 - LO, 1 + HI) * a)
    trl_total = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    (trl_grad,) = torch.autograd.grad(trl_total, logp)

    _, total, grad, metrics = _ours("gspo", logp, old, seq_adv, mask, "seq_mean_token_mean")
    torch.testing.assert_close(total, trl_total.detach(), **TOL)
    torch.testing.assert_close(grad, trl_grad, **TOL)
    assert metrics["clip_frac/low"] + metrics["clip_frac/high"] > 0  # clipping exercised


def test_cispo_equals_trl_cispo_with_an_absolute_cap():
    # trl/trainer/grpo_trainer.py GRPOTrainer._compute_loss, loss_type="cispo":
    # L = -sg(min(ρ, epsilon_high))·A·logp (ε_high is the cap itself, e.g. 5; no lower bound),
    # loss = Σ L·m / num_items_in_batch  → ours with clip_low = 1, clip_high = cap - 1
    logp, old, _, seq_adv, mask = _batch(spread=0.8)
    cap = 1.6
    ratio = torch.exp(logp - old)
    trl_loss = -ratio.clamp(max=cap).detach() * seq_adv.unsqueeze(1) * logp
    trl_total = (trl_loss * mask).sum() / mask.sum()
    (trl_grad,) = torch.autograd.grad(trl_total, logp)

    loss, _ = OBJECTIVES["cispo"](logp, old, seq_adv, mask, clip_low=1.0, clip_high=cap - 1)
    total = aggregate(loss, mask, "token_mean")
    (grad,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, trl_total.detach(), **TOL)
    torch.testing.assert_close(grad, trl_grad, **TOL)
    assert (ratio[mask] > cap).any()


def test_corrections_equal_trl_vllm_importance_sampling_mode():
    # trl/trainer/grpo_trainer.py GRPOTrainer._generate_and_score_completions:
    # d = (old - sampling)·m; sequence_* modes: Σ_t d (B, 1); r = exp(d) (no clamp);
    # *_truncate: clamp(r, clip_min, clip_max); *_mask: r set to 0 outside [clip_min, clip_max]
    # (None = unbounded); the loss is then multiplied by r
    _, old, engine, _, mask = _batch(B=32, T=5)
    clip_min, clip_max = 0.7, 1.4
    d = (old - engine) * mask
    for trl_mode, (mode, level) in {
        "token_truncate": ("tis", "token"),
        "sequence_truncate": ("tis", "sequence"),
        "token_mask": ("mis", "token"),
        "sequence_mask": ("mis", "sequence"),
    }.items():
        r = torch.exp(d.sum(-1, keepdim=True) if trl_mode.startswith("sequence") else d)
        if trl_mode.endswith("truncate"):
            trl_w = r.clamp(min=clip_min, max=clip_max)
        else:
            trl_w = r.masked_fill((r < clip_min) | (r > clip_max), 0.0)
        trl_w = trl_w.expand_as(d)
        w, keep, _ = rollout_correction(
            old, engine, mask, mode=mode, level=level, low=clip_min, high=clip_max
        )
        torch.testing.assert_close(w[mask], trl_w[mask], **TOL, msg=trl_mode)
        if mode == "mis":
            assert torch.equal(keep, mask & (trl_w != 0)), trl_mode
            assert (keep != mask).any(), trl_mode
    # TRL's defaults: clip_min None, clip_max 3 (sequence_mask)
    r = torch.exp(d.sum(-1, keepdim=True)).expand_as(d)
    trl_w = r.masked_fill(r > 3.0, 0.0)
    w, _, _ = rollout_correction(old, engine, mask, mode="mis", level="sequence", high=3.0)
    torch.testing.assert_close(w[mask], trl_w[mask], **TOL)


def _trl_nanstd(x, dim=None, keepdim=False):
    # trl/trainer/utils.py nanstd: sqrt(nanmean((x - nanmean x)²)·n/(n-1)), NaN when n ≤ 1
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    n = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    corr = torch.where(n > 1, n / (n - 1), torch.full_like(var, float("nan")))
    std = torch.sqrt(var * corr)
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


def _trl_rewards(B=32, F=3, G=4, seed=0):
    # rewards_per_func (B, F) with NaN for None: one sample nobody scores, one function that
    # scores only one member of a group (nanstd → NaN there)
    g = torch.Generator().manual_seed(seed)
    rpf = torch.randn(B, F, generator=g) * 2 + 1
    rpf[torch.rand(B, F, generator=g) < 0.25] = float("nan")
    rpf[0] = float("nan")
    rpf[4:8, 2] = torch.tensor([0.7, float("nan"), float("nan"), float("nan")])
    return rpf, torch.tensor([1.0, 0.5, 2.0]), G


def test_trl_normalize_then_sum():
    # trl/trainer/grpo_trainer.py GRPOTrainer._generate_and_score_completions,
    # multi_objective_aggregation="normalize_then_sum": per function and group
    # (r - nanmean)/(nanstd + 1e-4), weighted nansum, unscorable rows NaN, then over the batch
    # (s - nanmean s)/(nanstd s + 1e-4), NaN → 0
    rpf, w, G = _trl_rewards()
    F = rpf.shape[1]
    grouped = rpf.view(-1, G, F)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = _trl_nanstd(grouped, dim=1, keepdim=True)
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, F)
    s = (reward_k * w.unsqueeze(0)).nansum(dim=1)
    s[torch.isnan(rpf).all(dim=1)] = float("nan")
    trl = torch.nan_to_num((s - torch.nanmean(s)) / (_trl_nanstd(s) + 1e-4), nan=0.0)

    present = ~torch.isnan(rpf)
    ours, mask = combine_rewards(rpf.T, present.T, w, G, "trl_normalize_then_sum")
    torch.testing.assert_close(ours, trl, **TOL)
    assert torch.equal(mask, present.any(1))
    assert torch.isnan(std_k).any()  # the one-member case was exercised


def test_group_mean_batch_std_equals_trl_scale_rewards_batch():
    # trl/trainer/grpo_trainer.py GRPOTrainer._generate_and_score_completions,
    # multi_objective_aggregation="sum_then_normalize", scale_rewards="batch":
    # s = weighted nansum (unscorable NaN); A = (s - nanmean_group s)/(nanstd(s over batch) + 1e-4)
    rpf, w, G = _trl_rewards()
    s = (rpf * w.unsqueeze(0)).nansum(dim=1)
    s[torch.isnan(rpf).all(dim=1)] = float("nan")
    group_mean = torch.nanmean(s.view(-1, G), dim=1).repeat_interleave(G)
    trl = torch.nan_to_num((s - group_mean) / (_trl_nanstd(s) + 1e-4), nan=0.0)

    present = ~torch.isnan(rpf)
    scores, mask = combine_rewards(rpf.T, present.T, w, G, "sum_then_normalize")
    ours = batch_std_normalize(group_mean_advantages(scores, G, mask), scores, mask)
    torch.testing.assert_close(ours, trl, **TOL)


# --- OpenRLHF -----------------------------------------------------------------------------------


def test_corrections_equal_openrlhf_policy_loss():
    # openrlhf/models/loss.py PolicyLoss.forward, vllm_is_correction_type with thresholds
    # [low, high] (default [0.5, 5]), r = exp(old - rollout):
    # tis: clamp(r, low, high); icepop: r·1[low ≤ r ≤ high];
    # seq-mask-tis: r·1[low ≤ exp(masked_mean_t log r) ≤ high] (masked_mean = Σ x·m / Σ m)
    _, old, engine, _, mask = _batch(B=32, T=5)
    low, high = 0.8, 1.25
    log_r = old - engine
    r = torch.exp(log_r)
    m = mask.float()
    seq_is = torch.exp((log_r * m).sum(-1) / m.sum(-1))
    seq_keep = ((seq_is >= low) & (seq_is <= high)).unsqueeze(-1)

    w, _, _ = rollout_correction(old, engine, mask, mode="tis", low=low, high=high)
    torch.testing.assert_close(w[mask], r.clamp(low, high)[mask], **TOL)
    w, keep, _ = rollout_correction(old, engine, mask, mode="mis", low=low, high=high)
    torch.testing.assert_close(w[mask], (r * ((r >= low) & (r <= high)))[mask], **TOL)
    assert (keep != mask).any()
    # seq-mask-tis = our sequence_mean keep mask × the plain token ratio
    _, seq_keep_ours, _ = rollout_correction(
        old, engine, mask, mode="mis", level="sequence_mean", low=low, high=high
    )
    token_ratio, _, _ = rollout_correction(old, engine, mask, mode="tis", level="token")
    torch.testing.assert_close((token_ratio * seq_keep_ours)[mask], (seq_keep * r)[mask], **TOL)
    assert (seq_keep_ours != mask).any()


def test_gspo_with_dual_clip_equals_openrlhf_gspo():
    # openrlhf/models/loss.py PolicyLoss.forward, policy_loss_type="gspo" (no IS correction):
    # w = exp(Σ m·(logp - old)/clamp(Σ m, 1))·m; surr1 = w·A, surr2 = clip(w)·A;
    # dual clip: A < 0 → -max(min(surr1, surr2), c·A), else -min(surr1, surr2);
    # aggregated per sample (token_level_loss forced off): mean_i (Σ_t L·m / Σ_t m)
    logp, old, _, seq_adv, mask = _batch(B=32, spread=1.0)
    c = 1.5
    m = mask.float()
    a = seq_adv.unsqueeze(-1).expand_as(logp)
    w = torch.exp(((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)).unsqueeze(-1) * m
    surr1, surr2 = w * a, w.clamp(1 - LO, 1 + HI) * a
    clip1 = torch.min(surr1, surr2)
    loss = -torch.where(a < 0, torch.max(clip1, c * a), clip1)
    orl_total = ((loss * m).sum(-1) / m.sum(-1)).mean()
    (orl_grad,) = torch.autograd.grad(orl_total, logp)

    _, total, grad, metrics = _ours("gspo", logp, old, a, mask, "seq_mean_token_mean", dual_clip=c)
    torch.testing.assert_close(total, orl_total.detach(), **TOL)
    torch.testing.assert_close(grad, orl_grad, **TOL)
    assert metrics["clip_frac/dual"] > 0  # the dual clip was exercised
