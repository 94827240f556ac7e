"""Sequence-length policies (data/policies.py, data/packing.py).

Token ids encode where they came from: document d, position p has input id ``d * 1000 + p`` and
target id ``d * 1000 + p + 1``, so every emitted pair can be traced back to its source, and
order, repeats and cut positions can be checked exactly.
"""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_mini.data.collate import Collator
from llama_mini.data.packing import best_fit_decreasing
from llama_mini.data.policies import (
    POLICIES, PolicyCounts, SequencePolicy, TrainingSequence, build_policy, register_policy,
)

ALL = sorted(POLICIES)
NAIVE = {"naive-discard", "naive-impute"}
PACKING = {"best-fit", "packed-docmask"}
PAD, IGNORE = -1, -100  # -1 can never be a traced token id


def doc(d: int, n: int) -> dict:
    return {"input_ids": [d * 1000 + p for p in range(n)], "target_ids": [d * 1000 + p + 1 for p in range(n)]}


def ids(d: int, a: int, b: int) -> list[int]:
    return [d * 1000 + p for p in range(a, b)]


def make(name: str, max_len=None, tolerance=None, buffer_size=None, **kw) -> SequencePolicy:
    if name not in NAIVE:
        kw["max_len"] = max_len
    if name == "informed":
        kw["tolerance"] = tolerance
    if name in PACKING and buffer_size is not None:
        kw["buffer_size"] = buffer_size
    return build_policy(name, **kw)


def test_registry_holds_every_policy():
    assert set(POLICIES) == {
        "pad", "discard", "impute", "pad+discard", "pad+impute", "informed",
        "naive-discard", "naive-impute", "best-fit", "packed-docmask",
    }
    for name, cls in POLICIES.items():
        assert cls.name == name and cls.__doc__


# ---- worked examples ---------------------------------------------------------------------
# Three documents: A (doc 1) of 6 tokens, B (doc 2) of 3, C (doc 3) of 9; max_len=4, tolerance=3.

DOCS = [doc(1, 6), doc(2, 3), doc(3, 9)]
A, B, C = 1, 2, 3
P0 = 0  # pad_id of the worked examples (the default)


def counts(**kw) -> dict:
    base = {"documents": 3, "tokens_in": 18, "batches": 0, "pad_tokens": 0, "tokens_dropped": 0,
            "documents_truncated": 0, "documents_split": 0}
    base.update(kw)
    return base


WORKED = {
    "pad+discard": (
        [ids(A, 0, 4), ids(B, 0, 3) + [P0], ids(C, 0, 4)],
        counts(sequences=3, tokens_kept=11, tokens_dropped=7, pad_tokens=1, documents_truncated=2),
    ),
    "discard": (
        [ids(A, 0, 4), ids(C, 0, 4)],  # B (3 < 4 tokens) dropped whole
        counts(sequences=2, tokens_kept=8, tokens_dropped=10, documents_truncated=3),
    ),
    "impute": (
        [ids(A, 0, 4), ids(A, 4, 6) + ids(B, 0, 2), ids(B, 2, 3) + ids(C, 0, 3), ids(C, 3, 7)],
        counts(sequences=4, tokens_kept=16, tokens_dropped=2, documents_truncated=1, documents_split=3),
    ),
    "pad+impute": (
        [ids(A, 0, 4), ids(A, 4, 6) + [P0] * 2, ids(B, 0, 3) + [P0], ids(C, 0, 4), ids(C, 4, 8),
         ids(C, 8, 9) + [P0] * 3],
        counts(sequences=6, tokens_kept=18, pad_tokens=6, documents_split=2),
    ),
    "informed": (
        # A's overflow (2 tokens < tolerance 3) is dropped; C's (5 tokens) is kept as two sequences
        [ids(A, 0, 4), ids(B, 0, 3) + [P0], ids(C, 0, 4), ids(C, 4, 8), ids(C, 8, 9) + [P0] * 3],
        counts(sequences=5, tokens_kept=16, tokens_dropped=2, pad_tokens=4, documents_truncated=1,
               documents_split=1),
    ),
    "naive-discard": (  # max_len = 3 (B)
        [ids(A, 0, 3), ids(B, 0, 3), ids(C, 0, 3)],
        counts(sequences=3, tokens_kept=9, tokens_dropped=9, documents_truncated=2),
    ),
    "naive-impute": (  # max_len = 3; 18 tokens make exactly 6 windows
        [ids(A, 0, 3), ids(A, 3, 6), ids(B, 0, 3), ids(C, 0, 3), ids(C, 3, 6), ids(C, 6, 9)],
        counts(sequences=6, tokens_kept=18, documents_split=2),
    ),
    "best-fit": (
        # pieces a0-3 a4-5 | b0-2 | c0-3 c4-7 c8, sorted: a0-3 c0-3 c4-7 b0-2 a4-5 c8;
        # c8 fits both [b0-2] (1 free) and [a4-5] (2 free): best fit is the fuller one
        [ids(A, 0, 4), ids(C, 0, 4), ids(C, 4, 8), ids(B, 0, 3) + ids(C, 8, 9), ids(A, 4, 6) + [P0] * 2],
        counts(sequences=5, tokens_kept=18, pad_tokens=2, documents_split=2),
    ),
}
WORKED["pad"] = WORKED["pad+discard"]  # pad with max_len is pad+discard
WORKED["packed-docmask"] = WORKED["best-fit"]


