"""DataPipeline: reader -> tokenizer -> policy -> collator, its counts, and exact resume at every batch."""

from __future__ import annotations

import io

import pytest
import torch

from llama_mini.kernels.common import is_interpreting

from conftest import synthetic_corpus, tiny_args
from llama_mini.data.pipeline import DataPipeline
from shards import write_shard

POLICY_SETTINGS = [
    ("pad", {"max_len": None}),
    ("discard", {"max_len": 12}),
    ("impute", {"max_len": 16}),
    ("pad+discard", {"max_len": 16}),
    ("pad+impute", {"max_len": 16}),
    ("informed", {"max_len": 16, "policy_options": {"tolerance": 5}}),
    ("best-fit", {"max_len": 32, "policy_options": {"buffer_size": 7}}),
    ("packed-docmask", {"max_len": 32, "policy_options": {"buffer_size": 7}}),
    ("naive-discard", {"max_len": None}),
    ("naive-impute", {"max_len": None}),
]


@pytest.fixture
def shards(tmp_path):
    docs = synthetic_corpus(40, seed=3)
    write_shard(tmp_path / "00.jsonl.zst", [{"text": d} for d in docs[:25]])
    write_shard(tmp_path / "01.jsonl.zst", [{"text": d} for d in docs[25:]])
    return str(tmp_path)


def _build(shards, tok, name, settings, **extra):
    return DataPipeline.build(shards, tok, policy=name, batch_size=3, shuffle=True, shuffle_buffer=5, seed=1,
                              **settings, **extra)


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name, settings", POLICY_SETTINGS, ids=[p for p, _ in POLICY_SETTINGS])
def test_batches_counts_and_exact_resume(shards, trained_tokenizer, name, settings):
    tok = trained_tokenizer
    pipe = _build(shards, tok, name, settings)
    full = list(pipe)
    assert full
    counts = pipe.counts()
    c = counts["policy"]
    assert counts["reader"]["documents"] == counts["tokenized"]["documents"] == c["documents"] == 40
    assert c["tokens_in"] == counts["tokenized"]["tokens"] == c["tokens_kept"] + c["tokens_dropped"]
    assert c["batches"] == len(full)
    # only pad positions carry the ignore index as target; real ones carry a token id
    assert c["pad_tokens"] == sum(int((b["target_ids"] == -100).sum()) for b in full)
    assert c["tokens_kept"] == sum(int((b["target_ids"] != -100).sum()) for b in full)
    assert all(bool((b["input_ids"][b["target_ids"] == -100] == tok.pad_id).all()) for b in full)
    for b in full:
        assert b["input_ids"].shape == b["target_ids"].shape and b["input_ids"].dtype == torch.long
        assert b["input_ids"].shape[0] <= 3
        if settings["max_len"] is not None:
            assert b["input_ids"].shape[1] <= settings["max_len"]
    if name == "packed-docmask":
        assert {"document_ids", "position_ids"} <= set(full[0])
    if name.startswith("naive"):  # max_len is the shortest document, found without reading ahead
        assert pipe.policy.max_len == min(len(tok.encode(d)) + 1 for d in synthetic_corpus(40, seed=3))
        assert all(b["input_ids"].shape[1] == pipe.policy.max_len for b in full)

    for k in range(len(full) + 1):
        pipe = _build(shards, tok, name, settings)
        it = iter(pipe)
        first = [next(it) for _ in range(k)]
        state = _roundtrip(pipe.state_dict())
        resumed = _build(shards, tok, name, settings)
        resumed.load_state_dict(state)
        rest = list(resumed)
        got = first + rest
        assert len(got) == len(full), f"resume after {k} batches"
        for a, b in zip(got, full):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), f"resume after {k} batches: {key} differs"
        assert resumed.counts() == counts


