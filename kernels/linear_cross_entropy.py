"""Fused output projection + cross-entropy in Triton: the (N, V) logits never exist.

Math
----
N tokens, C hidden size, V vocabulary. x: (N, C) (any leading dims, flattened), W: (V, C),
targets t: (N,) integers, ignore_index marks tokens that do not count; n = number counted::

    z = x W^T                          (N, V) logits, fp32
    lse_i = logsumexp(z_i)             (N,)
    loss_i = lse_i - z_i[t_i]          (N,)   0 on ignored rows
    loss = s * sum_i loss_i            s = 1 / max(n, 1) for "mean", 1 for "sum"

Backward, with G = s * (softmax(z) - onehot(t)) (N, V), zero rows where t_i is ignored::

    dx = G W                           (N, C)
    dW = G^T x                         (V, C)

and, given the scalar grad_output g, dLoss/dx = g dx, dLoss/dW = g dW.

Algorithm
---------
Tokens are split into chunks of ``chunk_size`` rows. For each chunk c:

1. z_c = matmul(x_c, W^T) into one reused fp32 (chunk, V) buffer (W^T is a free strided view);
2. ``cross_entropy_rows(z_c, t_c, ignore_index, 1.0, grad=z_c)`` returns the per-row losses and
   overwrites z_c, in place, with softmax(z_c) - onehot(t_c) (zero rows where ignored);
3. if gradients are needed: dx_c = matmul(G_c, W) written straight into dx (x's dtype), unscaled,
   and dW32 += s * matmul(G_c^T, x_c), accumulated in one fp32 (V, C) buffer (G_c^T is a view).

Where the scales go. G = softmax - onehot has entries in [-1, 1], and so dx = G W is of the
size of W's entries: stored unscaled it is safe in fp16. The mean's s = 1 / max(n, 1) and the
backward's grad_output g (a loss scale of 2^16 in fp16 training) are applied together in the
backward, in fp32, so a 16-bit dx is rounded once, after both. Multiplying by s first would put
an fp16 dx into the subnormal range for n of a few thousand tokens, where the later loss scale
cannot restore the lost bits. dW32 takes s in the fp32 epilogue of its product (the ``alpha``
of :func:`matmul`; unscaled sums over many tokens could overflow fp16) and stays fp32 until the
backward multiplies it by g; only then is it cast to W's dtype (when W is fp32 the buffer is
the gradient, no copy). Every target is validated and n counted with one host read before the
loop (``check_targets``); the chunks skip the check.

Gradients are computed in the forward whenever grad mode is on and x or W requires grad (the
backward of a fused loss needs the logits, which we do not keep), so a loss computed for
evaluation should run under ``torch.no_grad()``; the backward only scales them, in place. They are handed over once: a second backward through the same graph
(``retain_graph=True``) raises. FLOPs: 3 x 2 N V C, the same as the unfused forward + backward.

Memory (fp32 logits)
--------------------
Unfused: N x V x 4 B of logits plus as much again for their gradient; N = 8192, V = 128256 makes
8.4 GB. Fused: one chunk buffer of chunk x V x 4 B, reused. The default chunk follows Liger
Kernel: chunk = next_power_of_2(ceil(N / ceil(V / C))), capped at N, so the buffer is about
N x C x 4 B, the size of x in fp32 (N = 8192, C = 4096, V = 128256: chunk 256, 131 MB). Besides,
held from the forward to the backward: dx (N, C) in x's dtype, which any backward produces, and
the fp32 accumulator dW32 (V x C x 4 B: 2.1 GB at V = 128256, C = 4096), cast to a 16-bit W's
dtype in the backward: the price of summing the chunks' dW without rounding.

Mixed precision
---------------
The three products run in the compute dtype: the lower precision of x's and W's dtypes (bf16 x
with fp32 master weights under autocast computes in bf16). Tiles are cast when they are loaded,
inside the kernel; W is never copied as a whole. Accumulation, logits, softmax and dW32 are fp32.

GEMM
----
``_matmul`` computes C = alpha * A B (+ C when accumulating) for 2-D A (M, K), B (K, N) and C
with arbitrary strides: Triton specialises a stride of 1 into a constant, so each layout (x,
W^T, G, G^T) compiles its own vectorised loads, and transposed views cost nothing. Whole K
blocks load without a mask (pipelined with async copies); one masked step takes the ragged end
of K; rows and columns past M or N wrap to valid ones and are dropped by the masked store. The
tile's first row and column enter the address in int64 (V x C is 1.05e9 elements at 128256 x
8192, and grows past 2^31 with larger models); offsets inside a tile stay 32-bit. Programs run
in groups of GROUP_M row tiles so neighbours share B tiles in L2. On GPU a heuristic picks one
of two configs per architecture family and operand family (:func:`gemm_configs`: two 16-bit
operands, or an fp32 operand, which needs twice the shared memory per stage and a register cast):
the large tile while it still gives every SM a program, else the small one. Every config is
compiled ahead of time by :func:`aot_specs` (no spills, shared memory within the limit, HGMMA on
sm_90 / HMMA on sm_80). Under the Triton interpreter a fixed 32 x 32 x 16 tiling runs.

A known limit: the dx product has M = chunk rows and N = C, so with the default chunk (256 rows
at N = 8192, V = 128256, C = 4096) it makes only 2 x 32 large or 4 x 32 small tiles for 132
SMs while K = V is long; a split-K variant (partial sums in fp32, then a reduction, to stay
deterministic) would fill the GPU better. Not measured: this was written without a GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .common import TRITON_DTYPE, check_device, empty, empty_like, is_interpreting
from .cross_entropy import check_targets, cross_entropy_rows

import triton  # noqa: E402  (kernels/__init__ keeps the package importable without triton)
from triton import cdiv, next_power_of_2  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = [
    "linear_cross_entropy",
    "linear_cross_entropy_forward",
    "matmul",
    "compute_dtype_for",
    "default_chunk_size",
    "gemm_configs",
    "GemmConfig",
    "aot_specs",
    "INTERPRETER_TILES",
]

# (BLOCK_M, BLOCK_N, BLOCK_K) under TRITON_INTERPRET=1: small, so test shapes cross several tiles.
INTERPRETER_TILES = (32, 32, 16)
GROUP_M = 8
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _to_compute(tile, COMPUTE: tl.constexpr):
    """A loaded tile in the products' dtype ("bf16", "fp16"; "fp32" leaves it as loaded)."""
    if COMPUTE == "bf16":
        tile = tile.to(tl.bfloat16)
    elif COMPUTE == "fp16":
        tile = tile.to(tl.float16)
    return tile


