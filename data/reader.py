"""The streaming Pile reader: documents from ``.jsonl.zst`` / ``.jsonl.gz`` / ``.jsonl`` shards.

    reader = PileReader("pile/train/*.jsonl.zst", shuffle=True, seed=0)
    for epoch in range(2):
        reader.set_epoch(epoch)
        for text in reader: ...
    reader.counts            # documents, skipped by reason, bytes decompressed, shards

Each line of a shard is one JSON object, ``{"text": ..., "meta": {"pile_set_name": ...}}``. The
reader yields the text (``keep_meta=False``, the default) or a dict ``{"text", "meta", "source",
"line"}``. Memory is bounded: shards stream through ``llama_mini.data.compression`` and only the current
line (one document, however long) and the shuffle buffer are held.

Sharding. The readers of an epoch are the (data-parallel rank, DataLoader worker) pairs:
``R = world_size * num_workers`` readers, reader ``r = rank * num_workers + worker``. With ``S``
shards in the epoch's order:
  - ``S >= R``: reader ``r`` reads shards ``r, r + R, r + 2R, ...`` whole;
  - ``S < R``: shard ``r % S`` is shared by the ``k`` readers ``j, j + S, ...`` and reader ``r``
    keeps its lines number ``m, m + k, ...`` where ``m = r // S``.
Lines are assigned before they are parsed, so every line, good or bad, belongs to exactly one
reader: every document is delivered by exactly one (rank, worker) pair per epoch. Rank and world
size come from the arguments, else from ``torch.distributed`` when it is initialised; under model
parallelism pass the *data-parallel* rank and size (the reader refuses to guess: the global rank
would feed each model-parallel rank different documents).

Shuffling. With ``shuffle=True`` the shard order is permuted per epoch and documents pass through
a buffer of ``shuffle_buffer`` documents (each new document replaces a uniformly chosen one, which
is yielded). The seed is ``(seed, epoch, reader)``, so it changes with ``set_epoch`` like
``DistributedSampler``, and is the same in every run.

Resume. ``state_dict()`` taken between two documents records the epoch, the shard and line
cursors, the shuffle buffer and its RNG state, and the counts; after ``load_state_dict`` the next
document is exactly the one that would have come next, and none is delivered twice. Lines
already consumed are skipped without parsing (a resumed shard is decompressed, or downloaded,
again up to the cursor). The state holds the shuffle buffer's documents, so it grows with
``shuffle_buffer``. It belongs to one reader: it covers the reader iterated in this process
(``num_workers=0``; a DataLoader's workers iterate copies, and the main process's state does not
move); a state taken with another reader layout, other sources or other settings (seed,
shuffle, filters, cap) is refused.

Bad input. A truncated or corrupt shard, a missing file and an HTTP error are errors naming the
source. A line that is not JSON, not an object, not UTF-8, or has no string ``text`` raises
``BadDocumentError`` naming file and line (``on_error="raise"``, the default) or is skipped and
counted by reason with its location kept in ``counts.skipped_at`` (``on_error="skip"``). Empty
documents and blank lines are skipped and counted, never passed on.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from torch.utils.data import IterableDataset

from .sources import expand_sources, open_shard

__all__ = ["BadDocumentError", "ReaderCounts", "PileReader", "reader_slot", "assign_shards", "describe_sample"]

log = logging.getLogger(__name__)

MAX_SKIP_LOCATIONS = 1000
UNLOGGED = ("filtered", "blank_line")  # expected in normal data: counted, not logged or located
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class BadDocumentError(ValueError):
    """A shard line that is not a usable document. The message names file and line."""


@dataclass
class ReaderCounts:
    """What a reader has read so far (cumulative over epochs)."""

    documents: int = 0  # documents delivered
    lines: int = 0  # lines of this reader's share that were examined
    skipped: Counter = field(default_factory=Counter)  # reason -> lines skipped
    skipped_at: list = field(default_factory=list)  # (source, line, reason) of the first bad lines
    bytes_decompressed: int = 0  # decompressed bytes of every shard opened (whole lines, all readers' shares)
    shards_started: int = 0
    shards_completed: int = 0

    def skip(self, source: str, line: int, reason: str) -> None:
        self.skipped[reason] += 1
        if reason in UNLOGGED:
            return
        if len(self.skipped_at) < MAX_SKIP_LOCATIONS:
            self.skipped_at.append((source, line, reason))
        if self.skipped[reason] <= 10:
            log.warning("skipped %s line %d: %s", source, line, reason)

    def as_dict(self) -> dict:
        return {
            "documents": self.documents,
            "lines": self.lines,
            "skipped": dict(self.skipped),
            "skipped_total": sum(self.skipped.values()),
            "bytes_decompressed": self.bytes_decompressed,
            "shards_started": self.shards_started,
            "shards_completed": self.shards_completed,
        }

    def state(self) -> dict:
        return {**self.as_dict(), "skipped_at": [list(x) for x in self.skipped_at]}

    @classmethod
    def from_state(cls, state: dict) -> "ReaderCounts":
        return cls(
            documents=state["documents"], lines=state["lines"], skipped=Counter(state["skipped"]),
            skipped_at=[tuple(x) for x in state["skipped_at"]], bytes_decompressed=state["bytes_decompressed"],
            shards_started=state["shards_started"], shards_completed=state["shards_completed"],
        )


def reader_slot(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(reader, num_readers)`` for this process and DataLoader worker (see the module docstring)."""
    import torch.distributed as dist
    from torch.utils.data import get_worker_info

    if rank is None and world_size is None and dist.is_available() and dist.is_initialized():
        if _model_parallel_size() > 1:
            raise ValueError(
                "model parallelism is initialised: pass the data-parallel rank and world size to the "
                "reader (rank=..., world_size=...); the global rank would give each model-parallel "
                "rank different documents"
            )
        rank, world_size = dist.get_rank(), dist.get_world_size()
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size): rank={rank}, world_size={world_size}")
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    return rank * workers + worker, world_size * workers


