"""Rotary position embedding (RoPE) in Triton: queries and keys rotated together, forward and
backward, in one launch each.

Math
----
Meta's interleaved convention: the head vector x (D,) is D/2 pairs (x[2i], x[2i+1]), and the
pair of token (b, t) is rotated by the angle a = p * f_i of its position p::

    y[2i]   = x[2i] cos a - x[2i+1] sin a
    y[2i+1] = x[2i] sin a + x[2i+1] cos a

The caller supplies the tables cos[p, i] = cos(p f_i) and sin[p, i] = sin(p f_i) for positions
p = 0..L-1 (RoPE scaling is already folded into f_i). The position of token (b, t) is
``position_ids[b, t]`` when given (packed batches restart positions per document), else t.

Backward: a rotation is orthogonal, so the gradient is the inverse rotation (angle -a) of the
output gradient, i.e. the same kernel with sin negated::

    dx[2i]   =  dy[2i] cos a + dy[2i+1] sin a
    dx[2i+1] = -dy[2i] sin a + dy[2i+1] cos a

cos, sin and position_ids get no gradient. The kernel takes the sign of sin as an argument,
so forward and backward are one compiled kernel and no negated table is materialised.

Shapes and dtypes
-----------------
q (B, T, H, D), k (B, T, Hkv, D) with D even; any H, Hkv (grouped- and multi-query attention
need nothing special: every head of a token uses the same angles). The last dim must be
contiguous; other strides are arbitrary (q and k are often views of one fused projection) and
are read in place. cos, sin (L, D/2), fp32 (float64 and fp16/bf16 tables are read too);
position_ids (B, T) int32/int64 in [0, L), or None, which needs L >= T. q and k may be fp32,
fp16 or bf16 (each independently); arithmetic is fp32; outputs are new contiguous tensors of
q's and k's shape and dtype.

Launch
------
One program per token (b, t): it loads the token's cos/sin row once, then rotates the H query
heads and the Hkv key heads in (BLOCK_H, BLOCK_D) tiles, BLOCK_D = next_power_of_2(D) (pairs
beyond D/2 are masked). A tile is loaded with full-width (vectorised) loads and split into
even/odd lanes in registers (``tl.reshape`` + ``tl.split``), not read with stride-2 loads.
BLOCK_H is the head count rounded up to a power of two, capped so a tile holds at most
``MAX_TILE`` elements; heads beyond one tile are looped over. Under the Triton interpreter the
cap is ``INTERPRETER_TILE`` elements, so small test shapes still loop over ragged head tiles.
"""

from __future__ import annotations

import weakref

import torch

from .common import TRITON_DTYPE, check_device, empty, host_read, is_interpreting

import triton  # noqa: E402  (kernels/__init__ keeps the package importable without triton)
from triton import next_power_of_2  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = [
    "apply_rotary",
    "rotary_forward",
    "rotary_config",
    "aot_specs",
    "MAX_TILE",
    "INTERPRETER_TILE",
]

