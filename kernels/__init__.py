"""Kernels for llama-mini: plain-PyTorch references and (where Triton runs) Triton kernels.

Installed as ``llama_mini.kernels`` (from the folder ``kernels/``); its modules import each other
relatively. Layout, as modules of ``llama_mini.kernels``:

``reference``
    The plain-PyTorch reference of every op (RMSNorm and residual-add + RMSNorm, rotary
    embedding, SwiGLU, attention, cross-entropy, linear + cross-entropy). The CPU path of the
    model and every kernel test use these.
``rms_norm``, ``rotary``, ``swiglu``, ``cross_entropy``, ``linear_cross_entropy``
    The fused Triton kernels, forward and backward, one op per file: ``rms_norm`` /
    ``add_rms_norm``, ``apply_rotary(q, k, cos, sin, position_ids)``, ``swiglu``,
    ``cross_entropy`` (gradient in the same launch), ``linear_cross_entropy`` (the output
    projection and the loss in token chunks on our own GEMM; the logits never exist whole).
    Each imports triton.
``flash_attention``
    Triton flash attention, forward and backward (causal, GQA, ragged lengths, document
    masking): ``flash_attention(q, k, v, causal=True, document_ids=None)``. Imports triton.
``custom_ops``
    Every kernel as a PyTorch custom operator (``torch.ops.llama_mini.flash_attention_fwd``,
    ``rms_norm_fwd``, ...) with fake implementations, autograd and FLOP formulas, so
    ``torch.compile`` traces through the kernels; imports without Triton.
``common``
    Launcher helpers (interpreter detection, output allocation, ``poisoned_outputs`` for tests).
``aot``
    Ahead-of-time compile checks for sm_80 / sm_90 without a GPU (spills, shared memory,
    tensor-core instructions): ``llama-mini aot flash_attention`` (or any kernel module above).
``triton_available()``
    Whether Triton kernels can run here, and if not, why (``triton_unavailable_reason()``).

This package never imports the rest of ``llama_mini`` nor ``llama_mini.data`` (dependencies
point one way), and it imports without Triton installed: Triton is only imported when a Triton
kernel is asked for.
"""

from __future__ import annotations

import functools
import importlib.util
import os

from . import reference

__all__ = ["reference", "triton_available", "triton_unavailable_reason"]


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str]:
    try:
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):  # blocked by an import hook, or a None entry in sys.modules
        spec = None
    if spec is None:
        return False, "triton is not installed"
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if interpret:
        return True, "triton interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors, slowly"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)"
    return True, "triton on CUDA"


def triton_available() -> bool:
    """True when Triton kernels can run in this process (CUDA present, or the interpreter on)."""
    return _triton_status()[0]


def triton_unavailable_reason() -> str:
    """A human-readable account of why Triton can or cannot run here."""
    return _triton_status()[1]
