"""Per-op implementation registry: which RMSNorm, RoPE, SwiGLU and cross-entropy to run.

Each op has a plain-PyTorch implementation named ``torch`` (from ``kernels.reference``) that
runs everywhere. Faster implementations (the Triton kernels) register themselves under their
own names with an ``available(device)`` check. ``ModelArgs`` picks one per op:

    norm_impl="auto"    the first registered accelerated implementation that can run on the
                        input's device, else ``torch``; the choice and its reason are recorded
    norm_impl="torch"   always the reference
    norm_impl="triton"  that implementation, or a clear error if it cannot run here

Nothing falls back silently: every resolution is logged once and kept in ``resolutions()``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from kernels import reference

__all__ = ["OPS", "register_op", "resolve_op", "resolutions", "registered"]

log = logging.getLogger(__name__)

OPS = ("rms_norm", "rope", "swiglu", "cross_entropy")


@dataclass
class OpImpl:
    name: str
    fn: Callable
    available: Callable[[torch.device], tuple[bool, str]]


def _always(device: torch.device) -> tuple[bool, str]:
    return True, "plain PyTorch runs on every device"


_REGISTRY: dict[str, dict[str, OpImpl]] = {
    "rms_norm": {"torch": OpImpl("torch", reference.rms_norm, _always)},
    "rope": {"torch": OpImpl("torch", reference.apply_rotary, _always)},
    "swiglu": {"torch": OpImpl("torch", reference.swiglu, _always)},
    "cross_entropy": {"torch": OpImpl("torch", reference.cross_entropy, _always)},
}
_RESOLVED: dict[tuple[str, str, str], tuple[str, str]] = {}
_FN_CACHE: dict[tuple[str, str, str], Callable] = {}


def register_op(
    op: str, name: str, fn: Callable, available: Callable[[torch.device], tuple[bool, str]] | None = None
) -> None:
    """Register implementation ``name`` of ``op``. ``available(device) -> (ok, reason)``."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; ops are {OPS}")
    if name in ("auto",):
        raise ValueError("'auto' is reserved")
    _REGISTRY[op][name] = OpImpl(name, fn, available or _always)
    _RESOLVED.clear()
    _FN_CACHE.clear()


def registered(op: str) -> list[str]:
    """Names of the implementations registered for ``op``."""
    return list(_REGISTRY[op])


def check_choice(op: str, requested: str, field_name: str) -> None:
    """Raise if ``requested`` names no implementation of ``op`` (used by the model's __init__)."""
    if requested != "auto" and requested not in _REGISTRY[op]:
        raise ValueError(
            f"ModelArgs.{field_name}={requested!r}: no such implementation of {op}; "
            f"registered: {['auto'] + registered(op)}"
        )


def resolve_op(op: str, requested: str, device: torch.device) -> Callable:
    """The function implementing ``op`` for tensors on ``device`` under the user's choice."""
    key = (op, requested, device.type)
    if key in _FN_CACHE:
        return _FN_CACHE[key]
    impls = _REGISTRY[op]
    if requested == "auto":
        chosen, reason = "torch", "no accelerated implementation registered"
        for name, impl in impls.items():
            if name == "torch":
                continue
            ok, why = impl.available(device)
            if ok:
                chosen, reason = name, why
                break
            reason = f"{name} unavailable: {why}"
    else:
        if requested not in impls:
            raise ValueError(f"no implementation {requested!r} of {op}; registered: {list(impls)}")
        ok, why = impls[requested].available(device)
        if not ok:
            raise RuntimeError(f"{op} implementation {requested!r} cannot run on {device}: {why}")
        chosen, reason = requested, why
    _RESOLVED[key] = (chosen, reason)
    _FN_CACHE[key] = impls[chosen].fn
    log.info("%s on %s: using %r (%s; requested %r)", op, device.type, chosen, reason, requested)
    return impls[chosen].fn


def resolutions() -> dict[str, dict[str, str]]:
    """What each op resolved to so far: {"rms_norm@cpu (auto)": {"impl": ..., "reason": ...}}."""
    return {f"{op}@{dev} ({req})": {"impl": c, "reason": r} for (op, req, dev), (c, r) in _RESOLVED.items()}
