"""Tokenized datasets: documents become ``{"input_ids", "target_ids"}`` examples.

    ds = TokenizedDataset(["first document", "second one"], tokenizer)      # map-style
    ds[0]  # {"input_ids": [BOS, t1, ..., tn], "target_ids": [t1, ..., tn, EOS]}
    stream = StreamingTokenizedDataset(PileReader("pile/*.jsonl.zst"), tokenizer)

For a document with tokens ``t1..tn`` the input is BOS + tokens and the target is tokens + EOS:
both have length ``n + 1`` and ``target[i]`` is the token that follows ``input[i]``, so the
loss at every position predicts the next token, the first from BOS alone and the last being
the end of the document. The sequence-length policies (``llama_mini.data.policies``) cut and join input
and target at the same positions, which keeps that pairing.

Any tokenizer works that has ``encode(text) -> list[int]`` and ``bos_id`` / ``eos_id``
(attributes or SentencePiece-style methods), for example ``llama_mini.data.tokenizer.Tokenizer`` or
Meta's ``tokenizer.model`` through it. The ids of any other tokenizer are checked: non-integers
are an error, and with a ``vocab_size`` an id outside ``[0, vocab_size)`` is an error naming the
document.
"""

from __future__ import annotations

import operator
from typing import Any, Iterable, Iterator, Sequence

from torch.utils.data import Dataset, IterableDataset

from .tokenizer import Tokenizer

__all__ = ["Example", "tokenize_document", "TokenizedDataset", "StreamingTokenizedDataset"]


class Example(dict):
    """``{"input_ids", "target_ids"}``. One made by this module's encoder carries a mark
    (``checked``) that its lists are plain ``list[int]`` of equal length, so the policies need
    not check every token again; any other example, or a copy (``default_collate`` rebuilds
    mappings), is checked in full."""

    checked = False


def _special(tokenizer: Any, name: str) -> int:
    value = getattr(tokenizer, name, None)
    if callable(value):
        value = value()
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no usable {name} (got {value!r}); BOS and EOS ids are required")
    return value


class _Encoder:
    """The tokenizer's encode plus BOS/EOS and the id range check."""

    def __init__(self, tokenizer: Any) -> None:
        if not callable(getattr(tokenizer, "encode", None)):
            raise TypeError(f"tokenizer {type(tokenizer).__name__} has no encode(text) method")
        self.tokenizer = tokenizer
        self.bos_id = _special(tokenizer, "bos_id")
        self.eos_id = _special(tokenizer, "eos_id")
        vocab = getattr(tokenizer, "vocab_size", None)
        self.vocab_size = vocab() if callable(vocab) else vocab
        # SentencePiece through our wrapper returns list[int] within its own vocabulary: checking
        # every id again would cost about 5% of the pipeline for nothing
        self.trusted = type(tokenizer) is Tokenizer
        if self.vocab_size is not None and not max(self.bos_id, self.eos_id) < self.vocab_size:
            raise ValueError(f"tokenizer's BOS/EOS ids ({self.bos_id}, {self.eos_id}) are outside its vocab_size {self.vocab_size}")

    def __call__(self, text: str, where: str) -> Example:
        if not isinstance(text, str):
            raise TypeError(f"{where}: document text is {type(text).__name__}, expected str")
        ids = self.tokenizer.encode(text)
        if not self.trusted:
            try:  # operator.index rejects floats rather than rounding them into ids
                ids = list(map(operator.index, ids))
            except TypeError:
                raise TypeError(f"{where}: tokenizer returned non-integer token ids") from None
            if ids and self.vocab_size is not None and (min(ids) < 0 or max(ids) >= self.vocab_size):
                bad = next(i for i in ids if not 0 <= i < self.vocab_size)
                raise ValueError(f"{where}: tokenizer produced token id {bad} outside [0, vocab_size={self.vocab_size})")
        example = Example(input_ids=[self.bos_id] + ids, target_ids=ids + [self.eos_id])
        example.checked = True
        return example


def _text_and_place(doc: Any, fallback: str) -> tuple[str, str]:
    """A document's text, and where it came from for error messages."""
    if isinstance(doc, dict):
        if "text" not in doc:
            raise KeyError(f"{fallback}: document has no 'text' key (keys: {sorted(doc)})")
        place = f"{doc['source']}, line {doc['line']}" if "source" in doc and "line" in doc else fallback
        return doc["text"], place
    return doc, fallback


def tokenize_document(tokenizer: Any, doc: Any) -> dict[str, list[int]]:
    """One document (text, or a reader dict with ``text``) as an example."""
    text, place = _text_and_place(doc, "document")
    return _Encoder(tokenizer)(text, place)


class TokenizedDataset(Dataset):
    """Map-style dataset over a list of documents (texts or reader dicts), tokenized on access.

    ``cache=True`` keeps each example after its first access (the token lists of the whole
    list stay in memory; fine for the small document sets of ablations).
    """

    def __init__(self, documents: Sequence[Any], tokenizer: Any, *, cache: bool = False) -> None:
        self.documents = documents
        self.encode = _Encoder(tokenizer)
        self._cache: dict[int, dict] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"document index {index} out of range for {len(self)} documents")
        index %= len(self)
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        text, place = _text_and_place(self.documents[index], f"document {index}")
        example = self.encode(text, place)
        if self._cache is not None:
            self._cache[index] = example
        return example


class StreamingTokenizedDataset(IterableDataset):
    """Examples from a stream of documents (usually a ``PileReader``), tokenized one at a time.

    Documents are encoded one by one, never read ahead, so ``state_dict()`` is the reader's and
    a resume continues with the next document. ``documents`` and ``tokens`` count what was
    produced (tokens as example positions, ``n + 1`` per document).
    """

    def __init__(self, documents: Iterable[Any], tokenizer: Any) -> None:
        self.documents = documents
        self.encode = _Encoder(tokenizer)
        self.counts = {"documents": 0, "tokens": 0}

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for i, doc in enumerate(self.documents):
            text, place = _text_and_place(doc, f"document {i} of the stream")
            example = self.encode(text, place)
            self.counts["documents"] += 1
            self.counts["tokens"] += len(example["input_ids"])
            yield example

    def state_dict(self) -> dict:
        inner = self.documents.state_dict() if hasattr(self.documents, "state_dict") else None
        return {"documents": inner, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        if state["documents"] is None and state["counts"]["documents"] > 0:
            raise ValueError(
                f"this state was saved after {state['counts']['documents']} documents from a source without "
                "state_dict (a plain list or iterator), so the position cannot be restored; use PileReader"
            )
        if state["documents"] is not None:
            if not hasattr(self.documents, "load_state_dict"):
                raise TypeError(f"{type(self.documents).__name__} cannot load a saved reader state")
            self.documents.load_state_dict(state["documents"])
        self.counts = dict(state["counts"])
