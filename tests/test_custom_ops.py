"""The Triton kernels as PyTorch custom operators (``llama_mini.kernels.custom_ops``).

For every op: ``torch.library.opcheck`` (schema and declared mutation, autograd registration,
fake implementation against the real op including output strides, and an AOT-dispatch trace
with dynamic shapes), then forward and every gradient through the op against the plain-PyTorch
reference evaluated in float64, and the FLOP formulas against PyTorch's own counts.

Tolerances: the kernels compute in fp32 (fp32 products are exact under the interpreter), so
against float64 the error is fp32 rounding accumulated over a few dozen terms: 1e-5 relative
with an absolute floor of 1e-5 (1e-6 for elementwise ops). Shapes are small and ragged (19 rows
against 16-wide tiles, 40 columns against 32/64-wide blocks) so every kernel crosses a tile edge.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llama_mini import ops
from llama_mini.kernels import custom_ops, reference
from llama_mini.kernels.common import is_interpreting

DEVICE = torch.device("cpu" if is_interpreting() or not torch.cuda.is_available() else "cuda")
pytestmark = pytest.mark.skipif(not ops.triton_runs_on(DEVICE)[0], reason=ops.triton_runs_on(DEVICE)[1])

LM = torch.ops.llama_mini


def _randn(*shape, seed=0, grad=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g) * scale).to(DEVICE)
    return t.requires_grad_(grad)


def _opcheck(op, args, kwargs=None):
    # Raises with the failing sub-test's name; every sub-test must pass.
    torch.library.opcheck(op, args, kwargs or {}, raise_exception=True)


def _grads_close(got, want, rtol=1e-5, atol=1e-5):
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol)


def _f64(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


# --------------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------------


def _attention_inputs(B=2, H=4, Hkv=2, Tq=19, Tk=19, D=16, grad=False):
    return (_randn(B, H, Tq, D, seed=1, grad=grad), _randn(B, Hkv, Tk, D, seed=2, grad=grad),
            _randn(B, Hkv, Tk, D, seed=3, grad=grad))


def _documents(B, T):
    ids = torch.zeros(B, T, dtype=torch.int64)
    ids[0, 7:] = 1
    ids[0, 15:] = 2
    ids[-1, 11:] = 1
    return ids.to(DEVICE)


@pytest.mark.parametrize("causal,Tq,docs", [(True, 19, False), (False, 9, False), (True, 19, True)],
                         ids=["causal", "cross-Tq<Tk", "documents"])
def test_opcheck_flash_attention_forward(causal, Tq, docs):
    q, k, v = _attention_inputs(Tq=Tq, Tk=19, grad=True)
    _opcheck(LM.flash_attention_fwd, (q, k, v, _documents(2, 19) if docs else None, causal, 0.3))


def test_opcheck_flash_attention_backward():
    q, k, v = _attention_inputs()
    doc = _documents(2, 19)
    out, lse = LM.flash_attention_fwd(q, k, v, doc, True, 0.25)
    _opcheck(LM.flash_attention_bwd, (_randn(*out.shape, seed=9), q, k, v, out, lse, doc, True, 0.25))


def test_opcheck_norms():
    x, r = _randn(3, 5, 40, seed=1, grad=True), _randn(3, 5, 40, seed=2, grad=True)
    w = _randn(40, seed=3, grad=True)
    _opcheck(LM.rms_norm_fwd, (x, w, 1e-5))
    _opcheck(LM.add_rms_norm_fwd, (x, r, w, 1e-5))
    y, rstd = LM.rms_norm_fwd(x.detach(), w.detach(), 1e-5)
    _opcheck(LM.rms_norm_bwd, (_randn(3, 5, 40, seed=4), x.detach(), w.detach(), rstd, None))
    _opcheck(LM.rms_norm_bwd, (_randn(3, 5, 40, seed=4), x.detach(), w.detach(), rstd, _randn(3, 5, 40, seed=5)))


@pytest.mark.parametrize("with_positions", [False, True])
def test_opcheck_rotary(with_positions):
    q, k = _randn(2, 7, 3, 16, seed=1, grad=True), _randn(2, 7, 1, 16, seed=2, grad=True)
    angles = torch.arange(12.0)[:, None] * torch.rand(8, generator=torch.Generator().manual_seed(0))[None]
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [5, 6, 7, 8, 9, 10, 11]]).to(DEVICE) if with_positions else None
    _opcheck(LM.rotary, (q, k, cos, sin, pos, False))


def test_opcheck_swiglu():
    a, b = _randn(3, 5, 70, seed=1, grad=True), _randn(3, 5, 70, seed=2, grad=True)
    _opcheck(LM.swiglu_fwd, (a, b))
    _opcheck(LM.swiglu_bwd, (_randn(3, 5, 70, seed=3), a.detach(), b.detach()))


def _targets(shape, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, V, shape, generator=g)
    t.view(-1)[::4] = -100
    return t.to(DEVICE)


# With gradients, the losses' forward ops return the unscaled gradient buffers, which their
# backward then scales in place (``scale_gradient``): one (N, V) buffer, never two. opcheck's
# test_aot_dispatch_dynamic returns every output of the op from the traced function, and a
# user-visible output that the backward mutates is something AOTAutograd cannot represent (its
# partitioner stops with "Node ... was invalid, but is output"). The model never returns those
# buffers (the wrappers return the loss alone), so that sub-test runs here without gradients,
# and the traced forward + backward through the wrapper, where the buffers stay internal, is
# checked against eager by _compiled_matches_eager (and in test_compile.py for the model).
_NO_AOT = ("test_schema", "test_autograd_registration", "test_faketensor")


def _compiled_matches_eager(fn, *inputs):
    """fn(*inputs) and its gradients under torch.compile(aot_eager, dynamic shapes, one graph)
    equal eager's: the AOT dispatch check for ops whose gradient buffers are internal."""
    leaves = [t for t in inputs if t.requires_grad]
    eager = fn(*inputs)
    want = torch.autograd.grad(eager, leaves)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)(*inputs)
    got = torch.autograd.grad(compiled, leaves)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_opcheck_cross_entropy():
    logits = _randn(3, 7, 100, seed=1, grad=True, scale=3.0)
    targets = _targets((3, 7), 100)
    torch.library.opcheck(LM.cross_entropy_fwd, (logits, targets, -100, "mean", True), test_utils=_NO_AOT,
                          raise_exception=True)
    _opcheck(LM.cross_entropy_fwd, (logits.detach(), targets, -100, "sum", False))
    _compiled_matches_eager(lambda z, t: custom_ops.cross_entropy(z, t, -100) * 0.5, logits, targets)


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=["dx+dw", "dx", "dw"])
def test_opcheck_linear_cross_entropy(need):
    need_dx, need_dw = need
    x = _randn(3, 7, 24, seed=1, grad=need_dx)
    w = _randn(50, 24, seed=2, grad=need_dw, scale=0.3)
    targets = _targets((3, 7), 50)
    torch.library.opcheck(LM.linear_cross_entropy_fwd, (x, w, targets, -100, "mean", 8, need_dx, need_dw),
                          test_utils=_NO_AOT, raise_exception=True)
    _opcheck(LM.linear_cross_entropy_fwd, (x.detach(), w.detach(), targets, -100, "sum", 8, False, False))
    _compiled_matches_eager(lambda a, b, t: custom_ops.linear_cross_entropy(a, b, t, -100, "mean", 8) * 2.0,
                            x, w, targets)


