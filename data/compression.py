"""Streaming decompression for shards: ``.zst`` (with truncation detection), ``.gz`` and plain.

    raw = open("00.jsonl.zst", "rb")
    stream = open_decompressed(raw, "00.jsonl.zst")     # io.BufferedReader over decompressed bytes
    for line in stream: ...
    stream.bytes_out                                   # decompressed bytes delivered so far

Memory stays bounded whatever the shard size or compression ratio: compressed input is read in
64 KiB chunks and each read returns at most the bytes asked for; a long document is held once,
as one line.

Truncation: python-zstandard's stream reader ends quietly when its input ends in the middle of a
frame, so a truncated download would read as a shorter, valid shard and the lost documents would
vanish without a word. ``ZstdFrameTracker`` sits between the file and the decompressor and follows
the frame structure (headers and block sizes only, no decoding), so when the input ends it knows
whether the last frame was complete; a shard that ends mid-frame, holds no frame at all, or fails
to decode raises ``CorruptShardError`` naming the file. (A multi-frame shard cut exactly at a frame
boundary is a valid zstd stream and cannot be told from a complete one; The Pile's shards are a
single frame.) Concatenated frames (as written by ``zstd``/``pzstd`` and The Pile's tools) are read
one after another. The window limit is 2 GiB, what The Pile's long-distance-matching shards need.

Gzip truncation is already an error in the standard library (``EOFError``); it is re-raised as
``CorruptShardError`` with the file name too.
"""

from __future__ import annotations

import gzip
import io
import zlib
from typing import BinaryIO

__all__ = ["CorruptShardError", "ZstdFrameTracker", "ZstdFrameReader", "CountingReader", "open_decompressed", "compression_of"]

CHUNK = 1 << 16
MAX_WINDOW = 1 << 31  # 2 GiB: zstd --long=31, the largest window The Pile's shards use


class CorruptShardError(ValueError):
    """A shard that is truncated or does not decode. The message names the file."""


def compression_of(name: str) -> str:
    """``"zst"``, ``"gz"`` or ``"none"`` from a file name or URL (query strings ignored)."""
    base = name.split("?", 1)[0].split("#", 1)[0].lower()
    if base.endswith((".zst", ".zstd")):
        return "zst"
    if base.endswith(".gz"):
        return "gz"
    return "none"


ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE_MAGIC = 0x184D2A50  # low 4 bits free: 0x184D2A50..0x184D2A5F


class ZstdFrameTracker(io.RawIOBase):
    """Pass-through over compressed zstd bytes that follows the frame structure (RFC 8878).

    It reads only headers: per frame the magic number, the frame header, each 3-byte block
    header (whose size tells how many bytes to pass over) and the optional checksum; skippable
    frames by their size field. So it knows, at any byte, whether a frame is open, and ``check_end``
    can tell a stream that ended between frames from one cut off inside a frame.
    """

    def __init__(self, raw: BinaryIO, name: str) -> None:
        self._raw = raw
        self.name = name
        self.bytes_in = 0
        self.frames = 0
        self._need = 4  # bytes of the current header field still to collect
        self._field = bytearray()
        self._skip = 0  # body bytes to pass over
        self._state = "magic"
        self._checksum = False

    def readable(self) -> bool:
        return True

    def _fail(self, what: str) -> "CorruptShardError":
        return CorruptShardError(f"{self.name}: {what} (at compressed byte {self.bytes_in}, after {self.frames} complete frames)")

    def readinto(self, buffer) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        view = memoryview(data)
        i = 0
        while i < n:
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                if not self._skip:
                    self._after_body()
                continue
            step = min(self._need, n - i)
            self._field += view[i:i + step]
            self._need -= step
            i += step
            if not self._need:
                self._parse_field()
        self.bytes_in += n
        return n

    def _next(self, state: str, need: int) -> None:
        self._state, self._need, self._field = state, need, bytearray()

    def _parse_field(self) -> None:
        f, state = bytes(self._field), self._state
        if state == "magic":
            magic = int.from_bytes(f, "little")
            if magic == ZSTD_MAGIC:
                self._next("descriptor", 1)
            elif magic & 0xFFFFFFF0 == SKIPPABLE_MAGIC:
                self._next("skippable_size", 4)
            else:
                raise self._fail(f"corrupt: not a zstd frame (magic number {magic:#010x})")
        elif state == "descriptor":
            fhd = f[0]
            fcs_flag, single_segment, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
            if fhd & 0x08:
                raise self._fail("corrupt: reserved bit set in the frame header")
            self._checksum = bool((fhd >> 2) & 1)
            size = (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag] + ((1 if single_segment else 0), 2, 4, 8)[fcs_flag]
            self._next("header_rest", size) if size else self._next("block", 3)
        elif state == "header_rest":
            self._next("block", 3)
        elif state == "block":
            header = int.from_bytes(f, "little")
            last, kind, size = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3:
                raise self._fail("corrupt: reserved zstd block type")
            self._last_block = bool(last)
            self._state, self._field = "block_body", bytearray()
            self._skip = 1 if kind == 1 else size
            if not self._skip:
                self._after_body()
        elif state == "checksum":
            self._end_frame()
        elif state == "skippable_size":
            self._state, self._field = "skippable_body", bytearray()
            self._skip = int.from_bytes(f, "little")
            if not self._skip:
                self._after_body()

    def _after_body(self) -> None:
        if self._state == "skippable_body":
            self._next("magic", 4)
        elif not self._last_block:
            self._next("block", 3)
        elif self._checksum:
            self._next("checksum", 4)
        else:
            self._end_frame()

    def _end_frame(self) -> None:
        self.frames += 1
        self._next("magic", 4)

    def check_end(self) -> None:
        """Raise unless the stream ended exactly after a complete frame."""
        if self._state != "magic" or self._field:
            raise self._fail(f"truncated: the compressed stream ends inside a frame ({self._state.replace('_', ' ')})")
        if self.frames == 0:
            raise self._fail("empty: no zstd frame")

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


