"""The Triton GEMM and the fused linear + cross-entropy against float64 references.

Runs under ``TRITON_INTERPRET=1`` on CPU (fp32 and fp16; the interpreter tiles the GEMM 32 x 32
x 16, so C = 123, V = 97 and 37-row inputs cross ragged tile edges in every dimension) and on a
CUDA GPU with the compiled kernels (adds bf16, which the interpreter cannot run: triton issue
11584). Every launch runs under ``poisoned_outputs()``: buffers the launchers allocate (GEMM
outputs, the chunk logits, dx, dW, the loss rows) start as NaN, so an element nobody writes
fails the comparison instead of passing as a stale zero.

Tolerances
----------
fp32: the kernels compute in fp32 what the reference computes in float64; every element is a
sum of at most a few hundred O(1) products, so fp32 rounding leaves relative errors of ~1e-7
(measured: 2e-8 of the tensor's largest element for dW). We allow 1e-5 relative plus 1e-5 of the
tensor's largest magnitude (gradients mix large and tiny elements); a wrong scale, a missed
ignore or a dropped chunk moves results by 1e-2 or more.
fp16 (and mixed fp16 x / fp32 W): the flash-attention rule. The kernel's error against float64
must be at most twice the error PyTorch makes computing the same loss in fp16 (fp16 logits,
fp16 cross-entropy and backward; W rounded to fp16 where it is fp32), plus 1e-6.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama_mini import kernels
from llama_mini.kernels import reference
from llama_mini.kernels.common import is_interpreting

pytestmark = pytest.mark.skipif(not kernels.triton_available(), reason=kernels.triton_unavailable_reason())

if kernels.triton_available():
    from llama_mini.kernels.common import poisoned_outputs
    from llama_mini.kernels.linear_cross_entropy import (
        aot_specs,
        compute_dtype_for,
        default_chunk_size,
        gemm_configs,
        linear_cross_entropy,
        matmul,
    )

DEVICE = "cuda" if torch.cuda.is_available() and not is_interpreting() else "cpu"
DTYPES = [torch.float32, torch.float16]
IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _check(name, got, want, baseline=None):
    """fp32 rule when ``baseline`` is None, else kernel error <= 2 x PyTorch's low-precision error."""
    got, want = got.double(), want.double()
    assert not torch.isnan(got).any(), f"{name}: NaN in the kernel's result (an unwritten element?)"
    if baseline is None:
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")
    else:
        err = (got - want).abs().max().item()
        base = (baseline.double() - want).abs().max().item()
        assert err <= 2 * base + 1e-6, f"{name}: error {err:.3g} > 2 x PyTorch low-precision error {base:.3g}"


# --------------------------------------------------------------------------------------------
# GEMM
# --------------------------------------------------------------------------------------------


def _operand(rows, cols, dtype, seed, transposed):
    """(rows, cols) tensor; ``transposed``: a .t() view of a (cols, rows) one (unit row stride)."""
    if transposed:
        return _randn(cols, rows, seed=seed).to(DEVICE, dtype).t()
    return _randn(rows, cols, seed=seed).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
@pytest.mark.parametrize("M,K,N,a_t,b_t", [
    (37, 123, 50, False, False),
    (37, 123, 50, True, True),  # both operands are transposed views, read in place
    (64, 32, 96, False, True),  # whole tiles: W^T as in the logits product
    (1, 45, 33, True, False),  # one row: G^T-like operand with unit M stride
])
def test_matmul_matches_float64(M, K, N, a_t, b_t, dtype):
    a = _operand(M, K, dtype, seed=M + K, transposed=a_t)
    b = _operand(K, N, dtype, seed=K + N, transposed=b_t)
    want = a.double() @ b.double()
    with poisoned_outputs():
        wide = matmul(a, b, out_dtype=torch.float32)  # fp32 output: only the accumulation rounds
        c = matmul(a, b)  # default: the compute dtype
    assert c.dtype == dtype and wide.dtype == torch.float32
    # fp16 products are exact in fp32, so the fp32-output result meets the fp32 rule either way
    _check("c (fp32 out)", wide, want)
    _check("c", c, want, None if dtype == torch.float32 else a @ b)


def test_matmul_accumulate_alpha_and_strided_out():
    a = _operand(37, 123, torch.float32, seed=1, transposed=True)
    b = _operand(123, 50, torch.float32, seed=2, transposed=False)
    c0 = _randn(50, 37, seed=3).to(DEVICE)
    out = c0.clone().t()  # (37, 50) with unit row stride
    with poisoned_outputs():
        got = matmul(a, b, out=out, accumulate=True, alpha=0.25)
    assert got.data_ptr() == out.data_ptr()
    _check("out += 0.25 a b", out, c0.t().double() + 0.25 * (a.double() @ b.double()))
    # without accumulate the old contents are overwritten, not added to
    matmul(a, b, out=out, alpha=-2.0)
    _check("out = -2 a b", out, -2.0 * (a.double() @ b.double()))


