"""The default rollout backend: sampling on the `transformers` policy itself with a KV cache
(so nothing needs syncing after an update).

Each distinct prompt is prefilled **once** and its KV cache indexed out to its G completions
(`generate` would prefill every copy). Sampling uses transformers' own logits warpers
(temperature, top-k, top-p) and stop-string criterion; EOS ends a row; the loop stops when every
row has ended. The log-prob of each sampled token is taken on logits / temperature (before
top-k/top-p), the quantity the trainer computes.

Per step the loop does the step's work and little else (`kv_cache.py`): the KV cache is written
in place (no copy of it per token), attention reads grouped K/V heads without expanding them, a
long prompt's keys and values are kept once for its G completions (in fp32 and bf16; in bf16
on CPU the cache stores them rounded to bf16, as fp32, and a step attends in fp32:
`precision.widened_attention`), rows that have ended leave the batch,
and a batch left with few rows for many steps reads column-major weights (`WeightLayout`).
Llama and Qwen2 models decode through their modules without the model-level forward
(`decode_step.py`: the same logits, bitwise).
The sampling noise is drawn for every row whatever the batch holds, so a seed gives the same
samples as a loop that keeps every row to the end (the logits of a row may differ in their last
bits when the batch shrinks: matrix products of other shapes; tests/test_decoder.py checks
tokens equal and log-probs within 1e-5).

A `torch.compile`d decode step on transformers' static cache was measured against this loop on
the 2-core CPU of `benchmarks/` (64 rows, 192-token prompts): compiling takes ~19 s and the
compiled step is slower (tiny 44 vs 7.2 ms, small 244 vs 39 ms: fixed-length attention over the
whole static cache, and the generated kernels copy it), so there is none.
"""

from __future__ import annotations

import torch

from ..parallel import unwrap
from ..precision import autocast, widens_bf16_matmul
from .base import Rollout, SamplingParams, pad_completions, pad_prompts
from .draw import all_ended, draw, stop_criterion, warpers_for

LEAVE_EVERY = 8  # ended rows leave the decode batch once they are ≥ 1/8 of it (a cache copy)
# a decode batch down to this many rows with this many steps left reads column-major weights
RELAY_ROWS, RELAY_STEPS = 48, 32


