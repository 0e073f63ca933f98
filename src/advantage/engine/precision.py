"""Mixed precision: bf16 autocast for forward passes, and the kernels its matrix products use.

Under `model.precision=bf16` every forward pass runs in `torch.autocast(bfloat16)`: the matrix
products take bf16 operands, accumulate in fp32 and round their result to bf16; weights and the
optimizer stay fp32.

**CPUs without bf16 matrix units** (no AVX512-BF16 / AMX, e.g. AMD Zen 3) run PyTorch's bf16
GEMM on slow fallback kernels: 1–25 GFLOP/s against 150–180 GFLOP/s in fp32 on the 2-core
machine of `benchmarks/results`. There, with `model.bf16_matmul=auto` (the default), each bf16
product (`mm`, `addmm`, `bmm`, `baddbmm`, `linear`, `matmul`; forward and backward) is computed
by widening its bf16 operands to fp32 (exact), multiplying with the fp32 GEMM (fp32
accumulation) and rounding the result to bf16: the arithmetic of a native bf16 GEMM, only the
order of the fp32 additions may differ. Everything else (activations kept for the backward
pass, elementwise ops, attention) stays as autocast makes it.

`bf16_matmul`: `auto` (fp32 kernels when the CPU has no native bf16 GEMM, native otherwise),
`native` (always PyTorch's bf16 kernels), `fp32` (always widen).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
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
    """True when this CPU has bf16 matrix instructions (oneDNN's bf16 path)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def set_bf16_matmul(choice: str) -> None:
    """Choose the kernels of bf16 matrix products on CPU for this process (see module doc)."""
    global _choice
    if choice not in BF16_MATMUL_CHOICES:
        raise ValueError(f"bf16_matmul must be one of {BF16_MATMUL_CHOICES}, got {choice!r}")
    _choice = choice


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


def matmul_kernels(precision: str, device: torch.device | str = "cpu"):
    """Context for a backward pass (or any code) whose bf16 products should use the chosen
    kernels; a no-op in fp32 or when native kernels are used."""
    if precision == "bf16" and widens_bf16_matmul(device):
        return Bf16MatmulInFp32()
    return contextlib.nullcontext()


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str = "cpu"):
    """Context for a forward pass: nothing in fp32; bf16 autocast (and the chosen kernels) in
    bf16."""
    if precision != "bf16":
        yield
        return
    device_type = torch.device(device).type
    with (
        torch.autocast(device_type=device_type, dtype=torch.bfloat16),
        matmul_kernels(precision, device),
    ):
        yield


def log_bf16_kernels(precision: str) -> None:
    """Say once at start which kernels bf16 products use on this CPU."""
    if precision != "bf16" or torch.cuda.is_available():
        return
    log = logging.getLogger("advantage")
    if widens_bf16_matmul("cpu"):
        log.info(
            "model.precision=bf16: this CPU has no native bf16 GEMM (AVX512-BF16/AMX); bf16 "
            "matrix products run as fp32 GEMMs of their bf16 operands (model.bf16_matmul=%s)",
            _choice,
        )
    elif not native_bf16_gemm_is_fast():
        log.warning(
            "model.precision=bf16 with model.bf16_matmul=native on a CPU without bf16 matrix "
            "units: bf16 products run on slow fallback kernels, many times slower than fp32"
        )
