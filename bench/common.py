"""Shared, model-independent helpers for the benchmark scripts in ``bench/``.

Not a runnable script. A script in ``bench/`` imports it with ``from common import ...``, which
works because ``python bench/<script>.py`` puts ``bench/`` first on ``sys.path``. It depends on
torch and ``llama_mini.hardware`` (the installed llama_mini; triton is optional), so kernel
microbenchmarks and end-to-end benchmarks can share it. What it offers:

errors        ``is_oom(e)``: an out-of-memory error (allocator or cuBLAS workspace).
options       ``parse_overrides``: ``FIELD=VALUE`` items to a dict of Python literals; ``int_list`` and
              ``name_list``: comma-separated option values, errors naming the option.
environment   ``resolve_device`` (``auto`` -> cuda if available, else cpu), ``environment`` (device
              type and name, CPU model and count, torch threads, platform, load average, CUDA
              properties), ``versions`` (torch, triton, python), ``utc_now_iso`` / ``utc_stamp``
              (dates for metadata and file names), ``cpu_model``, ``cpu_busy`` (fraction of the
              CPUs other processes keep busy, from ``/proc/stat``), ``warn_if_cpu_busy``,
              ``load_avg_1m``, ``triton_version``, ``release`` (gc + CUDA cache).
timing        ``synchronizer(device)``; ``Timer``: per-call milliseconds of a zero-argument
              callable with ``triton.testing.do_bench`` (L2 flushed, ``rep`` stretched to cover a
              few slow calls; CUDA events if it fails), CUDA events, or wall-clock after warmup;
              ``Timer.from_args`` reads ``--timer --warmup --repeats --warmup-ms --rep-ms``.
memory        ``peak_memory(fn, device)``: ``torch.cuda.max_memory_allocated`` MiB over one call,
              or (None, the reason) on devices without allocator statistics.
ceilings      ``PEAK_TFLOPS`` (NVIDIA datasheet dense peaks, owned by ``llama_mini.hardware``)
              and ``peak_tflops`` (look-up by device name and dtype, tf32 aware).
output        ``results_dir(script)`` (``bench/results/<script>/``), ``result_paths``, ``fmt`` and
              ``format_table`` (aligned text tables), ``markdown_table`` (GitHub Markdown),
              ``write_json`` and ``write_csv`` (metadata as
              leading ``# key: value`` lines), ``HelpFormatter`` for argparse, ``DTYPES``.
"""

from __future__ import annotations

import argparse
import ast
import csv
import datetime as _dt
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent

# Dense datasheet peaks (TFLOP/s) by GPU name. llama_mini.hardware owns the table so that the
# trainer's MFU and the benchmarks' ceilings agree; importing it does not import triton.
# The benchmarks import the installed llama_mini (``pip install -e .`` in a checkout): the
# checkout root is never put on sys.path, because its kernels/ and data/ folders would shadow
# Hugging Face's ``kernels`` package and any other top-level ``data``.
try:
    from llama_mini import hardware as _hardware
except ModuleNotFoundError as e:  # pragma: no cover - a checkout that was never installed
    if e.name != "llama_mini":
        raise
    raise SystemExit(f"error: llama_mini is not installed: run pip install -e {BENCH_DIR.parent} first") from None

PEAK_TFLOPS = _hardware.PEAK_TFLOPS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Short names accepted by the scripts' --dtypes, mapped to the keys of DTYPES.
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}

# Metadata written as ``# key: value`` lines at the top of every CSV.
CSV_META_KEYS = ("date", "device_name", "torch", "triton", "python", "timing", "precision", "config")