@triton.jit
def _matmul(
    A, B, C,
    M, N, K,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_cm, stride_cn,
    alpha,
    ACCUMULATE: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),). C[tile] = alpha * A[rows] B[:, cols], plus the
    old C[tile] when ACCUMULATE; fp32 accumulation, stored in C's dtype."""
    pid = tl.program_id(0)
    # (x + B - 1) // B rather than tl.cdiv: a nested @triton.jit call costs milliseconds per
    # program under the interpreter, as does a cast helper, so both are written out here.
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    # The tile's first row / column is taken in int64 into scalar base pointers (offsets pass
    # 2^31 for big operands: W^T is V x C); offsets inside the tile stay 32-bit, cheaper in
    # registers. Rows and columns past M or N wrap to the tile's first ones (valid addresses,
    # results discarded by the masked store), so the loop loads need only a K mask. The modulus
    # M - m0 is a multiple of 16 whenever M is, so Triton still vectorises along a unit-stride
    # M or N.
    rm = tl.arange(0, BLOCK_M) % (M - m0)
    rn = tl.arange(0, BLOCK_N) % (N - n0)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = (A + tl.cast(m0, tl.int64) * stride_am) + (rm[:, None] * stride_am + rk[None, :] * stride_ak)
    b_ptrs = (B + tl.cast(n0, tl.int64) * stride_bn) + (rk[:, None] * stride_bk + rn[None, :] * stride_bn)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Whole K blocks without a mask: a K mask's constancy depends on K's divisibility, and a
    # load that cannot be vectorised into 4+ byte pieces is not pipelined with async copies.
    # The ragged end of K (if any) is one masked step after the loop.
    k_full = K // BLOCK_K
    for _ in range(0, k_full):
        # Tensor cores need equal operand types: each tile is cast to the compute dtype.
        a = _to_compute(tl.load(a_ptrs), COMPUTE)
        b = _to_compute(tl.load(b_ptrs), COMPUTE)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if k_full * BLOCK_K < K:
        k_ok = rk < K - k_full * BLOCK_K
        a = _to_compute(tl.load(a_ptrs, mask=k_ok[None, :], other=0.0), COMPUTE)
        b = _to_compute(tl.load(b_ptrs, mask=k_ok[:, None], other=0.0), COMPUTE)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    acc = acc * alpha
    cm = tl.arange(0, BLOCK_M)
    cn = tl.arange(0, BLOCK_N)
    c_ptrs = (C + (tl.cast(m0, tl.int64) * stride_cm + tl.cast(n0, tl.int64) * stride_cn)) + (
        cm[:, None] * stride_cm + cn[None, :] * stride_cn)
    c_mask = (cm < M - m0)[:, None] & (cn < N - n0)[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0)
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=c_mask)


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch options of one GEMM configuration."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}"


