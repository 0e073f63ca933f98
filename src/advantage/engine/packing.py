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

The attention over packed rows that computes only what the mask allows is in
`packed_attention.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rollout import Rollout
from .rollout.kv_cache import full_attention_only


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
