"""The transformers backend's decode loop (engine/rollout/hf.py, kv_cache.py): rows that end leave
the batch without changing any sample, the in-place KV cache equals transformers' own, the
sampling draw is `torch.multinomial`'s, and a sharded (lockstep) run keeps decoding."""

import pytest
import torch

from advantage.engine.models import load_causal_lm
from advantage.engine.rollout import (
    NonFiniteLogitsError,
    SamplingParams,
    TransformersBackend,
    draw,
    hf,
)
from advantage.tasks import builtin_model_path
from advantage.tasks.tiny import char_tokenizer

PROMPTS = ["abc>", "a much longer prompt>", "xy>"]  # left-padded to different lengths


@pytest.fixture(scope="module")
def policy():
    return load_causal_lm(str(builtin_model_path("tiny-random"))).eval()


@pytest.fixture
def tokenizer():
    return _tokenizer("e")


def _tokenizer(eos: str):
    tok = char_tokenizer()
    tok.eos_token = eos  # a common character: rows of the untrained model end at different steps
    return tok


def _generate(policy, tokenizer, **params):
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(**{"max_new_tokens": 40, "seed": 0, "stop": ["q"], **params})
    return TransformersBackend(policy, tokenizer).generate(prompts, 4, params)


@pytest.mark.parametrize(
    "eos,params",
    [
        ("e", {}),
        ("7", {"greedy": True, "stop": ["V"]}),  # the untrained model's greedy rows reach these
        ("e", {"top_k": 7, "top_p": 0.9, "temperature": 0.7}),
    ],
)
def test_rows_leaving_the_batch_change_no_sample(policy, monkeypatch, eos, params):
    tokenizer = _tokenizer(eos)
    left = _generate(policy, tokenizer, **params)
    monkeypatch.setattr(hf, "LEAVE_EVERY", 10**9)  # every row decodes to the end
    kept = _generate(policy, tokenizer, **params)
    lengths = left.completion_mask.sum(-1)
    assert lengths.min() < lengths.max() and not left.truncated.all()  # rows did leave early
    assert torch.equal(left.completion_ids, kept.completion_ids)
    assert torch.equal(left.truncated, kept.truncated)
    if not params.get("greedy"):
        gap = (left.logprobs - kept.logprobs)[left.completion_mask].abs().max().item()
        assert gap <= 1e-5, gap


def test_column_major_weights_change_no_sample(policy, tokenizer, monkeypatch):
    """Relaid when rows leave (here at the first that do) or never: the same samples, log-probs
    within 1e-5; afterwards each weight has its own storage again."""
    storage = {name: p.data_ptr() for name, p in policy.named_parameters()}
    monkeypatch.setattr(hf, "RELAY_ROWS", 0)
    never = _generate(policy, tokenizer)
    relaid = []
    column_major = hf.WeightLayout.column_major
    monkeypatch.setattr(hf.WeightLayout, "column_major", lambda s: relaid.append(column_major(s)))
    monkeypatch.setattr(hf, "RELAY_ROWS", 10**9)
    monkeypatch.setattr(hf, "RELAY_STEPS", 0)
    early = _generate(policy, tokenizer)
    assert relaid
    assert torch.equal(never.completion_ids, early.completion_ids)
    gap = (never.logprobs - early.logprobs)[never.completion_mask].abs().max().item()
    assert gap <= 1e-5, gap
    assert storage == {name: p.data_ptr() for name, p in policy.named_parameters()}
    assert all(p.is_contiguous() for p in policy.parameters())


def test_engine_logprobs_equal_the_trainers_after_rows_leave(policy, tokenizer):
    from advantage.engine.models import completion_logprobs

    out = _generate(policy, tokenizer, temperature=0.7)
    with torch.no_grad():
        trainer, _ = completion_logprobs(policy, out, temperature=0.7)
    assert (trainer - out.logprobs)[out.completion_mask].abs().max().item() <= 1e-5


def test_draw_is_torch_multinomial_with_noise_per_output_row():
    torch.manual_seed(0)
    logits = torch.randn(6, 11)
    params = SamplingParams(temperature=0.5)
    torch.manual_seed(1)
    expected = torch.multinomial(torch.softmax(logits / 0.5, -1), 1).squeeze(-1)
    torch.manual_seed(1)
    token, logprob, _ = draw.draw(logits, params, None, None, torch.arange(6), 6)
    assert torch.equal(token, expected)
    torch.testing.assert_close(logprob, torch.log_softmax(logits / 0.5, -1)[range(6), token])
    # rows 1, 4 alone (the others have left the batch) draw with the noise of rows 1, 4
    torch.manual_seed(1)
    token, _, _ = draw.draw(logits[[1, 4]], params, None, None, torch.tensor([1, 4]), 6)
    assert torch.equal(token, expected[[1, 4]])


