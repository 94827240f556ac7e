"""The five parts of ``bench/gpu_report.py``, each run in its own process by the report.

Not a runnable script: ``python bench/gpu_report.py --worker PART`` calls :func:`run_part`. A
part runs *units* (one benchmark invocation or one pytest run each) in order while its deadline
allows, and writes ``<out>/<part>/part.json``::

    {"part", "stage", "status", "elapsed_s",
     "figures": [{"name", "value", "unit", "ceiling", "ceiling_unit", "ceiling_name", "pct_of_ceiling",
                  "settings"}],
     "targets": [{"target", "verdict": "PASS" | "MISS" | "unmeasured", "value", "bound", "note"}],
     "tables":  [{"title", "header", "rows", "notes"}],     # what the Markdown section shows
     "skipped": [{"unit", "reason"}],                       # units left out, and why
     "units":   [{"unit", "planned_s", "used_s", "status"}], ...}

The benchmarks are the scripts of ``bench/`` (``flash_attention.py``, the op scripts on
``op_bench.py``, ``train_throughput.py``), called in this process with narrow arguments and an
``--out`` inside the part's folder; a part reads back their JSON. Nothing here re-implements a
measurement. Each unit has a planned time (GPU; a second figure for ``--dry-run`` on a CPU); a
unit whose plan does not fit in what is left of the part's deadline is skipped with that reason.

Stages: ``core`` answers the issue's targets; ``wide`` adds shapes and dtypes when the report has
time left after every core part.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from common import fmt

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
TESTS_DIR = ROOT / "tests"

# Kernel -> (its test file, its op benchmark script or None). The correctness part runs the
# tests; a kernel with a failing test is not timed by the later parts.
KERNELS: dict[str, tuple[str, str | None]] = {
    "flash_attention": ("test_flash_attention.py", None),
    "rms_norm": ("test_rms_norm_kernel.py", "rms_norm"),
    "rotary": ("test_rotary_kernel.py", "rotary"),
    "swiglu": ("test_swiglu_kernel.py", "swiglu"),
    "cross_entropy": ("test_cross_entropy_kernel.py", "cross_entropy"),
    "linear_cross_entropy": ("test_linear_cross_entropy_kernel.py", "linear_cross_entropy"),
}

# Tests of the layers above the kernels, run on the GPU in the wide stage: the custom operators
# (opcheck: fake shapes and strides against the real kernels), the whole model under
# torch.compile(fullgraph=True), and the model's op wrappers.
EXTRA_TESTS = {"custom ops": "test_custom_ops.py", "torch.compile": "test_compile.py", "model wrappers": "test_fused_ops.py"}

# Flash attention targets (docs/kernels.md): head dim 128, causal, bf16, lengths 4k-16k.
ATTN_TARGETS = {"fwd": 1.2, "bwd": 1.0}  # minimum speed-up over SDPA (flash backend) per mode
ATTN_TOKENS = 16384
ATTN_HEADS, ATTN_KV_HEADS, ATTN_HEAD_DIM = 32, 8, 128
E2E_PRESET, E2E_SEQ, E2E_BATCH = "tinyllama-1.1b", 2048, 8
MFU_TARGET = 0.45  # bench/train_throughput.py's target for 0.5-2B models at 2048, bf16

# One LLaMA-sized shape per op (Llama 3 8B: hidden 4096, FFN 14336, 32/8 heads of 128, V 128,256;
# 16k tokens), and CPU-sized ones for --dry-run.
OP_SHAPES = {
    "rms_norm": (["--sizes", "16384x4096", "--variants", "rms,add"], ["--sizes", "4x48", "--variants", "rms,add"]),
    "rotary": (["--sizes", "8x2048", "--heads", "32", "--kv-heads", "8", "--head-dims", "128"],
               ["--sizes", "1x8", "--heads", "2", "--kv-heads", "1", "--head-dims", "16"]),
    "swiglu": (["--sizes", "16384x14336"], ["--sizes", "4x48"]),
    "cross_entropy": (["--sizes", "16384x128256"], ["--sizes", "4x100"]),
    "linear_cross_entropy": (["--tokens", "16384", "--hidden", "4096", "--vocabs", "128256", "--weights", "same"],
                             ["--tokens", "8", "--hidden", "16", "--vocabs", "100", "--weights", "same"]),
}
OP_WIDE = {
    "rms_norm": ["--sizes", "4096x4096,16384x8192", "--variants", "rms,add"],
    "swiglu": ["--sizes", "16384x11008"],
    "cross_entropy": ["--sizes", "16384x32000"],
    "linear_cross_entropy": ["--tokens", "16384", "--hidden", "4096", "--vocabs", "32000,128256", "--weights", "fp32"],
    "rotary": ["--sizes", "1x2048,8x8192", "--heads", "32", "--kv-heads", "8", "--head-dims", "128"],
}
# Planned seconds per unit: (GPU, --dry-run on a 2-core CPU). GPU figures assume Triton compiles
# and autotunes on first use (a few seconds per kernel configuration) and that torch.compile of a
# reference op takes 10-20 s per mode; CPU figures were measured on the development machine.
PLAN = {
    "env": (20, 6), "correctness": (110, 20), "attention/N": (22, 4), "attention/docs": (20, 3),
    "ops/op": (26, 4), "e2e/row": (18, 3), "e2e/max-batch": (30, 4),
    "correctness-wide": (150, 0), "attention-wide": (60, 0), "ops/wide": (30, 0),
}


def planned(unit: str, dry_run: bool) -> float:
    return PLAN[unit][1 if dry_run else 0]


# ---------------------------------------------------------------------------- the part's record
@dataclass
class Part:
    """What a worker collects, and its clock. ``deadline`` is a ``time.time()`` instant."""
    name: str
    stage: str
    out: Path
    deadline: float
    dry_run: bool
    device: torch.device
    record: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.record = {"part": self.name, "stage": self.stage, "status": "running", "figures": [], "targets": [],
                       "tables": [], "skipped": [], "units": [], "notes": []}
        self.started = time.time()

    def left(self) -> float:
        return self.deadline - time.time()

    @contextlib.contextmanager
    def unit(self, name: str, plan_key: str) -> Iterator[bool]:
        """``with part.unit("attention N=4096", "attention/N") as run: if run: ...``. Skips the
        unit (run False) when its planned time exceeds what is left; an exception inside is
        recorded as a failed unit and the part goes on with the next."""
        plan = planned(plan_key, self.dry_run)
        entry = {"unit": name, "planned_s": plan, "used_s": 0.0, "status": "ok"}
        self.record["units"].append(entry)
        if plan > self.left():
            entry["status"] = "skipped"
            self.skip(name, f"needs about {plan:.0f} s, {max(0.0, self.left()):.0f} s of the budget left")
            yield False
            return
        t0 = time.time()
        print(f"[{self.name}] {name} (planned {plan:.0f} s, {self.left():.0f} s left)", flush=True)
        try:
            yield True
        except Exception as e:  # the unit is lost, the part goes on
            traceback.print_exc()
            entry["status"] = "failed"
            entry["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
            self.record["status"] = "partial"
        entry["used_s"] = round(time.time() - t0, 1)
        self.write()  # a part killed at its deadline keeps every unit that finished

    def skip(self, unit: str, reason: str) -> None:
        self.record["skipped"].append({"unit": unit, "reason": reason})
        print(f"[{self.name}] skipped {unit}: {reason}", flush=True)

    def figure(self, name: str, value: float | None, unit: str, *, ceiling: float | None = None,
               ceiling_unit: str | None = None, ceiling_name: str | None = None, **settings: Any) -> None:
        pct = 100 * value / ceiling if value is not None and ceiling else None
        self.record["figures"].append({"name": name, "value": value, "unit": unit, "ceiling": ceiling,
                                       "ceiling_unit": ceiling_unit or (unit if ceiling is not None else None),
                                       "ceiling_name": ceiling_name, "pct_of_ceiling": pct, "settings": settings})

    def target(self, target: str, verdict: str, value: float | None = None, bound: float | None = None,
               note: str = "") -> None:
        if verdict not in ("PASS", "MISS", "unmeasured"):
            raise ValueError(f"verdict must be PASS, MISS or unmeasured, got {verdict!r}")
        self.record["targets"].append({"target": target, "verdict": verdict, "value": value, "bound": bound,
                                       "note": note})

    def table(self, title: str, header: list[str], rows: list[list[Any]], notes: list[str] = ()) -> None:
        self.record["tables"].append({"title": title, "header": header, "rows": rows, "notes": list(notes)})

    def write(self) -> Path:
        self.record["elapsed_s"] = round(time.time() - self.started, 1)
        path = self.out / "part.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=2, default=str) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


def read_part(out: Path, name: str) -> dict[str, Any] | None:
    """The record a finished part wrote under ``out``, or None."""
    path = out / name / "part.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _results(path_dir: Path, stem: str) -> tuple[dict, list[dict]]:
    data = json.loads((path_dir / f"{stem}.json").read_text(encoding="utf-8"))
    return data["metadata"], data["results"]


def _call(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """A benchmark's ``main(argv)``; a ``SystemExit`` (a bad argument) becomes its status."""
    print("  $ " + " ".join(argv), flush=True)
    try:
        return main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def _device_args(part: Part) -> list[str]:
    return ["--device", str(part.device)] + (["--threads", "1"] if part.device.type == "cpu" else [])


