"""Where documents come from: expanding source specs into shards, and opening a shard as lines.

    shards = expand_sources(["pile/train/*.jsonl.zst", "extra/", "https://host/00.jsonl.zst"])
    with open_shard(shards[0]) as stream:      # decompressed, buffered binary stream
        for line in stream: ...

A source spec is a file, a directory (every shard file below it, recursively), a glob pattern
(``*``, ``?``, ``[...]``, ``**``), or an ``http(s)://`` URL, in any mix. Shard files are
``.jsonl.zst``, ``.jsonl.zstd``, ``.jsonl.gz`` or ``.jsonl`` (``.json`` likewise). URLs are
taken as they are (HTTP has no listing to glob): name each shard. The expanded
list keeps the order of the specs, each spec's matches sorted, so every process that expands
the same specs sees the same shard order (sharding across readers relies on it).

Errors name the spec at fault: a missing file, a directory or glob that matches no shard, a file
with an extension that is not a shard, a shard listed twice (it would be read twice per epoch).
"""

from __future__ import annotations

import glob
import io
import os
from typing import Iterable

from .compression import compression_of, open_decompressed

__all__ = ["SHARD_SUFFIXES", "expand_sources", "is_url", "open_raw", "open_shard"]

SHARD_SUFFIXES = (".jsonl.zst", ".jsonl.zstd", ".jsonl.gz", ".jsonl", ".json.zst", ".json.zstd", ".json.gz", ".json")


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def _is_shard_name(name: str) -> bool:
    return name.split("?", 1)[0].lower().endswith(SHARD_SUFFIXES)


def _shards_under(directory: str) -> list[str]:
    found = []
    for dirpath, dirnames, files in os.walk(directory, followlinks=True):
        found += [os.path.join(dirpath, f) for f in files if _is_shard_name(f)]
    return sorted(found)


def expand_sources(specs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Shard paths and URLs for ``specs`` (one spec or a list), in a deterministic order."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    specs = [os.fspath(s) for s in specs]
    if not specs:
        raise ValueError("no data sources given")
    out: list[str] = []
    for spec in specs:
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"data source {spec!r} is not a path, glob or URL")
        if is_url(spec):
            matches = [spec]
        elif any(c in spec for c in "*?[") and not os.path.exists(spec):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p) and _is_shard_name(p))
            if not matches:
                raise FileNotFoundError(f"data source {spec!r}: the glob matches no shard file ({', '.join(SHARD_SUFFIXES)})")
        elif os.path.isdir(spec):
            matches = _shards_under(spec)
            if not matches:
                raise FileNotFoundError(f"data source {spec!r}: the directory holds no shard file ({', '.join(SHARD_SUFFIXES)})")
        elif os.path.isfile(spec):
            if not _is_shard_name(spec):
                raise ValueError(f"data source {spec!r}: not a shard file (expected one of {', '.join(SHARD_SUFFIXES)})")
            matches = [spec]
        else:
            raise FileNotFoundError(f"data source {spec!r}: no such file or directory")
        out += matches
    seen: dict[str, str] = {}
    for path in out:
        key = path if is_url(path) else os.path.realpath(path)
        if key in seen:
            raise ValueError(f"data source {path!r} is listed twice (also as {seen[key]!r}); it would be read twice per epoch")
        seen[key] = path
    return out


def open_raw(source: str, **http_options) -> io.RawIOBase:
    """The compressed bytes of one shard: a local file, or a resumable HTTP stream."""
    if is_url(source):
        from .http import open_url

        return open_url(source, **http_options)
    try:
        return open(source, "rb", buffering=0)
    except FileNotFoundError:
        raise FileNotFoundError(f"data source {source!r}: no such file") from None


def open_shard(source: str, **http_options) -> io.BufferedReader:
    """The decompressed bytes of one shard, buffered; ``.raw.bytes_out`` counts them."""
    return open_decompressed(open_raw(source, **http_options), source, compression_of(source))