def test_growing_cache_equals_dynamic_cache(policy, monkeypatch):
    """Prefill, rows selected out, steps past a buffer's end: the same logits as DynamicCache."""
    from transformers import DynamicCache

    from advantage.engine.rollout import kv_cache

    monkeypatch.setattr(kv_cache, "CHUNK", 3)  # the buffers grow every 3 steps
    ids = torch.randint(4, 40, (2, 5))
    logits = {}
    assert isinstance(kv_cache.decode_cache(policy).layers[0], kv_cache.GrowingLayer)
    for name, cache in [("growing", kv_cache.decode_cache(policy)), ("dynamic", DynamicCache())]:
        with torch.no_grad():
            steps = [policy(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]]
            cache.batch_select_indices(torch.tensor([0, 0, 1, 1, 1]))
            token = torch.tensor([[5], [6], [7], [8], [9]])
            for _ in range(4):
                steps.append(
                    policy(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
                )
            cache.batch_select_indices(torch.tensor([4, 1]))  # two rows leave, in a new order
            steps.append(
                policy(input_ids=token[[4, 1]], past_key_values=cache, use_cache=True).logits[:, -1]
            )
        logits[name] = steps
        assert cache.get_seq_length() == 5 + 5
    for a, b in zip(logits["growing"], logits["dynamic"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("precision", "kernels"), [("fp32", "fp32"), ("bf16", "fp32"),
                                                     ("bf16", "native")])  # fmt: skip
def test_shared_prompt_cache_equals_growing_cache(policy, monkeypatch, precision, kernels):
    """Each prompt's keys once, its rows pointing at it: prefill of left-padded prompts, rows
    given their prompt, steps past a buffer's end, rows leaving in a new order (one prompt
    losing all its rows): the logits of the cache that copies each prompt to its rows. In bf16
    (widened products or PyTorch's bf16 kernels) both caches store rounded fp32 keys and values
    (a decode step attends in fp32): equal up to bf16 rounding."""
    from advantage.engine import precision as mixed
    from advantage.engine.rollout import kv_cache

    monkeypatch.setattr(kv_cache, "CHUNK", 3)
    monkeypatch.setattr(mixed, "_choice", kernels)  # restored after
    widened = precision == "bf16"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 40, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[2, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rows = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    logits = {}
    for name in ("growing", "shared"):
        cache = kv_cache.decode_cache(policy, mask if name == "shared" else None, widened)
        attention = torch.cat([mask[rows], torch.ones(7, 6, dtype=torch.long)], 1)
        position = positions[rows, -1:] + 1
        token = torch.randint(4, 40, (7, 1), generator=torch.Generator().manual_seed(1))
        steps = []
        cpu = torch.device("cpu")
        with (
            torch.no_grad(),
            mixed.autocast(precision, cpu, policy),
            kv_cache.decode_attention_for(policy, cache, cpu),
        ):
            policy(
                input_ids=ids, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True,
            )  # fmt: skip
            cache.batch_select_indices(rows)
            keep = torch.arange(7)
            for step in range(6):
                if step == 4:  # prompt 0 loses its rows, the others come back reordered
                    keep = torch.tensor([4, 2, 6])
                    cache.batch_select_indices(keep)
                out = policy(
                    input_ids=token[keep],
                    attention_mask=None if name == "shared" else attention[keep, : 7 + step],
                    position_ids=position[keep] + step,
                    past_key_values=cache,
                    use_cache=True,
                )
                steps.append(out.logits[:, -1].float())
        assert cache.get_seq_length() == 6 + 6
        assert cache.layers[0].keys.dtype == torch.float32
        assert isinstance(cache, kv_cache.SharedPromptCache) == (name == "shared")
        logits[name] = steps
    assert len(cache.prompt_mask) == 2  # prompt 0's keys were dropped
    for a, b in zip(logits["growing"], logits["shared"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 if precision == "fp32" else 3e-2)


def test_shared_prompt_decode_changes_no_sample(policy, tokenizer, monkeypatch):
    """The decode loop with each prompt's cache shared (forced for these short prompts) samples
    what the loop that copies it does, rows leaving included, log-probs within 1e-5."""
    from advantage.engine.rollout import kv_cache

    calls = []
    shares = kv_cache.shares_prompt
    monkeypatch.setattr(kv_cache, "shares_prompt", lambda *a: calls.append(shares(*a)) or calls[-1])
    copied = _generate(policy, tokenizer)
    monkeypatch.setattr(kv_cache, "SHARE_FROM", 1)
    shared = _generate(policy, tokenizer)
    assert calls == [False, True]
    lengths = shared.completion_mask.sum(-1)
    assert lengths.min() < lengths.max()  # rows left the batch
    assert torch.equal(shared.completion_ids, copied.completion_ids)
    gap = (shared.logprobs - copied.logprobs)[shared.completion_mask].abs().max().item()
    assert gap <= 1e-5, gap


def test_lockstep_keeps_decoding_after_every_row_has_ended(policy, tokenizer, monkeypatch):
    """FSDP2: every rank runs every forward until all ranks are done. Here the other rank never
    is: the loop runs to max_new_tokens with its ended rows (one kept in the batch)."""
    alone = _generate(policy, tokenizer, max_new_tokens=120)
    forwards = []
    original_forward = policy.forward
    monkeypatch.setattr(hf, "all_ended", lambda done, broken, across_ranks: False)
    monkeypatch.setattr(
        policy, "forward", lambda *a, **k: forwards.append(1) or original_forward(*a, **k)
    )
    backend = TransformersBackend(policy, tokenizer, lockstep=True)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(max_new_tokens=120, seed=0, stop=["q"])
    out = backend.generate(prompts, 4, params)
    assert len(forwards) == 120  # the prefill and 119 decode steps
    assert alone.completion_ids.shape[1] < 120  # every row had ended before the budget ...
    n = alone.completion_ids.shape[1]  # ... with the tokens it has when decoding alone
    assert torch.equal(out.completion_ids[:, :n], alone.completion_ids)
    assert torch.equal(out.truncated, alone.truncated)


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_decode_attention_equals_sdpa(mask_kind):
    """The fp32 decode step's attention (one query per row, grouped K/V heads) is SDPA's."""
    from advantage.engine.rollout.kv_cache import decode_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, n, t, 16, generator=g) for n, t in ((6, 1), (2, 9), (2, 9)))
    allowed = torch.rand(5, 1, 1, 9, generator=g) > 0.3
    allowed[..., -1] = True  # a row's own position
    mask = {"bool": allowed, "none": None}.get(mask_kind)
    if mask_kind == "additive":
        mask = torch.zeros(5, 1, 1, 9).masked_fill(~allowed, float("-inf"))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True
    ).transpose(1, 2)
    got = decode_attention(q, k, v, mask, scaling=0.3)
    assert got.shape == (5, 1, 6, 16)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_decode_attention_is_fp32_only(monkeypatch):
    """Under bf16 autocast a decode step keeps SDPA (rotary embeddings leave the query fp32 but
    the value is bf16; the two products would otherwise skip the chosen bf16 kernels)."""
    from advantage.engine.rollout import kv_cache

    def refuse(*args, **kwargs):
        raise AssertionError("decode_attention under autocast")

    monkeypatch.setattr(kv_cache, "decode_attention", refuse)
    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 5, 8)
    v = torch.randn(2, 2, 5, 8, dtype=torch.bfloat16)
    module = torch.nn.Module()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as a decode step
        out, _ = kv_cache.sdpa_gqa(module, q, k, v, None)
    assert out.shape == (2, 1, 4, 8)


