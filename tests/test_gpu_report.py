"""bench/gpu_report.py: the dry run exercises every part on a CPU and writes the report files
without fairscale or zstandard (the GPU machine has neither); the budget skips what does not fit
and says so; the Markdown section renders and replaces itself in place; the document-masked
attention case counts FLOPs and masks like the reference. Timings are never asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
SCRIPT = os.path.join(BENCH, "gpu_report.py")

# Installed as sitecustomize in the report's processes: an import of either raises, as on the GPU machine.
BLOCKER = textwrap.dedent('''
    import sys

    class _Absent:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("fairscale", "zstandard"):
                raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU machine)", name=name)
            return None

    sys.meta_path.insert(0, _Absent())
''')


def _load(name: str):
    """A bench script as the module it is when bench/ is on sys.path (as the report imports it)."""
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def report():
    return _load("gpu_report")


@pytest.fixture(scope="module")
def parts():
    return _load("gpu_parts")


def _run(tmp_path, *args, blocker=True):
    env = dict(os.environ)
    if blocker:
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(BLOCKER)
        env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, cwd=tmp_path)


@pytest.mark.slow
def test_dry_run_exercises_every_part_and_writes_the_report(tmp_path):
    out = tmp_path / "report"
    t0 = time.time()
    proc = _run(tmp_path, "--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "absent on the GPU machine" not in proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    # every core part ran to the end, none skipped, none partial
    assert [(e["part"], e["status"]) for e in results["plan"]] == [
        (p, "ok") for p in ("env", "correctness", "attention", "ops", "e2e")], results["plan"]
    assert results["skipped"] == [] and results["metadata"]["dry_run"] is True
    assert results["ceilings"]["copy_gbps"] > 0 and results["ceilings"]["matmul_tflops"] > 0
    # everything the run wrote is under --out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "site"]
    assert {"results.json", "benchmarks.md", "log.txt", "env", "correctness", "attention", "ops", "e2e"} <= {
        p.name for p in out.iterdir()}
    # figures carry a unit and their settings; ratios come with their ceiling
    assert results["figures"] and all(f["unit"] and isinstance(f["settings"], dict) for f in results["figures"])
    for f in results["figures"]:
        if f["ceiling"] is not None and f["value"] is not None:
            assert f["pct_of_ceiling"] == pytest.approx(100 * f["value"] / f["ceiling"])
    names = {f["name"] for f in results["figures"]}
    assert {"device-to-device copy bandwidth", "flash attention fwd", "flash attention bwd", "flash attention fwd+bwd",
            "rms_norm bandwidth", "rotary bandwidth", "swiglu bandwidth", "cross_entropy bandwidth",
            "linear_cross_entropy throughput", "linear_cross_entropy peak memory", "training step tokens/s",
            "largest batch that fits"} <= names
    attn = [f for f in results["figures"] if f["name"] == "flash attention fwd"]
    assert {f["settings"]["documents"] for f in attn} == {0, 3}  # one document-masked case
    assert {f["settings"]["kv_heads"] for f in attn} == {1, 2}  # GQA and MHA
    steps = [f for f in results["figures"] if f["name"] == "training step TFLOP/s"]
    assert {(f["settings"]["attention"], f["settings"]["fused"]) for f in steps} == {("sdpa", "off"), ("triton", "on")}
    assert all(f["value"] > 0 and f["settings"]["host_syncs"] >= 1 for f in steps)
    # the kernel tests ran (under the interpreter), one per kernel file, and passed
    kernels = {t["target"].split(":")[0]: t for t in results["targets"] if "tests pass" in t["target"]}
    assert set(kernels) == {"flash_attention", "rms_norm", "rotary", "swiglu", "cross_entropy", "linear_cross_entropy"}
    assert all(t["verdict"] == "PASS" and t["value"] >= 1 for t in kernels.values())
    # GPU targets are not judged on a CPU
    gpu_targets = [t for t in results["targets"] if "tests pass" not in t["target"]]
    assert gpu_targets and all(t["verdict"] == "unmeasured" for t in gpu_targets)
    md = (out / "benchmarks.md").read_text()
    assert md.startswith("<!-- gpu-report:begin -->") and md.rstrip().endswith("<!-- gpu-report:end -->")
    for title in ("Plan", "Environment and ceilings", "Kernel tests", "Flash attention", "Fused ops", "End to end",
                  "Targets"):
        assert f"### {title}" in md
    print(f"dry run took {time.time() - t0:.0f} s")


def test_a_budget_too_small_skips_parts_and_says_why(tmp_path):
    out = tmp_path / "report"
    proc = _run(tmp_path, "--dry-run", "--out", str(out), "--budget", "2", "--parts", "env,correctness",
                blocker=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert [(e["part"], e["status"]) for e in results["plan"]] == [("env", "skipped"), ("correctness", "skipped")]
    assert [s["part"] for s in results["skipped"]] == ["env", "correctness"]
    assert all("left for it" in s["reason"] for s in results["skipped"])
    assert "skipped:" in proc.stdout and "### Skipped for lack of time or failure" in (out / "benchmarks.md").read_text()


def test_part_timeout_holds_back_half_of_each_later_plan(report):
    assert report.part_timeout(480, [120, 100, 130, 110]) == 480 - 230
    assert report.part_timeout(100, []) == 100
    plan = report.part_plan(dry_run=False)
    assert list(plan) == ["env", "correctness", "attention", "ops", "e2e"]
    assert sum(plan.values()) <= 480  # the default budget covers every core part's plan


def test_a_unit_that_does_not_fit_is_skipped_with_its_reason(parts, tmp_path):
    part = parts.Part("ops", "core", tmp_path / "ops", time.time() + 1.0, False, torch.device("cpu"))
    with part.unit("rms_norm", "ops/op") as run:  # planned 26 s, 1 s left
        assert not run
    with part.unit("boom", "env") as run:
        assert not run
    assert [s["unit"] for s in part.record["skipped"]] == ["rms_norm", "boom"]
    assert "needs about 26 s" in part.record["skipped"][0]["reason"]
    part2 = parts.Part("ops", "core", tmp_path / "ops2", time.time() + 600, True, torch.device("cpu"))
    with part2.unit("fails", "ops/op") as run:
        assert run
        raise RuntimeError("a CUDA error, say")
    assert part2.record["status"] == "partial" and part2.record["units"][0]["status"] == "failed"
    assert "RuntimeError: a CUDA error, say" in part2.record["units"][0]["error"]
    with pytest.raises(ValueError, match="verdict"):
        part2.target("x", "OK")
    # every finished unit is on disk at once, so a part killed at its deadline keeps it
    on_disk = json.loads((tmp_path / "ops2" / "part.json").read_text())
    assert [u["unit"] for u in on_disk["units"]] == ["fails"] and on_disk["status"] == "partial"
    path = part2.write()
    assert json.loads(path.read_text())["status"] == "partial"


def test_a_part_killed_at_its_deadline_is_partial_not_lost(report):
    assert report._status({"status": "running"}, "killed at its deadline") == "partial (killed at its deadline)"
    assert report._status({"status": "ok"}, "finished") == "ok"
    assert report._status(None, "killed at its deadline").startswith("failed: wrote no record")


def test_junit_counts_per_kernel_file(parts, tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(textwrap.dedent('''\
        <testsuites><testsuite>
          <testcase classname="tests.test_rms_norm_kernel" name="a"/>
          <testcase classname="tests.test_rms_norm_kernel" name="b"><failure message="x"/></testcase>
          <testcase classname="tests.test_rotary_kernel" name="c"><skipped message="gpu"/></testcase>
          <testcase classname="tests.test_flash_attention.TestGrads" name="d"><error message="y"/></testcase>
        </testsuite></testsuites>'''))
    counts = parts._junit_counts(xml)
    assert counts["test_rms_norm_kernel"] == {"passed": 1, "failed": 1, "skipped": 0}
    assert counts["test_rotary_kernel"] == {"passed": 0, "failed": 0, "skipped": 1}
    assert counts["test_flash_attention"] == {"passed": 0, "failed": 1, "skipped": 0}


def test_render_before_any_gpu_run_lists_every_target_unmeasured(report):
    md = report.render(None)
    rows = [line for line in md.splitlines() if line.startswith("| ") and "unmeasured" in line]
    assert len(rows) == 6 + 2 + 6 + 1  # kernel tests, attention fwd/bwd, the op scripts' targets (2+1+1+2), MFU
    assert not any("PASS" in r or "MISS" in r for r in rows)


def test_render_into_replaces_only_the_section(report, tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n\n<!-- gpu-report:begin -->\nold\n<!-- gpu-report:end -->\n\n## After\n")
    report.render_into(None, doc)
    first = doc.read_text()
    assert first.startswith("# Benchmarks\n\nintro\n\n<!-- gpu-report:begin -->") and first.endswith("\n\n## After\n")
    assert "old" not in first and first.count("gpu-report:begin") == 1
    report.render_into(None, doc)
    assert doc.read_text() == first  # idempotent
    fresh = tmp_path / "new.md"
    report.render_into(None, fresh)
    assert fresh.read_text().startswith("<!-- gpu-report:begin -->")


def test_document_ids_and_flops(tmp_path):
    fa = _load("flash_attention")
    ids = fa.document_ids(3, 50, 4, seed=1)
    assert ids.shape == (3, 50) and ids.dtype == torch.int64
    for row in ids:
        assert row[0] == 0 and row[-1] == 3 and bool((row[1:] - row[:-1] >= 0).all())
        assert bool(((row[1:] - row[:-1]) <= 1).all()) and len(torch.unique(row)) == 4
    assert not torch.equal(ids[0], ids[1])  # drawn anew per row
    one = fa.document_ids(2, 64, 1, seed=0)
    for mode in ("fwd", "bwd", "fwd+bwd"):  # one document is plain causal attention
        assert fa.document_flops(mode, 4, 16, one) == fa.attention_flops(mode, 2, 4, 64, 16, causal=True)
    lengths = torch.bincount(ids[0])
    assert fa.document_flops("fwd", 1, 2, ids[:1]) == sum(4 * int(n) ** 2 * 2 // 2 for n in lengths)


def test_document_masked_providers_agree_with_the_reference(tmp_path):
    """sdpa with the mask the ids imply and eager with the ids give the reference's output."""
    fa = _load("flash_attention")
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 24, 16), torch.randn(2, 2, 24, 16), torch.randn(2, 2, 24, 16)
    ids = fa.document_ids(2, 24, 3, seed=0)
    ref = fa.reference_fp32(q, k, v, True, ids)
    for provider in ("sdpa", "eager"):
        fn, _ = fa.build_provider(provider, q, k, v, True, ids)
        torch.testing.assert_close(fn(q, k, v), ref, rtol=1e-5, atol=1e-5)
    plain = fa.reference_fp32(q, k, v, True, None)
    assert (plain - ref).abs().max() > 1e-2  # the mask changes the result: the check can fail