class ZstdFrameReader(io.RawIOBase):
    """Decompressed bytes of a zstd stream, raising on truncation or corruption.

    Decompression is python-zstandard's ``stream_reader`` (output bounded by each read's size);
    a ``ZstdFrameTracker`` under it checks the frame structure, so the quiet end of a cut-off
    stream becomes ``CorruptShardError``.
    """

    def __init__(self, raw: BinaryIO, name: str, max_window_size: int = MAX_WINDOW) -> None:
        import zstandard

        self._zstd = zstandard
        self.name = name
        self.tracker = ZstdFrameTracker(raw, name)
        dctx = zstandard.ZstdDecompressor(max_window_size=max_window_size)
        self._reader = dctx.stream_reader(self.tracker, read_size=CHUNK, read_across_frames=True, closefd=True)
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            n = self._reader.readinto(buffer)
        except self._zstd.ZstdError as e:
            raise CorruptShardError(f"{self.name}: corrupt zstd data: {e} (near compressed byte {self.tracker.bytes_in})") from None
        if n == 0 and not self._checked:
            self._checked = True
            self.tracker.check_end()
        return n

    def close(self) -> None:
        try:
            self._reader.close()
        finally:
            super().close()


class CountingReader(io.RawIOBase):
    """Pass-through that counts bytes (``bytes_out``) and names its source in decode errors."""

    def __init__(self, inner: BinaryIO, name: str, raw: BinaryIO | None = None) -> None:
        self._inner = inner
        self._raw = raw  # closed too: GzipFile leaves the file object it was given open
        self.name = name
        self.bytes_out = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self._inner.read(len(buffer))
        except EOFError as e:  # gzip: "Compressed file ended before the end-of-stream marker"
            raise CorruptShardError(f"{self.name}: truncated: {e}") from None
        except (gzip.BadGzipFile, zlib.error) as e:
            raise CorruptShardError(f"{self.name}: corrupt gzip data: {e}") from None
        n = len(data)
        buffer[:n] = data
        self.bytes_out += n
        return n

    def close(self) -> None:
        try:
            self._inner.close()
            if self._raw is not None:
                self._raw.close()
        finally:
            super().close()


def open_decompressed(raw: BinaryIO, name: str, compression: str | None = None) -> io.BufferedReader:
    """A buffered reader of the decompressed bytes of ``raw``; ``.bytes_out`` on ``.raw`` counts them.

    compression: ``"zst"``, ``"gz"``, ``"none"``, or None to decide from ``name``.
    """
    kind = compression or compression_of(name)
    if kind == "zst":
        inner: BinaryIO = ZstdFrameReader(raw, name)
    elif kind == "gz":
        inner = gzip.GzipFile(fileobj=raw, mode="rb")
    elif kind == "none":
        inner = raw
    else:
        raise ValueError(f"{name}: unknown compression {kind!r} (expected 'zst', 'gz' or 'none')")
    return io.BufferedReader(CountingReader(inner, name, raw if kind == "gz" else None), buffer_size=CHUNK)
