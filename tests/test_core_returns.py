"""Token rewards, return-to-go and GAE on hand-computed tensors."""

import torch

from advantage.core import discounted_returns, gae, last_token_mask, token_rewards

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


def test_last_token_mask():
    expected = torch.tensor([[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(last_token_mask(MASK), expected)


def test_token_rewards_score_on_last_token_and_kl_everywhere():
    scores = torch.tensor([2.0, -1.0, 5.0])
    kl = torch.full((3, 4), 0.5)
    r = token_rewards(scores, MASK, kl, kl_coef=0.1)
    # row 0: -0.05 on every valid token, +2 on token 2; row 2 has no tokens: all zero
    expected = torch.tensor(
        [[-0.05, -0.05, 1.95, 0.0], [-0.05, -1.05, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    )
    torch.testing.assert_close(r, expected)


def test_return_to_go_hand_computed():
    r = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    m = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    # γ = 0.5: G2 = 3, G1 = 2 + 1.5 = 3.5, G0 = 1 + 1.75 = 2.75; the masked 9 is ignored
    torch.testing.assert_close(
        discounted_returns(r, m, gamma=0.5), torch.tensor([[2.75, 3.5, 3.0, 0.0]])
    )


def test_return_to_go_gamma_one_is_reverse_cumsum():
    torch.manual_seed(0)
    r = torch.randn(5, 7)
    m = torch.ones(5, 7, dtype=torch.bool)
    expected = r.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(discounted_returns(r, m, 1.0), expected)


def test_gae_hand_computed():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.25, 0.75]])
    m = torch.ones(1, 3, dtype=torch.bool)
    # γ = 0.9, λ = 0.5:
    # δ2 = 1 - 0.75 = 0.25;            A2 = 0.25
    # δ1 = 0 + 0.9·0.75 - 0.25 = 0.425; A1 = 0.425 + 0.45·0.25 = 0.5375
    # δ0 = 0 + 0.9·0.25 - 0.5 = -0.275; A0 = -0.275 + 0.45·0.5375 = -0.033125
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.033125, 0.5375, 0.25]]))
    torch.testing.assert_close(ret, adv + v)


def test_gae_gamma_lambda_one_equals_return_to_go_minus_values():
    torch.manual_seed(1)
    r, v = torch.randn(4, 6), torch.randn(4, 6)
    m = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 1 + [0] * 5, [1] * 3 + [0] * 3]).bool()
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    expected = torch.where(m, discounted_returns(r, m, 1.0) - v, 0.0)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, torch.where(m, discounted_returns(r, m, 1.0), 0.0))


def test_gae_lambda_zero_is_one_step_td():
    torch.manual_seed(2)
    r, v = torch.randn(2, 5), torch.randn(2, 5)
    m = torch.ones(2, 5, dtype=torch.bool)
    adv, _ = gae(r, v, m, gamma=0.8, lam=0.0)
    next_v = torch.cat([v[:, 1:], torch.zeros(2, 1)], dim=1)
    torch.testing.assert_close(adv, r + 0.8 * next_v - v)


def test_extra_padding_changes_nothing():
    torch.manual_seed(3)
    r, v = torch.randn(3, 4), torch.randn(3, 4)
    m = MASK
    adv, _ret = gae(r, v, m, 0.95, 0.9)
    pad = lambda x: torch.cat([x, torch.randn(3, 3)], 1)  # noqa: E731
    m_pad = torch.cat([m, torch.zeros(3, 3, dtype=torch.bool)], 1)
    adv_p, ret_p = gae(pad(r), pad(v), m_pad, 0.95, 0.9)
    torch.testing.assert_close(adv_p[:, :4], adv)
    assert (adv_p[:, 4:] == 0).all() and (ret_p[:, 4:] == 0).all()
    torch.testing.assert_close(
        discounted_returns(pad(r), m_pad, 0.9)[:, :4], discounted_returns(r, m, 0.9)
    )
