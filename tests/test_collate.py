"""Collators (data/collate.py): shapes, padding values, document/position ids, errors."""

from __future__ import annotations

import pytest
import torch

from llama_mini.data.collate import COLLATORS, Collator, DocMaskCollator, build_collator
from llama_mini.data.policies import TrainingSequence

PAD, IGNORE = 7, -100


def seq(inputs, doc=None, pos=None):
    """A sequence whose targets are its inputs + 1, so every target is recognisable."""
    return TrainingSequence(list(inputs), [t + 1 for t in inputs], doc, pos)


def test_pads_to_longest_with_pad_id_and_ignore_index():
    c = Collator(pad_id=PAD, ignore_index=IGNORE)
    batch = c([seq([10, 11, 12]), seq([20]), seq([30, 31])])
    assert set(batch) == {"input_ids", "target_ids"}
    assert batch["input_ids"].dtype == batch["target_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[10, 11, 12], [20, PAD, PAD], [30, 31, PAD]]
    assert batch["target_ids"].tolist() == [[11, 12, 13], [21, IGNORE, IGNORE], [31, 32, IGNORE]]
    assert c.last_pad_tokens == 3


def test_defaults_are_pad_0_and_ignore_minus_100():
    batch = Collator()([seq([5, 6]), seq([8])])
    assert batch["input_ids"].tolist() == [[5, 6], [8, 0]]
    assert batch["target_ids"].tolist() == [[6, 7], [9, -100]]


def test_max_len_fixes_width_and_rejects_longer_sequences():
    c = Collator(pad_id=PAD, max_len=4)
    batch = c([seq([1, 2]), seq([3])])
    assert batch["input_ids"].shape == (2, 4)
    assert batch["input_ids"].tolist() == [[1, 2, PAD, PAD], [3, PAD, PAD, PAD]]
    assert c.last_pad_tokens == 5
    with pytest.raises(ValueError, match=r"sequence 1 has 5 tokens, more than the collator's max_len=4"):
        c([seq([1]), seq([1, 2, 3, 4, 5])])


def test_pad_to_multiple_of_rounds_the_width_up():
    c = Collator(pad_to_multiple_of=4)
    assert c([seq([1, 2, 3, 4, 5])])["input_ids"].shape == (1, 8)
    assert c.last_pad_tokens == 3
    assert c([seq([1, 2, 3, 4])])["input_ids"].shape == (1, 4)  # already a multiple: no change
    assert c.last_pad_tokens == 0
    # applied after max_len, so the width can exceed max_len
    assert Collator(max_len=5, pad_to_multiple_of=4)([seq([1])])["input_ids"].shape == (1, 8)


def test_document_and_position_ids_get_a_fresh_document_per_row():
    c = Collator(pad_id=PAD)
    a = seq([1, 2, 3, 4], doc=[0, 0, 1, 1], pos=[0, 1, 0, 1])
    b = seq([5, 6], doc=[0, 1], pos=[0, 0])
    batch = c([a, b])
    assert batch["document_ids"].tolist() == [[0, 0, 1, 1], [0, 1, 2, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 0, 0, 1]]
    assert batch["document_ids"].dtype == batch["position_ids"].dtype == torch.long
    assert c.last_pad_tokens == 2


def test_docmask_padding_is_a_new_document_even_after_policy_padding():
    # the policy already padded with id 2; the collator's padding must not merge into a real piece
    a = seq([1, 2, PAD], doc=[0, 1, 2], pos=[0, 0, 0])
    batch = Collator(pad_id=PAD, max_len=5)([a])
    assert batch["document_ids"].tolist() == [[0, 1, 2, 3, 3]]
    assert batch["position_ids"].tolist() == [[0, 0, 0, 0, 1]]


def test_mixing_sequences_with_and_without_document_ids_is_an_error():
    with pytest.raises(ValueError, match=r"sequence 1 has no document_ids but others in the batch do"):
        Collator()([seq([1], doc=[0], pos=[0]), seq([2])])
    with pytest.raises(ValueError, match=r"sequence 0 has only one of document_ids/position_ids"):
        Collator()([seq([1], doc=[0], pos=None)])
    with pytest.raises(ValueError, match=r"sequence 0: document_ids \(1\) and position_ids \(2\)"):
        Collator()([seq([1], doc=[0], pos=[0, 1])])


def test_bad_sequences_are_named_by_index():
    with pytest.raises(ValueError, match="empty batch"):
        Collator()([])
    with pytest.raises(ValueError, match=r"sequence 1: input_ids has 2 tokens but target_ids has 1"):
        Collator()([seq([1]), TrainingSequence([1, 2], [2])])
    with pytest.raises(ValueError, match=r"sequence 0 is empty"):
        Collator()([TrainingSequence([], [])])
    with pytest.raises(ValueError, match=r"sequence 0 has no input_ids/target_ids"):
        Collator()([{"input_ids": [1]}])


def test_mappings_are_accepted_like_sequences():
    batch = Collator()([{"input_ids": [1, 2], "target_ids": [2, 3]}, {"input_ids": [4], "target_ids": [5]}])
    assert batch["input_ids"].tolist() == [[1, 2], [4, 0]]
    assert "document_ids" not in batch


@pytest.mark.parametrize("kwargs, match", [
    ({"max_len": 0}, "max_len must be a positive int"),
    ({"pad_to_multiple_of": 0}, "pad_to_multiple_of must be a positive int"),
    ({"max_len": 2.0}, "max_len must be a positive int"),
])
def test_bad_collator_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Collator(**kwargs)


def test_build_collator_by_name():
    assert set(COLLATORS) == {"default", "docmask"}
    c = build_collator("default", pad_id=3, max_len=8)
    assert type(c) is Collator and (c.pad_id, c.max_len) == (3, 8)
    d = build_collator("docmask", pad_id=3)
    assert isinstance(d, DocMaskCollator)
    batch = d([seq([1, 2], doc=[0, 1], pos=[0, 0]), seq([3], doc=[0], pos=[0])])
    assert batch["document_ids"].tolist() == [[0, 1], [0, 1]]
    with pytest.raises(ValueError, match=r"needs document_ids and position_ids.*sequence 0 has none"):
        d([seq([1, 2])])
    with pytest.raises(ValueError, match=r"unknown collator 'bogus'; known: default, docmask"):
        build_collator("bogus")
