"""bf16 autocast and the kernels of its matrix products (advantage/precision.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from advantage.engine import precision
from advantage.engine.configlib import ConfigError
from advantage.engine.precision import Bf16MatmulInFp32, autocast, matmul_kernels, set_bf16_matmul
from advantage.rl.config import load_config
from advantage.rl.trainer import Trainer
from helpers import length_reward, small_config

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def restore_choice():
    yield
    set_bf16_matmul("auto")


def operands(*shapes):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g).to(BF16) for s in shapes]


def wide(fn, *args):
    """The product the fp32 path must give: fp32 GEMM of the widened operands, rounded to bf16."""
    return fn(*(a.float() for a in args)).to(BF16)


@pytest.mark.parametrize("grad_mode", [torch.enable_grad, torch.inference_mode])
def test_every_product_is_the_fp32_gemm_of_the_bf16_operands(grad_mode):
    x, w, b, x3, y3 = operands((5, 7), (3, 7), (3,), (2, 5, 7), (2, 7, 4))
    cases = {
        "mm": (torch.mm, x, w.T),
        "addmm": (torch.addmm, b, x, w.T),
        "bmm": (torch.bmm, x3, y3),
        "baddbmm": (
            lambda c, p, q: torch.baddbmm(c, p, q, alpha=0.5),
            torch.zeros(2, 5, 4),
            x3,
            y3,
        ),
        "linear": (F.linear, x3, w, b),
        "matmul": (torch.matmul, x3, y3),
    }
    with grad_mode():
        for name, (fn, *args) in cases.items():
            args = [a.to(BF16) for a in args]
            with Bf16MatmulInFp32() as mode:
                got = fn(*args)
            assert mode.widened == 1, name  # caught whole, or as its one `mm`/`addmm`/`bmm`
            assert got.dtype == BF16, name
            assert torch.equal(got, wide(fn, *args)), name
            # and it is a bf16 product: close to PyTorch's own bf16 kernel (fp32 accumulation)
            torch.testing.assert_close(got, fn(*args), rtol=1.6e-2, atol=1e-2)


def test_fp32_products_pass_through_unchanged():
    x, w = (t.float() for t in operands((4, 6), (6, 3)))
    with Bf16MatmulInFp32() as mode:
        assert torch.equal(x @ w, torch.mm(x, w))
    assert mode.widened == 0


def test_backward_products_are_caught_too():
    """Under autocast the weight's gradient is x^T·g of bf16 operands: inside the mode it is the
    fp32 GEMM of them, rounded to bf16 (then widened to the fp32 weight's dtype)."""
    x = operands((6, 5))[0].float()
    lin = torch.nn.Linear(5, 3, bias=False)
    g = torch.linspace(-1, 1, 18).reshape(6, 3)
    with autocast("bf16"), Bf16MatmulInFp32():
        out = lin(x)
    with Bf16MatmulInFp32() as mode:
        out.backward(g.to(BF16))
    assert mode.widened == 1  # the weight's gradient (x needs none)
    expected = (g.to(BF16).float().T @ x.to(BF16).float()).to(BF16).float()
    assert torch.equal(lin.weight.grad, expected)


def test_choice_decides_the_kernels(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16_gemm_is_fast", lambda: False)
    set_bf16_matmul("auto")
    assert isinstance(matmul_kernels("bf16"), Bf16MatmulInFp32)
    assert not isinstance(matmul_kernels("fp32"), Bf16MatmulInFp32)
    set_bf16_matmul("native")
    assert not isinstance(matmul_kernels("bf16"), Bf16MatmulInFp32)
    monkeypatch.setattr(precision, "native_bf16_gemm_is_fast", lambda: True)
    set_bf16_matmul("auto")
    assert not isinstance(matmul_kernels("bf16"), Bf16MatmulInFp32)
    set_bf16_matmul("fp32")
    assert isinstance(matmul_kernels("bf16"), Bf16MatmulInFp32)
    with pytest.raises(ValueError, match="bf16_matmul"):
        set_bf16_matmul("fast")


def test_config_names_a_bad_choice(run_dir):
    with pytest.raises(ConfigError, match=r"model\.bf16_matmul"):
        load_config(None, small_config(run_dir, "model.bf16_matmul=fast"))


@pytest.mark.slow
def test_bf16_training_matches_native_kernels(run_dir):
    """Two GRPO steps in bf16 with the fp32 GEMMs and with PyTorch's bf16 kernels: finite and
    moving; and one batch scored under both kernels: log-probs equal up to bf16 rounding.

    (The two runs' samples are not compared: where the kernels round a logit differently a
    sampled token can differ, more or less often depending on the CPU's bf16 units.)"""
    from advantage.engine.models import completion_logprobs

    for choice in ("fp32", "native"):
        cfg = load_config(
            None,
            small_config(
                run_dir / choice,
                "model.precision=bf16",
                f"model.bf16_matmul={choice}",
                "train.steps=2",
            ),
        )
        trainer = Trainer(cfg, reward_funcs=[length_reward])
        before = [p.detach().clone() for p in trainer.policy.parameters()]
        metrics = trainer.fit().metrics
        assert all(math.isfinite(m["loss/policy"]) and m["skipped_updates"] == 0 for m in metrics)
        moved = sum(
            not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters(), strict=True)
        )
        assert moved > len(before) // 2
    batch = trainer.rollout_and_score().rollout
    logprobs, bf16_products = {}, {}
    for choice in ("fp32", "native"):
        set_bf16_matmul(choice)
        with torch.no_grad(), _Bf16Products() as products:
            logprobs[choice] = completion_logprobs(trainer.policy, batch, precision="bf16")[0]
        bf16_products[choice] = products.count
    # two kernels ran (not: the log-probs differ — on some CPUs the two round alike)
    assert bf16_products["fp32"] == 0 and bf16_products["native"] > 0, bf16_products
    mask = batch.completion_mask
    fp32, native = logprobs["fp32"][mask], logprobs["native"][mask]
    assert torch.isfinite(fp32).all()
    torch.testing.assert_close(fp32, native, rtol=1.6e-2, atol=1e-2)  # bf16 rounding


class _Bf16Products(TorchDispatchMode):
    """Counts the matrix products computed on bf16 operands (PyTorch's bf16 kernels)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        products = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                    torch.ops.aten.bmm.default)  # fmt: skip
        if func in products and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


def qwen2(attention: str = "sdpa"):
    from advantage.tasks.tiny import tiny_qwen2

    model = tiny_qwen2("micro", seed=1)
    model.config._attn_implementation = attention
    return model


@pytest.mark.parametrize("grad", [True, False])
def test_module_level_widening_is_the_dispatch_modes_arithmetic(grad):
    """`widened_linears` (no per-op interception; weights rounded once without autograd) gives
    the logits, and in training the gradients, of `Bf16MatmulInFp32`: the same bf16 operands,
    fp32 GEMMs, results rounded to bf16."""
    model = qwen2()
    assert precision.module_level(model)
    ids = torch.randint(
        4, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0)
    )
    outputs, grads = [], []
    for widen in (precision.widened_linears, lambda _: Bf16MatmulInFp32()):
        model.zero_grad()
        with torch.set_grad_enabled(grad):
            with torch.autocast("cpu", dtype=BF16), widen(model):
                logits = model(input_ids=ids).logits
                logits = model(input_ids=ids).logits  # weights' copies reused without autograd
            if grad:
                with Bf16MatmulInFp32():  # catches any bf16 product left in the backward
                    logits.float().square().mean().backward()
                grads.append([p.grad.clone() for p in model.parameters()])
        outputs.append(logits)
    assert outputs[0].dtype == BF16
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # and the Linear modules are themselves again afterwards
    assert all("forward" not in vars(m) for m in model.modules())


def test_module_level_keeps_bf16_operands_for_the_backward_and_nests():
    """The graph keeps what autocast's keeps (bf16 inputs and weights, not fp32 widenings);
    a context entered inside another on the same model leaves the outer one's Linears be."""
    model, ids = qwen2(), torch.arange(4, 20).reshape(2, 8)
    saved = {}
    for name, widen in (("module", precision.widened_linears), ("dispatch", None)):
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel() * t.element_size())
            return t

        kernels = widen(model) if widen else Bf16MatmulInFp32()
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with hooks, torch.autocast("cpu", dtype=BF16), kernels:
            model(input_ids=ids).logits.float().sum().backward()
        saved[name] = sum(sizes)
    assert saved["module"] <= saved["dispatch"]
    with precision.widened_linears(model):
        outer = model.model.layers[0].mlp.up_proj.forward
        with precision.widened_linears(model):
            assert model.model.layers[0].mlp.up_proj.forward is outer
        assert model.model.layers[0].mlp.up_proj.forward is outer
    assert all("forward" not in vars(m) for m in model.modules())


