"""Cross-entropy over the vocabulary in Triton: an online log-sum-exp per row, with the gradient
written in the same launch.

Math
----
For one row of logits z (V,) and its target t (an index in [0, V), or ``ignore_index``)::

    m    = max_j z_j
    l    = sum_j exp(z_j - m)
    lse  = m + log(l)                                   the row's log-sum-exp (fp32)
    loss = lse - z_t = (m - z_t) + log(l)               0 on an ignored row

and the loss is reduced over the N rows: "sum" adds them, "mean" divides the sum by the number
of counted rows n (1 when nothing counts, so a fully ignored batch gives 0, not NaN).

Backward, for a counted row, with s = d total / d loss_row (1 for "sum", 1/max(n, 1) for "mean")::

    dz_j = s * (softmax(z)_j - [j == t]) = s * (exp(z_j - m) / l - [j == t])

and dz = 0 on ignored rows. Writing exp(z_j - m) / l rather than exp(z_j - lse) keeps the
gradient accurate when the logits are large: z_j - m is exact for neighbouring fp32 values,
whereas lse carries an absolute rounding error proportional to |m| (6e-4 at 1e4).

Kernel
------
One program per row loops over the vocabulary in BLOCK_V chunks, in fp32 whatever the input
dtype:

* pass 1 keeps a running max m and a running sum l, rescaling l by exp(m_old - m_new) whenever
  the max grows (one scalar exp per chunk, one exp per element), and reads z_t with one load;
* pass 2 (constexpr ``HAS_GRAD``) reads each chunk again and writes its gradient. A program
  reads its row completely in pass 1 and in pass 2 reads each chunk before writing that chunk,
  so the gradient may overwrite the logits in place (``grad=logits``). Ignored rows skip the
  second read and write zeros.

No (N, V) temporary is made besides the gradient buffer itself. The custom op (``custom_ops``) computes
the gradient in the forward launch (when autograd will need it), unscaled (softmax - onehot,
entries in [-1, 1]), and its backward multiplies that buffer by grad_output / n (the reduction's
scale, formed in fp32), in place, with a small elementwise kernel (``_scale_inplace``) that reads
the factor from device memory in fp32: no host transfer, and one rounding of a 16-bit buffer
after both factors. (Scaling by 1/n in the forward would round fp16 gradients into the
subnormal range before a loss scale arrives in grad_output; ``tensor.mul_`` with a 0-dim CUDA
tensor would round grad_output itself to the 16-bit dtype.)

Shapes and dtypes
-----------------
logits (..., V) fp32, fp16 or bf16 with the last dim contiguous (a copy is made otherwise);
targets (...) int32 or int64 with logits' leading shape. The loss is an fp32 scalar; the
gradient has logits' dtype. The launcher :func:`cross_entropy_rows` takes 2-D (N, V) logits
with unit last stride and returns per-row losses and log-sum-exps, (N,) fp32 each; the linear
cross-entropy kernel calls it on chunks of rows.

Block sizes
-----------
BLOCK_V is the next power of two of V, capped at 4096 (16 elements per thread with 8 warps);
num_warps grows with the block so each thread keeps 16 elements (two 16-byte loads of bf16).
No autotuning: the choice is deterministic and every configuration a realistic vocabulary
picks is compiled ahead of time by :func:`aot_specs`. Under the Triton interpreter BLOCK_V is
capped at :data:`INTERPRETER_BLOCK_V`, so small test vocabularies still cross several chunks.
"""

from __future__ import annotations


import torch

from .common import TRITON_DTYPE, check_device, empty, host_read, is_interpreting

import triton  # noqa: E402  (kernels/__init__ keeps the package importable without triton)
from triton import cdiv, next_power_of_2  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = [
    "cross_entropy",
    "cross_entropy_rows",
    "check_targets",
    "prepare_rows",
    "scale_",
    "block_config",
    "aot_specs",
    "MAX_BLOCK_V",
    "INTERPRETER_BLOCK_V",
]