@pytest.mark.parametrize("name", ALL)
def test_worked_example(name):
    expected_inputs, expected_counts = WORKED[name]
    policy = make(name, max_len=4, tolerance=3)
    out = list(policy(DOCS))
    assert [s.input_ids for s in out] == expected_inputs
    for s in out:
        assert s.target_ids == [IGNORE if t == P0 else t + 1 for t in s.input_ids]
    assert policy.counts.as_dict() == expected_counts
    if name in NAIVE:
        assert policy.max_len == 3
    if name == "packed-docmask":
        assert [s.document_ids for s in out] == [[0] * 4, [0] * 4, [0] * 4, [0, 0, 0, 1], [0, 0, 1, 1]]
        assert [s.position_ids for s in out] == [[0, 1, 2, 3]] * 3 + [[0, 1, 2, 0], [0, 1, 0, 1]]
    else:
        assert all(s.document_ids is None and s.position_ids is None for s in out)


def test_pad_without_max_len_keeps_documents_whole_and_the_collator_pads():
    policy = build_policy("pad", pad_id=P0)
    assert [s.input_ids for s in policy(DOCS)] == [ids(A, 0, 6), ids(B, 0, 3), ids(C, 0, 9)]
    assert policy.counts.as_dict() == counts(sequences=3, tokens_kept=18)
    policy = build_policy("pad")
    batches = list(policy.batches(DOCS, batch_size=2))
    assert [b["input_ids"].tolist() for b in batches] == [
        [ids(A, 0, 6), ids(B, 0, 3) + [P0] * 3], [ids(C, 0, 9)]
    ]
    assert batches[0]["target_ids"][1].tolist() == [t + 1 for t in ids(B, 0, 3)] + [IGNORE] * 3
    assert policy.counts.as_dict() == counts(sequences=3, tokens_kept=18, batches=2, pad_tokens=3)


def test_best_fit_buffer_size_limits_the_choice():
    policy = make("best-fit", max_len=4, buffer_size=2)
    # packs of two pieces: (a0-3, a4-5), (b0-2, c0-3), (c4-7, c8)
    assert [s.input_ids for s in policy(DOCS)] == [
        ids(A, 0, 4), ids(A, 4, 6) + [P0] * 2, ids(C, 0, 4), ids(B, 0, 3) + [P0],
        ids(C, 4, 8), ids(C, 8, 9) + [P0] * 3,
    ]
    assert policy.counts.pad_tokens == 6 and policy.counts.tokens_dropped == 0