@pytest.mark.parametrize("kernels", ["fp32", "native"])
def test_bf16_decode_keeps_its_cache_rounded_in_fp32(policy, tokenizer, monkeypatch, kernels):
    """bf16 on CPU, whichever the products' kernels: the decode loop's cache stores keys and
    values rounded to bf16, as fp32 (over a bf16 cache PyTorch's SDPA copies it at every
    step). The attention over it: test_shared_prompt_cache_equals_growing_cache."""
    from advantage.engine import precision as mixed
    from advantage.engine.rollout import kv_cache

    monkeypatch.setattr(mixed, "_choice", kernels)  # restored after
    made = []
    decode_cache = kv_cache.decode_cache

    def recorded(*args):
        made.append(decode_cache(*args))
        return made[-1]

    monkeypatch.setattr(kv_cache, "decode_cache", recorded)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(max_new_tokens=8, seed=0)
    out = TransformersBackend(policy, tokenizer, "bf16").generate(prompts, 2, params)
    layer = made[0].layers[0]
    assert layer.keys.dtype == layer.values.dtype == torch.float32
    for t in (layer.keys, layer.values):
        assert torch.equal(t, t.to(torch.bfloat16).float())
    assert out.logprobs.isfinite().all()


def _llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("shared", [False, True])
def test_lean_decode_step_samples_as_the_models_forward(
    policy, tokenizer, monkeypatch, family, precision, shared
):
    """The decode loop with `decode_step.lean_decode_step` and with the model's own forward:
    the same tokens and the same log-probs, bitwise (the same ops in the same order), over the
    one-block and the shared cache, in fp32 and in bf16 with widened products."""
    from advantage.engine import precision as mixed
    from advantage.engine.rollout import decode_step, kv_cache

    monkeypatch.setattr(mixed, "_choice", "fp32")  # widened bf16 products (restored after)
    monkeypatch.setattr(kv_cache, "SHARE_FROM", 1 if shared else 10**9)
    model = policy if family == "qwen2" else _llama(tokenizer)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(max_new_tokens=24, seed=0)
    outs = []
    lean = decode_step.lean_decode_step
    for pick in (lean, lambda m: None):
        monkeypatch.setattr(decode_step, "lean_decode_step", pick)
        outs.append(TransformersBackend(model, tokenizer, precision).generate(prompts, 3, params))
    assert lean(model) is not None
    lengths = outs[0].completion_mask.sum(-1)
    assert lengths.min() < lengths.max()  # rows left the batch
    assert torch.equal(outs[0].completion_ids, outs[1].completion_ids)
    assert torch.equal(outs[0].logprobs, outs[1].logprobs)


