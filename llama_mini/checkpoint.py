"""Checkpoint formats: Meta's ``consolidated.NN.pth`` + ``params.json``, written atomically.

A Meta checkpoint directory holds one weight shard per model-parallel rank,
``consolidated.{rank:02d}.pth``, and ``params.json`` with Meta's ModelArgs keys only (so Meta's
own code still loads it). llama-mini's extra settings (attention backend, RoPE scaling, ...)
go beside them in ``llama_mini.json``.

    save_meta_checkpoint(model, "ckpt/")             # every model-parallel rank calls it
    model = load_meta_checkpoint("ckpt/")             # any number of shards -> this process's layout

Loads use ``torch.load(..., weights_only=True)``. Writes go to a temporary file in the same
directory, are flushed to disk, then renamed over the target, so a process killed mid-save
leaves the previous file intact.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from typing import IO, Any, Callable

import torch
import torch.nn as nn

from . import parallel
from .config import ModelArgs

__all__ = [
    "CheckpointMismatchError",
    "check_state_dict",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_text",
    "save_meta_checkpoint",
    "load_meta_state_dict",
    "load_meta_checkpoint",
    "resolve_checkpoint_dir",
]

EXTRA_CONFIG = "llama_mini.json"


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model: missing or unexpected tensors, or wrong shapes."""


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Raise ``CheckpointMismatchError`` naming each tensor whose shape differs (with both
    shapes) and, when ``strict``, each missing or unexpected key. Touches no tensor data."""
    expected = model.state_dict()
    problems = []
    for name, tensor in state_dict.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            problems.append(
                f"{name}: checkpoint has shape {tuple(tensor.shape)}, model expects {tuple(expected[name].shape)}"
            )
    if strict:
        ignorable = {"rope.freqs"}
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected) - ignorable)
        if missing:
            problems.append(f"missing tensors: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            problems.append(f"unexpected tensors: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if problems:
        raise CheckpointMismatchError("state dict does not match the model:\n  " + "\n  ".join(problems))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], mode: str) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, rename it over
    ``path``, fsync the directory. On any failure the temporary file is removed and ``path``
    keeps its previous content."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (temporary file, fsync, rename)."""
    atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename)."""
    atomic_write(path, lambda f: f.write(text), "w")


def save_meta_checkpoint(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write this rank's shard ``consolidated.{rank:02d}.pth``; rank 0 also writes
    ``params.json`` and ``llama_mini.json``. Every model-parallel rank must call it."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    rank = parallel.model_parallel_rank() if getattr(model, "mp_size", 1) > 1 else 0
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(state, os.path.join(directory, f"consolidated.{rank:02d}.pth"))
    if rank == 0:
        args: ModelArgs = model.args
        atomic_write_text(json.dumps(args.meta_params(), indent=2) + "\n", os.path.join(directory, "params.json"))
        extra = {k: v for k, v in args.to_dict().items() if k not in args.meta_params()}
        atomic_write_text(json.dumps(extra, indent=2) + "\n", os.path.join(directory, EXTRA_CONFIG))


_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth$")


def has_shards(directory: str) -> bool:
    """Whether ``directory`` holds at least one ``consolidated.NN.pth``."""
    return any(_SHARD_RE.search(p) for p in glob.glob(os.path.join(glob.escape(directory), "consolidated.*.pth")))


def resolve_checkpoint_dir(path: str | os.PathLike) -> str:
    """The directory holding the weights: ``path`` itself, or, when ``path`` has no
    ``consolidated.*.pth`` but a ``latest`` file (a training run's ``checkpoints/`` root), the
    subdirectory that file names. Every loader here accepts either."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    latest = os.path.join(path, "latest")
    if has_shards(path) or not os.path.isfile(latest):
        return path
    with open(latest, encoding="utf-8") as f:
        name = f.read().strip()
    if not name:
        raise ValueError(f"{latest} is empty; expected the name of a checkpoint subdirectory")
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"{latest} names {name!r}; expected a subdirectory of {path}")
    target = os.path.join(path, name)
    if not os.path.isdir(target):
        raise FileNotFoundError(f"{latest} names {name!r}, but {target} is not a directory")
    return target


