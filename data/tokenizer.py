"""SentencePiece tokenizer wrapper and a trainer for LLaMA-style BPE models.

    tok = Tokenizer("tokenizer.model")
    ids = tok.encode("The meaning of life is", bos=True, eos=False)
    text = tok.decode(ids)

``pad_id`` is always a valid token id: LLaMA's model file has no pad piece (SentencePiece
reports -1), so the wrapper falls back to the unknown-token id, then to EOS. Padded targets are
masked with the loss's ignore index anyway; the pad id only has to be embeddable.

``train_tokenizer`` trains a BPE model with LLaMA's choices: byte fallback (no unknown
characters, ever), digits split into single tokens, no text normalisation, whitespace kept.

It lives in ``data`` (which never imports ``llama_mini``) so the built-in default data can train
its tokenizer with the library's own code; ``llama_mini`` re-exports it. The rest of ``data``
takes any object with ``encode``, ``bos_id`` and ``eos_id`` (``pad_id`` and ``vocab_size`` are
used when present).
"""

from __future__ import annotations

import io
import logging
import os
import re
from typing import Iterable, Iterator, Sequence

__all__ = ["Tokenizer", "train_tokenizer"]

log = logging.getLogger(__name__)


class Tokenizer:
    """Thin wrapper over ``sentencepiece.SentencePieceProcessor`` with LLaMA's conventions."""

    def __init__(self, model_path: str | os.PathLike) -> None:
        import sentencepiece as spm

        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_path}: not a SentencePiece model ({e})") from None
        self.vocab_size: int = self.sp.GetPieceSize()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        pad = self.sp.pad_id()
        if pad < 0:
            pad = self.sp.unk_id() if self.sp.unk_id() >= 0 else self.eos_id
        self.pad_id: int = pad

    @property
    def n_words(self) -> int:
        """Meta's name for the vocabulary size."""
        return self.vocab_size

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with BOS prepended and/or EOS appended when asked."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self.sp.EncodeAsIds(text)
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """``encode`` for each text (SentencePiece batches this internally)."""
        out = self.sp.EncodeAsIds(list(texts))
        if bos or eos:
            out = [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in out]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; ids outside the vocabulary raise ``ValueError``."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: token id {bad[0]} outside [0, vocab_size={self.vocab_size})")
        return self.sp.DecodeIds(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.IdToPiece(int(token_id))


def _iter_sentences(source: Iterable[str], max_sentence_length: int) -> Iterator[str]:
    """Split documents into non-empty lines, chopping lines longer than SentencePiece's limit
    (it would otherwise skip them)."""
    for index, doc in enumerate(source):
        if not isinstance(doc, str):
            raise TypeError(f"train_tokenizer: document {index} is {type(doc).__name__}, expected str")
        for line in doc.splitlines():
            if not line.strip():
                continue
            encoded = line.encode("utf-8")
            if len(encoded) <= max_sentence_length:
                yield line
                continue
            # chop on a character boundary below the byte limit
            start = 0
            while start < len(line):
                end = min(len(line), start + max_sentence_length // 4)
                yield line[start:end]
                start = end


_FILE_NAME = re.compile(r"^\S+\.[A-Za-z0-9]{1,8}$")


def _decide_files(source: Iterable) -> bool:
    """Whether a source of undeclared kind lists files (see ``train_tokenizer``)."""
    if not isinstance(source, (list, tuple)) or not source:
        return False
    if any(isinstance(s, os.PathLike) for s in source):
        return True
    strings = [s for s in source if isinstance(s, str)]
    exists = [os.path.isfile(s) for s in strings]
    if strings and all(exists):
        return True
    if any(exists) or (strings and all(_FILE_NAME.match(s) for s in strings)):
        missing = next(s for s, e in zip(strings, exists) if not e)
        raise FileNotFoundError(f"train_tokenizer: input file not found: {missing}")
    return False


def _iter_files(paths: Sequence[str | os.PathLike]) -> Iterator[str]:
    for path in paths:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"train_tokenizer: input file not found: {path}")
        with open(path, encoding="utf-8", errors="strict") as f:
            yield f.read()


def train_tokenizer(
    source: Iterable[str] | Sequence[str | os.PathLike],
    model_prefix: str | os.PathLike,
    vocab_size: int = 32000,
    *,
    from_files: bool | None = None,
    character_coverage: float = 0.99995,
    max_sentence_length: int = 16384,
    input_sentence_size: int = 0,
    num_threads: int | None = None,
    extra_options: dict | None = None,
) -> Tokenizer:
    """Train a LLaMA-style SentencePiece BPE model and return it as a ``Tokenizer``.

    source: a text file path, a list of them, or an iterable of documents (strings).
        ``from_files`` says which; when None it is decided: a single path or any
        ``os.PathLike`` item means files, as does a list whose strings are all existing files.
        A list where some strings name files and others do not, or where every string looks
        like a file name (one word ending in an extension) but none exists, raises
        ``FileNotFoundError`` naming the first missing one rather than training on the names.
    model_prefix: writes ``{model_prefix}.model`` and ``{model_prefix}.vocab``.
    vocab_size: at least 256 byte pieces + 3 specials + every distinct character. It is an
        upper bound: a corpus too small to support that many merges yields a smaller
        vocabulary (with a logged warning); read ``Tokenizer.vocab_size`` for the real size.

    Choices (as LLaMA's tokenizer): BPE, byte fallback, split digits, identity normalisation,
    a dummy prefix space, whitespace kept as is; ids unk=0, bos=1, eos=2, no pad piece.
    """
    import sentencepiece as spm

    if vocab_size <= 259:
        raise ValueError(f"vocab_size must exceed 259 (256 byte pieces + unk/bos/eos), got {vocab_size}")
    if isinstance(source, (str, os.PathLike)):
        if from_files is False:
            raise TypeError("train_tokenizer: documents must be an iterable of str, not a single str")
        source, from_files = [source], True
    if from_files is None:
        from_files = _decide_files(source)
    if from_files:  # check every file before training starts, not midway through it
        source = [os.fspath(p) for p in source]  # type: ignore[union-attr]
        for path in source:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"train_tokenizer: input file not found: {path}")
    docs: Iterable[str] = _iter_files(source) if from_files else source  # type: ignore[arg-type]
    model_prefix = os.fspath(model_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    options = dict(
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=character_coverage,
        max_sentence_length=max_sentence_length,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=input_sentence_size > 0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=num_threads or max(1, os.cpu_count() or 1),
        minloglevel=2,
    )
    options.update(extra_options or {})
    sentences = _iter_sentences(docs, max_sentence_length)
    first = next(sentences, None)
    if first is None:
        raise ValueError("train_tokenizer: the source holds no non-empty text")

    source_errors: list[BaseException] = []

    def chained() -> Iterator[str]:
        yield first
        try:
            yield from sentences
        except Exception as e:  # SentencePiece would wrap it in an opaque RuntimeError
            source_errors.append(e)
            raise

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=chained(), model_writer=model, **options)
    except RuntimeError as e:  # e.g. vocab_size below 256 bytes + distinct characters + specials
        if source_errors:
            raise source_errors[0] from None
        raise ValueError(f"train_tokenizer: SentencePiece training failed: {e}") from None
    with open(model_prefix + ".model", "wb") as f:
        f.write(model.getvalue())
    tok = Tokenizer(model_prefix + ".model")
    if tok.vocab_size < vocab_size:  # hard_vocab_limit=False: a small corpus yields fewer pieces
        log.warning(
            "train_tokenizer: asked for %d pieces, the corpus supports only %d; the model has %d",
            vocab_size, tok.vocab_size, tok.vocab_size,
        )
    with open(model_prefix + ".vocab", "w", encoding="utf-8") as f:
        for i in range(tok.vocab_size):
            f.write(f"{tok.sp.IdToPiece(i)}\t{tok.sp.GetScore(i)}\n")
    return tok
