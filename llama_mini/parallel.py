"""Model-parallel layout: which layers are sharded, and how full state dicts map to shards.

When fairscale's model parallel is initialised with size > 1 the model is built, as Meta's
reference builds it, from fairscale layers:

  tok_embeddings             ParallelEmbedding     weight (V, C)        split on dim 1 (C)
  attention.wq / wk / wv     ColumnParallelLinear  weight (out, C)      split on dim 0 (heads)
  attention.wo               RowParallelLinear     weight (C, H*D)      split on dim 1 (heads)
  feed_forward.w1 / w3       ColumnParallelLinear  weight (hidden, C)   split on dim 0
  feed_forward.w2            RowParallelLinear     weight (C, hidden)   split on dim 1
  output                     ColumnParallelLinear  weight (V, C)        split on dim 0 (vocab),
                                                   logits gathered so every rank sees all V
  *_norm, norm               replicated

Otherwise plain ``nn.Linear`` / ``nn.Embedding`` with the same names and shapes are used and a
single process needs no ``torch.distributed`` at all.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn as nn

__all__ = [
    "model_parallel_is_initialized",
    "model_parallel_size",
    "model_parallel_rank",
    "shard_dim",
    "shard_state_dict",
    "merge_state_dicts",
    "gather_state_dict",
    "init_weights",
    "column_linear",
    "row_linear",
    "embedding",
]

_SHARD_DIMS = [
    (re.compile(r"(^|\.)tok_embeddings\.weight$"), 1),
    (re.compile(r"(^|\.)attention\.w[qkv]\.weight$"), 0),
    (re.compile(r"(^|\.)attention\.wo\.weight$"), 1),
    (re.compile(r"(^|\.)feed_forward\.w[13]\.weight$"), 0),
    (re.compile(r"(^|\.)feed_forward\.w2\.weight$"), 1),
    (re.compile(r"(^|\.)output\.weight$"), 0),
]


def model_parallel_is_initialized() -> bool:
    """True when fairscale's model parallel groups exist in this process."""
    try:
        from fairscale.nn.model_parallel import initialize as mpu
    except ImportError:
        return False
    return bool(mpu.model_parallel_is_initialized())


def model_parallel_size() -> int:
    """The model-parallel world size, 1 when model parallel is not initialised."""
    if not model_parallel_is_initialized():
        return 1
    from fairscale.nn.model_parallel import initialize as mpu

    return mpu.get_model_parallel_world_size()


def model_parallel_rank() -> int:
    """This process's model-parallel rank, 0 when model parallel is not initialised."""
    if not model_parallel_is_initialized():
        return 0
    from fairscale.nn.model_parallel import initialize as mpu

    return mpu.get_model_parallel_rank()


def shard_dim(name: str) -> int | None:
    """The dimension along which parameter ``name`` is split across model-parallel ranks,
    or None if it is replicated."""
    for pattern, dim in _SHARD_DIMS:
        if pattern.search(name):
            return dim
    return None


