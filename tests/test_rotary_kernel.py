"""The Triton rotary-embedding kernel (q and k in one launch) against a float64 reference.

Outputs and both gradients (dq, dk) are compared with ``kernels.reference.apply_rotary_qk``
run on the same inputs cast to float64, with the same cos/sin tables (built by
``llama_mini.rope``, fp32, then cast to float64 for the reference: the tables' own rounding is
not part of the kernel's error). Launches allocate outputs poisoned with NaN, so an element the
kernel never writes (a ragged head tile, a padded pair) fails instead of passing as a stale 0.

Under ``TRITON_INTERPRET=1`` a head tile holds 32 elements (2 heads of 16, 4 of 8), so the
cases below loop over several head tiles with a ragged last one.

Tolerances
----------
fp32: each output is x0 c - x1 s (or x0 s + x1 c): two rounded products and a rounded sum, so
the error is at most ~2^-23 (|x0| + |x1|) < 2e-6 for the |x| < 8 of these normal samples
(measured: at most 2.4e-7). atol 2e-6 with no relative term; a wrong angle, sign, pair order or
table row moves values by > 1e-2.
fp16 / bf16: the kernel rounds its fp32 result once to the output dtype, so it must lie within
one unit in the last place of that dtype (rtol 2^-10 for fp16, 2^-7 for bf16) plus the fp32
error above (atol 2e-6); gradients likewise (they are a rotation of the fp16 output gradient).
"""

from __future__ import annotations

import pytest
import torch

from llama_mini import kernels
from llama_mini.kernels import reference
from llama_mini.kernels.common import is_interpreting

pytestmark = pytest.mark.skipif(not kernels.triton_available(), reason=kernels.triton_unavailable_reason())

if kernels.triton_available():
    from llama_mini.kernels.common import poisoned_outputs
    from llama_mini.kernels.rotary import apply_rotary, rotary_config, rotary_forward

from llama_mini.config import RopeScaling
from llama_mini.rope import rope_cos_sin, rope_frequencies

DEVICE = "cuda" if torch.cuda.is_available() and not is_interpreting() else "cpu"
FLOAT_DTYPES = [torch.float32, torch.float16]
RTOL = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
ATOL = 2e-6


def _tables(L, D, theta=10000.0, scaling=None):
    """fp32 (L, D/2) cos, sin for positions 0..L-1."""
    cos, sin = rope_cos_sin(torch.arange(L), rope_frequencies(D, theta, scaling))
    return cos.to(DEVICE), sin.to(DEVICE)


def _packed_positions(rows):
    """Position ids that restart at 0 for each document of each row: rows of document lengths."""
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows]).to(DEVICE)


def _check(name, got, want, dtype):
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    got = got.double()
    assert not torch.isnan(got).any(), f"{name}: NaN in the kernel's result (an unwritten element?)"
    torch.testing.assert_close(got, want, rtol=RTOL[dtype], atol=ATOL, msg=lambda m: f"{name}: {m}")


def _reference(q, k, cos, sin, position_ids, dq_out, dk_out):
    """float64 outputs and input gradients from kernels.reference."""
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    rq, rk = reference.apply_rotary_qk(q64, k64, cos.double(), sin.double(), position_ids)
    torch.autograd.backward([rq, rk], [dq_out.double(), dk_out.double()])
    return rq.detach(), rk.detach(), q64.grad, k64.grad


def _run_and_compare(q, k, cos, sin, position_ids, dtype, seed=0):
    q_before, k_before = q.detach().clone(), k.detach().clone()
    with poisoned_outputs():
        qo, ko = apply_rotary(q, k, cos, sin, position_ids)
        g = torch.Generator().manual_seed(seed + 1)
        dq_out = torch.randn(qo.shape, generator=g).to(DEVICE, dtype)
        dk_out = torch.randn(ko.shape, generator=g).to(DEVICE, dtype)
        torch.autograd.backward([qo, ko], [dq_out, dk_out])
    assert qo.is_contiguous() and ko.is_contiguous() and qo.shape == q.shape and ko.shape == k.shape
    assert torch.equal(q.detach(), q_before) and torch.equal(k.detach(), k_before), "inputs were modified"
    rq, rk, rdq, rdk = _reference(q, k, cos, sin, position_ids, dq_out, dk_out)
    _check("q_out", qo, rq, dtype)
    _check("k_out", ko, rk, dtype)
    _check("dq", q.grad, rdq, dtype)
    _check("dk", k.grad, rdk, dtype)
    return qo, ko


