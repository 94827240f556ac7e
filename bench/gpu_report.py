"""One command that measures what a GPU window can tell us, inside a time budget.

    python bench/gpu_report.py --out /tmp/gpu-report              # on a GPU: about 8 minutes
    python bench/gpu_report.py --dry-run --out /tmp/gpu-dry        # on a CPU: every step at tiny sizes
    python bench/gpu_report.py --render /tmp/gpu-report/results.json --into docs/benchmarks.md

Parts, in order (``bench/gpu_parts.py`` runs each in its own process, so a CUDA fault or a hang
in one cannot take the others with it):

1. ``env``          device, driver, torch, triton and Python versions; device-to-device copy
                    bandwidth (1 GiB) and the bf16 matmul rate at 8192^3, the ceilings the later
                    parts are measured against, next to the datasheet peak.
2. ``correctness``  the kernel tests with the interpreter off, the ``gpu``-marked set (bf16 and
                    model-sized shapes). A kernel with a failing test is reported and not timed.
3. ``attention``    flash attention against SDPA: fwd, bwd, fwd+bwd; head dim 128, causal, bf16,
                    N = 4k, 8k, 16k at 16k tokens per batch, 32 query heads over 32 (MHA) and 8
                    (GQA) kv heads; one document-masked case. TFLOP/s, x SDPA, % of the matmul rate.
4. ``ops``          each fused op at one LLaMA-sized shape against eager and torch.compile: GB/s
                    against the copy bandwidth, the linear + cross-entropy's time and peak memory
                    against eager at 16k tokens, V = 128,256.
5. ``e2e``          the trainer's training step, tinyllama-1.1b at 2048 in bf16: tokens/s,
                    TFLOP/s, MFU against the datasheet peak and the measured matmul rate, sdpa vs
                    triton attention x fused ops off vs on; the largest batch for two settings.

Budget. ``--budget`` seconds (default 480) for everything. Each part has a planned time
(``gpu_parts.PLAN``, per unit: env 20 s, tests 110 s, attention 3 x 22 s + 20 s, ops 5 x 26 s,
e2e 4 x 18 s + 2 x 30 s = 478 s, assuming first-use compiles of a few seconds per kernel
configuration and 10-20 s per torch.compile'd mode). A part may run over its plan into the time
left, but never into the half of each later part's plan that is held back for it; a unit whose
plan does not fit what is left is skipped, and the report lists every skipped unit with the
reason. Time left after the five parts widens the run in this order: the rest of the kernel
tests, attention at head dim 64 and fp16 over more lengths, more op shapes.

Output, all under ``--out``: ``results.json`` (every figure with its unit, its ceiling and
settings; every target with its verdict, PASS, MISS or unmeasured; the plan with planned and
used seconds; what was skipped), ``benchmarks.md`` (the Markdown section made from
results.json, one table per part), each part's folder (``part.json``, the benchmarks' own JSON
and CSV, pytest's JUnit XML) and ``log.txt`` with everything the parts printed. ``--render``
rebuilds the section from a ``results.json`` and, with ``--into``, replaces the section between
the markers in a Markdown file (``docs/benchmarks.md``).

Requirements on the GPU machine: torch, triton, pytest and llama_mini installed (a wheel built
here: ``pip wheel --no-deps -w .whl .``); nothing the report runs imports fairscale or zstandard.
``--dry-run`` runs every step on a CPU at tiny sizes (Triton kernels under the interpreter; the
timings mean nothing) and writes the same files; tests/test_gpu_report.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
CORE = ["env", "correctness", "attention", "ops", "e2e"]
WIDE = ["correctness", "attention", "ops"]  # widened in this order while time remains
BEGIN, END = "<!-- gpu-report:begin -->", "<!-- gpu-report:end -->"
GRACE_S = 20  # a worker past its deadline gets this long to write its record before it is killed


def part_plan(dry_run: bool) -> dict[str, float]:
    """Planned seconds of each core part: the sum of its units' plans."""
    from gpu_parts import ATTN_TARGETS, KERNELS, PLAN  # noqa: F401  (PLAN is the single source)

    i = 1 if dry_run else 0
    n_ops = sum(1 for _, script in KERNELS.values() if script)
    return {
        "env": PLAN["env"][i],
        "correctness": PLAN["correctness"][i],
        "attention": (2 if dry_run else 3) * PLAN["attention/N"][i] + PLAN["attention/docs"][i],
        "ops": n_ops * PLAN["ops/op"][i],
        "e2e": 4 * PLAN["e2e/row"][i] + 2 * PLAN["e2e/max-batch"][i],
    }


