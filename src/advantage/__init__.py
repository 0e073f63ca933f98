"""advantage: reinforcement-learning post-training of language models.

Every policy-gradient method runs the same loop and differs only in how it turns rewards into
advantages; `advantage.core` holds that math, `advantage.train` runs the loop.
"""

from .core import PRESETS, Algorithm, resolve

__version__ = "0.1.0"

__all__ = ["PRESETS", "Algorithm", "__version__", "resolve"]