def shard_state_dict(full: dict[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
    """The slice of a full (unsharded) state dict that model-parallel rank ``rank`` holds."""
    out = {}
    for name, tensor in full.items():
        dim = shard_dim(name)
        if dim is None or size == 1:
            out[name] = tensor
            continue
        if tensor.shape[dim] % size != 0:
            raise ValueError(
                f"{name}: dim {dim} of shape {tuple(tensor.shape)} is not divisible by model-parallel size {size}"
            )
        out[name] = tensor.chunk(size, dim=dim)[rank].clone()
    return out


def merge_state_dicts(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-rank state dicts (rank order) back into a full state dict.

    This is how Meta's ``consolidated.0N.pth`` shards become one model."""
    if len(shards) == 1:
        return dict(shards[0])
    names = list(shards[0])
    for i, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(names):
            diff = sorted(set(shard) ^ set(names))
            raise ValueError(f"model-parallel shard {i} has different tensors from shard 0: {diff[:5]}")
    out = {}
    for name in names:
        dim = _merge_dim(name, shards)
        parts = [s[name] for s in shards]
        if dim is None:
            for i, part in enumerate(parts[1:], start=1):
                if part.shape != parts[0].shape or not torch.equal(part, parts[0]):
                    raise ValueError(f"{name}: replicated tensor differs between shard 0 and shard {i}")
            out[name] = parts[0]
            continue
        try:
            out[name] = torch.cat(parts, dim=dim)
        except RuntimeError as e:
            shapes = [tuple(p.shape) for p in parts]
            raise ValueError(f"{name}: shards of shapes {shapes} do not concatenate on dim {dim}: {e}") from None
    return out


def _merge_dim(name: str, shards: list[dict[str, torch.Tensor]]) -> int | None:
    """The dim along which ``name`` was split. Meta's LLaMA-1/2 shard the embedding table on
    the model dim (ParallelEmbedding); Llama 3 shards it on the vocabulary
    (VocabParallelEmbedding). The output projection, split on the vocabulary in both, tells
    which: a shard whose width equals the model dim was split on the vocabulary."""
    dim = shard_dim(name)
    if dim == 1 and name.endswith("tok_embeddings.weight"):
        prefix = name[: -len("tok_embeddings.weight")]
        output = shards[0].get(prefix + "output.weight")
        if output is not None and shards[0][name].shape[1] == output.shape[1]:
            return 0
    return dim


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a (possibly) model-parallel model, on every model-parallel rank.

    Collective: every rank of the model-parallel group must call it."""
    local = model.state_dict()
    size = model_parallel_size()
    if size == 1:
        return {k: v.detach().clone() for k, v in local.items()}
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as mpu

    group = mpu.get_model_parallel_group()
    out = {}
    for name, tensor in local.items():
        dim = shard_dim(name)
        if dim is None:
            out[name] = tensor.detach().clone()
            continue
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.detach().contiguous(), group=group)
        out[name] = torch.cat(parts, dim=dim)
    return out


def init_weights(model: nn.Module, seed: int) -> None:
    """Re-initialise every parameter so that the weights depend on ``seed`` only, not on the
    model-parallel layout or on what consumed the global RNG before.

    Each parameter's full (unsharded) tensor is drawn from its own generator, seeded by
    ``seed`` and the parameter's name, and this rank keeps its slice (``shard_dim``). So a
    2-way model-parallel model holds exactly the shards of the single-process model built with
    the same seed. Norm weights are ones; ``attention.wo`` and ``feed_forward.w2`` (the
    residual-stream outputs) use std ``init_std / sqrt(2 * n_layers)``, everything else
    ``init_std``, as the constructors do."""
    import math
    import zlib

    args = model.args
    mp = getattr(model, "mp_size", 1)
    rank = model_parallel_rank() if mp > 1 else 0
    out_std = args.init_std / math.sqrt(2 * args.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            dim = shard_dim(name) if mp > 1 else None
            shape = list(p.shape)
            if dim is not None:
                shape[dim] *= mp
            std = out_std if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else args.init_std
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            full = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
            if dim is not None:
                full = full.chunk(mp, dim=dim)[rank]
            p.copy_(full)


def _normal(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def column_linear(in_features: int, out_features: int, std: float, parallel: bool, gather_output: bool = False) -> nn.Module:
    """Linear y = x W^T with W (out, in); sharded on out across ranks when ``parallel``."""
    if parallel:
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear

        return ColumnParallelLinear(
            in_features, out_features, bias=False, gather_output=gather_output, init_method=_normal(std)
        )
    layer = nn.Linear(in_features, out_features, bias=False)
    _normal(std)(layer.weight)
    return layer


def row_linear(in_features: int, out_features: int, std: float, parallel: bool) -> nn.Module:
    """Linear whose input features are sharded across ranks (output summed) when ``parallel``."""
    if parallel:
        from fairscale.nn.model_parallel.layers import RowParallelLinear

        return RowParallelLinear(in_features, out_features, bias=False, input_is_parallel=True, init_method=_normal(std))
    layer = nn.Linear(in_features, out_features, bias=False)
    _normal(std)(layer.weight)
    return layer


def embedding(num_embeddings: int, dim: int, std: float, parallel: bool) -> nn.Module:
    """Token embedding table (V, C); sharded on C across ranks when ``parallel`` (as Meta's)."""
    if parallel:
        from fairscale.nn.model_parallel.layers import ParallelEmbedding

        return ParallelEmbedding(num_embeddings, dim, init_method=_normal(std))
    layer = nn.Embedding(num_embeddings, dim)
    _normal(std)(layer.weight)
    return layer
