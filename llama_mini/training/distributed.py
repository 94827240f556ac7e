"""Process groups: the one place that starts torch.distributed and fairscale model parallel.

    dist_info = setup(model_parallel=2, backend="auto", device="auto", timeout_s=300)
    dist_info.dp_rank, dist_info.dp_size, dist_info.mp_rank, dist_info.mp_size, dist_info.device
    ...
    teardown()

A single process (no ``torchrun``, ``WORLD_SIZE`` unset or 1) with ``model_parallel=1`` starts no
process group at all. Under ``torchrun --nproc_per_node=N`` the world of N ranks is split, as
fairscale does it, into N/M data-parallel replicas of an M-way model-parallel model:

    global rank r:  model-parallel rank r % M,  data-parallel rank r // M
    model-parallel groups: consecutive ranks {0..M-1}, {M..2M-1}, ...   (one model replica each)
    data-parallel groups:  ranks with the same model-parallel rank      (one shard, all replicas)

Collectives time out after ``timeout_s``: a rank that dies or hangs makes the others fail with an
error instead of waiting forever (torchrun then stops the whole job).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "teardown", "dp_group", "mp_group", "all_reduce", "barrier", "broadcast_object"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0  # global rank
    world_size: int = 1
    local_rank: int = 0  # rank on this node (picks the GPU)
    mp_rank: int = 0  # model-parallel rank: which shard of the weights
    mp_size: int = 1
    dp_rank: int = 0  # data-parallel rank: which slice of the data
    dp_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, logs and writes files shared by all ranks."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("run.device: 'cuda' was asked for but torch.cuda.is_available() is False")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(device)


def setup(model_parallel: int = 1, backend: str = "auto", device: str = "auto", timeout_s: float = 300.0) -> DistInfo:
    """Start the process group (under torchrun) and fairscale model parallel; return the layout."""
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if world == 1 and model_parallel == 1:
        return DistInfo(device=dev)
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError(
            f"parallel.model={model_parallel} needs {model_parallel} processes: launch with "
            f"torchrun --nproc_per_node={model_parallel} train.py --parallel.model {model_parallel} ..."
        )
    if world % model_parallel != 0:
        raise ValueError(
            f"parallel.model={model_parallel} does not divide the world size {world} "
            f"(torchrun --nproc_per_node x nodes); choose a divisor of {world}"
        )
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("parallel.backend: nccl needs run.device cuda; use gloo on cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    from fairscale.nn.model_parallel import initialize as mpu

    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(model_parallel)
    return DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
        mp_rank=mpu.get_model_parallel_rank(), mp_size=mpu.get_model_parallel_world_size(),
        dp_rank=mpu.get_data_parallel_rank(), dp_size=mpu.get_data_parallel_world_size(),
        device=dev, backend=backend,
    )


def teardown() -> None:
    """Destroy fairscale's groups and the process group (without it processes abort at exit)."""
    if not dist.is_initialized():
        return
    from fairscale.nn.model_parallel import initialize as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    dist.destroy_process_group()


def dp_group():
    """The data-parallel group of this rank (None when not distributed)."""
    if not dist.is_initialized():
        return None
    from fairscale.nn.model_parallel import initialize as mpu

    return mpu.get_data_parallel_group()


def mp_group():
    """The model-parallel group of this rank (None when not distributed)."""
    if not dist.is_initialized():
        return None
    from fairscale.nn.model_parallel import initialize as mpu

    return mpu.get_model_parallel_group()


def all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place SUM over ``group`` (the world by default); a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` from global rank ``src`` on every rank (pickled; small objects only)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
