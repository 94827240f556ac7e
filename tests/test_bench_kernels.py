"""The fused-op microbenchmarks (bench/rms_norm.py, rotary.py, swiglu.py, cross_entropy.py,
linear_cross_entropy.py) and their harness bench/op_bench.py.

Each script runs in-process at tiny sizes on the CPU with every provider it names, the Triton
kernels under the interpreter (conftest sets TRITON_INTERPRET=1), into a temporary --out; the
test checks the rows (every provider x mode present, correctness flags true, figures derived
from the byte formulas, skipped rows carrying a reason) and the JSON/CSV/PNG files. Speed is
never asserted: the scripts measure it. One subprocess run without the interpreter checks that
the triton rows are skipped with the reason; the byte formulas, the targets' verdicts, failed
and out-of-memory rows are checked without timing anything.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from llama_mini import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
SCRIPTS = ("rms_norm", "rotary", "swiglu", "cross_entropy", "linear_cross_entropy")
needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason=kernels.triton_unavailable_reason())


@pytest.fixture(scope="module")
def bench():
    """The five scripts as modules, plus the harness (they import bench/op_bench.py and common.py)."""
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    mods = {}
    for name in SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    import op_bench

    mods["op_bench"] = op_bench
    return mods


def run_main(mod, tmp_path, capsys, *argv):
    """mod.main at the CPU with one timed call per row; (exit status, stdout, metadata, rows)."""
    rc = mod.main(["--device", "cpu", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path), "--name", "t",
                   *argv])
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "t.json").read_text())
    return rc, out, data["metadata"], data["results"]


RETAIN = "retain_graph"  # ours hands its forward-computed gradients to one backward: no bwd-only timing
SAME = "same' setup"  # fp32 master weights in a float32 run


# name: (argv, rows = providers x modes x cases x dtypes, row -> expected skip-reason fragment or None)
RUNS = {
    "rms_norm": (["--sizes", "5x40", "--variants", "rms,add", "--providers", "triton,eager"], 2 * 3 * 2,
                 lambda r: None),
    "rotary": (["--sizes", "2x3", "--heads", "4", "--kv-heads", "2", "--head-dims", "8",
                "--providers", "triton,eager"], 2 * 3, lambda r: None),
    # torch.compile on a CPU costs seconds per graph: only the cheapest op exercises it
    "swiglu": (["--sizes", "3x40", "--providers", "triton,eager,compile"], 3 * 3, lambda r: None),
    "cross_entropy": (["--sizes", "5x70", "--ignore-frac", "0.3", "--providers", "triton,eager"], 2 * 3,
                      lambda r: RETAIN if (r["provider"], r["mode"]) == ("triton", "bwd") else None),
    # fp16 with fp32 weights: the fp32-master setup (autocast for eager, mixed dtypes for ours)
    "linear_cross_entropy": (["--tokens", "7", "--hidden", "24", "--vocabs", "40", "--weights", "same,fp32",
                              "--dtypes", "fp32,fp16", "--providers", "triton,eager"], 2 * 3 * 2 * 2,
                             lambda r: SAME if (r["dtype"], r["weights"]) == ("float32", "fp32") else
                             RETAIN if (r["provider"], r["mode"]) == ("triton", "bwd") else None),
}


@needs_triton
@pytest.mark.parametrize("name", SCRIPTS)
def test_tiny_run_with_every_provider_writes_checked_results(bench, name, tmp_path, capsys):
    argv, n_rows, expected_skip = RUNS[name]
    op_mod, ob = bench[name], bench["op_bench"]
    op = op_mod.OP
    rc, out, meta, rows = run_main(op_mod, tmp_path, capsys, *argv)
    assert rc == 0, out
    assert meta["device_type"] == "cpu" and meta["device_name"] and meta["date"] and meta["torch"]
    assert meta["triton"] and meta["timing"]["method"] == "wall" and meta["targets_evaluated"] is False
    key = lambda r: (r["provider"], r["mode"], r["dtype"]) + tuple(r[k] for k in op.case_fields)  # noqa: E731
    assert len(rows) == n_rows and len({key(r) for r in rows}) == n_rows
    providers = set(meta["config"]["providers"])
    assert {r["provider"] for r in rows} == providers and {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}

    by = {key(r): r for r in rows}
    for r in rows:
        assert r["op"] == name and r["dtype"] in meta["config"]["dtypes"]
        expect_skip = expected_skip(r)
        if expect_skip:
            assert r["status"] == "skipped" and expect_skip in r["reason"], r
            assert r["median_ms"] is None and r["gbps"] is None and r["tflops"] is None
            continue
        assert r["status"] == "ok", r
        # correctness before timing: the forward against the float32 reference
        assert r["correct"] is True and 0 <= r["rel_err"] <= r["err_bound"] == ob.ERR_BOUND[r["dtype"]]
        assert r["median_ms"] >= r["min_ms"] > 0 and r["n_timed"] == 1 and r["timer"] == "wall"
        assert r["peak_mem_mib"] is None and "not measured" in r["peak_mem_note"]
        if r["provider"] == "triton":
            assert "interpreter" in r["note"]
        if op.memory_bound:
            assert r["bytes"] == op.bytes_moved(r, ob.DTYPES[r["dtype"]], r["mode"]) > 0
            assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
            assert r["copy_gbps"] > 0 and r["pct_of_copy"] == pytest.approx(100 * r["gbps"] / r["copy_gbps"])
        else:
            assert r["flops"] == op.flops(r, r["mode"]) and r["tflops"] > 0 and r["gbps"] is None
    for k, r in by.items():
        eager = by.get(("eager",) + k[1:])
        if r["provider"] != "eager" and r["status"] == "ok" and eager and eager["status"] == "ok":
            assert r["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / r["median_ms"])
            assert r["time_vs_eager"] == pytest.approx(r["median_ms"] / eager["median_ms"])
        else:
            assert r["speedup_vs_eager"] is None
    if op.memory_bound:  # one copy measurement per case, the one its rows divide by
        assert len(meta["copy_bandwidth"]) == len(meta["config"]["cases"]) * len(meta["config"]["dtypes"])
        assert {c["gbps"] for c in meta["copy_bandwidth"]} == {r["copy_gbps"] for r in rows if r["copy_gbps"]}
    if op.targets:
        assert "GPU targets" in out and all(t.label in out for t in op.targets)
    assert "rel err" in out and "t.json" in out

    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0].startswith("# date:") and any(line.startswith("# device_name:") for line in lines)
    table = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert len(table) == len(rows)
    assert {"provider", "mode", "status", "reason", "rel_err", *op.case_fields} <= set(table[0])
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "t.png").stat().st_size > 0, "plot not written"


def test_without_the_interpreter_triton_rows_are_skipped_with_the_reason(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # nothing could run Triton on CPU tensors now
    cmd = [sys.executable, os.path.join(BENCH, "rms_norm.py"), "--device", "cpu", "--sizes", "4x16", "--variants",
           "rms", "--modes", "fwd,bwd", "--providers", "triton,eager", "--warmup", "0", "--repeats", "1",
           "--out", str(tmp_path), "--name", "s", "--no-plot"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "triton provider skipped" in proc.stdout and "GPU targets" in proc.stdout
    assert "CPU-sized defaults for --dtypes" in proc.stdout  # the only sweep option not given
    data = json.loads((tmp_path / "s.json").read_text())
    rows = {(r["provider"], r["mode"]): r for r in data["results"]}
    assert len(rows) == 4 and not (tmp_path / "s.png").exists()
    for mode in ("fwd", "bwd"):
        assert rows[("triton", mode)]["status"] == "skipped" and "TRITON_INTERPRET" in rows[("triton", mode)]["reason"]
        assert rows[("eager", mode)]["status"] == "ok" and rows[("eager", mode)]["correct"] is True


def test_sweep_defaults_depend_on_the_device(bench):
    rms, lce = bench["rms_norm"].OP, bench["linear_cross_entropy"].OP
    parse = bench["op_bench"].parse_args
    cpu = parse(lce, ["--device", "cpu"])
    assert (cpu.tokens, cpu.hidden, cpu.vocabs, cpu.dtypes) == ("512", "256", "2000,8000", ["float32"])
    assert {c["vocab"] for c in cpu.cases} == {2000, 8000} and cpu.providers == ["triton", "eager", "compile"]
    assert set(cpu.cpu_defaults) == {"tokens", "hidden", "vocabs", "weights", "dtypes", "providers"}
    gpu = parse(lce, ["--device", "cuda"])  # parsing needs no GPU
    assert [(c["tokens"], c["hidden"], c["vocab"], c["weights"]) for c in gpu.cases] == [
        (16384, 4096, v, w) for v in (32000, 128256) for w in ("same", "fp32")]
    assert gpu.dtypes == ["bfloat16"] and gpu.modes == ["fwd", "bwd", "fwd+bwd"] and gpu.cpu_defaults == []
    given = parse(rms, ["--device", "cpu", "--sizes", "3x8,2x16", "--dtypes", "bf16,fp16", "--variants", "add"])
    assert [(c["variant"], c["rows"], c["hidden"]) for c in given.cases] == [("add", 3, 8), ("add", 2, 16)]
    assert given.dtypes == ["bfloat16", "float16"] and "sizes" not in given.cpu_defaults
    for bad in (["--sizes", "3x"], ["--sizes", "0x8"], ["--variants", "layer"], ["--providers", "cudnn"],
                ["--modes", "both"]):
        with pytest.raises(SystemExit):
            parse(rms, ["--device", "cpu", *bad])


def test_byte_and_flop_formulas(bench):
    import torch

    bf16, fp32 = torch.bfloat16, torch.float32
    rms = bench["rms_norm"].OP
    N, C = 16384, 4096
    case = {"variant": "rms", "rows": N, "hidden": C}
    assert rms.bytes_moved(case, bf16, "fwd") == 2 * N * C * 2 + C * 2 + 4 * N
    assert rms.bytes_moved(case, bf16, "bwd") == 3 * N * C * 2 + 2 * C * 2 + 4 * N
    assert rms.bytes_moved(case, fp32, "fwd+bwd") == 5 * N * C * 4 + 3 * C * 4 + 8 * N
    add = dict(case, variant="add")
    assert rms.bytes_moved(add, bf16, "fwd") == 4 * N * C * 2 + C * 2 + 4 * N
    assert rms.bytes_moved(add, bf16, "bwd") == 4 * N * C * 2 + 2 * C * 2 + 4 * N
    rot = {"batch": 2, "seqlen": 10, "heads": 8, "kv_heads": 2, "head_dim": 64}
    one = 2 * 2 * 10 * (8 + 2) * 64 * 2 + 2 * 10 * 32 * 4
    assert bench["rotary"].OP.bytes_moved(rot, bf16, "fwd") == one == bench["rotary"].OP.bytes_moved(rot, bf16, "bwd")
    assert bench["rotary"].OP.bytes_moved(rot, bf16, "fwd+bwd") == 2 * one
    sw = {"rows": 3, "hidden": 7}
    assert [bench["swiglu"].OP.bytes_moved(sw, fp32, m) for m in ("fwd", "bwd", "fwd+bwd")] == [252, 420, 672]
    ce = {"rows": 5, "vocab": 100}
    assert [bench["cross_entropy"].OP.bytes_moved(ce, bf16, m) for m in ("fwd", "bwd", "fwd+bwd")] == [
        1000 + 40, 2000 + 60, 2000 + 40]
    lce = bench["linear_cross_entropy"].OP
    lc = {"tokens": 16384, "hidden": 4096, "vocab": 128256}
    assert lce.bytes_moved(lc, bf16, "fwd") is None
    assert [lce.flops(lc, m) for m in ("fwd", "bwd", "fwd+bwd")] == [
        k * 16384 * 4096 * 128256 for k in (2, 4, 6)]


def _row(ob, op, provider, mode, **values):
    fields = ob.ROW_FIELDS + list(op.case_fields) + ob.RESULT_FIELDS
    return {**{k: None for k in fields}, "provider": provider, "mode": mode, "status": "ok", **values}


def test_derived_figures_and_target_verdicts(bench):
    """derive() on made-up timings: GB/s, % of copy, ratios to eager and the CUDA targets' verdicts."""
    ob, rms, lce = bench["op_bench"], bench["rms_norm"].OP, bench["linear_cross_entropy"].OP
    GB = 10**9
    rows = [_row(ob, rms, "eager", "fwd+bwd", median_ms=4.0, bytes=GB, copy_gbps=1000.0, peak_mem_mib=300.0),
            _row(ob, rms, "triton", "fwd+bwd", median_ms=1.0, bytes=GB, copy_gbps=1000.0, peak_mem_mib=100.0),
            _row(ob, rms, "triton", "fwd", median_ms=1.0, bytes=GB, copy_gbps=1000.0)]
    ob.derive(rms, rows, evaluate_targets=True)
    eager, tri, fwd = rows
    assert tri["gbps"] == pytest.approx(1000.0) and tri["pct_of_copy"] == pytest.approx(100.0)
    assert tri["speedup_vs_eager"] == pytest.approx(4.0) and tri["time_vs_eager"] == pytest.approx(0.25)
    assert tri["mem_vs_eager"] == pytest.approx(1 / 3) and eager["speedup_vs_eager"] is None
    assert tri["target"] == "PASS" and "85" in tri["target_note"] and eager["target"] is None
    assert fwd["target"] is None  # the RMSNorm targets are fwd+bwd targets
    slow = [_row(ob, rms, "eager", "fwd+bwd", median_ms=2.0, bytes=GB, copy_gbps=1000.0),
            _row(ob, rms, "triton", "fwd+bwd", median_ms=1.1, bytes=GB, copy_gbps=1000.0)]
    ob.derive(rms, slow, evaluate_targets=True)
    assert slow[1]["pct_of_copy"] == pytest.approx(100 / 1.1) and slow[1]["target"] == "MISS"  # 1.8x < 3x eager
    cpu = [_row(ob, rms, "eager", "fwd+bwd", median_ms=4.0, bytes=GB), _row(ob, rms, "triton", "fwd+bwd",
                                                                           median_ms=1.0, bytes=GB)]
    ob.derive(rms, cpu, evaluate_targets=False)
    assert cpu[1]["target"] is None and cpu[1]["pct_of_copy"] is None  # no copy measured, no verdict

    big = [_row(ob, lce, "eager", "fwd+bwd", vocab=128256, median_ms=10.0, peak_mem_mib=8000.0, flops=6 * 10**12),
           _row(ob, lce, "triton", "fwd+bwd", vocab=128256, median_ms=9.0, peak_mem_mib=1900.0, flops=6 * 10**12),
           _row(ob, lce, "eager", "fwd+bwd", vocab=32000, median_ms=1.0, peak_mem_mib=800.0),
           _row(ob, lce, "triton", "fwd+bwd", vocab=32000, median_ms=2.0, peak_mem_mib=700.0)]
    ob.derive(lce, big[:2], evaluate_targets=True)
    ob.derive(lce, big[2:], evaluate_targets=True)
    assert big[1]["tflops"] == pytest.approx(6e12 / 9e-3 / 1e12) and big[1]["target"] == "PASS"
    assert big[1]["mem_vs_eager"] == pytest.approx(1900 / 8000)
    assert big[3]["target"] is None  # the linear CE targets are set at V = 128,256 only
    big[1].update(peak_mem_mib=2100.0, mem_vs_eager=None)
    ob.derive(lce, big[:2], evaluate_targets=True)
    assert big[1]["target"] == "MISS" and "mem_vs_eager" in big[1]["target_note"]


