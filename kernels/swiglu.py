"""SwiGLU activation in Triton: y = silu(a) * b, forward and backward.

Math
----
With s = sigmoid(a) = 1 / (1 + exp(-a)), elementwise::

    y  = a * s * b

Backward, given dy = dLoss/dy::

    da = dy * b * s * (1 + a * (1 - s))     (d silu(a) / da = s + a s (1 - s))
    db = dy * a * s

The backward recomputes s from the saved a and b; neither s nor silu(a) is stored, so the op
keeps only its two inputs for backward (which the surrounding linear layers keep anyway).
For large |a| the sigmoid saturates to exactly 0 or 1 in fp32 (exp(-a) overflows to inf for
a < -88, giving 1 / inf = 0); every product above stays finite, so no NaN or inf appears.

Shapes and dtypes
-----------------
a, b (..., hidden) of one shape and dtype (fp32, fp16 or bf16); arithmetic is fp32, y has a's
dtype and shape and is contiguous. The last dim must be contiguous; the leading dims are
flattened into rows that may have their own row stride for a and b (a and b are often column
slices of one fused w1/w3 projection, (N, 2 * hidden) viewed as two (N, hidden) halves), read
in place. Leading dims that cannot be flattened into one row stride are copied.

Launch
------
Grid (rows, cdiv(hidden, BLOCK)): each program handles BLOCK columns of one row, BLOCK =
next_power_of_2(hidden) capped at ``MAX_BLOCK`` (1024: 8 bf16 values per thread with 4 warps,
two 16-byte loads per operand), with 1, 2 or 4 warps for blocks of 256, 512, 1024. Under the
Triton interpreter BLOCK is capped at ``INTERPRETER_BLOCK`` so test rows cross ragged column
blocks.
"""

from __future__ import annotations

import torch

from .common import TRITON_DTYPE, check_device, empty, is_interpreting

import triton  # noqa: E402  (kernels/__init__ keeps the package importable without triton)
from triton import cdiv, next_power_of_2  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = ["swiglu", "swiglu_forward", "swiglu_backward", "swiglu_config", "aot_specs",
           "MAX_BLOCK", "INTERPRETER_BLOCK"]

