"""The decode loop's KV cache and attention.

transformers' `DynamicCache` grows by `torch.cat` at every token: each decode step copies the
whole cache, and the ever-larger allocations fragment the heap (on the realistic benchmark
workload, 64 completions of up to 256 tokens after prompts of up to 256, the tiny model's
rollout spent ~29% of its time in `cat` and left 1.5 GB of RSS behind). A cache of
`GrowingLayer`s keeps each layer's keys and values in a buffer that grows by CHUNK positions at
a time and is written in place; `batch_select_indices(rows)` copies only the rows still
decoding into a new buffer, so finished completions leave the batch.

`sdpa_gqa` removes the other per-step copy: with an attention mask (left-padded
prompts), transformers' SDPA path expands the K/V heads to the query heads (`repeat_kv`, a copy
of the cache per layer and step, ~36% of that rollout); PyTorch's SDPA takes the grouped heads
as they are (`enable_gqa`), with the same result.

The G completions of a prompt share its keys and values. With SDPA on CPU the decode cache is
made of `SharedPromptLayer`s: the prefill's K/V once per distinct prompt, and each row's own
positions (its completion so far) in a `GrowingLayer`; `shared_prompt_attention` reads each
prompt's K/V once for its rows (one batched product per layer and step instead of one per row)
and merges the two parts in one softmax. On the realistic workload (prompts of 64–256 tokens,
G = 8) that is most of the decode's attention traffic, and rows that leave copy only their own
part. Outside SDPA on CPU the cache is `GrowingLayer`s and the attention transformers' own.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

CHUNK = 64  # positions added to a layer's buffer when it is full
_SHARED_SDPA = "advantage_shared_prompt_sdpa"


def decode_cache(model: torch.nn.Module, device: torch.device | str = "cpu") -> Cache:
    """The decode loop's cache for `model` (every layer full attention): `SharedPromptLayer`s
    with SDPA on CPU (read by `shared_prompt_attention`, see `decode_attention`), else
    `GrowingLayer`s; transformers' `DynamicCache` when some layer is not full attention
    (sliding-window layers keep their own kind)."""
    config = model.config
    if not full_attention_only(config):
        return DynamicCache(config=config)
    layers = config.get_text_config(decoder=True).num_hidden_layers
    if _replaces_sdpa(config, torch.device(device)):
        return Cache(layers=[SharedPromptLayer() for _ in range(layers)])
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


class SharedPromptLayer(DynamicLayer):
    """One layer's keys and values as the prefill's (`prompt_keys` `[P, kv_heads, Tp, d]`,
    once per distinct prompt) and each decode row's own positions (`own`, a `GrowingLayer`);
    `prompt_of` `[R]` is each row's prompt. The prefill's `batch_select_indices(rows)` sets it
    (rows → prompts, nothing copied); later ones keep rows. `update` returns the row's own
    keys and values: only `shared_prompt_attention` reads this layer."""

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.prompt_keys = self.prompt_values = self.prompt_of = self.slot = None
        self.prompt_bias = None  # [P, 1, 1, Tp]: -inf at the prompts' left pads
        self.own = GrowingLayer()

    def note_prompt_mask(self, mask: torch.Tensor | None) -> None:
        """The prefill's attention mask `[P, 1, Tp, Tp]` (None: no pads): its last query row
        sees every token of its prompt."""
        if mask is not None and self.prompt_keys is not None:
            seen = mask[:, :, -1:].bool()
            zeros = torch.zeros(seen.shape, dtype=self.prompt_keys.dtype, device=seen.device)
            self.prompt_bias = zeros.masked_fill(~seen, -float("inf"))

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.prompt_keys is None:  # the prefill
            self.prompt_keys, self.prompt_values = key_states, value_states
            return key_states, value_states
        return self.own.update(key_states, value_states)

    def get_seq_length(self) -> int:
        if not self.is_initialized or self.prompt_keys is None:
            return 0
        return self.prompt_keys.shape[-2] + self.own.get_seq_length()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        if self.prompt_of is None:
            self.prompt_of = indices
        else:
            self.prompt_of = self.prompt_of[indices]
            self.own.batch_select_indices(indices)
        # each row's slot among its prompt's rows: rows of a prompt sit in one [slots] block
        first = torch.full((self.prompt_keys.shape[0],), len(indices), device=indices.device)
        first = first.scatter_reduce(
            0, self.prompt_of, torch.arange(len(indices), device=indices.device), "amin"
        )
        self.slot = torch.arange(len(indices), device=indices.device) - first[self.prompt_of]
        self.slots = int(self.slot.max()) + 1 if len(indices) else 1


def shared_prompt_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    shared_prompt_cache=None,
    **kwargs,
):
    """A decode step's attention over a `SharedPromptLayer`: `query` `[R, H, 1, d]`, `key` and
    `value` the rows' own `[R, H_kv, t, d]`; each prompt's K/V `[H_kv, Tp, d]` is multiplied
    once with the queries of its rows (heads of a K/V head and rows of a prompt stacked), the
    scores over prompt and own positions take one softmax. The prompts' left pads are masked
    as the prefill's mask had them (rows see all their own positions). Returns `[R, 1, H, d]`.
    The prefill (and any other call): `sdpa_gqa`, noting the prompts' pads."""
    layers = getattr(shared_prompt_cache, "layers", None)
    layer = layers[module.layer_idx] if layers is not None else None
    if not isinstance(layer, SharedPromptLayer) or layer.prompt_of is None or query.shape[2] != 1:
        if isinstance(layer, SharedPromptLayer) and layer.prompt_of is None:
            layer.note_prompt_mask(attention_mask)
        return sdpa_gqa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    R, H, _, d = query.shape
    P, Hkv, Tp, _ = layer.prompt_keys.shape
    rows, slot, S, g = layer.prompt_of, layer.slot, layer.slots, H // Hkv
    q = query.reshape(R, Hkv, g, d) * (scaling if scaling is not None else d**-0.5)

    def stacked(x: torch.Tensor) -> torch.Tensor:  # [R, Hkv, g, n] → [P, Hkv, S·g, n]
        out = x.new_zeros(P, S, Hkv, g, x.shape[-1])
        out[rows, slot] = x
        return out.transpose(1, 2).reshape(P, Hkv, S * g, x.shape[-1])

    def unstacked(x: torch.Tensor) -> torch.Tensor:  # [P, Hkv, S·g, n] → [R, Hkv, g, n]
        return x.view(P, Hkv, S, g, x.shape[-1]).transpose(1, 2)[rows, slot]

    prompt_scores = stacked(q) @ layer.prompt_keys.transpose(-1, -2)
    if layer.prompt_bias is not None:
        prompt_scores = prompt_scores + layer.prompt_bias
    scores = torch.cat([unstacked(prompt_scores), q @ key.transpose(-1, -2)], -1)
    probs = scores.float().softmax(-1).to(value.dtype)
    out = unstacked(stacked(probs[..., :Tp]) @ layer.prompt_values) + probs[..., Tp:] @ value
    return out.reshape(R, 1, H, d), None