def wide_plan() -> dict[str, float]:
    from gpu_parts import OP_WIDE, PLAN

    return {"correctness": PLAN["correctness-wide"][0], "attention": PLAN["attention-wide"][0],
            "ops": len(OP_WIDE) * PLAN["ops/wide"][0]}


def part_timeout(remaining: float, later_plans: list[float]) -> float:
    """Seconds a part may run: what is left, less half of every later part's plan."""
    return remaining - 0.5 * sum(later_plans)


# ---------------------------------------------------------------------------- running the parts
def _run_worker(name: str, stage: str, args: argparse.Namespace, deadline: float, log) -> tuple[int | None, str]:
    cmd = [sys.executable, "-u", str(Path(__file__)), "--worker", name, "--stage", stage, "--out", str(args.out),
           "--deadline", repr(deadline), "--device", args.device] + (["--dry-run"] if args.dry_run else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not args.dry_run:
        env["TRITON_INTERPRET"] = "0"  # compiled kernels, whatever the caller's shell says
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)

    def pump() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(1.0, deadline - time.time() + GRACE_S))
        how = "finished"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc, how = proc.wait(), "killed at its deadline"
    reader.join(timeout=5)
    return rc, how


def _status(record: dict | None, how: str) -> str:
    """A part's status for the plan: its record's, "partial" for one killed at its deadline (its
    record holds every unit that finished), "failed" without a record."""
    if record is None:
        return f"failed: wrote no record ({how})"
    if record.get("status") == "running":
        return f"partial ({how})"
    return record["status"]


def run_report(args: argparse.Namespace) -> int:
    from gpu_parts import read_part

    start = time.time()
    end = start + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    plan = part_plan(args.dry_run)
    parts = [p for p in CORE if p in args.parts]
    ledger: list[dict[str, Any]] = []
    with open(args.out / "log.txt", "a", encoding="utf-8") as log:
        def say(msg: str) -> None:
            line = f"[gpu-report {time.time() - start:5.0f}/{args.budget:.0f} s] {msg}"
            print(line, flush=True)
            log.write(line + "\n")

        say(f"plan: {', '.join(f'{p} {plan[p]:.0f} s' for p in parts)} (budget {args.budget:.0f} s"
            f"{', dry run' if args.dry_run else ''})")
        for i, name in enumerate(parts):
            later = [plan[p] for p in parts[i + 1:]]
            allowed = part_timeout(end - time.time(), later)
            entry = {"part": name, "stage": "core", "planned_s": plan[name], "allowed_s": round(allowed, 1)}
            ledger.append(entry)
            if allowed < 0.5 * plan[name]:
                entry.update(status="skipped", used_s=0.0,
                             reason=f"{allowed:.0f} s left for it, half its plan is {0.5 * plan[name]:.0f} s")
                say(f"{name}: skipped ({entry['reason']})")
                continue
            say(f"{name}: start (planned {plan[name]:.0f} s, may use {allowed:.0f} s)")
            t0 = time.time()
            rc, how = _run_worker(name, "core", args, t0 + allowed, log)
            rec = read_part(args.out, name)
            entry.update(used_s=round(time.time() - t0, 1), returncode=rc, how=how, status=_status(rec, how))
            say(f"{name}: {entry['status']} in {entry['used_s']:.0f} s ({how})")
        if not args.dry_run and not args.no_widen:
            for name, need in wide_plan().items():
                if name not in parts:
                    continue
                allowed = end - time.time()
                entry = {"part": name, "stage": "wide", "planned_s": need, "allowed_s": round(allowed, 1)}
                ledger.append(entry)
                if allowed < need:
                    entry.update(status="skipped", used_s=0.0, reason=f"{allowed:.0f} s left, needs {need:.0f} s")
                    say(f"{name} (wide): skipped ({entry['reason']})")
                    continue
                t0 = time.time()
                rc, how = _run_worker(name, "wide", args, t0 + allowed, log)
                rec = read_part(args.out, f"{name}-wide")
                entry.update(used_s=round(time.time() - t0, 1), returncode=rc, how=how, status=_status(rec, how))
                say(f"{name} (wide): {entry['status']} in {entry['used_s']:.0f} s")
        results = collect(args, ledger, time.time() - start)
        path = args.out / "results.json"
        path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        (args.out / "benchmarks.md").write_text(render(results) + "\n", encoding="utf-8")
        say(f"wrote {path} and {args.out / 'benchmarks.md'}")
    print_summary(results)
    failed = [e["part"] for e in ledger if str(e.get("status", "")).startswith("failed")]
    return 1 if failed else 0


