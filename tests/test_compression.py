"""Streaming decompression: formats, bounded reads, and truncation/corruption that must not pass quietly."""

from __future__ import annotations

import gzip
import io
import os

import pytest
import zstandard

from llama_mini.data.compression import CorruptShardError, ZstdFrameReader, compression_of, open_decompressed


def _text(n: int = 300_000) -> bytes:
    return os.urandom(n // 2).hex().encode()  # incompressible enough to need many blocks


def _zst_variants(payload: bytes) -> dict[str, bytes]:
    streamed = io.BytesIO()
    with zstandard.ZstdCompressor(write_checksum=True).stream_writer(streamed, closefd=False) as w:
        for i in range(0, len(payload), 7000):
            w.write(payload[i:i + 7000])
    half = len(payload) // 2
    return {
        "plain": zstandard.ZstdCompressor().compress(payload),
        "checksum": zstandard.ZstdCompressor(write_checksum=True).compress(payload),
        "no-content-size": zstandard.ZstdCompressor(write_content_size=False).compress(payload),
        "streamed": streamed.getvalue(),
        "two-frames": zstandard.ZstdCompressor().compress(payload[:half]) + zstandard.ZstdCompressor().compress(payload[half:]),
        "skippable-frame": b"\x50\x2a\x4d\x18\x03\x00\x00\x00abc" + zstandard.ZstdCompressor().compress(payload),
    }


@pytest.mark.parametrize("variant", list(_zst_variants(b"x")))
def test_zstd_variants_round_trip(variant):
    payload = _text()
    data = _zst_variants(payload)[variant]
    stream = open_decompressed(io.BytesIO(data), "s.jsonl.zst")
    assert stream.read() == payload
    assert stream.raw.bytes_out == len(payload)


@pytest.mark.parametrize("variant", ["plain", "checksum", "streamed", "two-frames", "skippable-frame"])
def test_every_zstd_truncation_is_an_error_naming_the_file(variant):
    data = _zst_variants(_text(60_000))[variant]
    # cutting exactly between two frames leaves a valid, shorter stream (documented limit)
    frame_ends = {_first_frame_end(data)} if variant == "two-frames" else set()
    cuts = sorted(set(range(1, len(data), max(1, len(data) // 200))) | {len(data) - 1, len(data) - 4, 4, 5})
    for cut in cuts:
        if cut in frame_ends:
            continue
        with pytest.raises(CorruptShardError, match=r"shard-7\.jsonl\.zst: (truncated|empty)"):
            open_decompressed(io.BytesIO(data[:cut]), "shard-7.jsonl.zst").read()


def _first_frame_end(data: bytes) -> int:
    d = zstandard.ZstdDecompressor().decompressobj()
    d.decompress(data)
    return len(data) - len(d.unused_data)


def test_empty_zst_file_is_an_error():
    with pytest.raises(CorruptShardError, match="e.jsonl.zst: empty"):
        open_decompressed(io.BytesIO(b""), "e.jsonl.zst").read()


def test_corrupt_zstd_is_an_error_naming_the_file():
    payload = _text()
    data = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(payload))
    bad_magic = b"\x00" + bytes(data[1:])
    with pytest.raises(CorruptShardError, match="c.jsonl.zst: corrupt"):
        open_decompressed(io.BytesIO(bad_magic), "c.jsonl.zst").read()
    flipped = bytearray(data)
    for i in range(len(flipped) // 2, len(flipped) // 2 + 64):
        flipped[i] ^= 0xFF
    with pytest.raises(CorruptShardError, match="c.jsonl.zst: corrupt"):
        open_decompressed(io.BytesIO(bytes(flipped)), "c.jsonl.zst").read()


def test_trailing_garbage_after_a_frame_is_an_error():
    data = zstandard.ZstdCompressor().compress(b"hello\n") + b"garbage!"
    with pytest.raises(CorruptShardError, match="g.jsonl.zst"):
        open_decompressed(io.BytesIO(data), "g.jsonl.zst").read()


def test_reads_are_bounded_whatever_the_ratio():
    """300 MiB of zeros compress to ~10 KB; no read may return (or hold) more than it asked for."""
    data = zstandard.ZstdCompressor().compress(bytes(300 << 20))
    reader = ZstdFrameReader(io.BytesIO(data), "zeros.zst")
    buf = bytearray(1 << 20)
    total = 0
    while n := reader.readinto(buf):
        assert n <= len(buf)
        total += n
    assert total == 300 << 20


def test_a_single_long_line_is_read_whole():
    line = b'{"text": "' + b"a" * (40 << 20) + b'"}\n'
    stream = open_decompressed(io.BytesIO(zstandard.ZstdCompressor().compress(line + b'{"text": "b"}\n')), "long.jsonl.zst")
    assert stream.readline() == line
    assert stream.readline() == b'{"text": "b"}\n'
    assert stream.readline() == b""


def test_gzip_and_plain():
    payload = _text(10_000)
    assert open_decompressed(io.BytesIO(gzip.compress(payload)), "a.jsonl.gz").read() == payload
    assert open_decompressed(io.BytesIO(payload), "a.jsonl").read() == payload
    with pytest.raises(CorruptShardError, match="t.jsonl.gz: truncated"):
        open_decompressed(io.BytesIO(gzip.compress(payload)[:-20]), "t.jsonl.gz").read()
    with pytest.raises(CorruptShardError, match="b.jsonl.gz: corrupt"):
        open_decompressed(io.BytesIO(b"\x1f\x8bXXXXXXXXXXXXXXXX"), "b.jsonl.gz").read()


def test_compression_of():
    assert compression_of("a/b.jsonl.zst") == "zst"
    assert compression_of("https://h/x.jsonl.zst?token=1") == "zst"
    assert compression_of("x.jsonl.GZ") == "gz"
    assert compression_of("x.jsonl") == "none"
    with pytest.raises(ValueError, match="unknown compression 'bz2'"):
        open_decompressed(io.BytesIO(b""), "x", "bz2")
