"""Padding-free forward passes: a rollout's sequences packed into rows with a block attention mask.

As a rectangle, a micro-batch of B sequences is `[B, Tp + Tc]`: every completion repeats its
prompt, the prompts are left-padded to the longest, the completions right-padded to the
longest. Packed, each run of consecutive rows that share a prompt (a *segment*: a group, or a
part of one) is its prompt once, then each completion's tokens but the last (the last predicts
nothing the loss needs):

    tokens     p p p p | a a a | b b b b b | c        (completions a, b, c of prompt p)
    positions  0 1 2 3 | 4 5 6 | 4 5 6 7 8 | 4
    attends    the prompt causally; a completion token the prompt and its own completion
               causally (environment tokens of a multi-turn completion are ordinary context)

Segments go into rows as long as the longest segment (longest first, first row with room), so a
row may hold several short segments; the `[R, 1, N, N]` mask is block-diagonal per segment and
pads attend only to pads. Outputs are needed only at the positions that predict a completion
token: the prompt's last position (token 0 of every completion of the segment) and each
completion input; `logits_to_keep` gets the columns needed in any row.

The same log-probs and gradients as the rectangle (tests/test_packing.py: ≤ 1e-6 in fp32), with
`Σ_segments (Lp + Σ_i (Lc_i - 1))` positions instead of `B·(Tp + Tc)`. Needs a model whose
attention takes a 4D mask (transformers' `sdpa` or `eager`, every layer full attention);
`packable` says when, and the rectangle is used otherwise.

Attention with the mask costs the whole `N × N` square of a row: PyTorch's CPU kernel skips no
masked block. With SDPA on CPU, `segment_attention` computes only what the mask allows: per
segment, the prompt causally, then all completion inputs at once against the prompt's keys and
each completion causally against its own, merged by their log-sum-exps (`SegmentAttention`; no
key or value copied). On a realistic row (a prompt of 150, 8 completions of 3–256) the first
version (one SDPA call per completion over its prompt's keys copied next to its own) took 3×
less time forward and 2.5× forward + backward than the masked call; without the copies the
`small` model's realistic update measured 6.74 → 6.49 s. Outputs equal the masked call's to
fp32 rounding. It needs the `packed_segments` keyword to reach the attention (transformers
models pass their forward's keywords down); without it, the 4D mask is used.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .precision import widened_attention, widens_bf16_matmul
from .rollout import Rollout
from .rollout.kv_cache import full_attention_only, register_attention, sdpa_gqa, sdpa_replaced


@dataclass(frozen=True)
class Segment:
    """A prompt and its completions' inputs, as placed in a packed row."""

    row: int
    offset: int
    """Column of the prompt's first token; the completions' inputs follow it."""
    prompt_len: int
    inputs: tuple[int, ...]
    """Each completion's input positions (`completion_inputs`), in order."""


@dataclass
class PackedBatch:
    """A rollout's sequences as R packed rows of N positions."""

    input_ids: torch.Tensor
    """`[R, N]` (pad id after the last segment of a row)."""
    position_ids: torch.Tensor
    """`[R, N]` positions within each sequence: a completion continues its prompt's."""
    allowed: torch.Tensor
    """`[R, 1, N, N]` bool: query position q may attend key position k."""
    columns: torch.Tensor
    """`[C]` the columns whose outputs some row needs (`logits_to_keep`)."""
    entry_rows: torch.Tensor
    """`[E]` the row of the output that predicts each completion token (E = completion tokens,
    in the row-major order of `completion_mask`)."""
    entry_columns: torch.Tensor
    """`[E]` its column."""
    segments: list[Segment]
    """In row order: by row, then offset."""

    def entries(self, outputs: torch.Tensor) -> torch.Tensor:
        """`[E, ...]` from the model's outputs `[R, C or N, ...]` (a head that ignores
        `logits_to_keep` returns every column)."""
        if outputs.shape[1] == self.input_ids.shape[1]:
            return outputs[self.entry_rows, self.entry_columns]
        return outputs[self.entry_rows, torch.searchsorted(self.columns, self.entry_columns)]


def packable(config, batch: Rollout) -> bool:
    """Whether `pack` can serve a model of this config: 4D masks (sdpa, eager), no sliding
    window layers, and every prompt non-empty (its last position predicts token 0)."""
    return (
        getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
        and full_attention_only(config)
        and bool(batch.prompt_mask.any(-1).all())
    )


