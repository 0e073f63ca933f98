"""advantage: reinforcement-learning post-training of language models.

Every policy-gradient method runs the same loop and differs only in how it turns rewards into
advantages; `advantage.core` holds that math, `advantage.train` runs the loop.
"""

from .core import PRESETS, Algorithm, resolve

__version__ = "0.1.0"


def train(config=None, reward_funcs=None, overrides=None, *, tools=None, environment_factory=None):
    """Train with a Config, a dict or a YAML path; `reward_funcs` are TRL-style callables;
    `tools` / `environment_factory` (TRL's names) make rollouts multi-turn episodes.

    See `advantage.rl.trainer.train`.
    """
    from .rl.trainer import train as _train

    return _train(
        config,
        reward_funcs=reward_funcs,
        overrides=overrides,
        tools=tools,
        environment_factory=environment_factory,
    )


__all__ = ["PRESETS", "Algorithm", "__version__", "resolve", "train"]
