"""The fourth axis (SPEC §7): policy objectives, engine/trainer corrections, the batch_std
scope, DAPO's score shaping, their presets, and one definition of the behaviour log-probs."""

import math

import pytest
import torch

from advantage.core import (
    OBJECTIVES,
    AdvantageInputs,
    compute_advantages,
    make_baseline,
    overlong_penalty,
    policy_objective,
    resolve,
)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        # GSPO §5: sequence ratio, ε = 3e-4 / 4e-4, sequence-mean aggregation, no KL
        ("gspo", dict(loss_name="gspo", clip_low=3e-4, clip_high=4e-4, kl_placement="none",
                      aggregation="seq_mean_token_mean", scope="group")),
        # CISPO: clipped IS weight with no lower bound (1 - 1 = 0) and weight ≤ 5, token mean
        ("cispo", dict(loss_name="cispo", clip_low=1.0, clip_high=4.0, kl_placement="none",
                       aggregation="token_mean")),
        # DAPO: clip-higher 0.2 / 0.28, token-mean, dynamic sampling, overlong shaping, no KL
        ("dapo", dict(loss_name="ppo_clip", clip_low=0.2, clip_high=0.28, kl_coef=0.0,
                      aggregation="token_mean", dynamic_sampling=True, overlong_fraction=0.2)),
    ],
)  # fmt: skip
def test_objective_presets_follow_their_papers(preset, expected):
    algo = resolve(preset)
    assert {k: getattr(algo, k) for k in expected} == expected
    assert not algo.uses_reference
    card = algo.card()
    assert f"algorithm: {preset}" in card and "off-policy correction: none" in card


def test_objective_pairs_and_their_errors():
    assert resolve("grpo", ratio_level="sequence_token").loss_name == "gspo_token"
    assert resolve("grpo", objective="pg").loss_name == "pg"
    with pytest.raises(ValueError, match="cispo/token"):
        resolve("grpo", objective="cispo", ratio_level="sequence")
    with pytest.raises(ValueError, match="dual_clip applies to ppo_clip only"):
        resolve("cispo", dual_clip=3.0)
    with pytest.raises(ValueError, match=r"needs algo\.correction_low"):
        resolve("grpo", correction="mis")
    assert set(OBJECTIVES) == {"ppo_clip", "gspo", "gspo_token", "cispo", "pg"}


def test_batch_std_scope_by_hand():
    # scores [1, 0 | 3, 1], G = 2: group means 0.5, 2 → centred [0.5, -0.5, 1, -1]
    # σ of all four scores (mean 1.25): squares .0625 + 1.5625 + 3.0625 + .0625 = 4.75, /3
    scores = torch.tensor([1.0, 0.0, 3.0, 1.0])
    mask = torch.ones(4, 2, dtype=torch.bool)
    algo = resolve("grpo", scope="batch_std", kl_coef=0.0)
    out = compute_advantages(
        AdvantageInputs(scores=scores, mask=mask, group_size=2),
        algo,
        make_baseline("group_mean"),
        kl_coef=0.0,
    )
    sigma = math.sqrt(4.75 / 3)
    expected = torch.tensor([0.5, -0.5, 1.0, -1.0]) / (sigma + 1e-4)
    torch.testing.assert_close(out.advantages, expected.unsqueeze(-1).expand(4, 2))


def test_overlong_penalty_by_hand():
    # L_max 10, L_cache 4: 0 up to 6 tokens, then (6 - n)/4, -1 beyond 10
    lengths = torch.tensor([5, 6, 7, 10, 11])
    expected = torch.tensor([0.0, 0.0, -0.25, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4), expected)


def test_policy_objective_composes_the_objective_and_a_masked_correction():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(3, 4, generator=g)).requires_grad_()
    old = logp.detach() + 0.01 * torch.randn(3, 4, generator=g)
    engine = old.clone()
    engine[1, 2] -= 1.0  # ratio e on one token: outside [0.5, 2] → dropped by mis
    adv = torch.randn(3, generator=g)
    mask = torch.ones(3, 4, dtype=torch.bool)
    bare, _ = OBJECTIVES["gspo"](logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    common = dict(objective="gspo", engine_logprobs=engine)
    plain, _ = policy_objective(logp, old, adv, mask, **common)
    torch.testing.assert_close(plain, bare)  # correction "none": the objective alone
    masked, metrics = policy_objective(
        logp, old, adv, mask, correction="mis", correction_low=0.5, correction_high=2.0, **common
    )
    assert masked[1, 2] == 0 and metrics["rollout/is_masked_frac"].item() == pytest.approx(1 / 12)
    ratio = torch.exp(old - engine)
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[1, 2] = False
    torch.testing.assert_close(masked[keep], (bare * ratio)[keep])


def test_engine_and_trainer_logprobs_agree_under_top_p_and_top_k():
    """The behaviour distribution (README conventions): log softmax(z / T) over the full
    vocabulary, before top-k / top-p, in the engine and in the trainer."""
    from advantage.engine.models import completion_logprobs, load_causal_lm
    from advantage.engine.rollout import SamplingParams, TransformersBackend
    from advantage.tasks import builtin_model_path
    from advantage.tasks.tiny import char_tokenizer

    tokenizer = char_tokenizer()
    policy = load_causal_lm(str(builtin_model_path("tiny-random"))).eval()
    prompts = [tokenizer("abc>")["input_ids"], tokenizer("fedab>")["input_ids"]]
    params = SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=5, seed=0)
    out = TransformersBackend(policy, tokenizer).generate(prompts, 8, params)
    with torch.no_grad():
        trainer, _ = completion_logprobs(policy, out, temperature=0.7)
        # what a renormalised (top-k, top-p) log-prob would be: it differs here
        logits = policy(out.input_ids, attention_mask=out.attention_mask).logits
    gap = (trainer - out.logprobs)[out.completion_mask].abs().max().item()
    assert gap <= 1e-5, gap
    z = logits[:, -out.completion_ids.shape[1] - 1 : -1].float() / 0.7
    kept_mass = torch.softmax(z, -1).topk(5, dim=-1).values.sum(-1)
    assert (kept_mass[out.completion_mask] < 0.999).any()  # the truncation is not a no-op
