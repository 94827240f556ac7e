"""One optimizer step: the training step the trainer, the experiment loop (``bench/experiment.fit``)
and the throughput benchmarks (``bench/train_throughput.py``, ``bench/model_throughput.py``) all run.

    from llama_mini.training.step import train_step
    result = train_step(model, optimizer, [batch, ...], lr=3e-3, grad_clip=1.0)
    result.loss, result.grad_norm, result.tokens, result.processed, result.skipped, result.host_syncs

A micro-batch is a dict of (B, T) integer tensors: ``input_ids``, ``target_ids`` and optionally
``position_ids`` and ``document_ids``; ``forward(input_ids, target_ids, **optional)`` returns the
mean cross-entropy over the targets that count (``!= ignore_index``). That is the interface of
``llama_mini.Transformer`` (also compiled) and of any model written the same way. On every rank:

  1. count the targets that count: n_j per micro-batch, N over the whole global batch (an
     all-reduce over the data-parallel group when one is given);
  2. for each micro-batch with n_j > 0: loss_j = forward(...) under ``autocast()``; backward of
     loss_j * n_j / N (times the fp16 loss scale). Summed over micro-batches and data-parallel
     ranks these are the gradient of the token-weighted mean loss of the global batch, whatever
     the layout, so one process with accumulation and many processes give the same step;
  3. after the last micro-batch only: sum the gradients over the data-parallel group
     (``all_reduce_grads``, flat buckets);
  4. unscale (fp16), then clip by the global gradient norm (``optim.global_grad_norm``: model-
     parallel shards summed, replicas counted once), without reading the norm;
  5. one all-reduce over the world of the loss sum and the caller's ``extra`` values (the
     trainer's stop flags), then ONE read of loss, extras and norm to the host;
  6. finite loss and norm: AdamW step at ``lr``; a non-finite norm under an fp16 loss scale > 1:
     skipped, the scale halves (``overflow``); anything else non-finite: skipped (``nonfinite``;
     the caller decides whether that stops the run);
  7. ``zero_grad(set_to_none=True)``.

Host synchronisations. Every read of a tensor's value on the host (``.item()``, ``float()``,
``int()``, ``bool()``, ``.tolist()``) makes the host wait for the device queue. The step, the
model's range checks and the kernels' input checks all read through one counting helper
(``llama_mini.kernels.common.host_read``), and ``StepResult.host_syncs`` is the number of reads
made during the step, measured, not assumed. The step's own minimum, and what it does, is two
reads per step whatever the number of micro-batches:

  read 1  the counts [n_1 .. n_M, N], one ``.tolist()``. The weights n_j / N must be Python
          numbers before the first backward (a micro-batch with n_j = 0 is left out: its mean is
          0/0, and N = 0 is an error), so this read cannot move to the end. It is skipped when
          the caller passes ``counts`` it already holds and no data-parallel group is given.
          In the trainer the batches are still CPU tensors here, so on a GPU it waits for
          nothing unless a data-parallel all-reduce of N is involved.
  read 2  [loss sum, extras..., grad norm], one ``.tolist()`` after the all-reduce. Whether to
          take the optimizer step (finite loss and norm) is decided on the host from it, so it
          must come before ``optimizer.step()``.

Clipping (``optim.clip_grad_norm_``) multiplies by
``torch.where(isfinite(norm), min(1, clip / (norm + 1e-6)), 1)`` on the device instead of testing
the norm on the host first, which cost one read more. The forward reads values too, and they are counted: a
``Transformer`` with ``ModelArgs.validate_inputs`` range-checks its id tensors, one read per
tensor given (``input_ids``, ``target_ids``, ``position_ids``; skipped under ``torch.compile``);
the Triton cross-entropy and linear + cross-entropy check their targets (one read per call),
and the Triton RoPE its position ids (one read per new tensor). A forward that reads values
without ``host_read`` (a model of your own) is not counted. AdamW's own ``.item()`` calls read the
per-parameter step counters, which torch keeps on the CPU (non-fused) or does not read (fused):
they wait for no device and are not counted.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..kernels.common import host_read, host_reads
from .distributed import all_reduce
from .optim import clip_grad_norm_, set_lr
from .precision import LossScaler

__all__ = ["StepResult", "EmptyBatchError", "train_step", "all_reduce_grads", "MIN_HOST_SYNCS"]

MIN_HOST_SYNCS = 2  # the counts before the first backward, then loss + norm + extras in one read

_OPTIONAL = ("position_ids", "document_ids")


class EmptyBatchError(ValueError):
    """The global batch holds no target that counts (every target is ignore_index)."""


@dataclass
class StepResult:
    """What one ``train_step`` did."""

    loss: float  # token-weighted mean loss of the global batch (all data-parallel ranks)
    grad_norm: float  # global gradient norm before clipping (after fp16 unscaling)
    tokens: int  # counted targets (!= ignore_index) of the global batch
    processed: int  # positions fed to the model, padding included, times the data-parallel size
    skipped: bool  # no optimizer step was taken (overflow or nonfinite)
    overflow: bool = False  # skipped because fp16 gradients overflowed; the loss scale halved
    nonfinite: bool = False  # skipped because the loss or the norm is NaN/inf (not an fp16 overflow)
    host_syncs: int = 0  # device-to-host reads this step made (see the module docstring)
    lr: float | None = None  # the learning rate the step was given (None: the optimizer's own)
    extra: list[float] = field(default_factory=list)  # the caller's extra values summed over the world


def _group_size(group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def all_reduce_grads(model: nn.Module, group=None) -> None:
    """Sum gradients over ``group`` (the data-parallel group), in flat buckets of up to 2^25
    elements. A parameter without a gradient (this rank's micro-batches were all ignored) takes
    part with zeros, bucket for bucket, so every rank makes the same collectives."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in model.parameters()]
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads + [None]:
        if g is not None and (not bucket or (size + g.numel() <= 2**25 and g.dtype == bucket[0].dtype)):
            bucket.append(g)
            size += g.numel()
            continue
        if bucket:
            flat = _flatten_dense_tensors(bucket)
            all_reduce(flat, group)
            for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                dst.copy_(src)
        bucket, size = ([g], g.numel()) if g is not None else ([], 0)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[dict],
    *,
    forward: Callable[..., torch.Tensor] | None = None,
    lr: float | None = None,
    grad_clip: float = 0.0,
    scaler: LossScaler | None = None,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    device: torch.device | str | None = None,
    ignore_index: int | None = None,
    dp_group=None,
    mp_group=None,
    counts: Sequence[int] | None = None,
    extra: Sequence[float] = (),
) -> StepResult:
    """One optimizer step of ``model`` over ``micro_batches`` (the module docstring has the math
    and the host reads).

    model          the module whose parameters train: gradients, clipping, all-reduce.
    optimizer      steps ``model``'s parameters (``optim.build_optimizer``); zeroed at the end.
    micro_batches  dicts of (B, T) tensors, see the module docstring; moved to ``device``.
    forward        ``forward(input_ids, target_ids, **optional) -> mean loss`` [``model``]:
                   e.g. ``torch.compile(model)`` or a wrapper.
    lr             set on every parameter group before the optimizer step [leave it].
    grad_clip      clip the global gradient norm to this; <= 0: no clipping (norm still computed).
    scaler         ``precision.LossScaler`` (fp16); updated after the step [none: scale 1].
    autocast       zero-argument callable giving the forward's autocast context
                   (``precision.autocast_factory``) [none].
    device         where the model runs [the device of its first parameter].
    ignore_index   target id that does not count [``model.args.ignore_index``, else -100].
    dp_group       data-parallel group: N and the gradients are summed over it [none].
    mp_group       model-parallel group for the global norm; the loss is divided by its size
                   (it is summed over the world, where each replica counts it once per shard).
    counts         n_j per micro-batch, if the caller already holds them as Python ints.
    extra          values summed over the world in the same all-reduce as the loss (the
                   trainer's stop flags); returned in ``StepResult.extra``.

    Raises ``EmptyBatchError`` when no target of the global batch counts (nothing is changed).
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    forward = model if forward is None else forward
    scaler = scaler if scaler is not None else LossScaler(False)
    params = list(model.named_parameters())
    device = torch.device(device) if device is not None else params[0][1].device
    if ignore_index is None:
        ignore_index = getattr(getattr(model, "args", None), "ignore_index", -100)
    dp_size, mp_size = _group_size(dp_group), _group_size(mp_group)
    reads_before = host_reads()

    # read 1: every micro-batch's count and the global count, in one transfer
    data_parallel = dist.is_initialized() and dp_group is not None
    if counts is not None and len(counts) != len(micro_batches):
        raise ValueError(f"counts has {len(counts)} entries for {len(micro_batches)} micro-batches")
    if counts is None or data_parallel:
        local = (torch.tensor([int(n) for n in counts], dtype=torch.int64) if counts is not None else
                 torch.stack([(b["target_ids"] != ignore_index).sum() for b in micro_batches]))  # (M,)
        if data_parallel:
            total = local.sum().reshape(1).to(device, torch.float64)
            all_reduce(total, dp_group)
            got = host_read(torch.cat([local.to(device, torch.float64), total]))
        else:
            got = host_read(torch.cat([local, local.sum().reshape(1)]))
        counts, n_global = [int(n) for n in got[:-1]], float(got[-1])
    else:
        counts, n_global = [int(n) for n in counts], float(sum(counts))
    if n_global == 0:
        raise EmptyBatchError("the global batch holds no target token (all ignore_index)")

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    processed = 0
    for batch, n in zip(micro_batches, counts):
        processed += batch["input_ids"].numel()
        if n == 0:  # every target ignored: contributes nothing (its mean would be 0/0)
            continue
        optional = {k: batch[k].to(device) for k in _OPTIONAL if batch.get(k) is not None}
        with autocast():
            loss = forward(batch["input_ids"].to(device), batch["target_ids"].to(device), **optional)
        (loss * (n / n_global * scaler.scale)).backward()
        loss_sum += loss.detach().double() * n
    if dp_size > 1:
        all_reduce_grads(model, dp_group)
    if scaler.enabled:
        for _, p in params:
            if p.grad is not None:
                p.grad.div_(scaler.scale)
    norm = clip_grad_norm_(params, grad_clip, mp_group=mp_group)  # on the device: no host read

    # read 2: one all-reduce over the world (the loss is the same on model-parallel ranks; the
    # extras are the caller's, e.g. stop flags every rank must agree on), then one transfer
    packed = torch.cat([loss_sum.reshape(1), torch.tensor([float(x) for x in extra], dtype=torch.float64,
                                                          device=device)])
    all_reduce(packed)
    values = host_read(torch.cat([packed, norm.to(device, torch.float64).reshape(1)]))
    loss_value = values[0] / mp_size / n_global
    grad_norm = values[-1]

    overflow = nonfinite = False
    if math.isfinite(loss_value) and math.isfinite(grad_norm):
        if lr is not None:
            set_lr(optimizer, lr)
        optimizer.step()
        scaler.update(True)
    elif math.isfinite(loss_value) and scaler.overflowed(grad_norm):
        scaler.update(False)  # fp16 overflow: the scaler's business, not a fault
        overflow = True
    else:
        nonfinite = True
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_value, grad_norm=grad_norm, tokens=int(n_global), processed=processed * dp_size,
                      skipped=overflow or nonfinite, overflow=overflow, nonfinite=nonfinite,
                      host_syncs=host_reads() - reads_before, lr=lr, extra=list(values[1:-1]))
