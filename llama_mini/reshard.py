"""Reshard a Meta-format checkpoint: merge model-parallel shards into one, or split into N.

    llama-mini reshard SRC DST --mp N [--force] [--quiet]

    llama-mini reshard llama-2-13b/ llama-2-13b-mp1/ --mp 1    # 2 shards -> 1
    llama-mini reshard ckpt/ ckpt-mp4/ --mp 4                  # 1 shard  -> 4
    llama-mini reshard runs/exp1/checkpoints/ out/ --mp 2      # follows `latest`

SRC is a checkpoint directory holding ``consolidated.{rank:02d}.pth`` (one per model-parallel
rank) and usually ``params.json``; or a training-run checkpoint root holding a text file
``latest`` that names the step directory to use (e.g. ``step-00000100``). Every shard is
loaded (``torch.load(weights_only=True)``, memory-mapped), the shards are concatenated back
into the full state dict (``parallel.merge_state_dicts``) and the full state dict is split
into ``N`` shards (``parallel.shard_state_dict``), written one at a time, each atomically, to
``DST/consolidated.{rank:02d}.pth``. ``params.json``, ``llama_mini.json`` and
``tokenizer.model`` are copied when present. Training state that sits beside the weights in
a trainer's step directory (``optimizer.NN.pt``, ``data.NN.pt``, ``rng.NNN.pt``,
``trainer.json``) belongs to that run's layout and is not copied; a note lists what was left.

Embedding layout. Meta's LLaMA 1/2 split ``tok_embeddings`` on dim 1 (the model dim,
fairscale's ParallelEmbedding); Llama 3 splits it on dim 0 (the vocabulary,
VocabParallelEmbedding). Merging reads either (``merge_state_dicts`` tells them apart by the
width of ``output.weight``). A split always writes the dim-1 layout this library's
model-parallel model uses, so a Llama 3 checkpoint resharded to N > 1 loads here (and in
LLaMA 1/2's reference code) but not in Meta's Llama 3 code under model parallel.

Everything is checked before anything is written: ``N >= 1``; every sharded tensor divisible
by ``N`` (all offenders are named with their shape and dim); DST is not SRC; DST holds no
``consolidated.*.pth`` unless ``--force``, in which case shards the new set does not contain
(e.g. ranks >= N left by an earlier, wider split) are removed afterwards, so DST is a
consistent N-shard checkpoint. Memory: the full state dict is held once, plus one output
shard at a time.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Callable

import torch

from . import parallel
from .checkpoint import (
    EXTRA_CONFIG, _SHARD_RE, _shard_paths, _torch_load, atomic_torch_save, atomic_write, has_shards,
    resolve_checkpoint_dir,
)

__all__ = ["reshard_checkpoint", "main"]

LATEST = "latest"
COPIED_FILES = ("params.json", EXTRA_CONFIG, "tokenizer.model")

Progress = Callable[[str], None]


def _mib(state: dict[str, torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in state.values()) / 2**20


def _check_divisible(full: dict[str, torch.Tensor], mp_size: int) -> None:
    bad = []
    for name, tensor in full.items():
        dim = parallel.shard_dim(name)
        if dim is None or mp_size == 1:
            continue
        if tensor.dim() <= dim or tensor.shape[dim] % mp_size != 0:
            size = tensor.shape[dim] if tensor.dim() > dim else "missing"
            bad.append(f"{name}: shape {tuple(tensor.shape)}, dim {dim} ({size}) is not divisible by {mp_size}")
    if bad:
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ValueError(f"cannot split into {mp_size} model-parallel shards:\n  " + "\n  ".join(bad[:10]) + more)


def _head_note(src_dir: str, mp_size: int) -> str | None:
    """A note when params.json's head counts do not divide ``mp_size``: the files are valid
    (and load merged in one process) but such a model cannot run on ``mp_size`` ranks."""
    path = os.path.join(src_dir, "params.json")
    try:
        with open(path, encoding="utf-8") as f:
            params = json.load(f)
        heads = {"n_heads": params["n_heads"], "n_kv_heads": params.get("n_kv_heads") or params["n_heads"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    bad = [f"{k}={v}" for k, v in heads.items() if isinstance(v, int) and v % mp_size != 0]
    if not bad:
        return None
    return (f"note: {', '.join(bad)} is not divisible by {mp_size}: the shards split heads, so they load "
            f"(merged) in one process but cannot run on {mp_size} model-parallel ranks")


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """torch.save writes a tensor's whole storage; a view into a larger one is copied first."""
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() or not tensor.is_contiguous():
        return tensor.contiguous().clone()
    return tensor


def _copy_file(src: str, dst: str) -> None:
    with open(src, "rb") as f:
        data = f.read()
    atomic_write(dst, lambda out: out.write(data), "wb")


