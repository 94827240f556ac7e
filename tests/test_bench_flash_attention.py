"""bench/flash_attention.py: a tiny CPU sweep writes well-formed results (timings are not asserted:
speed is measured by the script, never by tests), checks every provider against the reference,
skips the Triton provider visibly where there is no GPU, and counts FLOPs with the standard
formulas; sweep options not given take CPU-sized defaults on a CPU."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "flash_attention.py")
TOKENS, HEADS, HEAD_DIM = 96, 2, 16


@pytest.fixture(scope="module")
def fa():
    """The script as a module (it imports bench/common.py)."""
    bench = os.path.join(ROOT, "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    spec = importlib.util.spec_from_file_location("bench_flash_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_sweep_writes_results(tmp_path):
    env = dict(os.environ)
    # Without the interpreter nothing could run Triton here: the triton rows must say so, not time it.
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, SCRIPT, "--device", "cpu", "--seqlens", "32,48", "--tokens", str(TOKENS),
           "--heads", str(HEADS), "--head-dims", str(HEAD_DIM), "--dtypes", "float32",
           "--providers", "triton,sdpa,eager", "--modes", "fwd,fwd+bwd", "--causal", "both",
           "--warmup", "1", "--repeats", "2", "--out", str(tmp_path), "--name", "tiny"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "no GPU" in proc.stdout and "CPU-sized defaults" not in proc.stdout  # every sweep option was given
    data = json.loads((tmp_path / "tiny.json").read_text())
    meta, rows = data["metadata"], data["results"]
    assert meta["device_type"] == "cpu" and meta["device_name"] and meta["date"]
    assert meta["torch"] and meta["python"] and "triton" in meta and meta["timing"]["method"] == "wall"

    by_key = {}
    for r in rows:
        key = (r["provider"], r["seqlen"], r["mode"], r["causal"])
        assert key not in by_key, key
        by_key[key] = r
    assert len(rows) == 3 * 2 * 2 * 2  # providers x seqlens x modes x causal
    for n in (32, 48):
        for mode in ("fwd", "fwd+bwd"):
            for causal in (True, False):
                for provider in ("sdpa", "eager"):
                    r = by_key[(provider, n, mode, causal)]
                    assert r["status"] == "ok", r
                    assert r["batch"] == TOKENS // n and (r["heads"], r["kv_heads"], r["head_dim"]) == (2, 2, 16)
                    assert r["tflops"] > 0 and r["median_ms"] >= r["min_ms"] > 0 and r["n_timed"] == 2
                    assert r["err_bound"] == 1e-4 and 0 <= r["max_abs_err"] < 1e-4
                    assert r["peak_mem_mib"] is None and "not measured" in r["peak_mem_note"]
                    assert r["pct_of_peak"] is None  # no datasheet peak for a CPU
                sdpa, eager = by_key[("sdpa", n, mode, causal)], by_key[("eager", n, mode, causal)]
                assert sdpa["vs_sdpa"] is None and sdpa["backend"]
                assert eager["vs_sdpa"] == pytest.approx(sdpa["median_ms"] / eager["median_ms"])
                triton = by_key[("triton", n, mode, causal)]
                assert triton["status"] == "skipped" and "GPU" in triton["reason"] and triton["tflops"] is None

    # FLOPs by hand: forward 4*B*H*N^2*D, halved when causal; fwd+bwd 3.5x the forward
    assert by_key[("sdpa", 32, "fwd", True)]["flops"] == 4 * 3 * 2 * 32 * 32 * 16 / 2
    assert by_key[("eager", 48, "fwd", False)]["flops"] == 4 * 2 * 2 * 48 * 48 * 16
    assert by_key[("eager", 32, "fwd+bwd", True)]["flops"] == 3.5 * 4 * 3 * 2 * 32 * 32 * 16 / 2
    r = by_key[("sdpa", 48, "fwd+bwd", False)]
    assert r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12)

    lines = (tmp_path / "tiny.csv").read_text().splitlines()
    assert lines[0].startswith("# date:") and any(line.startswith("# device_name:") for line in lines)
    table = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert len(table) == len(rows) and {"provider", "vs_sdpa", "max_abs_err", "status"} <= set(table[0])
    assert "vs sdpa" in proc.stdout and "TFLOP/s" in proc.stdout and "tiny.json" in proc.stdout
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "tiny.png").stat().st_size > 0, "plot not written"


def test_sweep_defaults_depend_on_the_device(fa):
    cpu = fa.parse_args(["--device", "cpu"])
    assert (cpu.seqlens, cpu.tokens, cpu.heads, cpu.head_dims) == ([128, 256, 512], 1024, [4], [64])
    assert cpu.dtypes == ["float32"] and cpu.providers == ["sdpa", "eager"] and cpu.causal == [True, False]
    assert set(cpu.cpu_defaults) == {"seqlens", "tokens", "heads", "head_dims", "dtypes", "providers"}
    given = fa.parse_args(["--device", "cpu", "--seqlens", "64", "--dtypes", "bf16,fp16", "--causal", "true"])
    assert given.seqlens == [64] and given.dtypes == ["bfloat16", "float16"] and given.causal == [True]
    assert "seqlens" not in given.cpu_defaults and given.providers == ["sdpa", "eager"]
    gpu = fa.parse_args(["--device", "cuda"])  # parsing needs no GPU
    assert gpu.seqlens == [512, 1024, 2048, 4096, 8192, 16384] and gpu.tokens == 16384
    assert (gpu.heads, gpu.head_dims, gpu.kv_heads) == ([16, 32], [64, 128], [None])
    assert gpu.dtypes == ["bfloat16", "float16"] and gpu.providers == ["triton", "sdpa", "eager", "compile"]
    assert gpu.modes == ["fwd", "bwd", "fwd+bwd"] and gpu.cpu_defaults == []
    with pytest.raises(SystemExit):
        fa.parse_args(["--device", "cpu", "--providers", "cudnn"])


def test_flop_formulas(fa):
    fwd = 4 * 2 * 3 * 64 * 64 * 32
    assert fa.attention_flops("fwd", 2, 3, 64, 32, False) == fwd
    assert fa.attention_flops("fwd", 2, 3, 64, 32, True) == fwd // 2
    assert fa.attention_flops("bwd", 2, 3, 64, 32, False) == 2.5 * fwd
    assert fa.attention_flops("fwd+bwd", 2, 3, 64, 32, True) == 3.5 * fwd / 2


def test_oom_and_impossible_rows_are_recorded_and_the_sweep_goes_on(fa, monkeypatch):
    """In-process, on CPU: an out-of-memory error in one mode is that row's status (with the reason)
    and the other modes still run; kv heads that do not divide the heads give skipped rows."""
    import torch

    args = fa.parse_args(["--device", "cpu", "--seqlens", "16", "--tokens", "16", "--heads", "2", "--head-dims", "8",
                          "--dtypes", "fp32", "--providers", "triton,sdpa,eager", "--causal", "true"])
    timer = fa.Timer(args.device, "wall", warmup=0, repeats=1)
    real_build, real_time = fa.build_provider, fa.time_mode

    def tagged_build(provider, *rest):
        fn, backend = real_build(provider, *rest)
        tagged = lambda q, k, v: fn(q, k, v)  # noqa: E731
        tagged.provider = provider
        return tagged, backend

    def eager_bwd_runs_out_of_memory(fn, q, k, v, mode, *rest):
        if mode == "bwd" and fn.provider == "eager":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return real_time(fn, q, k, v, mode, *rest)

    monkeypatch.setattr(fa, "build_provider", tagged_build)
    monkeypatch.setattr(fa, "time_mode", eager_bwd_runs_out_of_memory)
    cfg = dict(dtype="float32", batch=1, seqlen=16, heads=2, kv_heads=2, head_dim=8, causal=True, tokens=16)
    by = {(r["provider"], r["mode"]): r for r in fa.run_config(args, timer, cfg, {})}
    assert len(by) == 3 * 3
    oom = by[("eager", "bwd")]
    assert oom["status"] == "oom" and "out of memory" in oom["reason"] and oom["tflops"] is None
    assert oom["flops"] == 2.5 * 4 * 1 * 2 * 16 * 16 * 8 / 2 and oom["max_abs_err"] is not None
    for mode in ("fwd", "fwd+bwd"):
        assert by[("eager", mode)]["status"] == "ok" and by[("eager", mode)]["vs_sdpa"] > 0
    assert all(by[("sdpa", m)]["status"] == "ok" for m in ("fwd", "bwd", "fwd+bwd"))
    assert all(by[("triton", m)]["status"] == "skipped" for m in ("fwd", "bwd", "fwd+bwd"))

    def eager_check_runs_out_of_memory(provider, *rest):  # the correctness check is the first call
        if provider == "eager":
            raise RuntimeError("CUDA error: out of memory")
        return tagged_build(provider, *rest)

    monkeypatch.setattr(fa, "build_provider", eager_check_runs_out_of_memory)
    by = {(r["provider"], r["mode"]): r for r in fa.run_config(args, timer, cfg, {})}
    assert all(by[("eager", m)]["status"] == "oom" and by[("eager", m)]["reason"] for m in ("fwd", "bwd", "fwd+bwd"))
    assert all(by[("sdpa", m)]["status"] == "ok" for m in ("fwd", "bwd", "fwd+bwd"))

    rows = fa.run_config(args, timer, dict(cfg, kv_heads=3), {})
    assert len(rows) == 9 and all(r["status"] == "skipped" and "divide" in r["reason"] for r in rows)