def test_lean_decode_step_only_for_the_layouts_it_knows(tokenizer):
    from advantage.engine.rollout.decode_step import lean_decode_step

    eager = load_causal_lm(str(builtin_model_path("tiny-random")))
    eager.config._attn_implementation = "eager"  # its attention is not an SDPA function
    assert lean_decode_step(eager) is None
    other = _llama(tokenizer)
    assert lean_decode_step(other) is not None
    other.config.model_type = "mistral"  # may slide its window
    assert lean_decode_step(other) is None
    hooked = _llama(tokenizer)  # a hook the step would skip (it calls the layer's parts)
    hooked.model.layers[1].register_forward_hook(lambda *a: None)
    assert lean_decode_step(hooked) is None
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(_llama(tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))
    assert lean_decode_step(lora) is None


@pytest.mark.parametrize("params", [{}, {"greedy": True}, {"top_k": 5}])
def test_non_finite_logits_stop_generation(tokenizer, params):
    """An argmax over NaN probabilities is token 0 (the pad): a model with NaN weights gave
    empty completions, 0% accuracy and a clean exit (a probe); now generation stops."""
    broken = load_causal_lm(str(builtin_model_path("tiny-random"))).eval()
    with torch.no_grad():
        broken.model.norm.weight[3] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"not finite \(NaN or inf\) for 12 seq"):
        _generate(broken, tokenizer, **params)


def test_under_lockstep_every_rank_stops_when_one_has_non_finite_logits(monkeypatch):
    """A rank raising alone left the others waiting in the next collective: `_all` agrees on
    the count (one all-reduce) and every rank raises together."""
    import torch.distributed as dist

    other_rank = torch.tensor([0.0, 1.0])  # another rank: no row pending, one broken
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.add_(other_rank))
    done = torch.tensor([False, True])
    with pytest.raises(NonFiniteLogitsError, match=r"for 1 sequences \(this rank's rows \[\]\)"):
        draw.all_ended(done, torch.tensor([], dtype=torch.long), across_ranks=True)
    monkeypatch.setattr(dist, "all_reduce", lambda t: t)
    assert not draw.all_ended(done, torch.tensor([], dtype=torch.long), across_ranks=True)


def test_stop_strings_with_a_tokenizer_of_a_tasks_own_characters(policy):
    """transformers' StopStringCriteria probes the vocabulary with "abcdef": a character
    tokenizer of a task's own characters (`advantage init-model --chars "0123456789+="`) made
    it raise ValueError inside generation (every episode adds stop strings). Such rows now stop
    on their decoded text, where the stop string ends."""
    from advantage.tasks.tiny import char_tokenizer as chars

    digits = chars("0123456789+=")
    digits.eos_token = "+"
    stops = draw.stop_criterion(digits, SamplingParams(stop=["=1", "9"]))
    assert isinstance(stops, draw.DecodedStops)
    rows = torch.tensor([digits.encode("12=1", add_special_tokens=False),
                         digits.encode("1=12", add_special_tokens=False),
                         digits.encode("2349", add_special_tokens=False)])  # fmt: skip
    assert stops(rows).tolist() == [True, False, True]
    prompts = [digits("12=")["input_ids"], digits("7+")["input_ids"]]
    out = TransformersBackend(policy, digits).generate(
        prompts, 2, SamplingParams(max_new_tokens=30, seed=0, stop=["=1", "9"])
    )
    for ids, truncated in zip(out.completion_ids, out.truncated, strict=True):
        text = digits.decode(ids, skip_special_tokens=True)
        ended = text.endswith(("=1", "9")) or "+" in digits.decode(ids)
        assert ended or bool(truncated), text
