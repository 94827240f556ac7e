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
    lines = [line for line in csv_path.read_text().splitlines() if not line.startswith("#")]
    assert len(list(csv.DictReader(lines))) == len(rows)
    if "matplotlib" in sys.modules or __import__("importlib").util.find_spec("matplotlib"):
        assert list(tmp_path.glob("*.png")), "plot not written"