def sdpa_gqa(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **_
):
    """transformers' SDPA attention without `repeat_kv`: PyTorch groups the K/V heads."""
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


def register_attention(name: str, function) -> None:
    """`function` as transformers' attention implementation `name` (SDPA's masks)."""
    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


register_attention(_SHARED_SDPA, shared_prompt_attention)


def _replaces_sdpa(config, device: torch.device) -> bool:
    """Whether `sdpa_replaced` swaps this model's attention: SDPA on CPU. On CUDA a masked GQA
    call would fall back to the math kernel; eager and flash attention have their own paths."""
    return device.type == "cpu" and getattr(config, "_attn_implementation", None) == "sdpa"


@contextmanager
def sdpa_replaced(config, name: str, device: torch.device):
    """Inside, a model of `config` with SDPA attention, on CPU, attends with the registered
    implementation `name` instead (`_replaces_sdpa`); elsewhere nothing changes."""
    if not _replaces_sdpa(config, device):
        yield
        return
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def decode_attention(model: torch.nn.Module, device: torch.device):
    """Inside, `model` (SDPA attention, on CPU) attends with `shared_prompt_attention` (pass
    the `decode_cache` as `shared_prompt_cache=`), the prefill with grouped K/V heads."""
    return sdpa_replaced(model.config, _SHARED_SDPA, device)