def test_module_level_rewidens_weights_given_new_storage():
    """Without autograd a weight is widened once per pass, and again when its storage changes
    (the decode loop relays weights column-major: `hf.WeightLayout`)."""
    model, x = qwen2(), torch.randn(3, 64)
    linear = model.model.layers[0].mlp.up_proj
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16), precision.widened_linears(model):
        first = linear(x)
        linear.weight.data = 2 * linear.weight.data
        assert torch.equal(linear(x), 2 * first)  # a power of two: exact in bf16


def test_module_level_needs_linear_only_products():
    assert not precision.module_level(qwen2("eager"))  # attention products are matmuls
    dropout = qwen2()
    dropout.config.attention_dropout = 0.1
    assert not precision.module_level(dropout)  # SDPA's math path in training
    checkpointed = qwen2()
    checkpointed.gradient_checkpointing_enable()
    assert not precision.module_level(checkpointed)  # recomputed outside the context
    set_bf16_matmul("fp32")
    assert isinstance(matmul_kernels("bf16", model=qwen2("eager")), Bf16MatmulInFp32)
    assert not isinstance(matmul_kernels("bf16", model=qwen2()), Bf16MatmulInFp32)


def test_auto_measures_the_two_gemms(monkeypatch):
    """`auto` takes the native bf16 GEMM only on a CPU with bf16 instructions where it is at
    least as fast as the fp32 GEMM (some AVX512-BF16 CPUs without AMX are slower in bf16)."""
    for has_bf16, seconds, native in [
        (True, {BF16: 1.0, torch.float32: 2.0}, True),
        (True, {BF16: 2.0, torch.float32: 1.0}, False),
        (False, {BF16: 1.0, torch.float32: 2.0}, False),
    ]:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda h=has_bf16: h)
        monkeypatch.setattr(precision, "_gemm_seconds", lambda dtype, s=seconds: s[dtype])
        precision.native_bf16_gemm_is_fast.cache_clear()
        assert precision.native_bf16_gemm_is_fast() is native
    precision.native_bf16_gemm_is_fast.cache_clear()
    assert precision._gemm_seconds(torch.float32) > 0


