"""The Triton cross-entropy kernel against a float64 reference: loss and dlogits.

Runs under ``TRITON_INTERPRET=1`` on CPU (fp32 and fp16; the interpreter caps BLOCK_V at
``INTERPRETER_BLOCK_V`` = 64, so V = 1000 crosses 16 chunks with a ragged last one, V = 97 two,
and V = 37 is smaller than one block) and on a CUDA GPU with the compiled kernel (adds bf16 and
real vocabulary sizes). Every launch allocates its outputs (per-row losses, lse, the gradient
buffer) poisoned with NaN, so an element the kernel forgets to write fails the comparison.

Tolerances
----------
The reference is ``kernels.reference.cross_entropy`` on the same logits cast to float64, so the
input rounding is shared and only the kernel's own arithmetic differs.

loss (any input dtype): the kernel computes in fp32 and returns fp32. Each row's loss is
(m - z_t) + log(l) with l a sum of at most V terms in [0, 1]: relative error of order 1e-7
(measured: at most 1.1e-7 over these cases). rtol 1e-5 leaves a wide margin and still fails on
any real mistake (a wrong max, a missed chunk or target moves the loss by > 1e-3).
dlogits fp32: each element s * (exp(z - m) / l - [j == t]) is a handful of fp32 operations
(measured: relative error at most 7.6e-7): rtol 1e-5, plus atol 1e-9 for elements whose exact
value is ~0 (probabilities of 1e-9 times s; measured error there at most 4e-11).
dlogits fp16: beyond fp32 arithmetic, the gradient is rounded to fp16 twice (when the forward
stores it and when backward scales it by grad_output g = 3.7), each within half an ulp:
relative error at most 2 x 2^-11 = 2^-10 for normal numbers, plus 1e-5 for the fp32 part. A
gradient stored in fp16's subnormal range (below 6.1e-5, spacing 2^-24) by the forward keeps
an absolute error of up to 2^-25, which the backward multiplies by g: at most
(g + 1) x 2^-25 = 1.4e-7 (measured: 1.4e-7), covered by atol 2^-21 = 4.8e-7.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama_mini import kernels
from llama_mini.kernels import reference
from llama_mini.kernels.common import empty, is_interpreting

pytestmark = pytest.mark.skipif(not kernels.triton_available(), reason=kernels.triton_unavailable_reason())

if kernels.triton_available():
    from llama_mini.kernels.common import poisoned_outputs
    from llama_mini.kernels.cross_entropy import INTERPRETER_BLOCK_V, block_config, cross_entropy, cross_entropy_rows

DEVICE = "cuda" if torch.cuda.is_available() and not is_interpreting() else "cpu"

GRAD_TOL = {  # dtype -> (rtol, atol) for dlogits, see the module docstring
    torch.float32: (1e-5, 1e-9),
    torch.float16: (2**-10 + 1e-5, 2**-21),
    torch.bfloat16: (2**-7 + 1e-5, 1e-30),  # bf16 keeps fp32's exponent range: no subnormals here
}


def _inputs(shape, V, dtype, seed, ignore_index=-100, ignore_frac=0.25, scale=3.0, offset=0.0):
    """Leaf logits (*shape, V) ~ offset + scale * N(0, 1) and targets (*shape) in [0, V), with
    about ``ignore_frac`` of them (at least one when there are several) set to ignore_index."""
    g = torch.Generator().manual_seed(seed)
    logits = (offset + scale * torch.randn(*shape, V, generator=g, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, V, shape, generator=g)
    ignored = torch.rand(shape, generator=g) < ignore_frac
    if targets.numel() > 1:
        ignored.view(-1)[0] = True
        ignored.view(-1)[-1] = False
    targets[ignored] = ignore_index
    return logits.to(DEVICE).requires_grad_(), targets.to(DEVICE)


def _reference(logits, targets, ignore_index, reduction, grad_output):
    """float64 loss and dlogits of grad_output * loss from kernels.reference."""
    z64 = logits.detach().double().requires_grad_()
    loss = reference.cross_entropy(z64, targets, ignore_index, reduction)
    (loss * grad_output).backward()
    return loss.detach(), z64.grad


def _check(logits, targets, ignore_index=-100, reduction="mean", grad_output=3.7):
    with poisoned_outputs():
        loss = cross_entropy(logits, targets, ignore_index, reduction)
        (loss * grad_output).backward()
    want_loss, want_grad = _reference(logits, targets, ignore_index, reduction, grad_output)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert logits.grad.dtype == logits.dtype and logits.grad.shape == logits.shape
    assert not torch.isnan(logits.grad).any(), "NaN in dlogits (an unwritten element?)"
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    rtol, atol = GRAD_TOL[logits.dtype]
    torch.testing.assert_close(logits.grad.double(), want_grad, rtol=rtol, atol=atol)
    return loss


CASES = [
    # leading shape, V
    ((2, 4), 1000),  # (B, T, V); 16 chunks of 64 in the interpreter, the last one ragged
    ((17,), 97),  # two chunks, the second nearly empty
    ((2, 3), 37),  # V smaller than one block
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,V", CASES, ids=[f"{'x'.join(map(str, s))}-V{v}" for s, v in CASES])
def test_matches_float64_reference(shape, V, dtype, reduction):
    logits, targets = _inputs(shape, V, dtype, seed=V + len(shape))
    assert (targets == -100).any() and (targets != -100).any()  # some rows ignored, some not
    _check(logits, targets, reduction=reduction)


def test_interpreter_blocks_cover_the_cases():
    """The shapes above mean what their comments say only if the interpreter's block is 64."""
    if DEVICE == "cpu":
        assert INTERPRETER_BLOCK_V == 64
    assert block_config(32000) == (4096, 8)
    assert block_config(2000) == (2048, 4)
    assert block_config(97) == (128, 1)
    assert block_config(3) == (16, 1)


