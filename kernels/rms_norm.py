"""RMSNorm and the fused residual-add + RMSNorm in Triton, forward and backward.

Math
----
For one row x of C values, weight w (C,) and eps >= 0::

    r = 1 / sqrt(mean(x^2) + eps)          scalar per row, fp32, saved for backward (``rstd``)
    n = x * r                              computed in fp32, rounded to x's dtype (as Meta and
                                           Hugging Face do, and as ``llama_mini.kernels.reference`` defines)
    y = n * w                              y's dtype is promote_types(x.dtype, w.dtype)

The add variant first forms the residual stream, rounded to x's dtype, and normalises it::

    h = x + residual                       written out: it is the next block's residual
    y = rms_norm(h)

Backward, given dy = dLoss/dy (and for the add variant dh = dLoss/dh, the gradient flowing
down the residual stream)::

    dn = dy * w
    dx = r * (dn - n * mean(dn * n))       the RMS Jacobian applied per row (n = x * r in fp32)
    dw = sum over rows of dy * n
    add variant: dh_total = dh + dx        returned as both d x and d residual (h = x + residual)

Everything is computed in fp32 inside the kernels; outputs are stored in their tensors' dtypes
(dx in x's, dw in w's). The rounding of n to x's dtype is treated as the identity in backward,
as PyTorch's autograd treats the cast in the reference.

dW without atomics
------------------
dw is a sum over every row. Instead of each row program ``atomic_add``-ing C values into one
(C,) buffer (contended, and float additions landing in a run-dependent order, so bits differ
between runs), the backward launches a fixed number P of programs (about twice the SM count on
CUDA, a handful under the interpreter). Program p handles rows p, p + P, p + 2P, ..., keeps a
(C,) fp32 partial dw in registers, and writes it to row p of a (P, C) fp32 buffer; PyTorch's
``sum(0)`` (deterministic) reduces the P partials and the result is cast to w's dtype. dx and dw
are therefore bit-reproducible, which exact resume in the trainer relies on.

Wide rows
---------
A row up to ``MAX_BLOCK_C`` (8192) wide is one register tile: the forward loads it once, the
backward computes mean(dn * n) from the tile it already holds. Wider rows (up to
``MAX_HIDDEN``) are cut into ``BLOCK_C`` chunks: the forward makes two passes over its row
(sum of squares, then normalise; the second read mostly hits L2), and the backward first runs
``_rms_norm_bwd_dot`` (one program per row: c = mean(dn * n)) and then ``_rms_norm_bwd`` on a
(P, chunks) grid, each program owning one column chunk of dw. Under the interpreter the tile is
capped at ``INTERPRETER_MAX_BLOCK_C`` so small test rows also take the chunked path.

Shapes and dtypes
-----------------
x, residual: (..., C), any leading dims; every leading stride works as long as the last dim is
contiguous and the leading dims flatten to one row stride (``x.view(-1, C)`` succeeds; a sliced
(B, T, C + k)[..., :C] tensor does). Otherwise the input is copied once (the kernels address
rows as base + row * stride). weight: (C,). fp32, fp16, bf16 (bf16 on GPU only: the interpreter
rounds bf16 stores wrongly). y and h are contiguous (..., C); rstd is fp32 (rows,).
``num_warps`` grows with the tile so each thread holds at most 16 values per tensor.
"""

from __future__ import annotations

import functools
import math

import torch

from .common import TRITON_DTYPE, check_device, empty, is_interpreting

import triton  # noqa: E402  (kernels/__init__ keeps the package importable without triton)
from triton import cdiv, next_power_of_2  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = [
    "rms_norm",
    "add_rms_norm",
    "rms_norm_forward",
    "add_rms_norm_forward",
    "rms_norm_backward",
    "block_config",
    "aot_specs",
    "MAX_HIDDEN",
    "MAX_BLOCK_C",
    "INTERPRETER_MAX_BLOCK_C",
    "INTERPRETER_PROGRAMS",
]