def test_best_fit_decreasing_helper():
    assert best_fit_decreasing([3, 2, 1, 2], 4) == [[0, 2], [1, 3]]
    assert best_fit_decreasing([2, 2, 2], 4) == [[0, 1], [2]]  # ties: arrival order, oldest bin
    assert best_fit_decreasing([], 4) == []
    with pytest.raises(ValueError, match=r"item 1 has length 5; items must be 1..4"):
        best_fit_decreasing([1, 5], 4)


def test_counts_hold_while_buffering():
    for name, buffer_size in [(n, None) for n in ALL] + [("best-fit", 2), ("packed-docmask", 3)]:
        policy = make(name, max_len=4, tolerance=3, buffer_size=buffer_size)
        if name in NAIVE:
            policy.resolve_max_len(DOCS)
        for ex in DOCS:
            policy.feed(ex)
            c = policy.counts
            assert c.tokens_in == c.tokens_kept + c.tokens_dropped + policy.buffered_tokens, name
        policy.flush()
        assert policy.buffered_tokens == 0
        after = policy.counts.as_dict()
        policy.flush()  # a second flush changes nothing
        assert policy.counts.as_dict() == after
        if buffer_size is None:
            assert after == WORKED[name][1]


def test_pop_returns_queued_sequences_then_none():
    policy = make("pad+impute", max_len=4)
    assert policy.pop() is None
    policy.feed(DOCS[0])
    assert policy.counts.sequences == 2  # counted when queued
    assert policy.pop() == TrainingSequence(ids(A, 0, 4), [t + 1 for t in ids(A, 0, 4)])
    assert policy.pop().input_ids == ids(A, 4, 6) + [P0] * 2
    assert policy.pop() is None


# ---- batches -------------------------------------------------------------------------------


def test_batches_shapes_counts_and_drop_last():
    policy = make("pad+impute", max_len=4)
    out = list(policy.batches(DOCS, batch_size=4))
    assert [b["input_ids"].shape for b in out] == [(4, 4), (2, 4)]
    assert policy.counts.batches == 2 and policy.counts.sequences == 6

    policy = make("pad+impute", max_len=4)
    out = list(policy.batches(DOCS, batch_size=4, drop_last=True))
    assert len(out) == 1
    # the dropped batch held c4-7 and c8+3 pads
    assert policy.counts.as_dict() == counts(
        sequences=4, batches=1, tokens_kept=13, tokens_dropped=5, pad_tokens=3, documents_split=2
    )
    assert policy.counts.tokens_in == policy.counts.tokens_kept + policy.counts.tokens_dropped


def test_batches_with_docmask_and_custom_collator():
    policy = make("packed-docmask", max_len=4)
    batch = next(iter(policy.batches(DOCS, batch_size=5, collator=Collator(pad_id=P0, max_len=6))))
    assert batch["document_ids"].tolist()[3] == [0, 0, 0, 1, 2, 2]
    assert batch["position_ids"].tolist()[4] == [0, 1, 0, 1, 0, 1]
    assert policy.counts.pad_tokens == 2 + 5 * 2  # policy padding + collator padding


