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

`SharedPromptCache` keeps each prompt's keys and values once: the G completions of a prompt point
at its block and hold only their own positions. A decode step reads the cache once per token
(memory-bound on CPU: on the realistic benchmark workload the `small` model's step read ~94 MB of
weights and ~210 MB of keys and values, most of them the G copies of each prompt, computed from
the sizes); `shared_prompt_attention` attends each prompt's rows as one block of queries over
its prompt, then each row over its own positions, with one softmax over both. It pays where prompts are long
(`shares_prompt`); short prompts keep the one-block cache. In bf16 on CPU both caches store keys
and values rounded to bf16 as fp32, and decode steps attend in fp32.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from ..precision import widened_attention

CHUNK = 64  # positions added to a layer's buffer when it is full
SHARE_FROM = 64  # prompt positions (padded) from which a decode step shares each prompt's cache
_GQA_SDPA = "advantage_sdpa_gqa"
_SHARED = "advantage_shared_prompt"
_ACTIVE: ContextVar[SharedPromptCache | None] = ContextVar("advantage_shared_cache", default=None)


def decode_cache(
    model: torch.nn.Module, prompt_mask: torch.Tensor | None = None, widened: bool = False
) -> Cache:
    """A cache of `GrowingLayer`s for `model` (every layer full attention), else transformers'
    `DynamicCache` (sliding-window layers keep their own kind). With `prompt_mask` `[P, Tp]`
    (the prefill's prompts, True = token), a `SharedPromptCache` (see `shares_prompt`).
    `widened` (bf16 on CPU, `precision.widened_attention`): the layers store
    what they are given rounded to bf16, as fp32, so that a decode step attends in fp32
    without widening the cache again."""
    if not full_attention_only(model.config):
        return DynamicCache(config=model.config)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    if prompt_mask is not None:
        return SharedPromptCache(layers, prompt_mask, widened)
    return Cache(layers=[GrowingLayer(widened) for _ in range(layers)])


def shares_prompt(
    model: torch.nn.Module, prompt_length: int, completions: int, device, widened: bool = False
) -> bool:
    """Whether a decode loop of `completions` rows per prompt, prompts padded to
    `prompt_length`, keeps each prompt's cache once (`SharedPromptCache`): SDPA models with
    full attention on CPU whose decode steps attend in fp32 (fp32 weights without autocast, or
    bf16 over a `widened` cache), from SHARE_FROM prompt positions (below, the extra indexing of each step
    costs more than re-reading short prompts: the `tiny` model, 16 new tokens, rollout 88.7 →
    89.4 ms with 32-token prompts, 108 → 106 ms with 64-token ones)."""
    config = model.config
    fp32 = next(model.parameters()).dtype == torch.float32
    return (
        completions > 1
        and prompt_length >= SHARE_FROM
        and device.type == "cpu"
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and full_attention_only(config)
        and fp32
        and (widened or not torch.is_autocast_enabled(device.type))
    )


def full_attention_only(config) -> bool:
    """Whether every decoder layer of a model of this config attends to the whole context (no
    sliding-window or other layer types)."""
    get_text = getattr(config, "get_text_config", None)
    text = get_text(decoder=True) if get_text else config
    return all(t == "full_attention" for t in getattr(text, "layer_types", None) or [])


class GrowingLayer(DynamicLayer):
    """One layer's keys and values `[rows, kv_heads, length, head_dim]`: views of the first
    `length` positions of buffers with room for more. `widened`: stored rounded to bf16, as
    fp32 (`decode_cache`)."""

    def __init__(self, widened: bool = False) -> None:
        super().__init__()
        self.widened = widened

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length = 0
        dtypes = [torch.float32] * 2 if self.widened else [key_states.dtype, value_states.dtype]
        self._keys = key_states.new_empty(
            (*key_states.shape[:2], 0, key_states.shape[-1]), dtype=dtypes[0]
        )
        self._values = value_states.new_empty(
            (*value_states.shape[:2], 0, value_states.shape[-1]), dtype=dtypes[1]
        )

    def _stored(self, states: torch.Tensor) -> torch.Tensor:
        return states.to(torch.bfloat16).float() if self.widened else states

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # widened: rounded once here, not at every step's attention
        key_states, value_states = self._stored(key_states), self._stored(value_states)
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


class SharedPromptLayer(GrowingLayer):
    """One layer of a `SharedPromptCache`: the prefill's keys and values `[P, KV, Tp, D]` (one
    block per prompt), and after them each row's own positions in `GrowingLayer`'s buffers.
    `update` returns the prompts' keys at the prefill, then the rows' own."""

    def update(self, key_states, value_states, *args, **kwargs):
        if self.is_initialized:
            return super().update(key_states, value_states)
        self.lazy_initialization(key_states, value_states)  # rows' own: [P, KV, 0, D]
        # contiguous: each decode step's products read them as [P·KV, Tp, D] without a copy
        self.prompt_keys = self._stored(key_states).contiguous()
        self.prompt_values = self._stored(value_states).contiguous()
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.prompt_keys.shape[-2] + self.length if self.is_initialized else 0

    def keep_prompts(self, prompts: torch.Tensor) -> None:
        if self.is_initialized:
            self.prompt_keys = self.prompt_keys[prompts]
            self.prompt_values = self.prompt_values[prompts]


