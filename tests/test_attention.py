"""Attention backends: sdpa equals the eager reference (itself checked against a float64
loop in test_reference.py) for every masking mode; the registry falls back visibly."""

from __future__ import annotations

import logging

import pytest
import torch

from llama_mini import kernels
from llama_mini.kernels.common import is_interpreting

from llama_mini import attention_backends, attention_fallbacks, get_attention_backend, register_attention_backend
from llama_mini.attention import eager_attention, sdpa_attention


def _inputs(B, H, Hkv, Tq, Tk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


CASES = [
    # B, H, Hkv, Tq, Tk, causal
    (2, 4, 4, 17, 17, True),  # MHA causal
    (2, 4, 2, 17, 17, True),  # GQA
    (1, 4, 1, 33, 33, True),  # MQA
    (2, 4, 2, 9, 9, False),  # non-causal
    (2, 4, 2, 1, 23, True),  # one decode step against a cache
    (2, 4, 2, 5, 23, True),  # chunked prefill: bottom-right aligned
    (5, 2, 1, 123, 123, True),  # awkward length
]


@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,causal", CASES)
def test_sdpa_equals_eager_forward_and_backward(B, H, Hkv, Tq, Tk, causal):
    D = 16
    q, k, v = _inputs(B, H, Hkv, Tq, Tk, D)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = eager_attention(q64, k64, v64, causal=causal)
    out = sdpa_attention(q, k, v, causal=causal)
    # fp32 against a float64 reference: errors are fp32 rounding (~1e-6) amplified by softmax
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(out)
    (out * dout).sum().backward()
    (ref * dout.double()).sum().backward()
    for name, a, b in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_document_masking_equals_attention_within_each_document():
    torch.manual_seed(0)
    lengths = [1, 7, 16, 3]  # a length-1 document, odd lengths, a longer one
    T = sum(lengths)
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]  # (1, T)
    q, k, v = _inputs(1, 4, 2, T, T, 8)
    for backend in (eager_attention, sdpa_attention):
        out = backend(q, k, v, causal=True, document_ids=doc)
        start = 0
        for n in lengths:
            s = slice(start, start + n)
            alone = eager_attention(q[:, :, s], k[:, :, s], v[:, :, s], causal=True)
            torch.testing.assert_close(out[:, :, s], alone, rtol=1e-5, atol=1e-6)
            start += n


def test_registry_lists_builtins_and_rejects_unknown():
    assert {"eager", "sdpa"} <= set(attention_backends())
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        get_attention_backend("nope")


def test_unavailable_backend_falls_back_to_sdpa_visibly(caplog):
    calls = []

    def fake(q, k, v, **kw):
        calls.append(1)
        return eager_attention(q, k, v, **kw)

    register_attention_backend("test-gpu-only", fake, available=lambda dev: (dev.type == "cuda", "needs CUDA"))
    with caplog.at_level(logging.WARNING, logger="llama_mini.attention"):
        fn = get_attention_backend("test-gpu-only", torch.device("cpu"))
    assert fn is sdpa_attention and not calls
    assert attention_fallbacks()["test-gpu-only@cpu"] == "needs CUDA"
    assert "cannot run on cpu (needs CUDA); using 'sdpa'" in caplog.text


def test_triton_backend_falls_back_to_sdpa_visibly_where_it_cannot_run(caplog, monkeypatch):
    from llama_mini import attention as attention_module
    from llama_mini.attention import triton_attention_available

    monkeypatch.setattr(attention_module, "_FALLBACKS", {})  # each fallback logs once per process

    ok, why = triton_attention_available(torch.device("meta"))
    assert not ok and why
    with caplog.at_level(logging.WARNING, logger="llama_mini.attention"):
        fn = get_attention_backend("triton", torch.device("meta"))
    assert fn is sdpa_attention
    assert "triton@meta" in attention_fallbacks()
    assert "cannot run on meta" in caplog.text


@pytest.mark.skipif(not is_interpreting(), reason="CPU interpreter only")
def test_triton_backend_runs_on_cpu_under_the_interpreter_and_refuses_bf16_visibly(caplog, monkeypatch):
    from llama_mini import attention as attention_module
    from llama_mini.attention import triton_attention

    monkeypatch.setattr(attention_module, "_FALLBACKS", {})
    assert get_attention_backend("triton", torch.device("cpu")) is triton_attention
    q, k, v = _inputs(1, 4, 2, 19, 19, 16)
    torch.testing.assert_close(triton_attention(q, k, v), eager_attention(q, k, v), rtol=1e-5, atol=1e-5)
    with caplog.at_level(logging.WARNING, logger="llama_mini.attention"):
        out = triton_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    assert any("bf16" in why for why in attention_fallbacks().values())
    assert "11584" in caplog.text
    out = triton_attention(q.double(), k.double(), v.double())  # float64: sdpa, visibly
    torch.testing.assert_close(out, eager_attention(q.double(), k.double(), v.double()))
    assert any("float64" in why for why in attention_fallbacks().values())