@pytest.mark.parametrize("ignore_index", [-1, 0])
def test_custom_ignore_index(ignore_index):
    """ignore_index 0 is also a valid class: targets equal to 0 must be dropped, not scored."""
    logits, targets = _inputs((4, 6), 97, torch.float32, seed=5 - ignore_index, ignore_index=ignore_index)
    loss = _check(logits, targets, ignore_index=ignore_index)
    # the default ignore_index would have counted (0) or rejected (-1) those targets
    if ignore_index == 0:
        assert abs(loss.item() - reference.cross_entropy(logits.detach().double(), targets).item()) > 1e-3


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_fully_ignored_batch_gives_zero_loss_and_zero_gradient(reduction):
    logits, targets = _inputs((3, 4), 97, torch.float32, seed=7, ignore_frac=1.0)
    targets.fill_(-100)
    with poisoned_outputs():
        loss = cross_entropy(logits, targets, reduction=reduction)
        loss.backward()
    assert loss.item() == 0.0  # no NaN from 0 / 0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("offset,scale", [(1e4, 3.0), (0.0, 1e4), (-1e4, 1.0)],
                         ids=["offset+1e4", "spread1e4", "offset-1e4"])
def test_large_logits_do_not_overflow(offset, scale):
    """exp(1e4) overflows fp32; the online max keeps every exponent <= 0. With a large common
    offset, z - m is still exact, so the fp32 tolerances hold."""
    logits, targets = _inputs((2, 5), 300, torch.float32, seed=11, offset=offset, scale=scale)
    loss = _check(logits, targets)
    assert torch.isfinite(loss)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
def test_ignored_rows_may_hold_garbage():
    """An ignored row contributes exactly nothing, even if its logits are inf or NaN."""
    logits, targets = _inputs((6,), 97, torch.float32, seed=13, ignore_frac=0.0)
    targets[2] = -100
    with torch.no_grad():
        logits[2, :50] = float("nan")
        logits[2, 60] = float("inf")
    with poisoned_outputs():
        loss = cross_entropy(logits, targets)
        loss.backward()
    keep = torch.tensor([0, 1, 3, 4, 5])
    want_loss, want_grad = _reference(logits[keep], targets[keep], -100, "mean", 1.0)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad[keep].double(), want_grad, rtol=1e-5, atol=1e-9)
    assert torch.equal(logits.grad[2], torch.zeros(97, device=DEVICE))


