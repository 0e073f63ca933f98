"""The decode loop's KV cache and attention.

transformers' `DynamicCache` grows by `torch.cat` at every token: each decode step copies the
whole cache, and the ever-larger allocations fragment the heap (on the realistic benchmark
workload, 64 completions of up to 256 tokens after prompts of up to 256, the tiny model's
rollout spent ~29% of its time in `cat` and left 1.5 GB of RSS behind). A cache of
`GrowingLayer`s keeps each layer's keys and values in a buffer that grows by CHUNK positions at
a time and is written in place; `batch_select_indices(rows)` copies only the rows still
decoding into a new buffer, so finished completions leave the batch.

`grouped_kv_attention` removes the other per-step copy: with an attention mask (left-padded
prompts), transformers' SDPA path expands the K/V heads to the query heads (`repeat_kv`, a copy
of the cache per layer and step, ~36% of that rollout); PyTorch's SDPA takes the grouped heads
as they are (`enable_gqa`), with the same result.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

CHUNK = 64  # positions added to a layer's buffer when it is full
_GQA_SDPA = "advantage_sdpa_gqa"


def decode_cache(model: torch.nn.Module) -> Cache:
    """A cache of `GrowingLayer`s for `model` (every layer full attention), else transformers'
    `DynamicCache` (sliding-window layers keep their own kind)."""
    if not full_attention_only(model.config):
        return DynamicCache(config=model.config)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[GrowingLayer() for _ in range(layers)])


def full_attention_only(config) -> bool:
    """Whether every decoder layer of a model of this config attends to the whole context (no
    sliding-window or other layer types)."""
    get_text = getattr(config, "get_text_config", None)
    text = get_text(decoder=True) if get_text else config
    return all(t == "full_attention" for t in getattr(text, "layer_types", None) or [])


class GrowingLayer(DynamicLayer):
    """One layer's keys and values `[rows, kv_heads, length, head_dim]`: views of the first
    `length` positions of buffers with room for more."""

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length = 0
        self._keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self._values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, new = self.length, key_states.shape[-2]
        if n + new > self._keys.shape[-2]:
            self._move(None, n + new + CHUNK)
        self._keys[:, :, n : n + new] = key_states
        self._values[:, :, n : n + new] = value_states
        self.length = n + new
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (in that order): one copy into buffers of their size."""
        if self.is_initialized:
            self._move(indices, self.length + CHUNK)

    def _move(self, rows: torch.Tensor | None, capacity: int) -> None:
        """New buffers of `capacity` positions holding `rows` (None: all) of the cache."""
        n = self.length
        for name in ("_keys", "_values"):
            old = getattr(self, name)
            picked = old[:, :, :n] if rows is None else old[rows, :, :n]
            buffer = old.new_empty((picked.shape[0], old.shape[1], capacity, old.shape[-1]))
            buffer[:, :, :n] = picked
            setattr(self, name, buffer)
        self.keys, self.values = self._keys[:, :, :n], self._values[:, :, :n]


def sdpa_gqa(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **_
):
    """transformers' SDPA attention without `repeat_kv`: PyTorch groups the K/V heads. A decode
    step in fp32 (one query per row) is two batched products and a softmax instead
    (`decode_attention`)."""
    # not under bf16 autocast (there rotary embeddings make the query fp32 but the value is
    # bf16, and its products would leave the chosen bf16 kernels)
    autocasting = torch.is_autocast_enabled(query.device.type)
    if query.shape[2] == 1 and value.dtype == torch.float32 and not dropout and not autocasting:
        return decode_attention(query, key, value, attention_mask, scaling), None
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def decode_attention(query, key, value, attention_mask, scaling=None) -> torch.Tensor:
    """One query per row `[R, H, 1, D]` against grouped keys and values `[R, KV, T, D]`, with
    SDPA's mask (bool, True = attend; or additive; or None): the result `[R, 1, H, D]` of
    PyTorch's CPU SDPA up to fp32 rounding, faster there for one query (its flash kernel is
    built for blocks of queries: 1.03–1.6× on the decode shapes of `benchmarks/`)."""
    R, H, _, D = query.shape
    KV, T = key.shape[1], key.shape[2]
    scores = torch.matmul(query.view(R, KV, H // KV, D), key.transpose(-1, -2))  # [R, KV, g, T]
    scores.mul_(scaling if scaling is not None else D**-0.5)
    if attention_mask is not None:
        mask = attention_mask.reshape(R, 1, 1, T)
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask)
    out = torch.matmul(torch.softmax(scores, -1), value)  # [R, KV, g, Dv]
    return out.view(R, 1, H, value.shape[-1])


def register_attention(name: str, function) -> None:
    """`function` as transformers' attention implementation `name` (SDPA's masks)."""
    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


register_attention(_GQA_SDPA, sdpa_gqa)


@contextmanager
def sdpa_replaced(config, name: str, device: torch.device):
    """Inside, a model of `config` with SDPA attention, on CPU, attends with the registered
    implementation `name` instead. Elsewhere nothing changes: on CUDA a masked GQA call would
    fall back to the math kernel, and eager or flash attention have their own paths."""
    if device.type != "cpu" or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def grouped_kv_attention(model: torch.nn.Module, device: torch.device):
    """Inside, `model` (SDPA attention, on CPU) attends with grouped K/V heads (`sdpa_gqa`)."""
    return sdpa_replaced(model.config, _GQA_SDPA, device)
