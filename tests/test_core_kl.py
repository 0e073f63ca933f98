"""KL estimators and controllers: hand-computed values and properties."""

import math

import pytest
import torch

from advantage.core import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
)


def test_k1_k2_k3_hand_computed():
    # lr = logp - ref = [0.5, -1.0, 0.0]
    logp = torch.tensor([-1.0, -2.0, -0.3])
    ref = torch.tensor([-1.5, -1.0, -0.3])
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([0.5, -1.0, 0.0]))
    torch.testing.assert_close(kl_k2(logp, ref), torch.tensor([0.125, 0.5, 0.0]))
    # k3 = exp(-lr) - 1 + lr: e^-0.5 - 0.5 = 0.1065307, e^1 - 2 = 0.7182818
    expected = torch.tensor([math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0, 0.0])
    torch.testing.assert_close(kl_k3(logp, ref), expected)


def test_kl_log_ratio_clamped_to_20():
    logp = torch.tensor([100.0, -100.0])
    ref = torch.zeros(2)
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([20.0, -20.0]))
    k3 = kl_k3(logp, ref)
    assert torch.isfinite(k3).all()
    torch.testing.assert_close(k3[1], torch.tensor(math.exp(20.0) - 21.0))


def test_k3_nonnegative_and_unbiased_in_expectation():
    torch.manual_seed(0)
    # samples x ~ p = N(0,1); KL(p‖q) for q = N(0.5, 1) is 0.125
    x = torch.randn(400_000, dtype=torch.float64)
    logp = -0.5 * x**2
    logq = -0.5 * (x - 0.5) ** 2
    k1, k3 = kl_k1(logp, logq), kl_k3(logp, logq)
    assert (k3 >= 0).all()
    assert abs(k1.mean().item() - 0.125) < 5e-3
    assert abs(k3.mean().item() - 0.125) < 5e-3


def test_kl_registry_by_name_and_error_lists_names():
    assert set(KL_ESTIMATORS.names()) == {"k1", "k2", "k3"}
    a, b = torch.tensor([0.3]), torch.tensor([0.1])
    torch.testing.assert_close(kl_penalty(a, b, "k2"), kl_k2(a, b))
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(a, b, "k4")


def test_registry_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        KL_ESTIMATORS.register("k1")(lambda a, b: a)


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.1)
    assert ctl.update(observed_kl=100.0, n_samples=64) == 0.1


def test_adaptive_kl_controller_hand_computed():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 9 > target: e = clip(9/6 - 1, ±0.2) = 0.2; β = 0.1·(1 + 0.2·256/10000) = 0.100512
    assert ctl.update(9.0, 256) == pytest.approx(0.100512)
    # KL 5.4: e = 5.4/6 - 1 = -0.1; β = 0.100512·(1 - 0.1·100/10000) = 0.10051·0.999
    assert ctl.update(5.4, 100) == pytest.approx(0.100512 * 0.999)
    state = ctl.state_dict()
    other = AdaptiveKLController(0.5, target=6.0)
    other.load_state_dict(state)
    assert other.value == ctl.value


def test_adaptive_kl_controller_needs_target():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=None)


def test_kl_metric_and_controller_count_only_the_sequences_that_count():
    # an independent check found the `kl` metric and the controller's input taken over every
    # completion, unscored and (under rollout.mask_truncated) truncated ones included
    from types import SimpleNamespace

    from advantage.rl.step import control_kl

    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0], [-3.0, -0.1, -0.2]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-9.0, -9.0, -9.0], [-1.0, -1.0, -1.0]])
    model_mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    counted = torch.tensor([True, False, True])  # row 1 unscored: its KL of 8 per token is out
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    run = SimpleNamespace(algo=SimpleNamespace(kl_estimator="k1"), kl_ctl=ctl)
    passes = SimpleNamespace(behaviour_logprobs=logp, ref_logprobs=ref)
    out = control_kl(run, passes, model_mask & counted[:, None], counted)
    # k1 = logp - ref: row 0 → 0.5, -1.0; row 2 → -2.0, 0.9, 0.8: sum -0.8 over 5 tokens
    assert out["kl"] == pytest.approx(-0.8 / 5)
    # the controller: mean over the 2 counted sequences of their summed KL, -0.4 → e = -0.2
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 2 / 100))
