"""Sequence-length policies: turn tokenized documents into fixed-size training sequences.

    policy = build_policy("pad+impute", max_len=2048, pad_id=tok.pad_id)
    for batch in policy.batches(examples, batch_size=8):   # {"input_ids": (B, T), ...}
        ...
    policy.counts.as_dict()    # documents, sequences, tokens kept / dropped / padded, ...

An example (one tokenized document) is ``{"input_ids": [BOS, t1, .., tn], "target_ids": [t1, ..,
tn, EOS]}``: the target is the input shifted by one. Every policy cuts and joins input and target
at the same positions, so each kept target is still the true next token of its input; token
counts are in example positions (``len(input_ids)``). Within a document, kept tokens never change
order and never repeat. Padding puts ``pad_id`` in inputs and ``ignore_index`` in targets.

Policies are push-style (``feed`` / ``flush`` / ``pop``) and keep all state as plain lists and
ints, so ``state_dict`` / ``load_state_dict`` resume a stream exactly, and ``torch.load(...,
weights_only=True)`` reads a saved state. A sequence is counted (``sequences``, ``tokens_kept``,
``pad_tokens``) when it is queued, not when it is popped, so after every ``feed``::

    counts.tokens_in == counts.tokens_kept + counts.tokens_dropped + policy.buffered_tokens

and ``buffered_tokens`` is 0 after ``flush``. Document-level counts (``documents_truncated``,
``documents_split``) describe the policy's cuts; ``batches(drop_last=True)`` moves the tokens
of a dropped final batch to ``tokens_dropped`` but leaves those two counts alone.

The registry (``POLICIES``, ``build_policy``) holds the policies of this file and the packing
policies of ``llama_mini.data.packing`` (``best-fit``, ``packed-docmask``). Names:

=================  ==========================================================================
``pad``            one document per sequence; not cut without max_len (= ``pad+discard`` with)
``discard``        first max_len tokens of each document; shorter documents dropped
``impute``         documents concatenated into one stream, cut into full max_len windows
``pad+discard``    first max_len tokens of each document, padded to max_len
``pad+impute``     each document cut into max_len chunks, the last padded
``informed``       first max_len kept; the overflow kept (own sequences) when >= ``tolerance``
``naive-discard``  ``discard`` with max_len = the shortest document of the input
``naive-impute``   ``impute`` with max_len = the shortest document of the input
=================  ==========================================================================
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch

from .collate import Collator
from .tokenized import Example

__all__ = [
    "TrainingSequence", "PolicyCounts", "SequencePolicy", "POLICIES", "register_policy",
    "build_policy", "PadPolicy", "DiscardPolicy", "ImputePolicy", "PadDiscardPolicy",
    "PadImputePolicy", "InformedPolicy", "NaiveDiscardPolicy", "NaiveImputePolicy",
]

STATE_VERSION = 1


@dataclass(slots=True)  # slots: no per-sequence __dict__ for the garbage collector to walk
class TrainingSequence:
    """One training sequence; ``target_ids[i]`` is the token that follows ``input_ids[i]``."""

    input_ids: list[int]
    target_ids: list[int]
    document_ids: list[int] | None = None  # packed-docmask only: which piece (0, 1, ..) per token
    position_ids: list[int] | None = None  # packed-docmask only: position within its piece


@dataclass
class PolicyCounts:
    """What a policy did with the tokens it was fed. After ``flush``: in == kept + dropped."""

    documents: int = 0  # examples fed in
    sequences: int = 0  # sequences emitted (queued)
    batches: int = 0  # batches emitted by Policy.batches
    tokens_in: int = 0  # sum of len(input_ids) over examples fed
    tokens_kept: int = 0  # non-pad tokens in emitted sequences
    tokens_dropped: int = 0  # tokens fed but never emitted
    pad_tokens: int = 0  # pad positions emitted (policy padding + collator padding)
    documents_truncated: int = 0  # documents that lost at least one token
    documents_split: int = 0  # documents whose kept tokens are spread over more than one sequence

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


POLICIES: dict[str, type[SequencePolicy]] = {}


def register_policy(cls: type[SequencePolicy]) -> type[SequencePolicy]:
    """Class decorator: make ``cls`` buildable by ``build_policy(cls.name)``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a non-empty string class attribute 'name'")
    if POLICIES.get(name, cls) is not cls:
        raise ValueError(f"policy name {name!r} is already registered by {POLICIES[name].__name__}")
    POLICIES[name] = cls
    return cls