def test_bf16_decode_loop_samples_as_the_dispatch_mode_does(monkeypatch):
    """The decode loop on module-level widening (weights rounded once per rollout) draws the
    tokens, with the log-probs, of the loop with every op intercepted."""
    from advantage.engine.rollout import SamplingParams, TransformersBackend
    from advantage.tasks.tiny import char_tokenizer

    set_bf16_matmul("fp32")
    tokenizer, model = char_tokenizer(), qwen2()
    prompts = [tokenizer.encode(t) for t in ("abc", "hello there", "x")]
    params = SamplingParams(max_new_tokens=12, seed=3)
    backend = TransformersBackend(model, tokenizer, precision="bf16")
    level = backend.generate(prompts, 4, params)
    monkeypatch.setattr(precision, "module_level", lambda model: False)
    intercepted = backend.generate(prompts, 4, params)
    assert torch.equal(level.completion_ids, intercepted.completion_ids)
    assert torch.equal(level.logprobs, intercepted.logprobs)


@pytest.mark.parametrize("choice", ["fp32", "native"])
@pytest.mark.parametrize("prompt_len", [6, 60])  # the masked call, and packed segments
def test_passes_with_and_without_a_gradient_agree_bitwise(choice, prompt_len):
    """bf16 log-probs of the same rollout and weights, in a pass with autograd (the update's)
    and without (the old policy's, the reference's): equal bitwise whichever the products'
    kernels, so the first minibatch's ratio is exactly 1 and the KL to an identical reference 0."""
    from advantage.engine.models import completion_logprobs
    from advantage.engine.rollout import Rollout, pad_completions, pad_prompts

    set_bf16_matmul(choice)
    model = qwen2().train()
    model.config.attention_dropout = 0.0
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 40, (prompt_len,), generator=g).tolist() for _ in range(2)]
    lengths = torch.randint(3, prompt_len + 2, (4,), generator=g).tolist()
    completions = [torch.randint(4, 40, (n,), generator=g).tolist() for n in lengths]
    ids, mask = pad_prompts(prompts, pad_id=0)
    c_ids, c_mask, _ = pad_completions(completions, pad_id=0)
    rollout = Rollout(
        prompt_ids=ids.repeat_interleave(2, 0), prompt_mask=mask.repeat_interleave(2, 0),
        completion_ids=c_ids, completion_mask=c_mask, truncated=torch.zeros(4, dtype=torch.bool),
    )  # fmt: skip
    with torch.no_grad():
        without, _ = completion_logprobs(model, rollout, 1.0, precision="bf16")
    with_grad, _ = completion_logprobs(model, rollout, 1.0, precision="bf16")
    assert with_grad.requires_grad
    kept = c_mask.bool()
    assert torch.equal(with_grad.detach()[kept], without[kept])