def test_packed_docmask_batches_run_through_the_model(shards, trained_tokenizer):
    """The batch keys are what Transformer.forward takes, and confining attention to each piece
    with restarted positions equals running each piece alone."""
    from llama_mini import Transformer

    tok = trained_tokenizer
    torch.manual_seed(0)
    model = Transformer(tiny_args(vocab_size=tok.vocab_size, max_seq_len=32)).eval()
    pipe = DataPipeline.build(shards, tok, policy="packed-docmask", max_len=32, batch_size=2,
                              policy_options={"buffer_size": 8})
    def pieces_in(b, r):
        return set(b["document_ids"][r][b["target_ids"][r] != -100].tolist())

    batch, row = next((b, r) for b in pipe for r in range(b["input_ids"].shape[0]) if len(pieces_in(b, r)) >= 2)
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])
    docs = batch["document_ids"][row]
    for piece in sorted(pieces_in(batch, row)):
        where = (docs == piece).nonzero().flatten()
        start, end = int(where[0]), int(where[-1]) + 1
        assert batch["position_ids"][row, start:end].tolist() == list(range(end - start))
        with torch.no_grad():
            alone = model(batch["input_ids"][row:row + 1, start:end])
        torch.testing.assert_close(logits[row, start:end], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not is_interpreting(), reason="the model runs on CPU: needs TRITON_INTERPRET=1")
def test_packed_docmask_batches_give_the_same_loss_and_gradients_on_every_attention_backend(
    shards, trained_tokenizer, monkeypatch
):
    """A real packed-docmask batch through the model: eager and sdpa build the block-diagonal
    causal mask, triton skips and masks tiles in the kernel; losses and every parameter's
    gradient agree (fp32; tolerances as in test_model's backend comparison)."""
    from llama_mini import Transformer
    from llama_mini.kernels import custom_ops

    kernel_calls = []  # the triton backend calls the kernel through its custom op
    real = custom_ops.flash_attention
    monkeypatch.setattr(custom_ops, "flash_attention", lambda *a, **kw: kernel_calls.append(kw) or real(*a, **kw))
    tok = trained_tokenizer
    pipe = DataPipeline.build(shards, tok, policy="packed-docmask", max_len=32, batch_size=2,
                              policy_options={"buffer_size": 8})
    batch = next(b for b in pipe if len(set(b["document_ids"][0].tolist())) >= 3)
    results = {}
    for backend in ("eager", "sdpa", "triton"):
        torch.manual_seed(0)
        model = Transformer(tiny_args(vocab_size=tok.vocab_size, max_seq_len=32, attn_backend=backend))
        loss = model(batch["input_ids"], targets=batch["target_ids"], position_ids=batch["position_ids"],
                     document_ids=batch["document_ids"])
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    # the kernel itself ran, once per layer, with the batch's document ids
    assert len(kernel_calls) == 2 and all(kw["document_ids"] is batch["document_ids"] for kw in kernel_calls)
    ref_loss, ref_grads = results["eager"]
    for backend in ("sdpa", "triton"):
        loss, grads = results[backend]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=backend)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"{backend} {name}")


def test_resume_needs_a_reader_with_state(trained_tokenizer):
    from llama_mini.data.policies import build_policy

    pipe = DataPipeline(synthetic_corpus(8), trained_tokenizer, build_policy("pad+impute", max_len=16), 2)
    next(iter(pipe))
    fresh = DataPipeline(synthetic_corpus(8), trained_tokenizer, build_policy("pad+impute", max_len=16), 2)
    with pytest.raises(ValueError, match="source without state_dict.*cannot be restored"):
        fresh.load_state_dict(pipe.state_dict())


def test_build_passes_reader_options(shards, trained_tokenizer):
    pipe = DataPipeline.build(shards, trained_tokenizer, policy="pad", max_len=None, batch_size=4, max_documents=6)
    assert sum(b["input_ids"].shape[0] for b in pipe) == 6
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        DataPipeline.build(shards, trained_tokenizer, batch_size=0)


def test_command_line_selects_a_policy_by_name(shards, trained_tokenizer):
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "llama_mini", "data", "--source", shards, "--tokenizer", trained_tokenizer.model_path,
           "--policy", "informed", "--max-len", "16", "--tolerance", "20", "--batch-size", "4", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout)
    expected = DataPipeline.build(shards, trained_tokenizer, policy="informed", max_len=16, batch_size=4,
                                  policy_options={"tolerance": 20})
    list(expected)
    assert counts == expected.counts()
    assert counts["policy"]["tokens_dropped"] > 0  # tolerance 20 > max_len: short overflows dropped
    bad = subprocess.run(cmd[:-1] + ["--policy", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr and bad.stderr.count("\n") == 1


def test_command_line_naive_policy_needs_no_max_len(shards, trained_tokenizer, capsys):
    import json

    from llama_mini.cli import main

    assert main(["data", "--source", shards, "--tokenizer", trained_tokenizer.model_path, "--policy", "naive-impute", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["policy"]["documents"] == 40 and counts["policy"]["sequences"] > 0