def test_rows_launcher_in_place_equals_out_of_place():
    """grad=logits overwrites the logits with the gradient, bit for bit what a separate buffer
    gets; per-row losses and lse match float64; a strided row view (row stride > V) is read
    through its stride."""
    V, N, scale = 200, 9, 0.125
    g = torch.Generator().manual_seed(17)
    wide = torch.randn(N, V + 24, generator=g).to(DEVICE) * 4
    logits = wide[:, :V]  # rows 224 apart: no copy is made
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    targets[[1, 4]] = -100
    z64 = logits.double()
    want_rows = F.cross_entropy(z64, targets, ignore_index=-100, reduction="none")
    want_lse = torch.logsumexp(z64, -1)
    counted = (targets != -100)[:, None]
    want_grad = (torch.softmax(z64, -1) - F.one_hot(targets.clamp(min=0), V)) * scale * counted

    with poisoned_outputs():
        out = empty(N, V, dtype=torch.float32, device=DEVICE)  # NaN: every element must be written
        rows_a, lse_a = cross_entropy_rows(logits, targets, -100, scale, grad=out)
        rows_none, lse_none = cross_entropy_rows(logits, targets, -100, scale)
        in_place = logits.clone()
        rows_b, lse_b = cross_entropy_rows(in_place, targets, -100, scale, grad=in_place)
    assert torch.equal(in_place, out)
    assert torch.equal(rows_a, rows_b) and torch.equal(lse_a, lse_b)
    assert torch.equal(rows_a, rows_none) and torch.equal(lse_a, lse_none)
    assert rows_a.dtype == lse_a.dtype == torch.float32 and rows_a.shape == lse_a.shape == (N,)
    torch.testing.assert_close(rows_a.double(), want_rows, rtol=1e-5, atol=1e-6)
    assert torch.equal(rows_a[[1, 4]], torch.zeros(2, device=DEVICE))
    torch.testing.assert_close(lse_a.double(), want_lse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), want_grad, rtol=1e-5, atol=1e-9)
    assert torch.equal(wide[:, :V], logits) and not torch.equal(in_place, logits)  # the clone was overwritten


def test_inputs_without_a_contiguous_last_dim_are_copied_not_misread():
    """(B, T, V) logits whose last stride is 8 and transposed (strided) targets."""
    g = torch.Generator().manual_seed(19)
    logits = torch.randn(97, 2, 4, generator=g).to(DEVICE).permute(1, 2, 0).requires_grad_()  # (2, 4, 97)
    targets = torch.randint(0, 97, (4, 2), generator=g).to(DEVICE).t()  # (2, 4)
    targets[0, 1] = -100
    assert logits.stride(-1) != 1 and not targets.is_contiguous()
    _check(logits, targets)


