"""Shared harness of the fused-op microbenchmarks: ``rms_norm.py``, ``rotary.py``, ``swiglu.py``,
``cross_entropy.py`` and ``linear_cross_entropy.py`` in ``bench/``.

Not a runnable script. An op script subclasses :class:`Op` (its sizes, inputs, providers, the
reference, the bytes or FLOPs of a pass, its targets) and calls :func:`run`; this module owns
the rest, so every op is measured the same way:

command line  ``--providers`` (triton, eager, compile), ``--modes`` (fwd, bwd, fwd+bwd),
              ``--dtypes`` (bf16 on GPU, fp32 on CPU), the op's sweep options (CPU-sized
              defaults on a CPU, named in the output), device, timing and output options.
providers     ``triton``: our kernel, imported only when it runs (a module that does not exist
              yet gives skipped rows); skipped with ``kernels.triton_unavailable_reason()``
              where Triton cannot run, and run (slowly: the interpreter, not the kernel, is
              timed) on CPU tensors under ``TRITON_INTERPRET=1``. ``eager`` and ``compile``
              (``torch.compile`` of the reference, ``dynamic=False``, dynamo reset per case)
              come from the op.
check         once per case, before any timing, every provider's forward outputs are compared
              with the op's reference computed in float32 on the same inputs:
              ``rel_err = max|out - ref| / max|ref|`` (worst output) must stay under the
              dtype's ``err_bound``; a miss is a ``failed`` row, never timed (exit status 1).
modes         ``fwd`` under ``torch.no_grad``; ``bwd`` = ``torch.autograd.backward(outputs,
              grad_outputs, retain_graph=True)`` on a graph built once; ``fwd+bwd`` both; input
              gradients are set to None before each call. The first call (compile) is untimed.
              An op may skip a mode for a provider with the reason (``Op.mode_skip``: our
              cross-entropy gradients are computed in the forward and consumed by one backward).
figures       median/min ms (``common.Timer``: do_bench on CUDA, wall clock on CPU); peak memory
              (``common.peak_memory`` outside the timed loop; ``extra_mem_mib`` = peak minus what
              was allocated before the call); memory-bound ops: GB/s = the op's bytes per pass
              (its docstring table; the same count for every provider, so GB/s compares time)
              / median time, ``copy_gbps`` = 2 x buffer bytes / median time of ``dst.copy_(src)``
              on a buffer the size of the case's largest input, timed by the same Timer in the
              same run, and ``pct_of_copy``; compute-bound ops: TFLOP/s from the op's FLOPs.
              ``speedup_vs_eager`` = eager median / row median, ``time_vs_eager`` its inverse,
              ``mem_vs_eager`` = peak / eager's peak (same case, mode and run).
targets       :class:`Target` (e.g. ``pct_of_copy >= 85`` in fwd+bwd): PASS/MISS for the triton
              rows on CUDA; on other devices they are listed as GPU targets, not evaluated.
output        a table on stdout (progress on stderr), ``<name>.json`` (device, versions, date,
              timing, byte formulas, copy bandwidths, config; then the rows), ``<name>.csv``
              (``# key: value`` metadata lines first) and ``<name>.png`` (memory-bound: GB/s
              against size per provider with copy bandwidth as a dashed line, a panel per mode;
              otherwise time and peak-memory bars) in ``--out`` (``bench/results/<op>/``).
errors        a CUDA out-of-memory error is a row with status ``oom``; any other exception a
              ``failed`` row with the error; rows that cannot run are ``skipped`` with a
              ``reason``. The sweep goes on in every case.
"""

from __future__ import annotations

import abc
import argparse
import importlib
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

# The op scripts run as ``python bench/<op>.py``, which puts bench/ first on sys.path.
from common import (  # noqa: E402
    DTYPES, DTYPE_ALIASES, add_device_arguments, cpu_busy, environment, fmt, format_table, HelpFormatter,
    is_oom, load_avg_1m, peak_memory, pyplot, release, resolve_device, result_paths, results_dir, start_device, Timer,
    utc_now_iso, utc_stamp, versions, warn_if_cpu_busy, write_csv, write_json,
)
from llama_mini import kernels  # noqa: E402
from llama_mini.kernels.common import is_interpreting  # noqa: E402

