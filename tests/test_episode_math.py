"""Advantages over episodes (SPEC §7): environment tokens are not time steps, the episode score
sits on the last model token, per-turn rewards on the last token of their turn. Hand-computed."""

import torch

from advantage.core import (
    AdvantageInputs,
    compute_advantages,
    discounted_returns,
    gae,
    make_baseline,
    resolve,
)

# one episode: model tokens at 0, 1 (turn 1), the environment's at 2, 3, the model's at 4 (turn 2)
MASK = torch.tensor([[True, True, False, False, True]])


def test_return_to_go_skips_environment_tokens():
    # γ = 0.5, rewards 1 after turn 1 (on its last token, 1) and 2 at the end (4):
    # G_4 = 2; G_1 = 1 + 0.5·G_4 = 2 (no discount for positions 2, 3); G_0 = 0 + 0.5·2 = 1
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0, 2.0]])
    expected = torch.tensor([[1.0, 2.0, 0.0, 0.0, 2.0]])
    torch.testing.assert_close(discounted_returns(rewards, MASK, gamma=0.5), expected)


def test_gae_bootstraps_from_the_next_model_token():
    # γ = 1, λ = 0.5, V = [1, 2, (9, 9 ignored), 3]:
    # t4: δ = 2 + 0 - 3 = -1, A = -1;  t1: δ = 1 + V_4 - V_1 = 2, A = 2 + 0.5·(-1) = 1.5
    # t0: δ = 0 + V_1 - V_0 = 1, A = 1 + 0.5·1.5 = 1.75;  R = A + V
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0, 2.0]])
    values = torch.tensor([[1.0, 2.0, 9.0, 9.0, 3.0]])
    adv, ret = gae(rewards, values, MASK, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[1.75, 1.5, 0.0, 0.0, -1.0]]))
    torch.testing.assert_close(ret, torch.tensor([[2.75, 3.5, 0.0, 0.0, 2.0]]))


def test_environment_token_count_does_not_change_the_advantages():
    # the same episode with 2 or 5 environment tokens between its turns: equal advantages on
    # the model's tokens, for a critic-free preset with γ < 1 and for PPO's GAE
    short = torch.tensor([[True, True, False, False, True]] * 2)
    long = torch.tensor([[True, True, False, False, False, False, False, True]] * 2)
    scores = torch.tensor([1.0, 0.0])
    turn = torch.zeros(2, 5)
    turn[:, 1] = 0.5  # a per-turn reward on the last token of turn 1
    turn_long = torch.zeros(2, 8)
    turn_long[:, 1] = 0.5
    values = torch.tensor([[0.1, 0.2, 0.0, 0.0, 0.3]] * 2)
    values_long = torch.tensor([[0.1, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3]] * 2)
    for preset, extra in [("rloo", {}), ("ppo", {"scope": "none"})]:
        algo = resolve(preset, gamma=0.9, kl_coef=0.0, **extra)
        outs = []
        for mask, rewards, v in [(short, turn, values), (long, turn_long, values_long)]:
            inputs = AdvantageInputs(
                scores=scores, mask=mask, group_size=2, turn_rewards=rewards, values=v
            )
            baseline = make_baseline(algo.baseline)
            outs.append(compute_advantages(inputs, algo, baseline, kl_coef=0.0).advantages)
        torch.testing.assert_close(outs[0][short], outs[1][long])


def test_score_on_last_model_token_and_turn_rewards_by_hand():
    # RLOO, G = 2, scores [1, 0] → [1, -1]; sample 0 also earned 0.5 after turn 1.
    # γ = 1: advantages = return-to-go: sample 0 → [1.5, 1.5, ·, ·, 1]; sample 1 → -1 each
    mask = torch.tensor([[True, True, False, False, True]] * 2)
    turn = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0], [0.0] * 5])
    inputs = AdvantageInputs(
        scores=torch.tensor([1.0, 0.0]), mask=mask, group_size=2, turn_rewards=turn
    )
    algo = resolve("rloo", kl_coef=0.0)
    out = compute_advantages(inputs, algo, make_baseline("leave_one_out"), kl_coef=0.0)
    expected = torch.tensor([[1.5, 1.5, 0.0, 0.0, 1.0], [-1.0, -1.0, 0.0, 0.0, -1.0]])
    torch.testing.assert_close(out.advantages, expected)