class SharedPromptCache(Cache):
    """A decode cache whose rows share their prompt's keys and values: row r is prompt
    `group[r]` followed by its own positions. Prefill the P prompts, then
    `batch_select_indices(rows)` as for any cache (the first call gives each row its prompt);
    prompts no row points at any more are dropped. `slot[r]` numbers the rows of a prompt
    (`width` of them at most): the place of row r in its prompt's block of queries."""

    def __init__(self, layers: int, prompt_mask: torch.Tensor, widened: bool = False) -> None:
        super().__init__(layers=[SharedPromptLayer(widened) for _ in range(layers)])
        self.prompt_mask = prompt_mask.bool()  # [P, Tp]
        self._point(torch.arange(len(prompt_mask), device=prompt_mask.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        prompts, group = torch.unique(self.group[indices], return_inverse=True)
        if len(prompts) < len(self.prompt_mask):
            self.prompt_mask = self.prompt_mask[prompts]
            for layer in self.layers:
                layer.keep_prompts(prompts)
        for layer in self.layers:
            layer.batch_select_indices(indices)
        self._point(group)

    def _point(self, group: torch.Tensor) -> None:
        self.group = group  # [R]
        member = group[:, None] == torch.arange(len(self.prompt_mask), device=group.device)
        self.slot = (member.long().cumsum(0) - 1).gather(1, group[:, None]).squeeze(1)
        self.width = int(member.sum(0).max())
        self.pads = ~self.prompt_mask[group][:, None, None]  # [R, 1, 1, Tp]


@widened_attention
def shared_prompt_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw
):
    """`sdpa_gqa` for the prefill; a decode step (one query per row) over the active
    `SharedPromptCache`: the queries of each prompt's rows as one block `[P, KV, width·g, D]`
    against its prompt's keys, each row against its own (`key`, `value`), one softmax over both
    (the prompt's pads masked), the two products with the values added. Equal to `sdpa_gqa` on
    the rows' whole caches up to fp32 rounding."""
    cache = _ACTIVE.get()
    layer = cache.layers[module.layer_idx] if cache is not None else None
    if query.shape[2] != 1 or layer is None or not layer.length:  # the prefill
        return sdpa_gqa(module, query, key, value, attention_mask, dropout, scaling, is_causal)
    R, H, _, D = query.shape
    KV, Dv = key.shape[1], value.shape[-1]
    P, Tp = cache.prompt_mask.shape
    W, g, group, slot = cache.width, H // KV, cache.group, cache.slot
    q = query.view(R, KV, g, D)
    block = q.new_zeros(P, KV, W, g, D)
    block[group, :, slot] = q
    prompt_scores = torch.matmul(block.view(P, KV, W * g, D), layer.prompt_keys.transpose(-1, -2))
    scores = torch.cat(
        [
            prompt_scores.view(P, KV, W, g, Tp)[group, :, slot],
            torch.matmul(q, key.transpose(-1, -2)),
        ],
        -1,
    )  # [R, KV, g, Tp + own]
    scores.mul_(scaling if scaling is not None else D**-0.5)
    scores[..., :Tp].masked_fill_(cache.pads, float("-inf"))
    probs = torch.softmax(scores, -1)
    block = probs.new_zeros(P, KV, W, g, Tp)
    block[group, :, slot] = probs[..., :Tp]
    out = torch.matmul(block.view(P, KV, W * g, Tp), layer.prompt_values)
    out = out.view(P, KV, W, g, Dv)[group, :, slot]  # [R, KV, g, Dv]
    out += torch.matmul(probs[..., Tp:], value)
    return out.view(R, 1, H, Dv), None


@widened_attention
def sdpa_gqa(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **_
):
    """transformers' SDPA attention without `repeat_kv`: PyTorch groups the K/V heads. A decode
    step in fp32 (one query per row; in bf16 over a widened cache, `precision.widened_attention`)
    is two batched products and a softmax instead (`decode_attention`)."""
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
register_attention(_SHARED, shared_prompt_attention)


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


@contextmanager
def decode_attention_for(model: torch.nn.Module, cache: Cache, device: torch.device):
    """Inside, `model` attends over `cache`: `shared_prompt_attention` for a
    `SharedPromptCache`, else `grouped_kv_attention`."""
    if not isinstance(cache, SharedPromptCache):
        with grouped_kv_attention(model, device):
            yield
        return
    token = _ACTIVE.set(cache)
    try:
        with sdpa_replaced(model.config, _SHARED, device):
            yield
    finally:
        _ACTIVE.reset(token)
