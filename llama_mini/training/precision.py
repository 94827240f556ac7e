"""Mixed precision: autocast contexts and a dynamic loss scaler that agrees across ranks.

    fp32  no autocast
    bf16  torch.autocast(device, bfloat16): matmuls in bf16, weights and optimizer state fp32
    fp16  torch.autocast(device, float16) + ``LossScaler``: the loss is multiplied by S before
          backward so small gradients survive fp16; gradients are divided by S before clipping
          and the step. A step whose gradients overflowed (non-finite global norm) is skipped and
          S halves; after ``growth_interval`` good steps S doubles.

Why not ``torch.amp.GradScaler``: it decides "overflow" per rank from the local gradients, and
under model parallelism each rank holds different shards, so ranks could disagree and one skip a
step another takes. This scaler decides from the global gradient norm, which every rank computes
identically (``optim.global_grad_norm``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager

import torch

__all__ = ["autocast_factory", "LossScaler"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_factory(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """A zero-argument callable giving a fresh autocast context for ``precision``."""
    if precision == "fp32":
        return contextlib.nullcontext
    if precision not in _DTYPES:
        raise ValueError(f"run.precision: {precision!r} is not one of fp32, bf16, fp16")
    dtype = _DTYPES[precision]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


class LossScaler:
    """Dynamic loss scale S for fp16 (``enabled=False``: S = 1 and nothing changes)."""

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0

    def update(self, grad_norm_finite: bool) -> None:
        """After a step: halve S on overflow, double it after ``growth_interval`` good steps."""
        if not self.enabled:
            return
        if grad_norm_finite:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale *= 2.0
                self.good_steps = 0
        else:
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0

    def overflowed(self, grad_norm: float) -> bool:
        """Whether a non-finite gradient is the scaler's business (fp16, S > 1) rather than a fault."""
        return self.enabled and not math.isfinite(grad_norm) and self.scale > 1.0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