def _qk(B, T, H, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(B, T, Hkv, D, generator=g).to(DEVICE, dtype).requires_grad_()
    return q, k


CASES = {
    # name: (B, T, H, Hkv, D, table rows L, position ids (None: 0..T-1), RoPE scaling)
    "gqa-longer-table": (2, 7, 6, 2, 16, 12, None, None),  # table longer than T: first T rows
    "mqa-packed-docs": (2, 9, 4, 1, 8, 9, [[3, 1, 5], [6, 3]], None),  # ids restart per document
    "d10-ragged-head-tiles": (1, 5, 3, 3, 10, 5, None, None),  # D/2 = 5 pairs padded to 8
    "d6-linear-scaling": (2, 5, 2, 1, 6, 64, "random", RopeScaling(type="linear", factor=4.0)),
    "llama3-scaling": (1, 3, 5, 1, 16, 40, "random",
                       RopeScaling(type="llama3", factor=8.0, original_max_seq_len=16)),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, dtype):
    B, T, H, Hkv, D, L, pos, scaling = CASES[case]
    seed = sum(map(ord, case))
    q, k = _qk(B, T, H, Hkv, D, dtype, seed)
    cos, sin = _tables(L, D, scaling=scaling)
    if scaling is not None:  # the case only shows something if the scaled table differs
        assert (cos - _tables(L, D)[0]).abs().max() > 0.1
    if pos == "random":
        pos = torch.randint(0, L, (B, T), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    elif pos is not None:
        pos = _packed_positions(pos)
        assert not torch.equal(pos[0], pos[1])
    _run_and_compare(q, k, cos, sin, pos, dtype, seed)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_strided_views_of_a_fused_projection(dtype):
    """q and k as column slices of one fused (B, T, (H + 2 Hkv) D) projection, and k also as a
    transposed (B, Hkv, T, D) tensor: read in place; the gradient lands only in q's and k's
    columns of the fused tensor (v's stay zero)."""
    B, T, H, Hkv, D = 2, 5, 4, 2, 8
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(DEVICE, dtype).requires_grad_()
    q = qkv[..., : H * D].view(B, T, H, D)
    k = qkv[..., H * D: (H + Hkv) * D].view(B, T, Hkv, D)
    assert not q.is_contiguous() and not k.is_contiguous() and q.stride(-1) == 1
    cos, sin = _tables(T, D)
    pos = _packed_positions([[2, 3], [5]])
    with poisoned_outputs():
        qo, ko = apply_rotary(q, k, cos, sin, pos)
        dq_out = torch.randn(qo.shape, generator=g).to(DEVICE, dtype)
        dk_out = torch.randn(ko.shape, generator=g).to(DEVICE, dtype)
        torch.autograd.backward([qo, ko], [dq_out, dk_out])
    qkv64 = qkv.detach().double().requires_grad_()
    rq, rk = reference.apply_rotary_qk(qkv64[..., : H * D].view(B, T, H, D),
                                       qkv64[..., H * D: (H + Hkv) * D].view(B, T, Hkv, D),
                                       cos.double(), sin.double(), pos)
    torch.autograd.backward([rq, rk], [dq_out.double(), dk_out.double()])
    _check("q_out", qo, rq.detach(), dtype)
    _check("k_out", ko, rk.detach(), dtype)
    _check("dqkv", qkv.grad, qkv64.grad, dtype)
    assert torch.all(qkv.grad[..., (H + Hkv) * D:] == 0)

    kt = torch.randn(B, Hkv, T, D, generator=g).to(DEVICE, dtype).transpose(1, 2).requires_grad_()  # (B, T, Hkv, D)
    q2 = torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype).requires_grad_()
    _run_and_compare(q2, kt, cos, sin, None, dtype, seed=12)


def test_strided_last_dim_and_expanded_gradients_are_copied_not_misread():
    """A q whose last dim has stride H (a transpose), and the stride-0 gradients that
    ``.sum().backward()`` hands back: both need the copy the launcher makes."""
    B, T, H, Hkv, D = 1, 4, 3, 2, 8
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, T, D, H, generator=g).to(DEVICE).transpose(-1, -2).requires_grad_()
    k = torch.randn(B, T, Hkv, D, generator=g).to(DEVICE).requires_grad_()
    assert q.stride(-1) != 1
    cos, sin = _tables(T + 3, D)
    with poisoned_outputs():
        qo, ko = apply_rotary(q, k, cos, sin)
        (qo.sum() + ko.sum()).backward()
    rq, rk, rdq, rdk = _reference(q, k, cos, sin, None, torch.ones_like(qo), torch.ones_like(ko))
    for name, got, want in (("q_out", qo, rq), ("k_out", ko, rk), ("dq", q.grad, rdq), ("dk", k.grad, rdk)):
        _check(name, got, want, torch.float32)


