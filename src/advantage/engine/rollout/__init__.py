"""Rollout engines behind one small interface (`GenerationBackend`)."""

from .base import GenerationBackend, Rollout, SamplingParams, pad_completions, pad_prompts
from .hf import TransformersBackend

__all__ = [
    "GenerationBackend",
    "Rollout",
    "SamplingParams",
    "TransformersBackend",
    "pad_completions",
    "pad_prompts",
]