def test_opcheck_scale_gradient():
    """The one mutating op: test_schema checks it mutates exactly what it declares."""
    _opcheck(LM.scale_gradient, (_randn(5, 33, seed=1), torch.tensor(0.375, device=DEVICE)))


# --------------------------------------------------------------------------------------------
# Forward and backward against float64
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,causal,docs", [
    (2, 4, 2, 19, 19, 16, True, False),
    (1, 3, 1, 5, 37, 24, True, False),     # KV-cache shape: bottom-right causal, D padded to 32
    (2, 2, 2, 33, 33, 8, True, True),      # packed documents
    (2, 4, 4, 17, 23, 16, False, False),
], ids=["gqa", "mqa-cache", "documents", "cross"])
def test_flash_attention_op_matches_float64_reference(B, H, Hkv, Tq, Tk, D, causal, docs):
    q, k, v = _attention_inputs(B, H, Hkv, Tq, Tk, D, grad=True)
    doc = _documents(B, Tk) if docs else None
    out = custom_ops.flash_attention(q, k, v, causal=causal, document_ids=doc, scale=0.3)
    # The kernel's layout: a (B, T_q, H, D) buffer seen as (B, H, T_q, D), as the fake says.
    assert out.transpose(1, 2).is_contiguous()
    dout = _randn(*out.shape, seed=7)
    out.backward(dout)
    q64, k64, v64 = _f64(q, k, v)
    ref = reference.attention(q64, k64, v64, causal=causal, document_ids=doc, scale=0.3)
    ref.backward(dout.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    _grads_close((q.grad, k.grad, v.grad), (q64.grad, k64.grad, v64.grad))


def test_norm_ops_match_float64_reference():
    x, r = _randn(3, 7, 40, seed=1, grad=True), _randn(3, 7, 40, seed=2, grad=True)
    w = _randn(40, seed=3, grad=True)
    dy, dh = _randn(3, 7, 40, seed=4), _randn(3, 7, 40, seed=5)
    y = custom_ops.rms_norm(x, w, 1e-5)
    y.backward(dy)
    x64, r64, w64 = _f64(x, r, w)
    y64 = reference.rms_norm(x64, w64, 1e-5)
    y64.backward(dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-6)
    _grads_close((x.grad, w.grad), (x64.grad, w64.grad))

    for t in (x, w, x64, w64):
        t.grad = None
    y, h = custom_ops.add_rms_norm(x, r, w, 1e-5)
    torch.autograd.backward((y, h), (dy, dh))
    y64, h64 = reference.add_rms_norm(x64, r64, w64, 1e-5)
    torch.autograd.backward((y64, h64), (dy.double(), dh.double()))
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.double(), h64, rtol=1e-6, atol=1e-6)
    _grads_close((x.grad, r.grad, w.grad), (x64.grad, r64.grad, w64.grad))