def _runs(batch: Rollout, order: list[int]) -> list[list[int]]:
    """`order` (row indices) cut into runs of consecutive rows with the same prompt."""
    if not order:
        return []
    counts = torch.unique_consecutive(batch.prompt_ids[order], dim=0, return_counts=True)[1]
    return [run.tolist() for run in torch.tensor(order).split(counts.tolist())]


def completion_inputs(batch: Rollout) -> list[int]:
    """Input positions of each completion: its tokens but the last (which predicts nothing the
    loss needs)."""
    return (batch.completion_mask.sum(-1) - 1).clamp(min=0).tolist()


def packed_length(prompt_len: int, inputs: list[int]) -> int:
    """Positions of one segment: the prompt once, then each completion's `completion_inputs`."""
    return prompt_len + sum(inputs)


def pack(batch: Rollout, pad_id: int, bucketed: bool = False) -> PackedBatch:
    """The packed rows of `batch` (see the module docstring); `bucketed`: rows `bucket`ed
    lengths long (for bf16 and fp16, whose CPU matrix products cache a kernel per shape)."""
    Tp = batch.prompt_ids.shape[1]
    prompt_lens = batch.prompt_mask.sum(-1).tolist()
    completion_lens = batch.completion_mask.sum(-1).tolist()
    inputs = completion_inputs(batch)
    parts, needed = [], []  # per segment: (ids, positions, completion index), output columns
    runs = _runs(batch, list(range(batch.prompt_ids.shape[0])))
    for rows in runs:
        Lp = prompt_lens[rows[0]]
        ids = [batch.prompt_ids[rows[0], Tp - Lp :]]
        pos, comp = [torch.arange(Lp)], [torch.full((Lp,), -1)]
        cols, start = [], Lp
        for i, b in enumerate(rows):
            n = inputs[b]
            ids.append(batch.completion_ids[b, :n])
            pos.append(Lp + torch.arange(n))
            comp.append(torch.full((n,), i))
            # completion token 0 is predicted by the prompt's last position, token j by input j-1
            cols.append(torch.cat([torch.tensor([Lp - 1]), start + torch.arange(n)]))
            cols[-1] = cols[-1][: completion_lens[b]]
            start += n
        parts.append((torch.cat(ids), torch.cat(pos), torch.cat(comp)))
        needed.append(cols)
    placement, N = _first_fit([len(p[0]) for p in parts], bucketed)
    R = max(r for r, _ in placement) + 1 if placement else 1
    input_ids = torch.full((R, N), pad_id, dtype=batch.prompt_ids.dtype)
    position_ids = torch.zeros((R, N), dtype=torch.long)
    segment = torch.full((R, N), -1)  # -1: padding
    completion = torch.full((R, N), -1)  # -1: a prompt token
    entry_rows, entry_cols = [], []
    for s, ((ids, pos, comp), (r, offset)) in enumerate(zip(parts, placement, strict=True)):
        span = slice(offset, offset + len(ids))
        input_ids[r, span], position_ids[r, span] = ids, pos
        segment[r, span], completion[r, span] = s, comp
        for cols in needed[s]:
            entry_rows.append(torch.full((len(cols),), r))
            entry_cols.append(offset + cols)
    q, k = (slice(None), slice(None), None), (slice(None), None, slice(None))
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    allowed = (
        (segment[q] == segment[k])
        & causal
        & ((completion[k] == -1) | (completion[q] == completion[k]))
    )
    entry_cols = torch.cat(entry_cols) if entry_cols else torch.zeros(0, dtype=torch.long)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        allowed=allowed.unsqueeze(1),
        columns=torch.unique(entry_cols),
        entry_rows=torch.cat(entry_rows) if entry_rows else torch.zeros(0, dtype=torch.long),
        entry_columns=entry_cols,
        segments=sorted(
            (
                Segment(r, offset, prompt_lens[rows[0]], tuple(inputs[b] for b in rows))
                for rows, (r, offset) in zip(runs, placement, strict=True)
            ),
            key=lambda s: (s.row, s.offset),
        ),
    )


def _first_fit(lengths: list[int], bucketed: bool) -> tuple[list[tuple[int, int]], int]:
    """(row, offset) of each segment in rows of N = the longest length (`bucket`ed if asked;
    longest first, first row with room), and N."""
    N = max(lengths, default=1)
    N = bucket(N) if bucketed else N
    free: list[int] = []  # room left in each row
    placement: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for s in sorted(range(len(lengths)), key=lambda s: -lengths[s]):
        r = next((r for r, room in enumerate(free) if room >= lengths[s]), len(free))
        if r == len(free):
            free.append(N)
        placement[s] = (r, N - free[r])
        free[r] -= lengths[s]
    return placement, N