# Elements in one (BLOCK_H, BLOCK_D) tile on GPU: 32 heads of 128 (LLaMA-7B/8B's queries of one
# token in a single pass), 64 heads of 64. Checked spill-free by aot_specs.
MAX_TILE = 4096
# Under the interpreter: tiny tiles (e.g. 2 heads of 16), so tests cross head-tile edges.
INTERPRETER_TILE = 32

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TABLE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _rotate_heads(
    X, Y, x_row, y_row, stride_xh, stride_yh, n_heads, c, s,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Rotate heads [0, n_heads) of one token: X + x_row + h * stride_xh + d -> Y + y_row + ...
    c, s: (BLOCK_HALF,) fp32 cos and (signed) sin of the token's angles."""
    BLOCK_D: tl.constexpr = 2 * BLOCK_HALF
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < 2 * HALF
    for h0 in range(0, n_heads, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = (offs_h < n_heads)[:, None] & d_ok[None, :]
        rows = tl.cast(offs_h, tl.int64)
        x = tl.load(X + x_row + rows[:, None] * stride_xh + offs_d[None, :], mask=mask, other=0.0)
        x0, x1 = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_H, BLOCK_HALF, 2)))  # even, odd lanes
        y0 = x0 * c[None, :] - x1 * s[None, :]
        y1 = x0 * s[None, :] + x1 * c[None, :]
        y = tl.reshape(tl.join(y0, y1), (BLOCK_H, BLOCK_D))  # interleave back
        tl.store(Y + y_row + rows[:, None] * stride_yh + offs_d[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_qk(
    Q, K, QO, KO, COS, SIN, POS,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_qob, stride_qot, stride_qoh,
    stride_kob, stride_kot, stride_koh,
    stride_cos, stride_sin, stride_posb, stride_post,
    T, H, HKV, sin_sign,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_POS: tl.constexpr,
):
    """Grid (B * T,). Rotates every query and key head of token (b, t) = divmod(pid, T) by the
    angles of its position; sin_sign = -1 applies the inverse rotation (the backward)."""
    pid = tl.program_id(0)
    b = tl.cast(pid // T, tl.int64)
    t = tl.cast(pid % T, tl.int64)
    if HAS_POS:
        pos = tl.cast(tl.load(POS + b * stride_posb + t * stride_post), tl.int64)
    else:
        pos = t
    offs_i = tl.arange(0, BLOCK_HALF)
    i_ok = offs_i < HALF
    c = tl.load(COS + pos * stride_cos + offs_i, mask=i_ok, other=0.0).to(tl.float32)
    s = tl.load(SIN + pos * stride_sin + offs_i, mask=i_ok, other=0.0).to(tl.float32) * sin_sign
    _rotate_heads(Q, QO, b * stride_qb + t * stride_qt, b * stride_qob + t * stride_qot, stride_qh, stride_qoh,
                  H, c, s, HALF, BLOCK_H, BLOCK_HALF)
    _rotate_heads(K, KO, b * stride_kb + t * stride_kt, b * stride_kob + t * stride_kot, stride_kh, stride_koh,
                  HKV, c, s, HALF, BLOCK_H, BLOCK_HALF)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def rotary_config(n_heads: int, head_dim: int, interpreting: bool | None = None) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps) for the larger of the query / key head counts and head dim D."""
    interpreting = is_interpreting() if interpreting is None else interpreting
    block_d = max(2, next_power_of_2(head_dim))
    cap = INTERPRETER_TILE if interpreting else MAX_TILE
    block_h = max(1, min(next_power_of_2(max(n_heads, 1)), cap // block_d))
    tile = block_h * block_d
    num_warps = 4 if tile >= 2048 else 2 if tile >= 512 else 1
    return block_h, block_d, num_warps


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"apply_rotary: {name} is on {t.device} but q is on {device}")


# The last position_ids tensor whose range was checked: (weak reference, version counter, L).
# Every layer of a forward passes the same tensor, so only the first pays the host sync; an
# in-place change bumps the version and is checked again.
_CHECKED: list[tuple[weakref.ref, int, int] | None] = [None]


def _already_checked(position_ids: torch.Tensor, L: int) -> bool:
    last = _CHECKED[0]
    return (last is not None and last[0]() is position_ids and not position_ids.is_inference()
            and last[1] == position_ids._version and L >= last[2])



def _validate(q, k, cos, sin, position_ids, check_positions: bool = True):
    """Check shapes, dtypes and devices (errors name the argument); return tensors whose last dim
    is contiguous."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"apply_rotary: {name} must be a 4-D tensor (B, T, heads, D), "
                             f"got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"apply_rotary: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"apply_rotary: k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, "
                         "sequence length and head dim")
    if D == 0 or D % 2:
        raise ValueError(f"apply_rotary: head dim D of q and k must be even and positive, got {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != D // 2:
            raise ValueError(f"apply_rotary: {name} must be a (L, D/2) = (L, {D // 2}) table, "
                             f"got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _TABLE_DTYPES:
            raise TypeError(f"apply_rotary: {name} must be a floating table, got {t.dtype}")
    if cos.shape != sin.shape:
        raise ValueError(f"apply_rotary: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    L = cos.shape[0]
    device = q.device
    _check_device("k", k, device)
    _check_device("cos", cos, device)
    _check_device("sin", sin, device)
    if position_ids is not None:
        if not isinstance(position_ids, torch.Tensor) or tuple(position_ids.shape) != (B, T) \
                or position_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"apply_rotary: position_ids must be an int32/int64 tensor of shape (B, T) = {(B, T)}, "
                             f"got {getattr(position_ids, 'dtype', type(position_ids))} "
                             f"{tuple(getattr(position_ids, 'shape', ()))}")
        _check_device("position_ids", position_ids, device)
        if check_positions and position_ids.numel() and not _already_checked(position_ids, L):
            lo, hi = torch.aminmax(position_ids)
            lo, hi = (int(v) for v in host_read(torch.stack((lo, hi))))  # one host sync
            if lo < 0 or hi >= L:
                raise ValueError(f"apply_rotary: position_ids must lie in [0, {L}) (the cos/sin tables have "
                                 f"L = {L} rows), got values in [{lo}, {hi}]")
            if not position_ids.is_inference():  # inference tensors have no version counter: always checked
                _CHECKED[0] = (weakref.ref(position_ids), position_ids._version, L)
    elif L < T:
        raise ValueError(f"apply_rotary: without position_ids token t uses table row t, but the cos/sin tables "
                         f"have L = {L} rows, fewer than the sequence length T = {T}")
    check_device("apply_rotary", "q", device)
    # The kernel addresses the last dim with unit stride. A view with a strided last dim (a
    # transpose, or an expanded gradient) is copied once here rather than misread.
    q, k, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin))
    return q, k, cos, sin, position_ids


def rotary_forward(q, k, cos, sin, position_ids=None, *, inverse: bool = False, check_positions: bool = True):
    """Launch the kernel: (q_out, k_out), new contiguous tensors of q's and k's shape and dtype.
    ``inverse`` rotates by -a (the backward). ``check_positions=False`` skips the host-side range
    check of position_ids (the backward reuses ids the forward already checked)."""
    q, k, cos, sin, position_ids = _validate(q, k, cos, sin, position_ids, check_positions)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    qo = empty(B, T, H, D, dtype=q.dtype, device=q.device)
    ko = empty(B, T, Hkv, D, dtype=k.dtype, device=k.device)
    if B * T == 0 or (H == 0 and Hkv == 0):
        return qo, ko
    block_h, block_d, num_warps = rotary_config(max(H, Hkv), D)
    pos = position_ids if position_ids is not None else q  # placeholder pointer, never read
    _rotary_qk[(B * T,)](
        q, k, qo, ko, cos, sin, pos,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2),
        ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0), sin.stride(0),
        pos.stride(0) if position_ids is not None else 0, pos.stride(1) if position_ids is not None else 0,
        T, H, Hkv, -1.0 if inverse else 1.0,
        HALF=D // 2, BLOCK_H=block_h, BLOCK_HALF=block_d // 2, HAS_POS=position_ids is not None,
        num_warps=num_warps,
    )
    return qo, ko