def test_matmul_mixed_dtypes_compute_in_the_lower_precision():
    """fp32 a times fp16 b: each a tile is rounded to fp16 when loaded (the lower precision of
    the two), products accumulate in fp32. The float64 product of fp16-rounded a matches to fp32
    accuracy, while the exact product differs by ~1e-3: an fp32 kernel would fail the first check."""
    a = _operand(37, 123, torch.float32, seed=4, transposed=False)
    b = _operand(123, 50, torch.float16, seed=5, transposed=True)
    assert compute_dtype_for(a.dtype, b.dtype) == torch.float16
    with poisoned_outputs():
        c = matmul(a, b, out_dtype=torch.float32)
    _check("c", c, a.half().double() @ b.double())
    assert (c.double() - a.double() @ b.double()).abs().max() > 1e-4  # the rounding is visible


def test_matmul_errors_name_the_argument():
    a, b = torch.zeros(4, 8, device=DEVICE), torch.zeros(8, 3, device=DEVICE)
    with pytest.raises(ValueError, match="a must be a 2-D tensor"):
        matmul(a[None], b)
    with pytest.raises(ValueError, match=r"a \(4, 8\) and b \(7, 3\) have different inner sizes"):
        matmul(a, b[:7])
    with pytest.raises(TypeError, match="b must be fp16, bf16 or fp32"):
        matmul(a, b.double())
    with pytest.raises(TypeError, match="no common compute dtype"):
        matmul(a.half(), b.bfloat16())
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        matmul(a, b, accumulate=True)
    with pytest.raises(TypeError, match="accumulate=True adds into an fp32 out"):
        matmul(a, b, out=torch.zeros(4, 3, dtype=torch.float16, device=DEVICE), accumulate=True)
    with pytest.raises(ValueError, match=r"out must have shape \(4, 3\)"):
        matmul(a, b, out=torch.zeros(3, 4, device=DEVICE))
    if is_interpreting():
        with pytest.raises(ValueError, match="a is bfloat16, which does not work under the Triton interpreter"):
            matmul(a.bfloat16(), b)


# --------------------------------------------------------------------------------------------
# Fused linear + cross-entropy
# --------------------------------------------------------------------------------------------


def _lce_inputs(lead, C, V, x_dtype, w_dtype, seed, ignored=()):
    x = _randn(*lead, C, seed=seed).to(DEVICE, x_dtype).requires_grad_()
    w = _randn(V, C, seed=seed + 1, scale=C**-0.5).to(DEVICE, w_dtype).requires_grad_()  # O(1) logits
    t = torch.randint(0, V, lead, generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE)
    flat = t.view(-1)
    for i in ignored:
        flat[i] = -100
    return x, w, t


def _torch_low_precision(x, w, t, reduction, grad_out, dtype):
    """The loss and gradients as PyTorch computes them in ``dtype`` (w cast to it, as autocast
    does): the baseline error of that precision."""
    x1 = x.detach().to(dtype).requires_grad_()
    w1 = w.detach().to(dtype).requires_grad_()
    z = x1 @ w1.t()
    loss = F.cross_entropy(z.reshape(-1, z.shape[-1]), t.reshape(-1), ignore_index=-100, reduction=reduction)
    loss.backward(torch.tensor(grad_out, dtype=loss.dtype, device=loss.device))
    return loss.detach(), x1.grad, w1.grad


def _run_and_compare(x, w, t, *, reduction="mean", chunk_size=None, grad_out=1.0):
    with poisoned_outputs():
        loss = linear_cross_entropy(x, w, t, reduction=reduction, chunk_size=chunk_size)
        loss.backward(torch.tensor(grad_out, device=DEVICE))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
    assert w.grad.dtype == w.dtype and w.grad.shape == w.shape
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = reference.linear_cross_entropy(x64, w64, t, reduction=reduction)
    ref.backward(torch.tensor(grad_out, dtype=torch.float64, device=DEVICE))
    low = compute_dtype_for(x.dtype, w.dtype)
    base = [None] * 3
    if low != torch.float32:
        base = _torch_low_precision(x, w, t, reduction, grad_out, low)
    _check("loss", loss, ref, base[0])
    _check("dx", x.grad, x64.grad, base[1])
    _check("dW", w.grad, w64.grad, base[2])
    return loss


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
def test_chunks_with_a_ragged_last_chunk_and_ignored_rows(dtype):
    """N = 37 in chunks of 16: 16 + 16 + 5, V = 97 and C = 123 not tile multiples."""
    x, w, t = _lce_inputs((37,), 123, 97, dtype, dtype, seed=11, ignored=(0, 15, 16, 36))
    _run_and_compare(x, w, t, chunk_size=16)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: IDS[d])