def bucket(n: int) -> int:
    """`n` rounded up to a multiple of 1/8 of the power of two at or below it (at least 8): at
    most 8 row lengths per octave, ≤ 12.5% (or 7) more positions. In bf16 a matrix product of a new
    shape costs memory that stays (oneDNN, PyTorch's bf16 GEMM on CPU, caches a primitive per
    shape): with rows exactly as long as their longest segment, the realistic benchmark's tiny
    bf16 run grew to 1.48 GB of RSS in 4 steps; bucketed, 1.00 GB (TRL: 1.19 GB), same speed.
    fp32 products (MKL) keep nothing per shape and are not bucketed."""
    step = max(8, (1 << (n.bit_length() - 1)) // 8)
    return -(-n // step) * step


def attention_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask as the attention implementation takes it: bool for SDPA, additive for eager."""
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


_SEGMENT_SDPA = "advantage_segment_sdpa"


@widened_attention
def segment_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, packed_segments=None, **kw
):
    """SDPA over packed rows that computes only what the block mask allows (module docstring):
    `query` `[R, H, N, d]`, `key`/`value` `[R, H_kv, N, d]`; returns `[R, N, H, d]` (zeros
    at the pads after a row's last segment). Without `packed_segments` (or with attention
    dropout): the masked SDPA call."""
    if packed_segments is None or dropout:
        return sdpa_gqa(module, query, key, value, attention_mask, dropout, scaling, **kw)
    if torch.is_autocast_enabled(query.device.type):  # as SDPA under autocast: one dtype
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = SegmentAttention.apply(query, key, value, tuple(packed_segments), scale)
    return out.transpose(1, 2).contiguous(), None


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _spans(s: Segment) -> tuple[slice, slice, list[slice]]:
    """A segment's prompt, all its completion inputs, and each completion's, as column slices."""
    prompt = slice(s.offset, s.offset + s.prompt_len)
    own, start = [], prompt.stop
    for n in s.inputs:
        own.append(slice(start, start + n))
        start += n
    return prompt, slice(prompt.stop, start), [o for o in own if o.start < o.stop]


class SegmentAttention(torch.autograd.Function):
    """Per segment three kinds of flash-attention calls (PyTorch's CPU kernel, which returns the
    log-sum-exp of each query's scores): the prompt causally; every completion input of the
    segment at once against the prompt's keys; each completion causally against its own. The
    two results of a completion input are merged by their log-sum-exps (the softmax over
    prompt and own keys together). The backward runs the kernel's backward on each part with
    the merged output and log-sum-exp, which gives each part's exact gradients (as in ring
    attention): no key or value is copied, forward or backward."""

    @staticmethod
    def forward(ctx, query, key, value, segments, scale):
        R, H, N, _ = query.shape
        out = query.new_zeros(R, H, N, value.shape[-1])
        lse = query.new_zeros(R, H, N, dtype=torch.float32)
        for s in segments:
            prompt, inputs, own = _spans(s)
            q, k, v = query[s.row : s.row + 1], key[s.row : s.row + 1], value[s.row : s.row + 1]
            o, lse_p = _flash(q[:, :, prompt], k[:, :, prompt], v[:, :, prompt], 0.0, True,
                              scale=scale)  # fmt: skip
            out[s.row, :, prompt], lse[s.row, :, prompt] = o[0], lse_p[0]
            if not own:
                continue
            o_prompt, lse_prompt = _flash(q[:, :, inputs], k[:, :, prompt], v[:, :, prompt], 0.0,
                                          False, scale=scale)  # fmt: skip
            o_own, lse_own = torch.empty_like(o_prompt), torch.empty_like(lse_prompt)
            for span in own:
                at = slice(span.start - inputs.start, span.stop - inputs.start)
                o, lse_i = _flash(q[:, :, span], k[:, :, span], v[:, :, span], 0.0, True,
                                  scale=scale)  # fmt: skip
                o_own[:, :, at], lse_own[:, :, at] = o, lse_i
            total = torch.logaddexp(lse_prompt, lse_own)
            merged = o_prompt * (lse_prompt - total).exp_().unsqueeze(-1)
            merged.addcmul_(o_own, (lse_own - total).exp_().unsqueeze(-1))
            out[s.row, :, inputs], lse[s.row, :, inputs] = merged[0], total[0]
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.segments, ctx.scale = segments, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        saved = (*ctx.saved_tensors, grad.contiguous())  # query, key, value, out, lse, grad
        dq, dk, dv = (torch.zeros_like(t) for t in saved[:3])
        for s in ctx.segments:
            prompt, inputs, own = _spans(s)
            q, k, v, o, m, g = (t[s.row : s.row + 1] for t in saved)
            parts = [(prompt, prompt, True)] + [(inputs, prompt, False)] * bool(own)
            for queries, keys, causal in parts + [(span, span, True) for span in own]:
                gq, gk, gv = _flash_backward(
                    g[:, :, queries], q[:, :, queries], k[:, :, keys], v[:, :, keys],
                    o[:, :, queries], m[:, :, queries], 0.0, causal, scale=ctx.scale,
                )  # fmt: skip
                dq[s.row, :, queries] += gq[0]
                dk[s.row, :, keys] += gk[0]
                dv[s.row, :, keys] += gv[0]
        return dq, dk, dv, None, None


register_attention(_SEGMENT_SDPA, segment_attention)


# When segment attention pays: CALL_COST estimates an SDPA call's fixed cost in attention scores;
# with MIN_GAIN it puts the fixed workload's rows on the masked call and the realistic ones on
# segments (segments measured slower on the first, faster on the second).
CALL_COST = 64 * 64
MIN_GAIN = 2


@contextlib.contextmanager
def segment_attention_for(
    config, device: torch.device, packed: PackedBatch, precision: str, recomputed: bool = False
):
    """Inside, a model of `config` with SDPA attention on CPU attends with `segment_attention`:
    over segments for `packed` when that pays — the rows' masked squares at least `MIN_GAIN`
    times the scores the segments need (each call counted `CALL_COST` more), i.e. long rows
    (the realistic workload's, not the fixed one's 8 × 16 tokens), and not for a backward in
    bf16 or fp16 on PyTorch's bf16 kernels (measured slower: tiny bf16 realistic update 2.18 →
    2.52 s; with widened products attention is fp32) — else with the masked call (`sdpa_gqa`).
    `recomputed` (gradient checkpointing: the backward pass runs the forward again, outside
    this context): the model keeps its own attention, so both runs are the same. Yields the
    keywords the model call then takes."""
    if recomputed:
        yield {}
        return
    R, N = packed.input_ids.shape
    needed = sum(
        s.prompt_len**2
        + sum(n * (s.prompt_len + n) for n in s.inputs)
        + CALL_COST * (1 + len(s.inputs))
        for s in packed.segments
    )
    pays = MIN_GAIN * needed <= R * N * N
    if precision != "fp32" and torch.is_grad_enabled() and not widens_bf16_matmul(device):
        pays = False
    with sdpa_replaced(config, _SEGMENT_SDPA, device):
        yield {"packed_segments": packed.segments} if pays else {}


def micro_batches(
    batch: Rollout, rows: torch.Tensor, max_rows: int | None, max_tokens: int | None
) -> list[torch.Tensor]:
    """`rows` (indices into `batch`, the G rows of a group consecutive) cut into micro-batches of
    at most `max_rows` sequences and `max_tokens` packed positions (`packed_length`). Without a
    token limit: consecutive slices of `max_rows`. With one: whole groups while they fit; a
    group that does not fit on its own goes sequence by sequence, its prompt counted again in
    each micro-batch it spans."""
    order = rows.tolist()
    max_rows = max_rows or len(order) or 1
    if max_tokens is None:
        return [rows[i : i + max_rows] for i in range(0, len(order), max_rows)]
    prompt_lens = batch.prompt_mask.sum(-1).tolist()
    inputs = completion_inputs(batch)
    pieces: list[list[int]] = [[]]
    used = 0
    for group in _runs(batch, order):
        Lp = prompt_lens[group[0]]
        cost = packed_length(Lp, [inputs[b] for b in group])
        if pieces[-1] and (used + cost > max_tokens or len(pieces[-1]) + len(group) > max_rows):
            pieces.append([])
            used = 0
        if cost <= max_tokens and len(group) <= max_rows:
            pieces[-1] += group
            used += cost
            continue
        for i, b in enumerate(group):  # too large for any micro-batch: split
            new_piece = pieces[-1] and (
                used + inputs[b] > max_tokens or len(pieces[-1]) + 1 > max_rows
            )
            if new_piece:
                pieces.append([])
                used = 0
            used += inputs[b] + (Lp if new_piece or i == 0 else 0)
            pieces[-1].append(b)
    return [torch.tensor(p, dtype=torch.long) for p in pieces if p]