def _agree(rank: int, port: int, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.distributed.init_process_group("gloo")
    # ranks that share cores can measure differently: here rank 0 finds native bf16 fast
    precision.native_bf16_gemm_is_fast = lambda: rank == 0
    set_bf16_matmul("auto", agreed=True)
    torch.save(precision.widens_bf16_matmul("cpu"), f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ranks_take_rank_zeros_measurement(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_agree, args=(port, str(tmp_path)), nprocs=2, join=True)
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)] == [False, False]


@pytest.mark.parametrize("choice", ["fp32", "native"])
def test_attention_is_widened_with_the_products(choice):
    """Under `autocast` on CPU, advantage's attention (here the packed passes' masked call) is
    fp32 SDPA on the bf16-rounded query, keys and values, the output rounded to bf16 and the
    gradients bf16-rounded, whichever the products' kernels (PyTorch's bf16 backward is the
    slower one on CPU), with autograd and without (so both passes agree). A decode step (one
    query, no autograd) over bf16 keys and values keeps the bf16 kernel either way."""
    from advantage.engine.rollout.kv_cache import sdpa_gqa

    set_bf16_matmul(choice)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g, requires_grad=True)  # fp32, as rotary leaves it
    k, v = (torch.randn(2, 2, 6, 8, generator=g).to(BF16).requires_grad_() for _ in range(2))
    mask = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6)
    grad = torch.randn(2, 6, 4, 8, generator=g).to(BF16)

    def attention(fn):
        for t in (q, k, v):
            t.grad = None
        out = fn()
        out.backward(grad)
        return out, [t.grad for t in (q, k, v)]

    def widened(q=q):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(
                q.to(BF16).float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True
            )
        return out.transpose(1, 2).to(BF16)

    with autocast("bf16", "cpu", qwen2()):
        got, got_grads = attention(lambda: sdpa_gqa(torch.nn.Module(), q, k, v, mask)[0])
        with torch.no_grad():
            forward_only = sdpa_gqa(torch.nn.Module(), q, k, v, mask)[0]
            decode = sdpa_gqa(torch.nn.Module(), q[:, :, -1:], k, v, None)[0]
    expected, expected_grads = attention(widened)
    assert got.dtype == BF16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(got_grads, expected_grads, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert got_grads[1].dtype == BF16 and got_grads[0].dtype == torch.float32
    assert torch.equal(got_grads[0], got_grads[0].to(BF16).float())  # bf16-rounded
    with torch.no_grad():
        torch.testing.assert_close(forward_only, widened(), rtol=0, atol=0)
        with torch.autocast("cpu", dtype=BF16):
            one_query = F.scaled_dot_product_attention(q[:, :, -1:], k, v, enable_gqa=True)
    torch.testing.assert_close(decode, one_query.transpose(1, 2), rtol=0, atol=0)


def test_decode_step_over_a_widened_cache_attends_in_fp32():
    """A decode step whose cache holds rounded fp32 keys and values (`decode_cache(widened=
    True)`) attends in fp32 with the query rounded to bf16, the output rounded to bf16."""
    from advantage.engine.rollout.kv_cache import decode_attention, sdpa_gqa

    set_bf16_matmul("fp32")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 1, 8, generator=g)
    k, v = (torch.randn(3, 2, 7, 8, generator=g).to(BF16).float() for _ in range(2))
    with torch.no_grad(), autocast("bf16", "cpu", qwen2()):
        got = sdpa_gqa(torch.nn.Module(), q, k, v, None)[0]
    expected = decode_attention(q.to(BF16).float(), k, v, None).to(BF16)
    assert got.dtype == BF16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