G = GemmConfig
# (large, small) per architecture family, from an ahead-of-time sweep (spills, shared memory,
# tensor-core use; ``llama-mini aot linear_cross_entropy`` re-checks every entry).
# Two 16-bit operands (the logits product in bf16 / fp16): on sm_90, 128-row tiles with 8 warps
# (two warpgroups) issue wgmma, and 128 x 256 halves the A traffic per FLOP.
_CONFIGS_16BIT = {
    90: (G(128, 256, 64, 8, 3), G(128, 128, 64, 8, 3)),
    80: (G(128, 256, 32, 8, 3), G(128, 128, 32, 8, 3)),
}
# An fp32 operand (the gradient tile G in the dx and dW products, fp32 master weights, or fp32
# compute): twice the shared memory per stage, and the cast to 16 bits holds the tile in
# registers, so 128 x 256 spills (sm_90 dW: 456 B); 64 x 128 with 4 warps is the small tile.
_CONFIGS_FP32_OPERAND = {
    90: (G(128, 128, 64, 8, 3), G(64, 128, 32, 4, 4)),
    80: (G(128, 128, 32, 8, 3), G(64, 128, 32, 4, 4)),
}
del G


def arch_family(arch: int) -> int:
    """90 for Hopper and newer (sm_90+), 80 for Ampere and Ada (sm_80 - sm_89)."""
    return 90 if arch >= 90 else 80


def gemm_configs(arch: int, fp32_operand: bool = False) -> tuple[GemmConfig, GemmConfig]:
    """(large, small) GEMM configs on ``sm_{arch}``; ``fp32_operand``: an operand is loaded as fp32."""
    table = _CONFIGS_FP32_OPERAND if fp32_operand else _CONFIGS_16BIT
    return table[arch_family(arch)]


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return 10 * props.major + props.minor, props.multi_processor_count


def _pick_config(M: int, N: int, fp32_operand: bool, device: torch.device) -> GemmConfig:
    """Large tile when it still gives every SM a program, else the small one (more programs)."""
    arch, sms = _device_info(device.index if device.index is not None else torch.cuda.current_device())
    large, small = gemm_configs(arch, fp32_operand)
    return large if cdiv(M, large.block_m) * cdiv(N, large.block_n) >= sms else small


# --------------------------------------------------------------------------------------------
# GEMM launcher
# --------------------------------------------------------------------------------------------


def compute_dtype_for(a_dtype: torch.dtype, b_dtype: torch.dtype) -> torch.dtype:
    """The lower precision of two operand dtypes: fp32 with a 16-bit type gives the 16-bit type;
    fp16 with bf16 has no common lower type and raises TypeError."""
    if a_dtype == b_dtype:
        return a_dtype
    if a_dtype == torch.float32:
        return b_dtype
    if b_dtype == torch.float32:
        return a_dtype
    raise TypeError(f"no common compute dtype for {a_dtype} and {b_dtype}: cast one operand")


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: IEEE fp32 products unless the user allowed TF32 (as torch.matmul)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for fp16 / bf16 operands