PROVIDERS = ("triton", "eager", "compile")
MODES = ("fwd", "bwd", "fwd+bwd")
ERR_BOUND = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}  # on rel_err, against the fp32 reference
INTERPRETER_NOTE = ("TRITON_INTERPRET=1: ran in Triton's CPU interpreter; the time is the interpreter's, "
                    "not the kernel's")

ROW_FIELDS = ["op", "provider", "mode", "dtype"]  # then the op's case fields, then:
RESULT_FIELDS = [
    "size_mib", "status", "reason", "error", "note", "median_ms", "min_ms", "n_timed", "timer", "bytes", "gbps",
    "copy_gbps", "pct_of_copy", "flops", "tflops", "speedup_vs_eager", "time_vs_eager", "peak_mem_mib",
    "extra_mem_mib", "mem_vs_eager", "peak_mem_note", "correct", "max_abs_err", "rel_err", "err_bound", "target",
    "target_note",
]


class Skip(Exception):
    """Raised while building a provider that cannot run here; its rows become ``skipped``."""


@dataclass
class Inputs:
    """Positional arguments shared by every provider of a case, and which of them get gradients."""
    args: tuple
    grad: tuple[int, ...]


@dataclass(frozen=True)
class Target:
    """``field op bound`` for the triton rows of ``modes`` where ``where(row)`` holds (CUDA only)."""
    label: str
    field: str
    op: str  # ">=" or "<="
    bound: float
    modes: tuple[str, ...] = MODES
    where: Callable[[dict], bool] = lambda row: True

    def applies(self, row: dict) -> bool:
        return row["provider"] == "triton" and row["status"] == "ok" and row["mode"] in self.modes and self.where(row)

    def verdict(self, row: dict) -> tuple[str, str]:
        """("PASS" | "MISS" | "n/a", a note with the value)."""
        value = row.get(self.field)
        if value is None:
            return "n/a", f"{self.label}: n/a ({self.field} not measured in this run)"
        ok = value >= self.bound if self.op == ">=" else value <= self.bound
        return ("PASS" if ok else "MISS"), f"{self.label}: {self.field} {value:.3g} {self.op} {self.bound:g}"


class Op(abc.ABC):
    """One op's benchmark definition; subclasses fill in the class attributes and implement the
    four abstract methods."""
    name = ""                  # script and results directory name
    title = ""                 # one line for the header and the plot
    doc = ""                   # the script's docstring (help text)
    memory_bound = True        # GB/s against copy bandwidth; else TFLOP/s (if flops) and bars
    sweep: dict[str, tuple[str, str, str]] = {}  # option: (GPU default, CPU default, help)
    case_fields: tuple[str, ...] = ()            # columns describing a case (row and CSV)
    table_cols: tuple[tuple[str, str, str], ...] = ()  # (header, case field, format) in the table
    group_fields: tuple[str, ...] = ()           # case fields that split the plot into rows of panels
    cpu_providers = "triton,eager,compile"
    targets: tuple[Target, ...] = ()
    bytes_doc: dict[str, str] = {}               # mode: formula, for the metadata
    flops_doc = ""
    precision = "inputs in the row's dtype"

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        """Options that do not depend on the device (e.g. eps)."""

    @abc.abstractmethod
    def cases(self, args: argparse.Namespace) -> list[dict]:
        """The sweep from the parsed options; raise ValueError on bad values. Each case has a
        ``size`` label (e.g. "16384x4096") and the ``case_fields``."""

    def skip_case(self, case: dict, dtype: str) -> str | None:
        return None

    @abc.abstractmethod
    def make_inputs(self, case: dict, dtype: torch.dtype, device: torch.device, args) -> Inputs:
        """The op's input tensors for one case, in ``dtype`` on ``device``."""

    @abc.abstractmethod
    def build(self, provider: str, case: dict, args) -> Callable:
        """fn(*inputs.args) -> tensor or tuple of tensors (the reference's outputs, in order)."""

    @abc.abstractmethod
    def reference(self, case: dict, inputs: Inputs, args) -> tuple[torch.Tensor, ...]:
        """The op's outputs computed in float32 from the same inputs."""

    def pass_bytes(self, case: dict, dtype: torch.dtype) -> dict[str, int]:
        """Bytes each pass must move: {"fwd": .., "bwd": ..} (+ "fwd+bwd"; default their sum)."""
        return {}

    def flops(self, case: dict, mode: str) -> int | None:
        return None

    def error_bound(self, dtype: str, device: torch.device) -> float:
        return ERR_BOUND[dtype]

    def note(self, provider: str, mode: str) -> str | None:
        """A note for the row (e.g. where the work of a mode really happens)."""
        return None

    def mode_skip(self, provider: str, mode: str) -> str | None:
        """Why ``provider`` cannot be timed in ``mode`` (e.g. a graph that one backward consumes)."""
        return None

    def bytes_moved(self, case: dict, dtype: torch.dtype, mode: str) -> int | None:
        b = self.pass_bytes(case, dtype)
        if not b:
            return None
        return b.get(mode, b["fwd"] + b["bwd"] if mode == "fwd+bwd" else None)