def test_no_position_ids_equals_positions_0_to_T():
    q, k = _qk(2, 7, 4, 2, 16, torch.float32, seed=3)
    cos, sin = _tables(20, 16)
    pos = torch.arange(7, device=DEVICE).expand(2, 7)  # stride 0 over the batch
    with torch.no_grad(), poisoned_outputs():
        a = apply_rotary(q, k, cos, sin)
        b = apply_rotary(q, k, cos, sin, pos)
        c = apply_rotary(q, k, cos, sin, pos.to(torch.int32))
    for x, y in zip(a + a, b + c):
        assert torch.equal(x, y)  # the same rows of the same table: bit-identical


def test_inverse_rotation_undoes_the_rotation():
    q, k = _qk(1, 6, 3, 1, 10, torch.float32, seed=4)
    cos, sin = _tables(30, 10)
    pos = torch.tensor([[29, 0, 7, 7, 15, 3]], device=DEVICE)
    with torch.no_grad(), poisoned_outputs():
        qo, ko = rotary_forward(q, k, cos, sin, pos)
        assert (qo - q).abs().max() > 0.1
        qb, kb = rotary_forward(qo, ko, cos, sin, pos, inverse=True)
    torch.testing.assert_close(qb, q.detach(), rtol=0, atol=4e-6)
    torch.testing.assert_close(kb, k.detach(), rtol=0, atol=4e-6)


def test_launch_config_on_gpu_sizes():
    """LLaMA-size tiles: all 32 query heads of D=128 (or 64 of D=64) in one 4-warp tile."""
    assert rotary_config(32, 128, interpreting=False) == (32, 128, 4)
    assert rotary_config(64, 64, interpreting=False) == (64, 64, 4)
    assert rotary_config(128, 128, interpreting=False) == (32, 128, 4)  # capped: loops over 4 tiles
    assert rotary_config(8, 80, interpreting=False) == (8, 128, 2)
    assert rotary_config(3, 10, interpreting=True) == (2, 16, 1)


def _bad(**kw):
    q, k = _qk(2, 7, 4, 2, 8, torch.float32, seed=0)
    cos, sin = _tables(12, 8)
    args = dict(q=q, k=k, cos=cos, sin=sin, position_ids=None)
    args.update(kw)
    return args


ERRORS = [
    (dict(q=torch.zeros(2, 7, 32)), ValueError, r"q must be a 4-D tensor"),
    (dict(k=torch.zeros(2, 6, 2, 8)), ValueError, r"k \(2, 6, 2, 8\) must match q \(2, 7, 4, 8\)"),
    (dict(q=torch.zeros(2, 7, 4, 7), k=torch.zeros(2, 7, 2, 7)), ValueError, r"head dim D of q and k must be even"),
    (dict(q=torch.zeros(2, 7, 4, 8, dtype=torch.float64)), TypeError, r"q must be float32, float16 or bfloat16"),
    (dict(cos=torch.zeros(12, 8)), ValueError, r"cos must be a \(L, D/2\) = \(L, 4\) table"),
    (dict(sin=torch.zeros(11, 4)), ValueError, r"cos \(12, 4\) and sin \(11, 4\)"),
    (dict(sin=torch.zeros(12, 4, dtype=torch.int64)), TypeError, r"sin must be a floating table"),
    (dict(cos=torch.zeros(12, 4, device="meta")), ValueError, r"cos is on meta but q is on"),
    (dict(cos=torch.zeros(4, 4), sin=torch.zeros(4, 4)), ValueError,
     r"tables have L = 4 rows, fewer than the sequence length T = 7"),
    (dict(position_ids=torch.zeros(2, 6, dtype=torch.int64)), ValueError,
     r"position_ids must be an int32/int64 tensor of shape \(B, T\) = \(2, 7\)"),
    (dict(position_ids=torch.zeros(2, 7)), ValueError, r"position_ids must be an int32/int64"),
    (dict(position_ids=torch.full((2, 7), 12)), ValueError,
     r"position_ids must lie in \[0, 12\) \(the cos/sin tables have L = 12 rows\), got values in \[12, 12\]"),
    (dict(position_ids=torch.tensor([[0] * 6 + [-1]] * 2)), ValueError, r"position_ids must lie in \[0, 12\)"),
    (dict(position_ids=torch.zeros(2, 7, dtype=torch.int64, device="meta")), ValueError,
     r"position_ids is on meta"),
]


