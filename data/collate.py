"""Collators: turn a list of training sequences into a batch of padded LongTensors.

    collate = Collator(pad_id=0, ignore_index=-100)
    batch = collate([seq_a, seq_b])         # {"input_ids": (B, T), "target_ids": (B, T)}
    collate.last_pad_tokens                 # pad positions this call added

A sequence is a ``llama_mini.data.policies.TrainingSequence`` (or any object, or mapping, with the fields
``input_ids``, ``target_ids`` and optionally ``document_ids`` / ``position_ids``). Inputs are
padded with ``pad_id`` and targets with ``ignore_index``, so padded positions never reach the
loss. When every sequence of the batch carries ``document_ids`` and ``position_ids`` (packed
sequences from the ``packed-docmask`` policy), the batch has them too, and the padding of each
row becomes a document of its own (one past that row's largest id) with positions counting from
0, so a document-masked attention never lets a real token attend to padding.

``last_pad_tokens`` exists because a policy's ``batches`` adds it to its counts: padding done by
the collator is padding the model pays for just as much as the policy's own.

This module imports only torch; it does not depend on ``llama_mini.data.policies``.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["Collator", "DocMaskCollator", "COLLATORS", "build_collator"]


def _field(seq: Any, name: str) -> Any:
    if isinstance(seq, Mapping):
        return seq.get(name)
    return getattr(seq, name, None)


def _check_positive_int(name: str, value: Any, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Collator:
    """Pads sequences to one length and stacks them into ``(B, T)`` LongTensors.

    T is the longest sequence of the batch, or ``max_len`` when given (a longer sequence is an
    error, never silently cut), then rounded up to a multiple of ``pad_to_multiple_of`` when
    given (applied last, so it may exceed ``max_len``). Example with ``pad_id=0``::

        Collator()([TrainingSequence([5, 6], [6, 7]), TrainingSequence([8], [9])])
        -> input_ids  [[5, 6], [8,    0]]
           target_ids [[6, 7], [9, -100]]      last_pad_tokens == 1
    """

    #: the docmask collator refuses sequences without document ids
    requires_document_ids: bool = False

    def __init__(
        self,
        pad_id: int = 0,
        ignore_index: int = -100,
        max_len: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        self.pad_id = operator.index(pad_id)
        self.ignore_index = operator.index(ignore_index)
        self.max_len = _check_positive_int("max_len", max_len)
        self.pad_to_multiple_of = _check_positive_int("pad_to_multiple_of", pad_to_multiple_of)
        self.last_pad_tokens = 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pad_id={self.pad_id}, ignore_index={self.ignore_index}, "
            f"max_len={self.max_len}, pad_to_multiple_of={self.pad_to_multiple_of})"
        )

    def _rows(self, sequences: Sequence[Any]) -> tuple[list, list, list | None, list | None]:
        inputs, targets, docs, positions = [], [], [], []
        with_docs = []
        for i, seq in enumerate(sequences):
            inp, tgt = _field(seq, "input_ids"), _field(seq, "target_ids")
            if inp is None or tgt is None:
                raise ValueError(f"sequence {i} has no input_ids/target_ids")
            inp, tgt = list(inp), list(tgt)
            if len(inp) != len(tgt):
                raise ValueError(
                    f"sequence {i}: input_ids has {len(inp)} tokens but target_ids has {len(tgt)}"
                )
            if not inp:
                raise ValueError(f"sequence {i} is empty")
            doc, pos = _field(seq, "document_ids"), _field(seq, "position_ids")
            if (doc is None) != (pos is None):
                raise ValueError(
                    f"sequence {i} has only one of document_ids/position_ids; they come together"
                )
            if doc is not None:
                doc, pos = list(doc), list(pos)
                if len(doc) != len(inp) or len(pos) != len(inp):
                    raise ValueError(
                        f"sequence {i}: document_ids ({len(doc)}) and position_ids ({len(pos)}) "
                        f"must have as many entries as input_ids ({len(inp)})"
                    )
            inputs.append(inp)
            targets.append(tgt)
            docs.append(doc)
            positions.append(pos)
            with_docs.append(doc is not None)
        if any(with_docs) and not all(with_docs):
            i = with_docs.index(False)
            raise ValueError(
                f"sequence {i} has no document_ids but others in the batch do; "
                "a batch is either all packed-with-document-ids or none"
            )
        if self.requires_document_ids and not all(with_docs):
            raise ValueError(
                f"{type(self).__name__} needs document_ids and position_ids on every sequence "
                f"(sequence {with_docs.index(False)} has none); use the packed-docmask policy"
            )
        if not any(with_docs):
            return inputs, targets, None, None
        return inputs, targets, docs, positions

    def __call__(self, sequences: Sequence[Any]) -> dict[str, torch.Tensor]:
        sequences = list(sequences)
        if not sequences:
            raise ValueError("cannot collate an empty batch (sequences is empty)")
        inputs, targets, docs, positions = self._rows(sequences)
        lengths = [len(r) for r in inputs]
        T = max(lengths)
        if self.max_len is not None:
            for i, n in enumerate(lengths):
                if n > self.max_len:
                    raise ValueError(
                        f"sequence {i} has {n} tokens, more than the collator's max_len={self.max_len}"
                    )
            T = self.max_len
        if self.pad_to_multiple_of is not None:
            m = self.pad_to_multiple_of
            T = -(-T // m) * m

        pads = [T - n for n in lengths]
        batch = {
            "input_ids": torch.tensor([r + [self.pad_id] * k for r, k in zip(inputs, pads)], dtype=torch.long),
            "target_ids": torch.tensor(
                [r + [self.ignore_index] * k for r, k in zip(targets, pads)], dtype=torch.long
            ),
        }
        if docs is not None:
            # a fresh id per row keeps padding out of every real document's attention block
            batch["document_ids"] = torch.tensor(
                [d + [max(d) + 1] * k for d, k in zip(docs, pads)], dtype=torch.long
            )
            batch["position_ids"] = torch.tensor(
                [p + list(range(k)) for p, k in zip(positions, pads)], dtype=torch.long
            )
        self.last_pad_tokens = sum(pads)
        return batch


class DocMaskCollator(Collator):
    """A ``Collator`` that insists on ``document_ids`` / ``position_ids`` on every sequence.

    Use it with the ``packed-docmask`` policy so that a pipeline built with the wrong policy
    fails at the first batch instead of training without document masking.
    """

    requires_document_ids = True


COLLATORS: dict[str, type[Collator]] = {"default": Collator, "docmask": DocMaskCollator}


def build_collator(name: str, **kwargs: Any) -> Collator:
    """Build a collator by name (``"default"`` or ``"docmask"``); kwargs go to ``Collator``."""
    try:
        cls = COLLATORS[name]
    except KeyError:
        raise ValueError(f"unknown collator {name!r}; known: {', '.join(sorted(COLLATORS))}") from None
    return cls(**kwargs)
