"""Helpers for tests that need Pile-format shards on disk."""

from __future__ import annotations

import gzip
import json
import os

import zstandard


def records(shard: int, n: int, sets=("A", "B")) -> list[dict]:
    """``n`` distinct documents for shard ``shard``; text says where it came from."""
    return [{"text": f"shard {shard} doc {i} " + "word " * (i % 7), "meta": {"pile_set_name": sets[i % len(sets)]}}
            for i in range(n)]


def encode_lines(items) -> bytes:
    """JSON lines; a ``bytes`` item is written as is (for bad lines)."""
    out = []
    for item in items:
        out.append(item if isinstance(item, bytes) else json.dumps(item).encode())
    return b"\n".join(out) + b"\n"


def compress(payload: bytes, kind: str, **zstd_options) -> bytes:
    if kind == "zst":
        return zstandard.ZstdCompressor(**zstd_options).compress(payload)
    if kind == "gz":
        return gzip.compress(payload)
    return payload


def write_shard(path, items, **zstd_options) -> str:
    """Write ``items`` (dicts or raw byte lines) to ``path``, compressed by its extension."""
    path = os.fspath(path)
    kind = "zst" if path.endswith(".zst") else "gz" if path.endswith(".gz") else "none"
    with open(path, "wb") as f:
        f.write(compress(encode_lines(items), kind, **zstd_options))
    return path


def write_corpus(directory, shard_sizes, ext=".jsonl.zst") -> list[str]:
    """Shards ``00.jsonl.zst``... with ``shard_sizes[i]`` documents each; returns all texts in order."""
    os.makedirs(directory, exist_ok=True)
    texts = []
    for s, n in enumerate(shard_sizes):
        recs = records(s, n)
        write_shard(os.path.join(directory, f"{s:02d}{ext}"), recs)
        texts += [r["text"] for r in recs]
    return texts