def test_no_gradient_is_computed_when_none_is_needed():
    logits, targets = _inputs((4, 3), 97, torch.float32, seed=23)
    with torch.no_grad():
        a = cross_entropy(logits, targets)
    b = cross_entropy(logits.detach(), targets)
    assert not a.requires_grad and not b.requires_grad
    want, _ = _reference(logits, targets, -100, "mean", 1.0)
    torch.testing.assert_close(a.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(a, b)


def test_a_second_backward_through_the_same_graph_is_refused():
    """backward scales the gradient buffer in place, so running it twice would be wrong."""
    logits, targets = _inputs((2, 3), 37, torch.float32, seed=29)
    loss = cross_entropy(logits, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("bad", [37, -5, -100 + 1])
def test_out_of_range_targets_are_named(bad):
    logits, targets = _inputs((2, 3), 37, torch.float32, seed=31)
    targets[1, 2] = bad
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, 37\).*got {bad} \(1 bad value\)"):
        cross_entropy(logits, targets)
    with pytest.raises(ValueError, match=rf"targets.*got {bad}"):
        cross_entropy_rows(logits.detach().reshape(6, 37), targets.reshape(6), -100, 1.0)


def test_bad_arguments_are_named():
    z = torch.zeros(6, 37, device=DEVICE)
    t = torch.zeros(6, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        cross_entropy(z, t, reduction="none")
    with pytest.raises(ValueError, match=r"targets must have logits' leading shape \(6,\)"):
        cross_entropy(z, t[:5])
    with pytest.raises(TypeError, match="targets must be int64 or int32"):
        cross_entropy(z, t.float())
    with pytest.raises(TypeError, match="logits must be float32, float16 or bfloat16"):
        cross_entropy(z.double(), t)
    with pytest.raises(ValueError, match="vocabulary dim of at least 1|V >= 1"):
        cross_entropy(z[:, :0], t)
    with pytest.raises(ValueError, match=r"logits must be a 2-D tensor \(N, V\)"):
        cross_entropy_rows(z[None], t, -100, 1.0)
    with pytest.raises(ValueError, match="logits must have a unit last stride"):
        cross_entropy_rows(torch.zeros(37, 6, device=DEVICE).t(), t, -100, 1.0)
    with pytest.raises(ValueError, match="targets must be a 1-D tensor of N=6"):
        cross_entropy_rows(z, t[:, None], -100, 1.0)
    with pytest.raises(ValueError, match=r"grad must have the logits' shape \(6, 37\)"):
        cross_entropy_rows(z, t, -100, 1.0, grad=z[:, :36])
    with pytest.raises(ValueError, match="grad must have a unit last stride"):
        cross_entropy_rows(z, t, -100, 1.0, grad=torch.zeros(37, 6, device=DEVICE).t())
    with pytest.raises(TypeError, match="grad must be float32, float16 or bfloat16"):
        cross_entropy_rows(z, t, -100, 1.0, grad=z.double())
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="targets are on meta but logits on cpu"):
            cross_entropy_rows(z, t.to("meta"), -100, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernel: run with TRITON_INTERPRET=0 on a CUDA machine")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape,V", [((4, 512), 32000), ((3, 100), 50257), ((2, 7), 97), ((5, 9), 2000)])
def test_gpu_matches_float64_reference(shape, V, dtype):
    logits, targets = _inputs(shape, V, dtype, seed=V)
    _check(logits, targets)


def test_fp16_gradient_survives_a_loss_scale():
    """The fp16 gradient buffer holds softmax - onehot unscaled; the mean's 1/n and the loss
    scale are applied together in fp32 and the result rounded once. Checked on the entries the
    order matters for: probabilities p that are normal fp16 numbers (>= 1e-4) while p / n is
    subnormal (< 6.1e-5, spacing 6e-8: a few % error if rounded there); scaled by 2^16 / n they
    are ordinary numbers again. Bound: 4e-3 relative (fp16 rounding is 2^-11 = 4.9e-4).
    (Probabilities below fp16's normal range lose relative precision in any fp16 buffer.)"""
    g = torch.Generator().manual_seed(0)
    N, V = 48, 40
    logits = (torch.randn(N, V, generator=g) * 4).half().to(DEVICE).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    (cross_entropy(logits, t) * 65536.0).backward()
    z64 = logits.detach().double().requires_grad_()
    (reference.cross_entropy(z64, t) * 65536.0).backward()
    p = torch.softmax(z64.detach(), dim=-1)
    picked = (p >= 1e-4) & (p / N < 6.1e-5)
    assert picked.sum() > 100
    err = ((logits.grad.double() - z64.grad).abs() / z64.grad.abs())[picked].max()
    assert err < 4e-3, f"relative error {err:.3g} where p is normal but p / n subnormal in fp16"
