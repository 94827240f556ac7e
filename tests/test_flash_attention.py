"""The Triton flash attention kernel against a float64 reference, forward and backward.

Runs under ``TRITON_INTERPRET=1`` on CPU (fp32 and fp16, small shapes; the interpreter tiles
with 16 x 16 blocks, so lengths such as 37 cross ragged tile edges) and on a CUDA GPU with the
compiled, autotuned kernels (adds bf16, which the interpreter cannot run: triton issue 11584).

Every launch allocates its outputs (out, lse, delta, dq, dk, dv) poisoned with NaN, so an
element the kernel forgets to write fails the comparison instead of passing as a stale zero.

Tolerances
----------
fp32: the kernel computes in fp32 what the reference computes in float64. Each output element
is a sum over at most a few hundred products of O(1) values, so fp32 rounding leaves errors of
a few 1e-7 (measured: at most 1.1e-6 over these cases); 1e-5 absolute and relative leaves a 10x
margin and still fails on any real mistake (a wrong mask, scale or Delta moves values by >1e-2).
fp16 / bf16: the flash-attention project's rule. The error of the kernel against the float64
reference must be at most twice the error of PyTorch computing the same attention in the same
low precision (scores, softmax and products in that dtype), plus 1e-6 for the case where
PyTorch happens to be exact.
"""

from __future__ import annotations

import pytest
import torch

from llama_mini import kernels
from llama_mini.kernels import reference
from llama_mini.kernels.common import is_interpreting

from conftest import check_kernel_result as check

pytestmark = pytest.mark.skipif(not kernels.triton_available(), reason=kernels.triton_unavailable_reason())

if kernels.triton_available():
    from llama_mini.kernels.common import poisoned_outputs
    from llama_mini.kernels.flash_attention import (
        INTERPRETER_BLOCK,
        cu_seqlens_to_document_ids,
        flash_attention,
        flash_attention_with_lse,
    )

DEVICE = "cuda" if torch.cuda.is_available() and not is_interpreting() else "cpu"
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _inputs(B, H, Hkv, Tq, Tk, D, dtype, seed, layout="bhtd"):
    """Fresh random q, k, v (leaf tensors). layout "bthd" gives the model's transposed views."""
    g = torch.Generator().manual_seed(seed)

    def make(h, t):
        if layout == "bthd":
            x = torch.randn(B, t, h, D, generator=g).to(DEVICE, dtype).transpose(1, 2)
        else:
            x = torch.randn(B, h, t, D, generator=g).to(DEVICE, dtype)
        return x.requires_grad_()

    return make(H, Tq), make(Hkv, Tk), make(Hkv, Tk)


def _reference(q, k, v, causal, document_ids, scale=None):
    """float64 out, lse and grads (with the given dout) from kernels.reference."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference.attention(q64, k64, v64, causal=causal, document_ids=document_ids, scale=scale)
    D = q.shape[-1]
    scores = q64 @ reference.repeat_kv(k64, q.shape[1] // k.shape[1]).transpose(-1, -2)
    scores = scores * (D**-0.5 if scale is None else scale)
    mask = reference.attention_mask(q.shape[2], k.shape[2], causal=causal, document_ids=document_ids,
                                    device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores.detach(), dim=-1)
    return out, lse, (q64, k64, v64)


def _same_dtype_pytorch(q, k, v, causal, document_ids, dout):
    """Attention computed by PyTorch entirely in q's dtype: the baseline error of that dtype."""
    q1, k1, v1 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    n_rep = q.shape[1] // k.shape[1]
    s = (q1 @ reference.repeat_kv(k1, n_rep).transpose(-1, -2)) * q.shape[-1] ** -0.5
    mask = reference.attention_mask(q.shape[2], k.shape[2], causal=causal, document_ids=document_ids,
                                    device=q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mask is not None:
        p = p.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    out = p @ reference.repeat_kv(v1, n_rep)
    out.backward(dout)
    return out.detach(), q1.grad, k1.grad, v1.grad




def _run_and_compare(q, k, v, causal, document_ids=None, dtype=torch.float32, seed=0):
    with poisoned_outputs():
        out, lse = flash_attention_with_lse(q, k, v, causal=causal, document_ids=document_ids)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, out.dtype)
        out.backward(dout)
    ref, ref_lse, (q64, k64, v64) = _reference(q, k, v, causal, document_ids)
    ref.backward(dout.double())
    baseline = [None] * 4
    if dtype != torch.float32:
        baseline = _same_dtype_pytorch(q, k, v, causal, document_ids, dout)
    check("out", out, ref, dtype, baseline[0])
    # lse: -inf exactly where a row sees no key, fp32-accurate elsewhere (it is kept in fp32)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse: -inf rows differ"
    finite = torch.isfinite(ref_lse)
    # lse is computed in fp32 from the same (low-precision) inputs the reference upcasts
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-5, atol=1e-5)
    for name, got, want, base in (("dq", q.grad, q64.grad, baseline[1]), ("dk", k.grad, k64.grad, baseline[2]),
                                  ("dv", v.grad, v64.grad, baseline[3])):
        check(name, got, want, dtype, base)
    return out