# ---------------------------------------------------------------------------- helpers for op scripts
def esize(dtype: torch.dtype) -> int:
    """Bytes per element."""
    return torch.empty((), dtype=dtype).element_size()


def load_kernel(module: str, name: str) -> Callable:
    """``module.name``, importing it now (it imports triton); a module that does not exist yet skips."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise Skip(f"{module} does not exist in this checkout") from e
        raise
    return getattr(mod, name)


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=False)`` after a dynamo reset: one set of graphs per case."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def parse_shapes(text: str, names: Sequence[str]) -> list[dict]:
    """'16384x4096,1024x512' -> [{'size': '16384x4096', names[0]: 16384, names[1]: 4096}, ...]."""
    out = []
    for item in _split(text):
        parts = item.split("x")
        if len(parts) != len(names) or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"size {item!r}: expected {'x'.join(n.upper() for n in names)} with positive integers")
        out.append({"size": item, **{n: int(p) for n, p in zip(names, parts)}})
    if not out:
        raise ValueError(f"no sizes in {text!r}")
    return out


def ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in _split(text)]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{what}: expected comma-separated positive integers, got {text!r}")
    return values


def _split(text: str) -> list[str]:
    return [x.strip().lower() for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------------- command line
def parse_args(op: Op, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python bench/{op.name}.py", description=op.doc.split("\n\n")[0],
                                epilog="Defaults in [brackets] depend on the device (GPU; CPU). The module "
                                "docstring explains every figure.", formatter_class=HelpFormatter)
    sweep = {**op.sweep,
             "dtypes": ("bfloat16", "float32", "dtypes: bf16/bfloat16, fp16/float16, fp32/float32"),
             "providers": (",".join(PROVIDERS), op.cpu_providers, f"any of {', '.join(PROVIDERS)}")}
    s = p.add_argument_group("sweep (comma-separated lists)")
    for name, (gpu, cpu, what) in sweep.items():
        s.add_argument("--" + name.replace("_", "-"), dest=name, help=f"{what} [{gpu}; {cpu}]")
    s.add_argument("--modes", default=",".join(MODES), help=f"any of {', '.join(MODES)}")
    s.add_argument("--seed", type=int, default=0, help="seed of the random inputs and output gradients")
    op.add_arguments(s)

    d = p.add_argument_group("device")
    add_device_arguments(d)

    Timer.add_arguments(p)

    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=results_dir(op.name),
                   help=f"directory for the JSON, CSV and PNG [bench/results/{op.name}/ of this checkout]")
    o.add_argument("--name", default=None, help=f"file stem of the outputs [{op.name}_<device>_<UTC time>]")
    o.add_argument("--no-plot", action="store_true", help="do not write the PNG")

    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    on_cpu = args.device.type == "cpu"
    args.cpu_defaults = []  # sweep options that took the CPU-sized default
    for name, (gpu, cpu, _) in sweep.items():
        if getattr(args, name) is None:
            setattr(args, name, cpu if on_cpu else gpu)
            if on_cpu:
                args.cpu_defaults.append(name)
    args.dtypes = [DTYPE_ALIASES.get(x, x) for x in _split(args.dtypes)]
    args.modes, args.providers = _split(args.modes), _split(args.providers)
    for flag, values, allowed in (("dtypes", args.dtypes, DTYPES), ("modes", args.modes, MODES),
                                  ("providers", args.providers, PROVIDERS)):
        if not values or any(v not in allowed for v in values):
            p.error(f"--{flag} takes any of {', '.join(allowed)}; got {values}")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    try:
        args.cases = op.cases(args)
    except ValueError as e:
        p.error(str(e))
    return args


# ---------------------------------------------------------------------------- measuring

def _failure(e: BaseException) -> dict[str, str]:
    """Row fields for an exception: skipped / oom with the reason, or failed with the error."""
    msg = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
    if isinstance(e, Skip):
        return {"status": "skipped", "reason": str(e)}
    if is_oom(e):
        return {"status": "oom", "reason": msg}
    traceback.print_exception(e, file=sys.stderr)
    return {"status": "failed", "error": msg}


def triton_skip_reason(device: torch.device) -> str | None:
    """Why the triton provider cannot run on ``device`` in this process, or None."""
    if not kernels.triton_available():
        return f"triton cannot run here: {kernels.triton_unavailable_reason()}"
    if device.type == "cpu" and not is_interpreting():
        return "the inputs are CPU tensors and TRITON_INTERPRET is not set: Triton kernels need CUDA tensors"
    if device.type != "cpu" and is_interpreting():
        return "TRITON_INTERPRET=1 is set: the interpreter runs on CPU tensors; unset it to time the kernels"
    return None


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def compare(outs: tuple[torch.Tensor, ...], refs: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """(max abs error, max over outputs of max|out - ref| / max|ref|); NaN anywhere gives NaN."""
    if len(outs) != len(refs):
        raise ValueError(f"{len(outs)} outputs, the reference has {len(refs)}")
    worst_abs, worst_rel = 0.0, 0.0
    for o, r in zip(outs, refs):
        if tuple(o.shape) != tuple(r.shape):
            raise ValueError(f"output shape {tuple(o.shape)} != reference shape {tuple(r.shape)}")
        err = (o.float() - r.float()).abs().max().item()
        scale = r.float().abs().max().item()
        rel = err / scale if scale > 0 else err
        worst_abs = err if err != err or err > worst_abs else worst_abs  # NaN sticks
        worst_rel = rel if rel != rel or rel > worst_rel else worst_rel
    return worst_abs, worst_rel


def copy_bandwidth(nbytes: int, device: torch.device, timer: Timer) -> dict[str, Any]:
    """``dst.copy_(src)`` of an ``nbytes`` buffer: it reads and writes nbytes, so GB/s = 2 nbytes / t."""
    times, how = _time_copy(nbytes, device, timer)
    release(device)  # the buffers died with _time_copy's frame
    ms = statistics.median(times)
    return {"bytes": nbytes, "median_ms": ms, "gbps": 2 * nbytes / (ms * 1e-3) / 1e9, "timer": how}


def _time_copy(nbytes: int, device: torch.device, timer: Timer) -> tuple[list[float], str]:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first call untimed, as for the ops
    return timer(lambda: dst.copy_(src))


def make_call(fn: Callable, inputs: Inputs, mode: str) -> Callable[[], None]:
    """The zero-argument callable one timed call of ``mode`` runs."""
    args = inputs.args
    if mode == "fwd":
        def fwd() -> None:
            with torch.no_grad():
                fn(*args)
        return fwd
    leaves = list(args)
    for i in inputs.grad:
        leaves[i] = args[i].detach().requires_grad_()
    grads = [leaves[i] for i in inputs.grad]

    def forward() -> list[torch.Tensor]:
        return [o for o in _as_tuple(fn(*leaves)) if o.requires_grad]

    outs = forward()
    # an output gradient per output: random for tensors, 1 for a scalar loss
    douts = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outs]
    kept = outs if mode == "bwd" else None  # the graph every bwd call walks again
    del outs

    def call() -> None:
        for g in grads:
            g.grad = None  # fresh gradients: no accumulate kernel timed
        torch.autograd.backward(kept if kept is not None else forward(), douts, retain_graph=kept is not None)
    return call


def time_mode(fn: Callable, inputs: Inputs, mode: str, timer: Timer, device: torch.device) -> dict[str, Any]:
    call = make_call(fn, inputs, mode)
    call()  # first call: compile, autotune, lazy initialisation; never timed
    before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
    mem, note = peak_memory(call, device, "the op's")
    times, how = timer(call)
    return dict(median_ms=statistics.median(times), min_ms=min(times), n_timed=len(times), timer=how,
                peak_mem_mib=mem, extra_mem_mib=None if mem is None else mem - before, peak_mem_note=note)


# ---------------------------------------------------------------------------- one case
def run_case(op: Op, args, timer: Timer, case: dict, dtype_name: str, copies: list[dict]) -> list[dict]:
    """Every provider x mode of one case and dtype, skipped and failed rows included."""
    device, dtype = args.device, DTYPES[dtype_name]
    fields = ROW_FIELDS + list(op.case_fields) + RESULT_FIELDS
    rows: dict[tuple[str, str], dict] = {}
    for pr in args.providers:
        for m in args.modes:
            rows[(pr, m)] = {**{k: None for k in fields}, **{k: case[k] for k in op.case_fields}, "op": op.name,
                             "provider": pr, "mode": m, "dtype": dtype_name, "status": "ok",
                             "bytes": op.bytes_moved(case, dtype, m), "flops": op.flops(case, m),
                             "note": INTERPRETER_NOTE if pr == "triton" and is_interpreting() else op.note(pr, m)}

    def put(provider: str, modes, **values) -> None:
        for m in modes:
            rows[(provider, m)].update(values)

    why = op.skip_case(case, dtype_name)
    if why:
        for pr in args.providers:
            put(pr, args.modes, status="skipped", reason=why, note=None)
        return list(rows.values())
    try:
        torch.manual_seed(args.seed)
        inputs = op.make_inputs(case, dtype, device, args)
    except Exception as e:
        for pr in args.providers:
            put(pr, args.modes, **_failure(e))
        release(device)
        return list(rows.values())
    largest = max(t.nbytes for t in inputs.args if isinstance(t, torch.Tensor))
    for pr in args.providers:
        put(pr, args.modes, size_mib=largest / 2**20)

    # Pass 1: build and check every provider; the float32 reference is freed before any timing.
    ready: dict[str, Callable] = {}
    ref = None
    bound = op.error_bound(dtype_name, device)
    for pr in args.providers:
        reason = triton_skip_reason(device) if pr == "triton" else None
        if reason:
            put(pr, args.modes, status="skipped", reason=reason, note=None)
            continue
        try:
            if ref is None:
                with torch.no_grad():
                    ref = tuple(r.detach() for r in op.reference(case, inputs, args))
            fn = op.build(pr, case, args)
            with torch.no_grad():
                err, rel = compare(_as_tuple(fn(*inputs.args)), ref)
        except Exception as e:
            put(pr, args.modes, **_failure(e))
            release(device)  # after the except block: the traceback no longer holds the tensors
            continue
        ok = rel <= bound  # NaN fails too
        put(pr, args.modes, correct=ok, max_abs_err=err, rel_err=rel, err_bound=bound)
        if not ok:
            put(pr, args.modes, status="failed", error=f"rel_err {rel:.3g} > {bound:g} against the float32 reference")
            continue
        ready[pr] = fn
    del ref
    release(device)

    # Pass 2: the copy ceiling (memory-bound ops), then every mode of every provider that passed.
    if ready and op.memory_bound:
        copy = copy_bandwidth(largest, device, timer)
        copies.append({"size": case["size"], "dtype": dtype_name, **{k: case[k] for k in op.case_fields}, **copy})
        for pr in args.providers:
            put(pr, args.modes, copy_gbps=copy["gbps"])
    for pr, fn in ready.items():
        for mode in args.modes:
            why = op.mode_skip(pr, mode)
            if why:
                put(pr, [mode], status="skipped", reason=why)
                continue
            try:
                put(pr, [mode], **time_mode(fn, inputs, mode, timer, device))
            except Exception as e:  # an OOM is a result; either way only this row is lost
                put(pr, [mode], **_failure(e))
            release(device)
    derive(op, list(rows.values()), evaluate_targets=device.type == "cuda")
    return list(rows.values())


def derive(op: Op, rows: list[dict], evaluate_targets: bool) -> None:
    """GB/s, % of copy, TFLOP/s, ratios to eager (rows of one case) and the targets' verdicts."""
    eager = {r["mode"]: r for r in rows if r["provider"] == "eager" and r["status"] == "ok" and r["median_ms"]}
    for r in rows:
        if r["status"] != "ok" or not r["median_ms"]:
            continue
        seconds = r["median_ms"] * 1e-3
        if r["bytes"] is not None:
            r["gbps"] = r["bytes"] / seconds / 1e9
            if r["copy_gbps"]:
                r["pct_of_copy"] = 100 * r["gbps"] / r["copy_gbps"]
        if r["flops"] is not None:
            r["tflops"] = r["flops"] / seconds / 1e12
        base = eager.get(r["mode"])
        if base is not None and r["provider"] != "eager":
            r["speedup_vs_eager"] = base["median_ms"] / r["median_ms"]
            r["time_vs_eager"] = r["median_ms"] / base["median_ms"]
            if r["peak_mem_mib"] is not None and base["peak_mem_mib"]:
                r["mem_vs_eager"] = r["peak_mem_mib"] / base["peak_mem_mib"]
        if evaluate_targets:
            verdicts = [t.verdict(r) for t in op.targets if t.applies(r)]
            if verdicts:
                states = {v for v, _ in verdicts}
                r["target"] = "MISS" if "MISS" in states else "PASS" if states == {"PASS"} else "n/a"
                r["target_note"] = "; ".join(f"{note}: {v}" for v, note in verdicts)