def test_batches_rejects_bad_arguments():
    policy = make("pad+impute", max_len=4)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        policy.batches(DOCS, batch_size=0)
    with pytest.raises(TypeError, match="must set last_pad_tokens"):
        list(policy.batches(DOCS, batch_size=2, collator=lambda seqs: {}))


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kwargs, error, match", [
    ("discard", {}, ValueError, r"policy 'discard' needs max_len"),
    ("best-fit", {}, ValueError, r"policy 'best-fit' needs max_len"),
    ("impute", {"max_len": 0}, ValueError, r"max_len must be >= 1, got 0"),
    ("pad", {"max_len": 2.5}, ValueError, r"max_len must be an int"),
    ("informed", {"max_len": 4}, ValueError, r"needs tolerance"),
    ("informed", {"max_len": 4, "tolerance": 0}, ValueError, r"tolerance must be >= 1, got 0"),
    ("best-fit", {"max_len": 4, "buffer_size": 0}, ValueError, r"buffer_size must be >= 1, got 0"),
    ("packed-docmask", {"max_len": 4, "buffer_size": -3}, ValueError, r"buffer_size must be >= 1"),
    ("naive-impute", {"max_len": 4}, ValueError, r"do not pass max_len"),
    ("pad+impute", {"max_len": 4, "tolerance": 2}, TypeError, r"unknown option\(s\): tolerance"),
])
def test_bad_configs(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        build_policy(name, **kwargs)


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown policy 'snake'; known: best-fit, discard, impute"):
        build_policy("snake")


def test_register_policy_refuses_a_second_class_for_a_name():
    class Other(SequencePolicy):
        name = "pad"

    with pytest.raises(ValueError, match=r"'pad' is already registered by PadPolicy"):
        register_policy(Other)
    assert register_policy(POLICIES["pad"]) is POLICIES["pad"]  # re-registering is harmless


@pytest.mark.parametrize("example, match", [
    ({"input_ids": [1, 2], "target_ids": [2]}, r"example 2: input_ids has 2 tokens but target_ids has 1"),
    ({"input_ids": [], "target_ids": []}, r"example 2 is empty"),
    ({"input_ids": [1]}, r"example 2 must be a dict with input_ids and target_ids"),
    ({"input_ids": [1.5], "target_ids": [2]}, r"example 2: input_ids must be a sequence of ints"),
])
def test_bad_examples_are_named_by_index_and_change_nothing(example, match):
    policy = make("impute", max_len=4)
    policy.feed(DOCS[0])
    policy.feed(DOCS[1])
    before = policy.state_dict()
    with pytest.raises(ValueError, match=match):
        policy.feed(example)
    assert policy.state_dict() == before


def test_tensor_examples_are_accepted():
    policy = make("pad+discard", max_len=4)
    policy.feed({"input_ids": torch.tensor([5, 6]), "target_ids": torch.tensor([6, 7])})
    assert policy.pop().input_ids == [5, 6, P0, P0]


def test_naive_policies_need_the_whole_input():
    policy = build_policy("naive-discard")
    assert policy.max_len is None
    with pytest.raises(RuntimeError, match=r"'naive-discard' has no max_len yet"):
        policy.feed(DOCS[0])
    with pytest.raises(ValueError, match="needs at least one example"):
        list(build_policy("naive-impute")([]))
    with pytest.raises(ValueError, match=r"example 1 is empty"):
        list(build_policy("naive-impute")([DOCS[0], {"input_ids": [], "target_ids": []}]))
    policy = build_policy("naive-impute")
    assert len(list(policy.batches(iter(DOCS), batch_size=2))) == 3  # a generator is materialised
    assert policy.max_len == 3
    with pytest.raises(RuntimeError, match=r"max_len=3 is fixed once documents were fed"):
        policy.resolve_max_len([doc(1, 1)])
    # a resolved policy keeps its max_len for later input: shorter documents are dropped
    assert list(policy([doc(4, 2)])) == [] and policy.counts.tokens_dropped == 2


# ---- properties over random inputs --------------------------------------------------------


def expected_kept(name: str, lengths: list[int], L: int, tol: int) -> list[int]:
    """How many leading tokens of each document a policy keeps (kept tokens are a prefix)."""
    if name in PACKING or name == "pad+impute" or L is None:
        return list(lengths)
    if name in ("pad", "pad+discard", "naive-discard"):
        return [min(n, L) for n in lengths]
    if name == "discard":
        return [L if n >= L else 0 for n in lengths]
    if name == "informed":
        return [n if n - L >= tol else min(n, L) for n in lengths]
    # impute: a prefix of the concatenated stream
    left, kept = (sum(lengths) // L) * L, []
    for n in lengths:
        kept.append(min(n, left))
        left -= kept[-1]
    return kept


def check_output(policy, name: str, lengths: list[int], out: list[TrainingSequence], tol: int) -> None:
    L = policy.max_len
    kept_pos: list[list[int]] = [[] for _ in lengths]
    seqs_of: list[set[int]] = [set() for _ in lengths]
    pads = 0
    for si, s in enumerate(out):
        assert len(s.input_ids) == len(s.target_ids)
        if L is not None:
            assert len(s.input_ids) == L  # every policy emits exactly max_len when it has one
        runs: list[list[int]] = []  # [doc, first position, length] per run of one document
        in_pad = False
        for t_in, t_tg in zip(s.input_ids, s.target_ids):
            if t_in == PAD:
                assert t_tg == IGNORE
                pads += 1
                in_pad = True
                continue
            assert not in_pad, "padding only at the end"
            assert t_tg == t_in + 1, "target is the true next token"
            d, p = divmod(t_in, 1000)
            assert 0 <= d < len(lengths) and p < lengths[d]
            kept_pos[d].append(p)
            seqs_of[d].add(si)
            if runs and runs[-1][0] == d and runs[-1][1] + runs[-1][2] == p:
                runs[-1][2] += 1
            else:
                runs.append([d, p, 1])
        assert len({r[0] for r in runs}) == len(runs), "a document appears once per sequence"
        if name == "packed-docmask":
            want_doc, want_pos = [], []
            for k, (_, _, n) in enumerate(runs):
                want_doc += [k] * n
                want_pos += range(n)
            n_pad = len(s.input_ids) - len(want_doc)
            assert s.document_ids == want_doc + [len(runs)] * n_pad
            assert s.position_ids == want_pos + list(range(n_pad))
        else:
            assert s.document_ids is None and s.position_ids is None
    for d, pos in enumerate(kept_pos):
        assert pos == sorted(set(pos)), f"document {d}: kept tokens out of order or repeated"
    kept = expected_kept(name, lengths, L, tol)
    assert [len(p) for p in kept_pos] == kept
    assert all(p == list(range(len(p))) for p in kept_pos)

    c = policy.counts
    assert c.documents == len(lengths) and c.sequences == len(out)
    assert c.tokens_in == sum(lengths) == c.tokens_kept + c.tokens_dropped
    assert c.tokens_kept == sum(kept) and c.pad_tokens == pads
    assert c.documents_truncated == sum(k < n for k, n in zip(kept, lengths))
    assert c.documents_split == sum(len(s) > 1 for s in seqs_of)
    if name in PACKING:
        assert c.tokens_dropped == 0
        assert c.documents_split == sum(n > L for n in lengths)
    if name in NAIVE:
        assert L == min(lengths)


lengths_st = st.lists(st.integers(1, 60), min_size=1, max_size=12)
settings_ = settings(max_examples=60, deadline=None)


@pytest.mark.parametrize("name", ALL)
@settings_
@given(lengths=lengths_st, max_len=st.integers(1, 40), tol_frac=st.floats(0, 1), buffer_size=st.integers(1, 8))
def test_properties(name, lengths, max_len, tol_frac, buffer_size):
    tol = 1 + int(tol_frac * (2 * max_len - 1))  # tolerance may exceed max_len
    policy = make(name, max_len=max_len, tolerance=tol, buffer_size=buffer_size, pad_id=PAD, ignore_index=IGNORE)
    docs = [doc(d, n) for d, n in enumerate(lengths)]
    check_output(policy, name, lengths, list(policy(docs)), tol)


@settings_
@given(lengths=lengths_st)
def test_pad_without_max_len_properties(lengths):
    policy = build_policy("pad", pad_id=PAD)
    check_output(policy, "pad", lengths, list(policy([doc(d, n) for d, n in enumerate(lengths)])), 1)


def reference_best_fit(lengths: list[int], L: int, buffer_size: int) -> list[list[int]]:
    """Straightforward best-fit decreasing, written independently of data.packing."""
    pieces = [(d, s, min(s + L, n)) for d, n in enumerate(lengths) for s in range(0, n, L)]
    out = []
    for g in range(0, len(pieces), buffer_size):
        group = sorted(pieces[g : g + buffer_size], key=lambda p: p[1] - p[2])  # stable, longest first
        bins: list[list[tuple]] = []
        for p in group:
            n = p[2] - p[1]
            fits = [b for b in bins if L - sum(q[2] - q[1] for q in b) >= n]
            if fits:
                min(fits, key=lambda b: L - sum(q[2] - q[1] for q in b)).append(p)  # min: first of ties
            else:
                bins.append([p])
        for b in bins:
            seq = [t for d, s, e in b for t in ids(d, s, e)]
            out.append(seq + [PAD] * (L - len(seq)))
    return out


@pytest.mark.parametrize("name", sorted(PACKING))
@settings_
@given(lengths=lengths_st, max_len=st.integers(1, 40), buffer_size=st.integers(1, 30))
def test_packing_matches_a_reference(name, lengths, max_len, buffer_size):
    policy = make(name, max_len=max_len, buffer_size=buffer_size, pad_id=PAD)
    out = [s.input_ids for s in policy(doc(d, n) for d, n in enumerate(lengths))]
    assert out == reference_best_fit(lengths, max_len, buffer_size)


# ---- state ---------------------------------------------------------------------------------


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", ALL)
@settings_
@given(lengths=lengths_st, max_len=st.integers(1, 40), buffer_size=st.integers(1, 8),
       cut=st.floats(0, 1), pop_first=st.booleans())
def test_state_dict_resumes_exactly(name, lengths, max_len, buffer_size, cut, pop_first):
    tol = max(1, max_len // 2)
    kw = dict(max_len=max_len, tolerance=tol, buffer_size=buffer_size, pad_id=PAD)
    docs = [doc(d, n) for d, n in enumerate(lengths)]
    whole = make(name, **kw)
    want = list(whole(docs))

    k = int(cut * len(docs))
    first = make(name, **kw)
    if name in NAIVE:
        first.resolve_max_len(docs)
    for ex in docs[:k]:
        first.feed(ex)
    got = []
    while pop_first and (s := first.pop()) is not None:
        got.append(s)
    state = first.state_dict()
    # feeding the source after the save must not leak into the saved state (no aliasing)
    first.feed(docs[k]) if k < len(docs) else first.flush()
    second = make(name, **kw)
    second.load_state_dict(roundtrip(state))
    got += list(second(docs[k:]))
    assert got == want
    assert second.counts == whole.counts
    assert second.max_len == whole.max_len


@pytest.mark.parametrize("name", ["impute", "packed-docmask", "naive-discard"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_resume_exactly_between_batches(name, drop_last):
    kw = dict(max_len=3, tolerance=1, buffer_size=2, pad_id=PAD)
    docs = [doc(d, n) for d, n in enumerate([5, 1, 7, 2, 9, 4, 3])]
    whole = make(name, **kw)
    want = [b["input_ids"].tolist() for b in whole.batches(docs, 3, drop_last=drop_last)]

    first = make(name, **kw)
    it = first.batches(docs, 3, drop_last=drop_last)
    got = [next(it)["input_ids"].tolist(), next(it)["input_ids"].tolist()]
    state = roundtrip(first.state_dict())
    second = make(name, **kw)
    second.load_state_dict(state)
    rest = docs[second.counts.documents :]
    got += [b["input_ids"].tolist() for b in second.batches(rest, 3, drop_last=drop_last)]
    assert got == want and second.counts == whole.counts


def test_load_state_dict_rejects_another_policy_or_settings():
    state = make("informed", max_len=4, tolerance=2).state_dict()
    with pytest.raises(ValueError, match=r"state is for policy 'informed', not 'pad\+impute'"):
        make("pad+impute", max_len=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"state has tolerance=2 but this 'informed' policy has tolerance=3"):
        make("informed", max_len=4, tolerance=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"state has max_len=4 but .* has max_len=5"):
        make("informed", max_len=5, tolerance=2).load_state_dict(state)


def test_state_is_plain_data():
    policy = make("packed-docmask", max_len=4, buffer_size=100)
    policy.feed(DOCS[0])
    policy.feed(DOCS[1])
    state = policy.state_dict()

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or type(x) in (int, str)

    assert plain(state)
    assert state["buffer"]["pieces"][0][0] == ids(A, 0, 4)
    assert set(state["counts"]) == set(PolicyCounts().as_dict())
