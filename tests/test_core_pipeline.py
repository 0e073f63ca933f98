"""The advantage pipeline (SPEC §3 order of operations) and the presets."""

import pytest
import torch

from advantage.core import (
    PRESETS,
    AdvantageInputs,
    Algorithm,
    compute_advantages,
    discounted_returns,
    gae,
    group_mean_advantages,
    group_normalize,
    kl_k1,
    leave_one_out_advantages,
    make_baseline,
    masked_whiten,
    resolve,
    token_rewards,
)


def _batch(B=8, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths.unsqueeze(-1)
    return dict(
        scores=torch.randn(B, generator=g),
        mask=mask,
        old_logprobs=-torch.rand(B, T, generator=g),
        ref_logprobs=-torch.rand(B, T, generator=g),
        values=torch.randn(B, T, generator=g),
    )


def _run(algo, G=4, **kw):
    inputs = AdvantageInputs(group_size=G, **{**_batch(), **kw})
    return inputs, compute_advantages(
        inputs, algo, make_baseline(algo.baseline, ema_alpha=algo.ema_alpha), kl_coef=algo.kl_coef
    )


def test_grpo_sequence_advantage_on_every_valid_token():
    inputs, out = _run(resolve("grpo"))
    seq = group_normalize(group_mean_advantages(inputs.scores, 4), inputs.scores, 4, eps=1e-4)
    expected = torch.where(inputs.mask, seq.unsqueeze(-1), 0.0)
    torch.testing.assert_close(out.advantages, expected)
    assert out.returns is None


def test_rloo_with_kl_in_reward_matches_manual_composition():
    algo = resolve("rloo")
    inputs, out = _run(algo)
    kl = kl_k1(inputs.old_logprobs, inputs.ref_logprobs)
    r = token_rewards(leave_one_out_advantages(inputs.scores, 4), inputs.mask, kl, 0.05)
    torch.testing.assert_close(out.advantages, discounted_returns(r, inputs.mask, 1.0))


def test_ppo_gae_then_batch_whitening_matches_manual_composition():
    algo = resolve("ppo", gamma=0.99, lam=0.9)
    inputs, out = _run(algo)
    kl = kl_k1(inputs.old_logprobs, inputs.ref_logprobs)
    r = token_rewards(inputs.scores, inputs.mask, kl, 0.05)
    adv, ret = gae(r, inputs.values, inputs.mask, 0.99, 0.9)
    torch.testing.assert_close(out.advantages, masked_whiten(adv, inputs.mask, 1e-8))
    torch.testing.assert_close(out.returns, ret)  # critic targets are not whitened


def test_reinforce_pp_whitens_return_to_go_of_kl_shaped_rewards():
    inputs, out = _run(resolve("reinforce_pp"))
    kl = kl_k1(inputs.old_logprobs, inputs.ref_logprobs)
    r = token_rewards(inputs.scores, inputs.mask, kl, 0.01)
    expected = masked_whiten(discounted_returns(r, inputs.mask, 1.0), inputs.mask, 1e-8)
    torch.testing.assert_close(out.advantages, expected)
    valid = out.advantages[inputs.mask]
    assert abs(valid.mean().item()) < 1e-5 and abs(valid.std().item() - 1.0) < 1e-4


def test_kl_coef_argument_overrides_algorithm_beta():
    algo = resolve("reinforce_pp_baseline")
    inputs = AdvantageInputs(group_size=4, **_batch())
    a = compute_advantages(inputs, algo, make_baseline("group_mean"), kl_coef=0.0).advantages
    no_kl = resolve("reinforce_pp_baseline", kl_coef=0.0)
    b = compute_advantages(inputs, no_kl, make_baseline("group_mean"), kl_coef=0.0).advantages
    torch.testing.assert_close(a, b)


def test_unscored_samples_get_zero_advantage_and_leave_the_mask():
    score_mask = torch.tensor([True, False, True, True, True, True, True, True])
    _inputs, out = _run(resolve("reinforce_pp_baseline"), score_mask=score_mask)
    assert (out.advantages[1] == 0).all() and not out.mask[1].any()
    assert torch.isfinite(out.advantages).all()


def test_kl_in_reward_without_logprobs_raises():
    algo = resolve("rloo")
    inputs = AdvantageInputs(
        scores=torch.zeros(4), mask=torch.ones(4, 2, dtype=torch.bool), group_size=2
    )
    with pytest.raises(ValueError, match="old_logprobs and ref_logprobs"):
        compute_advantages(inputs, algo, make_baseline("leave_one_out"), kl_coef=algo.kl_coef)


def test_frac_zero_std_groups_metric():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0])  # first group constant
    inputs = AdvantageInputs(scores=scores, mask=torch.ones(4, 3, dtype=torch.bool), group_size=2)
    out = compute_advantages(inputs, resolve("dr_grpo"), make_baseline("group_mean"), kl_coef=0.0)
    assert out.metrics["frac_zero_std_groups"].item() == pytest.approx(0.5)
    assert (out.advantages[:2] == 0).all()


@pytest.mark.parametrize("name", ["grpo", "rloo", "dr_grpo"])
def test_constant_group_zero_advantage_and_counted_as_zero_std(name):
    scores = torch.tensor([100.1] * 6 + [0.0, 1.0, 0.6, 0.2, 0.9, 0.4])
    inputs = AdvantageInputs(scores=scores, mask=torch.ones(12, 3, dtype=torch.bool), group_size=6)
    algo = resolve(name, kl_placement="none")
    out = compute_advantages(inputs, algo, make_baseline(algo.baseline), kl_coef=0.0)
    assert (out.advantages[:6] == 0).all() and (out.advantages[6:] != 0).all()
    assert out.metrics["frac_zero_std_groups"].item() == 0.5