def _timing_args(part: Part) -> list[str]:
    return ["--warmup", "1", "--repeats", "2"] if part.dry_run else []


def _ceilings(out_root: Path) -> dict[str, Any]:
    env = read_part(out_root, "env")
    return (env or {}).get("ceilings", {})


def _kernels_ok(out_root: Path) -> dict[str, bool]:
    """{kernel: passed} from the correctness part; kernels it did not reach count as passed
    (untested, not known to be wrong: the report says so)."""
    rec = read_part(out_root, "correctness")
    return {k: v.get("ok", True) for k, v in (rec or {}).get("kernels", {}).items()}


# ---------------------------------------------------------------------------- 1. environment
def _nvidia_smi() -> dict[str, str]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {}
    fields = "driver_version,name,clocks.max.sm,power.limit,memory.total"
    try:
        line = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return {}
    return dict(zip(fields.split(","), (x.strip() for x in line.split(","))))


def env_part(part: Part) -> None:
    """Versions, device and driver; copy bandwidth and the bf16 matmul rate, measured now."""
    import platform

    from common import Timer, environment, versions
    from llama_mini import hardware

    dev = part.device
    with part.unit("environment and ceilings", "env") as run:
        if not run:
            return
        env = {**environment(dev), **versions(), "python_full": platform.python_version()}
        smi = _nvidia_smi() if dev.type == "cuda" else {}
        env["driver"] = smi.get("driver_version")
        env["nvidia_smi"] = smi or None
        timer = Timer(dev, "auto", warmup=1 if part.dry_run else 5, repeats=3 if part.dry_run else 20)
        nbytes = (8 << 20) if part.dry_run else (1 << 30)
        src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
        dst = torch.empty_like(src)
        times, how = timer(lambda: dst.copy_(src))
        times.sort()
        copy_gbps = 2 * nbytes / (times[len(times) // 2] * 1e-3) / 1e9  # read + write
        del src, dst
        dtype = torch.float32 if part.dry_run else torch.bfloat16
        n = 256 if part.dry_run else 8192
        rate, mm_note = hardware.measure_matmul_flops(dev, dtype, n=n, repeats=3 if part.dry_run else 10)
        sheet, sheet_note = hardware.peak_flops(dev, dtype)
        ceilings = {"copy_gbps": copy_gbps, "copy_note": f"dst.copy_(src), {nbytes >> 20} MiB, {how}",
                    "matmul_tflops": rate / 1e12, "matmul_note": mm_note,
                    "datasheet_tflops": None if sheet is None else sheet / 1e12, "datasheet_note": sheet_note,
                    "dtype": str(dtype).removeprefix("torch.")}
        part.record["env"] = env
        part.record["ceilings"] = ceilings
        part.figure("device-to-device copy bandwidth", copy_gbps, "GB/s", bytes=nbytes, timing=how)
        part.figure(f"{ceilings['dtype']} matmul rate {n}^3", rate / 1e12, "TFLOP/s",
                    ceiling=ceilings["datasheet_tflops"], ceiling_name=sheet_note, note=mm_note)
        rows = [["device", env.get("device_name")], ["compute capability", env.get("compute_capability", "-")],
                ["driver", env.get("driver") or "-"], ["CUDA", env.get("cuda_version") or "-"],
                ["torch", env.get("torch")], ["triton", env.get("triton")], ["python", env["python_full"]],
                ["copy bandwidth", f"{copy_gbps:,.0f} GB/s ({ceilings['copy_note']})"],
                [f"{ceilings['dtype']} matmul", f"{rate / 1e12:,.1f} TFLOP/s ({mm_note})"],
                ["datasheet peak", f"{ceilings['datasheet_tflops']:,.1f} TFLOP/s ({sheet_note})"
                 if sheet else f"none ({sheet_note})"]]
        if ceilings["datasheet_tflops"]:
            rows.append(["matmul / datasheet", f"{100 * rate / sheet:.0f}%"])
        part.table("Environment and ceilings (measured in this run)", ["what", "value"], rows)


# ---------------------------------------------------------------------------- 2. correctness
def _selection(part: Part, files: list[str]) -> list[str]:
    """pytest arguments: on a GPU the ``gpu``-marked tests (bf16 and model-sized shapes, compiled
    kernels) of each kernel file, in the wide stage the rest of those files; in a dry run the
    first CPU test of each file, so the whole path runs in seconds."""
    paths = [str(TESTS_DIR / f) for f in files]
    if part.stage == "wide":
        return paths + ["-m", "not gpu"]
    if not part.dry_run:
        return paths + ["-m", "gpu"]
    return paths + ["-m", "not gpu", "-p", "gpu_first_test"]  # bench/gpu_first_test.py keeps one test per file


def _pytest_env(part: Part) -> dict[str, str]:
    env = dict(os.environ)
    # tests/conftest.py turns the interpreter on unless told otherwise: on a GPU the compiled kernels
    # are what is tested.
    env["TRITON_INTERPRET"] = "1" if part.device.type == "cpu" else "0"
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    return env


def correctness_part(part: Part) -> None:
    """The kernel tests with the interpreter off (GPU) into JUnit XML, summarised per kernel."""
    key = "correctness-wide" if part.stage == "wide" else "correctness"
    groups = {k: f for k, (f, _) in KERNELS.items()}
    if part.stage == "wide":
        groups.update(EXTRA_TESTS)
    files = [f for f in groups.values() if (TESTS_DIR / f).is_file()]
    if not files:
        part.skip("kernel tests", f"no test files under {TESTS_DIR}: run the report from a checkout")
        for kernel in KERNELS:
            part.target(f"{kernel}: tests pass on the hardware", "unmeasured", note="tests/ not found")
        return
    with part.unit("kernel tests" + (" (the rest)" if part.stage == "wide" else ""), key) as run:
        if not run:
            return
        junit = part.out / "junit.xml"
        timeout = max(10.0, part.left() - 5)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra",
               f"--junitxml={junit}", *_selection(part, files)]
        if importlib.util.find_spec("pytest_timeout") is not None:
            # A hung kernel fails its own test instead of stopping pytest before it writes its XML.
            cmd.insert(3, f"--timeout={90 if part.dry_run else 120}")
        print("  $ " + " ".join(cmd), flush=True)
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=_pytest_env(part), timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
            part.record["notes"].append(f"pytest stopped at the part's deadline after {timeout:.0f} s")
        counts = _junit_counts(junit) if junit.is_file() else {}
        kernels: dict[str, dict[str, Any]] = {}
        rows = []
        for kernel, test_file in groups.items():
            c = counts.get(Path(test_file).stem, {"passed": 0, "failed": 0, "skipped": 0})
            ok = c["failed"] == 0
            ran = c["passed"] + c["failed"] > 0
            kernels[kernel] = {**c, "ok": ok, "ran": ran}
            verdict = "unmeasured" if not ran else "PASS" if ok else "MISS"
            where = "interpreter (dry run)" if part.dry_run else "compiled, on the GPU"
            part.target(f"{kernel}: tests pass ({where})", verdict, value=c["passed"],
                        note=f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped")
            rows.append([kernel, c["passed"], c["failed"], c["skipped"], verdict])
            part.figure(f"{kernel} tests passed", c["passed"], "tests", failed=c["failed"], skipped=c["skipped"])
        part.record["kernels"] = kernels
        part.record["pytest_returncode"] = rc
        part.table("Kernel tests " + ("(compiled, interpreter off)" if not part.dry_run else "(dry run: interpreter)"),
                   ["kernel", "passed", "failed", "skipped", "verdict"], rows,
                   [f"selection: {'gpu-marked tests' if part.stage == 'core' and not part.dry_run else 'see log'}; "
                    "a kernel with a failed test is not timed by the later parts"])


def _junit_counts(path: Path) -> dict[str, dict[str, int]]:
    """{test module stem: {"passed", "failed", "skipped"}} from pytest's JUnit XML."""
    stems = {Path(f).stem for f, _ in KERNELS.values()} | {Path(f).stem for f in EXTRA_TESTS.values()}
    counts: dict[str, dict[str, int]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        parts = case.get("classname", "").split(".")
        module = next((x for x in parts if x in stems), parts[-1])  # "tests.test_x" or "tests.test_x.TestY"
        c = counts.setdefault(module, {"passed": 0, "failed": 0, "skipped": 0})
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            c["failed"] += 1
        elif "skipped" in kinds:
            c["skipped"] += 1
        else:
            c["passed"] += 1
    return counts


# ---------------------------------------------------------------------------- 3. flash attention
def attention_part(part: Part, out_root: Path) -> None:
    """Ours against SDPA, forward, backward and both, at 16k tokens per batch: lengths 4k, 8k and
    16k with MHA and GQA, and one document-masked case (wide: head dim 64, fp16, short lengths)."""
    import flash_attention as bench

    ceilings = _ceilings(out_root)
    matmul = ceilings.get("matmul_tflops")
    ok = _kernels_ok(out_root).get("flash_attention", True)
    providers = "triton,sdpa" if ok else "sdpa"
    if not ok:
        part.record["notes"].append("flash attention failed its tests on this hardware: only SDPA is timed")
    if part.dry_run:
        common = ["--tokens", "16", "--heads", "2", "--head-dims", "16", "--dtypes", "fp32", "--interpreter"]
        units = [("N=16", ["--seqlens", "16", "--kv-heads", "same,1"], "attention/N"),
                 ("N=16 documents", ["--seqlens", "16", "--kv-heads", "1", "--documents", "3"], "attention/docs")]
    elif part.stage == "core":
        common = ["--tokens", str(ATTN_TOKENS), "--heads", str(ATTN_HEADS), "--head-dims", str(ATTN_HEAD_DIM),
                  "--dtypes", "bf16"]
        units = [(f"N={n}", ["--seqlens", str(n), "--kv-heads", f"same,{ATTN_KV_HEADS}"], "attention/N")
                 for n in (4096, 8192, 16384)]
        units.append(("N=8192 documents", ["--seqlens", "8192", "--kv-heads", str(ATTN_KV_HEADS), "--documents", "8"],
                      "attention/docs"))
    else:
        common = ["--tokens", str(ATTN_TOKENS), "--heads", str(ATTN_HEADS), "--dtypes", "bf16,fp16"]
        units = [("D=64 and fp16, N=1024..16384", ["--seqlens", "1024,2048,4096,8192,16384", "--head-dims", "64,128",
                                                   "--kv-heads", f"same,{ATTN_KV_HEADS}"], "attention-wide")]
    table: list[list] = []  # filled unit by unit: a part stopped at its deadline keeps what it measured
    part.table("Flash attention (ours vs SDPA in the same run)",
               ["N", "heads", "D", "dtype", "docs", "mode", "ours TFLOP/s", "SDPA TFLOP/s", "x SDPA", "% matmul", "status"],
               table, [f"% matmul: of the {ceilings.get('dtype', '')} matmul rate measured in this run "
                       f"({fmt(matmul, '.1f')} TFLOP/s)",
                       "documents: SDPA takes the document mask as a boolean mask (no flash backend); FLOPs count "
                       "the unmasked work only"])
    for label, extra, key in units:
        with part.unit(f"attention {label}", key) as run:
            if not run:
                continue
            stem = "attention_" + label.replace(" ", "_").replace("=", "").replace(",", "_").replace(".", "")
            argv = [*common, *extra, "--causal", "true", "--modes", "fwd,bwd,fwd+bwd", "--providers", providers,
                    *_device_args(part), *_timing_args(part), "--out", str(part.out), "--name", stem, "--no-plot"]
            _call(bench.main, argv)
            _attention_rows(part, _results(part.out, stem)[1], matmul, table)
    if part.stage == "core" and not part.dry_run:
        measured = {t["target"] for t in part.record["targets"]}
        for n in (4096, 8192, 16384):
            for kv in (ATTN_HEADS, ATTN_KV_HEADS):
                for mode, bound in ATTN_TARGETS.items():
                    name = _attention_target_name(mode, bound, n, ATTN_HEADS, kv, ATTN_HEAD_DIM)
                    if name not in measured:
                        part.target(name, "unmeasured", bound=bound, note="not run (budget, failure or kernel tests)")
    if part.dry_run:
        part.target("flash attention fwd >= 1.2x SDPA and bwd >= 1.0x SDPA (H100, D 128, 4k-16k, causal, bf16)",
                    "unmeasured", note="dry run on a CPU: the timings are the interpreter's")


def _attention_target_name(mode: str, bound: float, n: int, heads: int, kv_heads: int, head_dim: int) -> str:
    return f"flash attention {mode} >= {bound}x SDPA (N={n}, H {heads}/{kv_heads}, D {head_dim}, causal, bf16)"


def _attention_rows(part: Part, rows: list[dict], matmul: float | None, table: list) -> None:
    """Figures, table rows and targets of one attention unit's rows (ours next to SDPA's)."""
    for r in rows:
        if r["provider"] != "triton":
            continue
        sdpa = next((x for x in rows if x["provider"] == "sdpa" and x["mode"] == r["mode"]
                     and all(x[k] == r[k] for k in ("seqlen", "heads", "kv_heads", "head_dim", "dtype", "documents"))),
                    None)
        shape = dict(seqlen=r["seqlen"], batch=r["batch"], heads=r["heads"], kv_heads=r["kv_heads"],
                     head_dim=r["head_dim"], dtype=r["dtype"], causal=r["causal"], documents=r["documents"] or 0)
        part.figure(f"flash attention {r['mode']}", r["tflops"], "TFLOP/s", ceiling=matmul,
                    ceiling_name="measured matmul rate", status=r["status"], vs_sdpa=r["vs_sdpa"],
                    sdpa_tflops=sdpa and sdpa["tflops"], sdpa_backend=sdpa and sdpa["backend"], **shape)
        table.append([r["seqlen"], f"{r['heads']}/{r['kv_heads']}", r["head_dim"], r["dtype"], r["documents"] or "-",
                      r["mode"], fmt(r["tflops"], ".1f"), fmt(sdpa and sdpa["tflops"], ".1f"),
                      fmt(r["vs_sdpa"], ".2f"), fmt(100 * r["tflops"] / matmul if r["tflops"] and matmul else None,
                                                    ".0f"), r["status"] if r["status"] != "ok" else ""])
        bound = ATTN_TARGETS.get(r["mode"])
        if bound and not r["documents"] and r["head_dim"] == ATTN_HEAD_DIM and r["dtype"] == "bfloat16" \
                and r["seqlen"] >= 4096:
            name = _attention_target_name(r["mode"], bound, r["seqlen"], r["heads"], r["kv_heads"], r["head_dim"])
            _attention_target(part, name, r, bound)


def _attention_target(part: Part, name: str, row: dict, bound: float) -> None:
    if part.device.type != "cuda":
        part.target(name, "unmeasured", row["vs_sdpa"], bound, "not a GPU run")
    elif row["status"] != "ok" or row["vs_sdpa"] is None:
        part.target(name, "unmeasured", None, bound, f"row {row['status']}: {row['reason'] or row['error'] or 'no SDPA row'}")
    else:
        part.target(name, "PASS" if row["vs_sdpa"] >= bound else "MISS", row["vs_sdpa"], bound,
                    f"{row['tflops']:.0f} TFLOP/s")


# ---------------------------------------------------------------------------- 4. fused ops
def ops_part(part: Part, out_root: Path) -> None:
    """Each fused op at one LLaMA-sized shape against eager and torch.compile: GB/s against the
    copy bandwidth the op bench measures beside it (memory-bound ops), TFLOP/s, time and peak
    memory against eager (the linear + cross-entropy)."""
    import importlib

    ceilings = _ceilings(out_root)
    kernels_ok = _kernels_ok(out_root)
    table = []
    for kernel, (_, script) in KERNELS.items():
        if script is None:
            continue
        if part.stage == "wide" and script not in OP_WIDE:
            continue
        ok = kernels_ok.get(kernel, True)
        with part.unit(f"{script}" + (" (wide)" if part.stage == "wide" else ""),
                       "ops/wide" if part.stage == "wide" else "ops/op") as run:
            mod = importlib.import_module(script)
            if not run:
                for t in mod.OP.targets:
                    part.target(t.label, "unmeasured", bound=t.bound, note="skipped for lack of time")
                continue
            shape = OP_WIDE[script] if part.stage == "wide" else OP_SHAPES[script][1 if part.dry_run else 0]
            providers = ["triton"] if ok else []
            providers += ["eager"] + (["compile"] if not part.dry_run or script == "rms_norm" else [])
            stem = script + ("_wide" if part.stage == "wide" else "")
            argv = [*shape, "--dtypes", "fp32" if part.dry_run else "bf16", "--providers", ",".join(providers),
                    "--modes", "fwd,bwd,fwd+bwd", *_device_args(part), *_timing_args(part),
                    "--out", str(part.out), "--name", stem, "--no-plot"]
            _call(mod.main, argv)
            _, rows = _results(part.out, stem)
            _op_figures(part, mod.OP, rows, ok, ceilings, table)
    part.table("Fused ops (ours vs eager and torch.compile in the same run)",
               ["op", "shape", "mode", "ms", "GB/s", "% copy", "TFLOP/s", "x eager", "x compile", "peak MiB",
                "mem / eager", "status"], table,
               ["% copy: of dst.copy_(src) on a buffer the size of the op's largest input, timed beside it",
                "x eager, x compile: their median time over ours (above 1: ours is faster)"])


def _op_figures(part: Part, op: Any, rows: list[dict], kernel_ok: bool, ceilings: dict, table: list) -> None:
    by = {(r["provider"], r["mode"], r["size"], r.get("variant"), r.get("weights")): r for r in rows}
    for r in rows:
        if r["provider"] != "triton":
            continue
        key = (r["mode"], r["size"], r.get("variant"), r.get("weights"))
        comp = by.get(("compile", *key))
        vs_compile = comp["median_ms"] / r["median_ms"] if comp and comp["median_ms"] and r["median_ms"] else None
        settings = {k: r.get(k) for k in ("size", "variant", "weights", "dtype", "mode") if r.get(k) is not None}
        if op.memory_bound:
            part.figure(f"{op.name} bandwidth", r["gbps"], "GB/s", ceiling=r["copy_gbps"],
                        ceiling_name="copy bandwidth at this size", status=r["status"],
                        vs_eager=r["speedup_vs_eager"], vs_compile=vs_compile, **settings)
        else:
            part.figure(f"{op.name} throughput", r["tflops"], "TFLOP/s", ceiling=ceilings.get("matmul_tflops"),
                        ceiling_name="measured matmul rate", status=r["status"], time_vs_eager=r["time_vs_eager"],
                        vs_compile=vs_compile, **settings)
            part.figure(f"{op.name} peak memory", r["peak_mem_mib"], "MiB", status=r["status"],
                        mem_vs_eager=r["mem_vs_eager"], **settings)
        label = r["size"] + "".join(f" {r[k]}" for k in ("variant", "weights") if r.get(k))
        table.append([op.name, label, r["mode"], fmt(r["median_ms"], ".3f"), fmt(r["gbps"], ".0f"),
                      fmt(r["pct_of_copy"], ".0f"), fmt(r["tflops"], ".1f") if not op.memory_bound else "-",
                      fmt(r["speedup_vs_eager"], ".2f"), fmt(vs_compile, ".2f"), fmt(r["peak_mem_mib"], ",.0f"),
                      fmt(r["mem_vs_eager"], ".2f"), "" if r["status"] == "ok" else f"{r['status']}: "
                      f"{(r['reason'] or r['error'] or '')[:60]}"])
    for t in op.targets:
        hits = [r for r in rows if t.applies(r)]
        if not kernel_ok:
            part.target(t.label, "unmeasured", bound=t.bound, note="the kernel failed its tests: not timed")
        elif part.device.type != "cuda":
            part.target(t.label, "unmeasured", bound=t.bound, note="not a GPU run")
        elif not hits:
            part.target(t.label, "unmeasured", bound=t.bound, note="no triton row of this run applies")
        for r in hits if part.device.type == "cuda" and kernel_ok else []:
            verdict, note = t.verdict(r)
            where = ", ".join(str(r[k]) for k in ("mode", "size", "variant", "weights") if r.get(k))
            part.target(f"{t.label} ({where})", "unmeasured" if verdict == "n/a" else verdict,
                        r.get(t.field), t.bound, note)


# ---------------------------------------------------------------------------- 5. end to end
E2E_SETTINGS = [("sdpa", "off"), ("sdpa", "on"), ("triton", "off"), ("triton", "on")]
E2E_MAX_BATCH = [("sdpa", "off"), ("triton", "on")]
# A dry run takes the two settings that between them run every code path (and every kernel,
# under the interpreter); the largest-batch estimate runs once.
E2E_DRY = ([("sdpa", "off"), ("triton", "on")], [("sdpa", "off")])


def e2e_part(part: Part, out_root: Path) -> None:
    """The training step the trainer runs (``bench/train_throughput.py``), tinyllama-1.1b at 2048
    in bf16: tokens/s, TFLOP/s and MFU against the datasheet peak and the measured matmul rate,
    sdpa vs triton attention x fused ops off vs on; the largest batch for two settings."""
    import gc

    import train_throughput as tt
    from common import release

    ceilings = _ceilings(out_root)
    sheet, matmul = ceilings.get("datasheet_tflops"), ceilings.get("matmul_tflops")
    kernels_ok = _kernels_ok(out_root)
    if part.dry_run:
        argv = ["--presets", "debug", "--seq-len", "16", "--batch-size", "1", "--dtype", "float32", "--steps", "1",
                "--warmup", "1", "--min-time", "0", "--memory-budget-gib", "1"]
        preset = "debug"
    else:
        argv = ["--presets", E2E_PRESET, "--seq-len", str(E2E_SEQ), "--batch-size", str(E2E_BATCH), "--dtype",
                "bfloat16", "--steps", "5", "--min-time", "1", "--max-batch-limit", "64"]
        preset = E2E_PRESET
    args = tt.parse_args([*argv, *_device_args(part), "--out", str(part.out), "--no-plot"])
    device = args.device
    rows: list[dict] = []
    table: list[list] = []  # filled row by row: a part stopped at its deadline keeps what it measured
    big: list[list] = []
    part.table("End to end: the trainer's training step",
               ["attention", "fused", "batch", "tokens/s", "TFLOP/s", "MFU % (datasheet)", "MFU % (measured matmul)",
                "peak MiB", "host syncs", "status"], table,
               [f"datasheet: {ceilings.get('datasheet_note')} = {fmt(sheet, '.1f')} TFLOP/s; measured matmul: "
                f"{ceilings.get('matmul_note')} = {fmt(matmul, '.1f')} TFLOP/s",
                "FLOPs per token: Transformer.flops_per_token (6N + causal attention, recomputation not counted)"])
    part.table("Largest batch that fits", ["attention", "fused", "batch", "method", "capped"], big)

    def keep(row: dict) -> None:
        rows.append(row)
        _e2e_row(part, row, ceilings, table, big)
        (part.out / "train_step.json").write_text(json.dumps({"argv": argv, "rows": rows}, indent=2, default=str)
                                                  + "\n", encoding="utf-8")

    settings, max_batch = E2E_DRY if part.dry_run else (E2E_SETTINGS, E2E_MAX_BATCH)
    for backend, fused in settings:
        why = tt.skip_reason(backend, fused, device)
        broken = [k for k in (["flash_attention"] if backend == "triton" else [])
                  + ([k for k in KERNELS if k != "flash_attention"] if fused == "on" else []) if not kernels_ok.get(k, True)]
        with part.unit(f"train step {backend} attention, fused {fused}", "e2e/row") as run:
            if not run:
                continue
            if why or broken:
                keep(dict(kind="train", preset=preset, attn_backend=backend, fused=fused, checkpointing="off",
                          seq_len=args.seq_len, dtype=args.dtype, batch_size=args.batch_size, status="skipped",
                          reason=why or f"kernels that failed their tests: {', '.join(broken)}"))
                continue
            try:
                keep(tt.run_ours(args, device, preset, backend, fused, "off", sheet))
            finally:
                gc.collect()
                release(device)
    for backend, fused in max_batch:
        with part.unit(f"largest batch, {backend} attention, fused {fused}", "e2e/max-batch") as run:
            if not run:
                continue
            if tt.skip_reason(backend, fused, device):
                continue
            search = tt.max_batch_cuda if device.type == "cuda" else tt.max_batch_cpu
            try:
                row = search(args, device, preset, backend, fused, "off")
            finally:
                gc.collect()
                release(device)
            row["fused"] = fused
            keep(row)
    if not any(t["target"].startswith("MFU") for t in part.record["targets"]):
        part.target(f"MFU >= {MFU_TARGET:.0%} of the datasheet peak ({E2E_PRESET}, T {E2E_SEQ}, bf16, on a GPU)",
                    "unmeasured", bound=MFU_TARGET,
                    note="not a GPU run" if device.type != "cuda" else "no row of this run measured it")


def _e2e_row(part: Part, r: dict, ceilings: dict, table: list, big: list) -> None:
    """Figures, table row and MFU target of one training-step or largest-batch row."""
    sheet, matmul = ceilings.get("datasheet_tflops"), ceilings.get("matmul_tflops")
    settings = dict(preset=r["preset"], attention=r["attn_backend"], fused=r["fused"], seq_len=r["seq_len"],
                    dtype=r["dtype"], batch=r.get("batch_size"))
    if r["kind"] != "train":
        part.figure("largest batch that fits", r.get("max_batch"), "sequences", method=r.get("max_batch_method"),
                    capped=r.get("max_batch_capped"), **settings)
        big.append([r["attn_backend"], r["fused"], r.get("max_batch"), r.get("max_batch_method"),
                    "yes" if r.get("max_batch_capped") else ""])
        return
    mfu_measured = r["tflops"] / matmul if r.get("tflops") and matmul else None
    part.figure("training step tokens/s", r.get("tokens_per_s"), "tokens/s", status=r["status"], **settings)
    part.figure("training step TFLOP/s", r.get("tflops"), "TFLOP/s", ceiling=sheet,
                ceiling_name=ceilings.get("datasheet_note"), status=r["status"], mfu_datasheet=r.get("mfu"),
                mfu_measured_matmul=mfu_measured, host_syncs=r.get("host_syncs"), **settings)
    part.figure("training step peak memory", r.get("peak_mem_mib"), "MiB", **settings)
    table.append([r["attn_backend"], r["fused"], r.get("batch_size"), fmt(r.get("tokens_per_s"), ",.0f"),
                  fmt(r.get("tflops"), ".1f"), fmt(100 * r["mfu"] if r.get("mfu") else None, ".1f"),
                  fmt(100 * mfu_measured if mfu_measured else None, ".1f"),
                  fmt(r.get("peak_mem_mib"), ",.0f"), fmt(r.get("host_syncs"), "d"),
                  "" if r["status"] == "ok" else f"{r['status']}: {(r.get('reason') or r.get('error') or '')[:60]}"])
    if r["status"] == "ok" and r.get("mfu_result") in ("PASS", "MISS"):
        part.target(f"MFU >= {MFU_TARGET:.0%} of the datasheet peak ({r['preset']}, {r['attn_backend']} "
                    f"attention, fused {r['fused']}, T {r['seq_len']}, bf16)", r["mfu_result"], r["mfu"],
                    MFU_TARGET, f"{r['tflops']:.0f} TFLOP/s")


# ---------------------------------------------------------------------------- dispatch
PARTS: dict[str, Callable[..., None]] = {
    "env": lambda part, root: env_part(part),
    "correctness": lambda part, root: correctness_part(part),
    "attention": attention_part,
    "ops": ops_part,
    "e2e": e2e_part,
}


def run_part(name: str, stage: str, out_root: Path, deadline: float, dry_run: bool, device: torch.device) -> int:
    """Run one part and write its record; 0 even when units failed (the record says so)."""
    folder = name if stage == "core" else f"{name}-{stage}"
    part = Part(name, stage, out_root / folder, deadline, dry_run, device)
    try:
        PARTS[name](part, out_root)
    except Exception as e:
        traceback.print_exc()
        part.record["status"] = "failed"
        part.record["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
    if part.record["status"] == "running":  # "running" in a record read later: killed at its deadline
        part.record["status"] = "ok"
    part.write()
    return 0 if part.record["status"] != "failed" else 1
