"""What a resumed run may change in its configuration.

Every checkpoint saves the resolved config and the resolved `Algorithm` (trainer_state.json). On
resume, `config_changes(saved, now)` compares them field by field with `resume_view` (flat
`section.field` keys; the algorithm's resolved axes as `algo.*`, so that `algorithm=rloo` and
the equivalent `algo.*` overrides compare equal) and splits the differences in two:

- refused (`REFUSED`): the saved state would be meaningless under the new value; the run stops
  with one line listing them (`field: saved → now`) and what to do instead;
- applied: every other field takes its new value from the resumed step on, and the change is
  reported in one line. `ON_OPTIMIZER` fields are also set on the restored optimizer and
  schedule, whose saved values would otherwise silently win.

Decided here: `model.precision` is applied (bf16 is autocast only: weights and optimizer states
are fp32 either way, so the saved state stays valid); `data.*`, `reward.*` and the sampling
settings are the user's to change mid-run.
"""

from __future__ import annotations

import dataclasses
import json

from ..core.algorithm import Algorithm
from ..core.presets import resolve_axes

REFUSED: dict[str, str] = {
    "algo.*": "the saved baseline, KL-controller and optimizer states belong to the resolved "
    "algorithm's axes",
    "critic": "a critic's weights and optimizer are saved only when the algorithm has one",
    "synced reference": "a reference is saved only when model.ref_sync_steps > 0",
    "rollout.num_generations": "group baselines and scopes were computed over groups of G",
    "model.name_or_path": "the saved weights are a fine-tune of this model",
    "model.tokenizer": "the saved weights were trained on this tokenizer's ids",
    "model.lora": "the saved weights are the adapters of this LoRA setting (or the full model)",
    "model.critic": "the saved critic was initialised from this model",
}
"""Fields (a trailing `*` matches a prefix) whose change makes the saved state meaningless."""

ON_OPTIMIZER = (
    "train.lr",
    "train.critic_lr",
    "train.adam_betas",
    "train.adam_eps",
    "train.weight_decay",
)
"""Applied fields that are also written into the restored optimizer / schedule."""

NOT_COMPARED = ("checkpoint.resume",)
"""How to resume is not a property of the run."""


@dataclasses.dataclass(frozen=True)
class Change:
    key: str
    saved: object
    now: object

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.saved)} → {_show(self.now)}"


def resume_view(config: dict, algorithm: dict) -> dict[str, object]:
    """A run as flat keys: `section.field` for every config field (the raw `algo` overrides
    replaced by the resolved axes `algo.*`), `algorithm` (the preset's name) and two derived parts
    of the saved state, `critic` and `synced reference`. JSON-normalised (tuples → lists)."""
    view: dict[str, object] = {"algorithm": config["algorithm"]}
    view.update({f"algo.{k}": v for k, v in algorithm.items() if k != "name"})
    view["critic"] = Algorithm(**algorithm).uses_critic
    for section, fields in config.items():
        if isinstance(fields, dict) and section != "algo":
            view.update({f"{section}.{k}": v for k, v in fields.items()})
    view["synced reference"] = bool(config["model"].get("ref_sync_steps"))
    return json.loads(json.dumps(view))


def saved_algorithm(trainer_state: dict) -> dict:
    """The resolved algorithm a checkpoint saved (resolved from its config when older
    checkpoints lack it)."""
    if "algorithm" in trainer_state:
        return trainer_state["algorithm"]
    cfg = trainer_state["config"]
    return dataclasses.asdict(resolve_axes(cfg["algorithm"], cfg.get("algo", {})))


def is_refused(key: str) -> bool:
    return any(
        key.startswith(pattern[:-1]) if pattern.endswith("*") else key == pattern
        for pattern in REFUSED
    )


def config_changes(
    saved: dict[str, object], now: dict[str, object]
) -> tuple[list[Change], list[Change]]:
    """(refused, applied) differences between two `resume_view`s, in key order. The preset's
    name counts as refused only together with a refused axis (alone it is a label)."""
    changes = [
        Change(k, saved.get(k), now.get(k))
        for k in sorted(saved.keys() | now.keys(), key=_order(now))
        if k not in NOT_COMPARED and saved.get(k) != now.get(k)
    ]
    refused = [c for c in changes if is_refused(c.key)]
    applied = [c for c in changes if not is_refused(c.key)]
    if refused and applied and applied[0].key == "algorithm":
        refused.insert(0, applied.pop(0))
    return refused, applied


def _order(now: dict[str, object]):
    """The current view's key order (config order), unknown keys last."""
    position = {k: i for i, k in enumerate(now)}
    return lambda k: position.get(k, len(position))


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)) or value is None:
        return json.dumps(value)
    return str(value)
