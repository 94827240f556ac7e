"""Attention backends, selectable by name per model (``ModelArgs.attn_backend``).

A backend is a function

    fn(q, k, v, *, causal: bool, document_ids: Tensor | None, scale: float) -> Tensor

with q: (B, H, T_q, D), k and v: (B, Hkv, T_k, D), H a multiple of Hkv (grouped-query
attention: backends receive k/v *unrepeated* so a kernel never copies them), returning
(B, H, T_q, D). ``causal`` masks are aligned to the bottom right when T_q != T_k (KV-cache
decoding: the newest query sees every cached key). ``document_ids`` (B, T_k) restricts each
query to keys of its own packed document.

Built in:
  eager   explicit softmax(q k^T) v in fp32, the reference (``llama_mini.kernels.reference.attention``)
  sdpa    ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient / math)
  triton  our Triton flash attention (``llama_mini.kernels.flash_attention``): CUDA tensors, or CPU tensors
          under ``TRITON_INTERPRET=1``

More backends plug in with ``register_attention_backend``. A backend that cannot run on the
input's device (or, for triton, dtype or head dim) falls back to ``sdpa`` with a logged warning
and the reason recorded in ``attention_fallbacks()``; it never falls back silently.

Under ``torch.compile`` the triton backend is one node of the graph (the custom op
``llama_mini::flash_attention_fwd``, with its backward op and FLOP formulas), not a graph
break; availability checks and fallback records run once while tracing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .kernels import custom_ops, reference
from .kernels.common import is_interpreting

__all__ = [
    "register_attention_backend",
    "attention_backends",
    "get_attention_backend",
    "attention_fallbacks",
]

log = logging.getLogger(__name__)

AttentionFn = Callable[..., torch.Tensor]


@dataclass
class _Backend:
    fn: AttentionFn
    available: Callable[[torch.device], tuple[bool, str]] | None


_BACKENDS: dict[str, _Backend] = {}
_FALLBACKS: dict[tuple[str, str], str] = {}
_AVAILABLE: dict[tuple[str, str], tuple[bool, str]] = {}  # (name, device type) -> available()


def register_attention_backend(
    name: str, fn: AttentionFn, available: Callable[[torch.device], tuple[bool, str]] | None = None
) -> None:
    """Make ``fn`` selectable as ``ModelArgs(attn_backend=name)``.

    ``available(device) -> (ok, reason)`` says whether it can run on a device; when it cannot,
    the model uses ``sdpa`` instead and logs why.
    """
    _BACKENDS[name] = _Backend(fn, available)
    for key in [k for k in _AVAILABLE if k[0] == name]:
        del _AVAILABLE[key]


def attention_backends() -> list[str]:
    """Registered backend names."""
    return sorted(_BACKENDS)


def attention_fallbacks() -> dict[str, str]:
    """{"triton@cpu": reason} for every backend that fell back to sdpa so far."""
    return {f"{name}@{dev}": why for (name, dev), why in _FALLBACKS.items()}


def get_attention_backend(name: str, device: torch.device | None = None) -> AttentionFn:
    """The backend function for ``name`` on ``device`` (with the visible sdpa fallback)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; registered: {attention_backends()}")
    backend = _BACKENDS[name]
    if device is not None and backend.available is not None:
        ok, why = _availability(name, device.type)
        if not ok:
            _record_fallback(name, device.type, why)
            return _BACKENDS["sdpa"].fn
    return backend.fn


# Both run at trace time under torch.compile, their results kept as constants: availability
# depends only on the backend and device type, and a first-time log line would break the graph.
@torch.compiler.assume_constant_result
def _availability(name: str, device_type: str) -> tuple[bool, str]:
    key = (name, device_type)
    if key not in _AVAILABLE:
        _AVAILABLE[key] = _BACKENDS[name].available(torch.device(device_type))
    return _AVAILABLE[key]


@torch.compiler.assume_constant_result
def _record_fallback(name: str, where: str, why: str) -> None:
    """Log (once per backend and place) and remember that ``name`` fell back to sdpa."""
    key = (name, where)
    if key not in _FALLBACKS:
        _FALLBACKS[key] = why
        log.warning("attention backend %r cannot run on %s (%s); using 'sdpa'", name, where, why)


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    document_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Explicit-softmax attention (the reference). Shapes as in the module docstring."""
    return reference.attention(q, k, v, causal=causal, document_ids=document_ids, scale=scale)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    document_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with GQA and our mask conventions.

    SDPA's ``is_causal`` aligns the mask to the top left, so for T_q != T_k (or with document
    ids) an explicit boolean mask aligned to the bottom right is passed instead. For T_q == 1
    a causal mask hides nothing and is dropped.
    """
    Tq, Tk = q.shape[2], k.shape[2]
    n_rep = q.shape[1] // k.shape[1]
    if Tq == 1 and document_ids is None:
        # One decode step: the query sees every cached key; enable_gqa reads the cache as is
        # instead of copying it n_rep times per layer per token.
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=n_rep > 1)
    # Elsewhere expand k/v, which keeps SDPA on fused kernels that do not all accept enable_gqa.
    k = reference.repeat_kv(k, n_rep)
    v = reference.repeat_kv(v, n_rep)
    if document_ids is None and (not causal or Tq == Tk):
        is_causal = causal and Tq > 1
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    mask = reference.attention_mask(Tq, Tk, causal=causal, document_ids=document_ids, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


register_attention_backend("eager", eager_attention)
register_attention_backend("sdpa", sdpa_attention)


def triton_attention_available(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernel runs on ``device``: CUDA with Triton, or CPU under the interpreter."""
    from .ops import triton_runs_on

    return triton_runs_on(device)


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    document_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton flash attention (forward and backward kernels), GQA without repeating k/v.

    Runs the custom op ``torch.ops.llama_mini.flash_attention_fwd`` (``llama_mini.kernels.custom_ops``),
    so ``torch.compile`` traces it as one node without a graph break. Inputs the kernel does not
    take (float64, bf16 under the CPU interpreter, head dims above
    ``llama_mini.kernels.flash_attention.MAX_HEAD_DIM`` = 128) run on sdpa instead, with the reason
    logged and kept in ``attention_fallbacks()``; the choice depends only on dtype, head dim and
    ``TRITON_INTERPRET``, which the compiler knows while tracing.
    """
    why = None
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        why = f"{q.dtype} is not a kernel dtype (float16, bfloat16, float32)"
    elif q.shape[-1] > custom_ops.kernel_constant("flash_attention", "MAX_HEAD_DIM"):
        why = f"head dim {q.shape[-1]} > {custom_ops.kernel_constant('flash_attention', 'MAX_HEAD_DIM')}"
    elif is_interpreting() and q.dtype == torch.bfloat16:
        why = "bf16 under the Triton interpreter (tl.dot on bf16 is broken there, triton issue 11584)"
    if why is not None:
        _record_fallback("triton", f"{q.device.type}/{str(q.dtype).removeprefix('torch.')}/D={q.shape[-1]}", why)
        return sdpa_attention(q, k, v, causal=causal, document_ids=document_ids, scale=scale)
    return custom_ops.flash_attention(q, k, v, causal=causal, document_ids=document_ids, scale=scale)


register_attention_backend("triton", triton_attention, triton_attention_available)
