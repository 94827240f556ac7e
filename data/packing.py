"""Packing policies: best-fit-decreasing packing of documents into max_len sequences.

    policy = build_policy("best-fit", max_len=2048, buffer_size=1000)
    policy = build_policy("packed-docmask", max_len=2048)   # + document_ids, position_ids

Best-fit packing follows Ding et al. 2024, "Fewer Truncations Improve Language Modeling":
documents longer than max_len are split into max_len chunks plus a remainder (only those are
split); the pieces are buffered; when the buffer holds ``buffer_size`` pieces, and at
``flush``, they are packed by best-fit decreasing:

1. sort the pieces by length, longest first (ties: arrival order);
2. put each piece into the open bin with the least remaining space that still fits it (ties:
   the bin opened first), else open a new bin;
3. emit every bin, in the order the bins were opened, as one sequence: its pieces
   concatenated in the order they were placed, padded to max_len.

Nothing is dropped. Within a document, kept tokens never change order: a split document's
full chunks each fill a bin of their own and are placed (and so emitted) in arrival order
before any shorter piece, and its remainder goes into a later bin.

``packed-docmask`` packs identically and also gives every token a ``document_ids`` entry (which
piece of this sequence it belongs to: 0, 1, 2, ...; padding is one more piece) and a
``position_ids`` entry (its position within that piece, restarting at 0), so attention can be
confined to each piece and RoPE positions restart per piece.

Both live here rather than in ``llama_mini.data.policies`` because packing is the one policy family with
an algorithm of its own; they are registered in the same ``POLICIES`` registry.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Any

from .policies import SequencePolicy, _positive_int, register_policy

__all__ = ["BestFitPolicy", "PackedDocMaskPolicy", "best_fit_decreasing"]


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Pack items of the given lengths (each <= capacity) into bins; return item indices per bin.

    Bins are listed in the order they were opened; items within a bin in placement order.
    Ties are broken deterministically: equal lengths by index, equal free space by bin age.

        best_fit_decreasing([3, 2, 1, 2], 4)  ->  [[0, 2], [1, 3]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties by arrival
    bins: list[list[int]] = []
    # (free space, bin index) sorted: the first entry with free >= length is the best fit,
    # and among equal free space the oldest bin, because the tuple compares the index next
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if not 1 <= n <= capacity:
            raise ValueError(f"item {i} has length {n}; items must be 1..{capacity}")
        j = bisect_left(free, (n, -1))
        if j < len(free):
            space, b = free.pop(j)
            bins[b].append(i)
        else:
            space, b = capacity, len(bins)
            bins.append([i])
        if space - n > 0:  # full bins can take nothing more; keep them out of the search
            insort(free, (space - n, b))
    return bins


@register_policy
class BestFitPolicy(SequencePolicy):
    """Best-fit-decreasing packing (Ding et al. 2024); nothing is dropped.

    Documents longer than max_len are split into max_len chunks plus a remainder (counted in
    ``documents_split``); shorter ones are never split. Pieces are buffered and, every
    ``buffer_size`` pieces and at ``flush``, packed longest first into the fullest bin that
    still fits; each bin is one sequence padded to max_len. Ties go by arrival order. Example,
    max_len=4, documents of 6, 3 and 9 tokens (pieces a0-3 a4-5 | b0-2 | c0-3 c4-7 c8)::

        [a0 a1 a2 a3], [c0 c1 c2 c3], [c4 c5 c6 c7], [b0 b1 b2 c8], [a4 a5 pad pad]
    """

    name = "best-fit"
    docmask: bool = False

    def __init__(self, max_len: int | None = None, *, buffer_size: int = 1000, **kwargs: Any) -> None:
        super().__init__(max_len, **kwargs)
        self.buffer_size = _positive_int(f"policy {self.name!r}", "buffer_size", buffer_size)
        # [input_ids, target_ids, owned] per piece, in arrival order; owned lists (slices made
        # here) may be handed to _emit as they are, the caller's lists are copied first
        self._pieces: list[list] = []

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "buffer_size": self.buffer_size}

    @property
    def buffered_tokens(self) -> int:
        return sum(len(p[0]) for p in self._pieces)

    def _feed(self, inputs: list[int], targets: list[int]) -> None:
        n, L = len(inputs), self.max_len
        # the split is decided here and nothing is ever dropped, so count it now
        self.counts.documents_split += n > L
        for s in range(0, n, L):
            self._pieces.append([inputs, targets, False] if n <= L else [inputs[s : s + L], targets[s : s + L], True])
            # pack at exactly buffer_size so every pack sees the same amount of choice
            if len(self._pieces) >= self.buffer_size:
                self._pack()

    def _flush(self) -> None:
        if self._pieces:
            self._pack()

    def _pack(self) -> None:
        pieces, self._pieces = self._pieces, []
        for bin_ in best_fit_decreasing([len(p[0]) for p in pieces], self.max_len):
            if len(bin_) == 1 and pieces[bin_[0]][2]:  # every copy of the tokens costs ~2% of the pipeline
                inputs, targets = pieces[bin_[0]][0], pieces[bin_[0]][1]
            else:
                inputs, targets = [], []
                for i in bin_:  # list += list runs in C, unlike a per-token comprehension
                    inputs += pieces[i][0]
                    targets += pieces[i][1]
            self._emit(inputs, targets, [len(pieces[i][0]) for i in bin_] if self.docmask else None)

    def _state_extra(self) -> dict[str, Any]:
        return {"pieces": [[list(p[0]), list(p[1])] for p in self._pieces]}

    def _load_extra(self, buffer: dict[str, Any]) -> None:
        self._pieces = [[list(p[0]), list(p[1]), True] for p in buffer["pieces"]]


@register_policy
class PackedDocMaskPolicy(BestFitPolicy):
    """``best-fit`` packing plus per-token ``document_ids`` and ``position_ids``.

    ``document_ids`` numbers the pieces of a sequence 0, 1, 2, ... and ``position_ids`` restarts
    at 0 in each piece, so attention can be confined to a piece and RoPE positions restart.
    Padding is one more piece (id = number of pieces) with positions 0..k-1. Same example as
    ``best-fit``: the sequence ``[b0 b1 b2 c8]`` has document_ids ``[0 0 0 1]`` and
    position_ids ``[0 1 2 0]``; ``[a4 a5 pad pad]`` has ``[0 0 1 1]`` and ``[0 1 0 1]``.
    """

    name = "packed-docmask"
    docmask = True