def build_policy(name: str, **kwargs: Any) -> SequencePolicy:
    """Build a registered policy by name, e.g. ``build_policy("informed", max_len=512, tolerance=64)``."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    return cls(**kwargs)


def _copy(ids: list[int] | None) -> list[int] | None:
    return None if ids is None else list(ids)


def _positive_int(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}: {name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be >= 1, got {value}")
    return value


def _token_list(index: int, key: str, value: Any) -> list[int]:
    if hasattr(value, "tolist"):  # tensors and arrays
        value = value.tolist()
    try:
        # operator.index rejects floats instead of rounding them into token ids
        return list(map(operator.index, value))
    except TypeError:
        raise ValueError(f"example {index}: {key} must be a sequence of ints") from None


def _check_example(index: int, example: Any) -> tuple[list[int], list[int]]:
    """Validate one example; ``index`` is its document number in the stream, for the error."""
    if isinstance(example, Example) and example.checked:  # made and checked by llama_mini.data.tokenized's encoder
        inputs, targets = example["input_ids"], example["target_ids"]
        if inputs and type(inputs) is list and type(targets) is list and len(inputs) == len(targets):
            return inputs, targets
    if not hasattr(example, "__getitem__") or isinstance(example, (str, bytes)):
        raise ValueError(f"example {index} must be a dict with input_ids and target_ids")
    try:
        inputs, targets = example["input_ids"], example["target_ids"]
    except (KeyError, TypeError, IndexError):
        raise ValueError(f"example {index} must be a dict with input_ids and target_ids") from None
    inputs, targets = _token_list(index, "input_ids", inputs), _token_list(index, "target_ids", targets)
    if len(inputs) != len(targets):
        raise ValueError(
            f"example {index}: input_ids has {len(inputs)} tokens but target_ids has {len(targets)}; "
            "they must be the same length (target = input shifted by one)"
        )
    if not inputs:
        raise ValueError(f"example {index} is empty (no input_ids)")
    return inputs, targets


class SequencePolicy:
    """Base class: validation, counting, the ready queue, batching and state.

    Subclasses set ``name`` (and register themselves), implement ``_feed(inputs, targets)``,
    and, when they buffer across documents, ``_flush``, ``buffered_tokens`` and
    ``_state_extra`` / ``_load_extra``. ``max_len_rule`` is ``"required"``, ``"optional"`` or
    ``"forbidden"`` (for policies that derive max_len from the data).
    """

    name: ClassVar[str] = ""
    max_len_rule: ClassVar[str] = "required"

    def __init__(
        self, max_len: int | None = None, *, pad_id: int = 0, ignore_index: int = -100, **kwargs: Any
    ) -> None:
        if kwargs:
            raise TypeError(f"policy {self.name!r} got unknown option(s): {', '.join(sorted(kwargs))}")
        if self.max_len_rule == "forbidden":
            if max_len is not None:
                raise ValueError(
                    f"policy {self.name!r} sets max_len to the shortest document of its input; "
                    f"do not pass max_len (got {max_len!r})"
                )
        elif max_len is None:
            if self.max_len_rule == "required":
                raise ValueError(f"policy {self.name!r} needs max_len (a positive int)")
        else:
            max_len = _positive_int(f"policy {self.name!r}", "max_len", max_len)
        self.max_len: int | None = max_len
        self.pad_id = operator.index(pad_id)
        self.ignore_index = operator.index(ignore_index)
        self.counts = PolicyCounts()
        # entries: {"input_ids", "target_ids", "document_ids", "position_ids", "n_tokens"}
        # (sequence, its non-pad token count) in emission order
        self._ready: deque[tuple[TrainingSequence, int]] = deque()

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({cfg})"

    # ---- configuration -------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        """Settings that a saved state must agree with; subclasses add their own."""
        return {"max_len": self.max_len, "pad_id": self.pad_id, "ignore_index": self.ignore_index}

    # ---- streaming -----------------------------------------------------------------------

    def feed(self, example: dict) -> None:
        """Take one example; finished sequences go to the ready queue (see ``pop``)."""
        inputs, targets = _check_example(self.counts.documents, example)
        self.counts.documents += 1
        self.counts.tokens_in += len(inputs)
        self._feed(inputs, targets)

    def flush(self) -> None:
        """End of stream: emit or drop whatever is buffered. Safe to call more than once."""
        self._flush()

    def pop(self) -> TrainingSequence | None:
        """The next ready sequence, or None. Sequences are counted when queued, not here."""
        if not self._ready:
            return None
        return self._ready.popleft()[0]

    @property
    def buffered_tokens(self) -> int:
        """Tokens fed but neither emitted nor dropped yet."""
        return 0

    def _feed(self, inputs: list[int], targets: list[int]) -> None:
        """Cut one validated document into sequences (``_emit``) and count what it drops."""
        raise NotImplementedError(f"{type(self).__name__} must implement _feed (every registered policy does)")

    def _flush(self) -> None:
        pass

    def _prepare(self, examples: Iterable[dict]) -> Iterable[dict]:
        """Hook for policies that must see the whole input first (the naive ones)."""
        return examples

    def _entries(self, examples: Iterable[dict]) -> Iterator[tuple[TrainingSequence, int]]:
        # the queue is FIFO, so sequences restored by load_state_dict come out first
        ready = self._ready
        for example in examples:
            self.feed(example)
            while ready:
                yield ready.popleft()
        self.flush()
        while ready:
            yield ready.popleft()

    def __call__(self, examples: Iterable[dict]) -> Iterator[TrainingSequence]:
        """Feed every example, flush at the end, and yield sequences as they become ready."""
        return self._sequences(self._prepare(examples))

    def _sequences(self, examples: Iterable[dict]) -> Iterator[TrainingSequence]:
        ready = self._ready  # one generator, not two stacked: short sequences come by the thousand
        for example in examples:
            self.feed(example)
            while ready:
                yield ready.popleft()[0]
        self.flush()
        while ready:
            yield ready.popleft()[0]

    def batches(
        self,
        examples: Iterable[dict],
        batch_size: int,
        collator: Callable[[list[TrainingSequence]], dict[str, torch.Tensor]] | None = None,
        drop_last: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Group sequences into batches of ``batch_size`` and collate them.

        The default collator is ``Collator(pad_id, ignore_index)``; a custom one must set
        ``last_pad_tokens`` like ``Collator`` does, so its padding is counted. With
        ``drop_last`` a final short batch is not yielded and its tokens count as dropped. A
        ``state_dict`` taken between two yielded batches resumes exactly.
        """
        batch_size = _positive_int(f"policy {self.name!r}", "batch_size", batch_size)
        if collator is None:
            collator = Collator(pad_id=self.pad_id, ignore_index=self.ignore_index)
        return self._batches(self._prepare(examples), batch_size, collator, drop_last)

    def _batches(self, examples, batch_size, collator, drop_last) -> Iterator[dict[str, torch.Tensor]]:
        pending: list[tuple[TrainingSequence, int]] = []
        for entry in self._entries(examples):
            pending.append(entry)
            if len(pending) == batch_size:
                yield self._collate(collator, pending)
                pending = []
        if pending:
            if drop_last:
                for seq, n in pending:
                    self.counts.sequences -= 1
                    self.counts.tokens_kept -= n
                    self.counts.tokens_dropped += n
                    self.counts.pad_tokens -= len(seq.input_ids) - n
            else:
                yield self._collate(collator, pending)

    def _collate(self, collator, entries: list[tuple[TrainingSequence, int]]) -> dict[str, torch.Tensor]:
        batch = collator([seq for seq, _ in entries])
        extra = getattr(collator, "last_pad_tokens", None)
        if extra is None:
            raise TypeError(
                f"collator {collator!r} must set last_pad_tokens (pad positions it added) "
                "so the policy can count them; see llama_mini.data.collate.Collator"
            )
        self.counts.pad_tokens += extra
        self.counts.batches += 1
        return batch

    # ---- emitting ------------------------------------------------------------------------

    def _emit(self, inputs: list[int], targets: list[int], pieces: list[int] | None = None) -> None:
        """Queue one sequence, padded to max_len when there is one.

        Takes ownership of ``inputs`` and ``targets`` (callers pass fresh lists; padding is
        appended in place, since each copy of a token list costs a few percent of the pipeline).
        ``pieces`` (lengths of the packed pieces, in order) makes document and position ids:
        pad positions form one extra document whose positions count from 0.
        """
        n = len(inputs)
        k = self.max_len - n if self.max_len is not None else 0
        if k:
            inputs += [self.pad_id] * k
            targets += [self.ignore_index] * k
        doc_ids = positions = None
        if pieces is not None:
            ramp = self._ramp()
            if len(pieces) == 1:  # the common bin, one whole chunk: build each list in one go
                doc_ids, positions = [0] * n, ramp[:n]
                if k:
                    doc_ids += [1] * k
                    positions += ramp[:k]
            else:
                doc_ids, positions = [], []
                for d, length in enumerate(pieces):
                    doc_ids += [d] * length
                    positions += ramp[:length]
                doc_ids += [len(pieces)] * k
                positions += ramp[:k]
        self.counts.sequences += 1
        self.counts.tokens_kept += n
        self.counts.pad_tokens += k
        self._ready.append((TrainingSequence(inputs, targets, doc_ids, positions), n))

    def _ramp(self) -> list[int]:
        """``[0, 1, ..., max_len - 1]``, made once: slicing it reuses the int objects."""
        ramp = getattr(self, "_ramp_cache", None)
        if ramp is None or len(ramp) != self.max_len:
            ramp = self._ramp_cache = list(range(self.max_len))
        return ramp

    def _emit_spans(self, inputs: list[int], targets: list[int], spans: list[tuple[int, int]]) -> None:
        """Emit ``[start, end)`` spans of one document each as its own sequence; drop the rest."""
        kept = 0
        for start, end in spans:
            self._emit(inputs[start:end], targets[start:end])
            kept += end - start
        dropped = len(inputs) - kept
        self.counts.tokens_dropped += dropped
        self.counts.documents_truncated += dropped > 0
        self.counts.documents_split += len(spans) > 1

    # ---- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counts, buffers and the ready queue as plain lists and ints (a deep copy)."""
        ready = [
            {"input_ids": list(seq.input_ids), "target_ids": list(seq.target_ids),
             "document_ids": _copy(seq.document_ids), "position_ids": _copy(seq.position_ids), "n_tokens": n}
            for seq, n in self._ready
        ]
        return {
            "policy": self.name,
            "version": STATE_VERSION,
            "config": self._config(),
            "counts": self.counts.as_dict(),
            "ready": ready,
            "buffer": self._state_extra(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict`` taken from a policy of the same name and settings."""
        if state.get("policy") != self.name:
            raise ValueError(f"state is for policy {state.get('policy')!r}, not {self.name!r}")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = self._config()
        for key, value in state["config"].items():
            if key == "max_len" and self.max_len_rule == "forbidden" and self.max_len is None:
                continue  # a naive policy takes the max_len it resolved before the save
            if mine.get(key) != value:
                raise ValueError(
                    f"state has {key}={value!r} but this {self.name!r} policy has {key}={mine.get(key)!r}"
                )
        if self.max_len_rule == "forbidden":
            self.max_len = state["config"]["max_len"]
        names = {f.name for f in fields(PolicyCounts)}
        if set(state["counts"]) != names:
            raise ValueError(f"state counts have keys {sorted(state['counts'])}, expected {sorted(names)}")
        self.counts = PolicyCounts(**state["counts"])
        self._ready = deque(
            (TrainingSequence(list(e["input_ids"]), list(e["target_ids"]), _copy(e["document_ids"]),
                              _copy(e["position_ids"])), e["n_tokens"])
            for e in state["ready"]
        )
        self._load_extra(state["buffer"])

    def _state_extra(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, buffer: dict[str, Any]) -> None:
        pass


@register_policy
class PadPolicy(SequencePolicy):
    """One document per sequence, never joined with another.

    Without max_len a document is not cut and the collator pads each batch to its longest
    sequence. With max_len this is exactly ``pad+discard``: the first max_len tokens, padded
    to max_len, the overflow dropped. Example (documents of 3 and 1 tokens, no max_len)::

        [a0 a1 a2], [b0]  ->  [a0 a1 a2], [b0]    (collator: [b0 pad pad])
    """

    name = "pad"
    max_len_rule = "optional"

    def _feed(self, inputs: list[int], targets: list[int]) -> None:
        end = len(inputs) if self.max_len is None else min(len(inputs), self.max_len)
        self._emit_spans(inputs, targets, [(0, end)])


@register_policy
class PadDiscardPolicy(PadPolicy):
    """Each document becomes its first max_len tokens, padded to max_len; overflow dropped.

    Example, max_len=2::

        [a0 a1 a2], [b0]  ->  [a0 a1], [b0 pad]     (a2 dropped)
    """

    name = "pad+discard"
    max_len_rule = "required"


@register_policy
class DiscardPolicy(SequencePolicy):
    """Truncation: each document becomes its first max_len tokens; the overflow is dropped.

    Documents shorter than max_len are dropped whole, so every sequence is exactly max_len
    tokens with no padding; their tokens count as dropped and the documents as truncated.
    Example, max_len=2::

        [a0 a1 a2], [b0]  ->  [a0 a1]     (a2 and all of b dropped)
    """

    name = "discard"

    def _feed(self, inputs: list[int], targets: list[int]) -> None:
        self._emit_spans(inputs, targets, [(0, self.max_len)] if len(inputs) >= self.max_len else [])


@register_policy
class PadImputePolicy(SequencePolicy):
    """Each document is cut into consecutive max_len chunks; the last chunk is padded.

    Chunks are never joined with another document's, and nothing is dropped. Example,
    max_len=2::

        [a0 a1 a2], [b0]  ->  [a0 a1], [a2 pad], [b0 pad]
    """

    name = "pad+impute"

    def _feed(self, inputs: list[int], targets: list[int]) -> None:
        n, L = len(inputs), self.max_len
        self._emit_spans(inputs, targets, [(s, min(s + L, n)) for s in range(0, n, L)])


@register_policy
class InformedPolicy(SequencePolicy):
    """Informed overflow: the first max_len tokens of each document, plus the overflow when it
    is long enough to be worth learning from.

    The overflow (everything past the first max_len tokens) is kept when it has at least
    ``tolerance`` tokens, as new sequences of its own (cut into max_len chunks, the last one
    padded, never joined with another document), and dropped whole otherwise. Every sequence is
    padded to max_len. ``tolerance`` may exceed max_len (the homework used 150 and 200 at
    max_len 100): then only overflows longer than a whole sequence survive. Example, max_len=2,
    tolerance=2::

        [a0 a1 a2], [b0 b1 b2 b3 b4], [c0]  ->  [a0 a1], [b0 b1], [b2 b3], [b4 pad], [c0 pad]
                                                (a2 dropped: an overflow of 1 < 2)
    """

    name = "informed"

    def __init__(self, max_len: int | None = None, *, tolerance: int | None = None, **kwargs: Any) -> None:
        super().__init__(max_len, **kwargs)
        if tolerance is None:
            raise ValueError("policy 'informed' needs tolerance (the shortest overflow worth keeping)")
        self.tolerance = _positive_int("policy 'informed'", "tolerance", tolerance)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "tolerance": self.tolerance}

    def _feed(self, inputs: list[int], targets: list[int]) -> None:
        n, L = len(inputs), self.max_len
        spans = [(0, min(L, n))]
        if n - L >= self.tolerance:
            spans += [(s, min(s + L, n)) for s in range(L, n, L)]
        self._emit_spans(inputs, targets, spans)


@register_policy
class ImputePolicy(SequencePolicy):
    """Concatenation ("snaking"): all documents form one stream cut into max_len windows.

    Every full window is a sequence, so sequences run across document boundaries (with no
    separator beyond each document's own BOS/EOS) and nothing is padded; the final remainder
    shorter than max_len is dropped at ``flush``. Example, max_len=2::

        [a0 a1 a2], [b0 b1 b2]  ->  [a0 a1], [a2 b0], [b1 b2]
        [a0 a1 a2], [b0]        ->  [a0 a1], [a2 b0]
        [a0 a1 a2]              ->  [a0 a1]                (a2 dropped at flush)
    """

    name = "impute"

    def __init__(self, max_len: int | None = None, **kwargs: Any) -> None:
        super().__init__(max_len, **kwargs)
        self._buf_in: list[int] = []
        self._buf_tg: list[int] = []
        # per document with tokens in the buffer: [tokens still buffered, windows it is in so far]
        self._segments: list[list[int]] = []

    @property
    def buffered_tokens(self) -> int:
        return len(self._buf_in)

    def _feed(self, inputs: list[int], targets: list[int]) -> None:
        self._buf_in += inputs
        self._buf_tg += targets
        self._segments.append([len(inputs), 0])
        L = self.max_len
        end = len(self._buf_in) // L * L
        for start in range(0, end, L):
            self._emit(self._buf_in[start : start + L], self._buf_tg[start : start + L])
        if end:
            self._consume(end)
            # one trim per feed, not per window: long documents would otherwise cost O(n^2)
            del self._buf_in[:end], self._buf_tg[:end]

    def _consume(self, total: int) -> None:
        """Book the first ``total`` buffered tokens (whole windows) as emitted, per document."""
        L, pos, done = self.max_len, 0, 0
        for seg in self._segments:
            take = min(seg[0], total - pos)
            if take <= 0:
                break
            windows = (pos + take - 1) // L - pos // L + 1
            if seg[1] < 2 <= seg[1] + windows:  # its kept tokens now span two sequences
                self.counts.documents_split += 1
            seg[1] += windows
            seg[0] -= take
            pos += take
            if seg[0]:
                break
            done += 1
        del self._segments[:done]

    def _flush(self) -> None:
        self.counts.tokens_dropped += len(self._buf_in)
        self.counts.documents_truncated += len(self._segments)
        self._buf_in, self._buf_tg, self._segments = [], [], []

    def _state_extra(self) -> dict[str, Any]:
        return {
            "input_ids": list(self._buf_in),
            "target_ids": list(self._buf_tg),
            "segments": [list(s) for s in self._segments],
        }

    def _load_extra(self, buffer: dict[str, Any]) -> None:
        self._buf_in = list(buffer["input_ids"])
        self._buf_tg = list(buffer["target_ids"])
        self._segments = [list(s) for s in buffer["segments"]]


class _NaiveMixin:
    """max_len is the length of the shortest document of the input, so the input is finite.

    ``__call__`` and ``batches`` materialise the input to find it (unless it is resolved
    already, e.g. restored by ``load_state_dict``); ``resolve_max_len`` does it explicitly for
    push-style use. Afterwards ``.max_len`` holds the resolved value.
    """

    max_len_rule = "forbidden"

    def resolve_max_len(self, examples: Iterable[dict]) -> list[dict]:
        """Set ``max_len`` to the shortest document of ``examples``; return them as a list."""
        if self.counts.documents:
            # a new max_len would re-cut what is buffered and break the counts
            raise RuntimeError(
                f"policy {self.name!r}: max_len={self.max_len} is fixed once documents were fed"
            )
        examples = list(examples)
        if not examples:
            raise ValueError(f"policy {self.name!r} needs at least one example to set max_len from")
        self.max_len = min(len(_check_example(i, ex)[0]) for i, ex in enumerate(examples))
        return examples

    def feed(self, example: dict) -> None:
        if self.max_len is None:
            raise RuntimeError(
                f"policy {self.name!r} has no max_len yet: call resolve_max_len(examples) first, "
                "or pass the whole input to __call__ / batches"
            )
        super().feed(example)

    def _prepare(self, examples: Iterable[dict]) -> Iterable[dict]:
        return self.resolve_max_len(examples) if self.max_len is None else examples


@register_policy
class NaiveDiscardPolicy(_NaiveMixin, DiscardPolicy):
    """``discard`` with max_len = the length of the shortest document of the input.

    The input must be finite: ``__call__`` / ``batches`` read it all first (or call
    ``resolve_max_len(examples)`` before ``feed``); ``.max_len`` then holds the value. No
    document is dropped whole; every longer one is truncated. Example::

        [a0 a1 a2], [b0 b1]  ->  max_len=2: [a0 a1], [b0 b1]     (a2 dropped)
    """

    name = "naive-discard"


@register_policy
class NaiveImputePolicy(_NaiveMixin, ImputePolicy):
    """``impute`` (snaking) with max_len = the length of the shortest document of the input.

    The input must be finite, as for ``naive-discard``. Example::

        [a0 a1 a2], [b0 b1]  ->  max_len=2: [a0 a1], [a2 b0]     (b1 dropped at flush)
    """

    name = "naive-impute"


# registers best-fit and packed-docmask; at the bottom because packing imports this module
from . import packing as _packing  # noqa: E402,F401