def test_leading_dims_sum_reduction_and_grad_output(dtype):
    """(B, T, C) input, reduction "sum" (no 1/n in the gradients), grad_output 0.37 (scales both
    gradients), default chunk size (Liger's rule: one chunk here, since C > V)."""
    x, w, t = _lce_inputs((2, 19), 123, 97, dtype, dtype, seed=12, ignored=(5,))
    assert default_chunk_size(38, 123, 97) == 38
    _run_and_compare(x, w, t, reduction="sum", grad_out=0.37)


def test_default_chunk_size_several_chunks():
    """V > C: the default chunk (next power of two of N / ceil(V / C)) splits 37 rows into 5."""
    assert default_chunk_size(37, 24, 97) == 8  # ceil(97 / 24) = 5; ceil(37 / 5) = 8
    assert default_chunk_size(1, 4096, 128256) == 1
    assert default_chunk_size(8192, 4096, 128256) == 256  # 256 x 128256 x 4 B ~ x in fp32
    x, w, t = _lce_inputs((37,), 24, 97, torch.float32, torch.float32, seed=13, ignored=(3,))
    _run_and_compare(x, w, t)


def test_fp16_x_with_fp32_master_weights():
    """Autocast-style mixed precision: products in fp16 (W cast per tile), dW in fp32."""
    x, w, t = _lce_inputs((37,), 123, 97, torch.float16, torch.float32, seed=14, ignored=(2,))
    _run_and_compare(x, w, t, chunk_size=16, grad_out=2.0)


def test_all_targets_ignored_gives_zero_loss_and_zero_gradients():
    x, w, t = _lce_inputs((2, 9), 123, 97, torch.float32, torch.float32, seed=15, ignored=range(18))
    with poisoned_outputs():
        loss = linear_cross_entropy(x, w, t, chunk_size=8)
        loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))


def test_only_the_gradients_asked_for_are_computed_and_no_grad_gives_the_same_loss():
    x, w, t = _lce_inputs((37,), 16, 97, torch.float32, torch.float32, seed=16, ignored=(1,))
    with poisoned_outputs():
        with torch.no_grad():
            plain = linear_cross_entropy(x, w, t, chunk_size=16)
        frozen_w = w.detach()
        loss = linear_cross_entropy(x, frozen_w, t, chunk_size=16)
        loss.backward()
    assert not plain.requires_grad
    assert torch.equal(plain, loss.detach())  # the same kernels in the same order
    ref = reference.linear_cross_entropy(x.double(), w.double(), t)
    _check("loss", plain, ref)
    assert w.grad is None and x.grad is not None and not torch.isnan(x.grad).any()