def test_add_rms_norm_op_with_only_the_residual_used():
    """Only h flows on: the norm adds nothing, both inputs get dh (the None-gradient branch)."""
    x, r, w = _randn(2, 5, 24, seed=1, grad=True), _randn(2, 5, 24, seed=2, grad=True), _randn(24, seed=3, grad=True)
    _, h = custom_ops.add_rms_norm(x, r, w, 1e-5)
    dh = _randn(2, 5, 24, seed=4)
    h.backward(dh)
    assert torch.equal(x.grad, dh) and torch.equal(r.grad, dh) and w.grad is None


def test_rotary_op_matches_float64_reference():
    q, k = _randn(2, 9, 3, 16, seed=1, grad=True), _randn(2, 9, 1, 16, seed=2, grad=True)
    angles = torch.arange(20.0)[:, None] * (10000.0 ** (-torch.arange(8.0) / 8))[None]
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], list(range(11, 20))]).to(DEVICE)
    qo, ko = custom_ops.apply_rotary(q, k, cos, sin, pos)
    dq, dk = _randn(*qo.shape, seed=3), _randn(*ko.shape, seed=4)
    torch.autograd.backward((qo, ko), (dq, dk))
    q64, k64 = _f64(q, k)
    qr, kr = reference.apply_rotary_qk(q64, k64, cos.double(), sin.double(), pos)
    torch.autograd.backward((qr, kr), (dq.double(), dk.double()))
    torch.testing.assert_close(qo.double(), qr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ko.double(), kr, rtol=1e-5, atol=1e-6)
    _grads_close((q.grad, k.grad), (q64.grad, k64.grad), atol=1e-6)


