"""Flash attention in Triton: forward and backward, causal, grouped-query, any length, packed
documents.

Math
----
For one (batch, query head) pair with q: (T_q, D), k, v: (T_k, D) of its key/value head and
s = scale (default D^-1/2)::

    S = s * q k^T                  (T_q, T_k), masked entries set to -inf
    L = logsumexp(S, axis=-1)      (T_q,)      the per-row log-sum-exp, saved for backward
    P = exp(S - L[:, None])        (T_q, T_k)  softmax rows
    O = P v                        (T_q, D)

Backward, given dO = dLoss/dO (T_q, D)::

    Delta = rowsum(dO * O)         (T_q,)      equals rowsum(P * dP), computed from O alone
    dV = P^T dO                    (T_k, D)
    dP = dO v^T                    (T_q, T_k)
    dS = P * (dP - Delta[:, None]) (T_q, T_k)  the softmax Jacobian applied row by row
    dQ = s * dS k                  (T_q, D)
    dK = s * dS^T q                (T_k, D)

Neither S nor P is ever stored: the forward streams tiles of k and v past a resident tile of q
with the online softmax (running row max m and row sum l, rescaling the accumulator by
exp(m_old - m_new) whenever the max grows), and the backward recomputes P tile by tile from the
saved L. Memory is O(T) per head, forward and backward. Exponentials use exp2 with the scale
folded into log2(e) units, as FlashAttention-2 does.

Masking
-------
causal
    Query i sees key j iff j <= i + (T_k - T_q): the mask is aligned to the bottom right, so with
    a KV cache the newest query sees every cached key. Key tiles entirely above the diagonal are
    never visited (the loop bounds stop short of them); tiles entirely below it run a mask-free
    loop; only tiles that the diagonal (or the ragged end of the keys) crosses are masked.
document_ids (B, T_k)
    Packed sequences: the last T_q ids label the queries, and a query sees only keys with its own
    id. A key tile whose id range [min, max] is disjoint from the query tile's range is skipped
    without loading k or v (for packed, non-decreasing ids these are exactly the tiles that lie
    wholly across a document boundary). ``cu_seqlens`` (cumulative document lengths, as in
    FlashAttention's varlen API) are turned into ids by :func:`cu_seqlens_to_document_ids`.
empty rows
    A query that sees no key (causal with T_q > T_k) outputs 0 and has L = -inf, its gradients
    are 0, as the reference defines it.

Grouped-query attention
-----------------------
q has H heads and k, v have H_kv = H / n_rep. Query head h reads key/value head h // n_rep
through strides; k and v are never repeated in memory. dK and dV of a key/value head are
reduced over its n_rep query heads inside one program (a loop over the group), so no atomics
and no (B, H, T_k, D) intermediate are needed.

Backward loop order
-------------------
Two kernels after the Delta preprocessing pass, both deterministic:

* ``_attn_bwd_dkdv``: one program per (key tile, batch, key/value head). It keeps its k, v tile
  and the dK, dV accumulators in registers and loops over the query heads of its group and, for
  each, over the query tiles that can see its keys (causal: from the diagonal down).
* ``_attn_bwd_dq``: one program per (query tile, batch, query head), looping over key tiles as
  the forward does, accumulating dQ in registers.

We chose KV-outer for dK/dV and a separate Q-outer pass for dQ over the single-kernel variant
(KV-outer with dQ accumulated by ``atomic_add``): the atomic variant saves recomputing Q K^T,
exp and dO V^T, but its float additions land in a run-dependent order (results differ in the
last bits between runs) and contended atomics on dQ serialise under GQA, where n_rep programs
add into the same rows. The split does 7 tile matrix products per (query tile, key tile) pair
instead of 5 (dK/dV: S^T, dV, dP^T, dK; dQ: S, dP, dQ), 40% more backward matrix FLOPs, and
buys bit-reproducible gradients, which exact resume in the trainer relies on. (Benchmarks
count the standard 2.5x-forward backward FLOPs, so they report useful work, not work done.)

Shapes and dtypes
-----------------
q (B, H, T_q, D), k and v (B, H_kv, T_k, D), any strides with the last dim contiguous (the
model passes transposed views of (B, T, H, D) tensors; no copy is made). D up to 128; head
dims that are not powers of two (80, 96, ...) are padded to the next power of two by masked
loads, never by copying. fp16 and bf16 on GPU with fp32 accumulation and softmax; fp32 too
(exact IEEE products unless ``torch.backends.cuda.matmul.allow_tf32`` is set). Output has q's
dtype and the layout (B, T_q, H, D) viewed as (B, H, T_q, D); L is fp32 (B, H, T_q).

Block sizes
-----------
On GPU each kernel is autotuned per (power-of-two buckets of T_q and T_k, n_rep, head dim,
causal, documents, dtype) over a small table of configurations per padded head dim and
architecture (``fwd_configs``, ``bwd_configs``) that the ahead-of-time compile test checks for
register spills, shared-memory fit and tensor-core use on sm_80 and sm_90. Length buckets keep
KV-cache decoding, where T_k grows by one each step, from re-tuning at every step.
Under the Triton interpreter a fixed 16 x 16 tiling runs, so small test shapes still cross
several tiles.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .common import TRITON_DTYPE, empty, empty_like, is_interpreting

import triton  # noqa: E402  (kernels/__init__ keeps the package importable without triton)
from triton import cdiv, next_power_of_2  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = [
    "flash_attention",
    "flash_attention_with_lse",
    "attention_forward",
    "attention_backward",
    "cu_seqlens_to_document_ids",
    "fwd_configs",
    "bwd_configs",
    "aot_specs",
    "INTERPRETER_BLOCK",
    "INTERPRETER_TILES",
    "MAX_HEAD_DIM",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 128
# Tiles under TRITON_INTERPRET=1: (BLOCK_M, BLOCK_N). Small, so test shapes cross several tiles;
# tests also set non-square pairs, since every GPU configuration is non-square.
INTERPRETER_BLOCK = 16
INTERPRETER_TILES = (INTERPRETER_BLOCK, INTERPRETER_BLOCK)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptrs, rows_ok, d_ok, ROW_MASK: tl.constexpr, D_MASK: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, masking ragged rows and/or padded head-dim columns."""
    if ROW_MASK:
        if D_MASK:
            x = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if D_MASK:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _tile(base, start, stride, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers to rows [start, start + BLOCK) x head-dim columns [0, BLOCK_D) of one head. The
    tile's row offset is taken in int64, so heads beyond 2^31 elements address correctly, while
    offsets inside the tile stay 32-bit (cheaper in registers)."""
    rows = tl.arange(0, BLOCK)[:, None] * stride + tl.arange(0, BLOCK_D)[None, :]
    return base + tl.cast(start, tl.int64) * stride + rows


@triton.jit
def _tile_ids(doc_base, offs, T, HAS_DOCS: tl.constexpr):
    """Document ids of positions ``offs`` (clamped to T-1, so padded rows repeat the last id)
    and their [min, max]. Without documents: placeholders that no mask reads."""
    if HAS_DOCS:
        ids = tl.load(doc_base + tl.minimum(offs, T - 1))
    else:
        ids = offs
    return ids, tl.min(ids, 0), tl.max(ids, 0)


@triton.jit
def _tile_ids_overlap(doc_base, offs, T, lo, hi):
    """Ids of positions ``offs`` and whether their range meets [lo, hi] (else the tile pairing
    is skipped: no id can match)."""
    ids, ids_lo, ids_hi = _tile_ids(doc_base, offs, T, True)
    return ids, (ids_lo <= hi) & (ids_hi >= lo)


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, q_ids, k_ids, k_base, v_base, stride_kt, stride_vt, offs_m, n0, T_K, offset,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
):
    """One step of the online softmax over keys [n0, n0 + BLOCK_N)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < T_K
    d_ok = offs_d < HEAD_DIM
    k = _load_rows(_tile(k_base, n0, stride_kt, BLOCK_N, BLOCK_D), n_ok, d_ok, MASKED, HEAD_DIM != BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BM, BN), log2 units
    if MASKED:
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + offset)
        if HAS_DOCS:
            keep = keep & (k_ids[None, :] == q_ids[:, None])
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(_tile(v_base, n0, stride_vt, BLOCK_N, BLOCK_D), n_ok, d_ok, MASKED, HEAD_DIM != BLOCK_D)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_loop(
    acc, l_i, m_i, q, q_ids, q_lo, q_hi, k_base, v_base, doc_base, stride_kt, stride_vt, offs_m, lo,
    hi, T_K, offset, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
):
    for n0 in range(lo, hi, BLOCK_N):
        if HAS_DOCS:
            k_ids, overlap = _tile_ids_overlap(doc_base, n0 + tl.arange(0, BLOCK_N), T_K, q_lo, q_hi)
            if overlap:
                acc, l_i, m_i = _fwd_tile(
                    acc, l_i, m_i, q, q_ids, k_ids, k_base, v_base, stride_kt, stride_vt, offs_m, n0,
                    T_K, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, CAUSAL, HAS_DOCS, PRECISION,
                )
        else:
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, q_ids, q_ids, k_base, v_base, stride_kt, stride_vt, offs_m, n0,
                T_K, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, CAUSAL, HAS_DOCS, PRECISION,
            )
    return acc, l_i, m_i


