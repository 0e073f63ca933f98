"""advantage: reinforcement-learning post-training of language models.

Every policy-gradient method runs the same loop and differs only in how it turns rewards into
advantages; `advantage.core` holds that math, `advantage.rl` runs the loop.

The names below are imported on first use (module `__getattr__`), so `import advantage` and the
command line's help and argument errors do not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {  # name → the module that defines it
    "PRESETS": "advantage.core",
    "Algorithm": "advantage.core",
    "resolve": "advantage.core",
    "make_tiny_model": "advantage.tasks.tiny",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'advantage' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


def train(
    config=None,
    reward_funcs=None,
    overrides=None,
    eval_funcs=None,
    *,
    tools=None,
    environment_factory=None,
):
    """Train with a Config, a dict or a YAML path; `reward_funcs` (training) and `eval_funcs`
    (the held-out judge) are TRL-style callables; `tools` / `environment_factory` (TRL's names)
    make rollouts multi-turn episodes. See `advantage.rl.trainer.train`."""
    from .rl.trainer import train as _train

    return _train(
        config,
        reward_funcs=reward_funcs,
        overrides=overrides,
        eval_funcs=eval_funcs,
        tools=tools,
        environment_factory=environment_factory,
    )


def sft(config=None, overrides=None) -> dict:
    """Supervised fine-tuning (`advantage sft`) with a dict or a YAML path and `key=value`
    overrides; returns {"loss", "seconds", "final" (the model folder), "eval_loss" with data.eval}.
    """
    from .engine.config_files import load_config
    from .stages.sft import SFTConfig, run_sft

    if config is None or isinstance(config, dict):
        return run_sft(load_config(SFTConfig, None, overrides, base=config))
    return run_sft(load_config(SFTConfig, config, overrides))


__all__ = ["PRESETS", "Algorithm", "__version__", "make_tiny_model", "resolve", "sft", "train"]
