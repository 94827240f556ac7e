"""PileReader: sources, formats, bad input, sharding across ranks and workers, shuffling, resume."""

from __future__ import annotations

import functools
import http.server
import io
import os
import threading

import pytest
import torch
from torch.utils.data import DataLoader

from llama_mini.data.compression import CorruptShardError
from llama_mini.data.reader import BadDocumentError, PileReader, assign_shards, describe_sample
from llama_mini.data.sources import expand_sources
from shards import records, write_corpus, write_shard


@pytest.fixture
def corpus(tmp_path):
    """Three zst shards of 7, 4 and 9 documents; all texts in file order."""
    return str(tmp_path / "pile"), write_corpus(tmp_path / "pile", [7, 4, 9])


# -- sources ------------------------------------------------------------------------------------

def test_sources_files_dirs_globs_in_any_mix(tmp_path):
    a = write_shard(tmp_path / "a" / "1.jsonl.zst", records(0, 1)) if os.makedirs(tmp_path / "a") is None else None
    b = write_shard(tmp_path / "b.jsonl.gz", records(1, 1))
    os.makedirs(tmp_path / "d" / "sub")
    c = write_shard(tmp_path / "d" / "sub" / "2.jsonl", records(2, 1))
    d = write_shard(tmp_path / "d" / "0.jsonl.zst", records(3, 1))
    (tmp_path / "d" / "notes.txt").write_text("not a shard")
    got = expand_sources([str(tmp_path / "a" / "*.jsonl.zst"), b, str(tmp_path / "d")])
    assert got == [a, b, d, c]
    assert expand_sources(str(tmp_path / "**" / "*.jsonl*")) == sorted([a, b, c, d])


