"""The Triton kernels as PyTorch custom operators (namespace ``llama_mini``), so ``torch.compile``
traces through them instead of breaking the graph.

Operators
---------
Every op below is a ``torch.library.custom_op`` with a fake (meta) implementation giving exact
output shapes, dtypes and strides, and, for the forward ops, an autograd formula
(``register_autograd``) whose backward calls the matching backward op::

    flash_attention_fwd(q, k, v, document_ids?, causal, scale) -> (out, lse)
        q (B, H, T_q, D), k, v (B, H_kv, T_k, D); out (B, H, T_q, D) with the strides of a
        (B, T_q, H, D) buffer (as the kernel writes it), lse (B, H, T_q) fp32
    flash_attention_bwd(dout, q, k, v, out, lse, document_ids?, causal, scale) -> (dq, dk, dv)
    rms_norm_fwd(x, weight, eps) -> (y, rstd)              y (..., C) contiguous, rstd (N,) fp32
    add_rms_norm_fwd(x, residual, weight, eps) -> (y, h, rstd)
    rms_norm_bwd(dy, x, weight, rstd, dh?) -> (dx, dw)     also the add variant's backward (dh)
    rotary(q, k, cos, sin, position_ids?, inverse) -> (q_out, k_out)   backward: inverse=True
    swiglu_fwd(a, b) -> y;  swiglu_bwd(dy, a, b) -> (da, db)
    cross_entropy_fwd(logits, targets, ignore_index, reduction, needs_grad) -> (loss, grad, scale)
    linear_cross_entropy_fwd(x, weight, targets, ignore_index, reduction, chunk_size?, need_dx,
                             need_dw) -> (loss, dx, dw32, scale)
    scale_gradient(grad!, factor) -> ()                     grad *= factor in place (fp32 factor)

They are called as ``torch.ops.llama_mini.<name>`` or through the plain functions here
(``flash_attention``, ``flash_attention_with_lse``, ``rms_norm``, ``add_rms_norm``,
``apply_rotary``, ``swiglu``, ``cross_entropy``, ``linear_cross_entropy``), which the kernel
files' user functions and the model's ``"triton"`` implementations both call: this file is the
third layer (autograd formula, fake implementation, FLOP formula) of every kernel file.

The two losses compute their gradients in the forward (the logits are never kept), so their
forward ops return the unscaled gradient buffers and the reduction's scale as outputs; the
backward multiplies them in place by grad_output (``scale_gradient``, declared as mutating its
first argument), so one (N, V) buffer serves forward and backward, and in eager mode a second
backward through one graph raises. Under ``torch.compile`` the compiled graph saves what its
backward needs itself: a second backward with ``retain_graph=True`` then runs and gives the same
gradients (seen with ``aot_eager`` and Inductor on a CPU), and whether the compiled backward
keeps one (N, V) gradient buffer or copies it has not been measured on a GPU yet.

Why opaque custom ops and not ``triton_op`` + ``wrap_triton``
-----------------------------------------------------------
The launchers do host-side work that a traced Triton call cannot express: autotuners built per
GPU architecture and cached (flash attention), target checks with one host read (cross-entropy,
position-id range checks in RoPE), block choices that differ under ``TRITON_INTERPRET=1``, and
output poisoning for tests. Under the interpreter there is no GPU code for Inductor to call, and
``wrap_triton`` of autotuned kernels differs between torch 2.11 (the GPU machine) and 2.13 (here).
An opaque op is called as one node by every backend (``aot_eager``, Inductor) and runs the same
launcher as eager mode; Inductor cannot fuse into it, which costs nothing here since each kernel
is already the fused unit.

Where they run
--------------
On CUDA tensors with compiled kernels, and on CPU tensors under ``TRITON_INTERPRET=1``.
Anything else (CPU without the interpreter, float64, bf16 under the interpreter, a head dim above
128) raises the kernel's own error: the ops are the kernels. Choosing the plain-PyTorch reference
for such inputs, and recording why, is the job of the callers (``llama_mini.fused``,
``llama_mini.attention.triton_attention``), which decide on dtype, shape and the interpreter flag,
properties ``torch.compile`` knows while tracing, so the choice costs no graph break. No
plain-PyTorch CPU implementation is registered for the case without the interpreter: the model
never routes a CPU tensor to a kernel there (``triton`` is unavailable on that device), and a
reference swapped in silently inside the op would bypass the fallback records. The fake
implementations run anywhere (meta and fake tensors), so shapes and FLOPs of any size can be
traced on a CPU.

FLOP formulas
-------------
Registered with ``torch.utils.flop_counter.register_flop_formula``, so ``FlopCounterMode`` counts
the ops (it sees the op, not the kernels inside):

* ``flash_attention_fwd``: 4 B H D (q k^T and p v) per (query, key) pair counted;
  ``flash_attention_bwd``: 2.5x that (q k^T recomputed, dO v^T, P^T dO, dS k, dS^T q). Without
  a mask every pair of T_q x T_k counts, as in PyTorch's formula for
  ``scaled_dot_product_attention``. Causal calls count only the pairs on and below the
  bottom-right diagonal, T_q T_k - T_q^2 / 2 (T^2 / 2 when T_q = T_k), the convention of
  ``Transformer.flops_per_token``: useful work, so MFU never credits the masked half (PyTorch's
  sdpa formula does, so with ``sdpa`` selected the counter reports more). Document masks count
  as causal over the whole row (the formula sees shapes, not ids). H is the query heads: GQA
  does not reduce the work.
* ``linear_cross_entropy_fwd``: 2 N C V for the logits, plus 2 N C V for dx when ``need_dx`` and
  2 N C V for dW when ``need_dw``: the gradient products run inside the forward op, so a training
  step's 6 N C V (2 forward + 4 backward, as for an unfused ``nn.Linear``) is all counted there.
  ``scale_gradient`` (elementwise) counts nothing, like other elementwise ops.

This module imports without Triton: the kernel modules are imported when an op first runs.
"""