def test_wrong_results_fail_and_out_of_memory_is_a_row(bench, tmp_path, capsys, monkeypatch):
    """A provider whose forward misses the reference is 'failed' and never timed (exit status 1);
    an out-of-memory error in one mode is that row's status and the other modes still run."""
    import torch

    sw, ob = bench["swiglu"], bench["op_bench"]
    real_build, real_time = sw.OP.build, ob.time_mode

    def off_by_one_percent(provider, case, args):
        fn = real_build(provider, case, args)
        return (lambda a, b: fn(a, b) * 1.01) if provider == "compile" else fn

    def eager_bwd_oom(fn, inputs, mode, *rest):
        if mode == "bwd":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return real_time(fn, inputs, mode, *rest)

    monkeypatch.setattr(sw.OP, "build", off_by_one_percent)
    monkeypatch.setattr(ob, "time_mode", eager_bwd_oom)
    monkeypatch.setattr(sw, "compiled", lambda fn: fn)  # the wrong rows need no real compile
    rc, out, meta, rows = run_main(sw, tmp_path, capsys, "--sizes", "4x16", "--providers", "eager,compile",
                                   "--no-plot")
    assert rc == 1
    by = {(r["provider"], r["mode"]): r for r in rows}
    for mode in ("fwd", "bwd", "fwd+bwd"):
        bad = by[("compile", mode)]
        assert bad["status"] == "failed" and bad["correct"] is False and "rel_err" in bad["error"]
        assert bad["rel_err"] == pytest.approx(0.01, rel=1e-3) and bad["median_ms"] is None
    assert by[("eager", "bwd")]["status"] == "oom" and "out of memory" in by[("eager", "bwd")]["reason"]
    assert by[("eager", "fwd")]["status"] == by[("eager", "fwd+bwd")]["status"] == "ok"
    assert by[("eager", "fwd")]["median_ms"] > 0 and "failed" in out


def test_a_kernel_module_that_does_not_exist_yet_skips(bench):
    ob = bench["op_bench"]
    with pytest.raises(ob.Skip, match="llama_mini.kernels.no_such_op does not exist"):
        ob.load_kernel("llama_mini.kernels.no_such_op", "fn")
    assert ob._failure(ob.Skip("why"))["status"] == "skipped"