def collect(args: argparse.Namespace, ledger: list[dict], elapsed: float) -> dict[str, Any]:
    """results.json: metadata, the plan as it went, and every part's figures, targets, tables."""
    from gpu_parts import read_part

    parts = []
    for e in ledger:
        rec = read_part(args.out, e["part"] if e["stage"] == "core" else f"{e['part']}-{e['stage']}")
        if rec is not None and e.get("status") != "skipped":
            parts.append(rec)
    env = next((p.get("env") for p in parts if p["part"] == "env"), None) or {}
    skipped = [{"part": e["part"], "stage": e["stage"], "unit": "(whole part)", "reason": e["reason"]}
               for e in ledger if e.get("status") == "skipped"]
    skipped += [{"part": p["part"], "stage": p["stage"], **s} for p in parts for s in p["skipped"]]
    return {
        "metadata": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dry_run": args.dry_run,
            "budget_s": args.budget, "elapsed_s": round(elapsed, 1), "command": " ".join(sys.argv),
            "device_name": env.get("device_name"), "driver": env.get("driver"), "torch": env.get("torch"),
            "triton": env.get("triton"), "python": env.get("python_full"), "cuda": env.get("cuda_version"),
        },
        "ceilings": next((p.get("ceilings") for p in parts if p["part"] == "env"), None),
        "plan": ledger,
        "figures": [{"part": p["part"], "stage": p["stage"], **f} for p in parts for f in p["figures"]],
        "targets": [{"part": p["part"], **t} for p in parts for t in p["targets"]],
        "tables": [{"part": p["part"], **t} for p in parts for t in p["tables"]],
        "skipped": skipped,
        "notes": [f"{p['part']}: {n}" for p in parts for n in p.get("notes", [])]
                 + [f"{p['part']}: failed: {p['error']}" for p in parts if p.get("error")],
    }


# ---------------------------------------------------------------------------- the Markdown section
def _cell(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x).replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    from common import markdown_table

    return markdown_table(header, [[_cell(c) for c in row] for row in rows]).splitlines()