import importlib
import math
from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op
from torch.utils.flop_counter import register_flop_formula

__all__ = [
    "flash_attention",
    "rms_norm",
    "add_rms_norm",
    "apply_rotary",
    "swiglu",
    "cross_entropy",
    "linear_cross_entropy",
    "flash_attention_flops",
    "flash_attention_backward_flops",
    "linear_cross_entropy_flops",
    "OP_NAMES",
    "kernel_constant",
]

OP_NAMES = (
    "flash_attention_fwd", "flash_attention_bwd", "rms_norm_fwd", "add_rms_norm_fwd", "rms_norm_bwd",
    "rotary", "swiglu_fwd", "swiglu_bwd", "cross_entropy_fwd", "linear_cross_entropy_fwd", "scale_gradient",
)


def _same_device(fn: str, **tensors) -> None:
    """Raise a ValueError naming the argument when tensor arguments live on different devices.
    Checked before dispatch: with one argument on ``meta`` the dispatcher would run the fake
    implementation and return empty tensors instead of the kernel's error. (Device is static
    under ``torch.compile``: no graph break.)"""
    first_name, first = next(((n, t) for n, t in tensors.items() if isinstance(t, Tensor)), (None, None))
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.device != first.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {first_name} is on {first.device}")


@torch.compiler.assume_constant_result
def kernel_constant(module: str, name: str):
    """A constant of a kernel module, e.g. ``kernel_constant("flash_attention", "MAX_HEAD_DIM")``.
    The module (and so Triton) is imported on first use; ``torch.compile`` runs this while
    tracing and keeps the value as a constant instead of tracing the import."""
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def _rows(shape) -> int:
    """Rows of a (..., C) tensor: the product of the leading dims."""
    return math.prod(shape[:-1])


# --------------------------------------------------------------------------------------------
# Flash attention
# --------------------------------------------------------------------------------------------


