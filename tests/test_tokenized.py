"""Tokenized datasets: BOS + tokens -> tokens + EOS, map-style and streaming, id checks, resume."""

from __future__ import annotations

import pytest

from conftest import synthetic_corpus
from llama_mini.data.reader import PileReader
from llama_mini.data.tokenized import StreamingTokenizedDataset, TokenizedDataset, tokenize_document
from shards import write_shard


def test_example_is_shifted_by_one(trained_tokenizer):
    tok = trained_tokenizer
    text = synthetic_corpus(1)[0]
    ids = tok.encode(text)
    ex = tokenize_document(tok, text)
    assert ex["input_ids"] == [tok.bos_id] + ids
    assert ex["target_ids"] == ids + [tok.eos_id]
    assert ex["input_ids"][1:] == ex["target_ids"][:-1]  # target[i] is the token after input[i]


def test_map_style_dataset(trained_tokenizer):
    docs = synthetic_corpus(5)
    ds = TokenizedDataset(docs, trained_tokenizer, cache=True)
    assert len(ds) == 5
    for i, doc in enumerate(docs):
        assert ds[i] == tokenize_document(trained_tokenizer, doc)
    assert ds[-1] == ds[4] and ds[1] is ds[1]  # cached
    with pytest.raises(IndexError, match="document index 5 out of range for 5"):
        ds[5]
    dicts = TokenizedDataset([{"text": docs[0], "meta": {}}], trained_tokenizer)
    assert dicts[0] == ds[0]
    with pytest.raises(KeyError, match="document 0: document has no 'text'"):
        TokenizedDataset([{"body": "x"}], trained_tokenizer)[0]


def test_streaming_dataset_over_reader_and_resume(tmp_path, trained_tokenizer):
    docs = synthetic_corpus(12)
    write_shard(tmp_path / "00.jsonl.zst", [{"text": d} for d in docs])
    stream = StreamingTokenizedDataset(PileReader(str(tmp_path)), trained_tokenizer)
    full = list(stream)
    assert full == [tokenize_document(trained_tokenizer, d) for d in docs]
    assert stream.counts == {"documents": 12, "tokens": sum(len(e["input_ids"]) for e in full)}

    stream = StreamingTokenizedDataset(PileReader(str(tmp_path)), trained_tokenizer)
    it = iter(stream)
    first = [next(it) for _ in range(5)]
    resumed = StreamingTokenizedDataset(PileReader(str(tmp_path)), trained_tokenizer)
    resumed.load_state_dict(stream.state_dict())
    assert first + list(resumed) == full
    assert resumed.counts == {"documents": 12, "tokens": sum(len(e["input_ids"]) for e in full)}


class _BadTokenizer:
    bos_id, eos_id, vocab_size = 1, 2, 10

    def encode(self, text):
        return [3, 4, 10] if "bad" in text else [3]


def test_out_of_range_ids_name_the_document(tmp_path):
    with pytest.raises(ValueError, match=r"document 1: tokenizer produced token id 10 outside \[0, vocab_size=10\)"):
        [TokenizedDataset(["ok", "bad"], _BadTokenizer())[i] for i in range(2)]
    write_shard(tmp_path / "s.jsonl.zst", [{"text": "ok"}, {"text": "ok"}, {"text": "bad"}])
    with pytest.raises(ValueError, match=r"s\.jsonl\.zst, line 3: tokenizer produced token id 10"):
        list(StreamingTokenizedDataset(PileReader(str(tmp_path), keep_meta=True), _BadTokenizer()))


def test_tokenizer_interface_is_checked():
    class NoEos:
        bos_id = 1
        eos_id = -1

        def encode(self, text):
            return []

    with pytest.raises(ValueError, match="no usable eos_id"):
        TokenizedDataset([], NoEos())
    with pytest.raises(TypeError, match="no encode"):
        TokenizedDataset([], object())

    class SentencePieceStyle:  # bos_id() / eos_id() as methods, like SentencePieceProcessor
        def bos_id(self):
            return 1

        def eos_id(self):
            return 2

        def encode(self, text):
            return [5, 6]

    assert tokenize_document(SentencePieceStyle(), "x") == {"input_ids": [1, 5, 6], "target_ids": [5, 6, 2]}


def test_policies_trust_only_examples_the_encoder_checked(trained_tokenizer):
    from llama_mini.data.policies import POLICIES, build_policy
    from llama_mini.data.tokenized import Example

    # a hand-made Example is checked in full, like any dict
    with pytest.raises(ValueError, match="input_ids has 3 tokens but target_ids has 2"):
        build_policy("impute", max_len=2).feed(Example(input_ids=[1, 2, 3], target_ids=[2, 3]))
    # and no policy changes the examples it is fed (cached examples are shared with the dataset)
    docs = synthetic_corpus(12, seed=5)
    ds = TokenizedDataset(docs, trained_tokenizer, cache=True)
    before = [{k: list(v) for k, v in ds[i].items()} for i in range(len(ds))]
    assert all(ds[i].checked for i in range(len(ds)))
    for name in POLICIES:
        for buffer_size in (1, 3):
            kw = {"tolerance": 2} if name == "informed" else {"buffer_size": buffer_size} if name in ("best-fit", "packed-docmask") else {}
            if not name.startswith("naive"):
                kw["max_len"] = 64
            policy = build_policy(name, **kw)
            seqs = list(policy(ds[i] for i in range(len(ds))))
            assert seqs
            assert [{k: list(v) for k, v in ds[i].items()} for i in range(len(ds))] == before, name
