"""Mixed precision: bf16 autocast for forward passes, and the kernels its matrix products use.

Under `model.precision=bf16` every forward pass runs in `torch.autocast(bfloat16)`: the matrix
products take bf16 operands, accumulate in fp32 and round their result to bf16; weights and the
optimizer stay fp32.

**CPUs whose bf16 GEMM is slower than their fp32 GEMM.** Without bf16 matrix units (no
AVX512-BF16 / AMX, e.g. AMD Zen 3) PyTorch's bf16 GEMM runs on fallback kernels: 1–25 GFLOP/s
against 150–180 GFLOP/s in fp32 on the 2-core machine of `benchmarks/results`. Some CPUs with
AVX512-BF16 but no AMX are slower in bf16 too (an Intel Xeon of `benchmarks/results`: ~170
against ~300 GFLOP/s). There, with `model.bf16_matmul=auto` (the default), each bf16 product
(`mm`, `addmm`, `bmm`, `baddbmm`, `linear`, `matmul`; forward and backward) is computed by
widening its bf16 operands to fp32 (exact), multiplying with the fp32 GEMM (fp32 accumulation)
and rounding the result to bf16: the arithmetic of a native bf16 GEMM, only the order of the
fp32 additions may differ. Attention implemented by advantage (`widened_attention`: the
decode loop's, the packed training passes') runs there in fp32 on the bf16-rounded query, keys
and values, its output (and the gradients it passes back) rounded to bf16: PyTorch's CPU flash
attention in bf16 runs on those slow bf16 GEMMs (the `tiny` model's backward: 10.4 ms against
2.9 ms in fp32). Everything else (activations kept for the backward pass, elementwise ops)
stays as autocast makes it.

**Attention on CPU** runs so too where the products are PyTorch's bf16 kernels (`native`, or
`auto` on a CPU with AMX): the CPU flash kernel's bf16 backward is slower than its fp32 one even
there (an AMX Xeon, a packed row of 8 × 128 positions, 8 heads: forward + backward 13.4 ms in
bf16 against 6.0 ms in fp32; the fixed benchmark's `small` bf16 update 0.40 → 0.33 s, `tiny`
0.090 → 0.072 s), and passes without autograd (reference, old policy, old values, prefill)
attend the same way, so that a pass with and without a gradient give the same log-probs
bitwise (the first minibatch's ratio is 1; the KL to an identical reference is 0), at the cost
of their faster bf16 forward (0.8 against 1.7 ms for that row). A decode step in bf16 on CPU
attends in fp32 over a cache stored rounded, as fp32 (`kv_cache.decode_cache(widened=True)`;
`hf.TransformersBackend._decoder` says why).

Two ways to widen: `Bf16MatmulInFp32`, a dispatch mode that catches every product (forward and
backward) at the cost of intercepting every op in Python; and, for models whose only bf16
products are their `nn.Linear`s (`module_level`: SDPA attention, the Qwen2/Llama family),
`widened_linears`, the same arithmetic at module level, whose passes without autograd (the
decode loop, reference forwards) also round each weight once per pass, not at every product.

`bf16_matmul`: `auto` (fp32 kernels unless the CPU has bf16 matrix instructions and its bf16
GEMM measures at least as fast as its fp32 GEMM, once per process), `native` (always PyTorch's
bf16 kernels), `fp32` (always widen). The two give a product's result up to the order of its
fp32 additions; on a CPU where the two GEMMs are about as fast, `auto` may choose differently
in two processes, so runs that must repeat bitwise (a resumed run) name one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

BF16_MATMUL_CHOICES = ("auto", "native", "fp32")

_aten = torch.ops.aten
# without autograd (inference mode) `linear` and `matmul` arrive whole, not decomposed into `mm`
_MATMULS = frozenset(
    {
        _aten.mm.default,
        _aten.addmm.default,
        _aten.bmm.default,
        _aten.baddbmm.default,
        _aten.linear.default,
        _aten.matmul.default,
    }
)

_choice = "auto"


@functools.cache
def native_bf16_gemm_is_fast() -> bool:
    """True when this CPU has bf16 matrix instructions (oneDNN's bf16 path) and its bf16 GEMM
    is at least as fast as its fp32 GEMM (a 256 × 1024 × 1024 product, best of 5 each)."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    return _gemm_seconds(torch.bfloat16) <= _gemm_seconds(torch.float32)


def _gemm_seconds(dtype: torch.dtype, repeats: int = 5) -> float:
    a, b = torch.ones(256, 1024, dtype=dtype), torch.ones(1024, 1024, dtype=dtype)
    best = float("inf")
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        a @ b  # warm-up: the kernel's first call packs and dispatches
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    return best


def set_bf16_matmul(choice: str, agreed: bool = False) -> None:
    """Choose the kernels of bf16 matrix products on CPU for this process (see module doc).
    `agreed`: under torch.distributed, `auto` is decided by rank 0's measurement for every
    rank (ranks sharing cores measure differently)."""
    global _choice
    if choice not in BF16_MATMUL_CHOICES:
        raise ValueError(f"bf16_matmul must be one of {BF16_MATMUL_CHOICES}, got {choice!r}")
    _choice = choice
    distributed = torch.distributed.is_initialized() and not torch.cuda.is_available()
    if choice == "auto" and agreed and distributed:
        fast = [native_bf16_gemm_is_fast() if torch.distributed.get_rank() == 0 else None]
        torch.distributed.broadcast_object_list(fast, src=0)
        _choice = "native" if fast[0] else "fp32"


def widens_bf16_matmul(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 products on `device` are computed with fp32 kernels."""
    if torch.device(device).type != "cpu" or _choice == "native":
        return False
    return _choice == "fp32" or not native_bf16_gemm_is_fast()


class Bf16MatmulInFp32(TorchDispatchMode):
    """Computes bf16 matrix products (`mm`, `addmm`, `bmm`, `baddbmm`, `linear`, `matmul`) as
    fp32 GEMMs of the widened operands, result rounded to bf16. Below autograd: the backward
    pass's products are caught the same way.
    `widened` counts the products it computed."""

    def __init__(self) -> None:
        super().__init__()
        self.widened = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args
        ):
            self.widened += 1
            wide = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            return func(*wide, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def matmul_kernels(
    precision: str, device: torch.device | str = "cpu", model: torch.nn.Module | None = None
):
    """Context for a backward pass whose bf16 products should use the chosen kernels; a no-op
    in fp32, when native kernels are used, and for a `model` whose forward widened its products
    at module level (`module_level`: its backward multiplies fp32 operands only)."""
    if not (precision == "bf16" and widens_bf16_matmul(device)):
        return contextlib.nullcontext()
    if model is not None and module_level(model):
        return contextlib.nullcontext()
    return Bf16MatmulInFp32()


# inside `autocast`: whether its bf16 products are widened (read by `widened_attention`)
_WIDENED: ContextVar[bool] = ContextVar("advantage_widened_bf16", default=False)


@contextlib.contextmanager
def autocast(
    precision: str, device: torch.device | str = "cpu", model: torch.nn.Module | None = None
):
    """Context for a forward pass (of `model`, when given): nothing in fp32; bf16 autocast and
    the chosen kernels for its products in bf16 (`widened_linears` for a `module_level`
    model, else `Bf16MatmulInFp32`)."""
    if precision != "bf16":
        yield
        return
    kernels: contextlib.AbstractContextManager = contextlib.nullcontext()
    wide = widens_bf16_matmul(device)
    if wide:
        level = model is not None and module_level(model)
        kernels = widened_linears(model) if level else Bf16MatmulInFp32()
    token = _WIDENED.set(wide)
    try:
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16), kernels:
            yield
    finally:
        _WIDENED.reset(token)


def fp32_attention(device: torch.device | str) -> bool:
    """Whether attention implemented by advantage runs in fp32 on bf16-rounded inputs although
    the products may be bf16 kernels: under bf16 autocast on CPU (module docstring)."""
    return (
        torch.device(device).type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


def widened_attention(attention):
    """An attention implementation `attention(module, query, key, value, mask, ...)` that,
    inside `autocast` with widened bf16 products (or on CPU whatever the kernels:
    `fp32_attention`), runs with autocast off on the bf16-rounded
    query, keys and values as fp32 (exact), its output rounded to bf16; the gradients it passes
    back are rounded to bf16 (as a bf16 kernel's would be) by the casts. Elsewhere unchanged.
    A decode step (one query per row, no autograd) is widened over a cache that stores its keys
    and values rounded, as fp32 (`kv_cache.decode_cache(widened=True)`; both fp32 here),
    whichever the products' kernels, and only there:
    widening a bf16 cache would copy all of it at every step (the realistic benchmark's `tiny`
    rollout: 1.6 → 2.3 s)."""

    @functools.wraps(attention)
    def attend(module, query, key, value, *args, **kwargs):
        if not torch.is_autocast_enabled(query.device.type):
            return attention(module, query, key, value, *args, **kwargs)
        if query.shape[2] == 1 and not torch.is_grad_enabled():  # a decode step
            if not key.dtype == value.dtype == torch.float32:
                return attention(module, query, key, value, *args, **kwargs)
            key_value = (key, value)  # stored rounded (`decode_cache(widened=True)`)
        elif _WIDENED.get() or fp32_attention(query.device):
            key_value = (_round(key), _round(value))
        else:
            return attention(module, query, key, value, *args, **kwargs)
        with torch.autocast(query.device.type, enabled=False):
            out, weights = attention(module, _round(query), *key_value, *args, **kwargs)
        return out.to(torch.bfloat16), weights

    return attend


@contextlib.contextmanager
def widened_linears(model: torch.nn.Module):
    """Inside, each `nn.Linear` of `model` computes autocast's bf16 product as the fp32 GEMM of
    its bf16 input, weight and bias, the result rounded to bf16 (`WidenedLinear`, which keeps
    bf16 operands for the backward pass as autocast does): `Bf16MatmulInFp32`'s arithmetic
    without intercepting every op. Without autograd (the decode loop, reference forwards) the
    weights are rounded and widened once per pass, not at every call. Linears already replaced
    (a nested context on the same modules) are left to the outer one."""
    # no-grad passes: (W's address, the fp32 widening of W and b); the layout of W is kept
    widened: dict[torch.nn.Linear, tuple] = {}

    def forward_of(linear: torch.nn.Linear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            weight, bias = linear.weight, linear.bias
            if not torch.is_autocast_enabled(x.device.type):  # autocast off: plain fp32
                return F.linear(x, weight, bias)
            if torch.is_grad_enabled():
                return WidenedLinear.apply(x, weight, bias)
            if widened.get(linear, (None,))[0] != weight.data_ptr():  # new or re-laid weights
                rounded = tuple(None if t is None else _round(t) for t in (weight, bias))
                widened[linear] = (weight.data_ptr(), *rounded)
            return _fp32_linear(_round(x), *widened[linear][1:])

        return forward

    linears = [
        m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in vars(m)
    ]
    for linear in linears:
        linear.forward = forward_of(linear)
    try:
        yield
    finally:
        for linear in linears:
            del linear.forward


def _round(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to bf16, as fp32 (one copy for a bf16 `t`)."""
    return t.float() if t.dtype == torch.bfloat16 else t.to(torch.bfloat16).float()


def _fp32_linear(x, weight, bias) -> torch.Tensor:
    """`F.linear` of bf16-exact fp32 operands with autocast off, the result rounded to bf16."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x, weight, bias).to(torch.bfloat16)


class WidenedLinear(torch.autograd.Function):
    """`F.linear` under bf16 autocast with fp32 GEMMs: the operands rounded to bf16 (and kept so
    for the backward pass), each product's result (output, input gradient, weight gradient)
    rounded to bf16, the gradients then cast to the dtype of what they are the gradient of."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x16, w16 = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        ctx.save_for_backward(x16, w16)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return _fp32_linear(x16.float(), w16.float(), None if bias is None else _round(bias))

    @staticmethod
    def backward(ctx, grad):
        x16, w16 = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad.to(torch.bfloat16).float()
        flat = g.reshape(-1, g.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g @ w16.float()).to(torch.bfloat16).to(x_dtype)
        if ctx.needs_input_grad[1]:
            gw = flat.T @ x16.reshape(-1, x16.shape[-1]).float()
            gw = gw.to(torch.bfloat16).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            gb = flat.sum(0).to(torch.bfloat16).to(b_dtype)
        return gx, gw, gb


def module_level(model: torch.nn.Module) -> bool:
    """Whether `model`'s bf16 products can be widened by `widened_linears`: every one of them
    is an `nn.Linear`'s (SDPA attention without dropout, its own fused kernel; every matrix
    parameter a Linear's or an Embedding's; no DoRA, whose magnitude step multiplies outside
    them), and no forward is recomputed in the backward pass (gradient checkpointing) or
    sharded (FSDP2: no full copy of the weights is kept)."""
    from torch.distributed.fsdp import FSDPModule

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "attention_dropout", 0.0):  # SDPA's math path: bf16 matmuls
        return False
    for module in model.modules():
        if isinstance(module, FSDPModule) or getattr(module, "gradient_checkpointing", False):
            return False
        if getattr(module, "lora_magnitude_vector", None):  # peft DoRA
            return False
        if type(module) not in (torch.nn.Linear, torch.nn.Embedding) and any(
            p.dim() >= 2 for p in module.parameters(recurse=False)
        ):
            return False
    return True


def log_bf16_kernels(precision: str) -> None:
    """Say once at start which kernels bf16 products use on this CPU."""
    if precision != "bf16" or torch.cuda.is_available():
        return
    log = logging.getLogger("advantage")
    if widens_bf16_matmul("cpu"):
        log.info(
            "model.precision=bf16: this CPU's native bf16 GEMM is slower than its fp32 GEMM (or "
            "absent); bf16 matrix products run as fp32 GEMMs of their bf16 operands "
            "(model.bf16_matmul=%s)",
            _choice,
        )
    elif not native_bf16_gemm_is_fast():
        log.warning(
            "model.precision=bf16 with model.bf16_matmul=native on a CPU whose bf16 GEMM is "
            "slower than its fp32 GEMM (many times slower without bf16 matrix units)"
        )