def _check_device(fn: str, name: str, t: torch.Tensor) -> None:
    check_device(fn, name, t.device)
    if is_interpreting() and t.dtype == torch.bfloat16:
        raise ValueError(f"{fn}: {name} is bfloat16, which does not work under the Triton interpreter "
                         "(tl.dot on bf16 returns garbage there, triton issue 11584); use fp16 or fp32, "
                         "or a GPU")


def _launch_matmul(a, b, out, *, alpha: float, accumulate: bool, compute: torch.dtype) -> None:
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    if is_interpreting():
        bm, bn, bk = INTERPRETER_TILES
        meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    else:
        cfg = _pick_config(M, N, torch.float32 in (a.dtype, b.dtype), a.device)
        meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    grid = (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    _matmul[grid](
        a, b, out, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        float(alpha),
        ACCUMULATE=bool(accumulate), COMPUTE=TRITON_DTYPE[compute], PRECISION=_precision(compute),
        GROUP_M=GROUP_M, **meta,
    )


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False,
           out_dtype: torch.dtype | None = None, *, alpha: float = 1.0,
           compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """c = alpha * a @ b (``accumulate=True``: out += alpha * a @ b) with the Triton GEMM.

    a: (M, K), b: (K, N), any strides (``w.t()`` and ``g.t()`` are read in place), fp16, bf16 or
    fp32, on one device. Products run in the compute dtype: by default the lower precision of
    a's and b's dtypes (fp32 with bf16 computes in bf16; fp16 with bf16 raises TypeError), each
    tile cast when it is loaded; accumulation is fp32. ``out`` (M, N), any strides, receives the
    result in its dtype; without it a new tensor of ``out_dtype`` (default: the compute dtype) is
    returned. With ``accumulate`` the existing fp32 ``out`` is loaded, added to and stored.
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"matmul: {name} must be a 2-D tensor, got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"matmul: {name} must be fp16, bf16 or fp32, got {t.dtype}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: a {tuple(a.shape)} and b {tuple(b.shape)} have different inner sizes")
    compute = compute_dtype_for(a.dtype, b.dtype) if compute_dtype is None else compute_dtype
    for name, t in (("a", a), ("b", b)):
        _check_device("matmul", name, t)
    if a.device != b.device:
        raise ValueError(f"matmul: a and b are on different devices ({a.device}, {b.device})")
    if compute not in _DTYPES:
        raise TypeError(f"matmul: compute_dtype must be fp16, bf16 or fp32, got {compute}")
    if is_interpreting() and compute == torch.bfloat16:
        raise ValueError("matmul: compute_dtype bfloat16 does not work under the Triton interpreter "
                         "(triton issue 11584)")
    M, N = a.shape[0], b.shape[1]
    if out is None:
        if accumulate:
            raise ValueError("matmul: accumulate=True needs out, the fp32 tensor to add into")
        out = empty(M, N, dtype=out_dtype or compute, device=a.device)
    else:
        if tuple(out.shape) != (M, N) or out.device != a.device:
            raise ValueError(f"matmul: out must have shape {(M, N)} on {a.device}, "
                             f"got {tuple(out.shape)} on {out.device}")
        if out_dtype is not None and out.dtype != out_dtype:
            raise TypeError(f"matmul: out is {out.dtype} but out_dtype is {out_dtype}")
        if out.dtype not in _DTYPES:
            raise TypeError(f"matmul: out must be fp16, bf16 or fp32, got {out.dtype}")
        if accumulate and out.dtype != torch.float32:
            raise TypeError(f"matmul: accumulate=True adds into an fp32 out (rounding a 16-bit sum at "
                            f"every call loses the small terms), got out {out.dtype}")
    if accumulate and out_dtype not in (None, torch.float32):
        raise TypeError(f"matmul: accumulate=True adds into fp32, got out_dtype {out_dtype}")
    _launch_matmul(a, b, out, alpha=alpha, accumulate=accumulate, compute=compute)
    return out


# --------------------------------------------------------------------------------------------
# Fused linear + cross-entropy
# --------------------------------------------------------------------------------------------


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """Liger Kernel's rule: a chunk's fp32 logits about the size of x, a power of two, 1..N rows."""
    rows = next_power_of_2(cdiv(max(n_tokens, 1), cdiv(vocab, max(hidden, 1))))
    return max(1, min(rows, max(n_tokens, 1)))


def _validate(x, weight, targets, ignore_index, reduction, chunk_size):
    fn = "linear_cross_entropy"
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{fn}: x must be a tensor (..., C), got {getattr(x, 'shape', type(x))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be a 2-D tensor (V, C), got {getattr(weight, 'shape', type(weight))}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{fn}: weight {tuple(weight.shape)} must be (V, C) with C = x's last dim {x.shape[-1]}")
    if weight.shape[0] == 0:
        raise ValueError(f"{fn}: weight has an empty vocabulary (V = 0)")
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"{fn}: {name} must be fp16, bf16 or fp32, got {t.dtype}")
    try:
        compute = compute_dtype_for(x.dtype, weight.dtype)
    except TypeError as exc:
        raise TypeError(f"{fn}: x is {x.dtype} and weight is {weight.dtype}: {exc}") from None
    for name, t in (("x", x), ("weight", weight)):
        _check_device(fn, name, t)
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int32, torch.int64):
        got = getattr(targets, "dtype", type(targets))
        raise TypeError(f"{fn}: targets must be an int32 or int64 tensor, got {got}")
    if tuple(targets.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"{fn}: targets {tuple(targets.shape)} must have x's leading shape {tuple(x.shape[:-1])}")
    if not (x.device == weight.device == targets.device):
        raise ValueError(f"{fn}: x, weight and targets are on different devices "
                         f"({x.device}, {weight.device}, {targets.device})")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{fn}: reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{fn}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {ignore_index!r}")
    return compute


def linear_cross_entropy_forward(x, weight, targets, ignore_index: int = -100, reduction: str = "mean",
                                 chunk_size: int | None = None, need_dx: bool = False, need_dw: bool = False):
    """Run the chunked loop. Returns (loss () fp32, dx, dW32, s): dx like x but not yet scaled
    by s (None unless need_dx), dW32 fp32 already scaled by s (None unless need_dw), and the
    reduction's scale s; the backward (``custom_ops``) scales them in place by grad_output."""
    compute = _validate(x, weight, targets, ignore_index, reduction, chunk_size)
    V, C = weight.shape
    N = targets.numel()  # targets has x's leading shape (validated)
    x2 = x.reshape(N, C)  # a view unless x's leading dims cannot be flattened without a copy
    t = targets.reshape(-1).contiguous()  # N integers: a copy at most, and cross_entropy_rows slices it
    chunk = min(chunk_size, max(N, 1)) if chunk_size is not None else default_chunk_size(N, C, V)
    n_counted = check_targets(t, V, ignore_index)  # every target checked and counted: the one host read
    scale = 1.0 / max(n_counted, 1) if reduction == "mean" else 1.0

    dx = empty(N, C, dtype=x.dtype, device=x.device) if need_dx else None
    dw32 = empty_like(weight, dtype=torch.float32) if need_dw else None  # weight's layout
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    if need_dw and N == 0:
        dw32.zero_()  # no token, no chunk: nothing writes dW (otherwise the first chunk does)
    if N:
        z = empty(chunk, V, dtype=torch.float32, device=x.device)  # reused by every chunk
        wt = weight.t()  # (C, V) view: the kernel reads W row-major as W^T
        for i, c0 in enumerate(range(0, N, chunk)):
            c1 = min(c0 + chunk, N)
            zc, xc = z[: c1 - c0], x2[c0:c1]  # (rows, V) fp32, (rows, C)
            _launch_matmul(xc, wt, zc, alpha=1.0, accumulate=False, compute=compute)
            loss_rows, _ = cross_entropy_rows(zc, t[c0:c1], ignore_index, 1.0,
                                              grad=zc if (need_dx or need_dw) else None, check=False)
            total += loss_rows.sum()
            if need_dx:
                _launch_matmul(zc, weight, dx[c0:c1], alpha=1.0, accumulate=False, compute=compute)
            if need_dw:
                _launch_matmul(zc.t(), xc, dw32, alpha=scale, accumulate=i > 0, compute=compute)
    loss = total * scale
    if need_dx:
        dx = dx.view(x.shape)
    return loss, dx, dw32, scale


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", chunk_size: int | None = None) -> torch.Tensor:
    """cross_entropy(x @ weight^T, targets) without materialising the logits; a scalar fp32 loss.

    x: (..., C) fp16/bf16/fp32; weight: (V, C) fp16/bf16/fp32 (fp32 with 16-bit x computes in
    the 16-bit type); targets: (...) integers in [0, V) or ``ignore_index``. reduction "mean"
    (over counted targets; 0 when none counts) or "sum". ``chunk_size``: tokens per chunk
    (default :func:`default_chunk_size`). Differentiable in x and weight, through the custom op
    ``llama_mini::linear_cross_entropy_fwd``: dx and dW are computed in the forward (only those
    that are needed) and scaled in place by the first backward.
    """
    from .custom_ops import linear_cross_entropy as op

    return op(x, weight, targets, ignore_index, reduction, chunk_size)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (llama-mini aot linear_cross_entropy)
# --------------------------------------------------------------------------------------------

# The three products of the loop as (A, B, C) dtypes and which stride of each is the unit one
# (Triton specialises a stride of 1 into a constant, so each layout compiles separately).
#   logits: x_c (rows, C) @ W^T (C, V)   -> fp32      A row-major, B = W^T (unit k stride)
#   dx:     G_c (rows, V) @ W (V, C)     -> x dtype   A row-major fp32, B row-major
#   dw:     G_c^T (V, rows) @ x_c        += fp32      A = G^T (unit m stride) fp32, B row-major
_PATTERNS = {
    "logits": ("stride_ak", "stride_bk", "stride_cn"),
    "dx": ("stride_ak", "stride_bn", "stride_cn"),
    "dw": ("stride_am", "stride_bn", "stride_cn"),
}


def _aot_spec(kind: str, x: str, w: str, cfg: GemmConfig, arch: int):
    from .aot import KernelSpec, signature

    a, b, c, accumulate = {
        "logits": (x, w, "fp32", False), "dx": ("fp32", w, x, False), "dw": ("fp32", x, "fp32", True),
    }[kind]
    compute = x if w == "fp32" else w
    unit = _PATTERNS[kind]
    types = {"A": f"*{a}", "B": f"*{b}", "C": f"*{c}", "alpha": "fp32", **{n: "constexpr" for n in unit}}
    sig = signature(_matmul, types, ints=("M", "N", "K"))
    constexprs = {n: 1 for n in unit}
    # fp32 products: IEEE, torch's default (allow_tf32 off), on the FMA units: no tensor cores
    precision = "ieee" if compute == "fp32" else "tf32"
    constexprs.update(ACCUMULATE=accumulate, COMPUTE=compute, PRECISION=precision, BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=GROUP_M)
    # Pointers are 16-byte aligned; sizes and non-unit strides are C, V or the chunk size, which
    # are multiples of 16 in real models (Triton's runtime specialises on that, as here).
    divisible = tuple(n for n in sig if sig[n] in ("i32",) or sig[n].startswith("*"))
    return KernelSpec(
        module=__name__, kernel="_matmul", signature=sig, constexprs=constexprs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, divisible=divisible, expect_mma=compute != "fp32",
        label=f"{kind:<6} x {x} W {w} {cfg.label}",
    )


def aot_specs(arch: int = 90) -> list:
    """The GEMM as the loop launches it on ``sm_{arch}``, in both configs the heuristic can pick
    for each operand family: the logits product with bf16 x and W (16-bit table); the dx and dW
    products, which load the fp32 gradient tile, and the logits and dx products with fp32 master
    weights (fp32-operand table); and fp32 x and W (IEEE products on the FMA units, no tensor
    cores expected) in the large config, the one realistic sizes pick."""
    specs = []
    large, small = gemm_configs(arch)
    f_large, f_small = gemm_configs(arch, fp32_operand=True)
    for cfg in (large, small):
        specs.append(_aot_spec("logits", "bf16", "bf16", cfg, arch))
    for kind, x, w in (("dx", "bf16", "bf16"), ("dw", "bf16", "bf16"), ("logits", "bf16", "fp32"),
                       ("dx", "bf16", "fp32")):  # dw does not read W
        for cfg in (f_large, f_small):
            specs.append(_aot_spec(kind, x, w, cfg, arch))
    specs.append(_aot_spec("logits", "fp32", "fp32", f_large, arch))
    return specs
