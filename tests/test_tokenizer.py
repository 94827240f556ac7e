"""SentencePiece wrapper and LLaMA-style BPE training."""

from __future__ import annotations

import os

import pytest

from conftest import synthetic_corpus
from llama_mini import Tokenizer, train_tokenizer


def test_trained_model_has_llama_conventions(trained_tokenizer):
    tok = trained_tokenizer
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.sp.pad_id() == -1  # as in LLaMA's file...
    assert 0 <= tok.pad_id < tok.vocab_size  # ...but the wrapper's pad id is embeddable
    assert tok.n_words == tok.vocab_size <= 400
    assert os.path.exists(tok.model_path[: -len(".model")] + ".vocab")
    # byte fallback: all 256 byte pieces exist
    assert tok.sp.PieceToId("<0xF0>") != tok.sp.unk_id()


def test_encode_decode_round_trip_with_bos_eos(trained_tokenizer):
    tok = trained_tokenizer
    text = "The meaning of life is 42, said the model in 2024."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    with_specials = tok.encode(text, bos=True, eos=True)
    assert with_specials == [tok.bos_id] + ids + [tok.eos_id]
    assert tok.decode(with_specials) == text
    assert tok.encode_batch([text, "life"], bos=True) == [[tok.bos_id] + ids, tok.encode("life", bos=True)]


def test_digits_are_split_and_unseen_characters_fall_back_to_bytes(trained_tokenizer):
    tok = trained_tokenizer
    pieces = [tok.id_to_piece(i) for i in tok.encode("1987")]
    assert [p.strip("▁") for p in pieces if p.strip("▁")] == ["1", "9", "8", "7"]
    text = "naïve café 🚀 Ω"
    ids = tok.encode(text)
    assert tok.sp.unk_id() not in ids
    assert tok.decode(ids) == text


def test_training_from_files(tmp_path):
    paths = []
    for i, chunk in enumerate((synthetic_corpus(60, seed=1), synthetic_corpus(60, seed=2))):
        p = tmp_path / f"part{i}.txt"
        p.write_text("\n".join(chunk), encoding="utf-8")
        paths.append(p)
    tok = train_tokenizer(paths, tmp_path / "files", vocab_size=360)
    assert tok.decode(tok.encode("the meaning of life")) == "the meaning of life"
    # 256 byte pieces + 3 specials + every distinct character must fit in the vocabulary
    with pytest.raises(ValueError, match="SentencePiece training failed: .*Vocabulary size is smaller"):
        train_tokenizer(paths, tmp_path / "small", vocab_size=270)


def test_errors():
    with pytest.raises(FileNotFoundError, match="tokenizer model not found: /no/such.model"):
        Tokenizer("/no/such.model")
    with pytest.raises(ValueError, match="vocab_size must exceed 259"):
        train_tokenizer(["x"], "/tmp/never", vocab_size=100)
    with pytest.raises(ValueError, match="no non-empty text"):
        train_tokenizer(["", "\n  \n"], "/tmp/never", vocab_size=300, from_files=False)
    with pytest.raises(FileNotFoundError, match="input file not found: /no/file.txt"):
        train_tokenizer(["/no/file.txt"], "/tmp/never", vocab_size=300, from_files=True)


def test_file_sources_are_never_mistaken_for_text(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("\n".join(synthetic_corpus(60)), encoding="utf-8")
    tok = train_tokenizer(str(good), tmp_path / "single", vocab_size=360)  # one path, as a str
    assert tok.decode(tok.encode("the meaning of life")) == "the meaning of life"
    with pytest.raises(FileNotFoundError, match="input file not found: .*typo.txt"):
        train_tokenizer([str(good), str(tmp_path / "typo.txt")], tmp_path / "x", vocab_size=360)
    with pytest.raises(FileNotFoundError, match="input file not found: .*typo.txt"):
        train_tokenizer([good, tmp_path / "typo.txt"], tmp_path / "x", vocab_size=360)
    with pytest.raises(FileNotFoundError, match="input file not found: corpus.txt"):
        train_tokenizer(["corpus.txt"], tmp_path / "x", vocab_size=360)
    with pytest.raises(TypeError, match="document 1 is bytes, expected str"):
        train_tokenizer(iter(["some text here", b"bytes"]), tmp_path / "x", vocab_size=360)


def test_bad_model_file_and_bad_ids(tmp_path, trained_tokenizer):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="bad.model: not a SentencePiece model"):
        Tokenizer(bad)
    with pytest.raises(ValueError, match="token id 400000 outside"):
        trained_tokenizer.decode([5, 400000])
    with pytest.raises(TypeError, match="encode expects str"):
        trained_tokenizer.encode(b"bytes")