def render(results: dict[str, Any] | None) -> str:
    """The docs/benchmarks.md section for ``results`` (None: the state before any GPU run)."""
    out = [BEGIN]
    if results is None:
        out += ["## GPU report", "",
                "No GPU run yet: every GPU figure and target below is **unmeasured**. The first GPU window runs "
                "`bash bench/gpu_run.sh` (`python bench/gpu_report.py`; see the top of this page) and replaces this "
                "section with its own.", "",
                "| target | verdict |", "|---|---|"]
        from gpu_parts import ATTN_TARGETS, MFU_TARGET

        names = [f"kernel tests pass, compiled, on the GPU ({k})" for k in _kernel_names()]
        names += [f"flash attention {m} >= {b}x SDPA (D 128, causal, bf16, N 4k-16k, MHA and GQA)"
                  for m, b in ATTN_TARGETS.items()]
        names += _op_target_labels()
        names += [f"MFU >= {MFU_TARGET:.0%} of the datasheet peak (tinyllama-1.1b, T 2048, bf16)"]
        out += [f"| {n} | unmeasured |" for n in names]
        return "\n".join(out + [END])
    m = results["metadata"]
    kind = "dry run on a CPU (timings mean nothing)" if m["dry_run"] else "GPU run"
    out += [f"## GPU report: {m['device_name']}, {m['date'][:10]}", "",
            f"{kind}; torch {m['torch']}, triton {m['triton']}, Python {m['python']}, driver {m['driver'] or '-'}, "
            f"CUDA {m['cuda'] or '-'}. Budget {m['budget_s']:.0f} s, used {m['elapsed_s']:.0f} s. "
            f"Command: `{m['command']}`.", "", "### Plan", ""]
    out += _md_table(["part", "stage", "planned s", "used s", "status"],
                     [[e["part"], e["stage"], f"{e['planned_s']:.0f}", f"{e.get('used_s', 0):.0f}",
                       e.get("status", "-") + (f" ({e['reason']})" if e.get("reason") else "")]
                      for e in results["plan"]])
    for t in results["tables"]:
        out += ["", f"### {t['title']}", ""] + _md_table(t["header"], t["rows"])
        out += [""] + [f"- {n}" for n in t.get("notes", [])] if t.get("notes") else []
    out += ["", "### Targets", ""]
    out += _md_table(["target", "value", "bound", "verdict", "note"],
                     [[t["target"], t["value"], t["bound"], f"**{t['verdict']}**", t["note"]] for t in results["targets"]])
    out += ["", "### Skipped for lack of time or failure", ""]
    out += [f"- {s['part']} ({s['stage']}): {s['unit']}: {s['reason']}" for s in results["skipped"]] or ["- nothing"]
    if results["notes"]:
        out += ["", "### Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(out + [END])


def _kernel_names() -> list[str]:
    from gpu_parts import KERNELS

    return list(KERNELS)


def _op_target_labels() -> list[str]:
    import importlib

    from gpu_parts import KERNELS

    labels = []
    for _, script in KERNELS.values():
        if script:
            labels += [t.label for t in importlib.import_module(script).OP.targets]
    return labels


def render_into(results_path: Path | None, doc: Path) -> None:
    """Replace the section between the markers of ``doc`` (appended if it has none)."""
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path else None
    section = render(results)
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    doc.write_text(text, encoding="utf-8")


def print_summary(results: dict[str, Any]) -> None:
    counts: dict[str, int] = {}
    for t in results["targets"]:
        counts[t["verdict"]] = counts.get(t["verdict"], 0) + 1
    print("\ntargets: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    for t in results["targets"]:
        if t["verdict"] != "PASS":
            print(f"  {t['verdict']:<10} {t['target']}" + (f" ({t['note']})" if t["note"] else ""))
    if results["skipped"]:
        print("skipped:")
        for s in results["skipped"]:
            print(f"  {s['part']} ({s['stage']}) {s['unit']}: {s['reason']}")


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/gpu_report.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The module docstring explains the parts, the budget and the outputs.")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole report (default 480)")
    p.add_argument("--out", type=Path, default=None, help="folder for everything the run writes (required to run)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, interpreter: exercise every step")
    p.add_argument("--device", default=None, help="device to measure (default: cuda, or cpu with --dry-run)")
    p.add_argument("--parts", default=",".join(CORE), help=f"comma-separated subset of {', '.join(CORE)}")
    p.add_argument("--no-widen", action="store_true", help="stop after the core parts even with time left")
    p.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                   help="render the Markdown section of a results.json instead of running ('none': the "
                        "unmeasured section)")
    p.add_argument("--into", type=Path, default=None, help="with --render: replace the section in this Markdown file")
    p.add_argument("--worker", choices=CORE, help=argparse.SUPPRESS)
    p.add_argument("--stage", choices=["core", "wide"], default="core", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.render is not None:
        results_path = None if str(args.render) == "none" else args.render
        if results_path is not None and not results_path.is_file():
            parser.error(f"--render: no such file: {results_path}")
        if args.into is not None:
            render_into(results_path, args.into)
            print(f"updated the GPU report section of {args.into}")
        else:
            print(render(json.loads(results_path.read_text(encoding="utf-8")) if results_path else None))
        return 0
    if args.out is None:
        parser.error("--out is required: the folder everything the run writes goes into")
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not args.parts or any(x not in CORE for x in args.parts):
        parser.error(f"--parts takes any of {', '.join(CORE)}, got {args.parts}")
    args.device = args.device or ("cpu" if args.dry_run else "cuda")

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU machine, or use --dry-run to exercise the steps on a CPU")
    if args.worker:
        from gpu_parts import run_part

        if args.dry_run:
            torch.set_num_threads(1)
        return run_part(args.worker, args.stage, args.out, args.deadline or time.time() + args.budget, args.dry_run,
                        torch.device(args.device))
    if args.dry_run and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        os.environ["TRITON_INTERPRET"] = "1"  # the workers inherit it: Triton kernels run on the CPU
    return run_report(args)


if __name__ == "__main__":
    sys.exit(main())