CASES = [
    # B, H, Hkv, Tq, Tk, D, causal
    (1, 2, 2, 16, 16, 16, True),  # exactly one tile
    (2, 4, 4, 37, 37, 32, True),  # ragged last tile
    (2, 4, 4, 37, 37, 32, False),
    (2, 4, 2, 33, 33, 64, True),  # grouped-query
    (1, 4, 1, 50, 50, 16, True),  # multi-query
    (1, 4, 1, 50, 50, 16, False),
    (2, 2, 1, 1, 45, 32, True),  # one decode step against a cache
    (1, 4, 2, 7, 40, 80, True),  # chunked prefill (bottom-right causal), head dim 80 padded to 128
    (1, 2, 2, 40, 23, 96, True),  # more queries than keys: the first 17 rows see nothing
    (1, 2, 1, 23, 40, 24, False),  # T_q < T_k, head dim 24 padded to 32
    (1, 2, 2, 20, 20, 128, True),
    (5, 1, 1, 123, 123, 16, True),  # the design notes' awkward 5 x 123 x 123
    # causal offsets T_k - T_q that put the diagonal one or two keys off a tile edge, where
    # an off-by-one in the loop bounds or the masked / mask-free split shows
    (1, 2, 2, 32, 33, 16, True),  # offset 1
    (1, 2, 2, 17, 34, 16, True),  # offset 17 = 16 + 1
    (1, 2, 2, 18, 32, 16, True),  # offset 14
    (1, 2, 2, 40, 25, 16, True),  # offset -15
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,causal", CASES)
def test_matches_float64_reference(B, H, Hkv, Tq, Tk, D, causal, dtype):
    seed = hash((B, H, Hkv, Tq, Tk, D, causal)) % 10_000
    q, k, v = _inputs(B, H, Hkv, Tq, Tk, D, dtype, seed)
    _run_and_compare(q, k, v, causal, dtype=dtype, seed=seed)


def _doc_ids(rows):
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]) for lengths in rows]).to(DEVICE)


DOC_ROWS = [
    [1, 7, 20, 3, 9],  # a length-1 document, odd lengths, one longer than a tile
    [17, 1, 1, 21],  # different boundaries in the second row
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (2, 1)])
def test_document_masking_matches_reference(H, Hkv, causal, dtype):
    doc = _doc_ids(DOC_ROWS)  # (2, 40)
    q, k, v = _inputs(2, H, Hkv, 40, 40, 32, dtype, seed=H * 10 + Hkv + causal)
    _run_and_compare(q, k, v, causal, document_ids=doc, dtype=dtype)


def test_document_masking_with_a_kv_cache_prefix():
    """Chunked prefill of a packed row: the last 13 of 40 positions query the whole row."""
    doc = _doc_ids(DOC_ROWS)
    q, k, v = _inputs(2, 4, 2, 13, 40, 16, torch.float32, seed=3)
    _run_and_compare(q, k, v, True, document_ids=doc)


def test_each_document_equals_attention_on_that_document_alone():
    lengths = [1, 7, 20, 3, 9]
    doc = _doc_ids([lengths])
    q, k, v = _inputs(1, 2, 1, 40, 40, 16, torch.float32, seed=5)
    with torch.no_grad():
        out = flash_attention(q, k, v, causal=True, document_ids=doc)
        start = 0
        for n in lengths:
            s = slice(start, start + n)
            alone = flash_attention(q[:, :, s], k[:, :, s], v[:, :, s], causal=True)
            torch.testing.assert_close(out[:, :, s], alone, rtol=1e-6, atol=1e-6)
            start += n


def test_model_layout_views_are_read_in_place_and_output_is_bthd():
    """The model passes (B, T, H, D) tensors transposed to (B, H, T, D); no copy is needed and
    the output's transpose back to (B, T, H, D) is contiguous."""
    q, k, v = _inputs(2, 4, 2, 21, 21, 32, torch.float32, seed=7, layout="bthd")
    assert not q.is_contiguous()
    out = _run_and_compare(q, k, v, True)
    assert out.transpose(1, 2).is_contiguous()


