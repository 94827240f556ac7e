"""The Triton RMSNorm and fused residual-add + RMSNorm kernels against a float64 reference.

Runs under ``TRITON_INTERPRET=1`` on CPU (fp32 and fp16, small shapes) and on a CUDA GPU with
the compiled kernels (adds bf16 at model-sized rows). Under the interpreter the register tile is
capped at ``INTERPRETER_MAX_BLOCK_C`` = 1024, so C = 4000 takes the chunked ("wide") path with a
ragged last chunk, while C = 64 and 123 are single tiles; the backward runs
``INTERPRETER_PROGRAMS`` = 3 programs, so 7 rows split 3 / 2 / 2 and 1 row leaves one program.

Every launch allocates its outputs (y, h, rstd, dx, the dw partials, the wide path's row dots)
poisoned with NaN, so an element a kernel forgets to write fails the comparison.

Tolerances
----------
fp32: the kernels compute in fp32 what the reference computes in float64. y and dx are O(1)
values from one row reduction of at most 4000 squares / products, dw a sum over at most 10
rows; fp32 rounding leaves errors of a few 1e-7 (measured: at most 1.4e-6, dw over 7 rows at
C = 4000), so 1e-5 absolute and relative is a 7x margin that still fails on any real mistake
(a missing eps, a wrong mean, a dropped dh or partial moves values by 1e-3 or more).
fp16 / bf16: the error of the kernel against the float64 reference must be at most twice the
error of PyTorch running the same reference in that dtype (its autograd included), plus 1e-6
for outputs PyTorch gets exactly right.
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
    import llama_mini.kernels.rms_norm as rn
    from llama_mini.kernels.common import poisoned_outputs
    from llama_mini.kernels.rms_norm import MAX_HIDDEN, add_rms_norm, rms_norm

DEVICE = "cuda" if torch.cuda.is_available() and not is_interpreting() else "cpu"
FLOAT_DTYPES = [torch.float32, torch.float16]
EPS = 1e-5

# (..., C): C in {123, 4000} and a small power of two; rows 1, 7 (odd, uneven program shares), 10
SHAPES = [(123,), (7, 123), (2, 5, 64), (1, 4000), (7, 4000)]


def _leaf(shape, dtype, g, scale=1.0):
    return (scale * torch.randn(shape, generator=g)).to(DEVICE, dtype).requires_grad_()


def _weight(C, dtype, g):
    """A random weight around 1 (never all ones, so a dropped or misindexed w shows)."""
    return (1.0 + 0.5 * torch.randn(C, generator=g)).to(DEVICE, dtype).requires_grad_()


def _grad(shape, dtype, g):
    return torch.randn(shape, generator=g).to(DEVICE, dtype)


def _f64(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def _same_dtype(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]




def _compare_rms_norm(x, w, dtype, seed, eps=EPS):
    """Kernel forward + backward (under poisoning) against float64, with a random dy."""
    g = torch.Generator().manual_seed(seed + 1)
    with poisoned_outputs():
        y = rms_norm(x, w, eps)
        dy = _grad(y.shape, y.dtype, g)
        y.backward(dy)
    x64, w64 = _f64(x, w)
    y64 = reference.rms_norm(x64, w64, eps)
    y64.backward(dy.double())
    base = [None] * 3
    if dtype != torch.float32:
        xb, wb = _same_dtype(x, w)
        yb = reference.rms_norm(xb, wb, eps)
        yb.backward(dy)
        base = [yb.detach(), xb.grad, wb.grad]
    assert y.dtype == torch.promote_types(x.dtype, w.dtype) and y.shape == x.shape
    check("y", y, y64, dtype, base[0])
    check("dx", x.grad, x64.grad, dtype, base[1])
    check("dw", w.grad, w64.grad, dtype, base[2])
    assert x.grad.dtype == x.dtype and w.grad.dtype == w.dtype
    return y


def _compare_add_rms_norm(x, r, w, dtype, seed, eps=EPS):
    """Fused kernel against float64 with BOTH upstream gradients (dy into y, dh into h) nonzero."""
    g = torch.Generator().manual_seed(seed + 1)
    with poisoned_outputs():
        y, h = add_rms_norm(x, r, w, eps)
        dy, dh = _grad(y.shape, y.dtype, g), _grad(h.shape, h.dtype, g)
        torch.autograd.backward([y, h], [dy, dh])
    # h is x + residual rounded once to x's dtype, exactly what PyTorch's own add gives
    assert h.dtype == x.dtype and torch.equal(h, x.detach() + r.detach())
    x64, r64, w64 = _f64(x, r, w)
    y64, h64 = reference.add_rms_norm(x64, r64, w64, eps)
    torch.autograd.backward([y64, h64], [dy.double(), dh.double()])
    base = [None] * 3
    if dtype != torch.float32:
        xb, rb, wb = _same_dtype(x, r, w)
        yb, hb = reference.add_rms_norm(xb, rb, wb, eps)
        torch.autograd.backward([yb, hb], [dy, dh])
        base = [yb.detach(), xb.grad, wb.grad]
    check("y", y, y64, dtype, base[0])
    check("h", h, h64, dtype, x.detach() + r.detach())
    check("dx", x.grad, x64.grad, dtype, base[1])
    check("dresidual", r.grad, r64.grad, dtype, base[1])
    check("dw", w.grad, w64.grad, dtype, base[2])
    return y, h


def _ids(v):
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else "x".join(map(str, v))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_rms_norm_matches_float64_reference(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x, w = _leaf(shape, dtype, g), _weight(shape[-1], dtype, g)
    _compare_rms_norm(x, w, dtype, seed=sum(shape))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_add_rms_norm_matches_float64_reference(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape) + 7)
    x, r = _leaf(shape, dtype, g), _leaf(shape, dtype, g, scale=2.0)
    w = _weight(shape[-1], dtype, g)
    _compare_add_rms_norm(x, r, w, dtype, seed=sum(shape) + 7)


@pytest.mark.skipif(DEVICE != "cpu", reason="sets the interpreter's tile cap")
@pytest.mark.parametrize("cap,C,wide", [(32, 123, True), (4096, 4000, False)], ids=["C123-chunked", "C4000-tile"])
def test_single_tile_and_chunked_paths(cap, C, wide, monkeypatch):
    """The other path for each C of the main tests: 123 in four 32-wide chunks (ragged last),
    4000 in one 4096 tile."""
    monkeypatch.setattr(rn, "INTERPRETER_MAX_BLOCK_C", cap)
    assert rn.block_config(C)[2] == wide
    g = torch.Generator().manual_seed(C)
    x, r, w = _leaf((5, C), torch.float32, g), _leaf((5, C), torch.float32, g), _weight(C, torch.float32, g)
    _compare_rms_norm(x, w, torch.float32, seed=C)
    for t in (x, w):
        t.grad = None
    _compare_add_rms_norm(x, r, w, torch.float32, seed=C)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float16], ids=_ids)
@pytest.mark.parametrize("C", [123, 4000])
def test_fp16_forward_rounds_like_the_reference(C, w_dtype):
    """n = x * r is rounded to x's dtype before the weight multiplies it, as in the reference,
    so y equals PyTorch's own fp16 result bit for bit (up to a rare rounding flip where fp32
    sum order or a GPU's approximate rsqrt moves r by an ulp). Skipping that rounding changes
    about a quarter (fp16 w) to all (fp32 w) of the elements. With an fp32 weight, y is fp32
    (promote_types); dx stays fp16 and dw fp32."""
    g = torch.Generator().manual_seed(C)
    x, w = _leaf((7, C), torch.float16, g), _weight(C, w_dtype, g)
    y = _compare_rms_norm(x, w, torch.float16, seed=C)
    assert y.dtype == w_dtype
    same = reference.rms_norm(x.detach(), w.detach(), EPS)
    differ = (y.detach() != same).float().mean().item()
    assert differ < 0.01, f"{differ:.1%} of y differs from PyTorch's fp16 reference"


def test_leading_strides_are_read_in_place_or_copied():
    g = torch.Generator().manual_seed(11)
    C = 123
    # rows of a wider buffer: one row stride (C + 7), read in place without a copy
    sliced = torch.randn(2, 5, C + 7, generator=g).to(DEVICE)[..., :C].requires_grad_()
    view = rn._rows(sliced)
    assert view.data_ptr() == sliced.data_ptr() and view.stride() == (C + 7, 1)
    _compare_rms_norm(sliced, _weight(C, torch.float32, g), torch.float32, seed=11)
    # transposed leading dims do not flatten to one row stride: copied, still correct
    transposed = torch.randn(5, 2, C, generator=g).to(DEVICE).transpose(0, 1).requires_grad_()
    with pytest.raises(RuntimeError):
        transposed.view(-1, C)
    _compare_rms_norm(transposed, _weight(C, torch.float32, g), torch.float32, seed=12)
    # fused: x and residual with different row strides
    x = torch.randn(3, C + 4, generator=g).to(DEVICE)[:, 2:C + 2].requires_grad_()
    r = torch.randn(3, 2 * C, generator=g).to(DEVICE)[:, C:].requires_grad_()
    _compare_add_rms_norm(x, r, _weight(C, torch.float32, g), torch.float32, seed=13)


def test_broadcast_upstream_gradient():
    """y.sum().backward() hands the kernel a dy with all-zero strides (copied to rows)."""
    g = torch.Generator().manual_seed(17)
    x, w = _leaf((7, 64), torch.float32, g), _weight(64, torch.float32, g)
    rms_norm(x, w).sum().backward()
    x64, w64 = _f64(x, w)
    reference.rms_norm(x64, w64, EPS).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("C", [64, 4000])
def test_eps_is_honoured(C):
    """Rows with mean(x^2) ~ 2.5e-3 and eps = 0.5: eps dominates the denominator, the result
    matches the reference at that eps and is far from the one at the default eps."""
    g = torch.Generator().manual_seed(C)
    x, w = _leaf((3, C), torch.float32, g, scale=0.05), _weight(C, torch.float32, g)
    y = _compare_rms_norm(x, w, torch.float32, seed=C, eps=0.5)
    default = reference.rms_norm(x.detach().double(), w.detach().double(), EPS)
    assert (y.detach().double() - default).abs().max() > 0.5
    y2, _ = add_rms_norm(x.detach(), torch.zeros_like(x.detach()), w.detach(), eps=0.5)
    torch.testing.assert_close(y2, y.detach(), rtol=1e-6, atol=1e-7)


def test_add_rms_norm_with_one_output_unused():
    g = torch.Generator().manual_seed(19)
    x, r, w = _leaf((7, 123), torch.float32, g), _leaf((7, 123), torch.float32, g), _weight(123, torch.float32, g)
    dy, dh = _grad((7, 123), torch.float32, g), _grad((7, 123), torch.float32, g)
    # only y: the residual stream's gradient is just the norm's
    y, _ = add_rms_norm(x, r, w)
    y.backward(dy)
    x64, r64, w64 = _f64(x, r, w)
    reference.add_rms_norm(x64, r64, w64, EPS)[0].backward(dy.double())
    for got, want in ((x.grad, x64.grad), (r.grad, r64.grad), (w.grad, w64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # only h: gradients pass straight through the add, the weight gets none
    for t in (x, r, w):
        t.grad = None
    add_rms_norm(x, r, w)[1].backward(dh)
    assert torch.equal(x.grad, dh) and torch.equal(r.grad, dh) and w.grad is None


def test_weight_gradient_is_deterministic():
    """No atomics: the same inputs give bit-identical dw (and dx). Only a GPU, where programs
    run concurrently, could break this; the interpreter runs them one after another."""
    g = torch.Generator().manual_seed(23)
    x, w = _leaf((10, 4000), torch.float32, g), _weight(4000, torch.float32, g)
    dy = _grad((10, 4000), torch.float32, g)
    grads = []
    for _ in range(2):
        x.grad = w.grad = None
        rms_norm(x, w).backward(dy)
        grads.append((x.grad.clone(), w.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_no_rows():
    x, w = torch.zeros(0, 64, device=DEVICE, requires_grad=True), torch.ones(64, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert w.grad.shape == (64,) and not w.grad.any()


@pytest.mark.parametrize(
    "fn, x_shape, w_shape, extra, error, message",
    [
        ("rms_norm", (4, 64), (63,), {}, ValueError, r"weight must have shape \(C,\) = \(64,\)"),
        ("rms_norm", (4, 64), (1, 64), {}, ValueError, "weight must have shape"),
        ("add_rms_norm", (4, 64), (64,), {"residual": (4, 65)}, ValueError, "residual must have x's shape"),
        ("add_rms_norm", (4, 64), (64,), {"residual": (4, 64), "residual_dtype": torch.float16}, TypeError,
         "residual must have x's dtype"),
        ("rms_norm", (1, 65537), (65537,), {}, ValueError, f"MAX_HIDDEN = {65536}"),
        ("rms_norm", (4, 64), (64,), {"x_dtype": torch.int32}, TypeError, "x must be float32"),
        ("rms_norm", (4, 64), (64,), {"w_dtype": torch.float64}, TypeError, "weight must be float32"),
        ("rms_norm", (4, 64), (64,), {"eps": -1.0}, ValueError, "eps must be finite and >= 0"),
        ("rms_norm", (4, 64), (64,), {"eps": float("nan")}, ValueError, "eps must be finite"),
        ("rms_norm", (), (64,), {}, ValueError, r"x must be a tensor of shape \(\.\.\., C\)"),
    ],
)
def test_bad_inputs_name_the_argument(fn, x_shape, w_shape, extra, error, message):
    assert MAX_HIDDEN == 65536
    x = torch.zeros(x_shape, dtype=extra.get("x_dtype", torch.float32), device=DEVICE)
    w = torch.ones(w_shape, dtype=extra.get("w_dtype", torch.float32), device=DEVICE)
    eps = extra.get("eps", EPS)
    with pytest.raises(error, match=message):
        if fn == "rms_norm":
            rms_norm(x, w, eps)
        else:
            r = torch.zeros(extra["residual"], dtype=extra.get("residual_dtype", x.dtype), device=DEVICE)
            add_rms_norm(x, r, w, eps)


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter only")
def test_bf16_under_the_interpreter_is_refused_with_the_reason():
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 does not work under the Triton interpreter"):
        rms_norm(x, torch.ones(64, dtype=torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels: run with TRITON_INTERPRET=0 on a CUDA machine")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_ids)
@pytest.mark.parametrize("shape", [(4, 257, 4096), (33, 5120), (3, 100, 8192), (17, 16384), (5, 65536), (999, 123)],
                         ids=_ids)
def test_gpu_low_precision_within_twice_pytorch_error(shape, dtype):
    """Model-sized rows: single tiles up to 8192 (4096 at 8 warps, 8192 at 16), chunked above,
    and many rows per backward program."""
    g = torch.Generator().manual_seed(shape[-1])
    x, r = _leaf(shape, dtype, g), _leaf(shape, dtype, g)
    w = _weight(shape[-1], dtype, g)
    _compare_rms_norm(x, w, dtype, seed=shape[-1])
    for t in (x, w):
        t.grad = None
    _compare_add_rms_norm(x, r, w, dtype, seed=shape[-1])
