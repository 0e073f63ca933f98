"""Loading the policy, reference, critic and tokenizer; log-probs and values of a rollout.

Log-probs are computed on `logits / temperature` (the sampling distribution), only for the
completion positions (`logits_to_keep`), without materialising a full log-softmax. The forward
runs on packed rows (`packing.py`: each prompt once per group, no padding) when the model's
attention takes a 4D mask, else on the `[B, Tp + Tc]` rectangle with the prompt shared through
a KV cache (`completion_outputs`).
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager

import torch

from ..core import entropy_from_logits, logprobs_from_logits
from .configlib import ConfigError
from .hub import local_or_hub
from .packed_attention import segment_attention_for
from .packing import attention_mask, pack, packable
from .parallel import unwrap
from .precision import autocast
from .rollout import Rollout

log = logging.getLogger("advantage")


def quiet_transformers() -> None:
    """No per-load progress bars from transformers (the run has its own progress)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def check_model_path(name_or_path: str, field: str = "model.name_or_path") -> str:
    """A local folder (which must exist, `~` expanded) or a hub id that can be loaded (see
    `engine.hub`): a typo fails at once, naming `field`."""
    return local_or_hub(name_or_path, field)


@contextmanager
def _loading(path: str):
    """A folder or hub id that transformers cannot load: one line, not its traceback."""
    try:
        yield
    except OSError as e:
        raise ConfigError(f"cannot load {path!r}: {str(e).strip().splitlines()[0]}") from None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer of `path` (left padding; the EOS token as pad when there is none), as its
    `tokenizer.json` defines it (`as_saved`)."""
    from transformers import AutoTokenizer

    with _loading(path):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = as_saved(tokenizer, path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer of {path!r} has neither a pad nor an EOS token; set one")
        tokenizer.pad_token = tokenizer.eos_token
        log.warning(
            "tokenizer has no pad token: using the EOS token %r as pad", tokenizer.eos_token
        )
    tokenizer.padding_side = "left"
    return tokenizer


def check_vocabulary(tokenizer, model: torch.nn.Module, field: str = "model.tokenizer") -> None:
    """A tokenizer with more tokens than the model has embedding rows is refused (its ids past
    the table fail inside the model's forward); one with fewer than half as many is warned about
    (the model samples ids it cannot decode: completions lose their text). Models pad their
    tables past their tokenizer's size (Qwen2: 151936 rows for 151665 tokens), so fewer is not
    an error."""
    rows, tokens = model.get_input_embeddings().num_embeddings, len(tokenizer)
    if tokens > rows:
        raise ConfigError(
            f"{field}: the tokenizer has {tokens} tokens but the model's embedding has {rows} "
            "rows; use the model's own tokenizer (ids past its table cannot be embedded)"
        )
    if 2 * tokens < rows:
        log.warning(
            f"{field}: the tokenizer has {tokens} tokens but the model's embedding has {rows} "
            "rows; is it the model's own tokenizer? (ids it cannot decode will be sampled)"
        )


def as_saved(tokenizer, path: str):
    """`tokenizer`, or the folder's own `tokenizer.json` loaded as it is when `AutoTokenizer`
    rebuilt it as a different kind of model. transformers 5 forces the model family's tokenizer
    class on some families (`qwen2` among them): for a folder whose `tokenizer.json` is a
    character-level `WordLevel` model (`make_tiny_model`, the built-in models) it builds Qwen2's
    byte-level BPE from the vocabulary instead, which drops spaces, newlines and unknown
    characters without a word ('a 1' → 'a1'). A tokenizer that is the saved one is returned
    unchanged (every hub checkpoint whose class matches its file)."""
    import json
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    saved = Path(path) / "tokenizer.json"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not saved.is_file() or backend is None:
        return tokenizer
    kind = json.loads(saved.read_text()).get("model", {}).get("type")
    if kind is None or kind == type(backend.model).__name__:
        return tokenizer
    log.info(
        "%s: loading tokenizer.json as saved (%s, not %s)", path, kind, type(tokenizer).__name__
    )
    return PreTrainedTokenizerFast.from_pretrained(path)


def load_causal_lm(path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with _loading(path):
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


def add_lora(model: torch.nn.Module, options: dict) -> torch.nn.Module:
    """Wrap `model` with trainable LoRA adapters (peft); the base weights are frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ConfigError("model.lora needs peft: pip install 'advantage[peft]'") from e
    options = {
        "task_type": "CAUSAL_LM",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": "all-linear",
        **options,
    }
    try:  # peft checks some options when it builds the layers (r = 0, unknown modules)
        return get_peft_model(model, LoraConfig(**options))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.lora: {e}") from None


class AdapterDisabled(torch.nn.Module):
    """The reference of a LoRA run: the policy's base model, called with its adapters disabled.
    It shares every weight with the policy (no second copy)."""

    def __init__(self, peft_model: torch.nn.Module) -> None:
        super().__init__()
        self.peft_model = peft_model

    @property
    def config(self):
        return self.peft_model.config

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)


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