def test_inputs_without_a_contiguous_last_dim_are_copied_not_misread():
    """q, k, v and dout whose last dim is strided (e.g. a transpose of (B, H, D, T))."""
    g = torch.Generator().manual_seed(19)

    def strided(*shape):
        B, H, T, D = shape
        return torch.randn(B, H, D, T, generator=g).to(DEVICE).transpose(-1, -2).requires_grad_()

    q, k, v = strided(1, 4, 21, 16), strided(1, 2, 21, 16), strided(1, 2, 21, 16)
    assert q.stride(-1) != 1
    out = flash_attention(q, k, v)
    dout = torch.randn(1, 4, 16, 21, generator=g).to(DEVICE).transpose(-1, -2)
    out.backward(dout)
    ref, _, (q64, k64, v64) = _reference(q, k, v, True, None)
    ref.backward(dout.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEVICE != "cpu", reason="sets the interpreter's tiles")
@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)], ids=["M16-N32", "M32-N16"])
@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,causal,docs", [
    (2, 4, 2, 37, 37, 32, True, False),  # ragged, GQA
    (1, 2, 2, 40, 23, 16, True, False),  # empty rows
    (1, 4, 2, 7, 40, 16, True, False),  # chunked prefill
    (1, 2, 2, 18, 50, 16, True, False),  # diagonal off a tile edge
    (2, 4, 2, 40, 40, 16, False, False),
    (2, 4, 1, 40, 40, 16, True, True),  # documents
])
def test_non_square_tiles(B, H, Hkv, Tq, Tk, D, causal, docs, tiles, monkeypatch):
    """Every GPU configuration has BLOCK_M != BLOCK_N; a mix-up of the two in loop bounds or
    mask splits is invisible with square tiles, so the interpreter runs both orientations."""
    import llama_mini.kernels.flash_attention as fa

    monkeypatch.setattr(fa, "INTERPRETER_TILES", tiles)
    q, k, v = _inputs(B, H, Hkv, Tq, Tk, D, torch.float32, seed=Tq * Tk + D)
    _run_and_compare(q, k, v, causal, document_ids=_doc_ids(DOC_ROWS) if docs else None)


def test_cu_seqlens_equal_document_ids():
    cu = torch.tensor([0, 1, 8, 28, 31, 40])
    ids = cu_seqlens_to_document_ids(cu)
    assert ids.tolist() == _doc_ids([[1, 7, 20, 3, 9]]).cpu().tolist()
    q, k, v = _inputs(1, 2, 2, 40, 40, 16, torch.float32, seed=9)
    with torch.no_grad():
        a = flash_attention(q, k, v, cu_seqlens=cu.to(DEVICE))
        b = flash_attention(q, k, v, document_ids=ids.to(DEVICE))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="start at 0"):
        cu_seqlens_to_document_ids(torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="ends at 39"):
        cu_seqlens_to_document_ids(torch.tensor([0, 39]), total=40)


def test_backward_is_deterministic():
    """No atomics: the same inputs give bit-identical gradients. (Only a GPU, where programs
    run concurrently, could break this; the interpreter runs them one after another.)"""
    q, k, v = _inputs(1, 4, 1, 45, 45, 32, torch.float32, seed=11)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        flash_attention(q, k, v).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.skipif(DEVICE != "cpu", reason="relies on the interpreter's fixed 16 x 16 tiling")
def test_tiles_above_the_diagonal_are_skipped_not_masked():
    """Keys 16..31 hold NaN. Query tile 0 (rows 0..15) must never load them: a masked-but-
    computed tile would turn 0 * NaN into NaN in its output and gradients."""
    T = 2 * INTERPRETER_BLOCK
    q, k, v = _inputs(1, 2, 2, T, T, 16, torch.float32, seed=13)
    with torch.no_grad():
        k[:, :, INTERPRETER_BLOCK:] = float("nan")
        v[:, :, INTERPRETER_BLOCK:] = float("nan")
    out = flash_attention(q, k, v, causal=True)
    first = slice(0, INTERPRETER_BLOCK)
    assert torch.isfinite(out[:, :, first]).all()
    ref = reference.attention(q[:, :, first].double(), k[:, :, first].double(), v[:, :, first].double())
    torch.testing.assert_close(out[:, :, first].double(), ref, rtol=1e-5, atol=1e-5)
    # Backward: only rows of tile 0 get a gradient, so dQ of tile 0 must stay finite.
    dout = torch.zeros_like(out)
    dout[:, :, first] = 1.0
    out.backward(dout)
    assert torch.isfinite(q.grad[:, :, first]).all()


