"""Per-op implementation registry: which RMSNorm, RoPE, SwiGLU and loss kernels to run.

Each op has a plain-PyTorch implementation named ``torch`` (from ``llama_mini.kernels.reference``) that
runs everywhere. Faster implementations (the Triton kernels, registered by ``llama_mini.fused``)
register under their own names with two checks: ``available(device)``, whether they can run
there at all, and ``default_on(device)``, whether ``auto`` should pick them there. ``ModelArgs``
chooses per op family (``IMPL_FIELDS``):

    norm_impl="auto"    the first accelerated implementation that is the default on the input's
                        device (Triton: CUDA), else ``torch``; the choice and reason are recorded
    norm_impl="torch"   always the reference
    norm_impl="triton"  that implementation, or a clear error if it cannot run here (on a CPU it
                        runs under ``TRITON_INTERPRET=1``, slowly: that is what the tests do)

An implementation that can run on a device but not on a particular input (float64 tensors,
bf16 in the interpreter, an output weight sharded over model-parallel ranks) hands that call
to the reference and records why with ``record_fallback``. Nothing falls back silently: every
resolution and fallback is logged once and kept in ``resolutions()`` / ``fallbacks()``.

Op signatures (all implementations of an op take the same arguments):

    rms_norm(x, weight, eps) -> y                          x (..., C), weight (C,)
    add_rms_norm(x, residual, weight, eps) -> (y, h)       h = x + residual, y = rms_norm(h)
    rope(q, k, cos, sin, position_ids) -> (q, k)           q (B,T,H,D), k (B,T,Hkv,D), tables (L, D/2)
    swiglu(a, b) -> silu(a) * b                            a, b (..., hidden)
    cross_entropy(logits, targets, ignore_index) -> mean   logits (..., V)
    linear_cross_entropy(x, weight, targets, ignore_index) -> mean of cross_entropy(x W^T)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from .kernels import reference

__all__ = [
    "OPS", "IMPL_FIELDS", "register_op", "resolve_op", "resolve_impl", "resolutions", "registered",
    "record_fallback", "fallbacks", "check_choice", "triton_runs_on",
]

log = logging.getLogger(__name__)

OPS = ("rms_norm", "add_rms_norm", "rope", "swiglu", "cross_entropy", "linear_cross_entropy")

# Which ops each ModelArgs switch chooses the implementation of.
IMPL_FIELDS: dict[str, tuple[str, ...]] = {
    "norm_impl": ("rms_norm", "add_rms_norm"),
    "rope_impl": ("rope",),
    "mlp_impl": ("swiglu",),
    "loss_impl": ("cross_entropy",),
    "linear_loss_impl": ("linear_cross_entropy",),
}

Check = Callable[[torch.device], "tuple[bool, str]"]


@dataclass
class OpImpl:
    name: str
    fn: Callable
    available: Check
    default_on: Callable[[torch.device], bool]


def _always(device: torch.device) -> tuple[bool, str]:
    return True, "plain PyTorch runs on every device"


def _never(device: torch.device) -> bool:
    return False


def _ref(op: str, fn: Callable) -> OpImpl:
    return OpImpl("torch", fn, _always, _never)


_REGISTRY: dict[str, dict[str, OpImpl]] = {
    "rms_norm": {"torch": _ref("rms_norm", reference.rms_norm)},
    "add_rms_norm": {"torch": _ref("add_rms_norm", reference.add_rms_norm)},
    "rope": {"torch": _ref("rope", reference.apply_rotary_qk)},
    "swiglu": {"torch": _ref("swiglu", reference.swiglu)},
    "cross_entropy": {"torch": _ref("cross_entropy", reference.cross_entropy)},
    "linear_cross_entropy": {"torch": _ref("linear_cross_entropy", reference.linear_cross_entropy)},
}
_RESOLVED: dict[tuple[str, str, str], tuple[str, str]] = {}
_FALLBACKS: dict[tuple[str, str], str] = {}


def register_op(
    op: str,
    name: str,
    fn: Callable,
    available: Check | None = None,
    default_on: Callable[[torch.device], bool] | None = None,
) -> None:
    """Register implementation ``name`` of ``op``. ``available(device) -> (ok, reason)``;
    ``default_on(device) -> bool`` says where ``auto`` picks it (default: wherever available)."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; ops are {OPS}")
    if name == "auto":
        raise ValueError("'auto' is reserved")
    available = available or _always
    default_on = default_on or (lambda device: available(device)[0])
    _REGISTRY[op][name] = OpImpl(name, fn, available, default_on)
    _RESOLVED.clear()


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


