"""Pure tensor math of `advantage`: KL estimators, baselines, normalisation scopes, returns and
GAE, policy objectives (PPO clip, GSPO, CISPO, PG) and value loss, engine/trainer off-policy
corrections, reward combination and shaping, aggregation, KL controllers and the presets.

No models, no I/O: tensors and numbers in, tensors (and detached metric tensors) out.
"""

from .advantages import AdvantageInputs, AdvantageOutputs, compute_advantages
from .algorithm import ALGORITHM_FIELDS, KL_PLACEMENTS, Algorithm
from .baselines import (
    BASELINES,
    EMABaseline,
    MovingAverageBaseline,
    group_mean_advantages,
    leave_one_out_advantages,
    make_baseline,
)
from .kl import KL_ESTIMATORS, kl_k1, kl_k2, kl_k3, kl_penalty
from .kl_control import KL_CONTROLLERS, AdaptiveKLController, FixedKLController
from .losses import (
    AGGREGATIONS,
    aggregate,
    bradley_terry_loss,
    entropy_from_logits,
    logprobs_from_logits,
    policy_loss,
    value_loss,
)
from .normalize import (
    SCOPES,
    RunningMoments,
    batch_std_normalize,
    group_normalize,
    group_std,
    masked_mean,
    masked_std,
    masked_whiten,
)
from .objectives import OBJECTIVES, RATIO_LEVELS, objective_name, policy_objective
from .offpolicy import CORRECTION_LEVELS, CORRECTION_MODES, rollout_correction
from .presets import PRESETS, preset_table, resolve
from .registry import Registry
from .returns import discounted_returns, gae, last_token_mask, token_rewards
from .scores import REWARD_COMBINATIONS, combine_rewards
from .shaping import overlong_penalty

__all__ = [
    "AGGREGATIONS",
    "ALGORITHM_FIELDS",
    "BASELINES",
    "CORRECTION_LEVELS",
    "CORRECTION_MODES",
    "KL_CONTROLLERS",
    "KL_ESTIMATORS",
    "KL_PLACEMENTS",
    "OBJECTIVES",
    "PRESETS",
    "RATIO_LEVELS",
    "REWARD_COMBINATIONS",
    "SCOPES",
    "AdaptiveKLController",
    "AdvantageInputs",
    "AdvantageOutputs",
    "Algorithm",
    "EMABaseline",
    "FixedKLController",
    "MovingAverageBaseline",
    "Registry",
    "RunningMoments",
    "aggregate",
    "batch_std_normalize",
    "bradley_terry_loss",
    "combine_rewards",
    "compute_advantages",
    "discounted_returns",
    "entropy_from_logits",
    "gae",
    "group_mean_advantages",
    "group_normalize",
    "group_std",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "last_token_mask",
    "leave_one_out_advantages",
    "logprobs_from_logits",
    "make_baseline",
    "masked_mean",
    "masked_std",
    "masked_whiten",
    "objective_name",
    "overlong_penalty",
    "policy_loss",
    "policy_objective",
    "preset_table",
    "resolve",
    "rollout_correction",
    "token_rewards",
    "value_loss",
]
