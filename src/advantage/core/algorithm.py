"""Algorithms as points on four axes (SPEC §3, §7): baseline × normalisation scope × KL
placement × policy objective. Presets are plain data, `resolve` turns a preset name plus
overrides into an `Algorithm`, and `Algorithm.card()` prints the resolution.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .baselines import BASELINES
from .kl import KL_ESTIMATORS
from .kl_control import KL_CONTROLLERS
from .losses import AGGREGATIONS
from .normalize import SCOPES
from .objectives import RATIO_LEVELS, objective_name
from .offpolicy import CORRECTION_LEVELS, CORRECTION_MODES

KL_PLACEMENTS = ("reward", "loss", "none")


@dataclass(frozen=True)
class Algorithm:
    """One resolved point on the axes. Every default is written out in the README table."""

    name: str = "custom"
    """Preset this came from (or "custom")."""
    baseline: str = "group_mean"
    """none | moving_average | ema | group_mean | leave_one_out | critic."""
    scope: str = "group"
    """Normalisation scope: none | group (/ σ of the group's scores) | batch_std (/ σ of the
    whole batch's scores) | batch (whitening of the token advantages over the batch)."""
    kl_placement: str = "loss"
    """Where β·KL goes: reward (per-token reward shaping) | loss (added to the loss) | none."""
    kl_estimator: str = "k3"
    """k1 | k2 | k3 of r = logp_ref − logp: −r, ½r², exp(r) − r − 1 (README, "The math")."""
    kl_coef: float = 0.04
    """β, the initial KL coefficient. β = 0 means no reference model is loaded."""
    kl_controller: str = "fixed"
    """fixed | adaptive (Ziegler et al. 2019)."""
    kl_target: float | None = None
    """Target KL per sequence for the adaptive controller."""
    kl_horizon: float = 10000.0
    """Horizon (in samples) of the adaptive controller."""
    gamma: float = 1.0
    """Discount γ of return-to-go and GAE."""
    lam: float = 0.95
    """GAE λ (critic only)."""
    group_std_eps: float = 1e-4
    """ε in `(s - b) / (σ_g + ε)` of the group scope."""
    group_std_unbiased: bool = True
    """Bessel's correction (n-1) in σ_g."""
    whiten_eps: float = 1e-8
    """ε in `(A - μ) / sqrt(σ² + ε)` of the batch scope."""
    whiten_unbiased: bool = True
    """Bessel's correction (n-1) in the batch variance."""
    aggregation: str = "seq_mean_token_mean"
    """token_mean | seq_mean_token_mean | seq_mean_token_sum | seq_mean_token_sum_norm."""
    clip_low: float = 0.2
    """ε_low: the ratio is clipped below at 1 - ε_low."""
    clip_high: float = 0.2
    """ε_high: the ratio is clipped above at 1 + ε_high (> ε_low is DAPO's clip-higher)."""
    dual_clip: float | None = None
    """c > 1 bounds the loss of negative-advantage tokens at c·|A| (None = off)."""
    value_clip: float | None = 0.2
    """ε_v of the clipped value loss (None or inf = unclipped; in a config `algo.value_clip: .inf`,
    as null there keeps the preset's value)."""
    value_coef: float = 0.1
    """Weight of the critic loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (loss -= coef·entropy)."""
    ema_alpha: float = 0.9
    """α of the `ema` baseline."""
    objective: str = "ppo_clip"
    """Policy objective: ppo_clip (clipped surrogate) | cispo (clipped IS weight × log π,
    MiniMax-M1) | pg (plain policy gradient, no ratio)."""
    ratio_level: str = "token"
    """Importance ratio of ppo_clip: token | sequence (GSPO) | sequence_token (GSPO-token)."""
    correction: str = "none"
    """Off-policy correction between the sampling engine and the trainer: none | tis
    (truncated IS) | mis (masked IS: drop what leaves [correction_low, correction_high])."""
    correction_level: str = "token"
    """token | sequence (product of the token ratios) | sequence_mean (their geometric mean)."""
    correction_low: float | None = None
    """Lower bound of the correction's ratio (null = none)."""
    correction_high: float | None = None
    """Upper bound (cap) of the correction's ratio (null = none)."""
    dynamic_sampling: bool = False
    """Drop groups whose scores are all equal and refill from new prompts (DAPO)."""
    overlong_fraction: float | None = None
    """DAPO's soft overlong punishment (arXiv:2503.14476 eq. 13), added to the score: 0 up to
    L_max - L_cache tokens, then linearly down to -1 at L_max = rollout.max_new_tokens (episodes:
    rollout.max_episode_tokens, against all tokens after the prompt), with L_cache = this
    fraction of L_max (DAPO: 4096 / 20480 = 0.2; None or 0 = off; in a config 0, as null there
    keeps the preset's value)."""

    def __post_init__(self) -> None:
        BASELINES.check(self.baseline, "algo.baseline")
        KL_ESTIMATORS.check(self.kl_estimator, "algo.kl_estimator")
        KL_CONTROLLERS.check(self.kl_controller, "algo.kl_controller")
        AGGREGATIONS.check(self.aggregation, "algo.aggregation")
        _one_of(self.scope, SCOPES, "algo.scope")
        _one_of(self.kl_placement, KL_PLACEMENTS, "algo.kl_placement")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            unclipped = f.name == "value_clip" and value == math.inf  # how to turn it off
            if isinstance(value, float) and not math.isfinite(value) and not unclipped:
                raise ValueError(f"algo.{f.name} must be a finite number, got {value}")
        for name in ("group_std_eps", "whiten_eps", "value_coef", "entropy_coef", "value_clip"):
            if (getattr(self, name) or 0.0) < 0:
                raise ValueError(f"algo.{name} must be >= 0, got {getattr(self, name)}")
        if not self.kl_horizon > 0 or (self.kl_target is not None and not self.kl_target > 0):
            raise ValueError("algo.kl_horizon and algo.kl_target (when set) must be > 0")
        if not 0.0 <= self.ema_alpha <= 1.0:
            raise ValueError(f"algo.ema_alpha must be in [0, 1], got {self.ema_alpha}")
        if self.kl_coef < 0:
            raise ValueError(f"algo.kl_coef must be >= 0, got {self.kl_coef}")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ValueError(
                f"algo.gamma and algo.lam must be in [0, 1], got {self.gamma}, {self.lam}"
            )
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError("algo.clip_low and algo.clip_high must be >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"algo.dual_clip must be > 1 (or null), got {self.dual_clip}")
        if self.kl_controller == "adaptive" and not self.kl_target:
            raise ValueError("algo.kl_target must be set (> 0) for kl_controller=adaptive")
        _one_of(self.ratio_level, RATIO_LEVELS, "algo.ratio_level")
        objective_name(self.objective, self.ratio_level)  # raises on an undefined pair
        if self.dual_clip is not None and self.objective != "ppo_clip":
            raise ValueError(f"algo.dual_clip applies to ppo_clip only, not {self.objective}")
        CORRECTION_MODES.check(self.correction, "algo.correction")
        CORRECTION_LEVELS.check(self.correction_level, "algo.correction_level")
        low, high = self.correction_low, self.correction_high
        if (low is not None and low < 0) or (high is not None and high <= 0):
            raise ValueError("algo.correction_low must be >= 0 and algo.correction_high > 0")
        if low is not None and high is not None and low > high:
            raise ValueError(f"algo.correction_low={low} exceeds algo.correction_high={high}")
        if self.correction == "mis" and low is None and high is None:
            raise ValueError("algo.correction=mis needs algo.correction_low and/or _high")
        if self.overlong_fraction is not None and not 0 <= self.overlong_fraction <= 1:
            raise ValueError(
                f"algo.overlong_fraction must be in [0, 1] (0: off), got {self.overlong_fraction}"
            )

    # Every decision the loop takes from the algorithm is asked here, in one place.

    @property
    def uses_critic(self) -> bool:
        """A critic is trained and its values are the baseline (GAE)."""
        return self.baseline == "critic"

    @property
    def uses_reference(self) -> bool:
        """A reference model is loaded and evaluated only when some KL term is active."""
        return self.kl_placement != "none" and self.kl_coef > 0

    @property
    def kl_in_reward(self) -> bool:
        """`-β·k(old, ref)` shapes the token rewards (SPEC §2): needs the generating policy's
        log-probs and the reference's before the advantages."""
        return self.kl_placement == "reward" and self.kl_coef > 0

    @property
    def kl_in_loss(self) -> bool:
        """`+β·k(π, ref)` is a term of the per-token loss, with its gradient (SPEC §2)."""
        return self.kl_placement == "loss" and self.kl_coef > 0

    @property
    def loss_name(self) -> str:
        """The registered per-token objective (`core.objectives.OBJECTIVES`) of this algorithm."""
        return objective_name(self.objective, self.ratio_level)

    @staticmethod
    def needs_old_logprobs(epochs: int, minibatches: int) -> bool:
        """The weights move before the rollout batch is used up (μ > 1 or several minibatches),
        so `old_logp` needs its own forward pass; otherwise `old_logp = logp.detach()` (SPEC §4)."""
        return epochs > 1 or minibatches > 1

    def card(self, ref_sync_steps: int = 0, ref_sync_alpha: float = 1.0) -> str:
        """A printable resolution of this algorithm: the pipeline of SPEC §3–§4, step by step;
        with `ref_sync_steps` (the run's `model.ref_sync_steps`), how the reference follows the
        policy."""
        baseline = BASELINES[self.baseline].__doc__.strip().splitlines()[0]
        if self.baseline == "ema":
            baseline += f" (α={self.ema_alpha:g})"
        adv = (
            f"GAE γ={self.gamma:g} λ={self.lam:g}; returns = A + V"
            if self.uses_critic
            else f"return-to-go γ={self.gamma:g}"
        )
        whiten = (
            f"(A - μ) / sqrt(σ² + {self.whiten_eps:g}) over all valid tokens, σ² with "
            f"{_bessel(self.whiten_unbiased)}, all-reduced across ranks"
            if self.scope == "batch"
            else "off"
        )
        bounds = f"[{_bound(self.correction_low)}, {_bound(self.correction_high)}]"
        correction = (
            "none"
            if self.correction == "none"
            else f"{self.correction} at {self.correction_level} level, ratio bounds {bounds}"
        )
        clipped = self.value_clip not in (None, math.inf)
        value_loss = (
            f"clipped value loss ε_v={self.value_clip}" if clipped else "unclipped value loss"
        )
        critic = f"yes, {value_loss}, coef {self.value_coef:g}" if self.uses_critic else "no"
        kl_reward = f"-β·{self.kl_estimator}(old, ref) on every token, {self._beta_text()}"
        kl_loss = f"+β·{self.kl_estimator}(π, ref) per token, {self._beta_text()}"
        rows = [
            f"algorithm: {self.name}",
            f"  0. scores        {self._scores_text()}",
            f"  1. baseline      {self.baseline}: {baseline}",
            f"  2. score scope   {self._score_scope_text()}",
            "  3. token reward  score on the last completion token; KL in reward: "
            + (kl_reward if self.kl_in_reward else "none"),
            f"  4. advantages    {adv}",
            f"  5. batch scope   {whiten}",
            f"  policy loss      {self._objective_text()}; KL in loss: "
            f"{kl_loss if self.kl_in_loss else 'none'}; entropy coef {self.entropy_coef:g}",
            f"  engine/trainer   off-policy correction: {correction}",
            f"  aggregation      {self.aggregation}",
            f"  critic           {critic}",
            f"  reference model  {self._reference_text(ref_sync_steps, ref_sync_alpha)}",
            "  episodes         environment tokens are context: not actions, not time steps (γ, λ "
            "and GAE's next value skip them); the score on the last model token, per-turn "
            "rewards on the last token of their turn",
        ]
        return "\n".join(rows)

    def _reference_text(self, sync_steps: int, alpha: float) -> str:
        if not self.uses_reference:
            return "no (not loaded)"
        if not sync_steps:
            return "yes, frozen"
        mix = (
            "replaced by the policy"
            if alpha == 1
            else f"ref ← {alpha:g}·policy + {1 - alpha:g}·ref"
        )
        return f"yes, every {sync_steps} steps {mix}"

    def _beta_text(self) -> str:
        beta = f"β={self.kl_coef:g} {self.kl_controller}"
        if self.kl_controller == "adaptive":
            beta += f" (target {self.kl_target:g}, horizon {self.kl_horizon:g})"
        return beta

    def _scores_text(self) -> str:
        parts = ["dynamic sampling (drop groups of equal scores)"] if self.dynamic_sampling else []
        if self.overlong_fraction:
            parts.append(
                f"overlong shaping over the last {self.overlong_fraction:g} of the token budget "
                "(rollout.max_new_tokens; episodes: rollout.max_episode_tokens, all tokens "
                "after the prompt)"
            )
        return "; ".join(parts) or "as the reward sources give them"

    def _score_scope_text(self) -> str:
        return {
            "group": f"/ (σ_g(s) + {self.group_std_eps:g}), σ of the group's scores, "
            f"{_bessel(self.group_std_unbiased)}",
            "batch_std": f"/ (σ(s) + {self.group_std_eps:g}), σ of the whole batch's scores, "
            f"{_bessel(self.group_std_unbiased)}, all-reduced across ranks",
        }.get(self.scope, "off")

    def _objective_text(self) -> str:
        bounds = f"1-{self.clip_low:g}, 1+{self.clip_high:g}"
        dual = f"dual-clip c={self.dual_clip:g}" if self.dual_clip else "no dual-clip"
        return {
            "ppo_clip": f"clip(ρ, {bounds}), {dual}",
            "gspo": f"GSPO: sequence ratio exp(mean_t log ρ) clipped to [{bounds}], {dual}",
            "gspo_token": f"GSPO-token: sg[s_i]·π_t/sg[π_t] clipped to [{bounds}], {dual}",
            "cispo": f"CISPO: -sg(clip(ρ, {bounds}))·A·log π",
            "pg": "plain policy gradient -A·log π (no ratio)",
        }[self.loss_name]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _bessel(unbiased: bool) -> str:
    return "n-1" if unbiased else "n"


def _bound(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _one_of(value: str, allowed: tuple[str, ...], field_name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{field_name}: {value!r} is not one of {', '.join(allowed)}")


ALGORITHM_FIELDS = tuple(f.name for f in dataclasses.fields(Algorithm) if f.name != "name")

__all__ = ["ALGORITHM_FIELDS", "KL_PLACEMENTS", "Algorithm"]