@custom_op("llama_mini::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, document_ids: Optional[Tensor], causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    from .flash_attention import attention_forward

    return attention_forward(q, k, v, causal=causal, document_ids=document_ids, scale=scale)


@flash_attention_fwd.register_fake
def _(q, k, v, document_ids, causal, scale):
    B, H, Tq, D = q.shape
    # The kernel writes a (B, T_q, H, D) buffer and returns it viewed as (B, H, T_q, D), so the
    # model's transpose back to (B, T, H * D) is free; the fake has the same strides.
    out = q.new_empty((B, Tq, H, D)).transpose(1, 2)
    lse = q.new_empty((B, H, Tq), dtype=torch.float32)
    return out, lse


def _like(t: Tensor) -> Tensor:
    """What the launchers allocate for a gradient of ``t``: ``empty_like`` of t, or of its
    contiguous copy when the last dim is strided (the launcher copies such inputs first)."""
    return torch.empty_like(t if t.stride(-1) == 1 else t.contiguous())


@custom_op("llama_mini::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    document_ids: Optional[Tensor], causal: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    from .flash_attention import attention_backward

    return attention_backward(dout, q, k, v, out, lse, causal=causal, document_ids=document_ids, scale=scale)


@flash_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, document_ids, causal, scale):
    return _like(q), _like(k), _like(v)


def _flash_setup(ctx, inputs, output):
    q, k, v, document_ids, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, document_ids)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _flash_backward(ctx, dout, _dlse):
    q, k, v, out, lse, document_ids = ctx.saved_tensors
    dq, dk, dv = torch.ops.llama_mini.flash_attention_bwd(dout, q, k, v, out, lse, document_ids,
                                                          ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


flash_attention_fwd.register_autograd(_flash_backward, setup_context=_flash_setup)


def flash_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                             document_ids: Optional[Tensor] = None,
                             scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Flash attention through the custom op: (out (B, H, T_q, D), lse (B, H, T_q) fp32) for
    q (B, H, T_q, D) and k, v (B, H_kv, T_k, D); the contract of
    ``llama_mini.kernels.flash_attention.flash_attention_with_lse`` (``document_ids`` (B, T_k),
    bottom-right causal, scale default D^-1/2), traceable by ``torch.compile``."""
    _same_device("flash_attention", q=q, k=k, v=v)
    if scale is None and isinstance(q, Tensor):
        scale = q.shape[-1] ** -0.5
    return torch.ops.llama_mini.flash_attention_fwd(q, k, v, document_ids, bool(causal),
                                                    scale if scale is None else float(scale))


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                    document_ids: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """:func:`flash_attention_with_lse`'s out (B, H, T_q, D)."""
    return flash_attention_with_lse(q, k, v, causal=causal, document_ids=document_ids, scale=scale)[0]


# --------------------------------------------------------------------------------------------
# RMSNorm and residual-add + RMSNorm
# --------------------------------------------------------------------------------------------


@custom_op("llama_mini::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    from .rms_norm import rms_norm_forward

    return rms_norm_forward(x, weight, eps)


@rms_norm_fwd.register_fake
def _(x, weight, eps):
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return y, x.new_empty((_rows(x.shape),), dtype=torch.float32)


@custom_op("llama_mini::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    from .rms_norm import add_rms_norm_forward

    return add_rms_norm_forward(x, residual, weight, eps)


@add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps):
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return y, x.new_empty(x.shape), x.new_empty((_rows(x.shape),), dtype=torch.float32)


@custom_op("llama_mini::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, dh: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    from .rms_norm import rms_norm_backward

    return rms_norm_backward(dy, x, weight, rstd, dh=dh)


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, dh):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _rms_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.llama_mini.rms_norm_bwd(dy, x, weight, rstd, None)
    return dx, dw, None


rms_norm_fwd.register_autograd(_rms_backward, setup_context=_rms_setup)


def _add_rms_setup(ctx, inputs, output):
    _, h, rstd = output
    ctx.save_for_backward(h, inputs[2], rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros


def _add_rms_backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    if dy is None:  # only h was used downstream: the norm contributes nothing
        return dh, dh, None, None
    # h = x + residual: both receive dh plus the norm's dx, computed in one kernel.
    dx, dw = torch.ops.llama_mini.rms_norm_bwd(dy, h, weight, rstd, dh)
    return dx, dx, dw, None


add_rms_norm_fwd.register_autograd(_add_rms_backward, setup_context=_add_rms_setup)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """RMSNorm through the custom op (contract of ``llama_mini.kernels.rms_norm.rms_norm``)."""
    _same_device("rms_norm", x=x, weight=weight)
    return torch.ops.llama_mini.rms_norm_fwd(x, weight, float(eps))[0]


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(rms_norm(h), h) with h = x + residual, through the custom op (contract of
    ``llama_mini.kernels.rms_norm.add_rms_norm``)."""
    _same_device("add_rms_norm", x=x, residual=residual, weight=weight)
    y, h, _ = torch.ops.llama_mini.add_rms_norm_fwd(x, residual, weight, float(eps))
    return y, h


# --------------------------------------------------------------------------------------------
# Rotary embedding
# --------------------------------------------------------------------------------------------


@custom_op("llama_mini::rotary", mutates_args=())
def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Optional[Tensor],
           inverse: bool) -> tuple[Tensor, Tensor]:
    from .rotary import rotary_forward

    # The inverse rotation is the backward, whose position ids the forward already checked.
    return rotary_forward(q, k, cos, sin, position_ids, inverse=inverse, check_positions=not inverse)


@rotary.register_fake
def _(q, k, cos, sin, position_ids, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rotary_setup(ctx, inputs, output):
    q, k, cos, sin, position_ids, inverse = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.inverse = inverse


def _rotary_backward(ctx, dq_out, dk_out):
    cos, sin, position_ids = ctx.saved_tensors
    # A rotation's gradient is the opposite rotation.
    dq, dk = torch.ops.llama_mini.rotary(dq_out, dk_out, cos, sin, position_ids, not ctx.inverse)
    return dq, dk, None, None, None, None


rotary.register_autograd(_rotary_backward, setup_context=_rotary_setup)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                 position_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """RoPE of q (B, T, H, D) and k (B, T, H_kv, D) in one launch, through the custom op
    (contract of ``llama_mini.kernels.rotary.apply_rotary``)."""
    _same_device("apply_rotary", q=q, k=k, cos=cos, sin=sin, position_ids=position_ids)
    qo, ko = torch.ops.llama_mini.rotary(q, k, cos, sin, position_ids, False)
    return qo, ko


# --------------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------------


@custom_op("llama_mini::swiglu_fwd", mutates_args=())
def swiglu_fwd(a: Tensor, b: Tensor) -> Tensor:
    from .swiglu import swiglu_forward

    return swiglu_forward(a, b)


@swiglu_fwd.register_fake
def _(a, b):
    return a.new_empty(a.shape)


@custom_op("llama_mini::swiglu_bwd", mutates_args=())
def swiglu_bwd(dy: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    from .swiglu import swiglu_backward

    return swiglu_backward(dy, a, b)


@swiglu_bwd.register_fake
def _(dy, a, b):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dy):
    a, b = ctx.saved_tensors
    return torch.ops.llama_mini.swiglu_bwd(dy, a, b)


swiglu_fwd.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu(a: Tensor, b: Tensor) -> Tensor:
    """silu(a) * b through the custom op (contract of ``llama_mini.kernels.swiglu.swiglu``)."""
    _same_device("swiglu", a=a, b=b)
    return torch.ops.llama_mini.swiglu_fwd(a, b)


# --------------------------------------------------------------------------------------------
# The in-place gradient scaling shared by both losses' backward
# --------------------------------------------------------------------------------------------


@custom_op("llama_mini::scale_gradient", mutates_args=("grad",))
def scale_gradient(grad: Tensor, factor: Tensor) -> None:
    """grad *= factor in place; factor is a 0-dim tensor read in fp32 by the kernel (no host
    transfer, one rounding of a 16-bit grad); grad contiguous."""
    from .cross_entropy import scale_

    scale_(grad, factor)


@scale_gradient.register_fake
def _(grad, factor):
    return None


class _UsedOnce:
    """Flag on a loss's autograd context: its gradient buffers are scaled in place, once."""

    @staticmethod
    def take(ctx, op: str) -> None:
        if ctx.used:
            raise RuntimeError(f"{op}: backward ran twice through the same graph; its gradients were computed in "
                               "the forward and are scaled in place by the first backward, so recompute the loss "
                               "instead of using retain_graph=True")
        ctx.used = True


# --------------------------------------------------------------------------------------------
# Cross-entropy
# --------------------------------------------------------------------------------------------


@custom_op("llama_mini::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(logits: Tensor, targets: Tensor, ignore_index: int, reduction: str,
                      needs_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    from .common import empty
    from .cross_entropy import cross_entropy_rows, prepare_rows

    if reduction not in ("mean", "sum"):
        raise ValueError(f"cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    flat, flat_targets, n_counted = prepare_rows(logits, targets, ignore_index)  # one host read
    V = flat.shape[1]
    scale = 1.0 if reduction == "sum" else 1.0 / max(n_counted, 1)
    # The unscaled softmax - onehot, contiguous (the backward scales it as one flat run).
    grad = empty(*flat.shape, dtype=flat.dtype, device=flat.device) if needs_grad else flat.new_empty(0, V)
    loss_rows, _ = cross_entropy_rows(flat, flat_targets, ignore_index, 1.0, grad=grad if needs_grad else None,
                                      check=False)
    loss = loss_rows.sum() * scale
    return loss, grad, torch.full((), scale, dtype=torch.float32, device=flat.device)


@cross_entropy_fwd.register_fake
def _(logits, targets, ignore_index, reduction, needs_grad):
    V = logits.shape[-1]
    grad = logits.new_empty((_rows(logits.shape) if needs_grad else 0, V))
    return logits.new_empty((), dtype=torch.float32), grad, logits.new_empty((), dtype=torch.float32)


def _ce_setup(ctx, inputs, output):
    logits, targets, ignore_index, reduction, needs_grad = inputs
    _, grad, scale = output
    ctx.save_for_backward(grad, scale)
    ctx.mark_non_differentiable(grad, scale)
    ctx.shape, ctx.needs_grad, ctx.used = logits.shape, needs_grad, False


def _ce_backward(ctx, dloss, _dgrad, _dscale):
    if not ctx.needs_grad:
        raise RuntimeError("cross_entropy: the forward ran without computing the gradient (needs_grad=False)")
    _UsedOnce.take(ctx, "cross_entropy")
    grad, scale = ctx.saved_tensors
    # In place, so no second (N, V) buffer; the factor is formed in fp32 and read by the kernel.
    torch.ops.llama_mini.scale_gradient(grad, dloss.detach().to(torch.float32) * scale)
    return grad.view(ctx.shape), None, None, None, None


cross_entropy_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Token cross-entropy, a scalar fp32 loss, through the custom op (contract of
    ``llama_mini.kernels.cross_entropy.cross_entropy``)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
        raise TypeError("cross_entropy: logits and targets must be tensors")
    _same_device("cross_entropy", logits=logits, targets=targets)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    return torch.ops.llama_mini.cross_entropy_fwd(logits, targets, int(ignore_index), reduction, needs_grad)[0]


# --------------------------------------------------------------------------------------------
# Linear + cross-entropy
# --------------------------------------------------------------------------------------------


@custom_op("llama_mini::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, reduction: str, chunk_size: Optional[int],
    need_dx: bool, need_dw: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .linear_cross_entropy import linear_cross_entropy_forward

    loss, dx, dw32, scale = linear_cross_entropy_forward(x, weight, targets, ignore_index, reduction, chunk_size,
                                                         need_dx, need_dw)
    # An op returns tensors: a gradient not asked for is an empty one.
    dx = dx if need_dx else x.new_empty(0)
    dw32 = dw32 if need_dw else weight.new_empty(0, dtype=torch.float32)
    return loss, dx, dw32, torch.full((), scale, dtype=torch.float32, device=x.device)


@linear_cross_entropy_fwd.register_fake
def _(x, weight, targets, ignore_index, reduction, chunk_size, need_dx, need_dw):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    dw32 = torch.empty_like(weight, dtype=torch.float32) if need_dw else weight.new_empty(0, dtype=torch.float32)
    scalar = x.new_empty((), dtype=torch.float32)
    return scalar, dx, dw32, x.new_empty((), dtype=torch.float32)


def _lce_setup(ctx, inputs, output):
    x, weight, targets, ignore_index, reduction, chunk_size, need_dx, need_dw = inputs
    _, dx, dw32, scale = output
    ctx.save_for_backward(dx, dw32, scale)
    ctx.mark_non_differentiable(dx, dw32, scale)
    ctx.need_dx, ctx.need_dw, ctx.weight_dtype, ctx.used = need_dx, need_dw, weight.dtype, False


def _lce_backward(ctx, dloss, _ddx, _ddw, _dscale):
    _UsedOnce.take(ctx, "linear_cross_entropy")
    dx, dw32, scale = ctx.saved_tensors
    g = dloss.detach().to(torch.float32)
    dw = None
    if ctx.need_dx:  # dx was stored unscaled: the mean's scale and g are applied together, in fp32
        torch.ops.llama_mini.scale_gradient(dx, g * scale)
    if ctx.need_dw:  # dW32 already carries the scale
        torch.ops.llama_mini.scale_gradient(dw32, g)
        dw = dw32 if ctx.weight_dtype == torch.float32 else dw32.to(ctx.weight_dtype)
    return (dx if ctx.need_dx else None), dw, None, None, None, None, None, None


linear_cross_entropy_fwd.register_autograd(_lce_backward, setup_context=_lce_setup)


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                         reduction: str = "mean", chunk_size: Optional[int] = None) -> Tensor:
    """cross_entropy(x @ weight^T, targets) without the logits, through the custom op (contract
    of ``llama_mini.kernels.linear_cross_entropy.linear_cross_entropy``)."""
    _same_device("linear_cross_entropy", x=x, weight=weight, targets=targets)
    need_dx = torch.is_grad_enabled() and isinstance(x, Tensor) and x.requires_grad
    need_dw = torch.is_grad_enabled() and isinstance(weight, Tensor) and weight.requires_grad
    return torch.ops.llama_mini.linear_cross_entropy_fwd(x, weight, targets, int(ignore_index), reduction,
                                                         chunk_size, need_dx, need_dw)[0]


# --------------------------------------------------------------------------------------------
# FLOP formulas (FlopCounterMode)
# --------------------------------------------------------------------------------------------


def flash_attention_flops(q_shape, k_shape, causal: bool = False) -> int:
    """Forward matmul FLOPs of attention, q k^T and p v: 4 B H D times the (query, key) pairs
    counted (H = query heads). Without a mask every pair of the T_q x T_k rectangle counts (as
    in PyTorch's formula for ``scaled_dot_product_attention``). Causal (bottom-right aligned)
    counts T_q T_k - T_q^2 / 2 pairs: half of T^2 when T_q = T_k, the convention of
    ``Transformer.flops_per_token`` and of FlashAttention's benchmarks, so that MFU counts only
    the work a causal model needs (counting the masked half is how MFU figures above 100%
    happen); T_k - 1/2 for one decoding query; T_k^2 / 2 when T_q > T_k (the first T_q - T_k
    queries see no key). A document mask is counted as causal over the
    whole row: the formula sees shapes, not the ids, so packed documents count the upper bound."""
    B, H, Tq, D = q_shape
    Tk = k_shape[2]
    if not causal:
        return 4 * B * H * Tq * Tk * D
    if Tq > Tk:  # the first T_q - T_k queries see no key; the last T_k form a causal square
        return 2 * B * H * D * Tk * Tk
    return 2 * B * H * D * (2 * Tq * Tk - Tq * Tq)  # 4 B H D (Tq Tk - Tq^2 / 2), an exact integer


def flash_attention_backward_flops(q_shape, k_shape, causal: bool = False) -> int:
    """Backward matmul FLOPs, 2.5x the forward: q k^T recomputed, dO v^T, P^T dO, dS k, dS^T q."""
    return 5 * flash_attention_flops(q_shape, k_shape, causal) // 2


def linear_cross_entropy_flops(x_shape, weight_shape, need_dx: bool, need_dw: bool) -> int:
    """2 N C V for the logits, plus 2 N C V for each gradient product the forward op runs."""
    V, C = weight_shape
    return 2 * _rows(x_shape) * C * V * (1 + int(need_dx) + int(need_dw))


@register_flop_formula(torch.ops.llama_mini.flash_attention_fwd)
def _flash_fwd_flop(q_shape, k_shape, v_shape, document_ids_shape, causal, scale, *args, out_shape=None,
                    **kwargs) -> int:
    return flash_attention_flops(q_shape, k_shape, causal)


@register_flop_formula(torch.ops.llama_mini.flash_attention_bwd)
def _flash_bwd_flop(dout_shape, q_shape, k_shape, v_shape, out_shape_, lse_shape, document_ids_shape, causal, scale,
                    *args, out_shape=None, **kwargs) -> int:
    return flash_attention_backward_flops(q_shape, k_shape, causal)


@register_flop_formula(torch.ops.llama_mini.linear_cross_entropy_fwd)
def _lce_flop(x_shape, weight_shape, targets_shape, ignore_index, reduction, chunk_size, need_dx, need_dw,
              *args, out_shape=None, **kwargs) -> int:
    return linear_cross_entropy_flops(x_shape, weight_shape, need_dx, need_dw)