def test_second_backward_through_the_graph_raises():
    x, w, t = _lce_inputs((5,), 16, 20, torch.float32, torch.float32, seed=17)
    loss = linear_cross_entropy(x, w, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.skipif(DEVICE != "cpu", reason="the profiler's CPU memory events")
def test_no_allocation_the_size_of_the_full_logits():
    """With chunk_size < N the largest single allocation is one chunk of logits (or dW), never
    N x V. The same profiler sees the reference allocate N x V, so the check can fail."""
    from torch.profiler import ProfilerActivity, profile

    N, C, V, chunk = 64, 16, 200, 16  # C < N, so dW (V x C) is smaller than the logits (N x V)

    def largest_allocation(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return max(e.self_cpu_memory_usage for e in prof.events())

    x, w, t = _lce_inputs((2, 32), C, V, torch.float32, torch.float32, seed=18, ignored=(7,))
    out = {}

    def fused():
        out["loss"] = linear_cross_entropy(x, w, t, chunk_size=chunk)
        out["loss"].backward()

    biggest = largest_allocation(fused)
    assert biggest <= 4 * max(chunk * V, V * C) < 4 * N * V, f"an allocation of {biggest} B"
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    assert largest_allocation(lambda: reference.linear_cross_entropy(x64, w64, t).backward()) >= 8 * N * V
    _check("loss", out["loss"], reference.linear_cross_entropy(x64.detach(), w64.detach(), t))
    _check("dx", x.grad, x64.grad)
    _check("dW", w.grad, w64.grad)


def test_errors_name_the_argument():
    x, w, t = _lce_inputs((2, 3), 8, 11, torch.float32, torch.float32, seed=19)
    with pytest.raises(ValueError, match=r"weight \(11, 7\) must be \(V, C\) with C = x's last dim 8"):
        linear_cross_entropy(x, w[:, :7], t)
    with pytest.raises(ValueError, match=r"targets \(6,\) must have x's leading shape \(2, 3\)"):
        linear_cross_entropy(x, w, t.reshape(-1))
    with pytest.raises(TypeError, match="targets must be an int32 or int64 tensor"):
        linear_cross_entropy(x, w, t.float())
    with pytest.raises(TypeError, match="x must be fp16, bf16 or fp32"):
        linear_cross_entropy(x.double(), w, t)
    with pytest.raises(TypeError, match="x is torch.float16 and weight is torch.bfloat16"):
        linear_cross_entropy(x.half(), w.bfloat16(), t)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        linear_cross_entropy(x, w, t, reduction="none")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        linear_cross_entropy(x, w, t, chunk_size=0)
    bad = t.clone()
    bad[1, 2] = 11  # == V: out of range, and not ignore_index
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 11\)"):
        linear_cross_entropy(x, w, bad)


def test_aot_specs_cover_every_config_the_launcher_can_pick():
    """Cheap bookkeeping (no compiling): each (large, small) config of both operand families
    appears in aot_specs for both architecture families. ``llama-mini aot
    linear_cross_entropy`` compiles them."""
    for arch in (80, 90):
        specs = aot_specs(arch)
        assert all(s.kernel == "_matmul" for s in specs)
        labels = [s.label for s in specs]
        for family, kinds in ((False, ("logits",)), (True, ("dx", "dw"))):
            for cfg in gemm_configs(arch, fp32_operand=family):
                for kind in kinds:
                    assert any(lb.startswith(kind) and lb.endswith(cfg.label) for lb in labels), (arch, kind, cfg)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels: run with TRITON_INTERPRET=0 on a CUDA machine")
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16), (torch.float32, torch.float32)],
                         ids=["bf16", "bf16-x-fp32-W", "fp16", "fp32"])
@pytest.mark.parametrize("lead,C,V,chunk", [((4, 300), 256, 1000, None), ((2, 333), 200, 4099, 128)])
def test_gpu_matches_float64_reference(lead, C, V, chunk, x_dtype, w_dtype):
    x, w, t = _lce_inputs(lead, C, V, x_dtype, w_dtype, seed=V, ignored=(0, 7))
    _run_and_compare(x, w, t, chunk_size=chunk, grad_out=0.5)


def test_fp16_gradients_survive_a_loss_scale():
    """fp16 training scales the loss by 2^16 so small gradients stay normal numbers. The fused
    loss must not round dx to fp16 after the mean's 1/n and before that scale: here W's entries
    are ~3e-5, so dx/n ~ 1e-7 lies in fp16's subnormal range (spacing 6e-8, a few % error),
    while dx * 2^16 / n ~ 0.1 is an ordinary fp16 number (rounding 2^-11 relative). Rounded
    once, after both factors, the error stays at fp16 rounding of the result: bound 4e-3 of
    the largest entry, against 1.7e-2 measured for the earlier rounding order."""
    g = torch.Generator().manual_seed(0)
    N, C, V = 64, 16, 32
    x = torch.randn(N, C, generator=g).half().to(DEVICE).requires_grad_()
    w = (torch.randn(V, C, generator=g) * 3e-5).half().to(DEVICE).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    (linear_cross_entropy(x, w, t) * 65536.0).backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (reference.linear_cross_entropy(x64, w64, t) * 65536.0).backward()
    for name, got, want in (("dx", x.grad, x64.grad), ("dW", w.grad, w64.grad)):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 4e-3, f"{name}: error {err:.3g} of the largest entry"


@pytest.mark.parametrize("ignore_index", [0, -1], ids=["ignore-0", "ignore-minus-1"])
def test_custom_ignore_index_reaches_every_chunk(ignore_index):
    """ignore_index other than -100 (0 is also a real token id: those targets are not counted),
    over three chunks, so a chunk that fell back to the default -100 would count them."""
    x, w, t = _lce_inputs((37,), 24, 97, torch.float32, torch.float32, seed=14)
    t[[2, 20, 30, 36]] = ignore_index
    with poisoned_outputs():
        loss = linear_cross_entropy(x, w, t, ignore_index=ignore_index, chunk_size=16)
        loss.backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = reference.linear_cross_entropy(x64, w64, t, ignore_index=ignore_index)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-7)
