"""KL coefficient controllers: fixed β, or adaptive (Ziegler et al. 2019, arXiv:1909.08593 §2.2).

Adaptive: `e = clip(KL_observed / KL_target - 1, -0.2, 0.2)`, `β ← β·(1 + e·n_samples / horizon)`.
"""

from __future__ import annotations

from .registry import Registry

KL_CONTROLLERS: Registry = Registry("KL controller")


@KL_CONTROLLERS.register("fixed")
class FixedKLController:
    """β stays at its initial value."""

    def __init__(self, kl_coef: float, target: float | None = None, horizon: float = 10000) -> None:
        self.value = float(kl_coef)

    def update(self, observed_kl: float, n_samples: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@KL_CONTROLLERS.register("adaptive")
class AdaptiveKLController(FixedKLController):
    """β moves so the observed KL tracks `target`; the step is at most 20%·n_samples/horizon."""

    def __init__(self, kl_coef: float, target: float | None = 6.0, horizon: float = 10000) -> None:
        super().__init__(kl_coef)
        if target is None or target <= 0:
            raise ValueError(f"adaptive KL controller: target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"adaptive KL controller: horizon must be > 0, got {horizon}")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, observed_kl: float, n_samples: int) -> float:
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon
        return self.value
