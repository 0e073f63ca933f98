"""The presets (SPEC §3 and the objective axis of §7) as plain data, `resolve` (a preset name
plus overrides → an `Algorithm`), and the README's preset table generated from them."""

from __future__ import annotations

from .algorithm import ALGORITHM_FIELDS, Algorithm

# The presets of SPEC §3 as plain data: each is a set of overrides of the Algorithm defaults.
PRESETS: dict[str, dict] = {
    "ppo": dict(
        baseline="critic", scope="batch", kl_placement="reward", kl_estimator="k1",
        kl_coef=0.05, aggregation="token_mean", gamma=1.0, lam=0.95,
    ),
    "grpo": dict(
        baseline="group_mean", scope="group", kl_placement="loss", kl_estimator="k3",
        kl_coef=0.04, aggregation="seq_mean_token_mean",
    ),
    "dr_grpo": dict(
        baseline="group_mean", scope="none", kl_placement="none", kl_estimator="k3",
        kl_coef=0.0, aggregation="seq_mean_token_sum_norm",
    ),
    "rloo": dict(
        baseline="leave_one_out", scope="none", kl_placement="reward", kl_estimator="k1",
        kl_coef=0.05, aggregation="token_mean",
    ),
    "reinforce": dict(
        baseline="ema", scope="none", kl_placement="reward", kl_estimator="k1",
        kl_coef=0.05, aggregation="token_mean", ema_alpha=0.9,
    ),
    "reinforce_pp": dict(
        baseline="none", scope="batch", kl_placement="reward", kl_estimator="k1",
        kl_coef=0.01, aggregation="token_mean",
    ),
    "reinforce_pp_baseline": dict(
        baseline="group_mean", scope="batch", kl_placement="reward", kl_estimator="k1",
        kl_coef=0.01, aggregation="token_mean",
    ),
    # GSPO (arXiv:2507.18071 §5): sequence ratio, its clip range 3e-4 / 4e-4, no KL
    "gspo": dict(
        baseline="group_mean", scope="group", kl_placement="none", kl_coef=0.0,
        aggregation="seq_mean_token_mean", ratio_level="sequence", clip_low=3e-4, clip_high=4e-4,
    ),
    # CISPO (arXiv:2506.13585 §3.1): clipped IS weight, no lower bound, weight ≤ 5 (ScaleRL / TRL)
    "cispo": dict(
        baseline="group_mean", scope="group", kl_placement="none", kl_coef=0.0,
        aggregation="token_mean", objective="cispo", clip_low=1.0, clip_high=4.0,
    ),
    # DAPO (arXiv:2503.14476): clip-higher, token-level loss, dynamic sampling, overlong shaping
    "dapo": dict(
        baseline="group_mean", scope="group", kl_placement="none", kl_coef=0.0,
        aggregation="token_mean", clip_low=0.2, clip_high=0.28, dynamic_sampling=True,
        overlong_fraction=0.2,
    ),
}  # fmt: skip


def resolve(preset: str = "grpo", **overrides) -> Algorithm:
    """The Algorithm of a named preset, with any axis overridden: `resolve("grpo", scope="batch")`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown algorithm preset {preset!r}; valid: {', '.join(PRESETS)}")
    unknown = set(overrides) - set(ALGORITHM_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown algorithm field(s) {sorted(unknown)}; valid: {', '.join(ALGORITHM_FIELDS)}"
        )
    return Algorithm(name=preset, **{**PRESETS[preset], **overrides})


PRESET_TABLE_COLUMNS = (
    ("baseline", "baseline"),
    ("scope", "scope"),
    ("KL", "kl_placement"),
    ("estimator", "kl_estimator"),
    ("KL control", "kl_controller"),
    ("β", "kl_coef"),
    ("aggregation", "aggregation"),
    ("critic", "uses_critic"),
    ("γ", "gamma"),
    ("λ", "lam"),
    ("group σ ε", "group_std_eps"),
    ("group σ Bessel", "group_std_unbiased"),
    ("whiten ε", "whiten_eps"),
    ("whiten Bessel", "whiten_unbiased"),
    ("ε_low / ε_high", ("clip_low", "clip_high")),
    ("dual clip", "dual_clip"),
    ("ε_v", "value_clip"),
    ("EMA α", "ema_alpha"),
    ("objective", "loss_name"),
    ("dynamic sampling", "dynamic_sampling"),
    ("overlong fraction", "overlong_fraction"),
)


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "off"
    if isinstance(value, float):
        return f"{value:g}"
    return f"`{value}`" if isinstance(value, str) else str(value)


def preset_table() -> str:
    """The README's preset table (markdown), generated from PRESETS so the two cannot drift."""
    header = "| preset | " + " | ".join(title for title, _ in PRESET_TABLE_COLUMNS) + " |"
    rows = [header, "|" + "---|" * (len(PRESET_TABLE_COLUMNS) + 1)]
    for name in PRESETS:
        algo = resolve(name)
        cells = []
        for _, attr in PRESET_TABLE_COLUMNS:
            if isinstance(attr, tuple):
                cells.append(" / ".join(_cell(getattr(algo, a)) for a in attr))
            else:
                cells.append(_cell(getattr(algo, attr)))
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


__all__ = ["PRESETS", "preset_table", "resolve"]


def resolve_axes(preset: str, axes: dict) -> Algorithm:
    """`resolve` with the axes of an `algo:` config section: an axis set to None keeps the
    preset's value (as in a config; `resolve` itself takes an explicit None as the value)."""
    return resolve(preset, **{k: v for k, v in axes.items() if v is not None})
