"""Tests of llama_mini.training.evaluate: token-weighted loss, perplexity at lengths, the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from llama_mini import ModelArgs, Transformer, save_meta_checkpoint
from llama_mini.training.evaluate import (
    evaluate_loss,
    main,
    parse_rope_scaling,
    perplexity_at_lengths,
)

from conftest import make_model, synthetic_corpus
from shards import write_shard

V = 97  # tiny_args' vocabulary


def _batch(seed: int, B: int, T: int, n_ignored: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    flat = targets.view(-1)
    flat[torch.randperm(B * T, generator=g)[:n_ignored]] = -100
    return {"input_ids": inputs, "target_ids": targets}


def _reference_loss(model, batches) -> float:
    """Float64 cross-entropy over every counted token of every batch, pooled."""
    logits, targets = [], []
    with torch.no_grad():
        for b in batches:
            logits.append(model(b["input_ids"]).double().reshape(-1, V))
            targets.append(b["target_ids"].reshape(-1))
    return F.cross_entropy(torch.cat(logits), torch.cat(targets), ignore_index=-100, reduction="mean").item()


@pytest.fixture
def model_and_batches():
    model = make_model(seed=1)
    # very different counted-token numbers: a mean of batch means would be far from the pooled mean
    batches = [_batch(0, 2, 16, n_ignored=28), _batch(1, 3, 16, n_ignored=0)]
    return model, batches


def test_evaluate_loss_is_token_weighted(model_and_batches):
    model, batches = model_and_batches
    model.train()
    got = evaluate_loss(model, batches)
    ref = _reference_loss(model, batches)
    assert got["tokens"] == (32 - 28) + 48
    assert got["batches"] == 2
    assert got["loss"] == pytest.approx(ref, rel=1e-6)
    assert got["ppl"] == pytest.approx(math.exp(ref), rel=1e-6)
    # the two batch means differ enough that a mean of means would fail the check above
    means = [_reference_loss(model, [b]) for b in batches]
    assert abs(sum(means) / 2 - ref) > 1e-3
    assert model.training  # restored


def test_evaluate_loss_restores_eval_mode_and_on_error(model_and_batches):
    model, batches = model_and_batches
    model.eval()
    evaluate_loss(model, batches)
    assert not model.training
    model.train()
    bad = [{"input_ids": torch.full((1, 4), V + 5), "target_ids": torch.zeros(1, 4, dtype=torch.long)}]
    with pytest.raises(ValueError):
        evaluate_loss(model, bad)
    assert model.training


def test_evaluate_loss_max_batches_and_ignore_index(model_and_batches):
    model, batches = model_and_batches
    pulled = []

    def stream():
        for b in batches + [_batch(2, 1, 16, 0)]:
            pulled.append(1)
            yield b

    got = evaluate_loss(model, stream(), max_batches=1)
    assert got["batches"] == 1 and got["tokens"] == 4 and len(pulled) == 1
    assert got["loss"] == pytest.approx(_reference_loss(model, batches[:1]), rel=1e-6)
    # another ignore index is mapped onto the model's
    other = [{"input_ids": b["input_ids"], "target_ids": torch.where(b["target_ids"] == -100, -1, b["target_ids"])}
             for b in batches]
    assert evaluate_loss(model, other, ignore_index=-1)["loss"] == pytest.approx(evaluate_loss(model, batches)["loss"])


def test_evaluate_loss_all_reduce(model_and_batches):
    model, batches = model_and_batches
    seen = []

    def fake_all_reduce(t):  # two ranks that saw the same data
        seen.append(t.clone())
        t.mul_(2)

    plain = evaluate_loss(model, batches)
    reduced = evaluate_loss(model, batches, all_reduce=fake_all_reduce)
    assert len(seen) == 1 and seen[0].dtype == torch.float64 and seen[0].shape == (2,)
    assert seen[0][1].item() == plain["tokens"]
    assert seen[0][0].item() == pytest.approx(plain["loss"] * plain["tokens"], rel=1e-12)
    assert reduced["loss"] == pytest.approx(plain["loss"], rel=1e-12)
    assert reduced["tokens"] == 2 * plain["tokens"]


def test_evaluate_loss_passes_position_and_document_ids():
    model = make_model(seed=2)
    b = _batch(3, 2, 8, 0)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2)
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]] * 2)
    got = evaluate_loss(model, [dict(b, position_ids=pos, document_ids=doc)])
    with torch.no_grad():
        ref = model(b["input_ids"], b["target_ids"], position_ids=pos, document_ids=doc).item()
    assert got["loss"] == pytest.approx(ref, rel=1e-6)
    assert got["loss"] != pytest.approx(evaluate_loss(model, [b])["loss"], rel=1e-6)


def test_evaluate_loss_zero_tokens_raises(model_and_batches):
    model, _ = model_and_batches
    empty = [{"input_ids": torch.zeros(2, 4, dtype=torch.long), "target_ids": torch.full((2, 4), -100)}]
    with pytest.raises(ValueError, match="no target token"):
        evaluate_loss(model, empty)
    with pytest.raises(ValueError, match="no target token"):
        evaluate_loss(model, [])


def test_parse_rope_scaling():
    assert parse_rope_scaling("none", 32).type == "none"
    s = parse_rope_scaling("linear:4", 32)
    assert (s.type, s.factor) == ("linear", 4.0)
    assert parse_rope_scaling("ntk:2.5", 32).factor == 2.5
    s = parse_rope_scaling("llama3:8", 128)
    assert (s.type, s.factor, s.original_max_seq_len) == ("llama3", 8.0, 128)
    for bad in ("linear", "linear:", "linear:x", "linear:0.5", "yarn:2", "ntk:inf", ""):
        with pytest.raises(ValueError, match="allowed forms"):
            parse_rope_scaling(bad, 32)


# ---------------------------------------------------------------------- perplexity at lengths
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, trained_tokenizer):
    """A checkpoint (max_seq_len 32) with its tokenizer, and a small val corpus."""
    root = tmp_path_factory.mktemp("eval")
    val = root / "val"
    val.mkdir()
    docs = synthetic_corpus(n_docs=60, seed=3)
    write_shard(val / "00.jsonl.zst", [{"text": t, "meta": {"pile_set_name": "S"}} for t in docs[:30]])
    write_shard(val / "01.jsonl.zst", [{"text": t, "meta": {"pile_set_name": "S"}} for t in docs[30:]])
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=trained_tokenizer.vocab_size,
                     multiple_of=16, max_seq_len=32)
    ckpt = root / "ckpt"
    save_meta_checkpoint(Transformer(args), ckpt)
    shutil.copy(trained_tokenizer.model_path, ckpt / "tokenizer.model")
    return {"ckpt": str(ckpt), "val": str(val), "root": root}


def test_perplexity_at_lengths(tiny_run, capsys):
    from llama_mini.data.pipeline import DataPipeline
    from llama_mini.data.tokenizer import Tokenizer
    from llama_mini import load_meta_checkpoint

    rows = perplexity_at_lengths(tiny_run["ckpt"], tiny_run["val"], context_lengths=[16, 64],
                                 rope_scalings=["none", "linear:2"], batch_size=2, max_tokens=100)
    assert [(r["context"], r["rope_scaling"]) for r in rows] == [(16, "none"), (64, "none"), (16, "linear:2"),
                                                                 (64, "linear:2")]
    for r in rows:
        assert r["trained_context"] == 32 and math.isfinite(r["ppl"]) and r["ppl"] > 1
        # ceil(100 / (L * 2)) batches of 2 full windows, all targets counted
        assert r["tokens"] == math.ceil(100 / (r["context"] * 2)) * 2 * r["context"]
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
    assert rows[0]["loss"] != pytest.approx(rows[2]["loss"])  # the scaling changed something
    assert "context" in capsys.readouterr().err

    # the same number computed directly, with the model loaded at its own max_seq_len
    tok = Tokenizer(os.path.join(tiny_run["ckpt"], "tokenizer.model"))
    pipe = DataPipeline.build(tiny_run["val"], tok, policy="impute", max_len=16, batch_size=2)
    model = load_meta_checkpoint(tiny_run["ckpt"])
    direct = evaluate_loss(model, pipe, max_batches=math.ceil(100 / 32))
    assert rows[0]["tokens"] == direct["tokens"]
    assert rows[0]["ppl"] == pytest.approx(math.exp(direct["loss"]), rel=1e-5)


def test_perplexity_latest_and_errors(tiny_run, tmp_path):
    run = tmp_path / "run"
    (run / "step-00000100").mkdir(parents=True)
    for name in os.listdir(tiny_run["ckpt"]):
        shutil.copy(os.path.join(tiny_run["ckpt"], name), run / "step-00000100" / name)
    (run / "latest").write_text("step-00000100\n")
    via_latest = perplexity_at_lengths(str(run), tiny_run["val"], context_lengths=[16], max_tokens=64,
                                       progress=False)
    direct = perplexity_at_lengths(tiny_run["ckpt"], tiny_run["val"], context_lengths=[16], max_tokens=64,
                                   progress=False)
    assert via_latest[0]["loss"] == direct[0]["loss"]

    with pytest.raises(ValueError, match="allowed forms"):
        perplexity_at_lengths(tiny_run["ckpt"], tiny_run["val"], context_lengths=[16], rope_scalings=["bogus:2"])
    with pytest.raises(ValueError, match=r"context length 100000: the evaluation data has only \d+ tokens"):
        perplexity_at_lengths(tiny_run["ckpt"], tiny_run["val"], context_lengths=[100000], progress=False)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("consolidated.00.pth", "params.json", "llama_mini.json"):
        shutil.copy(os.path.join(tiny_run["ckpt"], name), bare / name)
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        perplexity_at_lengths(str(bare), tiny_run["val"], context_lengths=[16])


def test_cli(tiny_run, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    rc = main(["--checkpoint", tiny_run["ckpt"], "--data", tiny_run["val"], "--context", "16", "64",
               "--rope-scaling", "none", "ntk:2", "--batch-size", "2", "--max-tokens", "64", "--device", "cpu",
               "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "rope scaling" in printed and "64*" in printed  # beyond the trained 32
    report = json.loads(out.read_text())
    assert len(report["rows"]) == 4 and report["torch"] == torch.__version__
    assert {"checkpoint", "date", "device"} <= set(report)
    assert all(math.isfinite(r["ppl"]) for r in report["rows"])

    rc = main(["--checkpoint", str(tmp_path / "nope"), "--data", tiny_run["val"]])
    assert rc == 1  # an expected failure: one line naming the path, no traceback
    err = capsys.readouterr().err
    assert err.startswith("llama-mini evaluate: error: ") and "nope" in err and err.count("\n") == 1, err

    assert main(["--help"]) == 0
    assert "--rope-scaling" in capsys.readouterr().out