MAX_HIDDEN = 65536  # widest row supported: 8 chunks of MAX_BLOCK_C, all AOT-checked configurations
MAX_BLOCK_C = 8192  # widest single register tile (16 values per thread at 16 warps)
INTERPRETER_MAX_BLOCK_C = 1024  # under TRITON_INTERPRET=1: C = 4000 takes the chunked path
INTERPRETER_PROGRAMS = 3  # backward programs under the interpreter: uneven row shares for 7 rows
BWD_WAVES = 2  # backward programs per SM on CUDA (per column chunk for wide rows)
NUM_STAGES = 3  # software pipelining depth of the loops (wide chunks, backward rows)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _normed(x, rstd, w, X):
    """n = x * rstd rounded to X's element type (the reference's ``type_as(x)``), times w: fp32."""
    return (x * rstd).to(X.dtype.element_ty).to(tl.float32) * w


@triton.jit
def _rms_norm_fwd(
    X, W, Y, RSTD,
    stride_x, stride_y, C, eps,
    BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
):
    """Grid (rows,). y = x * rstd * w for one row; stores rstd (fp32)."""
    row = tl.program_id(0)
    x_row = X + tl.cast(row, tl.int64) * stride_x
    y_row = Y + tl.cast(row, tl.int64) * stride_y
    if not WIDE:
        cols = tl.arange(0, BLOCK_C)
        mask = cols < C
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, 0) / C + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, _normed(x, rstd, w, X).to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            x = tl.load(x_row + cols, mask=cols < C, other=0.0).to(tl.float32)
            acc += x * x
        rstd = tl.rsqrt(tl.sum(acc, 0) / C + eps)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = cols < C
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cols, _normed(x, rstd, w, X).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _residual(x_row, r_row, cols, mask, H):
    """h = x + residual, summed in fp32 and rounded to h's dtype (as PyTorch rounds x + r)."""
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
    return (x + r).to(H.dtype.element_ty)


@triton.jit
def _add_rms_norm_fwd(
    X, R, W, Y, H, RSTD,
    stride_x, stride_r, stride_y, stride_h, C, eps,
    BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
):
    """Grid (rows,). h = x + residual and y = rms_norm(h) for one row, in one pass over x and
    residual; stores h, y and rstd."""
    row = tl.cast(tl.program_id(0), tl.int64)
    x_row = X + row * stride_x
    r_row = R + row * stride_r
    y_row = Y + row * stride_y
    h_row = H + row * stride_h
    if not WIDE:
        cols = tl.arange(0, BLOCK_C)
        mask = cols < C
        h = _residual(x_row, r_row, cols, mask, H)
        tl.store(h_row + cols, h, mask=mask)
        hf = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(hf * hf, 0) / C + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, _normed(hf, rstd, w, H).to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = cols < C
            h = _residual(x_row, r_row, cols, mask, H)
            tl.store(h_row + cols, h, mask=mask)
            hf = h.to(tl.float32)
            acc += hf * hf
        rstd = tl.rsqrt(tl.sum(acc, 0) / C + eps)
        for c0 in range(0, C, BLOCK_C):
            # h is recomputed from x and residual (the same bits) rather than read back from H:
            # no reliance on this program's own global stores being visible to its other threads
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = cols < C
            hf = _residual(x_row, r_row, cols, mask, H).to(tl.float32)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cols, _normed(hf, rstd, w, H).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_dot(
    X, W, DY, RSTD, DOT,
    stride_x, stride_dy, C,
    BLOCK_C: tl.constexpr,
):
    """Grid (rows,), wide rows only. c = mean(dn * n) = rstd * sum(dy * w * x) / C per row."""
    row = tl.program_id(0)
    x_row = X + tl.cast(row, tl.int64) * stride_x
    dy_row = DY + tl.cast(row, tl.int64) * stride_dy
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = cols < C
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        acc += dy * w * x
    rstd = tl.load(RSTD + row)
    tl.store(DOT + row, tl.sum(acc, 0) * rstd / C)