MAX_BLOCK = 1024
INTERPRETER_BLOCK = 64

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _swiglu_fwd(
    A, B, Y, stride_a, stride_b, stride_y, N_COLS,
    BLOCK: tl.constexpr,
):
    """Grid (rows, cdiv(N_COLS, BLOCK)). y = a * sigmoid(a) * b for one column block of a row."""
    row = tl.cast(tl.program_id(0), tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N_COLS
    a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(
    A, B, DY, DA, DB, stride_a, stride_b, stride_dy, stride_da, stride_db, N_COLS,
    BLOCK: tl.constexpr,
):
    """Grid (rows, cdiv(N_COLS, BLOCK)). da, db from a, b and dy, recomputing sigmoid(a)."""
    row = tl.cast(tl.program_id(0), tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N_COLS
    a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    dy_s = dy * s
    da = dy_s * b * (1.0 + a * (1.0 - s))
    db = dy_s * a
    tl.store(DA + row * stride_da + cols, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + row * stride_db + cols, db.to(DB.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def swiglu_config(hidden: int, interpreting: bool | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``hidden`` columns."""
    interpreting = is_interpreting() if interpreting is None else interpreting
    block = min(next_power_of_2(max(hidden, 1)), INTERPRETER_BLOCK if interpreting else MAX_BLOCK)
    num_warps = 4 if block >= 1024 else 2 if block >= 512 else 1
    return block, num_warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., hidden) -> (rows, hidden) with unit column stride, as a view where one row stride
    describes the leading dims (column slices of a fused projection are), else a copy."""
    hidden = t.shape[-1]
    flat = t.reshape(-1, hidden)  # a view when the leading dims collapse, a copy otherwise
    # The kernel reads columns with unit stride: a strided last dim (a transpose, an expanded
    # gradient) is copied rather than misread. With one column its stride is never used.
    return flat if flat.stride(-1) == 1 or hidden == 1 else flat.contiguous()


def _validate(fn: str, tensors) -> None:
    (name0, t0) = tensors[0]
    for name, t in tensors:
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            raise ValueError(f"{fn}: {name} must be a tensor of shape (..., hidden), "
                             f"got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{fn}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.shape != t0.shape:
            raise ValueError(f"{fn}: {name} {tuple(t.shape)} must have the shape of {name0} {tuple(t0.shape)}")
        if t.dtype != t0.dtype:
            raise TypeError(f"{fn}: {name} ({t.dtype}) must have the dtype of {name0} ({t0.dtype})")
        if t.device != t0.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {name0} is on {t0.device}")
    check_device(fn, name0, t0.device)


def swiglu_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel: y = silu(a) * b, contiguous, a's shape and dtype."""
    _validate("swiglu", (("a", a), ("b", b)))
    y = empty(*a.shape, dtype=a.dtype, device=a.device)
    if y.numel() == 0:
        return y
    a2, b2, y2 = _rows(a), _rows(b), y.view(-1, a.shape[-1])
    hidden = a2.shape[1]
    block, num_warps = swiglu_config(hidden)
    _swiglu_fwd[(a2.shape[0], cdiv(hidden, block))](
        a2, b2, y2, a2.stride(0), b2.stride(0), y2.stride(0), hidden, BLOCK=block, num_warps=num_warps,
    )
    return y


def swiglu_backward(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: (da, db), contiguous, shaped like a and b."""
    _validate("swiglu_backward", (("a", a), ("b", b), ("dy", dy)))
    da = empty(*a.shape, dtype=a.dtype, device=a.device)
    db = empty(*b.shape, dtype=b.dtype, device=b.device)
    if da.numel() == 0:
        return da, db
    a2, b2, dy2 = _rows(a), _rows(b), _rows(dy)
    da2, db2 = da.view(-1, a.shape[-1]), db.view(-1, a.shape[-1])
    hidden = a2.shape[1]
    block, num_warps = swiglu_config(hidden)
    _swiglu_bwd[(a2.shape[0], cdiv(hidden, block))](
        a2, b2, dy2, da2, db2, a2.stride(0), b2.stride(0), dy2.stride(0), da2.stride(0), db2.stride(0), hidden,
        BLOCK=block, num_warps=num_warps,
    )
    return da, db


# --------------------------------------------------------------------------------------------
# Autograd and the user-facing function
# --------------------------------------------------------------------------------------------


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for a, b of shape (..., hidden) (same shape and dtype, last dim contiguous,
    any row strides). Matches ``llama_mini.kernels.reference.swiglu``; differentiable in a and b
    through the custom op ``llama_mini::swiglu_fwd`` (its backward saves a and b, not the
    activation, and recomputes sigmoid(a))."""
    from .custom_ops import swiglu as op

    return op(a, b)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (llama-mini aot swiglu)
# --------------------------------------------------------------------------------------------



def _aot_spec(kind: str, hidden: int, dtype: torch.dtype):
    from .aot import KernelSpec

    dt = TRITON_DTYPE[dtype]
    block, num_warps = swiglu_config(hidden, interpreting=False)
    ptrs = ("A", "B", "Y") if kind == "fwd" else ("A", "B", "DY", "DA", "DB")
    strides = [f"stride_{p.lower()}" for p in ptrs]
    sig = {**{p: f"*{dt}" for p in ptrs}, **{s: "i32" for s in strides}, "N_COLS": "i32", "BLOCK": "constexpr"}
    # Realistic hidden sizes (11008, 14336, ...) are multiples of 16, and so are the row strides
    # of (N, hidden) tensors and of column halves of an (N, 2 * hidden) fused projection.
    return KernelSpec(
        module=__name__, kernel=f"_swiglu_{kind}", signature=sig, constexprs=dict(BLOCK=block),
        num_warps=num_warps, num_stages=3, divisible=(*ptrs, *strides, "N_COLS"), expect_mma=False,
        label=f"swiglu {kind} {dt} BLOCK{block} w{num_warps}",
    )


def aot_specs(arch: int = 90) -> list:
    """Both kernels at every block the launcher picks for hidden >= 256 (1024 with 4 warps for
    any hidden above 512, as every LLaMA-size model has; 512 with 2 warps; 256 with 1 warp), bf16,
    and at 1024 in fp32 (twice the bytes per thread)."""
    specs = []
    for kind in ("fwd", "bwd"):
        for hidden in (4096, 512, 256):
            specs.append(_aot_spec(kind, hidden, torch.bfloat16))
        specs.append(_aot_spec(kind, 4096, torch.float32))
    return specs