def resolve_impl(op: str, requested: str, device: torch.device) -> tuple[str, Callable]:
    """(name, function) implementing ``op`` for tensors on ``device`` under the user's choice."""
    name = _resolve_name(op, requested, device.type)
    return name, _REGISTRY[op][name].fn


# Run by torch.compile at trace time, its result kept as a constant: the choice depends only on
# the registry and the device type, and its first-time logging would otherwise break the graph.
@torch.compiler.assume_constant_result
def _resolve_name(op: str, requested: str, device_type: str) -> str:
    key = (op, requested, device_type)
    if key in _RESOLVED:
        return _RESOLVED[key][0]
    device = torch.device(device_type)
    impls = _REGISTRY[op]
    if requested == "auto":
        chosen, reason = "torch", "no accelerated implementation registered"
        for name, candidate in impls.items():
            if name == "torch":
                continue
            ok, why = candidate.available(device)
            if ok and candidate.default_on(device):
                chosen, reason = name, why
                break
            reason = (f"{name} is not the default on {device.type} ({why}); ask for it by name to use it"
                      if ok else f"{name} unavailable: {why}")
    else:
        if requested not in impls:
            raise ValueError(f"no implementation {requested!r} of {op}; registered: {list(impls)}")
        ok, why = impls[requested].available(device)
        if not ok:
            raise RuntimeError(f"{op} implementation {requested!r} cannot run on {device}: {why}")
        chosen, reason = requested, why
    _RESOLVED[key] = (chosen, reason)
    log.info("%s on %s: using %r (%s; requested %r)", op, device.type, chosen, reason, requested)
    return chosen


def resolve_op(op: str, requested: str, device: torch.device) -> Callable:
    """The function implementing ``op`` for tensors on ``device`` under the user's choice."""
    return resolve_impl(op, requested, device)[1]


def resolutions() -> dict[str, dict[str, str]]:
    """What each op resolved to so far: {"rms_norm@cpu (auto)": {"impl": ..., "reason": ...}}."""
    return {f"{op}@{dev} ({req})": {"impl": c, "reason": r} for (op, req, dev), (c, r) in _RESOLVED.items()}


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing: no graph break
def record_fallback(op: str, where: str, why: str) -> None:
    """Log (once per op and place) and remember that a call of ``op`` ran the reference.
    Under ``torch.compile`` it runs when the fallback is traced (the compiled graph then calls
    the reference on every run), not on each compiled call."""
    key = (op, where)
    if key not in _FALLBACKS:
        _FALLBACKS[key] = why
        log.warning("%s: the kernel cannot take this input (%s: %s); running the reference", op, where, why)


def fallbacks() -> dict[str, str]:
    """{"rms_norm@cpu/float64": reason} for every call that ran the reference instead of a kernel."""
    return {f"{op}@{where}": why for (op, where), why in _FALLBACKS.items()}


def triton_runs_on(device: torch.device) -> tuple[bool, str]:
    """Whether Triton kernels run on ``device``: CUDA with Triton, or CPU under the interpreter."""
    from . import kernels
    from .kernels.common import is_interpreting

    if not kernels.triton_available():
        return False, kernels.triton_unavailable_reason()
    if is_interpreting():
        if device.type == "cpu":
            return True, "triton interpreter on CPU tensors"
        return False, f"TRITON_INTERPRET=1 runs kernels on CPU tensors only, not {device.type}"
    if device.type == "cuda":
        return True, "triton on CUDA"
    return False, f"Triton kernels need CUDA tensors, got {device.type}"