# --------------------------------------------------------------------------------------------
# Autograd and the user-facing function
# --------------------------------------------------------------------------------------------


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries (B, T, H, D) and keys (B, T, Hkv, D) by RoPE angles; returns new
    contiguous (q_out, k_out). cos, sin: (L, D/2) tables; position_ids: (B, T) rows of the
    tables to use, or None for rows 0..T-1. Matches ``llama_mini.kernels.reference.apply_rotary_qk``.
    Differentiable in q and k (the gradient is the inverse rotation), through the custom op
    ``llama_mini::rotary``."""
    from .custom_ops import apply_rotary as op

    return op(q, k, cos, sin, position_ids)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (llama-mini aot rotary)
# --------------------------------------------------------------------------------------------



def _aot_spec(head_dim: int, n_heads: int, dtype: torch.dtype, has_pos: bool):
    from .aot import KernelSpec

    dt = TRITON_DTYPE[dtype]
    block_h, block_d, num_warps = rotary_config(n_heads, head_dim, interpreting=False)
    sig = {n: f"*{dt}" for n in ("Q", "K", "QO", "KO")}
    sig.update(COS="*fp32", SIN="*fp32", POS="*i64" if has_pos else f"*{dt}")
    for prefix in ("q", "k", "qo", "ko"):
        sig.update({f"stride_{prefix}{a}": "i32" for a in "bth"})
    sig.update(stride_cos="i32", stride_sin="i32", stride_posb="i32", stride_post="i32",
               T="i32", H="i32", HKV="i32", sin_sign="fp32",
               HALF="constexpr", BLOCK_H="constexpr", BLOCK_HALF="constexpr", HAS_POS="constexpr")
    # Pointers are 16-byte aligned; with D % 16 == 0 every head, token and batch stride of a
    # (B, T, heads, D) layout, and the table stride D/2 for D % 32 == 0, are multiples of 16.
    divisible = [n for n, v in sig.items() if v.startswith("*")]
    divisible += [n for n in sig if n[:8] == "stride_q" or n[:8] == "stride_k"]
    if head_dim % 32 == 0:
        divisible += ["stride_cos", "stride_sin"]
    return KernelSpec(
        module=__name__, kernel="_rotary_qk", signature=sig,
        constexprs=dict(HALF=head_dim // 2, BLOCK_H=block_h, BLOCK_HALF=block_d // 2, HAS_POS=has_pos),
        num_warps=num_warps, num_stages=3, divisible=tuple(divisible), expect_mma=False,
        label=f"rope D={head_dim:<3} {dt} {'pos ' if has_pos else 'seq '} H{block_h} w{num_warps}",
    )


def aot_specs(arch: int = 90) -> list:
    """The tiles the launcher picks for LLaMA-style head dims (64; 128, which 80 and 96 pad
    to), bf16: the largest 4-warp tiles (64 x 64, 32 x 128; with and without position_ids), the
    largest 2-warp tiles (16 x 64, 8 x 128) and the largest 1-warp tile (4 x 64), plus fp32 at
    32 x 128 (wider loads). Fewer heads give smaller tiles of the same code at the same warp
    count, so these bound register use. The backward is the same kernel (sin_sign = -1)."""
    specs = []
    for head_dim, n_heads in ((64, 64), (128, 32)):
        for has_pos in (False, True):
            specs.append(_aot_spec(head_dim, n_heads, torch.bfloat16, has_pos))
    specs.append(_aot_spec(128, 32, torch.float32, True))
    specs.append(_aot_spec(64, 16, torch.bfloat16, True))
    specs.append(_aot_spec(128, 8, torch.bfloat16, True))
    specs.append(_aot_spec(64, 4, torch.bfloat16, True))
    return specs
