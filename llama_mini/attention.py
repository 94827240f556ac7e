"""Attention backends, selectable by name per model (``ModelArgs.attn_backend``).

A backend is a function

    fn(q, k, v, *, causal: bool, document_ids: Tensor | None, scale: float) -> Tensor

with q: (B, H, T_q, D), k and v: (B, Hkv, T_k, D), H a multiple of Hkv (grouped-query
attention: backends receive k/v *unrepeated* so a kernel never copies them), returning
(B, H, T_q, D). ``causal`` masks are aligned to the bottom right when T_q != T_k (KV-cache
decoding: the newest query sees every cached key). ``document_ids`` (B, T_k) restricts each
query to keys of its own packed document.

Built in:
  eager  explicit softmax(q k^T) v in fp32, the reference (``kernels.reference.attention``)
  sdpa   ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient / math)

Later backends (the Triton flash attention) plug in with ``register_attention_backend``. A
backend that cannot run on the input's device falls back to ``sdpa`` with a logged warning and
the reason recorded in ``attention_fallbacks()``; it never falls back silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from kernels import reference

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
        key = (name, device.type)
        if key not in _AVAILABLE:
            _AVAILABLE[key] = backend.available(device)
        ok, why = _AVAILABLE[key]
        if not ok:
            key = (name, device.type)
            if key not in _FALLBACKS:
                _FALLBACKS[key] = why
                log.warning("attention backend %r cannot run on %s (%s); using 'sdpa'", name, device, why)
            return _BACKENDS["sdpa"].fn
    return backend.fn


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