# ---------------------------------------------------------------------------- command line
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows a default only where it means something (not None, [], False or a [bracketed] one).

    ``--out`` never shows its default: it is an absolute path of this checkout, so its help
    text says it in brackets instead.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        d = action.default
        if d is None or d is False or d == [] or "[" in (action.help or "") or action.dest == "out":
            return action.help or ""
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------- environment
def is_oom(e: BaseException) -> bool:
    """The allocator raises OutOfMemoryError; cuBLAS/cuDNN workspaces fail with a RuntimeError."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["dim=256", "norm_impl=torch"]`` -> ``{"dim": 256, "norm_impl": "torch"}``: each value a Python
    literal where it parses as one, else the bare string. ``ValueError`` names a malformed item."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--override expects FIELD=VALUE, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value  # a bare string such as norm_impl=torch
    return out


def int_list(option: str, text: str) -> list[int]:
    """``"100,250"`` -> ``[100, 250]``: positive integers, or ``ValueError`` naming ``option``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{option} takes positive integers, got {text!r}")
    return values


def name_list(option: str, text: str, allowed: Sequence[str]) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each one of ``allowed``, or ``ValueError`` naming ``option``."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"{option}: unknown {bad or text!r}; choose from {', '.join(allowed)}")
    return names


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def add_device_arguments(group: argparse._ArgumentGroup) -> None:
    """``--device`` and ``--threads``, which :func:`start_device` acts on."""
    group.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda, cuda:1, cpu")
    group.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs [torch's default]")


def start_device(device: torch.device | str, threads: int | None) -> torch.device:
    """Resolve the device, refuse CUDA when this torch build has none, apply ``--threads``."""
    resolved = device if isinstance(device, torch.device) else resolve_device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: this torch build ({torch.__version__}) sees no CUDA device")
    if threads:
        torch.set_num_threads(threads)
    return resolved


cpu_model = _hardware.cpu_model


def cpu_busy(seconds: float = 0.3) -> float | None:
    """Fraction of all CPUs busy over a short idle wait of ours: other processes' load (Linux)."""
    def snapshot() -> tuple[int, int]:
        with open("/proc/stat", encoding="utf-8") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals), vals[3] + (vals[4] if len(vals) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = snapshot()
        time.sleep(seconds)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    return round(1 - (idle1 - idle0) / max(total1 - total0, 1), 3)


def load_avg_1m() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def triton_version() -> str | None:
    try:
        import triton
    except Exception:  # not installed, or broken: either way not usable for timing
        return None
    return getattr(triton, "__version__", "unknown")


def versions() -> dict[str, str | None]:
    """Library versions for the metadata: torch, triton (None if it does not import), python."""
    return {"torch": torch.__version__, "triton": triton_version(), "python": platform.python_version()}


def utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def utc_stamp() -> str:
    """UTC time for file names, e.g. 20250101-120000."""
    return f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}"


