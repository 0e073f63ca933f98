"""Rollout engines behind one small interface (`GenerationBackend`)."""

from .base import (
    GenerationBackend,
    NonFiniteLogitsError,
    Rollout,
    SamplingParams,
    pad_completions,
    pad_prompts,
)
from .hf import TransformersBackend

__all__ = [
    "GenerationBackend",
    "NonFiniteLogitsError",
    "Rollout",
    "SamplingParams",
    "TransformersBackend",
    "pad_completions",
    "pad_prompts",
]