class TransformersBackend:
    def __init__(
        self, model: torch.nn.Module, tokenizer, precision: str = "fp32", lockstep: bool = False
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.precision = precision
        # sharded models (FSDP2) need every rank in every forward: stop when all ranks are done
        self.lockstep = lockstep
        # the sampling log-probs come from the training weights in the training arithmetic
        self.exact_logprobs = precision == "fp32"

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # generation runs on the training weights themselves

    def stand_in(self, params: SamplingParams) -> None:
        """Under lockstep, this rank's part of a generation in which it has no row of its own
        (a multi-turn turn where its episodes have all ended): one pad token as a row that has
        ended from the start, decoded while any other rank decodes (every forward of a sharded
        policy is a collective). `params.max_new_tokens` must be the other ranks'."""
        self.generate([[self.tokenizer.pad_token_id]], 1, params, ended=True)

    def generate(
        self,
        prompts: list[list[int]],
        num_generations: int,
        params: SamplingParams,
        *,
        ended: bool = False,
    ) -> Rollout:
        """`num_generations` completions of each prompt (`ended`: `stand_in`'s row)."""
        model = unwrap(self.model)
        device = next(model.parameters()).device
        ids, mask = pad_prompts(prompts, self.tokenizer.pad_token_id)  # [P, Tp]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        was_training = model.training
        model.eval()
        try:
            # FSDP2's hooks need grad mode; autocast caches its bf16 weight copies only there
            grad_off = (
                torch.no_grad()
                if self.lockstep or self.precision == "bf16"
                else torch.inference_mode()
            )
            with grad_off, autocast(self.precision, device, model):
                tokens, logprobs = self._sample(
                    model, ids.to(device), mask.to(device), num_generations, params, ended
                )
        finally:
            model.train(was_training)
        completions, finished = self._cut(tokens.tolist(), params)
        lp_lists = [row[: len(c)] for row, c in zip(logprobs.tolist(), completions, strict=True)]
        c_ids, c_mask, lp = pad_completions(completions, self.tokenizer.pad_token_id, lp_lists)
        return Rollout(
            prompt_ids=ids.repeat_interleave(num_generations, dim=0),  # [B, Tp], prompt-major
            prompt_mask=mask.repeat_interleave(num_generations, dim=0),
            completion_ids=c_ids,
            completion_mask=c_mask,
            truncated=~torch.tensor(finished, dtype=torch.bool),
            logprobs=None if params.greedy else lp,
        )

    def _sample(self, model, ids, mask, G: int, params: SamplingParams, ended: bool = False):
        """Token ids `[B, Tn]` and their log-probs `[B, Tn]` (B = P·G), `Tn <= max_new_tokens`.

        Rows whose completion has ended leave the decode batch (their KV cache rows are dropped)
        once 1/LEAVE_EVERY of the batch has ended; `active` maps decode rows to output rows."""
        from .kv_cache import decode_attention_for

        warpers, stop = warpers_for(params), stop_criterion(self.tokenizer, params)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        Tp, Tn = ids.shape[1], params.max_new_tokens
        forward, relay = self._decoder(model, ids, mask, G)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = forward.cache
        with decode_attention_for(model, cache, ids.device), WeightLayout(model) as layout:
            # 1. prefill each distinct prompt once, then give every completion its prompt's cache
            logits, rows = _prefill(model, ids, mask, positions, cache, G)  # [R, V], R decoding
            B = rows.shape[0]
            attention = torch.ones(B, Tp + Tn, dtype=torch.long, device=ids.device)
            attention[:, :Tp] = mask[rows]  # [R, Tp + Tn]: the first Tp + step columns are used
            position = positions[rows, -1:] + 1  # [R, 1]
            active = torch.arange(B, device=ids.device)  # [R] output row of each decode row
            done = torch.full((B,), ended, dtype=torch.bool, device=ids.device)  # [R]
            tokens = torch.full((B, Tn), pad, dtype=torch.long, device=ids.device)
            logprobs = torch.zeros(B, Tn, device=ids.device)
            for step in range(Tn):
                # 2. sample; record log p(token) under logits / T
                token, logprob, broken = draw(logits, params, warpers, eos, active, B)
                broken &= ~done  # rows that had ended decode on until they leave: not theirs
                token = torch.where(done, pad, token)
                tokens[active, step] = token
                if logprob is not None:
                    logprobs[active, step] = logprob
                # 3. rows end at EOS or a stop string; stop when every row has ended
                if eos is not None and not params.ignore_eos:
                    done |= token == eos
                if stop is not None:
                    done |= stop(tokens[active, : step + 1], None)
                if all_ended(done, active[broken], self.lockstep) or step == Tn - 1:
                    break
                # 4. ended rows leave the batch (a sharded model keeps one: every rank decodes)
                if len(done) > 1 and int(done.sum()) * LEAVE_EVERY >= len(done):
                    keep = (~done).nonzero().squeeze(-1)
                    keep = keep if len(keep) else keep.new_zeros(1)
                    cache.batch_select_indices(keep)
                    attention, position, active = attention[keep], position[keep], active[keep]
                    done, token = done[keep], token[keep]
                    if relay and len(keep) <= RELAY_ROWS and Tn - step > RELAY_STEPS:
                        layout.column_major()
                logits = forward(token, position, attention[:, : Tp + step + 1])
                position = position + 1
        return tokens[:, : step + 1].cpu(), logprobs[:, : step + 1].cpu()

    def _decoder(self, model, ids, mask, G: int) -> tuple[DecodeForward, bool]:
        """The decode steps' forward over a fresh cache, and whether the weights may be laid out
        column-major once few rows are left (CPU, fp32 products: MKL's few-row GEMM gains).
        A long prompt's cache is kept once (`shares_prompt`); bf16 on CPU: decode steps attend
        in fp32 over a cache stored rounded, as fp32 (SDPA models, whose attention is
        advantage's), whichever kernels the products take: over a bf16 cache PyTorch's SDPA
        copies the cache's views at every step (realistic benchmark rollout with bf16 GEMMs on
        an AMX Xeon: `small` 6.4–6.5 → 5.2–5.5 s, `tiny` 1.49–1.59 → 1.32–1.45 s)."""
        from .decode_step import lean_decode_step
        from .kv_cache import decode_cache, shares_prompt

        widened = (
            self.precision == "bf16"
            and ids.device.type == "cpu"
            and getattr(model.config, "_attn_implementation", None) == "sdpa"
        )
        shared = shares_prompt(model, ids.shape[1], G, ids.device, widened)
        forward = DecodeForward(
            model,
            decode_cache(model, mask if shared else None, widened),
            lean=None if self.lockstep else lean_decode_step(model),
            shared=shared,
            padded=not bool(mask.all()),
        )
        relay = ids.device.type == "cpu" and not self.lockstep
        fp32_products = self.precision == "fp32" or (widened and widens_bf16_matmul(ids.device))
        return forward, relay and fp32_products

    def _cut(
        self, rows: list[list[int]], params: SamplingParams
    ) -> tuple[list[list[int]], list[bool]]:
        """Each row up to and including its first EOS; else up to its stop string; else all."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        completions, finished = [], []
        for row in rows:
            if eos in row and not params.ignore_eos:
                completions.append(row[: row.index(eos) + 1])
                finished.append(True)
                continue
            while row and row[-1] == pad and pad != eos:  # rows that ended on a stop string
                row = row[:-1]
            completions.append(row)
            stopped = bool(params.stop) and any(
                s in self.tokenizer.decode(row, skip_special_tokens=True) for s in params.stop
            )
            finished.append(stopped)
        return completions, finished


def _prefill(model, ids, mask, positions, cache, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token logits `[P·G, V]` of each prompt's G rows and each row's prompt `[P·G]`:
    each prompt prefilled once, its cache then given to its rows (prompt-major)."""
    out = model(
        input_ids=ids,
        attention_mask=mask.long(),
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    rows = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(G)
    cache.batch_select_indices(rows)
    return out.logits[:, -1].float()[rows], rows


class DecodeForward:
    """A decode step's logits `[R, V]` for the rows' last tokens over `cache`: advantage's
    `lean` step (the Llama family) or the model's forward. A shared cache holds the prompts'
    pads (each row attends to all else: no mask); without pads the lean step needs none."""

    def __init__(self, model, cache, lean, shared: bool, padded: bool) -> None:
        self.model, self.cache, self.lean = model, cache, lean
        self.shared, self.padded = shared, padded

    def __call__(self, token, position, attention) -> torch.Tensor:
        seen = None if self.shared else attention  # [R, T] of the positions so far
        if self.lean is not None:
            return self.lean(token, position, self.cache, seen if self.padded else None).float()
        out = self.model(
            input_ids=token[:, None],
            attention_mask=seen,
            position_ids=position,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1].float()


class WeightLayout:
    """Inside, `column_major()` lays each `nn.Linear` weight of `model` out column-major (the
    same values; the storage of its transpose): MKL's GEMM of a few rows against such a weight
    runs 1.3–1.5× its rate against the row-major one (16–32 rows × 512 → 1408: 94 vs 63 and 156
    vs 124 GFLOP/s), equal from 64 rows. Leaving restores the weights' own storage."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.saved = model, []

    def column_major(self) -> None:
        if self.saved:
            return
        for module in self.model.modules():
            weight = module.weight if type(module) is torch.nn.Linear else None
            if weight is not None and type(weight.data) is torch.Tensor and weight.is_contiguous():
                self.saved.append((weight, weight.data))
                weight.data = weight.data.t().contiguous().t()

    def __enter__(self) -> WeightLayout:
        return self

    def __exit__(self, *exc) -> None:
        for weight, data in self.saved:
            weight.data = data
        self.saved = []