def environment(device: torch.device) -> dict[str, Any]:
    """Device and host description; samples other processes' CPU load (0.3 s) on CPU runs."""
    env: dict[str, Any] = {
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or None,
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "load_avg_1m_at_start": load_avg_1m(),
        "cpu_busy_by_others_at_start": cpu_busy() if device.type == "cpu" else None,
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        env.update(
            device_name=torch.cuda.get_device_name(idx),
            compute_capability=f"{props.major}.{props.minor}",
            total_memory_gib=round(props.total_memory / 2**30, 2),
            cuda_version=torch.version.cuda,
            allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    elif device.type == "cpu":
        env["device_name"] = env["cpu_model"] or env["processor"] or platform.machine()
    else:
        env["device_name"] = str(device)
    return env


def warn_if_cpu_busy(env: dict[str, Any], threshold: float = 0.25) -> None:
    """On a shared machine another busy process can slow multi-threaded CPU kernels by 10x."""
    busy = env.get("cpu_busy_by_others_at_start")
    if busy is not None and busy > threshold:
        print(f"warning: other processes keep {busy:.0%} of the {os.cpu_count()} CPUs busy, so timings will be "
              "noisy (multi-threaded kernels suffer most; try --threads 1)", file=sys.stderr)


def release(device: torch.device) -> None:
    """Frees what the last configuration left behind before the next one is measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_tflops(device_name: str, dtype: str, device: torch.device) -> tuple[float | None, str]:
    """(dense peak TFLOP/s for ``dtype`` on this device, where the figure comes from) or (None, why)."""
    if device.type != "cuda":
        return None, f"no datasheet peak for device type {device.type!r}; give --peak-tflops"
    tflops, note = _hardware.datasheet_tflops(device_name, dtype)
    return (tflops, note) if tflops is not None else (None, f"{note}; give --peak-tflops")


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cpu":
        return lambda: None
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    mod = getattr(torch, device.type, None)  # torch.mps, torch.xpu, ...
    if mod is not None and hasattr(mod, "synchronize"):
        return mod.synchronize
    return lambda: None


# ---------------------------------------------------------------------------- timing
class Timer:
    """Times a zero-argument callable; returns per-call milliseconds.

    method: ``auto`` (do_bench on CUDA if triton imports, else CUDA events; wall-clock
    elsewhere), ``do_bench``, ``cuda-events`` or ``wall``. ``warmup`` and ``repeats`` are call
    counts for the wall and cuda-events timers; ``warmup_ms`` and ``rep_ms`` are do_bench's
    budgets, with ``rep`` stretched so that at least min(5, repeats) calls are timed.
    """

    def __init__(self, device: torch.device, method: str = "auto", *, warmup: int = 5, repeats: int = 20,
                 warmup_ms: float = 50.0, rep_ms: float = 200.0) -> None:
        self.device, self.sync = device, synchronizer(device)
        self.warmup, self.repeats, self.warmup_ms, self.rep_ms = warmup, repeats, warmup_ms, rep_ms
        if method == "auto":
            if device.type == "cuda":
                method = "do_bench" if triton_version() is not None else "cuda-events"
            else:
                method = "wall"
        if method in ("do_bench", "cuda-events") and device.type != "cuda":
            raise SystemExit(f"--timer {method} needs a CUDA device, got {device}")
        self.method = method

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
        """The "timing" argument group that ``from_args`` reads; returns it for more options."""
        t = parser.add_argument_group("timing")
        t.add_argument("--timer", default="auto", choices=["auto", "do_bench", "cuda-events", "wall"],
                       help="auto: do_bench on CUDA if triton imports, else CUDA events; wall clock elsewhere")
        t.add_argument("--warmup", type=int, default=5, help="untimed calls (wall and cuda-events timers)")
        t.add_argument("--repeats", type=int, default=20, help="timed calls (wall and cuda-events timers)")
        t.add_argument("--warmup-ms", type=float, default=50.0, help="do_bench warmup budget in ms")
        t.add_argument("--rep-ms", type=float, default=200.0, help="do_bench timing budget in ms")
        return t

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> "Timer":
        """From ``args.timer``, ``args.warmup``, ``args.repeats``, ``args.warmup_ms``, ``args.rep_ms``."""
        return cls(device, args.timer, warmup=args.warmup, repeats=args.repeats,
                   warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)

    def describe(self) -> dict[str, str]:
        """The ``timing`` entry of the metadata."""
        return {
            "method": self.method,
            "statistic": "median and min of per-call times (ms)",
            "wall/cuda-events": f"{self.warmup} warmup + {self.repeats} timed calls",
            "do_bench": f"warmup={self.warmup_ms} ms, rep={self.rep_ms} ms, L2 flushed before each call",
        }

    def __call__(self, fn: Callable[[], Any]) -> tuple[list[float], str]:
        """(per-call ms, the timer that produced them: may say do_bench failed)."""
        if self.method == "do_bench":
            try:
                return self._do_bench(fn), "do_bench"
            except Exception as e:  # visible, never silent: the row's timer field says so
                print(f"  do_bench failed ({type(e).__name__}: {e}); timing with CUDA events", file=sys.stderr)
                return self._events(fn), "cuda-events (do_bench failed)"
        if self.method == "cuda-events":
            return self._events(fn), "cuda-events"
        return self._wall(fn), "wall"

    def _do_bench(self, fn: Callable[[], Any]) -> list[float]:
        from triton.testing import do_bench

        # do_bench times rep/estimate calls; a slow call (a long decode loop, a big model)
        # would leave a single sample, so stretch rep to cover a few calls.
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        one_ms = (time.perf_counter() - t0) * 1e3
        kw = dict(warmup=self.warmup_ms, rep=max(self.rep_ms, min(5, self.repeats) * one_ms * 1.2))
        try:
            times = do_bench(fn, return_mode="all", **kw)
        except (AssertionError, TypeError):  # older triton: no return_mode="all"
            times = do_bench(fn, quantiles=[0.5, 0.0], **kw)  # (median, min)
        return [float(t) for t in times]

    def _events(self, fn: Callable[[], Any]) -> list[float]:
        for _ in range(self.warmup):
            fn()
        n = self.repeats
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    def _wall(self, fn: Callable[[], Any]) -> list[float]:
        for _ in range(self.warmup):
            fn()
            self.sync()
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return times


def peak_memory(fn: Callable[[], Any], device: torch.device, what: str = "the model's") -> tuple[float | None, str | None]:
    """Peak allocated MiB over one call of fn (after warmup), or (None, why not).

    Call it outside the timed loop: do_bench's 256 MB L2-flush buffer would otherwise count.
    ``what`` names whose peak it is in the note for devices where it is not measured.
    """
    if device.type != "cuda":
        return None, (
            f"not measured on {device.type}: PyTorch keeps no allocator statistics for this device, "
            f"and process RSS (interpreter, caches, other models) would not be {what} peak"
        )
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20, None


# ---------------------------------------------------------------------------- output
def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None (with a note on stderr) when matplotlib
    is not installed: plots are optional, the numbers are not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no plot was written "
              "(pip install matplotlib, or pip install -e '.[plot]')", file=sys.stderr)
        return None
    return plt


def results_dir(script: str) -> Path:
    """Default output directory of a script: ``bench/results/<script>/`` of this checkout."""
    return BENCH_DIR / "results" / script


def result_paths(out: Path, stem: str, exts: Sequence[str] = ("json", "csv", "png")) -> tuple[Path, ...]:
    return tuple(out / f"{stem}.{ext}" for ext in exts)


def fmt(value: Any, spec: str) -> str:
    """A table cell: ``-`` for None, ``format(value, spec)`` for numbers, ``str`` otherwise."""
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def format_table(header: Sequence[str], body: Iterable[Sequence[str]], n_left: int = 0,
                 notes: Iterable[str] = ()) -> str:
    """Aligned text table: the first ``n_left`` columns left-aligned, the rest right-aligned,
    a dashed rule under the header, then ``notes`` one per line."""
    cells = [list(header)] + [list(row) for row in body]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i >= n_left else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + list(notes))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[bool] | None = None) -> str:
    """A GitHub Markdown table; ``right[i]`` right-aligns column i (default: all but the first)."""
    right = list(right) if right is not None else [i > 0 for i in range(len(header))]
    rule = ["---:" if r else "---" for r in right]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``{"metadata": meta, "results": rows}``, indented; values JSON cannot hold become strings."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"metadata": meta, "results": rows}, f, indent=2, default=str)
        f.write("\n")


def write_csv(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]], fields: Sequence[str],
              meta_keys: Sequence[str] = CSV_META_KEYS) -> None:
    """``# key: <json>`` lines for ``meta_keys``, then a header and one line per row (None -> empty).

    Read it back with ``pandas.read_csv(path, comment="#")``.
    """
    with open(path, "w", newline="", encoding="utf-8") as f:
        for key in meta_keys:
            f.write(f"# {key}: {json.dumps(meta[key])}\n")
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in fields})
