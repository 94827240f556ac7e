"""kernels.reference: each op against a direct float64 computation of its defining formula."""

from __future__ import annotations

import math

import pytest
import torch

from llama_mini.kernels import reference


def test_rms_norm_matches_formula_in_float64():
    torch.manual_seed(0)
    x = torch.randn(5, 123, 96) * 3 + 1
    w = torch.randn(96)
    y = reference.rms_norm(x, w, 1e-6)
    x64, w64 = x.double(), w.double()
    expected = x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-6) * w64
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)  # fp32 rounding only


def test_rms_norm_low_precision_normalises_in_fp32():
    torch.manual_seed(0)
    x = torch.randn(4, 33, 64, dtype=torch.bfloat16) * 100
    w = torch.ones(64, dtype=torch.bfloat16)
    y = reference.rms_norm(x, w, 1e-5)
    assert y.dtype == torch.bfloat16
    rms = y.float().pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-2, atol=1e-2)  # bf16 output rounding


def test_rms_norm_low_precision_follows_metas_rounding_order():
    torch.manual_seed(0)
    x = torch.randn(3, 17, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.bfloat16)
    # Meta: self._norm(x.float()).type_as(x) * self.weight: round to bf16, then scale in bf16
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * w
    assert torch.equal(reference.rms_norm(x, w, 1e-5), expected)


def test_swiglu():
    a, b = torch.randn(7, 13, dtype=torch.float64), torch.randn(7, 13, dtype=torch.float64)
    torch.testing.assert_close(reference.swiglu(a, b), a / (1 + torch.exp(-a)) * b)


def test_repeat_kv_groups_heads_contiguously():
    x = torch.arange(2 * 3 * 1 * 1).reshape(2, 3, 1, 1)
    y = reference.repeat_kv(x, 2)
    assert y[:, :, 0, 0].tolist() == [[0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5]]


def test_causal_mask_is_bottom_right_aligned():
    m = reference.attention_mask(2, 5, causal=True)[0, 0]
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    m = reference.attention_mask(3, 3, causal=True)[0, 0]
    assert m.tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_document_mask_is_block_diagonal_and_causal():
    doc = torch.tensor([[0, 0, 1, 1, 1, 2]])
    m = reference.attention_mask(6, 6, causal=True, document_ids=doc)[0, 0].int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ])
    assert torch.equal(m, expected)
    # two decode-time queries (the last two keys) against all six keys: the last rows above
    tail = reference.attention_mask(2, 6, causal=True, document_ids=doc)[0, 0].int()
    assert torch.equal(tail, expected[4:])
    with pytest.raises(ValueError, match=r"document_ids must have shape \(B, T_k=6\)"):
        reference.attention_mask(6, 6, causal=True, document_ids=doc[:, :5])


def test_attention_matches_loop_over_queries_in_float64():
    torch.manual_seed(0)
    B, H, Hkv, Tq, Tk, D = 2, 4, 2, 3, 7, 8
    q = torch.randn(B, H, Tq, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, Tk, D, dtype=torch.float64)
    v = torch.randn(B, Hkv, Tk, D, dtype=torch.float64)
    out = reference.attention(q, k, v, causal=True)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            for i in range(Tq):
                visible = i + (Tk - Tq) + 1
                s = torch.tensor([q[b, h, i] @ k[b, kv, j] / math.sqrt(D) for j in range(visible)])
                p = torch.softmax(s, 0)
                expected = sum(p[j] * v[b, kv, j] for j in range(visible))
                torch.testing.assert_close(out[b, h, i], expected)


def test_attention_row_with_no_visible_key_is_zero():
    q = torch.randn(1, 1, 4, 8)
    k = torch.randn(1, 1, 2, 8)
    out = reference.attention(q, k, k, causal=True)  # T_q > T_k: first 2 rows see nothing
    assert torch.equal(out[0, 0, :2], torch.zeros(2, 8))
    assert torch.isfinite(out).all()


def test_cross_entropy_ignores_and_means_over_counted():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 1] = targets[1, 4] = -100
    loss = reference.cross_entropy(logits, targets)
    terms = [
        torch.logsumexp(logits[b, t], 0) - logits[b, t, targets[b, t]]
        for b in range(2) for t in range(5) if targets[b, t] != -100
    ]
    torch.testing.assert_close(loss.double(), torch.stack(terms).mean(), rtol=1e-6, atol=1e-6)  # fp32 compute
    nothing = torch.full((2, 5), -100)
    assert reference.cross_entropy(logits, nothing).item() == 0.0
