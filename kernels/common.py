"""Helpers shared by the Triton kernel files: interpreter detection and output allocation (with
a poisoning switch for tests). Block arithmetic comes from Triton itself (``triton.cdiv``,
``triton.next_power_of_2``).

Nothing here imports Triton, so ``kernels`` stays importable on machines without it.

Poisoned outputs
----------------
A kernel that forgets to write part of its output can pass a test by luck when ``torch.empty``
happens to hand back zeros. Every launcher allocates through :func:`empty`, and tests wrap
launches in ``with poisoned_outputs():`` so each fresh output buffer is filled with NaN (and
integer buffers with -1) first; an element the kernel never writes then fails the comparison.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

__all__ = ["TRITON_DTYPE", "is_interpreting", "check_device", "empty", "empty_like", "poisoned_outputs", "host_read",
           "host_reads"]

# Triton's names of the torch dtypes the kernels take (signatures, constexpr dtype switches).
TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

_POISON: list[bool] = [False]
_HOST_READS: list[int] = [0]


def host_read(t: torch.Tensor) -> list:
    """``t.tolist()``, counted. Each such read makes the host wait for the device's queue, so
    the kernels' input checks and the model's range checks read through here, and the training
    step (``llama_mini.training.step``) reports how many reads a step made: the difference of
    :func:`host_reads` before and after it."""
    _HOST_READS[0] += 1
    return t.tolist()


def host_reads() -> int:
    """How many :func:`host_read` calls this process has made so far."""
    return _HOST_READS[0]


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(fn: str, name: str, device: torch.device) -> None:
    """Raise a ValueError naming ``fn`` and argument ``name`` unless a Triton kernel can run on
    ``device``: CUDA when compiled, the CPU under the interpreter."""
    if is_interpreting():
        if device.type != "cpu":
            raise ValueError(f"{fn}: the Triton interpreter runs on CPU tensors, {name} is on {device}")
    elif device.type != "cuda":
        raise ValueError(f"{fn}: Triton kernels need CUDA tensors, {name} is on {device}; "
                         "set TRITON_INTERPRET=1 to run them on the CPU")


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True) -> Iterator[None]:
    """Within the block, every buffer allocated by a kernel launcher is pre-filled with NaN
    (floating) or -1 (integer), so elements a kernel fails to write cannot look correct."""
    previous = _POISON[0]
    _POISON[0] = enabled
    try:
        yield
    finally:
        _POISON[0] = previous


def _poison(t: torch.Tensor) -> torch.Tensor:
    if _POISON[0]:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs (poisoned under :func:`poisoned_outputs`)."""
    return _poison(torch.empty(*shape, dtype=dtype, device=device))


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.empty_like`` (keeps ``t``'s strides when dense) for kernel outputs."""
    return _poison(torch.empty_like(t, dtype=dtype))