@triton.jit
def _key_ranges(m0, T_K, offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_DOCS: tl.constexpr):
    """For the query tile starting at m0: keys [0, mid) need no mask, [mid, hi) do, [hi, T_K)
    are above the diagonal and never visited."""
    if CAUSAL:
        hi = tl.minimum(T_K, m0 + BLOCK_M + offset)  # last query of the tile sees keys < hi
        full = tl.minimum(m0 + offset + 1, T_K)  # the first query sees keys < full
    else:
        hi = T_K
        full = T_K
    if HAS_DOCS:
        mid = hi * 0
    else:
        mid = tl.maximum(full, 0) // BLOCK_N * BLOCK_N
    return mid, hi


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, DOC,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_docb,
    H, N_REP, T_Q, T_K, BUCKET_Q, BUCKET_K, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(T_q, BLOCK_M) * B * H,). Writes O and LSE for one query tile of one head."""
    num_m = tl.cdiv(T_Q, BLOCK_M)
    pid_m = tl.program_id(0) % num_m  # query tiles of one head are neighbours: k, v stay in L2
    pid_bh = tl.program_id(0) // num_m
    off_b = (pid_bh // H).to(tl.int64)
    off_h = pid_bh % H
    off_g = (off_h // N_REP).to(tl.int64)
    off_h = off_h.to(tl.int64)
    offset = T_K - T_Q
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T_Q
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(_tile(Q + off_b * stride_qb + off_h * stride_qh, m0, stride_qt, BLOCK_M, BLOCK_D),
                   m_ok, d_ok, True, HEAD_DIM != BLOCK_D)
    k_base = K + off_b * stride_kb + off_g * stride_kh
    v_base = V + off_b * stride_vb + off_g * stride_vh
    doc_base = DOC + off_b * stride_docb
    q_ids, q_lo, q_hi = _tile_ids(doc_base + offset, offs_m, T_Q, HAS_DOCS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mid, hi = _key_ranges(m0, T_K, offset, BLOCK_M, BLOCK_N, CAUSAL, HAS_DOCS)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, q_ids, q_lo, q_hi, k_base, v_base, doc_base, stride_kt,
                              stride_vt, offs_m, 0, mid, T_K, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N,
                              False, CAUSAL, HAS_DOCS, PRECISION)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, q_ids, q_lo, q_hi, k_base, v_base, doc_base, stride_kt,
                              stride_vt, offs_m, mid, hi, T_K, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N,
                              True, CAUSAL, HAS_DOCS, PRECISION)

    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty_row, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = _tile(O + off_b * stride_ob + off_h * stride_oh, m0, stride_ot, BLOCK_M, BLOCK_D)
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * T_Q + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    H, T_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (cdiv(T_q, BLOCK_M) * B * H,). Delta = rowsum(dO * O) in fp32."""
    num_m = tl.cdiv(T_Q, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    pid_bh = tl.program_id(0) // num_m
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(_tile(O + off_b * stride_ob + off_h * stride_oh, m0, stride_ot, BLOCK_M, BLOCK_D),
                mask=mask, other=0.0)
    do = tl.load(_tile(DO + off_b * stride_dob + off_h * stride_doh, m0, stride_dot, BLOCK_M, BLOCK_D),
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T_Q + offs_m, delta, mask=offs_m < T_Q)


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, k_ids, q_base, do_base, lse_base, delta_base, doc_base, stride_qt, stride_dot,
    offs_n, m0, T_Q, T_K, offset, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulate one query tile's contribution to dK, dV of the resident key tile (transposed:
    rows are keys, columns queries)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T_Q
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(_tile(q_base, m0, stride_qt, BLOCK_M, BLOCK_D), m_ok, d_ok, True, HEAD_DIM != BLOCK_D)
    do = _load_rows(_tile(do_base, m0, stride_dot, BLOCK_M, BLOCK_D), m_ok, d_ok, True, HEAD_DIM != BLOCK_D)
    lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BN, BM)
    p_t = tl.exp2(s_t - lse2[None, :])
    if MASKED:
        keep = m_ok[None, :] & (offs_n < T_K)[:, None]
        if CAUSAL:
            keep = keep & (offs_n[:, None] <= offs_m[None, :] + offset)
        if HAS_DOCS:
            q_ids = tl.load(doc_base + tl.minimum(offs_m, T_Q - 1) + offset)
            keep = keep & (k_ids[:, None] == q_ids[None, :])
        p_t = tl.where(keep, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BN, BM)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_loop(
    dk, dv, k, v, k_ids, k_lo, k_hi, q_base, do_base, lse_base, delta_base, doc_base, stride_qt,
    stride_dot, offs_n, lo, hi, T_Q, T_K, offset, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
):
    for m0 in range(lo, hi, BLOCK_M):
        if HAS_DOCS:
            _, overlap = _tile_ids_overlap(doc_base + offset, m0 + tl.arange(0, BLOCK_M), T_Q, k_lo, k_hi)
            if overlap:
                dk, dv = _dkdv_tile(dk, dv, k, v, k_ids, q_base, do_base, lse_base, delta_base, doc_base,
                                    stride_qt, stride_dot, offs_n, m0, T_Q, T_K, offset, qk_scale, HEAD_DIM,
                                    BLOCK_D, BLOCK_M, MASKED, CAUSAL, HAS_DOCS, PRECISION)
        else:
            dk, dv = _dkdv_tile(dk, dv, k, v, k_ids, q_base, do_base, lse_base, delta_base, doc_base,
                                stride_qt, stride_dot, offs_n, m0, T_Q, T_K, offset, qk_scale, HEAD_DIM,
                                BLOCK_D, BLOCK_M, MASKED, CAUSAL, HAS_DOCS, PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DOC, DK, DV,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    stride_docb,
    H, N_REP, T_Q, T_K, BUCKET_Q, BUCKET_K, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(T_k, BLOCK_N) * B * H_kv,). dK, dV of one key tile, summed over the group's
    query heads."""
    num_n = tl.cdiv(T_K, BLOCK_N)
    pid_n = tl.program_id(0) % num_n
    pid_bg = tl.program_id(0) // num_n
    H_KV = H // N_REP
    off_b = (pid_bg // H_KV).to(tl.int64)
    off_g = (pid_bg % H_KV).to(tl.int64)
    offset = T_K - T_Q
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < T_K
    d_ok = offs_d < HEAD_DIM
    k = _load_rows(_tile(K + off_b * stride_kb + off_g * stride_kh, n0, stride_kt, BLOCK_N, BLOCK_D),
                   n_ok, d_ok, True, HEAD_DIM != BLOCK_D)
    v = _load_rows(_tile(V + off_b * stride_vb + off_g * stride_vh, n0, stride_vt, BLOCK_N, BLOCK_D),
                   n_ok, d_ok, True, HEAD_DIM != BLOCK_D)
    doc_base = DOC + off_b * stride_docb
    k_ids, k_lo, k_hi = _tile_ids(doc_base, offs_n, T_K, HAS_DOCS)

    # Query tiles [lo, mid) need a mask, [mid, T_Q) see the whole key tile; below lo is above
    # the diagonal and never visited.
    q_end = tl.cdiv(T_Q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = tl.maximum(n0 - offset, 0) // BLOCK_M * BLOCK_M  # first query that sees key n0
        mid = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.maximum(mid, lo), q_end)
    else:
        lo = 0
        mid = 0
    if HAS_DOCS:
        mid = q_end
    mid = tl.where(n0 + BLOCK_N > T_K, q_end, mid)  # ragged last key tile: mask everything

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for j in range(0, N_REP):
        off_h = off_g * N_REP + j
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        lse_base = LSE + (off_b * H + off_h) * T_Q
        delta_base = DELTA + (off_b * H + off_h) * T_Q
        dk, dv = _dkdv_loop(dk, dv, k, v, k_ids, k_lo, k_hi, q_base, do_base, lse_base, delta_base, doc_base,
                            stride_qt, stride_dot, offs_n, lo, mid, T_Q, T_K, offset, qk_scale, HEAD_DIM,
                            BLOCK_D, BLOCK_M, True, CAUSAL, HAS_DOCS, PRECISION)
        dk, dv = _dkdv_loop(dk, dv, k, v, k_ids, k_lo, k_hi, q_base, do_base, lse_base, delta_base, doc_base,
                            stride_qt, stride_dot, offs_n, mid, T_Q, T_Q, T_K, offset, qk_scale, HEAD_DIM,
                            BLOCK_D, BLOCK_M, False, CAUSAL, HAS_DOCS, PRECISION)
    dk = dk * sm_scale
    mask = n_ok[:, None] & d_ok[None, :]
    tl.store(_tile(DK + off_b * stride_dkb + off_g * stride_dkh, n0, stride_dkt, BLOCK_N, BLOCK_D),
             dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(_tile(DV + off_b * stride_dvb + off_g * stride_dvh, n0, stride_dvt, BLOCK_N, BLOCK_D),
             dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_tile(
    dq, q, do, lse2, delta, q_ids, k_ids, k_base, v_base, stride_kt, stride_vt, offs_m, n0, T_K, offset,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < T_K
    d_ok = offs_d < HEAD_DIM
    k = _load_rows(_tile(k_base, n0, stride_kt, BLOCK_N, BLOCK_D), n_ok, d_ok, MASKED, HEAD_DIM != BLOCK_D)
    v = _load_rows(_tile(v_base, n0, stride_vt, BLOCK_N, BLOCK_D), n_ok, d_ok, MASKED, HEAD_DIM != BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BM, BN)
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + offset)
        if HAS_DOCS:
            keep = keep & (k_ids[None, :] == q_ids[:, None])
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BM, BN)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_loop(
    dq, q, do, lse2, delta, q_ids, q_lo, q_hi, k_base, v_base, doc_base, stride_kt, stride_vt, offs_m, lo,
    hi, T_K, offset, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
):
    for n0 in range(lo, hi, BLOCK_N):
        if HAS_DOCS:
            k_ids, overlap = _tile_ids_overlap(doc_base, n0 + tl.arange(0, BLOCK_N), T_K, q_lo, q_hi)
            if overlap:
                dq = _dq_tile(dq, q, do, lse2, delta, q_ids, k_ids, k_base, v_base, stride_kt, stride_vt, offs_m,
                              n0, T_K, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, CAUSAL, HAS_DOCS,
                              PRECISION)
        else:
            dq = _dq_tile(dq, q, do, lse2, delta, q_ids, q_ids, k_base, v_base, stride_kt, stride_vt, offs_m,
                          n0, T_K, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, CAUSAL, HAS_DOCS,
                          PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DOC, DQ,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    stride_docb,
    H, N_REP, T_Q, T_K, BUCKET_Q, BUCKET_K, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(T_q, BLOCK_M) * B * H,). dQ of one query tile of one head."""
    num_m = tl.cdiv(T_Q, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    pid_bh = tl.program_id(0) // num_m
    off_b = (pid_bh // H).to(tl.int64)
    off_h = pid_bh % H
    off_g = (off_h // N_REP).to(tl.int64)
    off_h = off_h.to(tl.int64)
    offset = T_K - T_Q
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T_Q
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(_tile(Q + off_b * stride_qb + off_h * stride_qh, m0, stride_qt, BLOCK_M, BLOCK_D),
                   m_ok, d_ok, True, HEAD_DIM != BLOCK_D)
    do = _load_rows(_tile(DO + off_b * stride_dob + off_h * stride_doh, m0, stride_dot, BLOCK_M, BLOCK_D),
                    m_ok, d_ok, True, HEAD_DIM != BLOCK_D)
    row = pid_bh.to(tl.int64) * T_Q + offs_m
    lse2 = tl.load(LSE + row, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
    k_base = K + off_b * stride_kb + off_g * stride_kh
    v_base = V + off_b * stride_vb + off_g * stride_vh
    doc_base = DOC + off_b * stride_docb
    q_ids, q_lo, q_hi = _tile_ids(doc_base + offset, offs_m, T_Q, HAS_DOCS)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mid, hi = _key_ranges(m0, T_K, offset, BLOCK_M, BLOCK_N, CAUSAL, HAS_DOCS)
    dq = _dq_loop(dq, q, do, lse2, delta, q_ids, q_lo, q_hi, k_base, v_base, doc_base, stride_kt, stride_vt,
                  offs_m, 0, mid, T_K, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_DOCS,
                  PRECISION)
    dq = _dq_loop(dq, q, do, lse2, delta, q_ids, q_lo, q_hi, k_base, v_base, doc_base, stride_kt, stride_vt,
                  offs_m, mid, hi, T_K, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_DOCS,
                  PRECISION)
    dq = dq * sm_scale
    tl.store(_tile(DQ + off_b * stride_dqb + off_h * stride_dqh, m0, stride_dqt, BLOCK_M, BLOCK_D),
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch options of one autotune candidate."""

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int

    def triton(self) -> "triton.Config":
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n},
                             num_warps=self.num_warps, num_stages=self.num_stages)


C = BlockConfig
# Candidates per padded head dim, chosen from ahead-of-time sweeps (docs/kernels.md): every
# entry compiles for its targets with no register spills and within shared memory, causal and
# with document masking, under both triton 3.6 (the GPU machine's, ptxas 12.8) and triton 3.9
# (ptxas 12.9 / 13.4), and tests/test_flash_attention_aot.py keeps it that way for the
# installed triton (bench/triton_compat.sh runs the check under another). Larger head dims
# hold bigger q / accumulator tiles in registers, so their tiles shrink. Head dims above 128
# spilled in every configuration tried and are not offered (the model falls back to sdpa).
# Each table serves Ampere (sm_80 - sm_89); a *_HOPPER table, where it has the head dim,
# replaces it on sm_90 and newer, whose warpgroup MMA allocates registers differently.
_FWD = {
    16: [C(128, 64, 4, 3), C(128, 128, 4, 3), C(64, 64, 4, 3)],
    32: [C(128, 64, 4, 3), C(128, 128, 8, 3), C(64, 64, 4, 3)],
    64: [C(128, 64, 8, 3), C(64, 64, 4, 3)],
    128: [C(128, 32, 8, 3), C(64, 64, 8, 3), C(64, 32, 4, 3)],
}
# M128 N64 w8 and M64 N64 w4 spill 8 B on sm_80 with document masking under triton 3.6.
_FWD_HOPPER = {128: [C(128, 64, 8, 3), C(128, 32, 8, 3), C(64, 64, 4, 3)]}
# dK/dV programs own a key tile (BLOCK_N rows) and stream query tiles (BLOCK_M rows) past it,
# holding k, v, dK and dV for the whole loop: the register-hungriest kernel. Under triton 3.6
# on sm_80 the larger tiles spill at head dim 64 (M16 N128 w8 s3 fits with all 255 registers,
# M32 N32 w4 s3 with 242), and at 128 no M32 N64 / M16 N128 tiling fits both Hopper and
# Ampere, so the two get their own candidates.
_DKDV = {
    16: [C(32, 128, 8, 3), C(16, 128, 8, 3)],
    32: [C(32, 128, 8, 2), C(16, 128, 8, 3), C(16, 64, 4, 3)],
    64: [C(16, 128, 8, 3), C(32, 32, 4, 3)],
    128: [C(32, 64, 8, 3), C(32, 32, 8, 2), C(16, 64, 8, 3)],
}
_DKDV_HOPPER = {
    64: [C(32, 128, 8, 3), C(16, 128, 8, 3)],
    128: [C(16, 128, 8, 2), C(16, 64, 8, 3)],
}
# dQ programs own a query tile and stream key tiles. At head dim 128, M64 N64 w8 spills 152 B
# on sm_90 with document masking under triton 3.6, and M128 N64 w8 spills on sm_80.
_DQ = {
    16: [C(128, 32, 8, 3), C(64, 64, 4, 3), C(128, 64, 8, 3)],
    32: [C(128, 32, 8, 3), C(64, 64, 4, 3), C(128, 64, 8, 3)],
    64: [C(128, 32, 8, 3), C(64, 64, 4, 3), C(128, 64, 8, 3)],
    128: [C(64, 64, 8, 2), C(64, 32, 4, 3)],
}
_DQ_HOPPER = {128: [C(128, 64, 8, 2), C(128, 32, 8, 3), C(64, 32, 4, 3)]}
del C
_PREPROCESS_BLOCK_M = 64


def block_d_for(head_dim: int) -> int:
    """Padded head dim the kernels tile with: the next power of two, at least 16 (tl.dot's
    minimum inner size)."""
    return max(16, next_power_of_2(head_dim))


def arch_family(arch: int) -> int:
    """90 for Hopper and newer (sm_90+), 80 for Ampere and Ada (sm_80 - sm_89)."""
    return 90 if arch >= 90 else 80


def _candidates(table: dict, hopper: dict, block_d: int, arch: int) -> list[BlockConfig]:
    """``hopper[block_d]`` on sm_90 and newer where it exists, else ``table[block_d]``."""
    found = hopper.get(block_d) if arch_family(arch) == 90 else None
    return list(found or table[block_d])


def fwd_configs(block_d: int, arch: int = 90) -> list[BlockConfig]:
    """Forward autotune candidates for a padded head dim on ``sm_{arch}``."""
    return _candidates(_FWD, _FWD_HOPPER, block_d, arch)


def bwd_configs(block_d: int, arch: int = 90) -> dict[str, list[BlockConfig]]:
    """Backward autotune candidates on ``sm_{arch}``: {"dkdv": [...], "dq": [...]}."""
    return {"dkdv": _candidates(_DKDV, _DKDV_HOPPER, block_d, arch),
            "dq": _candidates(_DQ, _DQ_HOPPER, block_d, arch)}


_KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq, "pre": _attn_bwd_preprocess}
_KERNEL_NAMES = {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq", "pre": "_attn_bwd_preprocess"}
_TUNE_KEY = ["BUCKET_Q", "BUCKET_K", "N_REP", "HEAD_DIM", "CAUSAL", "HAS_DOCS"]


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, block_d: int, arch: int):
    table = fwd_configs(block_d, arch) if kind == "fwd" else bwd_configs(block_d, arch)[kind]
    return triton.autotune(configs=[c.triton() for c in table], key=_TUNE_KEY)(_KERNELS[kind])


def _launch(kind: str, grid, block_d: int, device: torch.device, *args, **meta) -> None:
    if is_interpreting():
        block_m, block_n = INTERPRETER_TILES
        _KERNELS[kind][grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n)
    else:
        major, minor = torch.cuda.get_device_capability(device)
        _tuned(kind, block_d, arch_family(10 * major + minor))[grid](*args, **meta)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: IEEE fp32 products unless the user allowed TF32 (as for matmul)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for fp16 / bf16 operands


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _prepare(q, k, v, document_ids, scale):
    """Validate inputs (errors name the argument) and return normalised ones."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be a 4-D tensor (B, heads, T, D), "
                             f"got {getattr(t, 'shape', type(t))}")
    B, H, Tq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"flash_attention: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch or head dim")
    Hkv, Tk = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"flash_attention: query heads {H} must be a multiple of key/value heads {Hkv}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head dim {D} not supported (1..{MAX_HEAD_DIM})")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attention: q, k, v must share one dtype of {[str(d) for d in _DTYPES]}, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if is_interpreting():
        if q.device.type != "cpu":
            raise ValueError(f"flash_attention: the Triton interpreter runs on CPU tensors, got {q.device}")
        if q.dtype == torch.bfloat16:
            raise ValueError("flash_attention: bfloat16 does not work under the Triton interpreter (tl.dot on "
                             "bf16 returns garbage there, triton issue 11584); use fp16 or fp32, or a GPU")
    elif q.device.type != "cuda":
        raise ValueError(f"flash_attention: Triton kernels need a CUDA tensor (got {q.device}); "
                         "set TRITON_INTERPRET=1 to run them on the CPU")
    if document_ids is not None:
        if document_ids.shape != (B, Tk) or document_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"flash_attention: document_ids must be an int32/int64 tensor of shape (B, T_k) = "
                             f"{(B, Tk)}, got {document_ids.dtype} {tuple(document_ids.shape)}")
        if Tq > Tk:
            raise ValueError(f"flash_attention: with document_ids the queries are the last T_q of the T_k "
                             f"positions, so T_q ({Tq}) must not exceed T_k ({Tk})")
        document_ids = _last_dim_contiguous(document_ids.to(q.device))
    scale = D**-0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"flash_attention: scale must be finite, got {scale}")
    return _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v), document_ids, scale


