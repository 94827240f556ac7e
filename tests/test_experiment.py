"""bench/experiment.py, the shared part of the experiment scripts: the training loop records what
it trained on exactly (losses, counted tokens, stopping rule, evaluation points), is seeded, and
learns; fixed inputs come in file order; the report folder is well formed."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

from llama_mini import ModelArgs
from shards import write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import experiment as ex  # noqa: E402

VOCAB = 50


def tiny_args(**kw) -> ModelArgs:
    base = dict(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, multiple_of=16, max_seq_len=32)
    return ModelArgs.preset("debug", **{**base, **kw})


def examples(n: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (5 + 3 * i,), generator=g).tolist()
        out.append({"input_ids": [1] + ids, "target_ids": ids + [2]})
    return out


def padded_batches() -> list[dict]:
    batches, _ = ex.batches_of(examples(), "pad+discard", 12, 3, pad_id=0)
    return batches


def counted(batch: dict) -> int:
    return int((batch["target_ids"] != -100).sum())


def test_fit_stops_at_the_token_budget_and_counts_exactly():
    batches = padded_batches()
    budget = counted(batches[0]) + counted(batches[1]) + 1  # the third step crosses it
    res = ex.fit(ex.build_model(tiny_args(), 0, "cpu"), batches, ex.FitConfig(), token_budget=budget)
    assert res.stopped == "budget" and len(res.steps) == 3
    assert [s["tokens"] for s in res.steps] == [counted(b) for b in batches[:3]]
    assert [s["positions"] for s in res.steps] == [b["input_ids"].numel() for b in batches[:3]]
    assert res.tokens_seen == sum(counted(b) for b in batches[:3]) >= budget
    assert res.steps[-2]["tokens_seen"] < budget
    assert counted(batches[0]) < res.steps[0]["positions"]  # padding is in positions, not tokens


def test_fit_stops_by_steps_or_when_the_data_ends():
    batches = padded_batches()
    by_steps = ex.fit(ex.build_model(tiny_args(), 0, "cpu"), batches, ex.FitConfig(), max_steps=2)
    assert by_steps.stopped == "steps" and len(by_steps.steps) == 2
    by_data = ex.fit(ex.build_model(tiny_args(), 0, "cpu"), batches, ex.FitConfig(), token_budget=10**9)
    assert by_data.stopped == "data" and len(by_data.steps) == len(batches)
    with pytest.raises(ValueError, match="max_steps or token_budget"):
        ex.fit(ex.build_model(tiny_args(), 0, "cpu"), batches, ex.FitConfig())
    with pytest.raises(ValueError, match="total_steps"):
        ex.fit(ex.build_model(tiny_args(), 0, "cpu"), batches, ex.FitConfig(decay="cosine"), token_budget=100)


def test_recorded_loss_is_the_batch_loss_before_its_step_and_training_is_seeded():
    batches = padded_batches()
    fresh = ex.build_model(tiny_args(), 7, "cpu")
    with torch.no_grad():
        first = float(fresh(batches[0]["input_ids"], batches[0]["target_ids"]))
    a = ex.fit(ex.build_model(tiny_args(), 7, "cpu"), batches, ex.FitConfig(seed=7), max_steps=4)
    b = ex.fit(ex.build_model(tiny_args(), 7, "cpu"), batches, ex.FitConfig(seed=7), max_steps=4)
    c = ex.fit(ex.build_model(tiny_args(), 8, "cpu"), batches, ex.FitConfig(seed=8), max_steps=4)
    assert a.steps[0]["loss"] == pytest.approx(first, rel=1e-6)
    assert [s["loss"] for s in a.steps] == [s["loss"] for s in b.steps]
    assert [s["loss"] for s in a.steps] != [s["loss"] for s in c.steps]


def test_fit_learns_and_follows_the_warmup():
    batch = padded_batches()[0]
    cfg = ex.FitConfig(lr=1e-2, warmup_steps=4)
    res = ex.fit(ex.build_model(tiny_args(), 0, "cpu"), [batch] * 30, cfg, max_steps=30)
    assert [s["lr"] for s in res.steps[:5]] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2])
    assert res.steps[-1]["loss"] < res.steps[0]["loss"] - 1.0  # memorising one batch
    cos = ex.fit(ex.build_model(tiny_args(), 0, "cpu"), [batch] * 10,
                 ex.FitConfig(lr=1e-2, warmup_steps=0, decay="cosine", min_lr_ratio=0.1), max_steps=10)
    assert cos.steps[0]["lr"] == pytest.approx(1e-2) and cos.steps[-1]["lr"] < 2e-3


def test_evaluations_bracket_each_point_and_val_at_interpolates():
    batches = padded_batches()
    val = batches[-2:]
    points = [20, 45]
    res = ex.fit(ex.build_model(tiny_args(), 0, "cpu"), batches, ex.FitConfig(), token_budget=80,
                 val_batches=val, eval_at_tokens=points)
    seen = {s["step"]: s["tokens_seen"] for s in res.steps}
    seen[0] = 0
    assert res.evals[0]["step"] == 0 and res.evals[-1]["step"] == len(res.steps)
    steps = [e["step"] for e in res.evals]
    assert steps == sorted(set(steps))  # one evaluation per step at most
    for t in points:
        crossing = next(s["step"] for s in res.steps if s["tokens_seen"] >= t)
        assert {crossing - 1, crossing} <= set(steps)  # just before and just after the crossing step
        lo, hi = (next(e for e in res.evals if e["step"] == k) for k in (crossing - 1, crossing))
        w = (t - lo["tokens_seen"]) / (hi["tokens_seen"] - lo["tokens_seen"])
        assert res.val_at(t) == pytest.approx(lo["val_loss"] + w * (hi["val_loss"] - lo["val_loss"]), rel=1e-12)
        assert min(lo["val_loss"], hi["val_loss"]) <= res.val_at(t) <= max(lo["val_loss"], hi["val_loss"])
    assert res.val_at(0) == res.evals[0]["val_loss"] and res.val_at(10**9) is None
    for e in res.evals:  # each evaluation is the weighted validation loss of the model at that step
        assert math.isfinite(e["val_loss"]) and e["tokens_seen"] == seen[e["step"]]
    model = ex.build_model(tiny_args(), 0, "cpu")
    from llama_mini.training.evaluate import evaluate_loss
    assert res.evals[0]["val_loss"] == pytest.approx(evaluate_loss(model, val)["loss"], rel=1e-6)


def test_fit_passes_document_masks_and_positions_to_the_model():
    batches, _ = ex.batches_of(examples(), "packed-docmask", 24, 2, pad_id=0, buffer_size=4)
    b = next(b for b in batches if int(b["document_ids"].max()) > 0)  # a row holding two documents
    fresh = ex.build_model(tiny_args(), 3, "cpu")
    with torch.no_grad():
        masked = float(fresh(b["input_ids"], b["target_ids"], document_ids=b["document_ids"],
                             position_ids=b["position_ids"]))
        plain = float(fresh(b["input_ids"], b["target_ids"]))
    res = ex.fit(ex.build_model(tiny_args(), 3, "cpu"), [b], ex.FitConfig(), max_steps=1)
    assert res.steps[0]["loss"] == pytest.approx(masked, rel=1e-6) and masked != pytest.approx(plain, rel=1e-6)


def test_budget_equal_to_the_tokens_of_two_batches_stops_after_two():
    batches = padded_batches()
    budget = counted(batches[0]) + counted(batches[1])
    res = ex.fit(ex.build_model(tiny_args(), 0, "cpu"), batches, ex.FitConfig(), token_budget=budget)
    assert len(res.steps) == 2 and res.tokens_seen == budget


def test_fit_steps_like_a_hand_written_adamw_loop_with_clipping():
    """Two steps of fit equal a plain loop: zero_grad, backward, clip, AdamW at the scheduled lr."""
    batches = padded_batches()[:2]
    cfg = ex.FitConfig(lr=1e-2, warmup_steps=2, grad_clip=0.05)
    model = ex.build_model(tiny_args(), 0, "cpu")
    ex.fit(model, batches, cfg, max_steps=2)
    ref = ex.build_model(tiny_args(), 0, "cpu")
    from llama_mini.training.optim import build_optimizer
    opt = build_optimizer(ref, lr=1e-2, weight_decay=cfg.weight_decay)
    for i, b in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = 1e-2 * (i + 1) / 2
        opt.zero_grad(set_to_none=True)
        ref(b["input_ids"], b["target_ids"]).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_eval_batches_are_full():
    val = ex.eval_batches(examples(), 8, 3, 100, pad_id=0)
    assert val and all(b["input_ids"].shape == (3, 8) and counted(b) == 24 for b in val)
    with pytest.raises(ValueError, match="fewer than 3000 tokens"):
        ex.eval_batches(examples(), 1000, 3, 1, pad_id=0)


def test_mean_loss_is_token_weighted():
    res = ex.FitResult(steps=[{"loss": 1.0, "tokens": 1}, {"loss": 4.0, "tokens": 3}])
    assert res.mean_loss() == pytest.approx((1.0 * 1 + 4.0 * 3) / 4)
    assert res.mean_loss(1) == 1.0 and res.mean_loss(last=1) == 4.0
    steps = [{"loss": float(i), "tokens": i + 1} for i in range(25)]  # the last 10%: steps 23 and 24
    assert ex.FitResult(steps=steps).final_train_loss() == pytest.approx((23 * 24 + 24 * 25) / (24 + 25))
    assert ex.FitResult().mean_loss() is None


def test_first_documents_reads_in_file_order_and_names_a_short_source(tmp_path, trained_tokenizer):
    docs = [{"text": f"document number {i} " + "word " * i} for i in range(5)]
    path = write_shard(tmp_path / "s.jsonl.zst", docs)
    tok = trained_tokenizer
    got = ex.first_documents(path, 3, tok)
    assert [g["input_ids"] for g in got] == [[tok.bos_id] + tok.encode(d["text"]) for d in docs[:3]]
    assert all(g["target_ids"] == g["input_ids"][1:] + [tok.eos_id] for g in got)
    with pytest.raises(ValueError, match=r"s\.jsonl\.zst.*first 6 documents.*only 5"):
        ex.first_documents(path, 6, tok)
    some = ex.read_documents(path, tok, need_tokens=len(got[0]["input_ids"]) + 1)
    assert [g["input_ids"] for g in some] == [g["input_ids"] for g in got[:2]]  # just enough documents


def test_batches_of_returns_the_policy_with_consistent_counts():
    batches, pol = ex.batches_of(examples(), "naive-impute", None, 4, pad_id=0)
    assert pol.max_len == min(len(e["input_ids"]) for e in examples())
    assert sum(counted(b) for b in batches) == pol.counts.tokens_kept
    assert pol.counts.tokens_kept + pol.counts.tokens_dropped == pol.counts.tokens_in
    batches, pol = ex.batches_of(examples(), "informed", 8, 4, pad_id=0, tolerance=3)
    assert pol.tolerance == 3 and sum(counted(b) for b in batches) == pol.counts.tokens_kept


def test_markdown_table_and_report(tmp_path):
    t = ex.markdown_table(["a", "b"], [["x", 1], ["y", None]])
    assert t.splitlines() == ["| a | b |", "| --- | ---: |", "| x | 1 |", "| y | - |"]
    rep = ex.Report(tmp_path / "out", "Title", torch.device("cpu"), {"k": 1})
    rep.add("## Section\n\ntext")
    rep.figure("f.png", "A figure", lambda p: ex.plot_curves(p, {"panel": {"c": ([1, 2], [3, 4])}},
                                                              xlabel="x", ylabel="y"))
    path = rep.write([{"a": 1, "b": None}], ["a", "b"], extra={"curves": {"c": [1]}})
    md = path.read_text()
    assert md.startswith("# Title\n") and "## Section" in md and "![A figure](f.png)" in md
    assert (tmp_path / "out" / "f.png").stat().st_size > 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["results"] == [{"a": 1, "b": None}] and data["metadata"]["config"] == {"k": 1}
    assert data["metadata"]["curves"] == {"c": [1]} and data["metadata"]["torch"] == torch.__version__
    lines = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert [ln for ln in lines if not ln.startswith("#")] == ["a,b", "1,"]