def test_fp64_scores_are_computed_in_fp64():
    g = torch.Generator().manual_seed(3)
    scores = 10 + 1e-3 * torch.randn(8, generator=g, dtype=torch.float64)
    mask = torch.ones(8, 4, dtype=torch.bool)
    out = compute_advantages(
        AdvantageInputs(scores=scores, mask=mask, group_size=4), resolve("grpo"),
        make_baseline("group_mean"), kl_coef=0.0,
    )  # fmt: skip
    groups = scores.view(2, 4)
    expected = (groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + 1e-4)
    assert out.advantages.dtype == torch.float64
    torch.testing.assert_close(out.advantages[:, 0], expected.view(-1), rtol=1e-12, atol=1e-12)
    rewards = token_rewards(scores, mask)
    assert rewards.dtype == torch.float64 and (rewards[:, -1] == scores).all()


# The table of SPEC §3, row by row.
SPEC_TABLE = {
    "ppo": ("critic", "batch", "reward", "token_mean", True),
    "grpo": ("group_mean", "group", "loss", "seq_mean_token_mean", False),
    "dr_grpo": ("group_mean", "none", "none", "seq_mean_token_sum_norm", False),
    "rloo": ("leave_one_out", "none", "reward", "token_mean", False),
    "reinforce": ("ema", "none", "reward", "token_mean", False),
    "reinforce_pp": ("none", "batch", "reward", "token_mean", False),
    "reinforce_pp_baseline": ("group_mean", "batch", "reward", "token_mean", False),
}


@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_presets_match_spec_table(name):
    algo = resolve(name)
    baseline, scope, kl, agg, critic = SPEC_TABLE[name]
    assert (algo.baseline, algo.scope, algo.kl_placement, algo.aggregation, algo.uses_critic) == (
        baseline,
        scope,
        kl,
        agg,
        critic,
    )
    card = algo.card()
    assert f"algorithm: {name}" in card and agg in card


def test_spec_kl_estimators_of_presets():
    assert resolve("grpo").kl_estimator == "k3"
    assert resolve("ppo").kl_estimator == "k1"
    assert not resolve("dr_grpo").uses_reference
    assert set(SPEC_TABLE) <= set(PRESETS)  # the objective-axis presets: test_objective_axis.py


def test_resolve_overrides_and_errors():
    algo = resolve("grpo", clip_high=0.28, scope="batch")
    assert algo.clip_high == 0.28 and algo.scope == "batch" and algo.baseline == "group_mean"
    with pytest.raises(ValueError, match="unknown algorithm preset 'gpro'"):
        resolve("gpro")
    with pytest.raises(ValueError, match="unknown algorithm field"):
        resolve("grpo", clip=0.1)
    with pytest.raises(ValueError, match=r"algo\.scope"):
        Algorithm(scope="global")
    with pytest.raises(ValueError, match=r"algo\.kl_estimator"):
        Algorithm(kl_estimator="k9")
    with pytest.raises(ValueError, match="kl_target"):
        Algorithm(kl_controller="adaptive")


def test_card_prints_every_choice():
    card = resolve("ppo").card()
    for text in (
        "GAE γ=1 λ=0.95",
        "β=0.05",
        "k1",
        "1e-08",
        "n-1",
        "clip(ρ, 1-0.2, 1+0.2)",
        "ε_v=0.2",
    ):
        assert text in card, text
    grpo = resolve("grpo").card()
    assert "σ_g(s) + 0.0001" in grpo and "+β·k3(π, ref)" in grpo


def test_card_says_how_the_reference_follows_the_policy():
    assert "reference model  yes, frozen" in resolve("grpo").card()
    assert "reference model  yes, every 4 steps replaced by the policy" in resolve("grpo").card(4)
    assert "every 2 steps ref ← 0.5·policy + 0.5·ref" in resolve("grpo").card(2, 0.5)
    assert "reference model  no (not loaded)" in resolve("gspo").card(4)


def test_a_reference_sync_without_a_reference_is_warned(tmp_path, caplog):
    """β = 0 loads no reference, so `model.ref_sync_steps` would do nothing, unsaid."""
    from advantage.rl.config import load_config
    from advantage.rl.trainer import Trainer
    from helpers import small_config

    cfg = load_config(None, small_config(tmp_path, "algorithm=gspo", "model.ref_sync_steps=2"))
    with caplog.at_level("WARNING", logger="advantage"):
        Trainer(cfg)
    assert "model.ref_sync_steps=2 does nothing: gspo uses no reference model" in caplog.text


def test_what_a_preset_sets_can_be_turned_off():
    """In a config null keeps the preset's value, so PPO's value clip and DAPO's overlong
    shaping could not be turned off (a probe): `.inf` and `0` do."""
    import math

    import torch

    from advantage.core.losses import value_loss
    from advantage.core.presets import resolve_axes

    assert "unclipped value loss" in resolve_axes("ppo", {"value_clip": math.inf}).card()
    assert "overlong" not in resolve_axes("dapo", {"overlong_fraction": 0.0}).card()
    values, old, returns = torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[0.0]])
    mask = torch.tensor([[True]])
    loss, _ = value_loss(values, old, returns, mask, clip=math.inf)
    torch.testing.assert_close(loss, value_loss(values, old, returns, mask, clip=None)[0])
    assert loss.item() == 2.0  # ½·(2 − 0)²