def _shared_prompts(batch: Rollout) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(first row of each run of identical consecutive prompts `[U]`, row → run `[B]`), or None
    when no two neighbouring rows share a prompt."""
    _, inverse, counts = torch.unique_consecutive(
        batch.prompt_ids, dim=0, return_inverse=True, return_counts=True
    )
    if len(counts) == batch.prompt_ids.shape[0]:
        return None
    first = torch.cumsum(counts, 0) - counts
    return first, inverse


def completion_outputs(
    model: torch.nn.Module, batch: Rollout, precision: str = "fp32", share_prompts: bool = True
) -> torch.Tensor:
    """Per-position outputs `[B, Tc, ...]` (LM logits, or critic scores) at the positions that
    predict / value each completion token: position Tp + j - 1 for completion token j.

    **Shared prompts.** The G completions of a prompt repeat the same prompt G times. When rows
    share a prompt, the prompt goes through the model once, its KV cache is indexed out to the
    G rows, and only the completion tokens are run on top of it: the same logits (up to float
    rounding) and, in training, the same gradient (the prompt's activations receive the sum of
    their G rows' gradients), for (Tp + Tc)/(Tp/G + Tc) less work.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    Tc = batch.completion_ids.shape[1]
    shared = _shared_prompts(batch) if share_prompts and not _checkpointing(model) else None
    with autocast(precision, device, unwrap(model)):
        if shared is None:
            out = model(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                position_ids=batch.position_ids.to(device),
                logits_to_keep=Tc + 1,
                use_cache=False,
            )
            return out.logits[:, -Tc - 1 : -1]
        first, inverse = (t.to(device) for t in shared)
        prompt_ids, prompt_mask = batch.prompt_ids.to(device), batch.prompt_mask.to(device)
        # 1. each distinct prompt once, filling a KV cache
        cache = DynamicCache(config=unwrap(model).config)
        u_mask = prompt_mask[first]
        out = model(
            input_ids=prompt_ids[first],
            attention_mask=u_mask.long(),
            position_ids=(u_mask.long().cumsum(-1) - 1).clamp(min=0),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        first_token = out.logits[:, -1:][inverse]  # [B, 1, ...] predicts completion token 0
        if Tc == 1:
            return first_token
        # 2. the completions (all but the last token) on top of their prompt's cache
        cache.batch_select_indices(inverse)
        completion_ids = batch.completion_ids[:, :-1].to(device)
        prompt_len = prompt_mask.sum(-1, keepdim=True)
        out = model(
            input_ids=completion_ids,
            attention_mask=torch.cat(
                [prompt_mask, batch.completion_mask[:, :-1].to(device)], 1
            ).long(),
            position_ids=prompt_len + torch.arange(Tc - 1, device=device),
            past_key_values=cache,
            use_cache=True,
        )
        return torch.cat([first_token, out.logits], dim=1)


def completion_logprobs(
    model: torch.nn.Module,
    batch: Rollout,
    temperature: float = 1.0,
    with_entropy: bool | str = False,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs `[B, Tc]` of the completion tokens under `model` (and their entropy `[B, Tc]`:
    `with_entropy=True` detached, as a metric; `"grad"` with its graph, for an entropy bonus),
    on logits / temperature; 0 where `completion_mask` is False."""
    logits, mask = _token_outputs(model, batch, precision)  # [E, V] or [B, Tc, V]
    logits = logits.float() / temperature
    targets = batch.completion_ids.to(logits.device)
    logprobs = logprobs_from_logits(logits, targets if mask is None else targets[mask])
    entropy = None
    if with_entropy == "grad":
        entropy = entropy_from_logits(logits)
    elif with_entropy:  # a metric only: no graph
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
    if mask is None:  # the rectangle: its pads hold what the model made of them
        valid = batch.completion_mask.to(logits.device).bool()
        logprobs = torch.where(valid, logprobs, 0.0)
        entropy = None if entropy is None else torch.where(valid, entropy, 0.0)
    return _unpacked(logprobs, mask), _unpacked(entropy, mask)


def completion_values(
    critic: torch.nn.Module, batch: Rollout, precision: str = "fp32"
) -> torch.Tensor:
    """Critic values `[B, Tc]`: V at the state before each completion token (position Tp + j - 1)."""
    values, mask = _token_outputs(critic, batch, precision)
    return _unpacked(values[..., 0].float(), mask)


def _token_outputs(
    model: torch.nn.Module, batch: Rollout, precision: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The outputs that predict / value each completion token: `[E, ...]` from packed rows with
    the completion mask `[B, Tc]` that places them (E = its True entries), or `[B, Tc, ...]`
    from the rectangle (`completion_outputs`) and None, when the model cannot take packed rows."""
    config = unwrap(model).config
    if not packable(config, batch):
        return completion_outputs(model, batch, precision), None
    device = next(model.parameters()).device
    # any token id pads: outputs at pads are never read
    packed = pack(batch, pad_id=0, bucketed=precision != "fp32")
    mask = attention_mask(packed.allowed, config._attn_implementation, torch.float32)
    with (
        autocast(precision, device, unwrap(model)),
        segment_attention_for(config, device, packed, _checkpointing(model)) as segments,
    ):
        out = model(
            input_ids=packed.input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=packed.position_ids.to(device),
            logits_to_keep=packed.columns.to(device),
            use_cache=False,
            **segments,
        )
    return packed.entries(out.logits), batch.completion_mask.to(device)


def _unpacked(values: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Per-token values `[E]` placed at the True entries of `mask` `[B, Tc]` (0 elsewhere)."""
    if values is None or mask is None:
        return values
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(
        mask, values
    )


def _checkpointing(model: torch.nn.Module) -> bool:
    """Gradient checkpointing in training mode turns the KV cache off."""
    inner = unwrap(model)
    return bool(getattr(inner, "is_gradient_checkpointing", False)) and inner.training


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
