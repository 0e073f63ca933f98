"""Loading the policy, reference, critic and tokenizer; log-probs and values of a rollout.

Log-probs are computed on `logits / temperature` (the sampling distribution), only for the
completion positions (`logits_to_keep`), without materialising a full log-softmax.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path

import torch

from .configlib import ConfigError
from .core import entropy_from_logits, logprobs_from_logits
from .rollout import Rollout

log = logging.getLogger("advantage")


def quiet_transformers() -> None:
    """No per-load progress bars from transformers (the run has its own progress)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def resolve_model_path(name_or_path: str, field: str = "model.name_or_path") -> str:
    """`builtin:NAME` → its cached folder (built on first use); local paths must exist."""
    if name_or_path.startswith("builtin:"):
        from .tasks import builtin_model_path

        try:
            return str(builtin_model_path(name_or_path.removeprefix("builtin:")))
        except ValueError as e:
            raise ConfigError(f"{field}: {e}") from None
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise ConfigError(f"{field}: the folder {name_or_path!r} does not exist")
    return str(Path(name_or_path).expanduser()) if looks_local else name_or_path


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer of {path!r} has neither a pad nor an EOS token; set one")
        tokenizer.pad_token = tokenizer.eos_token
        log.warning(
            "tokenizer has no pad token: using the EOS token %r as pad", tokenizer.eos_token
        )
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=trust_remote_code
    )


def load_critic(path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """A value model: the backbone of `path` with a 1-output token head (zero-initialised)."""
    from transformers import AutoConfig, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    config.num_labels = 1
    config.classifier_dropout = 0.0  # values must not be noisy
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new value head is "missing from the checkpoint" by design
    try:
        critic = AutoModelForTokenClassification.from_pretrained(
            path, config=config, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    head = critic.score if hasattr(critic, "score") else critic.classifier
    torch.nn.init.zeros_(head.weight)
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)
    return critic


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


@torch.no_grad()
def sync_reference(ref: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """θ_ref ← α·θ + (1-α)·θ_ref (seed 003; α = 1 copies)."""
    for p_ref, p in zip(ref.parameters(), policy.parameters(), strict=True):
        p_ref.lerp_(p.detach().to(p_ref.dtype), alpha)


def autocast(precision: str, device: torch.device | str = "cpu"):
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def completion_logprobs(
    model: torch.nn.Module,
    batch: Rollout,
    temperature: float = 1.0,
    with_entropy: bool = False,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs `[B, Tc]` of the completion tokens under `model` (and their entropy `[B, Tc]`).

    The logit predicting completion token j sits at position Tp + j - 1, so only the last
    Tc + 1 positions go through the LM head.
    """
    device = next(model.parameters()).device
    Tc = batch.completion_ids.shape[1]
    with autocast(precision, device):
        out = model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            position_ids=batch.position_ids.to(device),
            logits_to_keep=Tc + 1,
            use_cache=False,
        )
    logits = out.logits[:, :-1].float() / temperature  # [B, Tc, V]
    logprobs = logprobs_from_logits(logits, batch.completion_ids.to(device))
    entropy = entropy_from_logits(logits) if with_entropy else None
    return logprobs, entropy


def completion_values(
    critic: torch.nn.Module, batch: Rollout, precision: str = "fp32"
) -> torch.Tensor:
    """Critic values `[B, Tc]`: V at the state before each completion token (position Tp + j - 1)."""
    device = next(critic.parameters()).device
    Tc = batch.completion_ids.shape[1]
    with autocast(precision, device):
        out = critic(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            position_ids=batch.position_ids.to(device),
            use_cache=False,
        )
    return out.logits[:, -Tc - 1 : -1, 0].float()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
