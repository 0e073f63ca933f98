"""The default rollout backend: `transformers`' `generate` with a KV cache, on the policy itself
(so there is nothing to sync after an update)."""

from __future__ import annotations

import contextlib

import torch

from .base import Rollout, SamplingParams, pad_completions, pad_prompts


class TransformersBackend:
    def __init__(self, model: torch.nn.Module, tokenizer, precision: str = "fp32") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.precision = precision
        # the sampling log-probs come from the training weights in the training arithmetic
        self.exact_logprobs = precision == "fp32"

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # generation runs on the training weights themselves

    @torch.inference_mode()
    def _generate(self, ids, mask, params: SamplingParams):
        model = _unwrap(self.model)
        was_training = model.training
        model.eval()
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            return_dict_in_generate=True,
            output_logits=not params.greedy,
        )
        if params.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k or None,
            )
        if params.ignore_eos:
            kwargs.update(min_new_tokens=params.max_new_tokens)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        autocast = (
            torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        try:
            with autocast:
                out = model.generate(input_ids=ids, attention_mask=mask.long(), **kwargs)
        finally:
            model.train(was_training)
        return out

    def generate(
        self, prompts: list[list[int]], num_generations: int, params: SamplingParams
    ) -> Rollout:
        device = next(self.model.parameters()).device
        ids, mask = pad_prompts(prompts, self.tokenizer.pad_token_id)
        ids = ids.repeat_interleave(num_generations, dim=0).to(device)  # [B, Tp], prompt-major
        mask = mask.repeat_interleave(num_generations, dim=0).to(device)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        out = self._generate(ids, mask, params)
        generated = out.sequences[
            :, ids.shape[1] :
        ].clone()  # [B, Tn] (clone: leave inference mode)
        logprobs = None
        if out.logits is not None:
            logits = torch.stack(out.logits, dim=1).float() / params.temperature  # [B, Tn, V]
            logprobs = torch.log_softmax(logits, -1).gather(-1, generated.unsqueeze(-1)).squeeze(-1)
        completions, finished = self._cut(generated, params)
        lp_lists = (
            None
            if logprobs is None
            else [logprobs[i, : len(c)].tolist() for i, c in enumerate(completions)]
        )
        c_ids, c_mask, lp = pad_completions(completions, self.tokenizer.pad_token_id, lp_lists)
        return Rollout(
            prompt_ids=ids.cpu(),
            prompt_mask=mask.cpu(),
            completion_ids=c_ids,
            completion_mask=c_mask,
            truncated=~torch.tensor(finished, dtype=torch.bool),
            logprobs=lp,
        )

    def _cut(
        self, generated: torch.Tensor, params: SamplingParams
    ) -> tuple[list[list[int]], list[bool]]:
        """Each row up to and including its first EOS; else up to a stop string; else all."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        completions, finished = [], []
        for row in generated.tolist():
            if eos in row and not params.ignore_eos:
                completions.append(row[: row.index(eos) + 1])
                finished.append(True)
                continue
            # generate pads a row after it stopped on a stop string
            while row and row[-1] == pad and pad != eos:
                row = row[:-1]
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            stopped = any(s in text for s in params.stop)
            completions.append(row)
            finished.append(stopped or len(row) < params.max_new_tokens)
        return completions, finished


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain HF model under DDP (`.module`); FSDP2 modules are the model itself."""
    return getattr(model, "module", model)
