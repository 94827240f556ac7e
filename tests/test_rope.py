"""Rotary embeddings: real arithmetic equals Meta's complex formulation; scaling rules match
Hugging Face's implementations of them."""

from __future__ import annotations

import math

import pytest
import torch

from llama_mini.kernels import reference
from llama_mini import ModelArgs, RopeScaling
from llama_mini.rope import (
    RotaryEmbedding,
    apply_rotary_emb,
    apply_rotary_emb_complex,
    precompute_freqs_cis,
    rope_cos_sin,
    rope_frequencies,
)


@pytest.mark.parametrize("head_dim, theta", [(16, 10000.0), (64, 500000.0), (128, 10000.0)])
def test_real_rope_equals_complex_rope(head_dim, theta):
    torch.manual_seed(0)
    B, T, H, Hkv = 2, 37, 4, 2
    xq = torch.randn(B, T, H, head_dim)
    xk = torch.randn(B, T, Hkv, head_dim)
    freqs = rope_frequencies(head_dim, theta)
    cos, sin = rope_cos_sin(torch.arange(T), freqs)
    q_real, k_real = apply_rotary_emb(xq, xk, cos, sin)
    q_cplx, k_cplx = apply_rotary_emb_complex(xq, xk, precompute_freqs_cis(head_dim, T, theta))
    # Both are fp32 computations of the same product; they differ only by fp32 rounding.
    torch.testing.assert_close(q_real, q_cplx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_real, k_cplx, rtol=1e-5, atol=1e-5)


def test_rope_preserves_norms_and_relative_positions():
    torch.manual_seed(0)
    D = 32
    freqs = rope_frequencies(D, 10000.0)
    q = torch.randn(1, 1, 1, D, dtype=torch.float64)
    k = torch.randn(1, 1, 1, D, dtype=torch.float64)

    def rotated(x, p):
        cos, sin = rope_cos_sin(torch.tensor([p]), freqs)
        return apply_rotary_emb(x, x, cos.double(), sin.double())[0]

    torch.testing.assert_close(rotated(q, 17).norm(), q.norm())
    # <R_m q, R_n k> depends only on m - n (fp32 tables: ~1e-6 relative)
    a = (rotated(q, 10) * rotated(k, 3)).sum()
    b = (rotated(q, 27) * rotated(k, 20)).sum()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_position_ids_pick_table_rows():
    """The rope op reads row position_ids[b, t] of the whole tables: a document that restarts at
    position 0 is rotated as if it stood alone, and an offset row as if sliced at its start."""
    args = ModelArgs.preset("debug")
    cos, sin = RotaryEmbedding(args).table(torch.device("cpu"))
    assert cos.shape == (args.max_seq_len, args.head_dim // 2)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, args.n_heads, args.head_dim, generator=g)
    k = torch.randn(2, 5, args.n_kv_heads, args.head_dim, generator=g)
    pos = torch.tensor([[0, 1, 2, 0, 1], [4, 5, 6, 7, 8]])
    qr, kr = reference.apply_rotary_qk(q, k, cos, sin, pos)
    second_doc = reference.apply_rotary_qk(q[:1, 3:], k[:1, 3:], cos, sin)  # rows 0, 1
    torch.testing.assert_close(qr[:1, 3:], second_doc[0])
    torch.testing.assert_close(kr[:1, 3:], second_doc[1])
    offset = reference.apply_rotary_qk(q[1:], k[1:], cos[4:], sin[4:])  # rows 4..8
    torch.testing.assert_close(qr[1:], offset[0])
    torch.testing.assert_close(kr[1:], offset[1])


def _hf_inv_freq(rope_parameters, head_dim, max_pos):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=max_pos,
        rope_parameters=rope_parameters,
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, "cpu")
    return inv_freq.double()


def test_linear_scaling_matches_hugging_face():
    ours = rope_frequencies(64, 10000.0, RopeScaling(type="linear", factor=4.0))
    hf = _hf_inv_freq({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, 64, 2048)
    torch.testing.assert_close(ours, hf, rtol=1e-6, atol=0)  # HF computes in fp32


def test_llama3_scaling_matches_hugging_face():
    s = RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
    ours = rope_frequencies(128, 500000.0, s)
    hf = _hf_inv_freq(
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
        128, 131072,
    )
    torch.testing.assert_close(ours, hf, rtol=1e-6, atol=0)
    base = rope_frequencies(128, 500000.0)
    assert torch.equal(ours[:5], base[:5])  # high frequencies untouched
    torch.testing.assert_close(ours[-1], base[-1] / 8)  # lowest frequency fully scaled


def test_ntk_scaling_changes_the_base():
    D = 64
    ours = rope_frequencies(D, 10000.0, RopeScaling(type="ntk", factor=4.0))
    theta = 10000.0 * 4.0 ** (D / (D - 2))
    expected = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    torch.testing.assert_close(ours, expected)
    assert ours[0] == 1.0 and math.isclose(float(ours[-1]), float(expected[-1]))


@pytest.mark.parametrize("real", [False, True], ids=["complex", "real"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_apply_rotary_against_the_pairwise_formula(dtype, real):
    """Both implementations against the pair rotation written out in float64:
    y[2i] = x[2i] cos a - x[2i+1] sin a,  y[2i+1] = x[2i] sin a + x[2i+1] cos a; forward and
    backward, with shared (T, D/2) and per-sequence (B, T, D/2) angles."""
    from llama_mini.kernels.reference import apply_rotary, apply_rotary_real

    rotate = apply_rotary_real if real else apply_rotary  # the compiled model's form, and the eager one
    torch.manual_seed(0)
    B, T, H, D = 2, 7, 3, 10
    x = torch.randn(B, T, H, D, dtype=torch.float64)
    for angles in (torch.randn(T, D // 2, dtype=torch.float64), torch.randn(B, T, D // 2, dtype=torch.float64)):
        a = angles[None, :, None, :] if angles.dim() == 2 else angles[:, :, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        expected = torch.empty_like(x)
        expected[..., 0::2] = x0 * a.cos() - x1 * a.sin()
        expected[..., 1::2] = x0 * a.sin() + x1 * a.cos()
        xi = x.to(dtype).detach().clone().requires_grad_()
        y = rotate(xi, angles.cos(), angles.sin())
        assert y.dtype == dtype
        # fp16 inputs are rotated in fp32 and rounded once on the way out (2^-11 relative)
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol * 4)
        # backward is the inverse rotation of the upstream gradient
        g = torch.randn_like(x)
        y.backward(g.to(dtype))
        ga = -a
        g0, g1 = g[..., 0::2], g[..., 1::2]
        expected_grad = torch.empty_like(g)
        expected_grad[..., 0::2] = g0 * ga.cos() - g1 * ga.sin()
        expected_grad[..., 1::2] = g0 * ga.sin() + g1 * ga.cos()
        torch.testing.assert_close(xi.grad.double(), expected_grad, rtol=tol, atol=tol * 4)