@triton.jit
def _rms_norm_bwd(
    X, W, DY, DH, DX, RSTD, DOT, PARTIAL,
    stride_x, stride_dy, stride_dh, stride_dx, N, C,
    BLOCK_C: tl.constexpr, WIDE: tl.constexpr, HAS_DH: tl.constexpr,
):
    """Grid (P, chunks). Program (p, j) handles rows p, p + P, ... on column chunk j (the whole
    row unless WIDE): writes dx (plus dh when HAS_DH) and its partial dw to PARTIAL[p, chunk]."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    for row in range(pid, N, tl.num_programs(0)):
        r64 = tl.cast(row, tl.int64)
        x = tl.load(X + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        n = x * rstd
        dn = dy * w
        if WIDE:
            c = tl.load(DOT + row)
        else:
            c = tl.sum(dn * n, 0) / C
        dx = (dn - n * c) * rstd
        if HAS_DH:
            dx += tl.load(DH + r64 * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * n
    tl.store(PARTIAL + tl.cast(pid, tl.int64) * C + cols, dw, mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _config(C: int, cap: int) -> tuple[int, int, bool]:
    block = min(next_power_of_2(C), cap)
    return block, max(1, min(16, block // 512)), C > block


def block_config(C: int) -> tuple[int, int, bool]:
    """(BLOCK_C, num_warps, wide) for rows of C values: the tile is the next power of two up
    to the cap, with one warp per 512 values (16 per thread) up to 16 warps; wide when the row
    needs more than one tile."""
    return _config(C, INTERPRETER_MAX_BLOCK_C if is_interpreting() else MAX_BLOCK_C)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _bwd_programs(n_rows: int, chunks: int, device: torch.device) -> int:
    """P: backward programs per column chunk. Never more than the rows, so each has work."""
    if is_interpreting():
        p = INTERPRETER_PROGRAMS
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        p = cdiv(BWD_WAVES * _sm_count(index), chunks)
    return max(1, min(n_rows, p))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t (..., C) as an (N, C) view with a unit column stride. Copied only when the leading
    dims do not flatten to a single row stride or the last dim is strided: the kernels address
    element (row, col) as base + row * stride + col."""
    C = t.shape[-1]
    try:
        t2 = t.view(-1, C)
    except RuntimeError:
        t2 = None
    if t2 is None or (t2.stride(1) != 1 and C > 1):
        t2 = t.contiguous().view(-1, C)  # the copy: leading dims not flattenable / last dim strided
    return t2