# ---------------------------------------------------------------------------- reporting
def _progress(op: Op, r: dict) -> None:
    what = f"{r['provider']:<7} {r['mode']:<7} {r['dtype']:<8} " + " ".join(
        f"{k}={r[k]}" for k in op.case_fields)
    if r["status"] != "ok":
        print(f"{what}: {r['status'].upper()} {r['reason'] or r['error']}", file=sys.stderr, flush=True)
        return
    figure = f", {r['gbps']:.1f} GB/s ({fmt(r['pct_of_copy'], '.0f')}% of copy)" if r["gbps"] else \
        f", {r['tflops']:.3g} TFLOP/s" if r["tflops"] else ""
    extra = f", {r['speedup_vs_eager']:.2f}x eager" if r["speedup_vs_eager"] else ""
    print(f"{what}: {r['median_ms']:.3f} ms{figure}{extra}, rel err {r['rel_err']:.1e}", file=sys.stderr, flush=True)


def table(op: Op, rows: list[dict]) -> str:
    cols = [("mode", "mode", ""), ("provider", "provider", ""), ("dtype", "dtype", "")] + list(op.table_cols)
    n_left = 3 + sum(1 for _, _, spec in op.table_cols if spec == "")
    if op.memory_bound:
        cols += [("MiB", "size_mib", ".1f"), ("ms", "median_ms", ".3f"), ("GB/s", "gbps", ".1f"),
                 ("copy GB/s", "copy_gbps", ".1f"), ("% copy", "pct_of_copy", ".1f"),
                 ("x eager", "speedup_vs_eager", ".2f"), ("peak MiB", "peak_mem_mib", ",.0f")]
    else:
        cols += [("ms", "median_ms", ".3f"), ("TFLOP/s", "tflops", ".3g"), ("time/eager", "time_vs_eager", ".2f"),
                 ("peak MiB", "peak_mem_mib", ",.0f"), ("mem/eager", "mem_vs_eager", ".3f")]
    cols += [("rel err", "rel_err", ".1e"), ("status", "status", ""), ("target", "target", "")]
    body, notes = [], []
    for r in rows:
        body.append([fmt(r[key], spec) for _, key, spec in cols])
        for note in (f"{r['provider']}: {r['status']}: {r['reason'] or r['error']}" if r["status"] != "ok" else None,
                     f"{r['provider']}: {r['note']}" if r["note"] else None):
            if note and note not in notes:
                notes.append(note)
    return format_table([h for h, _, _ in cols], body, n_left=n_left, notes=notes)


