"""Smoke test of the benchmark script: it runs, and writes well-formed results. Timings are
not asserted (speed is measured by the script, never by tests)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_model_throughput_quick_run_writes_results(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "model_throughput.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (json_path,) = tmp_path.glob("*.json")
    (csv_path,) = tmp_path.glob("*.csv")
    data = json.loads(json_path.read_text())
    meta = data["metadata"]
    assert meta["torch"] and meta["device_name"] and meta["date"]
    rows = data["results"]
    phases = {(r["phase"], r["attn_backend"]) for r in rows}
    assert phases == {(p, b) for p in ("train", "prefill", "decode") for b in ("eager", "sdpa")}
    for r in rows:
        assert r["error"] is None
        assert r["tokens_per_s"] > 0 and r["median_ms"] >= r["min_ms"] > 0
    train = [r for r in rows if r["phase"] == "train"]
    # a fresh model predicts uniformly: loss ~ ln(vocab) for the debug preset (vocab 512)
    assert all(abs(r["loss"] - math.log(512)) < 0.2 for r in train)
    # the trainer's step: its two host reads plus the model's range checks of tokens and targets
    assert all(r["host_syncs"] == 4 for r in train)
    lines = [line for line in csv_path.read_text().splitlines() if not line.startswith("#")]
    assert len(list(csv.DictReader(lines))) == len(rows)
    if "matplotlib" in sys.modules or __import__("importlib").util.find_spec("matplotlib"):
        assert list(tmp_path.glob("*.png")), "plot not written"


def test_loader_bench_tiny_shard_writes_results(tmp_path):
    """bench/loader.py on a 40-document shard with a 400-piece tokenizer: one row per stage,
    positive figures, targets judged, JSON/CSV (and PNG with matplotlib) written."""
    from conftest import synthetic_corpus
    from shards import write_shard

    from llama_mini.data.policies import POLICIES
    from llama_mini.data.tokenizer import train_tokenizer

    docs = synthetic_corpus(40, seed=5)
    shard = write_shard(tmp_path / "tiny.jsonl.zst", [{"text": t, "meta": {"pile_set_name": "S"}} for t in docs])
    # 256 byte pieces + 3 specials + every distinct character (~50 here) must fit
    train_tokenizer(docs, str(tmp_path / "tok"), vocab_size=400)
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "loader.py"), "--shard", shard,
           "--tokenizer", str(tmp_path / "tok.model"), "--repeats", "1", "--max-len", "16", "--tolerance", "4",
           "--out", str(out), "--name", "tiny"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((out / "tiny.json").read_text())
    meta, rows = data["metadata"], data["results"]
    assert meta["date"] and meta["device_name"] and meta["zstandard"] and meta["sentencepiece"]
    assert meta["pinning"]["torch_threads"] == 1 and meta["docs"] == 40
    if hasattr(os, "sched_setaffinity"):
        assert meta["pinning"]["affinity_after"] == [meta["pinning"]["core"]]
    stages = [r["stage"] for r in rows]
    policies = [r["policy"] for r in rows if r["kind"] == "policy"]
    assert stages[:4] == ["limit: zstd", "limit: sentencepiece", "reader", "reader+tokenizer"]
    assert sorted(policies) == sorted(POLICIES) and len(rows) == 4 + len(POLICIES)
    for r in rows:
        assert r["error"] is None, r
        assert r["docs"] == 40 and r["median_s"] > 0 and r["docs_per_s"] > 0 and r["pct_of_limit"] > 0
        if r["stage"] != "limit: sentencepiece":
            assert r["decompressed_mb_per_s"] > 0
        if r["stage"] not in ("limit: zstd", "reader"):
            assert r["tokens_per_s"] > 0 and r["text_mb_per_s"] > 0
        if r["kind"] == "policy":
            assert r["sequences"] > 0 and r["sequences_per_s"] > 0
            assert r["overhead_pct"] is not None and r["alone_median_s"] > 0
            assert r["result"] in ("PASS", "MISS")
    (rt,) = [r for r in rows if r["stage"] == "reader+tokenizer"]
    assert rt["result"] in ("PASS", "MISS")
    lines = [line for line in (out / "tiny.csv").read_text().splitlines() if not line.startswith("#")]
    assert [r["stage"] for r in csv.DictReader(lines)] == stages
    assert "reader+tokenizer" in proc.stdout and "% of limit" in proc.stdout
    if __import__("importlib").util.find_spec("matplotlib"):
        assert (out / "tiny.png").exists(), "plot not written"


def test_attn_used_sees_per_device_and_per_input_fallbacks(monkeypatch):
    """A row names the backend that really ran: triton falls back per device (``triton@cpu``) or
    per input (``triton@cuda/float32/D=256``), and either must turn the row into sdpa."""
    import torch

    from llama_mini import attention

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import model_throughput as mt
    from common import is_oom, parse_overrides

    monkeypatch.setattr(attention, "_FALLBACKS", {})
    cuda = torch.device("cuda")
    assert mt.attn_used("triton", cuda) == "triton"
    attention._FALLBACKS[("triton", "cuda/float32/D=256")] = "head dim 256 > 128"
    assert mt.attn_used("triton", cuda) == "sdpa (fallback: head dim 256 > 128)"
    assert mt.attn_used("triton", torch.device("cpu")) == "triton"
    attention._FALLBACKS[("triton", "cpu")] = "no GPU"
    assert mt.attn_used("triton", torch.device("cpu")) == "sdpa (fallback: no GPU)"
    assert parse_overrides(["dim=256", "norm_impl=torch", "x=1.5"]) == {"dim": 256, "norm_impl": "torch", "x": 1.5}
    with __import__("pytest").raises(ValueError, match="FIELD=VALUE, got 'dim'"):
        parse_overrides(["dim"])
    assert is_oom(RuntimeError("CUDA out of memory")) and not is_oom(RuntimeError("shape mismatch"))
