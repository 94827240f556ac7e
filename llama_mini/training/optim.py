"""Optimiser, learning-rate schedule and gradient clipping for the trainer.

AdamW with decoupled weight decay (Loshchilov & Hutter), per parameter p with gradient g:

    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
    p = p (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

Decay applies to matrices (ndim >= 2: linears and the embedding table) only; RMSNorm gains
(ndim < 2) are never decayed, since pulling a gain towards 0 shrinks the activations instead of
regularising anything.

Schedule, for the 0-based optimizer step s, peak lr, floor min_lr, W warmup and T total steps:

    s < W:        lr (s + 1) / W                                (step 0 already takes a step)
    W <= s < T:   progress = (s - W) / max(1, T - W)
                  cosine:   min_lr + (lr - min_lr) (1 + cos(pi progress)) / 2
                  linear:   lr - (lr - min_lr) progress
                  constant: lr
    s >= T:       min_lr (constant: lr)

Global gradient norm of the full, unsharded model under fairscale model parallel (size M):

    ||g||^2 = all_reduce_sum( sum_{p sharded} ||g_p||^2 ) + sum_{p replicated} ||g_p||^2

A sharded parameter (``parallel.shard_dim(name)`` not None) holds a disjoint slice on each rank,
so its squares are summed over ranks; a replicated one (norm gains) holds the same full gradient
on every rank and is counted once, from the local copy. All in fp32; one scalar all-reduce.
Clipping multiplies every gradient by min(1, max_norm / (||g|| + 1e-6)), as
``torch.nn.utils.clip_grad_norm_`` does, and leaves them alone when the norm is not finite.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from llama_mini import parallel

__all__ = ["param_groups", "build_optimizer", "lr_at", "set_lr", "global_grad_norm", "clip_grad_norm_"]

DECAYS = ("cosine", "linear", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (ndim >= 2) decayed by ``weight_decay``, vectors (ndim < 2)
    not. Only trainable parameters; each group carries its parameter ``names``; an empty group
    is left out."""
    decay: dict = {"params": [], "names": [], "weight_decay": weight_decay}
    no_decay: dict = {"params": [], "names": [], "weight_decay": 0.0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = decay if p.ndim >= 2 else no_decay
        group["params"].append(p)
        group["names"].append(name)
    return [g for g in (decay, no_decay) if g["params"]]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, weight_decay)``. ``fused=None`` picks the fused kernel
    when every parameter is on CUDA and torch's default (foreach) implementation otherwise."""
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if len(tuple(betas)) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("model has no parameters with requires_grad=True to optimise")
    if fused is None:
        params = [p for g in groups for p in g["params"]]
        fused = True if all(p.device.type == "cuda" for p in params) else None
    return torch.optim.AdamW(groups, lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps,
                             weight_decay=weight_decay, fused=fused)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          decay: str = "cosine") -> float:
    """Learning rate for the 0-based optimizer step ``step`` (see the module docstring)."""
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not 0 <= min_lr <= lr:
        raise ValueError(f"min_lr must be in [0, lr={lr}], got {min_lr!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if decay == "constant":
        return lr
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if decay == "linear":
        return lr - (lr - min_lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group of ``optimizer``."""
    if not (lr >= 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    for group in optimizer.param_groups:
        group["lr"] = lr


def _mp_group_and_size(mp_group) -> tuple[object, int]:
    if mp_group is not None:
        return mp_group, dist.get_world_size(mp_group)
    size = parallel.model_parallel_size()
    if size == 1:
        return None, 1
    from fairscale.nn.model_parallel import initialize as mpu

    return mpu.get_model_parallel_group(), size


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """sum ||g||^2 over ``grads``, in fp32 whatever their dtype, as a scalar on ``device``."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    # per-tensor fp32 norms (vector_norm upcasts before squaring, so fp16 squares cannot overflow)
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), 2, dtype=torch.float32).to(device) for g in grads])
    return (norms * norms).sum()


def global_grad_norm(named_params: Iterable[tuple[str, nn.Parameter]], mp_group=None) -> torch.Tensor:
    """The fp32 2-norm of the gradient of the full (unsharded) model; parameters without a
    gradient are skipped. Collective under model parallel: every rank of the group calls it."""
    named = [(n, p) for n, p in named_params]
    if not named:
        return torch.zeros((), dtype=torch.float32)
    device = next((p.grad.device for _, p in named if p.grad is not None), named[0][1].device)
    group, size = _mp_group_and_size(mp_group)
    sharded, replicated = [], []
    for name, p in named:
        if p.grad is None:
            continue
        (sharded if size > 1 and parallel.shard_dim(name) is not None else replicated).append(p.grad)
    total = _sum_of_squares(sharded, device)
    if size > 1:
        # always, even with no local sharded grads: every rank must join the collective
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    total = total + _sum_of_squares(replicated, device)
    return total.sqrt()


def clip_grad_norm_(named_params: Iterable[tuple[str, nn.Parameter]], max_norm: float, mp_group=None) -> torch.Tensor:
    """Scale all gradients by min(1, max_norm / (norm + 1e-6)) so the global norm is at most
    ``max_norm`` (no-op if ``max_norm <= 0``; gradients are left as they are where the norm is
    inf/nan); return the norm before clipping.

    Decided on the device, without reading the norm on the host: a training step reads it once
    later, together with the loss (``training.step``)."""
    named = [(n, p) for n, p in named_params]
    norm = global_grad_norm(named, mp_group=mp_group)
    if max_norm <= 0:
        return norm
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    coef = torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for _, p in named:
        if p.grad is not None:
            by_kind.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad.detach())
    for (device, dtype), grads in by_kind.items():
        torch._foreach_mul_(grads, coef.to(device, dtype))
    return norm
