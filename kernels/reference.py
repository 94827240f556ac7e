"""Plain-PyTorch reference implementations of every op the decoder uses.

These are the single source of truth for the math: the model's CPU path calls them, and every
kernel test compares a Triton kernel against them (usually after casting inputs to float64).
They favour clarity over speed, but none of them is gratuitously slow.

Shapes use B = batch, T = sequence length, H = query heads, Hkv = key/value heads,
D = head dim, C = model dim, V = vocabulary.

Math
----
rms_norm:       y = x / sqrt(mean(x^2, -1) + eps) * w            (computed in fp32, cast back)
add_rms_norm:   h = x + r;  y = rms_norm(h)                       (the block's residual add + norm)
rotary (RoPE):  for each adjacent pair (x[2i], x[2i+1]) at position p with angle a = p * f_i
                y[2i]   = x[2i] cos a - x[2i+1] sin a
                y[2i+1] = x[2i] sin a + x[2i+1] cos a
                i.e. multiplication by e^{ia} of the complex number x[2i] + i x[2i+1]
                (Meta's interleaved convention), written with real arithmetic only.
swiglu:         y = silu(a) * b = a * sigmoid(a) * b
attention:      softmax(q k^T * scale + mask) v, GQA by repeating k/v over query-head groups,
                causal mask aligned to the bottom right when T_q != T_k (KV-cache decoding),
                optional document masking (a query attends only to keys of its own document).
cross_entropy:  mean over counted targets of logsumexp(z) - z[target]; targets equal to
                ignore_index are not counted.
linear_cross_entropy: cross_entropy(x W^T, targets), the output projection and the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "rms_norm",
    "add_rms_norm",
    "apply_rotary",
    "apply_rotary_qk",
    "swiglu",
    "repeat_kv",
    "attention_mask",
    "attention",
    "cross_entropy",
    "linear_cross_entropy",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim. x: (..., C), weight: (C,). Normalises in fp32 (as Meta and
    Hugging Face do), casts back to x's dtype, then scales by weight."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's residual add fused with the next norm: h = x + residual, y = rms_norm(h).
    x, residual: (..., C) of one shape; weight: (C,). Returns (y, h)."""
    h = x + residual
    return rms_norm(h, weight, eps), h


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x's last dim by the angles whose cos/sin are given.

    x: (B, T, H, D) with D even. cos, sin: (T, D/2) or (B, T, D/2), any float dtype; the
    rotation is computed in fp32 (or x's dtype if wider) and cast back to x's dtype.

    Pair (x0, x1) is the complex number x0 + i x1, multiplied by cos + i sin:
    (x0 cos - x1 sin) + i (x0 sin + x1 cos). One complex multiply is ~4x faster on a CPU,
    forward + backward, than the same four real products and a stack (Meta's formulation).
    """
    if torch.compiler.is_compiling():  # inductor cannot generate code for complex ops
        return apply_rotary_real(x, cos, sin)
    B, T, H, D = x.shape
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xc = torch.view_as_complex(x.to(compute_dtype).contiguous().reshape(B, T, H, D // 2, 2))  # (B, T, H, D/2)
    rot = torch.complex(cos.to(compute_dtype), sin.to(compute_dtype))
    rot = rot[None, :, None, :] if rot.dim() == 2 else rot[:, :, None, :]  # (1 or B, T, 1, D/2)
    return torch.view_as_real(xc * rot).reshape(B, T, H, D).to(x.dtype)


def apply_rotary_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries (B, T, H, D) and keys (B, T, Hkv, D) together, as the model does.

    cos, sin: (L, D/2) tables of angles p * f_i for positions p = 0..L-1 (RoPE scaling is
    already in the frequencies f_i). position_ids: (B, T) integers in [0, L), the position of
    each token (restarting per document in packed batches); None means positions 0..T-1, i.e.
    the first T rows of the tables (callers decoding from start_pos pass the sliced tables).
    """
    if position_ids is None:
        T = q.shape[1]
        if cos.shape[0] < T:
            raise ValueError(f"cos/sin tables have {cos.shape[0]} rows, fewer than the sequence length {T}")
        cos, sin = cos[:T], sin[:T]  # (T, D/2)
    else:
        cos, sin = cos[position_ids], sin[position_ids]  # (B, T, D/2)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def apply_rotary_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary`` in real arithmetic (four products and a stack): slower in eager mode,
    but what ``torch.compile`` fuses into one kernel, so the compiled model uses it."""
    B, T, H, D = x.shape
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xp = x.to(compute_dtype).reshape(B, T, H, D // 2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]  # (B, T, H, D/2)
    cos, sin = cos.to(compute_dtype), sin.to(compute_dtype)
    cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if cos.dim() == 2 else (cos[:, :, None, :], sin[:, :, None, :])
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).reshape(B, T, H, D).to(x.dtype)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b, elementwise; a and b have the same shape (..., hidden)."""
    return F.silu(a) * b


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D): each kv head repeated for its query group."""
    if n_rep == 1:
        return x
    B, Hkv, T, D = x.shape
    return x[:, :, None, :, :].expand(B, Hkv, n_rep, T, D).reshape(B, Hkv * n_rep, T, D)


def attention_mask(
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    document_ids: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Boolean mask (True = may attend), broadcastable to (B, 1, T_q, T_k); None if no masking.

    causal: query i (of T_q) sees key j (of T_k) iff j <= i + (T_k - T_q): the mask is aligned
        to the bottom right, so the last query is the newest token and sees every key.
    document_ids: (B, T_k) integer ids; the last T_q of them label the queries. A query sees
        only keys with the same id (block-diagonal attention for packed sequences).
    """
    mask = None
    if causal:
        qi = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        kj = torch.arange(k_len, device=device)[None, :]
        mask = (kj <= qi)[None, None]  # (1, 1, Tq, Tk)
    if document_ids is not None:
        if document_ids.dim() != 2 or document_ids.shape[1] != k_len:
            raise ValueError(
                f"document_ids must have shape (B, T_k={k_len}), got {tuple(document_ids.shape)}"
            )
        kd = document_ids[:, None, None, :]  # (B, 1, 1, Tk)
        qd = document_ids[:, None, k_len - q_len :, None]  # (B, 1, Tq, 1)
        same = qd == kd
        mask = same if mask is None else (mask & same)
    return mask


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    document_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Explicit-softmax attention, the reference every other backend is checked against.

    q: (B, H, T_q, D); k, v: (B, Hkv, T_k, D) with H % Hkv == 0. Returns (B, H, T_q, D).
    Scores and softmax are computed in fp32 (or wider). A query row with no visible key (only
    possible with document masks or T_q > T_k) outputs zeros, as flash attention does.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if H % Hkv != 0:
        raise ValueError(f"query heads {H} not divisible by key/value heads {Hkv}")
    k = repeat_kv(k, H // Hkv)
    v = repeat_kv(v, H // Hkv)
    scale = D**-0.5 if scale is None else scale
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-2, -1)) * scale
    mask = attention_mask(Tq, Tk, causal=causal, document_ids=document_ids, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return torch.matmul(probs, v.to(compute_dtype)).to(q.dtype)


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Token cross-entropy over targets != ignore_index, computed in fp32 (or wider).

    logits: (..., V); targets: (...) integer. reduction "mean" (over counted targets; a NaN-free
    0 when nothing counts) or "sum". Returns a scalar.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    V = logits.shape[-1]
    flat_logits = logits.reshape(-1, V)
    flat_logits = flat_logits.to(torch.promote_types(flat_logits.dtype, torch.float32))
    flat_targets = targets.reshape(-1)
    counted = (flat_targets != ignore_index).sum()
    total = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="sum")
    return total if reduction == "sum" else total / counted.clamp(min=1)


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """cross_entropy(x @ weight^T, targets): the output projection and the loss, materialising
    the (N, V) logits. x: (..., C); weight: (V, C); targets: (...) integer."""
    return cross_entropy(x @ weight.t(), targets, ignore_index, reduction)