MAX_BLOCK_V = 4096
INTERPRETER_BLOCK_V = 64
_MIN_BLOCK_V = 16
# The backward's in-place scaling: a plain elementwise kernel, 8 elements per thread.
_SCALE_BLOCK = 1024
_SCALE_WARPS = 4
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TARGET_DTYPES = (torch.int64, torch.int32)


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_fwd(
    LOGITS, TARGETS, GRAD, LOSS, LSE,
    stride_l, stride_t, stride_g,
    V, ignore_index, grad_scale,
    HAS_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Grid (N,). Writes LOSS[row] and LSE[row], and with HAS_GRAD the row's gradient."""
    row = tl.cast(tl.program_id(0), tl.int64)
    z_row = LOGITS + row * stride_l
    target = tl.load(TARGETS + row * stride_t).to(tl.int64)
    counted = target != ignore_index
    cols = tl.arange(0, BLOCK_V)

    # Pass 1: online max and sum of exponentials.
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + cols
        z = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        # A chunk of -inf logits (a masked-out vocabulary slice) before any finite one would
        # make exp(-inf - -inf) = NaN; shifting by 0 instead keeps both exponentials at 0.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_use) + tl.sum(tl.exp(z - m_use), 0)
        m = m_new
    z_t = tl.load(z_row + target, mask=counted, other=0.0).to(tl.float32)
    log_l = tl.log(l)
    tl.store(LSE + row, m + log_l)
    tl.store(LOSS + row, tl.where(counted, (m - z_t) + log_l, 0.0))

    # Pass 2: the gradient, each chunk read before the same chunk is written (in-place safe).
    if HAS_GRAD:
        g_row = GRAD + row * stride_g
        if counted:
            inv_l = grad_scale / l
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + cols
                ok = offs < V
                z = tl.load(z_row + offs, mask=ok, other=float("-inf")).to(tl.float32)
                g = tl.exp(z - m) * inv_l
                g = tl.where(offs == target, g - grad_scale, g)
                tl.store(g_row + offs, g.to(GRAD.dtype.element_ty), mask=ok)
        else:
            zero = tl.zeros([BLOCK_V], dtype=GRAD.dtype.element_ty)
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + cols
                tl.store(g_row + offs, zero, mask=offs < V)


@triton.jit
def _scale_inplace(G, S, numel, BLOCK: tl.constexpr):
    """Grid (cdiv(numel, BLOCK),). G[i] *= S[0] for a contiguous G, the product taken in fp32 so
    a scale such as 1/3 is not first rounded to G's dtype."""
    offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    s = tl.load(S).to(tl.float32)
    g = tl.load(G + offs, mask=ok).to(tl.float32)
    tl.store(G + offs, (g * s).to(G.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def block_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) the launcher uses for a vocabulary of V on a GPU: the next power of
    two of V within [16, MAX_BLOCK_V], and enough warps for 16 elements per thread (1 to 8)."""
    block_v = min(max(next_power_of_2(V), _MIN_BLOCK_V), MAX_BLOCK_V)
    return block_v, max(1, min(8, block_v // 512))


def _check_device(t: torch.Tensor, name: str) -> None:
    check_device("cross_entropy", name, t.device)


def check_targets(targets: torch.Tensor, V: int, ignore_index: int) -> int:
    """Validate every target (in [0, V) or == ignore_index) and count the counted ones, with a
    single device-to-host transfer. Returns the count."""
    if targets.numel() == 0:
        return 0
    counted = targets != ignore_index
    bad = counted & ((targets < 0) | (targets >= V))
    n_bad, n_counted = host_read(torch.stack((bad.sum(), counted.sum())))
    if n_bad:
        first = int(targets[bad][0])
        raise ValueError(f"cross_entropy: targets must lie in [0, {V}) or equal ignore_index={ignore_index}; "
                         f"got {first} ({n_bad} bad value{'s' if n_bad > 1 else ''})")
    return int(n_counted)


def _validate_rows(logits, targets, grad) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("cross_entropy_rows: logits must be a 2-D tensor (N, V), "
                         f"got {getattr(logits, 'shape', type(logits))}")
    N, V = logits.shape
    if V < 1:
        raise ValueError("cross_entropy: logits must have a vocabulary dim of at least 1, got 0")
    if logits.dtype not in _DTYPES:
        raise TypeError(f"cross_entropy: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.stride(1) != 1 and V > 1:
        raise ValueError(f"cross_entropy_rows: logits must have a unit last stride, got strides {logits.stride()}")
    _check_device(logits, "logits")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.shape[0] != N:
        raise ValueError(f"cross_entropy_rows: targets must be a 1-D tensor of N={N} row targets, "
                         f"got {getattr(targets, 'shape', type(targets))}")
    if targets.dtype not in _TARGET_DTYPES:
        raise TypeError(f"cross_entropy: targets must be int64 or int32, got {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"cross_entropy: targets are on {targets.device} but logits on {logits.device}")
    if grad is not None:
        if not isinstance(grad, torch.Tensor) or tuple(grad.shape) != (N, V):
            raise ValueError(f"cross_entropy_rows: grad must have the logits' shape {(N, V)}, "
                             f"got {getattr(grad, 'shape', type(grad))}")
        if grad.dtype not in _DTYPES:
            raise TypeError(f"cross_entropy_rows: grad must be float32, float16 or bfloat16, got {grad.dtype}")
        if grad.stride(1) != 1 and V > 1:
            raise ValueError(f"cross_entropy_rows: grad must have a unit last stride, got strides {grad.stride()}")
        if grad.device != logits.device:
            raise ValueError(f"cross_entropy_rows: grad is on {grad.device} but logits on {logits.device}")


def _launch(logits, targets, ignore_index, grad_scale, grad):
    """Run the kernel on validated inputs (targets already checked). Returns (loss_rows, lse)."""
    N, V = logits.shape
    loss_rows = empty(N, dtype=torch.float32, device=logits.device)
    lse = empty(N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return loss_rows, lse
    block_v, num_warps = block_config(V)
    if is_interpreting():
        block_v = min(block_v, INTERPRETER_BLOCK_V)
    has_grad = grad is not None
    g = grad if has_grad else logits  # a placeholder pointer the kernel never touches
    _cross_entropy_fwd[(N,)](
        logits, targets, g, loss_rows, lse,
        logits.stride(0), targets.stride(0), g.stride(0),
        V, int(ignore_index), float(grad_scale),
        HAS_GRAD=has_grad, BLOCK_V=block_v, num_warps=num_warps,
    )
    return loss_rows, lse


def scale_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad *= grad_output (a 0-dim tensor) in place, without a host transfer; grad contiguous."""
    s = grad_output.detach().to(device=grad.device, dtype=torch.float32).reshape(1)
    n = grad.numel()
    if n:
        block = INTERPRETER_BLOCK_V if is_interpreting() else _SCALE_BLOCK
        _scale_inplace[(cdiv(n, block),)](grad, s, n, BLOCK=block, num_warps=_SCALE_WARPS)
    return grad


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    grad_scale: float,
    grad: torch.Tensor | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy, optionally writing the scaled gradient in the same launch.

    logits: (N, V) fp32/fp16/bf16 with unit last stride (any row stride). targets: (N,) int32 or
    int64, each in [0, V) or equal to ``ignore_index`` (checked with one host transfer;
    ValueError naming ``targets`` otherwise; ``check=False`` skips that for callers that already
    ran :func:`check_targets` on all their targets). grad_scale: Python float multiplying the written
    gradient (e.g. 1 / n_counted for a mean). grad: None (no gradient) or an (N, V) tensor with
    unit last stride that receives (softmax(z) - onehot(target)) * grad_scale, zeros on ignored
    rows; it may be ``logits`` itself (overwritten in place).

    Returns (loss_rows, lse), (N,) fp32 each: lse - z[target] (0 on ignored rows) and lse.
    """
    _validate_rows(logits, targets, grad)
    if check:
        check_targets(targets, logits.shape[1], ignore_index)
    return _launch(logits, targets, ignore_index, grad_scale, grad)


def prepare_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """Validate logits (..., V) and targets (...), flatten them to rows and check every target
    (one host read). Returns (flat (N, V), flat_targets (N,), n_counted).

    Logits whose last dim is strided are copied once (the kernel reads rows as contiguous
    chunks); the reshape is a view when the leading dims flatten to one row stride, as a linear
    layer's (B, T, V) always does, and a copy otherwise."""
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"cross_entropy: logits must be (..., V) with V >= 1, got {tuple(logits.shape)}")
    V = logits.shape[-1]
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets must have logits' leading shape {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if logits.stride(-1) != 1 and V > 1:
        logits = logits.contiguous()
    flat, flat_targets = logits.reshape(-1, V), targets.reshape(-1)
    _validate_rows(flat, flat_targets, None)
    return flat, flat_targets, check_targets(flat_targets, V, ignore_index)


# --------------------------------------------------------------------------------------------
# Autograd and the user-facing function
# --------------------------------------------------------------------------------------------


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Token cross-entropy, a scalar fp32 loss (same contract as ``llama_mini.kernels.reference.cross_entropy``).

    logits: (..., V) fp32/fp16/bf16; targets: (...) int32/int64 with logits' leading shape, each
    in [0, V) or equal to ``ignore_index`` (not counted). reduction: "mean" over counted
    targets (0 when none counts) or "sum". Differentiable in logits, through the custom op
    ``llama_mini::cross_entropy_fwd``: the gradient is computed in the forward launch into a
    buffer of logits' dtype, unscaled, and the backward multiplies it in place by grad_output
    times the reduction's 1/n (formed in fp32), so the loss costs one (N, V) buffer beyond the
    logits, never two, and a second backward through one graph raises.
    """
    from .custom_ops import cross_entropy as op

    return op(logits, targets, ignore_index, reduction)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (llama-mini aot cross_entropy)
# --------------------------------------------------------------------------------------------

def _aot_signature(dtype: str) -> dict[str, str]:
    from .aot import signature

    types = dict(LOGITS=f"*{dtype}", GRAD=f"*{dtype}", TARGETS="*i64", LOSS="*fp32", LSE="*fp32", grad_scale="fp32")
    return signature(_cross_entropy_fwd, types, ints=("V", "ignore_index"))


def aot_specs(arch: int = 90) -> list:
    """The kernels as they launch on ``sm_{arch}`` (no matrix products, so expect_mma False).

    Every vocabulary of 4096 or more runs BLOCK_V 4096 with 8 warps: bf16 with and without the
    gradient at Llama 2's V = 32000 (row starts 16-aligned, which Triton specialises on), bf16
    at GPT-2's V = 50257 (unaligned rows, a separate specialisation), fp32 with the gradient.
    Smaller vocabularies: bf16 at V = 2000 (BLOCK_V 2048, 4 warps) and the debug model's
    V = 97 (BLOCK_V 128, 1 warp). Plus the backward's in-place scaling in bf16 and fp32.
    """
    from .aot import KernelSpec

    specs = []
    for dtype, has_grad, V in [(torch.bfloat16, True, 32000), (torch.bfloat16, False, 32000),
                               (torch.bfloat16, True, 50257), (torch.float32, True, 32000),
                               (torch.bfloat16, True, 2000), (torch.bfloat16, True, 97)]:
        dt = TRITON_DTYPE[dtype]
        sig = _aot_signature(dt)
        block_v, num_warps = block_config(V)
        divisible = [n for n in sig if sig[n].startswith("*")]
        if V % 16 == 0:  # row strides of contiguous (N, V) logits and gradient, and V itself
            divisible += ["stride_l", "stride_g", "V"]
        specs.append(KernelSpec(
            module=__name__, kernel="_cross_entropy_fwd", signature=sig,
            constexprs=dict(HAS_GRAD=has_grad, BLOCK_V=block_v),
            num_warps=num_warps, num_stages=3, divisible=tuple(divisible), expect_mma=False,
            label=f"ce {dt} {'grad' if has_grad else 'loss'} V={V:<5} B{block_v} w{num_warps}",
        ))
    for dtype in (torch.bfloat16, torch.float32):
        dt = TRITON_DTYPE[dtype]
        specs.append(KernelSpec(
            module=__name__, kernel="_scale_inplace",
            signature={"G": f"*{dt}", "S": "*fp32", "numel": "i32", "BLOCK": "constexpr"},
            constexprs=dict(BLOCK=_SCALE_BLOCK), num_warps=_SCALE_WARPS, num_stages=3,
            divisible=("G", "S"), expect_mma=False,
            label=f"scale {dt} B{_SCALE_BLOCK} w{_SCALE_WARPS}",
        ))
    return specs