def targets_report(op: Op, rows: list[dict], device: torch.device) -> list[str]:
    if not op.targets:
        return []
    if device.type != "cuda":
        return [f"targets (GPU targets, for CUDA runs; not evaluated on {device.type}): "
                + "; ".join(t.label for t in op.targets)]
    lines = ["targets (triton rows on CUDA):"]
    for t in op.targets:
        hits = [r for r in rows if t.applies(r)]
        if not hits:
            lines.append(f"  -     {t.label}: no triton row of this run applies")
        for r in hits:
            verdict, note = t.verdict(r)
            lines.append(f"  {verdict:<5} {note} ({r['mode']}, {r['dtype']}, "
                         + ", ".join(f"{k}={r[k]}" for k in op.case_fields) + ")")
    return lines


def plot(op: Op, path: Path, meta: dict, rows: list[dict]) -> bool:
    plt = pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    if plt is None or not ok:
        return False
    fig = _plot_bandwidth(plt, op, meta, ok) if op.memory_bound else _plot_bars(plt, op, meta, ok)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_bandwidth(plt, op: Op, meta: dict, ok: list[dict]):
    """GB/s against the largest tensor's MiB, a line per provider and the copy bandwidth dashed;
    a column per mode, a row per dtype x group fields (at most 4 rows)."""
    keyf = lambda r: (r["dtype"],) + tuple(r[k] for k in op.group_fields)  # noqa: E731
    groups = list(dict.fromkeys(keyf(r) for r in ok))[:4]
    modes = [m for m in meta["config"]["modes"]]
    fig, axes = plt.subplots(len(groups), len(modes), figsize=(4.8 * len(modes), 3.6 * len(groups)), squeeze=False)
    for i, g in enumerate(groups):
        sel = [r for r in ok if keyf(r) == g]
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for n, pr in enumerate(PROVIDERS):
                pts = sorted((r["size_mib"], r["gbps"]) for r in sel if r["provider"] == pr and r["mode"] == mode)
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=f"C{n}", label=pr)
            copy = sorted({(r["size_mib"], r["copy_gbps"]) for r in sel if r["copy_gbps"]})
            if copy:
                ax.plot(*zip(*copy), color="gray", linestyle="--", linewidth=1, label="copy (dst.copy_(src))")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("largest tensor (MiB)")
            ax.set_ylabel("GB/s (median)")
            labels = ", ".join([g[0]] + [f"{k}={v}" for k, v in zip(op.group_fields, g[1:])])
            ax.set_title(f"{mode}, {labels}", fontsize=10)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"{op.title}, {meta['device_name']}", fontsize=10)
    return fig


