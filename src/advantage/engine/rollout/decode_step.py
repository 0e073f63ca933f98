"""A decode step without transformers' model-level machinery, for the Llama family.

A decode step of a Llama or Qwen2 model (SDPA attention, no sliding window; one new token per
row over a KV cache) in the order of the model's own forward: the embedding and rotary modules,
then per layer its RMSNorm, q/k/v projections, the family's `apply_rotary_pos_emb`, the
cache's `update`, the attention implementation the model is set to, o projection and residual,
RMSNorm, MLP and residual; the final RMSNorm and the LM head. Only the forwards of the model,
its base model, decoder layers and attention modules are replaced — the plumbing they add per
step (keyword handling, output classes, a 4-D mask built through the mask interface, which for
one query per row is the 2-D mask broadcast). Its logits equal the model's bitwise
(`tests/test_decoder.py`).

`lean_decode_step(model)` gives the step for transformers' own classes, unchanged, else None
(the decode loop then calls the model): sharded models (FSDP2), replaced forwards and hooks on
the modules whose forward it replaces (accelerate's offload, a user's), and peft-wrapped models
keep the model's forward.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .kv_cache import full_attention_only

MODEL_TYPES = ("llama", "qwen2")
_FAMILIES = tuple(f"transformers.models.{t}" for t in MODEL_TYPES)


def lean_decode_step(model: torch.nn.Module) -> Callable | None:
    """`step(tokens [R], positions [R, 1], cache, mask [R, T] | None) -> logits [R, V]` for a
    Llama or Qwen2 causal LM with SDPA attention over full contexts, else None. The step runs
    inside `kv_cache.decode_attention_for` (it attends with the implementation set there)."""
    config, base = model.config, getattr(model, "model", None)
    if config.model_type not in MODEL_TYPES or not full_attention_only(config):
        return None
    if getattr(config, "_attn_implementation", None) != "sdpa" or base is None:
        return None  # the decode loop sets its own SDPA-mask implementations (kv_cache.py)
    # the modules whose own forward the step replaces (it calls their parts)
    if not (_stock(model) and _stock(base)):
        return None
    layers = base.layers[: config.num_hidden_layers]
    if not all(_stock(m) for layer in layers for m in (layer, layer.self_attn)):
        return None
    rotary = getattr(sys.modules[type(base).__module__], "apply_rotary_pos_emb", None)
    if rotary is None or not len(layers):
        return None

    def step(tokens, positions, cache, mask):
        hidden = base.embed_tokens(tokens[:, None])  # [R, 1, H]
        cos, sin = base.rotary_emb(hidden, positions)
        rows = hidden.shape[0]
        mask = None if mask is None else mask.bool()[:, None, None, :]  # [R, 1, 1, T]
        attention = ALL_ATTENTION_FUNCTIONS[config._attn_implementation]
        for layer in layers:
            block = layer.self_attn
            x = layer.input_layernorm(hidden)
            shape = (rows, 1, -1, block.head_dim)
            query = block.q_proj(x).view(shape).transpose(1, 2)
            key = block.k_proj(x).view(shape).transpose(1, 2)
            value = block.v_proj(x).view(shape).transpose(1, 2)
            query, key = rotary(query, key, cos, sin)
            key, value = cache.update(key, value, block.layer_idx)
            out, _ = attention(block, query, key, value, mask, dropout=0.0, scaling=block.scaling)
            hidden = hidden + block.o_proj(out.reshape(rows, 1, -1).contiguous())
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return model.lm_head(base.norm(hidden))[:, -1]

    return step


def _stock(module: torch.nn.Module) -> bool:
    """Whether `module` is transformers' own Llama or Qwen2 class, unchanged: no replaced
    forward, no hooks (accelerate's offload, a user's) that calling its parts would skip."""
    family = type(module).__module__.rsplit(".", 1)[0]
    return (
        family in _FAMILIES
        and "forward" not in vars(module)
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not hasattr(module, "_hf_hook")
    )
