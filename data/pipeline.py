"""The whole data path in one object: reader -> tokenizer -> policy -> collator -> batches.

    pipe = DataPipeline.build("pile/train/*.jsonl.zst", tokenizer, policy="pad+impute",
                              max_len=512, batch_size=8, shuffle=True, seed=0)
    for batch in pipe:          # {"input_ids": (B, T), "target_ids": (B, T)[, "document_ids", "position_ids"]}
        ...
    state = pipe.state_dict()   # exact resume: reader position + policy buffers, plain data
    pipe.counts()               # {"reader": ..., "tokenized": ..., "policy": ...}

Each stage pulls from the one before only when it needs to, so a ``state_dict`` taken between
two batches is consistent: the reader's cursor sits after the last document the policy was fed,
and every sequence built from it but not yet batched is in the policy's ready queue. Loading that
state into a freshly built pipeline continues with exactly the batch that would have come next.

It runs in the calling process (tokenizing is cheap beside a training step); to spread reading
over DataLoader workers use ``PileReader`` and ``StreamingTokenizedDataset`` directly, which
shard across workers, and give up exact resume.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

import torch

from .collate import build_collator
from .policies import SequencePolicy, build_policy
from .reader import PileReader
from .tokenized import StreamingTokenizedDataset

__all__ = ["DataPipeline"]


class DataPipeline:
    """Batches of training tensors from a document stream, with one ``state_dict``.

    reader: any iterable of documents (usually ``PileReader``) — with ``state_dict`` for resume.
    tokenizer: ``encode``/``bos_id``/``eos_id`` (``llama_mini.data.tokenizer.Tokenizer``).
    policy: a ``SequencePolicy`` (see ``llama_mini.data.policies``); collator: its batch builder
    (default: ``docmask`` for ``packed-docmask``, else ``default``).
    """

    def __init__(self, reader: Any, tokenizer: Any, policy: SequencePolicy, batch_size: int, *,
                 collator: Any = None, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.reader = reader
        self.examples = StreamingTokenizedDataset(reader, tokenizer)
        self.policy = policy
        self.batch_size = batch_size
        self.drop_last = drop_last
        if collator is None:
            name = "docmask" if policy.name == "packed-docmask" else "default"
            collator = build_collator(name, pad_id=policy.pad_id, ignore_index=policy.ignore_index)
        self.collator = collator

    @classmethod
    def build(cls, sources: Any, tokenizer: Any, *, policy: str = "pad+impute", max_len: int | None = 512,
              batch_size: int = 8, drop_last: bool = False, policy_options: dict | None = None,
              ignore_index: int = -100, **reader_options: Any) -> "DataPipeline":
        """A pipeline from names: ``sources`` and ``reader_options`` go to ``PileReader``,
        ``policy`` / ``max_len`` / ``policy_options`` to ``build_policy`` (pad id from the tokenizer)."""
        options = dict(policy_options or {})
        if max_len is not None:
            options["max_len"] = max_len
        pad_id = getattr(tokenizer, "pad_id", 0)
        pad_id = pad_id() if callable(pad_id) else pad_id
        if pad_id is None or pad_id < 0:
            pad_id = 0  # padded targets are ignored; the pad id only has to be embeddable
        built = build_policy(policy, pad_id=pad_id, ignore_index=ignore_index, **options)
        return cls(PileReader(sources, **reader_options), tokenizer, built, batch_size, drop_last=drop_last)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.policy.max_len_rule == "forbidden" and self.policy.max_len is None:
            self._resolve_naive_max_len()
        return self.policy.batches(self.examples, self.batch_size, self.collator, drop_last=self.drop_last)

    def _resolve_naive_max_len(self) -> None:
        """The naive policies' max_len is the shortest document: find it in a first pass over a
        copy of the reader, so the real pass streams (bounded memory, exact resume) as usual.
        The pass sees this reader's share only: under several ranks each finds its own minimum
        (the naive policies belong to single-process ablations)."""
        probe = StreamingTokenizedDataset(copy.deepcopy(self.reader), self.examples.encode.tokenizer)
        shortest = min((len(ex["input_ids"]) for ex in probe), default=None)
        if shortest is None:
            raise ValueError(f"policy {self.policy.name!r}: the data holds no document to take max_len from")
        self.policy.max_len = shortest

    def set_epoch(self, epoch: int) -> None:
        """Select the reader's epoch (shuffle order). Each pass ends with the policy's ``flush``,
        so what it buffered (impute's short remainder, best-fit's last pieces) is emitted or
        dropped then, and counted; the next epoch starts with empty buffers."""
        self.reader.set_epoch(epoch)

    def counts(self) -> dict[str, dict]:
        reader = self.reader.counts.as_dict() if hasattr(self.reader, "counts") else {}
        return {"reader": reader, "tokenized": dict(self.examples.counts), "policy": self.policy.counts.as_dict()}

    def state_dict(self) -> dict:
        return {"examples": self.examples.state_dict(), "policy": self.policy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.examples.load_state_dict(state["examples"])
        self.policy.load_state_dict(state["policy"])