def attention_forward(q, k, v, *, causal: bool = True, document_ids=None, scale: float | None = None):
    """Run the forward kernel. Returns (out (B, H, T_q, D), lse (B, H, T_q) fp32)."""
    q, k, v, document_ids, scale = _prepare(q, k, v, document_ids, scale)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    o = empty(B, Tq, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, Tq, D) view
    lse = empty(B, H, Tq, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    if Tk == 0:  # nothing to attend to: every row is empty
        return o.zero_(), lse.fill_(float("-inf"))
    block_d = block_d_for(D)
    doc = document_ids if document_ids is not None else q
    grid = lambda meta: (cdiv(Tq, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    _launch(
        "fwd", grid, block_d, q.device,
        q, k, v, o, lse, doc,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        doc.stride(0) if document_ids is not None else 0,
        H, H // Hkv, Tq, Tk, next_power_of_2(Tq), next_power_of_2(Tk), scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=bool(causal), HAS_DOCS=document_ids is not None,
        PRECISION=_precision(q.dtype),
    )
    return o, lse


def attention_backward(do, q, k, v, o, lse, *, causal: bool = True, document_ids=None, scale: float | None = None):
    """Run the backward kernels for dO = d loss / d out. Returns (dq, dk, dv) shaped like q, k, v."""
    q, k, v, document_ids, scale = _prepare(q, k, v, document_ids, scale)
    for name, t, shape in (("do", do, q.shape), ("o", o, q.shape), ("lse", lse, q.shape[:3])):
        if tuple(t.shape) != tuple(shape) or t.device != q.device:
            raise ValueError(f"attention_backward: {name} must have shape {tuple(shape)} on {q.device}, "
                             f"got {tuple(t.shape)} on {t.device}")
    if lse.dtype != torch.float32:
        raise ValueError(f"attention_backward: lse must be float32 (from attention_forward), got {lse.dtype}")
    do, o, lse = _last_dim_contiguous(do), _last_dim_contiguous(o), lse.contiguous()
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dq, dk, dv = empty_like(q), empty_like(k), empty_like(v)
    if q.numel() == 0 or Tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = block_d_for(D)
    doc = document_ids if document_ids is not None else q
    stride_docb = doc.stride(0) if document_ids is not None else 0
    delta = empty(B, H, Tq, dtype=torch.float32, device=q.device)
    pre_m = INTERPRETER_BLOCK if is_interpreting() else _PREPROCESS_BLOCK_M
    _attn_bwd_preprocess[(cdiv(Tq, pre_m) * B * H,)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, Tq, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pre_m,
    )
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=bool(causal), HAS_DOCS=document_ids is not None,
                  PRECISION=_precision(q.dtype))
    shape_args = (H, H // Hkv, Tq, Tk, next_power_of_2(Tq), next_power_of_2(Tk), scale * LOG2E, scale)
    input_strides = [t.stride(i) for t in (q, k, v, do) for i in range(3)]  # (b, h, t) of each
    _launch(
        "dkdv", lambda meta: (cdiv(Tk, meta["BLOCK_N"]) * B * Hkv,), block_d, q.device,
        q, k, v, do, lse, delta, doc, dk, dv, *input_strides,
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        stride_docb, *shape_args, **common,
    )
    _launch(
        "dq", lambda meta: (cdiv(Tq, meta["BLOCK_M"]) * B * H,), block_d, q.device,
        q, k, v, do, lse, delta, doc, dq, *input_strides,
        dq.stride(0), dq.stride(1), dq.stride(2),
        stride_docb, *shape_args, **common,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# Autograd and the user-facing functions
# --------------------------------------------------------------------------------------------


def cu_seqlens_to_document_ids(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Cumulative document lengths [0, n_0, n_0 + n_1, ..., T] -> ids (1, T): position t gets the
    index of the document it falls in (FlashAttention's varlen convention for one packed row)."""
    cu = torch.as_tensor(cu_seqlens).reshape(-1).to(torch.int64)
    if cu.numel() < 2 or cu[0] != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {cu.tolist()}")
    T = int(cu[-1]) if total is None else int(total)
    if int(cu[-1]) != T:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but the sequence has {T} positions")
    positions = torch.arange(T, device=cu.device)
    return (torch.searchsorted(cu[1:], positions, right=True))[None]  # (1, T)


def _document_ids(document_ids, cu_seqlens, k):
    if cu_seqlens is None:
        return document_ids
    if document_ids is not None:
        raise ValueError("flash_attention: give document_ids or cu_seqlens, not both")
    if k.shape[0] != 1:
        raise ValueError(f"flash_attention: cu_seqlens describes one packed row, but the batch has {k.shape[0]}")
    return cu_seqlens_to_document_ids(cu_seqlens, k.shape[2]).to(k.device)


def flash_attention_with_lse(q, k, v, *, causal: bool = True, document_ids=None, cu_seqlens=None,
                             scale: float | None = None):
    """Flash attention returning (out (B, H, T_q, D), lse (B, H, T_q) fp32, natural log).

    q: (B, H, T_q, D); k, v: (B, H_kv, T_k, D) with H % H_kv == 0. ``causal`` is bottom-right
    aligned. ``document_ids`` (B, T_k) or ``cu_seqlens`` (one packed row) restrict attention to
    each token's document. ``scale`` defaults to D^-1/2. Differentiable in q, k, v (first order:
    a second backward raises), through the custom ops ``llama_mini::flash_attention_fwd`` and
    ``flash_attention_bwd``, so ``torch.compile`` traces it.
    """
    from .custom_ops import flash_attention_with_lse as op

    document_ids = _document_ids(document_ids, cu_seqlens, k)
    return op(q, k, v, causal=causal, document_ids=document_ids, scale=scale)


def flash_attention(q, k, v, *, causal: bool = True, document_ids=None, cu_seqlens=None,
                    scale: float | None = None) -> torch.Tensor:
    """Flash attention (see :func:`flash_attention_with_lse`); returns out (B, H, T_q, D)."""
    return flash_attention_with_lse(q, k, v, causal=causal, document_ids=document_ids,
                                    cu_seqlens=cu_seqlens, scale=scale)[0]


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/test_flash_attention_aot.py, llama-mini aot)
# --------------------------------------------------------------------------------------------

AOT_HEAD_DIMS = (16, 32, 64, 80, 96, 128)
# Document masking compiles a different kernel (every tile masked, a tile-skip branch); it is
# checked at the head dims models use most, to keep the CI compile budget at a few minutes.
AOT_DOC_HEAD_DIMS = (64, 128)
def _aot_signature(kind: str, dtype: str, has_docs: bool) -> dict[str, str]:
    from .aot import signature

    types = {n: f"*{dtype}" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    types.update(LSE="*fp32", DELTA="*fp32", DOC="*i64" if has_docs else f"*{dtype}", qk_scale="fp32",
                 sm_scale="fp32")
    return signature(_KERNELS[kind], types, ints=("H", "N_REP", "T_Q", "T_K", "BUCKET_Q", "BUCKET_K"))


def aot_specs(arch: int = 90, head_dims=AOT_HEAD_DIMS, doc_head_dims=AOT_DOC_HEAD_DIMS,
              dtypes=(torch.bfloat16,)) -> list:
    """The kernels as they would launch on ``sm_{arch}``: every autotune config of every head
    dim, causal; and with document masking at ``doc_head_dims``; plus the Delta preprocess
    (no matrix products, launched with Triton's default 4 warps and 3 stages)."""
    from .aot import KernelSpec

    specs = []
    for head_dim in head_dims:
        block_d = block_d_for(head_dim)
        for dtype in dtypes:
            sig = _aot_signature("pre", TRITON_DTYPE[dtype], False)
            specs.append(KernelSpec(
                module=__name__, kernel=_KERNEL_NAMES["pre"], signature=sig,
                constexprs=dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=_PREPROCESS_BLOCK_M),
                num_warps=4, num_stages=3, expect_mma=False,
                divisible=tuple(n for n in sig if sig[n].startswith("*")),
                label=f"pre  D={head_dim:<3} {TRITON_DTYPE[dtype]} M{_PREPROCESS_BLOCK_M} w4 s3",
            ))
        tables = {"fwd": fwd_configs(block_d, arch), **bwd_configs(block_d, arch)}
        for dtype in dtypes:
            dt = TRITON_DTYPE[dtype]
            for kind, table in tables.items():
                for cfg in table:
                    for has_docs in (False, True) if head_dim in doc_head_dims else (False,):
                        sig = _aot_signature(kind, dt, has_docs)
                        divisible = [n for n in sig if sig[n].startswith("*")]
                        if head_dim % 16 == 0:  # (B, T, H, D) strides are multiples of D
                            divisible += [n for n in sig if n.startswith("stride_") and n != "stride_docb"]
                        specs.append(KernelSpec(
                            module=__name__, kernel=_KERNEL_NAMES[kind], signature=sig,
                            constexprs=dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=True, HAS_DOCS=has_docs,
                                            PRECISION="tf32", BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n),
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages, divisible=tuple(divisible),
                            label=f"{kind:<4} D={head_dim:<3} {dt} {'docs' if has_docs else 'causal'} "
                                  f"M{cfg.block_m} N{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}",
                        ))
    return specs