@pytest.mark.skipif(DEVICE != "cpu", reason="builds CPU tensors")
@pytest.mark.parametrize("kw,exc,match", ERRORS, ids=[m[:30] for _, _, m in ERRORS])
def test_errors_name_the_argument(kw, exc, match):
    with pytest.raises(exc, match=match):
        apply_rotary(**_bad(**kw))


def test_position_range_is_checked_once_per_tensor_and_again_after_a_change():
    """Every layer passes the same position_ids: the host-side range check runs for the first
    only. Changing the tensor in place, or a shorter table, must be checked again."""
    args = _bad(position_ids=torch.arange(7).expand(2, 7).clone().to(DEVICE))
    pos = args["position_ids"]
    apply_rotary(**args)
    calls = []
    real = torch.aminmax
    try:
        torch.aminmax = lambda t: calls.append(t) or real(t)
        apply_rotary(**args)  # same tensor, same version: no second check
        assert calls == []
        pos[1, 6] = 12  # an in-place change bumps the version counter: checked, and refused
        with pytest.raises(ValueError, match=r"position_ids must lie in \[0, 12\)"):
            apply_rotary(**args)
        pos[1, 6] = 6
        apply_rotary(**args)  # fixed: checked again and accepted
        short_cos, short_sin = _tables(6, 8)
        with pytest.raises(ValueError, match=r"position_ids must lie in \[0, 6\)"):
            apply_rotary(**dict(args, cos=short_cos, sin=short_sin))  # a shorter table: checked again
    finally:
        torch.aminmax = real
    assert len(calls) == 3


@pytest.mark.gpu
@pytest.mark.skipif(is_interpreting(), reason="bf16 runs on a GPU only (the interpreter has no bf16 arithmetic)")
@pytest.mark.parametrize("case", ["gqa-longer-table", "mqa-packed-docs", "d10-ragged-head-tiles"])
def test_bfloat16_on_gpu(case):
    B, T, H, Hkv, D, L, pos, _ = CASES[case]
    q, k = _qk(B, T, H, Hkv, D, torch.bfloat16, seed=7)
    cos, sin = _tables(L, D)
    _run_and_compare(q, k, cos, sin, _packed_positions(pos) if pos else None, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(is_interpreting(), reason="compiled kernels only")
def test_llama_size_on_gpu():
    """All 32 query and 8 key heads of D=128 in one tile per token, fp32 and bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        q, k = _qk(2, 33, 32, 8, 128, dtype, seed=8)
        cos, sin = _tables(40, 128, theta=500000.0)
        _run_and_compare(q, k, cos, sin, None, dtype)


def test_position_ids_made_under_inference_mode_are_checked_every_call():
    """Inference tensors have no version counter, so they are never taken as already checked."""
    with torch.inference_mode():
        args = _bad(position_ids=torch.arange(7).expand(2, 7).clone().to(DEVICE))
        args["q"], args["k"] = args["q"].detach().clone(), args["k"].detach().clone()
        qo, _ = apply_rotary(**args)
        want, _ = reference.apply_rotary_qk(args["q"].double(), args["k"].double(), args["cos"].double(),
                                            args["sin"].double(), args["position_ids"])
        torch.testing.assert_close(qo.double(), want, rtol=1e-5, atol=1e-6)
        args["position_ids"][0, 0] = 12
        with pytest.raises(ValueError, match=r"position_ids must lie in \[0, 12\)"):
            apply_rotary(**args)