def reshard_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    mp_size: int,
    *,
    force: bool = False,
    progress: Progress | None = print,
) -> list[str]:
    """Merge SRC's ``consolidated.NN.pth`` shards and split them into ``mp_size`` shards in
    DST; copy ``params.json``, ``llama_mini.json`` and ``tokenizer.model`` when present.
    Returns the paths written (shards in rank order, then the copied files).

    Raises ValueError / FileNotFoundError naming the file or tensor at fault, before anything
    is written. ``progress`` receives one line per shard read and written (None: silent)."""
    say = progress or (lambda _line: None)
    if isinstance(mp_size, bool) or not isinstance(mp_size, int) or mp_size < 1:
        raise ValueError(f"model-parallel size must be an integer >= 1, got {mp_size!r}")
    src, dst = os.fspath(src), os.fspath(dst)
    src_dir = resolve_checkpoint_dir(src)
    if src_dir != src:
        say(f"{os.path.join(src, LATEST)} -> {src_dir}")
    dst_real = os.path.realpath(dst)
    if dst_real in (os.path.realpath(src_dir), os.path.realpath(src)):
        raise ValueError(f"destination {dst} is the source checkpoint directory; write to another directory")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"destination {dst} exists and is not a directory")
    if os.path.isdir(dst) and has_shards(dst) and not force:
        raise ValueError(f"destination {dst} already holds consolidated.*.pth shards; pass --force (force=True) to overwrite")

    paths = _shard_paths(src_dir)
    shards = []
    for path in paths:
        shard = _torch_load(path)
        bad = [k for k, v in shard.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"{path}: entries that are not tensors: {bad[:5]}")
        say(f"read    {path}: {len(shard)} tensors, {_mib(shard):.1f} MiB")
        shards.append(shard)
    try:
        full = parallel.merge_state_dicts(shards)
    except ValueError as e:
        raise ValueError(f"{src_dir}: cannot merge {len(paths)} shards: {e}") from None
    del shards
    _check_divisible(full, mp_size)
    note = _head_note(src_dir, mp_size)
    if note:
        say(note)

    os.makedirs(dst, exist_ok=True)
    written = []
    for rank in range(mp_size):
        part = {k: _compact(v) for k, v in parallel.shard_state_dict(full, rank, mp_size).items()}
        path = os.path.join(dst, f"consolidated.{rank:02d}.pth")
        atomic_torch_save(part, path)
        say(f"wrote   {path}: {len(part)} tensors, {_mib(part):.1f} MiB")
        written.append(path)
        del part

    for name in COPIED_FILES:
        source, target = os.path.join(src_dir, name), os.path.join(dst, name)
        if os.path.isfile(source):
            _copy_file(source, target)
            say(f"copied  {target}")
            written.append(target)
        elif force and os.path.isfile(target):
            os.unlink(target)  # it described whatever DST held before, not these weights
            say(f"removed {target} (stale: SRC has no {name})")
    if not os.path.isfile(os.path.join(src_dir, "params.json")):
        say(f"note: {src_dir} has no params.json; DST has weights only")

    keep = {os.path.basename(p) for p in written}
    for path in sorted(glob.glob(os.path.join(glob.escape(dst), "consolidated.*.pth"))):
        if _SHARD_RE.search(path) and os.path.basename(path) not in keep:
            os.unlink(path)
            say(f"removed {path} (stale shard)")

    shard_names = {os.path.basename(p) for p in paths}
    left = sorted(n for n in os.listdir(src_dir) if n not in shard_names and n not in COPIED_FILES)
    if left:
        say(f"note: not copied (training state or other files, not part of a Meta checkpoint): {', '.join(left)}")
    return written


def build_parser(prog: str = "llama-mini reshard") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Merge a Meta-format checkpoint's model-parallel shards (consolidated.NN.pth) "
        "and split them into --mp shards in a new directory.",
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint directory with consolidated.NN.pth (+ params.json), "
                        "or a training-run checkpoint root whose 'latest' file names the step directory to use")
    parser.add_argument("dst", metavar="DST", help="output directory (created if missing; must not be SRC)")
    parser.add_argument("--mp", type=int, required=True, metavar="N",
                        help="number of model-parallel shards to write (1 merges into consolidated.00.pth)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite a DST that already holds shards; stale shards (rank >= N) are removed")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """The ``reshard`` command on parsed ``args``; a checkpoint that cannot be resharded raises."""
    written = reshard_checkpoint(args.src, args.dst, args.mp, force=args.force,
                                 progress=None if args.quiet else print)
    if not args.quiet:
        print(f"done: {args.mp} shard(s), {len(written)} file(s) written to {args.dst}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``llama-mini reshard ARGS`` from Python: the exit status, errors reported in one line."""
    from .cli import run_command

    return run_command("reshard", list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