def _shard_paths(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    paths = sorted(glob.glob(os.path.join(glob.escape(directory), "consolidated.*.pth")))
    paths = [p for p in paths if _SHARD_RE.search(p)]
    if not paths:
        raise FileNotFoundError(f"no consolidated.NN.pth shard in checkpoint directory {directory}")
    ranks = [int(_SHARD_RE.search(p).group(1)) for p in paths]
    if ranks != list(range(len(paths))):
        raise ValueError(f"{directory}: shards are not numbered 00..{len(paths) - 1:02d}: {[os.path.basename(p) for p in paths]}")
    return paths


def _torch_load(path: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated or corrupt file, or a pickle that is not plain tensors
        raise ValueError(f"cannot load checkpoint shard {path}: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def load_meta_state_dict(directory: str | os.PathLike, mp_rank: int = 0, mp_size: int = 1) -> dict[str, torch.Tensor]:
    """The state dict model-parallel rank ``mp_rank`` of ``mp_size`` needs from a Meta
    checkpoint directory, whatever the number of shards it was saved with."""
    directory = resolve_checkpoint_dir(directory)
    paths = _shard_paths(directory)
    if len(paths) == mp_size:
        return _torch_load(paths[mp_rank])
    full = parallel.merge_state_dicts([_torch_load(p) for p in paths])
    return parallel.shard_state_dict(full, mp_rank, mp_size)


def read_args(directory: str | os.PathLike, **overrides: Any) -> ModelArgs:
    """ModelArgs from ``params.json`` (+ ``llama_mini.json`` if present), overrides applied.
    A vocab_size of -1 (as Meta writes) is read from the weights."""
    directory = resolve_checkpoint_dir(directory)
    extras: dict[str, Any] = {}
    extra_path = os.path.join(directory, EXTRA_CONFIG)
    if os.path.exists(extra_path):
        with open(extra_path, encoding="utf-8") as f:
            try:
                extras = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{extra_path}: not valid JSON ({e})") from None
    extras.update(overrides)
    args = ModelArgs.from_params_json(os.path.join(directory, "params.json"), **extras)
    if args.vocab_size == -1:
        shard = _torch_load(_shard_paths(directory)[0])
        if "tok_embeddings.weight" not in shard:
            raise ValueError(f"{directory}: vocab_size is -1 and the shard has no tok_embeddings.weight to read it from")
        args.vocab_size = int(shard["tok_embeddings.weight"].shape[0])
    return args


def load_meta_checkpoint(
    directory: str | os.PathLike,
    *,
    strict: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    **overrides: Any,
) -> nn.Module:
    """Build a ``Transformer`` from a Meta checkpoint directory and load its weights into this
    process's layout (single process, or this rank's model-parallel shard).

    In a single process the model is built on the ``meta`` device, so no memory is spent on
    (and no time on randomly initialising) weights about to be replaced; the checkpoint's
    tensors are moved to ``device``, cast to ``dtype`` (None keeps the file's dtype, e.g.
    Meta's bf16) and taken as the parameters. Under model parallel, and with ``strict=False``
    (where missing tensors keep a normal initialisation), the model is built normally and the
    tensors are copied in.
    ``overrides`` replace ModelArgs fields (e.g. ``max_seq_len``, ``attn_backend``).
    """
    from .model import Transformer

    directory = resolve_checkpoint_dir(directory)
    _shard_paths(directory)  # fail on a missing directory or shard before anything else
    args = read_args(directory, **overrides)
    # fairscale's parallel layers allocate their weights on the CPU whatever the device
    # context, so under model parallel the model is built normally (then overwritten).
    on_meta = strict and parallel.model_parallel_size() == 1
    if on_meta:
        with torch.device("meta"):
            model = Transformer(args)
    else:
        model = Transformer(args).to(device=device, dtype=dtype)
    rank = parallel.model_parallel_rank() if model.mp_size > 1 else 0
    state = load_meta_state_dict(directory, rank, model.mp_size)
    state = {
        k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
        for k, v in state.items()
    }
    model.load_state_dict(state, strict=strict, assign=on_meta)
    return model