def test_swiglu_op_matches_float64_reference():
    a, b = _randn(3, 5, 70, seed=1, grad=True, scale=4.0), _randn(3, 5, 70, seed=2, grad=True)
    y = custom_ops.swiglu(a, b)
    dy = _randn(3, 5, 70, seed=3)
    y.backward(dy)
    a64, b64 = _f64(a, b)
    reference.swiglu(a64, b64).backward(dy.double())
    torch.testing.assert_close(y.double(), reference.swiglu(a64, b64).detach(), rtol=1e-5, atol=1e-6)
    _grads_close((a.grad, b.grad), (a64.grad, b64.grad), atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_op_matches_float64_reference(reduction):
    logits = _randn(3, 7, 100, seed=1, grad=True, scale=3.0)
    targets = _targets((3, 7), 100)
    loss = custom_ops.cross_entropy(logits, targets, -100, reduction)
    (loss * 0.7).backward()
    (l64,) = _f64(logits)
    ref = reference.cross_entropy(l64, targets, -100, reduction)
    (ref * 0.7).backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    _grads_close((logits.grad,), (l64.grad,), atol=1e-7)


def test_cross_entropy_op_refuses_a_second_backward():
    logits = _randn(4, 30, seed=1, grad=True)
    loss = custom_ops.cross_entropy(logits, _targets((4,), 30))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("reduction,chunk", [("mean", 8), ("sum", None)])
def test_linear_cross_entropy_op_matches_float64_reference(reduction, chunk):
    x = _randn(3, 7, 24, seed=1, grad=True)
    w = _randn(50, 24, seed=2, grad=True, scale=0.3)
    targets = _targets((3, 7), 50)
    loss = custom_ops.linear_cross_entropy(x, w, targets, -100, reduction, chunk)
    (loss * 1.5).backward()
    x64, w64 = _f64(x, w)
    ref = reference.linear_cross_entropy(x64, w64, targets, -100, reduction)
    (ref * 1.5).backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    _grads_close((x.grad, w.grad), (x64.grad, w64.grad))
    with torch.no_grad():  # no gradient asked for: the op computes the loss alone
        torch.testing.assert_close(custom_ops.linear_cross_entropy(x, w, targets, -100, reduction, chunk), loss.detach())


def test_kernel_constant_reads_the_kernel_module():
    from llama_mini.kernels import flash_attention, rms_norm

    assert custom_ops.kernel_constant("flash_attention", "MAX_HEAD_DIM") == flash_attention.MAX_HEAD_DIM
    assert custom_ops.kernel_constant("rms_norm", "MAX_HIDDEN") == rms_norm.MAX_HIDDEN


# --------------------------------------------------------------------------------------------
# FLOP formulas
# --------------------------------------------------------------------------------------------


def _count(fn) -> tuple[int, dict]:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("causal,docs,Tq", [(True, False, 19), (True, False, 5), (True, False, 45), (False, False, 11),
                                             (True, True, 19)],
                         ids=["causal", "causal-cache", "causal-more-queries", "cross", "documents"])
def test_flash_attention_flops_against_the_sdpa_count_for_the_same_call(causal, docs, Tq):
    """Without a mask: forward 4 B H T_q T_k D and backward 2.5x, exactly PyTorch's formulas for
    the fused ``scaled_dot_product_attention`` kernels given k and v repeated to the H query
    heads. Causal (documents too: the formula sees shapes only) counts the T_q T_k - T_q^2 / 2
    pairs on and below the bottom-right diagonal, which PyTorch's formula (it ignores masks)
    does not subtract. (On a CPU, sdpa with a mask runs a kernel FlopCounterMode has no formula
    for, so the formulas are called directly.)"""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    B, H, Hkv, Tk, D = 2, 4, 2, 19, 16
    q, k, v = _attention_inputs(B, H, Hkv, Tq, Tk, D, grad=True)
    doc = _documents(B, Tk) if docs else None
    dout = _randn(B, H, Tq, D, seed=5)
    ours, per_op = _count(lambda: custom_ops.flash_attention(q, k, v, causal=causal, document_ids=doc).backward(dout))
    pairs = (Tq * Tk - Tq * Tq / 2 if Tq <= Tk else Tk * Tk / 2) if causal else Tq * Tk
    assert per_op == {"llama_mini.flash_attention_fwd": 4 * B * H * pairs * D,
                      "llama_mini.flash_attention_bwd": 10 * B * H * pairs * D}
    q_shape, kv_shape = (B, H, Tq, D), (B, H, Tk, D)
    sdpa = sdpa_flop_count(q_shape, kv_shape, kv_shape) + sdpa_backward_flop_count(q_shape, q_shape, kv_shape, kv_shape)
    assert ours == sdpa * pairs / (Tq * Tk)
    if causal and Tq == Tk:
        assert 2 * ours == sdpa  # the causal half


def test_linear_cross_entropy_flops_are_six_NCV_for_a_training_step():
    N, C, V = 21, 24, 50
    x, w = _randn(N, C, seed=1, grad=True), _randn(V, C, seed=2, grad=True)
    targets = _targets((N,), V)
    total, per_op = _count(lambda: custom_ops.linear_cross_entropy(x, w, targets).backward())
    assert total == per_op["llama_mini.linear_cross_entropy_fwd"] == 6 * N * C * V
    # The same as the unfused projection's matmuls, forward and backward.
    unfused, _ = _count(lambda: reference.linear_cross_entropy(x, w, targets).backward())
    assert total == unfused
    with torch.no_grad():
        assert _count(lambda: custom_ops.linear_cross_entropy(x, w, targets))[0] == 2 * N * C * V
