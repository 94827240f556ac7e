"""The Triton SwiGLU kernel (y = silu(a) * b) against a float64 reference, forward and backward.

Output and both gradients (da, db) are compared with ``kernels.reference.swiglu`` run on the
same inputs cast to float64 (autograd gives the reference gradients). Launches allocate outputs
poisoned with NaN, so an element the kernel never writes fails instead of passing as a stale 0.
Under ``TRITON_INTERPRET=1`` a column block holds 64 elements, so hidden 123 and 4000 end in
ragged blocks (123 = 64 + 59, 4000 = 62 * 64 + 32) and 64 is exactly one.

Tolerances
----------
fp32: a handful of rounded fp32 operations (exp, 1 + e, a division, two or three products)
per element: relative error a few 2^-24, except where 1 + a (1 - s) cancels (a near -1.28), where
the absolute error of da is ~2^-23 |dy b s| < 2e-6 for these normal samples. atol 2e-6 and
rtol 1e-5 (measured under the interpreter: within 2e-6 + 3e-8 |want|; the margin is for a GPU's
approximate exp, whose relative error grows like 6e-8 |a|); a wrong derivative term moves
values by > 1e-2.
fp16 / bf16: the kernel rounds its fp32 result once to the output dtype, so it must be within
one unit in the last place of that dtype (rtol 2^-10 for fp16, 2^-7 for bf16) plus the fp32
error above (atol 2e-6; it also covers fp16's subnormal spacing of 6e-8). Measured for fp16:
within 2e-6 + 4.83e-4 |want|, i.e. correctly rounded (half an ulp is at most 2^-11 = 4.88e-4).
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
    from llama_mini.kernels.swiglu import swiglu, swiglu_config

DEVICE = "cuda" if torch.cuda.is_available() and not is_interpreting() else "cpu"
FLOAT_DTYPES = [torch.float32, torch.float16]
RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
ATOL = 2e-6
# Sigmoid saturates (to 0 or 1, exactly, in fp32) far inside the fp16 range.
SATURATING = [-1000.0, -100.0, -80.0, -30.0, -10.0, 0.0, 10.0, 30.0, 80.0, 100.0, 1000.0]


def _check(name, got, want, dtype):
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    got = got.double()
    assert torch.isfinite(got).all(), f"{name}: NaN/inf in the kernel's result"
    torch.testing.assert_close(got, want, rtol=RTOL[dtype], atol=ATOL, msg=lambda m: f"{name}: {m}")


def _run_and_compare(a, b, dtype, seed=0, leaves=None):
    """Forward and backward of the kernel (poisoned outputs); returns y, the random dy, and
    float64 copies of ``leaves`` (default (a, b); a and b may be views of them) for the
    reference to differentiate."""
    leaves = leaves or (a, b)
    with poisoned_outputs():
        y = swiglu(a, b)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
        y.backward(dy)
    assert y.shape == a.shape and y.is_contiguous()
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    return y, dy, leaves64


def _compare_simple(a, b, dtype, seed=0):
    y, dy, (a64, b64) = _run_and_compare(a, b, dtype, seed)
    want = reference.swiglu(a64, b64)
    want.backward(dy.double())
    _check("y", y, want.detach(), dtype)
    _check("da", a.grad, a64.grad, dtype)
    _check("db", b.grad, b64.grad, dtype)


def _ab(shape, dtype, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(shape, generator=g) * scale).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()
    return a, b


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(5, 123), (1, 3, 4000), (3, 7, 64)], ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(shape, dtype):
    a, b = _ab(shape, dtype, seed=sum(shape))
    _compare_simple(a, b, dtype, seed=sum(shape))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_column_halves_of_a_fused_projection(dtype):
    """a and b as the two halves of one (B, T, 2 * hidden) w1/w3 output (row stride 2 * hidden,
    read in place); gradients of both halves land in the fused tensor."""
    B, T, hidden = 3, 3, 123
    g = torch.Generator().manual_seed(21)
    fused = (torch.randn(B, T, 2 * hidden, generator=g) * 2).to(DEVICE, dtype).requires_grad_()
    a, b = fused[..., :hidden], fused[..., hidden:]
    assert a.stride(-2) == 2 * hidden and not a.is_contiguous()
    y, dy, (f64,) = _run_and_compare(a, b, dtype, seed=21, leaves=(fused,))
    want = reference.swiglu(f64[..., :hidden], f64[..., hidden:])
    want.backward(dy.double())
    _check("y", y, want.detach(), dtype)
    _check("dfused", fused.grad, f64.grad, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_different_row_strides_and_unflattenable_views(dtype):
    """a with row stride 3 * hidden (a slice of a wider tensor), b contiguous; then a view
    whose leading dims have no single row stride ((B, T + 1, h)[:, :T]: copied)."""
    g = torch.Generator().manual_seed(31)
    wide = (torch.randn(5, 3 * 64, generator=g) * 2).to(DEVICE, dtype)
    a = wide[:, 64:128].requires_grad_()
    b = torch.randn(5, 64, generator=g).to(DEVICE, dtype).requires_grad_()
    assert a.stride(0) == 192 and b.stride(0) == 64
    _compare_simple(a, b, dtype, seed=31)

    base = (torch.randn(3, 6, 123, generator=g) * 2).to(DEVICE, dtype)
    a = base[:, :5].requires_grad_()  # (3, 5, 123), strides (738, 123, 1)
    b = torch.randn(3, 5, 123, generator=g).to(DEVICE, dtype).requires_grad_()
    _compare_simple(a, b, dtype, seed=32)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_saturated_sigmoid_gives_no_nan_or_inf(dtype):
    """|a| up to 1000: exp(-a) overflows to inf in fp32 for a < -88 and sigmoid(a) rounds to
    exactly 1 for a > 17; y, da and db must stay finite and match the reference."""
    rows = 3
    a_vals = torch.tensor(SATURATING).repeat(rows, 1)  # (3, 11)
    g = torch.Generator().manual_seed(41)
    a = a_vals.to(DEVICE, dtype).requires_grad_()
    b = torch.randn(a_vals.shape, generator=g).to(DEVICE, dtype).requires_grad_()
    _compare_simple(a, b, dtype, seed=41)
    # da -> dy * b for large positive a, and -> 0 for large negative a.
    assert (a.grad[:, -1] != 0).all() and (a.grad[:, 0] == 0).all()


def test_expanded_and_strided_gradients_are_copied_not_misread():
    """``y.sum().backward()`` hands back a stride-0 gradient; b with a strided last dim."""
    g = torch.Generator().manual_seed(51)
    a = (torch.randn(7, 123, generator=g) * 2).to(DEVICE).requires_grad_()
    b = torch.randn(123, 7, generator=g).to(DEVICE).t().requires_grad_()
    assert b.stride(-1) != 1
    with poisoned_outputs():
        y = swiglu(a, b)
        y.sum().backward()
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    want = reference.swiglu(a64, b64)
    want.sum().backward()
    _check("y", y, want.detach(), torch.float32)
    _check("da", a.grad, a64.grad, torch.float32)
    _check("db", b.grad, b64.grad, torch.float32)


def test_launch_config():
    assert swiglu_config(11008, interpreting=False) == (1024, 4)
    assert swiglu_config(688, interpreting=False) == (1024, 4)
    assert swiglu_config(300, interpreting=False) == (512, 2)
    assert swiglu_config(123, interpreting=False) == (128, 1)
    assert swiglu_config(4000, interpreting=True) == (64, 1)


ERRORS = [
    (dict(b=torch.zeros(5, 122)), ValueError, r"b \(5, 122\) must have the shape of a \(5, 123\)"),
    (dict(b=torch.zeros(5, 123, dtype=torch.float16)), TypeError, r"b \(torch.float16\) must have the dtype of a"),
    (dict(a=torch.zeros(5, 123, dtype=torch.float64)), TypeError, r"a must be float32, float16 or bfloat16"),
    (dict(a=torch.tensor(1.0)), ValueError, r"a must be a tensor of shape \(\.\.\., hidden\)"),
    (dict(b=torch.zeros(5, 123, device="meta")), ValueError, r"b is on meta but a is on cpu"),
]


@pytest.mark.skipif(DEVICE != "cpu", reason="builds CPU tensors")
@pytest.mark.parametrize("kw,exc,match", ERRORS, ids=[m[:30] for _, _, m in ERRORS])
def test_errors_name_the_argument(kw, exc, match):
    args = dict(a=torch.zeros(5, 123), b=torch.zeros(5, 123))
    args.update(kw)
    with pytest.raises(exc, match=match):
        swiglu(**args)


@pytest.mark.gpu
@pytest.mark.skipif(is_interpreting(), reason="bf16 runs on a GPU only (the interpreter has no bf16 arithmetic)")
@pytest.mark.parametrize("shape", [(5, 123), (3, 11008)], ids=lambda s: "x".join(map(str, s)))
def test_bfloat16_on_gpu(shape):
    a, b = _ab(shape, torch.bfloat16, seed=61)
    _compare_simple(a, b, torch.bfloat16, seed=61)
    a = torch.tensor(SATURATING).repeat(3, 1).to(DEVICE, torch.bfloat16).requires_grad_()
    b = torch.randn(a.shape).to(DEVICE, torch.bfloat16).requires_grad_()
    _compare_simple(a, b, torch.bfloat16)
