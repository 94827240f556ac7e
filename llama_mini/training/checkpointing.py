"""Training checkpoints: Meta-format weights plus everything exact resume needs, saved atomically.

A run keeps its checkpoints under ``RUN/checkpoints/``:

    checkpoints/
      latest                     text: the name of the newest complete checkpoint
      step-00000200/
        consolidated.00.pth      model weights, one shard per model-parallel rank (Meta format)
        params.json              Meta's ModelArgs keys; llama_mini.json: the rest of ModelArgs
        tokenizer.model          the tokenizer, so the directory is a self-contained model
        optimizer.00.pt          AdamW state of model-parallel rank 00's parameters
        data.00.pt               data-parallel rank 00's streams: reader positions, policy buffers
        rng.000.pt               global rank 000's RNG states (torch CPU and CUDA, Python)
        trainer.json             step, tokens seen, layout, loss scale, the full configuration
      .step-00000400.partial/    a save in progress (or killed): never read, removed on the next save

A save writes every file into the ``.partial`` directory (each file itself atomically), waits for
all ranks, then rank 0 renames the directory to ``step-NNNNNNNN`` and rewrites ``latest``
atomically. Rename is atomic on a POSIX filesystem, so a process killed at any point leaves either
the previous checkpoint as ``latest`` or the new one complete. Multi-node runs need the run
directory on a filesystem every node sees. Loads use ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any

import torch
import torch.nn as nn

from ..checkpoint import atomic_torch_save, atomic_write_text, save_meta_checkpoint
from .distributed import DistInfo, barrier, broadcast_object

__all__ = ["checkpoint_name", "latest_checkpoint", "save_checkpoint", "load_checkpoint", "read_trainer_state"]

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _committed(root: str) -> list[tuple[int, str]]:
    """(step, path) of complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, "trainer.json")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint under ``root``: the one ``latest`` names, or (if that
    file is missing or names a directory that is gone) the highest step directory."""
    pointer = os.path.join(root, "latest")
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            name = f.read().strip()
        path = os.path.join(root, name)
        if _STEP_DIR.match(name) and os.path.isfile(os.path.join(path, "trainer.json")):
            return path
    committed = _committed(root)
    return committed[-1][1] if committed else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(
    root: str, step: int, *, dist_info: DistInfo, model: nn.Module, optimizer: torch.optim.Optimizer,
    data_state: dict, trainer_state: dict, tokenizer_path: str | None, keep: int,
) -> str:
    """Write checkpoint ``step`` (every rank calls it) and return its directory. Keeps the
    newest ``keep`` complete checkpoints. ``trainer_state`` must be JSON-serialisable."""
    name = checkpoint_name(step)
    partial = os.path.join(root, f".{name}.partial")
    if dist_info.is_main:
        os.makedirs(root, exist_ok=True)
        for stale in os.listdir(root):
            if stale.endswith(".partial"):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        os.makedirs(partial)
    barrier()
    if not os.path.isdir(partial):  # writers must never recreate it after rank 0 renamed it
        raise RuntimeError(f"rank {dist_info.rank}: checkpoint directory {partial} does not exist (is {root} "
                           "on a filesystem every node sees?)")
    if dist_info.dp_rank == 0:  # one copy of each model shard: data-parallel replicas are equal
        save_meta_checkpoint(model, partial)
        atomic_torch_save(optimizer.state_dict(), os.path.join(partial, f"optimizer.{dist_info.mp_rank:02d}.pt"))
    if dist_info.mp_rank == 0:  # model-parallel ranks of one replica read the same data
        atomic_torch_save(data_state, os.path.join(partial, f"data.{dist_info.dp_rank:02d}.pt"))
    atomic_torch_save(rng_state(), os.path.join(partial, f"rng.{dist_info.rank:03d}.pt"))
    if dist_info.is_main:
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, os.path.join(partial, "tokenizer.model"))
        state = dict(trainer_state, step=step, layout={
            "world_size": dist_info.world_size, "mp_size": dist_info.mp_size, "dp_size": dist_info.dp_size,
        })
        # written last: its presence marks a directory whose other files are all complete
        atomic_write_text(json.dumps(state, indent=2) + "\n", os.path.join(partial, "trainer.json"))
    barrier()
    final = os.path.join(root, name)
    if dist_info.is_main:
        if os.path.exists(final):  # the same step saved again (e.g. a resumed run's last step)
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write_text(name + "\n", os.path.join(root, "latest"))
        # checkpoints after this step belong to a future the run abandoned when it was resumed
        # from an earlier checkpoint; of the rest, the newest ``keep`` (this one included) stay
        for s, old in _committed(root):
            if s > step:
                shutil.rmtree(old, ignore_errors=True)
        for _, old in [c for c in _committed(root) if c[0] <= step][:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_trainer_state(path: str) -> dict:
    file = os.path.join(path, "trainer.json")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a complete training checkpoint: {file} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def _load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file missing: {path}") from None
    except Exception as e:
        raise ValueError(f"cannot load {path}: {e}") from e


def load_checkpoint(path: str, *, dist_info: DistInfo, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Load weights, optimizer state and RNG states of this rank from checkpoint ``path``;
    return (trainer_state, data_state). The process layout must be the one it was saved with
    (reshard the weights with ``llama-mini reshard`` to change model parallelism and
    start a new run from them)."""
    from ..checkpoint import load_meta_state_dict

    state = read_trainer_state(path)
    saved = state.get("layout", {})
    now = {"world_size": dist_info.world_size, "mp_size": dist_info.mp_size, "dp_size": dist_info.dp_size}
    if saved != now:
        raise ValueError(
            f"{path} was saved with layout {saved} but this run has {now}; exact resume needs the same "
            "layout (the weights alone can be resharded: llama-mini reshard)"
        )
    weights = load_meta_state_dict(path, dist_info.mp_rank, dist_info.mp_size)
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in weights.items()})
    optimizer.load_state_dict(_load(os.path.join(path, f"optimizer.{dist_info.mp_rank:02d}.pt")))
    data_state = _load(os.path.join(path, f"data.{dist_info.dp_rank:02d}.pt"))
    set_rng_state(_load(os.path.join(path, f"rng.{dist_info.rank:03d}.pt")))
    return state, data_state


def resolve_resume(resume: str, root: str, dist_info: DistInfo) -> str | None:
    """The checkpoint to resume from for ``run.resume`` (auto | never | a path), agreed by all ranks."""
    if resume == "never":
        found = latest_checkpoint(root)
        if found is not None:
            raise ValueError(
                f"run.resume=never but {root} already holds checkpoints ({os.path.basename(found)}); "
                "choose another run.name, delete the directory, or resume with run.resume=auto"
            )
        return None
    if resume == "auto":
        path = latest_checkpoint(root) if dist_info.is_main else None
        return broadcast_object(path)
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"run.resume: checkpoint directory not found: {resume}")
    if os.path.isfile(os.path.join(resume, "latest")):  # a run's checkpoints/ root: its newest
        return latest_checkpoint(resume) or resume
    return resume