def test_source_errors_name_the_spec(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl.zst"):
        expand_sources(str(tmp_path / "nope.jsonl.zst"))
    with pytest.raises(FileNotFoundError, match=r"\*.jsonl.zst.*matches no shard"):
        expand_sources(str(tmp_path / "*.jsonl.zst"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="empty.*holds no shard"):
        expand_sources(str(tmp_path / "empty"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="x.txt.*not a shard"):
        expand_sources(str(tmp_path / "x.txt"))
    s = write_shard(tmp_path / "s.jsonl", records(0, 1))
    with pytest.raises(ValueError, match="listed twice"):
        expand_sources([s, str(tmp_path)])
    with pytest.raises(ValueError, match="no data sources"):
        expand_sources([])


# -- reading ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", [".jsonl.zst", ".jsonl.gz", ".jsonl"])
def test_formats_read_every_document_in_order(tmp_path, ext):
    texts = write_corpus(tmp_path, [5, 3], ext=ext)
    reader = PileReader(str(tmp_path))
    assert list(reader) == texts
    assert reader.counts.documents == 8 and reader.counts.shards_completed == 2
    on_disk = sum(len(l) for p in expand_sources(str(tmp_path)) for l in _plain_lines(p))
    assert reader.counts.bytes_decompressed == on_disk


def _plain_lines(path):
    from llama_mini.data.sources import open_shard

    with open_shard(path) as s:
        return list(s)


def test_keep_meta_filters_and_cap(corpus):
    root, texts = corpus
    docs = list(PileReader(root, keep_meta=True))
    assert [d["text"] for d in docs] == texts
    assert docs[0]["meta"] == {"pile_set_name": "A"} and docs[0]["line"] == 1 and docs[0]["source"].endswith("00.jsonl.zst")
    only_b = PileReader(root, include_sets=["B"])
    assert list(only_b) == [d["text"] for d in docs if d["meta"]["pile_set_name"] == "B"]
    assert only_b.counts.skipped["filtered"] == sum(d["meta"]["pile_set_name"] == "A" for d in docs)
    assert list(PileReader(root, exclude_sets=["B"])) == [d["text"] for d in docs if d["meta"]["pile_set_name"] == "A"]
    capped = PileReader(root, max_documents=9)
    assert list(capped) == texts[:9]
    assert len(list(PileReader(root, max_documents=11, shuffle=True, shuffle_buffer=3))) == 11
    assert capped.counts.lines == 9  # stops reading at the cap
    assert not only_b.counts.skipped_at  # filtering is not an error: counted, not located
    with pytest.raises(ValueError, match="both included and excluded"):
        PileReader(root, include_sets=["A"], exclude_sets=["A"])


def test_a_very_large_document(tmp_path):
    big = "word " * 2_000_000  # 10 MB in one line
    write_shard(tmp_path / "big.jsonl.zst", [{"text": "a"}, {"text": big}, {"text": "b"}])
    assert list(PileReader(str(tmp_path))) == ["a", big, "b"]


BAD_LINES = [
    (b"{not json", "bad_json"),
    (b'{"text": "\xff\xfe"}', "bad_utf8"),
    (b'["a list"]', "not_object"),
    (b'{"meta": {}}', "missing_text"),
    (b'{"text": 5}', "missing_text"),
    (b'{"text": "lone \\ud800 surrogate"}', "bad_utf8"),
]


@pytest.mark.parametrize("line, reason", BAD_LINES)
def test_bad_line_raises_naming_file_and_line(tmp_path, line, reason):
    path = write_shard(tmp_path / "s.jsonl.zst", [{"text": "ok"}, {"text": "fine"}, line, {"text": "after"}])
    reader = PileReader(path)
    with pytest.raises(BadDocumentError, match=rf"s\.jsonl\.zst, line 3: {reason}"):
        list(reader)


def test_skip_mode_counts_every_bad_line_by_reason_and_place(tmp_path):
    items = [{"text": "first"}] + [line for line, _ in BAD_LINES] + [{"text": ""}, b"  ", {"text": "last"}]
    path = write_shard(tmp_path / "s.jsonl.zst", items)
    reader = PileReader(path, on_error="skip")
    assert list(reader) == ["first", "last"]
    c = reader.counts
    assert dict(c.skipped) == {"bad_json": 1, "bad_utf8": 2, "not_object": 1, "missing_text": 2, "empty": 1, "blank_line": 1}
    # blank lines (like filtered documents) are counted but not located: they are not errors
    assert [(line, reason) for _, line, reason in c.skipped_at] == [
        (2, "bad_json"), (3, "bad_utf8"), (4, "not_object"), (5, "missing_text"), (6, "missing_text"), (7, "bad_utf8"),
        (8, "empty")]
    assert all(src == path for src, _, _ in c.skipped_at)
    assert c.lines == len(items) == c.documents + sum(c.skipped.values())


def test_empty_documents_are_counted_even_in_raise_mode(tmp_path):
    path = write_shard(tmp_path / "s.jsonl.zst", [{"text": "a"}, {"text": ""}, {"text": "b"}])
    reader = PileReader(path)
    assert list(reader) == ["a", "b"] and reader.counts.skipped["empty"] == 1


def test_truncated_shard_is_an_error_naming_it(tmp_path):
    path = write_shard(tmp_path / "00.jsonl.zst", records(0, 50))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) * 2 // 3])
    with pytest.raises(CorruptShardError, match="00.jsonl.zst: truncated"):
        list(PileReader(path))


def test_missing_file_after_expansion_is_an_error(tmp_path):
    path = write_shard(tmp_path / "00.jsonl.zst", records(0, 2))
    reader = PileReader(path)
    os.remove(path)
    with pytest.raises(FileNotFoundError, match="00.jsonl.zst"):
        list(reader)


def test_describe_sample(corpus):
    root, texts = corpus
    out = describe_sample(root, n=2, max_chars=10)
    assert "00.jsonl.zst" in out and "line 2" in out and "line 3" not in out
    assert "{text: str, meta: dict}" in out and '"pile_set_name": "A"' in out
    assert f"text ({len(texts[0])} chars): {texts[0][:10]}..." in out


# -- sharding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("num_readers", [1, 2, 3, 4, 6])
def test_assign_shards_covers_every_line_once(num_shards, num_readers):
    lines = 23
    owner = {}
    for r in range(num_readers):
        for shard, offset, stride in assign_shards(num_shards, r, num_readers):
            for n in range(lines):
                if n % stride == offset:
                    assert (shard, n) not in owner, f"line {n} of shard {shard} read by {owner[(shard, n)]} and {r}"
                    owner[(shard, n)] = r
    assert len(owner) == num_shards * lines


def test_every_reader_gets_a_share_when_shards_are_few():
    for num_shards in range(1, 6):
        for num_readers in range(num_shards, 12):
            for r in range(num_readers):
                plan = assign_shards(num_shards, r, num_readers)
                assert plan and all(0 <= offset < stride for _, offset, stride in plan)


def test_model_parallel_needs_an_explicit_data_parallel_rank(corpus, monkeypatch):
    import torch.distributed as dist

    import llama_mini.data.reader as reader_module

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(reader_module, "_model_parallel_size", lambda: 2)
    with pytest.raises(ValueError, match="pass the data-parallel rank"):
        list(PileReader(corpus[0]))
    assert list(PileReader(corpus[0], rank=0, world_size=1)) == corpus[1]


def test_a_file_name_with_glob_characters(tmp_path):
    path = write_shard(tmp_path / "part[1].jsonl.zst", records(0, 2))
    assert expand_sources(path) == [path]


def _loader_docs(reader, workers):
    return list(DataLoader(reader, batch_size=None, num_workers=workers)) if workers else list(reader)


@pytest.mark.parametrize("sizes", [[7, 4, 9], [30], [3, 3, 3, 3, 3, 3, 3]])
@pytest.mark.parametrize("world, workers", [(1, 2), (2, 0), (2, 2), (3, 1)])
def test_every_document_read_by_exactly_one_rank_and_worker(tmp_path, sizes, world, workers):
    texts = write_corpus(tmp_path, sizes)
    seen = []
    for rank in range(world):
        seen += _loader_docs(PileReader(str(tmp_path), rank=rank, world_size=world, shuffle=True, shuffle_buffer=3), workers)
    assert sorted(seen) == sorted(texts)


def test_rank_is_read_from_torch_distributed_when_not_given(corpus, monkeypatch):
    import torch.distributed as dist

    root, texts = corpus
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    got = []
    for rank in range(3):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, r=rank: r)
        got.append(list(PileReader(root)))
    assert got[0] == texts[:7] and got[1] == texts[7:11] and got[2] == texts[11:]


# -- shuffling ----------------------------------------------------------------------------------

def test_shuffle_is_seeded_per_epoch_and_loses_nothing(corpus):
    root, texts = corpus
    reader = PileReader(root, shuffle=True, shuffle_buffer=5, seed=1)
    epoch0 = list(reader)
    assert list(reader) == epoch0  # same epoch, same order
    reader.set_epoch(1)
    epoch1 = list(reader)
    assert sorted(epoch0) == sorted(epoch1) == sorted(texts)
    assert epoch0 != texts and epoch1 != epoch0
    other_seed = list(PileReader(root, shuffle=True, shuffle_buffer=5, seed=2))
    assert other_seed != epoch0
    orders = {tuple(reader.shard_order(e)) for e in range(6)}
    assert len(orders) > 1 and all(sorted(o) == sorted(reader.sources) for o in orders)
    unbuffered = PileReader(root, shuffle=True, shuffle_buffer=1, seed=1)
    assert list(unbuffered) != texts  # the shard order alone moves documents


def test_shuffle_buffer_bounds_how_far_a_document_moves(tmp_path):
    texts = write_corpus(tmp_path, [60])
    out = list(PileReader(str(tmp_path), shuffle=True, shuffle_buffer=4))
    # the p-th delivery happens when document p + 4 arrives and takes one of the 4 before it
    moves = [texts.index(text) - position for position, text in enumerate(out)]
    assert max(moves) <= 3
    assert min(moves) < -4  # and the buffer did mix: some documents waited long


# -- resume -------------------------------------------------------------------------------------

READER_SETTINGS = [
    dict(),
    dict(shuffle=True, shuffle_buffer=4, seed=3),
    dict(shuffle=True, shuffle_buffer=50, epoch=2),
    dict(rank=1, world_size=2, shuffle=True, shuffle_buffer=2),
    dict(rank=2, world_size=5, keep_meta=True),
    dict(max_documents=11, shuffle=True, shuffle_buffer=3),
    dict(include_sets=["A"], on_error="skip"),
]


@pytest.mark.parametrize("settings", READER_SETTINGS)
def test_resume_at_every_document_continues_exactly(corpus, tmp_path, settings):
    root, _ = corpus
    full_reader = PileReader(root, **settings)
    full = list(full_reader)
    assert full
    for k in range(len(full) + 1):
        reader = PileReader(root, **settings)
        it = iter(reader)
        first = [next(it) for _ in range(k)]
        buf = io.BytesIO()
        torch.save(reader.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        resumed = PileReader(root, **settings)
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert first + rest == full, f"resume after {k} documents"
        assert resumed.counts.as_dict() == full_reader.counts.as_dict()


def test_state_after_a_finished_epoch_and_set_epoch(corpus):
    root, texts = corpus
    reader = PileReader(root)
    assert list(reader) == texts
    state = reader.state_dict()
    resumed = PileReader(root)
    resumed.load_state_dict(state)
    assert list(resumed) == []  # the epoch was finished
    resumed.set_epoch(1)
    assert list(resumed) == texts


def test_set_epoch_of_the_saved_epoch_keeps_the_resume(corpus):
    root, _ = corpus
    reader = PileReader(root, shuffle=True, shuffle_buffer=3, epoch=4)
    full = list(reader)
    reader = PileReader(root, shuffle=True, shuffle_buffer=3, epoch=4)
    it = iter(reader)
    first = [next(it) for _ in range(5)]
    resumed = PileReader(root, shuffle=True, shuffle_buffer=3)
    resumed.load_state_dict(reader.state_dict())
    resumed.set_epoch(4)  # the usual loop: set_epoch at the top of every epoch, the resumed one too
    assert first + list(resumed) == full
    resumed.set_epoch(5)
    assert sorted(resumed) == sorted(full)


def test_resume_refuses_other_settings(corpus):
    root, _ = corpus
    reader = PileReader(root, shuffle=True, seed=1)
    next(iter(reader))
    with pytest.raises(ValueError, match="seed=1 but this reader has seed=2"):
        PileReader(root, shuffle=True, seed=2).load_state_dict(reader.state_dict())
    with pytest.raises(ValueError, match="include_sets=None but this reader has include_sets=\\['A'\\]"):
        PileReader(root, shuffle=True, seed=1, include_sets=["A"]).load_state_dict(reader.state_dict())


def test_resume_refuses_another_layout_or_other_sources(corpus, tmp_path):
    root, _ = corpus
    reader = PileReader(root, rank=0, world_size=2)
    next(iter(reader))
    state = reader.state_dict()
    other = PileReader(root, rank=1, world_size=2)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="reader 0 of 2.*reader 1 of 2"):
        next(iter(other))
    elsewhere = write_corpus(tmp_path / "other", [2])
    assert elsewhere
    with pytest.raises(ValueError, match="same sources"):
        PileReader(str(tmp_path / "other")).load_state_dict(state)


# -- HTTP ---------------------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path):
    """A plain HTTP server on 127.0.0.1 serving tmp_path/www."""
    root = tmp_path / "www"
    os.makedirs(root)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_urls_mixed_with_files(served, tmp_path):
    root, base = served
    remote = write_corpus(root, [4, 3])
    local = write_corpus(tmp_path / "local", [2])
    reader = PileReader([f"{base}/00.jsonl.zst", str(tmp_path / "local"), f"{base}/01.jsonl.zst"])
    assert list(reader) == remote[:4] + local + remote[4:]
    with pytest.raises(OSError, match=rf"{base}/missing.jsonl.zst.*404"):
        list(PileReader(f"{base}/missing.jsonl.zst", http_options={"retries": 0}))
