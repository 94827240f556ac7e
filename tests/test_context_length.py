"""bench/context_length.py: the quick run writes its report, JSON, CSV and figures; the cost rows
cover every backend x checkpointing x length (triton skipped on CPU with its reason, never timed
under its name); the quality rows cover model A x {none, linear:F, ntk:F} and model B x none at
both lengths, with F = long / short, ppl = exp(loss), and both models trained on the same tokens;
the report's statements name the argmax/argmin of its own table; bad --seq-lens exits naming it.
Timings are never asserted."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import math
import os
import re
import sys

import pytest

from llama_mini.checkpoint import read_args
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "context_length.py")
SHORT, LONG = 64, 256


@pytest.fixture(scope="module")
def ctx():
    bench = os.path.join(ROOT, "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    spec = importlib.util.spec_from_file_location("context_length", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(ctx, train_data, tmp_path_factory):
    """One --quick run on the synthetic corpus (vocab 400), one thread, restored afterwards."""
    out = tmp_path_factory.mktemp("context_length")
    threads = torch.get_num_threads()
    try:
        rc = ctx.main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(out), "--seq-lens",
                       f"{SHORT},{LONG}", "--data", train_data.train, "--val-data", train_data.val,
                       "--tokenizer", train_data.tokenizer, "--train-docs", "300"])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((out / "results.json").read_text())
    return rc, out, data["metadata"], data["results"]


def test_outputs_exist_and_parse(run):
    rc, out, meta, rows = run
    assert rc == 0
    for name in ("report.md", "results.json", "results.csv", "cost.png", "perplexity.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(line for line in f if not line.startswith("#")))
    assert len(table) == len(rows) and {r["part"] for r in table} == {"cost", "quality"}
    report = (out / "report.md").read_text()
    assert "## What the numbers say" in report and "cost.png" in report and "perplexity.png" in report
    assert meta["seq_lens"] == [SHORT, LONG] and meta["config"]["model"]["n_params"] > 0
    for f in meta["findings"]:
        assert f in report


def test_cost_rows_cover_the_grid(run):
    _, _, meta, rows = run
    cost = [r for r in rows if r["part"] == "cost"]
    keys = [(r["backend"], r["checkpointing"], r["seq_len"]) for r in cost]
    assert sorted(keys) == sorted(itertools.product(("eager", "sdpa", "triton"), ("off", "on"), (SHORT, LONG)))
    for r in cost:
        if r["backend"] == "triton":  # CPU: skipped with the reason, no number under its name
            assert r["status"] == "skipped" and "CUDA" in r["reason"], r
            assert r["tokens_per_s"] is None and r["ms_per_step"] is None and r["max_batch"] is None
            continue
        assert r["status"] == "ok" and r["attn_used"] == r["backend"], r
        assert r["ms_per_step"] > 0 and math.isclose(r["tokens_per_s"], r["batch_size"] * r["seq_len"] /
                                                      (r["ms_per_step"] / 1e3), rel_tol=1e-9)
        assert r["peak_mem_mib"] is None and "not measured" in r["peak_mem_note"]
        assert r["max_batch_how"] == "estimated" and r["max_batch"] >= 1 and r["per_sample_mib"] > 0
        assert "estimate" in r["max_batch_method"]


def test_quality_rows_and_training(run):
    _, out, meta, rows = run
    quality = [r for r in rows if r["part"] == "quality"]
    factor = LONG / SHORT
    assert meta["rope_factor"] == factor == 4
    want = {("A", SHORT, L, s) for L in (SHORT, LONG) for s in ("none", "linear:4", "ntk:4")}
    want |= {("B", LONG, L, "none") for L in (SHORT, LONG)}
    got = [(r["model"], r["trained_at"], r["evaluated_at"], r["rope_scaling"]) for r in quality]
    assert sorted(got) == sorted(want)
    for r in quality:
        assert math.isfinite(r["loss"]) and r["tokens"] > 0
        assert math.isclose(r["ppl"], math.exp(r["loss"]), rel_tol=1e-9)
        assert r["rope_factor"] == (1.0 if r["rope_scaling"] == "none" else factor)
    a, b = meta["training"]
    assert (a["model"], a["trained_at"], b["model"], b["trained_at"]) == ("A", SHORT, "B", LONG)
    for t in (a, b):
        assert t["tokens_seen"] == sum(t["step_tokens"]) >= meta["config"]["token_budget"]
        assert all(n == meta["config"]["tokens_per_step"] for n in t["step_tokens"])  # full windows only
        ckpt = out / "checkpoints" / f"{t['model']}_T{t['trained_at']}"
        assert (ckpt / "params.json").is_file() and (ckpt / "tokenizer.model").is_file()
        assert read_args(ckpt).max_seq_len == t["trained_at"]  # the context the evaluation calls "trained"
    assert a["tokens_seen"] == b["tokens_seen"] and a["steps"] == b["steps"]
    u = meta["unigram"]  # the context-free reference: a real distribution over the vocabulary
    assert 1 < u["ppl"] <= meta["config"]["vocab_size"] and math.isclose(u["ppl"], math.exp(u["loss"]))
    assert u["train_tokens"] == meta["config"]["token_budget"] and u["tokens"] > 0


def test_findings_follow_the_tables(run):
    _, _, meta, rows = run
    text = "\n".join(meta["findings"])
    for T in (SHORT, LONG):
        ok = [r for r in rows if r["part"] == "cost" and r["status"] == "ok" and r["seq_len"] == T
              and r["checkpointing"] == "off"]
        best = max(ok, key=lambda r: r["tokens_per_s"])["backend"]
        assert f"At T={T} (checkpointing off) the fastest backend is **{best}**" in text
    a_long = [r for r in rows if r["part"] == "quality" and r["model"] == "A" and r["evaluated_at"] == LONG]
    best = min(a_long, key=lambda r: r["ppl"])["rope_scaling"]
    m = re.search(rf"Model A at {LONG}, ranked by ppl: (\S+) ", text)
    assert m and m.group(1) == best
    assert "triton has no numbers in any configuration" in text


@pytest.mark.parametrize("value", ["512", "2048,512", "512,512", "512,abc", "1.5,3"])
def test_bad_seq_lens_exit_naming_the_option(ctx, capsys, value):
    with pytest.raises(SystemExit) as e:
        ctx.parse_args(["--seq-lens", value])
    assert e.value.code == 2 and "--seq-lens" in capsys.readouterr().err


def test_tokens_per_step_must_divide(ctx, capsys):
    with pytest.raises(SystemExit):
        ctx.parse_args(["--seq-lens", "64,96", "--tokens-per-step", "128"])
    assert "--tokens-per-step" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--backends", "sdpa,flash"], "--backends"),
    (["--override", "max_seq_len=64"], "--override max_seq_len"),
    (["--override", "attn_backend=eager"], "--override attn_backend"),
])
def test_options_the_study_owns_are_refused(ctx, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        ctx.parse_args(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_capped_largest_batches_are_not_compared():
    import types
    rows = []
    for ckpt, mb, capped in (("off", 256, True), ("on", 256, True)):
        rows.append(dict(backend="sdpa", checkpointing=ckpt, seq_len=64, status="ok", tokens_per_s=100.0,
                         ms_per_step=10.0, max_batch=mb, max_batch_capped=capped, reason=None))
    ctx_mod = __import__("context_length")
    said = " ".join(ctx_mod.cost_findings(rows, [64], types.SimpleNamespace(type="cuda")))
    assert "multiplies the largest batch" not in said and "largest batch is" not in said
    rows[0].update(max_batch=64, max_batch_capped=False)
    rows[1].update(max_batch=128, max_batch_capped=False)
    said = " ".join(ctx_mod.cost_findings(rows, [64], types.SimpleNamespace(type="cuda")))
    assert "by 2.00x" in said