def _describe(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_device(fn: str, name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.device != like.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but x is on {like.device}")


def _validate(fn: str, x, weight, eps, residual=None) -> float:
    """Check arguments (errors name the argument); returns eps as a float."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError(f"{fn}: x must be a tensor of shape (..., C), got {_describe(x)}")
    C = x.shape[-1]
    if not 1 <= C <= MAX_HIDDEN:
        raise ValueError(f"{fn}: x's last dim C = {C} is not supported (1..MAX_HIDDEN = {MAX_HIDDEN})")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{fn}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (C,):
        raise ValueError(f"{fn}: weight must have shape (C,) = ({C},) to match x {tuple(x.shape)}, "
                         f"got {_describe(weight)}")
    if weight.dtype not in _DTYPES:
        raise TypeError(f"{fn}: weight must be float32, float16 or bfloat16, got {weight.dtype}")
    _check_device(fn, "weight", weight, x)
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
            raise ValueError(f"{fn}: residual must have x's shape {tuple(x.shape)}, got {_describe(residual)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{fn}: residual must have x's dtype {x.dtype}, got {residual.dtype}")
        _check_device(fn, "residual", residual, x)
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"{fn}: eps must be finite and >= 0, got {eps}")
    check_device(fn, "x", x.device)
    if is_interpreting() and torch.bfloat16 in (x.dtype, weight.dtype):
        raise TypeError(f"{fn}: bfloat16 does not work under the Triton interpreter (it rounds bf16 "
                        "stores wrongly); use float16 or float32, or a GPU")
    return eps


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel. Returns (y (..., C) in promote_types(x, weight), rstd (N,) fp32)."""
    eps = _validate("rms_norm", x, weight, eps)
    C = x.shape[-1]
    x2 = _rows(x)  # (N, C)
    N = x2.shape[0]
    y = empty(N, C, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = empty(N, dtype=torch.float32, device=x.device)
    if N:
        block, warps, wide = block_config(C)
        # weight is a (C,) parameter, contiguous in practice: the call is a no-op there
        _rms_norm_fwd[(N,)](x2, weight.contiguous(), y, rstd, x2.stride(0), y.stride(0), C, eps,
                            BLOCK_C=block, WIDE=wide, num_warps=warps, num_stages=NUM_STAGES)
    return y.view(x.shape), rstd


def add_rms_norm_forward(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the fused forward kernel. Returns (y, h = x + residual, rstd (N,) fp32)."""
    eps = _validate("add_rms_norm", x, weight, eps, residual)
    C = x.shape[-1]
    x2, r2 = _rows(x), _rows(residual)  # (N, C) each, row strides may differ
    N = x2.shape[0]
    y = empty(N, C, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    h = empty(N, C, dtype=x.dtype, device=x.device)
    rstd = empty(N, dtype=torch.float32, device=x.device)
    if N:
        block, warps, wide = block_config(C)
        _add_rms_norm_fwd[(N,)](x2, r2, weight.contiguous(), y, h, rstd,
                                x2.stride(0), r2.stride(0), y.stride(0), h.stride(0), C, eps,
                                BLOCK_C=block, WIDE=wide, num_warps=warps, num_stages=NUM_STAGES)
    return y.view(x.shape), h.view(x.shape), rstd


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dh: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the backward kernels for y = rms_norm(x) (x is h for the add variant). Returns
    (dx (..., C) in x's dtype, dw (C,) in weight's dtype); with ``dh``, dx includes it."""
    C = x.shape[-1]
    x2 = _rows(x)
    N = x2.shape[0]
    for name, t in (("dy", dy), ("dh", dh)):
        if t is not None and (t.shape != x.shape or t.device != x.device):
            raise ValueError(f"rms_norm_backward: {name} must have shape {tuple(x.shape)} on {x.device}, "
                             f"got {tuple(t.shape)} on {t.device}")
    if rstd.shape != (N,) or rstd.dtype != torch.float32:
        raise ValueError(f"rms_norm_backward: rstd must be float32 of shape ({N},) from the forward, "
                         f"got {rstd.dtype} {tuple(rstd.shape)}")
    dy2 = _rows(dy)
    dh2 = _rows(dh) if dh is not None else dy2  # a placeholder the kernel never reads
    dx = empty(N, C, dtype=x.dtype, device=x.device)
    if N == 0:
        return dx.view(x.shape), torch.zeros_like(weight)
    block, warps, wide = block_config(C)
    chunks = cdiv(C, block)
    P = _bwd_programs(N, chunks, x.device)
    partial = empty(P, C, dtype=torch.float32, device=x.device)
    w = weight.contiguous()  # (C,) parameter: a no-op in practice
    dot = rstd  # read only when wide
    if wide:
        dot = empty(N, dtype=torch.float32, device=x.device)
        _rms_norm_bwd_dot[(N,)](x2, w, dy2, rstd, dot, x2.stride(0), dy2.stride(0), C,
                                BLOCK_C=block, num_warps=warps, num_stages=NUM_STAGES)
    _rms_norm_bwd[(P, chunks)](x2, w, dy2, dh2, dx, rstd, dot, partial,
                               x2.stride(0), dy2.stride(0), dh2.stride(0), dx.stride(0), N, C,
                               BLOCK_C=block, WIDE=wide, HAS_DH=dh is not None, num_warps=warps, num_stages=NUM_STAGES)
    dw = partial.sum(0).to(weight.dtype)  # (C,): deterministic reduction of the P partials
    return dx.view(x.shape), dw


# --------------------------------------------------------------------------------------------
# Autograd and the user-facing functions
# --------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim: x (..., C), weight (C,). Returns y (..., C) in
    promote_types(x.dtype, weight.dtype). Differentiable in x and weight, through the custom op
    ``llama_mini::rms_norm_fwd`` (backward ``rms_norm_bwd``), so ``torch.compile`` traces it."""
    from .custom_ops import rms_norm as op

    return op(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (in x's dtype) and y = rms_norm(h, weight, eps), fused. x, residual:
    (..., C) of one shape and dtype; weight (C,). Returns (y, h); differentiable in all three
    (d x = d residual = dh + the norm's dx, in one kernel), through ``llama_mini::add_rms_norm_fwd``."""
    from .custom_ops import add_rms_norm as op

    return op(x, residual, weight, eps)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (llama-mini aot rms_norm)
# --------------------------------------------------------------------------------------------

_KERNELS = {"fwd": _rms_norm_fwd, "add": _add_rms_norm_fwd, "dot": _rms_norm_bwd_dot, "bwd": _rms_norm_bwd}
_KERNEL_NAMES = {"fwd": "_rms_norm_fwd", "add": "_add_rms_norm_fwd", "dot": "_rms_norm_bwd_dot", "bwd": "_rms_norm_bwd"}


def _aot_signature(kind: str, dtype: str) -> dict[str, str]:
    from .aot import signature

    types = {n: f"*{dtype}" for n in ("X", "R", "W", "Y", "H", "DY", "DH", "DX")}
    types.update(RSTD="*fp32", DOT="*fp32", PARTIAL="*fp32", eps="fp32")
    return signature(_KERNELS[kind], types, ints=("N", "C"))


def aot_specs(arch: int = 90) -> list:
    """The kernels as they launch for realistic hidden sizes. Every tile up to MAX_BLOCK_C gives
    each thread 16 values per tensor, so one tile size per kernel stands for the rest; C = 4096
    (one 4096 tile, 8 warps) and C = 16384 (two 8192 chunks, 16 warps: the largest warp count,
    the fewest registers per thread). The backward is checked with the residual gradient (its
    heaviest form) at the largest tile, and in fp32 at C = 4096. ``arch`` is unused: the
    launcher picks the same configurations on every GPU."""
    from .aot import KernelSpec

    cases = [
        # kind, C, dtype, HAS_DH
        ("fwd", 4096, torch.bfloat16, False),
        ("fwd", 16384, torch.bfloat16, False),
        ("add", 4096, torch.bfloat16, False),
        ("add", 16384, torch.bfloat16, False),
        ("bwd", 4096, torch.float32, False),
        ("bwd", 8192, torch.bfloat16, True),
        ("dot", 16384, torch.bfloat16, False),
        ("bwd", 16384, torch.bfloat16, True),
    ]
    specs = []
    for kind, C, dtype, has_dh in cases:
        block, warps, wide = _config(C, MAX_BLOCK_C)
        dt = TRITON_DTYPE[dtype]
        sig = _aot_signature(kind, dt)
        constexprs = {"BLOCK_C": block}
        if kind != "dot":
            constexprs["WIDE"] = wide
        if kind == "bwd":
            constexprs["HAS_DH"] = has_dh
        # hidden sizes are multiples of 16, so are the row strides; pointers are 16-byte aligned
        divisible = tuple(n for n in sig if sig[n].startswith("*") or n.startswith("stride_") or n == "C")
        specs.append(KernelSpec(
            module=__name__, kernel=_KERNEL_NAMES[kind], signature=sig, constexprs=constexprs,
            num_warps=warps, num_stages=NUM_STAGES, expect_mma=False,
            divisible=divisible,
            label=f"{kind:<3} C={C:<5} {dt} B{block} w{warps}{' wide' if wide else ''}{' dh' if has_dh else ''}",
        ))
    return specs