@pytest.mark.skipif(DEVICE != "cpu", reason="relies on the interpreter's fixed 16 x 16 tiling")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_tiles_across_a_document_boundary_are_skipped(causal):
    """Two documents aligned to tiles; the second one's keys and values are NaN. Every tile
    pairing the first document's queries with the second's keys must be skipped."""
    n = INTERPRETER_BLOCK
    doc = _doc_ids([[n, n]])
    q, k, v = _inputs(1, 2, 1, 2 * n, 2 * n, 16, torch.float32, seed=17)
    with torch.no_grad():
        k[:, :, n:] = float("nan")
        v[:, :, n:] = float("nan")
    out = flash_attention(q, k, v, causal=causal, document_ids=doc)
    assert torch.isfinite(out[:, :, :n]).all()
    ref = reference.attention(q[:, :, :n].double(), k[:, :, :n].double(), v[:, :, :n].double(), causal=causal)
    torch.testing.assert_close(out[:, :, :n].double(), ref, rtol=1e-5, atol=1e-5)
    dout = torch.zeros_like(out)
    dout[:, :, :n] = 1.0
    out.backward(dout)
    for t in (q, k, v):
        assert torch.isfinite(t.grad[:, :, :n]).all()


@pytest.mark.parametrize(
    "shapes, kwargs, message",
    [
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16)), {}, "same shape"),
        (((1, 3, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {}, "multiple of key/value heads 2"),
        (((1, 2, 8, 16), (2, 2, 8, 16), (2, 2, 8, 16)), {}, "batch or head dim"),
        (((1, 2, 8, 300), (1, 2, 8, 300), (1, 2, 8, 300)), {}, "head dim 300"),
        (((1, 2, 8), (1, 2, 8, 16), (1, 2, 8, 16)), {}, "q must be a 4-D"),
        (((1, 2, 9, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"document_ids": torch.zeros(1, 8, dtype=torch.long)},
         r"T_q \(9\) must not exceed T_k \(8\)"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"document_ids": torch.zeros(1, 7, dtype=torch.long)},
         "document_ids must be"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"document_ids": torch.zeros(1, 8)}, "document_ids must be"),
    ],
)
def test_bad_inputs_name_the_argument(shapes, kwargs, message):
    q, k, v = (torch.zeros(s, device=DEVICE) for s in shapes)
    kwargs = {key: val.to(DEVICE) for key, val in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, **kwargs)


def test_mixed_dtypes_are_rejected():
    q = torch.zeros(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="share one dtype"):
        flash_attention(q, q.half(), q)


def test_backward_launcher_checks_what_it_is_given():
    from llama_mini.kernels.flash_attention import attention_backward, attention_forward

    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    o, lse = attention_forward(q, q, q)
    with pytest.raises(ValueError, match=r"lse must have shape \(1, 2, 8\)"):
        attention_backward(o, q, q, q, o, lse[:, :, :4])
    with pytest.raises(ValueError, match="lse must be float32"):
        attention_backward(o, q, q, q, o, lse.double())
    with pytest.raises(ValueError, match=r"do must have shape \(1, 2, 8, 16\)"):
        attention_backward(o[:, :1], q, q, q, o, lse)


def test_double_backward_is_refused():
    q, k, v = _inputs(1, 2, 2, 8, 8, 16, torch.float32, seed=23)
    (gq,) = torch.autograd.grad(flash_attention(q, k, v).sum(), q, create_graph=True)
    # the first-order gradient carries no graph, so a second backward fails loudly instead of
    # silently dropping second-order terms
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        gq.sum().backward()


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter only")
def test_bf16_under_the_interpreter_is_refused_with_the_reason():
    q = torch.zeros(1, 2, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="11584"):
        flash_attention(q, q, q)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels: run with TRITON_INTERPRET=0 on a CUDA machine")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,causal,docs", [
    (2, 8, 2, 1000, 1000, 128, True, False),  # autotuned tiles, ragged end
    (2, 8, 8, 513, 513, 64, False, False),
    (1, 8, 1, 200, 1031, 80, True, False),  # chunked prefill, padded head dim
    (2, 4, 2, 700, 700, 96, True, True),
    (1, 4, 4, 2048, 2048, 128, True, False),
])
def test_gpu_low_precision_within_twice_pytorch_error(B, H, Hkv, Tq, Tk, D, causal, docs, dtype):
    q, k, v = _inputs(B, H, Hkv, Tq, Tk, D, dtype, seed=Tq + D)
    doc = None
    if docs:
        g = torch.Generator().manual_seed(0)
        cuts = torch.sort(torch.randint(1, Tk, (B, 6), generator=g), dim=1).values
        doc = (torch.arange(Tk)[None, :, None] >= cuts[:, None, :]).sum(-1).to(DEVICE)
    _run_and_compare(q, k, v, causal, document_ids=doc, dtype=dtype)