def _plot_bars(plt, op: Op, meta: dict, ok: list[dict]):
    """Median time and peak memory per provider, a group of bars per case (fwd+bwd if timed)."""
    modes = meta["config"]["modes"]
    mode = "fwd+bwd" if "fwd+bwd" in modes else modes[0]
    sel = [r for r in ok if r["mode"] == mode]
    keyf = lambda r: (r["dtype"],) + tuple(r[k] for _, k, _ in op.table_cols)  # noqa: E731
    cases = list(dict.fromkeys(keyf(r) for r in sel))
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in sel)]
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 2.2 * len(cases) * 2), 4.2), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    for ax, field, label in ((axes[0][0], "median_ms", "time (ms, median)"),
                             (axes[0][1], "peak_mem_mib", "peak memory (MiB)")):
        drawn = False
        for n, pr in enumerate(providers):
            by = {keyf(r): r[field] for r in sel if r["provider"] == pr}
            xs = [i + (n - (len(providers) - 1) / 2) * width for i in range(len(cases))]
            vals = [by.get(c) for c in cases]
            if any(v is not None for v in vals):
                ax.bar(xs, [v or 0 for v in vals], width, color=f"C{PROVIDERS.index(pr)}", label=pr)
                drawn = True
        ax.set_xticks(range(len(cases)), ["\n".join(str(v) for v in c) for c in cases], fontsize=7)
        ax.set_ylabel(label)
        ax.set_title(f"{mode}: {label}", fontsize=10)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"not measured on {meta['device_type']}", ha="center", va="center",
                    transform=ax.transAxes)
    fig.suptitle(f"{op.title}, {meta['device_name']}", fontsize=10)
    return fig


