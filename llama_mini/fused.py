"""The Triton implementations of the model's ops, registered as ``"triton"`` in ``ops``.

Importing this module (``llama_mini`` does) registers, for every op in ``ops.OPS``, a wrapper
around the kernel in ``kernels/`` (``rms_norm``, ``rotary``, ``swiglu``, ``cross_entropy``,
``linear_cross_entropy``). The kernel modules, and so Triton, are imported on the first call.

Where each runs:
  CUDA            available and the default (``ModelArgs.*_impl = "auto"`` picks it)
  CPU             only under ``TRITON_INTERPRET=1`` and only when asked for by name
                  (``"triton"``); ``auto`` keeps the reference, which is thousands of times faster
  elsewhere       unavailable; ``auto`` runs the reference and records why

Per call, an input a kernel does not take runs the reference instead and the reason is kept in
``ops.fallbacks()``: dtypes other than fp32/fp16/bf16 (a float64 model), bf16 under the
interpreter (unsupported there), a hidden size above the RMSNorm kernel's limit.

Autocast: the fused residual add + RMSNorm gets the fp32 residual stream and a 16-bit attention
output, and adds them in fp32, as ``x + residual`` would. The fused linear + cross-entropy receives the hidden states cast to the autocast
dtype (as ``F.linear`` would) and the weight as stored: with fp32 master weights the products
run in bf16/fp16 while the weight gradient accumulates straight into an fp32 tensor.

Under ``torch.compile`` nothing here breaks the graph. Each kernel is a custom operator
(``torch.ops.llama_mini.*``, registered by ``llama_mini.kernels.custom_ops`` with fake
implementations and autograd formulas), which the compiled graph calls as one opaque node. The
choice between kernel and reference depends only on dtypes, shapes and ``TRITON_INTERPRET``,
which dynamo evaluates while tracing (and guards on), and a fallback is recorded through
``ops.record_fallback``, which dynamo runs once at trace time instead of tracing its logging.
"""

from __future__ import annotations

import torch

from .kernels import custom_ops, reference
from .kernels.common import is_interpreting

from . import ops

__all__ = ["KERNEL_DTYPES", "unsupported_reason"]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _max_hidden() -> int:
    return custom_ops.kernel_constant("rms_norm", "MAX_HIDDEN")  # the widest row the RMSNorm kernel takes


def _default_on(device: torch.device) -> bool:
    return device.type == "cuda"


def unsupported_reason(*tensors: torch.Tensor) -> str | None:
    """Why the kernels cannot take these tensors (None if they can)."""
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            return f"{t.dtype} is not a kernel dtype (float32, float16, bfloat16)"
        if t.dtype == torch.bfloat16 and is_interpreting():
            return "bf16 under the Triton interpreter (unsupported there; bf16 kernels run on a GPU)"
    return None


def _where(t: torch.Tensor) -> str:
    return f"{t.device.type}/{str(t.dtype).removeprefix('torch.')}"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    why = unsupported_reason(x, weight)
    if why is None and x.shape[-1] > _max_hidden():
        why = f"hidden size {x.shape[-1]} > {_max_hidden()}"
    if why is not None:
        ops.record_fallback("rms_norm", _where(x), why)
        return reference.rms_norm(x, weight, eps)
    return custom_ops.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    why = unsupported_reason(x, residual, weight)
    if why is None and x.shape[-1] > _max_hidden():
        why = f"hidden size {x.shape[-1]} > {_max_hidden()}"
    if why is None and residual.dtype != x.dtype:
        # Under autocast the residual stream is fp32 and the attention output 16-bit: the sum is
        # taken in the wider dtype, as x + residual would (a differentiable cast, outside the kernel).
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    if why is not None:
        ops.record_fallback("add_rms_norm", _where(x), why)
        return reference.add_rms_norm(x, residual, weight, eps)
    return custom_ops.add_rms_norm(x, residual, weight, eps)


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    why = unsupported_reason(q, k)
    if why is not None:
        ops.record_fallback("rope", _where(q), why)
        return reference.apply_rotary_qk(q, k, cos, sin, position_ids)
    return custom_ops.apply_rotary(q, k, cos, sin, position_ids)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    why = unsupported_reason(a, b)
    if why is not None:
        ops.record_fallback("swiglu", _where(a), why)
        return reference.swiglu(a, b)
    return custom_ops.swiglu(a, b)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    why = unsupported_reason(logits)
    if why is not None:
        ops.record_fallback("cross_entropy", _where(logits), why)
        return reference.cross_entropy(logits, targets, ignore_index)
    return custom_ops.cross_entropy(logits, targets, ignore_index)


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))  # what F.linear would compute in
    why = unsupported_reason(x, weight)
    if why is not None:
        ops.record_fallback("linear_cross_entropy", _where(x), why)
        return reference.linear_cross_entropy(x, weight, targets, ignore_index)
    return custom_ops.linear_cross_entropy(x, weight, targets, ignore_index)


for _op, _fn in (
    ("rms_norm", rms_norm),
    ("add_rms_norm", add_rms_norm),
    ("rope", rope),
    ("swiglu", swiglu),
    ("cross_entropy", cross_entropy),
    ("linear_cross_entropy", linear_cross_entropy),
):
    ops.register_op(_op, "triton", _fn, ops.triton_runs_on, _default_on)