def _model_parallel_size() -> int:
    try:
        from fairscale.nn.model_parallel import initialize as mpu
    except ImportError:
        return 1
    return mpu.get_model_parallel_world_size() if mpu.model_parallel_is_initialized() else 1


def assign_shards(num_shards: int, reader: int, num_readers: int) -> list[tuple[int, int, int]]:
    """This reader's share: ``(shard index, line offset, line stride)`` triples, in reading order.

    A line ``n`` (0-based) of a listed shard is this reader's when ``n % stride == offset``.
    """
    if num_shards >= num_readers:
        return [(s, 0, 1) for s in range(reader, num_shards, num_readers)]
    shard = reader % num_shards
    sharers = len(range(shard, num_readers, num_shards))
    return [(shard, reader // num_shards, sharers)]


class PileReader(IterableDataset):
    """Streams documents from Pile-format shards; an iterable, also as a DataLoader dataset.

    sources: file, directory, glob or URL, or a list of them (see ``llama_mini.data.sources``).
    max_documents: stop after this many documents per reader and epoch (None: all).
    keep_meta: yield ``{"text", "meta", "source", "line"}`` dicts instead of the text.
    include_sets / exclude_sets: keep only / drop documents by ``meta.pile_set_name``.
    on_error: ``"raise"`` or ``"skip"`` for lines that are not usable documents.
    shuffle, shuffle_buffer, seed, epoch: see the module docstring.
    rank, world_size: the data-parallel position; None reads torch.distributed.
    http_options: passed to ``llama_mini.data.http.open_url`` (retries, backoff, timeout).

    Under a DataLoader with workers each worker iterates its own copy: ``counts`` and
    ``state_dict`` of the object in the main process do not move. Iterate in-process
    (``num_workers=0``, or ``DataPipeline``) when you need them.
    """

    def __init__(
        self,
        sources: Any,
        *,
        max_documents: int | None = None,
        keep_meta: bool = False,
        include_sets: Iterable[str] | None = None,
        exclude_sets: Iterable[str] | None = None,
        on_error: str = "raise",
        shuffle: bool = False,
        shuffle_buffer: int = 10_000,
        seed: int = 0,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        http_options: dict | None = None,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if max_documents is not None and max_documents < 0:
            raise ValueError(f"max_documents must be >= 0, got {max_documents}")
        if shuffle and shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.sources = expand_sources(sources)
        self.max_documents = max_documents
        self.keep_meta = keep_meta
        self.include_sets = frozenset(include_sets) if include_sets is not None else None
        self.exclude_sets = frozenset(exclude_sets or ())
        if self.include_sets is not None and self.include_sets & self.exclude_sets:
            raise ValueError(f"pile_set_name both included and excluded: {sorted(self.include_sets & self.exclude_sets)}")
        self.on_error = on_error
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = epoch
        self.rank, self.world_size = rank, world_size
        self.http_options = dict(http_options or {})
        self.counts = ReaderCounts()
        self._resume: dict | None = None
        self._cursor: dict | None = None  # position of the current or last iteration (see state_dict)

    # -- epoch order -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows (changes the shuffle seed).

        A state loaded with ``load_state_dict`` survives ``set_epoch`` of its own epoch, so a
        loop that calls ``set_epoch(epoch)`` at the top of every epoch resumes mid-epoch."""
        if self._resume is not None and self._resume["epoch"] == epoch:
            return
        self.epoch = epoch
        self._resume = self._cursor = None

    def shard_order(self, epoch: int | None = None) -> list[str]:
        order = list(self.sources)
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch if epoch is None else epoch}/shards").shuffle(order)
        return order

    # -- parsing -----------------------------------------------------------------------------
    def _parse(self, raw: bytes, source: str, line: int):
        """The document of one line, or None after counting (or raising on) a bad line."""
        reason = detail = None
        try:
            text_line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            reason, detail = "bad_utf8", str(e)
        else:
            if raw.isspace():
                self.counts.skip(source, line, "blank_line")
                return None
            try:
                obj = json.loads(text_line)
            except json.JSONDecodeError as e:
                reason, detail = "bad_json", str(e)
            else:
                if not isinstance(obj, dict):
                    reason, detail = "not_object", f"a JSON {type(obj).__name__}, not an object"
                elif not isinstance(obj.get("text"), str):
                    reason = "missing_text"
                    detail = "no 'text' field" if "text" not in obj else f"'text' is {type(obj['text']).__name__}, not str"
                elif _SURROGATE_ESCAPE.search(raw) and not _encodable(obj["text"]):
                    # JSON can escape a lone UTF-16 surrogate, which no UTF-8 text (or tokenizer) holds
                    reason, detail = "bad_utf8", "'text' holds a lone surrogate escape (\\ud800-\\udfff)"
        if reason is not None:
            if self.on_error == "raise":
                raise BadDocumentError(f"{source}, line {line}: {reason}: {detail} (on_error='skip' skips and counts such lines)")
            self.counts.skip(source, line, reason)
            return None
        text = obj["text"]
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        if self.include_sets is not None or self.exclude_sets:
            name = meta.get("pile_set_name")
            if (self.include_sets is not None and name not in self.include_sets) or name in self.exclude_sets:
                self.counts.skip(source, line, "filtered")
                return None
        if not text:
            self.counts.skip(source, line, "empty")
            return None
        if self.keep_meta:
            return {"text": text, "meta": meta, "source": source, "line": line}
        return text

    # -- iteration ---------------------------------------------------------------------------
    def _documents(self, plan, start_shard: int, start_line: int) -> Iterator[tuple[Any, int, int]]:
        """``(document or None, plan position, lines consumed)`` over this reader's share.

        None marks a line that gave no document, and ``(None, next position, 0)`` a finished
        shard, so the caller's cursor always points just past what has been consumed."""
        order = self.shard_order()
        for pos in range(start_shard, len(plan)):
            shard, offset, stride = plan[pos]
            source = order[shard]
            skip = start_line if pos == start_shard else 0
            if skip == 0:  # a resumed shard was counted when it was first started
                self.counts.shards_started += 1
            with open_shard(source, **self.http_options) as stream:
                for n, raw in enumerate(stream):
                    if n < skip:  # consumed before the state was saved: counted then
                        continue
                    self.counts.bytes_decompressed += len(raw)
                    if n % stride != offset:
                        continue
                    self.counts.lines += 1
                    yield self._parse(raw, source, n + 1), pos, n + 1
            self.counts.shards_completed += 1
            yield None, pos + 1, 0

    def __iter__(self) -> Iterator[Any]:
        reader, num_readers = reader_slot(self.rank, self.world_size)
        plan = assign_shards(len(self.sources), reader, num_readers)
        cursor, self._resume = self._resume, None
        if cursor is not None:
            if (cursor["reader"], cursor["num_readers"]) != (reader, num_readers):
                raise ValueError(
                    f"reader state was saved as reader {cursor['reader']} of {cursor['num_readers']}, "
                    f"but this is reader {reader} of {num_readers}; resume with the same ranks and workers"
                )
        else:
            cursor = {"epoch": self.epoch, "reader": reader, "num_readers": num_readers, "shard": 0, "line": 0,
                      "delivered": 0, "buffer": [], "rng": None, "done": False}
        self._cursor = cursor
        rng = random.Random(f"{self.seed}/{self.epoch}/{reader}/buffer")
        if cursor["rng"] is not None:
            rng.setstate(_rng_from_list(cursor["rng"]))
        buffer: list = cursor["buffer"]
        cap = self.max_documents if self.max_documents is not None else float("inf")

        def deliver(doc):
            # every cursor field is up to date before the document leaves: a state_dict taken
            # while the consumer holds it resumes with the next one
            cursor["delivered"] += 1
            self.counts.documents += 1
            if self.shuffle:
                cursor["rng"] = _rng_to_list(rng.getstate())
            return doc

        if not cursor["done"] and cursor["delivered"] < cap:
            docs = self._documents(plan, cursor["shard"], cursor["line"])
            try:
                for doc, pos, line in docs:
                    cursor["shard"], cursor["line"] = pos, line
                    if doc is None:
                        continue
                    if not self.shuffle:
                        yield deliver(doc)
                    elif len(buffer) < self.shuffle_buffer:
                        buffer.append(doc)
                    else:
                        i = rng.randrange(len(buffer))
                        doc, buffer[i] = buffer[i], doc
                        yield deliver(doc)
                    if cursor["delivered"] >= cap:
                        break
            finally:
                docs.close()
        cursor["done"] = True
        while buffer and cursor["delivered"] < cap:  # drain the shuffle buffer in random order
            doc = buffer.pop(rng.randrange(len(buffer)))
            yield deliver(doc)
        buffer.clear()

    # -- resume ------------------------------------------------------------------------------
    def _config(self) -> dict:
        """Settings that decide which documents come in which order: a resume must match them."""
        return {
            "max_documents": self.max_documents, "keep_meta": self.keep_meta, "on_error": self.on_error,
            "include_sets": sorted(self.include_sets) if self.include_sets is not None else None,
            "exclude_sets": sorted(self.exclude_sets), "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer if self.shuffle else None, "seed": self.seed,
        }

    def state_dict(self) -> dict:
        """The position after the last delivered document, plus counts (plain Python data)."""
        cursor = self._resume if self._resume is not None else self._cursor
        state = {"version": 1, "sources": list(self.sources), "config": self._config(), "epoch": self.epoch,
                 "counts": self.counts.state(), "cursor": None}
        if cursor is not None:
            c = dict(cursor)
            c["buffer"] = list(cursor["buffer"])
            state["cursor"] = c
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unknown reader state version {state.get('version')!r}")
        if list(state["sources"]) != list(self.sources):
            raise ValueError(
                f"reader state was saved over {len(state['sources'])} shards {state['sources'][:3]}..., "
                f"this reader has {len(self.sources)} {self.sources[:3]}...; resume needs the same sources"
            )
        mine = self._config()
        for key, value in state["config"].items():
            if mine.get(key) != value:
                raise ValueError(f"reader state has {key}={value!r} but this reader has {key}={mine.get(key)!r}; "
                                 "resume needs the same reader settings")
        self.epoch = state["epoch"]
        self.counts = ReaderCounts.from_state(state["counts"])
        cursor = state["cursor"]
        self._resume = None if cursor is None else {**cursor, "buffer": list(cursor["buffer"])}


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _rng_to_list(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_list(state) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def describe_sample(sources: Any, n: int = 3, max_chars: int = 200) -> str:
    """What the first ``n`` records of the first shard look like: keys, value types, meta and the
    first ``max_chars`` characters of the text. Bad lines are shown, not raised."""
    source = expand_sources(sources)[0]
    lines = [f"{source}:"]
    with open_shard(source) as stream:
        for i, raw in enumerate(stream):
            if i >= n:
                break
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                lines.append(f"  line {i + 1}: not a JSON document ({e})")
                continue
            if not isinstance(obj, dict):
                lines.append(f"  line {i + 1}: a JSON {type(obj).__name__}, not an object")
                continue
            types = ", ".join(f"{k}: {type(v).__name__}" for k, v in obj.items())
            lines.append(f"  line {i + 1}: {{{types}}}")
            meta = obj.get("meta")
            if isinstance(meta, dict):
                lines.append(f"    meta: {json.dumps(meta)[:max(max_chars, 500)]}")
            text = obj.get("text")
            if isinstance(text, str):
                preview = text[:max_chars].replace("\n", "\\n")
                lines.append(f"    text ({len(text)} chars): {preview}{'...' if len(text) > max_chars else ''}")
    return "\n".join(lines)