# ---------------------------------------------------------------------------- main
def run(op: Op, argv: list[str] | None = None) -> int:
    """The whole benchmark of ``op``: parse, sweep, write, print. Returns the exit status."""
    args = parse_args(op, argv)
    device = start_device(args.device, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)  # now, so an unwritable --out fails before the timing
    env = environment(device)
    timer = Timer.from_args(args, device)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "device")}
    config.update(out=str(args.out), device=str(device))
    triton_reason = triton_skip_reason(device)
    meta: dict[str, Any] = {
        "script": f"bench/{op.name}.py", "date": utc_now_iso(), **env, **versions(), "timing": timer.describe(),
        "precision": op.precision,
        "bytes": op.bytes_doc or None, "flops": op.flops_doc or None,
        "correctness": "forward outputs vs the reference in float32 on the same inputs: "
                       "rel_err = max|out - ref| / max|ref| <= err_bound",
        "triton_status": triton_reason or kernels.triton_unavailable_reason(),
        "targets": [{"label": t.label, "field": t.field, "op": t.op, "bound": t.bound, "modes": list(t.modes)}
                    for t in op.targets],
        "targets_evaluated": device.type == "cuda", "config": config,
    }
    print(f"{op.title} benchmark: device={device} [{meta['device_name']}], timer={timer.method}, "
          f"torch {meta['torch']}, triton {meta['triton']}", flush=True)
    if triton_reason and "triton" in args.providers:
        print(f"triton provider skipped: {triton_reason}", flush=True)
    elif is_interpreting() and "triton" in args.providers:
        print(f"note: {INTERPRETER_NOTE}", flush=True)
    if args.cpu_defaults:
        print(f"CPU-sized defaults for {', '.join('--' + n.replace('_', '-') for n in args.cpu_defaults)} (the GPU "
              "sweep would take far too long here): "
              + "; ".join(f"{n} {getattr(args, n)}" for n in args.cpu_defaults), flush=True)
    if device.type != "cuda" and op.targets:
        print("the targets are GPU targets: they are printed, not evaluated, on a CPU run", flush=True)
    warn_if_cpu_busy(env)

    rows: list[dict] = []
    copies: list[dict] = []
    t_start = time.perf_counter()
    for dt in args.dtypes:
        for case in args.cases:
            new = run_case(op, args, timer, case, dt, copies)
            for r in new:
                _progress(op, r)
            rows += new
    meta.update(copy_bandwidth=copies, elapsed_s=round(time.perf_counter() - t_start, 2),
                load_avg_1m_at_end=load_avg_1m(),
                cpu_busy_by_others_at_end=cpu_busy() if device.type == "cpu" else None)

    stem = args.name or f"{op.name}_{device.type}_{utc_stamp()}"
    json_path, csv_path, png_path = result_paths(args.out, stem)
    write_json(json_path, meta, rows)
    write_csv(csv_path, meta, rows, ROW_FIELDS + list(op.case_fields) + RESULT_FIELDS)
    plotted = False if args.no_plot else plot(op, png_path, meta, rows)
    order = {p: i for i, p in enumerate(PROVIDERS)}
    case_key = lambda c: tuple(c[k] for k in op.case_fields)  # noqa: E731
    case_order = {case_key(c): i for i, c in enumerate(args.cases)}
    print(table(op, sorted(rows, key=lambda r: (r["dtype"], MODES.index(r["mode"]), case_order[case_key(r)],
                                                    order[r["provider"]]))))
    for line in targets_report(op, rows, device):
        print(line)
    if device.type != "cuda":
        print(f"peak memory: not measured on {device.type} (see peak_mem_note in the JSON/CSV)")
    print("wrote " + ", ".join(str(p) for p in [json_path, csv_path] + ([png_path] if plotted else [])))
    return 1 if any(r["status"] == "failed" for r in rows) else 0
