"""Attention microbenchmark: our Triton flash attention against PyTorch SDPA (flash backend), the
eager reference and torch.compile of it, forward, backward and both, in TFLOP/s.

    python bench/flash_attention.py                        # GPU: the full sweep below (tens of minutes)
    python bench/flash_attention.py --device cpu           # CPU: a small PyTorch-only sweep, about a minute
    python bench/flash_attention.py --seqlens 2048,8192 --heads 16 --head-dims 128 --dtypes bf16 \
        --causal true --modes fwd+bwd --providers triton,sdpa       # one slice
    python bench/flash_attention.py --help                 # every option

Providers (``--providers``), all on q (B, H, N, D) and k, v (B, Hkv, N, D), contiguous:

triton   ``llama_mini.kernels.flash_attention.flash_attention`` (ours). Timed on CUDA only: on a CPU-only
         machine its rows are skipped with the reason, even under TRITON_INTERPRET=1, whose
         timings would measure the interpreter, not the kernel.
sdpa     ``F.scaled_dot_product_attention`` inside ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``;
         where the flash backend refuses the dtype/device/shape, SDPA's own choice (the row's
         ``backend`` says which ran and why).
eager    ``llama_mini.kernels.reference.attention``: explicit fp32 scores and softmax, N x N materialised.
compile  ``torch.compile`` of that reference (``dynamic=False``, caches reset per configuration);
         the first call compiles and is never timed.

Document masking (``--documents K``, default 0 = off): each sequence is packed with K
documents of random lengths (seeded; each row drawn anew; at least one token each) and every
provider restricts attention to a query's own document, causal within it: triton gets
``document_ids`` (B, N) and skips tiles across document boundaries; sdpa gets the equivalent
boolean mask (which rules out its flash backend: it runs memory-efficient or math attention,
the row's ``backend`` says which); eager and compile run the reference with ``document_ids``.
FLOPs count the unmasked work only, sum over documents of 4*H*n_d^2*D/2 (useful FLOPs; the
figure the causal-halving convention gives for one document of length n_d).

Interpreter (``--interpreter``): under ``TRITON_INTERPRET=1`` on a CPU, run the triton rows
anyway, at the tiny sizes the interpreter can manage. The timings measure the interpreter, not
the kernel; rows carry that note. It exists so that ``bench/gpu_report.py --dry-run`` exercises
every code path of a GPU run on a machine without one.

Modes (``--modes``): ``fwd`` (under ``torch.no_grad``), ``bwd`` (``out.backward(dout,
retain_graph=True)`` on a graph built once, gradients set to None before each call) and
``fwd+bwd``.

FLOPs (H = query heads; the standard FlashAttention accounting, the two N x N matmuls only):
forward 4*B*H*N^2*D, halved when causal; backward 2.5x forward; fwd+bwd 3.5x forward.
TFLOP/s uses the median time; ``pct_of_peak`` is against the dtype's dense datasheet peak
(``common.peak_tflops``; null where unknown, e.g. on CPU); ``vs_sdpa`` = sdpa median / this row's
median for the same configuration and mode in the same run (> 1: faster than SDPA).

Sweep: every seqlen x heads x kv-heads x head dim x causal x dtype; batch = max(1, tokens // N).
GPU defaults: seqlens 512..16384, 16k tokens, heads 16,32 (kv heads the same), head dims 64,128,
causal and not, bf16 and fp16, all providers and modes. On CPU, sweep options not given take
small defaults (seqlens 128,256,512, 1024 tokens, 4 heads, head dim 64, float32, sdpa,eager),
which the header names. Before timing, each provider's forward output is checked once per
configuration against ``llama_mini.kernels.reference.attention`` in float32 (chunked over heads so the N x N
scores fit): ``max_abs_err`` must stay under 2e-2 (bf16/fp16) or 1e-4 (fp32; 5e-3 when TF32 is on).

Timing: ``common.Timer`` (``triton.testing.do_bench`` median on CUDA, wall-clock median after
warmup on CPU). Peak memory: ``torch.cuda.max_memory_allocated`` over one call outside the timed
loop (inputs and saved graph included); null on CPU with the reason. A CUDA out-of-memory error
gives a row with status ``oom``; rows that cannot run are ``skipped`` with a ``reason``; a wrong
result or another error is ``failed`` (exit status 1). The sweep goes on in every case.

Output (``--out``, default ``bench/results/flash_attention/``): ``<name>.json`` (metadata: device,
versions, date, timing method, config; then one record per row), ``<name>.csv`` (same rows,
metadata as ``# key: value`` lines), ``<name>.png`` (TFLOP/s vs N per provider, one panel per
mode and causal setting, for the first dtype/heads/head-dim; needs matplotlib), and a table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

# ``python bench/flash_attention.py`` puts bench/ first on sys.path; llama_mini is the installed package.
from common import (
    DTYPES, DTYPE_ALIASES, add_device_arguments, cpu_busy, environment, fmt, format_table, HelpFormatter,
    int_list, is_oom, load_avg_1m, peak_memory, peak_tflops, pyplot, release, resolve_device, result_paths, results_dir,
    start_device, Timer, utc_now_iso, utc_stamp, versions, warn_if_cpu_busy, write_csv, write_json,
)
from llama_mini import kernels  # noqa: E402
from llama_mini.kernels import reference  # noqa: E402
from llama_mini.kernels.common import is_interpreting  # noqa: E402

DEFAULT_OUT = results_dir("flash_attention")
PROVIDERS = ("triton", "sdpa", "eager", "compile")
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": (1, 1), "bwd": (5, 2), "fwd+bwd": (7, 2)}  # (num, den) times the forward FLOPs
SWEEP_DEFAULTS = {  # option: (GPU default, CPU default)
    "seqlens": ("512,1024,2048,4096,8192,16384", "128,256,512"), "tokens": (16384, 1024),
    "heads": ("16,32", "4"), "head_dims": ("64,128", "64"), "dtypes": ("bfloat16,float16", "float32"),
    "providers": (",".join(PROVIDERS), "sdpa,eager"),
}
REF_CHUNK_BYTES = 2**30  # fp32 scores per chunk of the float32 reference (x ~3 with softmax and mask)
INTERPRETER_NOTE = ("--interpreter: triton rows ran in Triton's CPU interpreter; their times are the "
                    "interpreter's, not the kernel's")
NO_GPU = ("no GPU: Triton kernels are not timed on CPU (under TRITON_INTERPRET=1 the timings would "
          "measure Triton's interpreter, not the kernel)")

CSV_FIELDS = [
    "provider", "backend", "mode", "causal", "documents", "dtype", "batch", "seqlen", "heads", "kv_heads", "head_dim",
    "tokens", "flops", "status", "reason", "error", "median_ms", "min_ms", "n_timed", "timer", "tflops", "peak_tflops",
    "pct_of_peak", "vs_sdpa", "peak_mem_mib", "peak_mem_note", "max_abs_err", "err_bound",
]


# ---------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/flash_attention.py", description=__doc__.split("\n\n")[0],
                                epilog="Defaults in [brackets] depend on the device (GPU; CPU). The module "
                                "docstring explains every figure.", formatter_class=HelpFormatter)
    s = p.add_argument_group("sweep (comma-separated lists)")
    s.add_argument("--seqlens", help=f"sequence lengths N [{'; '.join(SWEEP_DEFAULTS['seqlens'])}]")
    s.add_argument("--tokens", type=int, help="tokens per call: batch = max(1, tokens // N) [16384; 1024]")
    s.add_argument("--heads", help="query heads H [16,32; 4]")
    s.add_argument("--kv-heads", default="same", help="key/value heads: 'same' (= H) or numbers dividing H")
    s.add_argument("--head-dims", help="head dims D [64,128; 64]")
    s.add_argument("--causal", default="both", choices=["both", "true", "false"], help="causal masking")
    s.add_argument("--documents", type=int, default=0,
                   help="pack each sequence with this many documents of random lengths (0: one sequence, no mask)")
    s.add_argument("--dtypes", help="dtypes: bf16/bfloat16, fp16/float16, fp32/float32 [bf16,fp16; fp32]")
    s.add_argument("--modes", default=",".join(MODES), help=f"any of {', '.join(MODES)}")
    s.add_argument("--providers", help=f"any of {', '.join(PROVIDERS)} [all; sdpa,eager]")
    s.add_argument("--seed", type=int, default=0, help="seed of the random q, k, v, dout")

    d = p.add_argument_group("device")
    add_device_arguments(d)
    d.add_argument("--interpreter", action="store_true",
                   help="run the triton rows on CPU under TRITON_INTERPRET=1 (timings are the interpreter's)")
    d.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for pct_of_peak, every dtype [datasheet table for known GPUs; none on CPU]")

    Timer.add_arguments(p)

    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="directory for the JSON, CSV and PNG [bench/results/flash_attention/ of this checkout]")
    o.add_argument("--name", default=None, help="file stem of the outputs [flash_attention_<device>_<UTC time>]")
    o.add_argument("--no-plot", action="store_true", help="do not write the PNG")

    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    on_cpu = args.device.type == "cpu"
    args.cpu_defaults = []  # sweep options that took the CPU-sized default
    for name, (gpu, cpu) in SWEEP_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, cpu if on_cpu else gpu)
            if on_cpu:
                args.cpu_defaults.append(name)
    try:
        args.seqlens, args.heads, args.head_dims = (int_list(f"--{n.replace('_', '-')}", getattr(args, n))
                                                    for n in ("seqlens", "heads", "head_dims"))
    except ValueError as e:
        p.error(str(e))
    try:
        args.kv_heads = [None if x == "same" else int(x) for x in _split(args.kv_heads)]
    except ValueError:
        p.error(f"--kv-heads takes comma-separated integers or 'same', got {args.kv_heads!r}")
    args.dtypes = [DTYPE_ALIASES.get(x, x) for x in _split(args.dtypes)]
    args.modes, args.providers = _split(args.modes), _split(args.providers)
    args.causal = {"both": [True, False], "true": [True], "false": [False]}[args.causal]
    for flag, values, allowed in (("dtypes", args.dtypes, DTYPES), ("modes", args.modes, MODES),
                                  ("providers", args.providers, PROVIDERS)):
        if not values or any(v not in allowed for v in values):
            p.error(f"--{flag} takes any of {', '.join(allowed)}; got {values}")
    if not args.kv_heads or any(h is not None and h < 1 for h in args.kv_heads) or args.tokens < 1:
        p.error("--kv-heads takes 'same' or positive integers; --tokens must be >= 1")
    if args.documents < 0 or (args.documents and min(args.seqlens) < args.documents):
        p.error(f"--documents must be >= 0 and at most the shortest sequence length, got {args.documents}")
    if args.documents and args.causal != [True]:
        p.error("--documents packs causal sequences: use it with --causal true")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def _split(text: str) -> list[str]:
    return [x.strip().lower() for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------------- math
def attention_flops(mode: str, batch: int, heads: int, seqlen: int, head_dim: int, causal: bool) -> int:
    """4*B*H*N^2*D for the forward (QK^T and PV, 2 FLOPs per multiply-add), halved when causal;
    backward 2.5x and fwd+bwd 3.5x that (exact integers: the forward count is even)."""
    fwd = 4 * batch * heads * seqlen * seqlen * head_dim // (2 if causal else 1)
    num, den = FLOP_FACTOR[mode]
    return fwd * num // den


def document_ids(batch: int, seqlen: int, n_docs: int, seed: int) -> torch.Tensor:
    """(B, N) int64 ids 0..n_docs-1, non-decreasing along each row: n_docs documents of random
    lengths (at least one token each), drawn anew per row from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.empty(batch, seqlen, dtype=torch.int64)
    for b in range(batch):
        cuts = torch.randperm(seqlen - 1, generator=gen)[: n_docs - 1] + 1  # document starts after the first
        starts = torch.zeros(seqlen, dtype=torch.int64)
        starts[cuts] = 1
        ids[b] = torch.cumsum(starts, 0)
    return ids


def document_flops(mode: str, heads: int, head_dim: int, ids: torch.Tensor) -> int:
    """Useful FLOPs of causal attention within documents: sum over rows and documents of the
    causal count for a sequence of the document's length n_d (4*H*n_d^2*D/2), times the mode's
    factor."""
    lengths = torch.stack([torch.bincount(row) for row in ids]) if ids.numel() else ids  # (B, n_docs)
    fwd = sum(4 * heads * int(n) * int(n) * head_dim // 2 for n in lengths.flatten())
    num, den = FLOP_FACTOR[mode]
    return fwd * num // den


def error_bound(dtype: str, device: torch.device) -> float:
    if dtype != "float32":
        return 2e-2
    return 5e-3 if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else 1e-4


def reference_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """llama_mini.kernels.reference.attention in float32, a few kv-head groups at a time so that the N x N
    scores of 16k-token sequences fit next to the inputs. Returns (B, H, N, D) float32."""
    B, H, N, _ = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    step = max(1, REF_CHUNK_BYTES // (rep * N * N * 4))  # kv heads per chunk
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    with torch.no_grad():
        for b in range(B):
            for g in range(0, Hkv, step):
                g1 = min(g + step, Hkv)
                out[b:b + 1, g * rep:g1 * rep] = reference.attention(
                    q[b:b + 1, g * rep:g1 * rep].float(), k[b:b + 1, g:g1].float(), v[b:b + 1, g:g1].float(),
                    causal=causal, document_ids=None if doc_ids is None else doc_ids[b:b + 1])
    return out


# ---------------------------------------------------------------------------- providers
def skip_reason(provider: str, device: torch.device, interpreter: bool = False) -> str | None:
    """Why ``provider`` is not timed here, or None. ``interpreter`` lets triton run on CPU
    tensors under TRITON_INTERPRET=1 (``--interpreter``)."""
    if provider != "triton":
        return None
    if interpreter and device.type == "cpu" and is_interpreting():
        return None
    if device.type != "cuda":
        return NO_GPU
    if is_interpreting():
        return "TRITON_INTERPRET=1 is set: the interpreter's timings are meaningless; unset it to time the kernels"
    if not kernels.triton_available():
        return f"triton cannot run: {kernels.triton_unavailable_reason()}"
    return None


def _sdpa_choice(q, k, v, causal: bool, gqa: bool) -> str:
    """The backend SDPA picks by itself (a private torch helper; 'default' if it is missing)."""
    try:
        idx = int(torch._fused_sdp_choice(q, k, v, is_causal=causal, enable_gqa=gqa))
        from torch.nn.attention import SDPBackend
        return next(n.lower() for n, m in SDPBackend.__members__.items() if int(m.value) == idx)
    except Exception:
        return "default"


def build_provider(provider: str, q, k, v, causal: bool, doc_ids: torch.Tensor | None = None) -> tuple[Callable, str]:
    """(fn(q, k, v) -> out, the backend that runs). SDPA is probed with the flash backend forced.
    ``doc_ids`` (B, N): document masking (sdpa gets the boolean mask it implies)."""
    gqa = q.shape[1] != k.shape[1]
    if provider == "triton":
        from llama_mini.kernels.flash_attention import flash_attention  # imports triton: only where it is timed
        return (lambda q, k, v: flash_attention(q, k, v, causal=causal, document_ids=doc_ids)), "triton"
    if provider == "eager":
        return (lambda q, k, v: reference.attention(q, k, v, causal=causal, document_ids=doc_ids)), \
            "reference (fp32 softmax)"
    if provider == "compile":
        torch._dynamo.reset()  # one set of graphs per configuration; never the recompile limit
        compiled = torch.compile(reference.attention, dynamic=False)
        return (lambda q, k, v: compiled(q, k, v, causal=causal, document_ids=doc_ids)), "inductor (of the reference)"
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kw = {"enable_gqa": True} if gqa else {}
    n_rep = q.shape[1] // k.shape[1]
    if doc_ids is not None:  # (B, 1, N, N) boolean, True = attend; built once, outside the timed call
        N = q.shape[2]
        kw = {"attn_mask": reference.attention_mask(N, N, causal=causal, document_ids=doc_ids, device=q.device)}

    def sdpa(q, k, v):
        if doc_ids is not None and n_rep > 1:
            # With a mask, enable_gqa leaves only the math backend (fp32 scores of N x N per head, tens
            # of GiB at 8k); k and v repeated keep the memory-efficient one, as the model's sdpa backend does.
            k, v = reference.repeat_kv(k, n_rep), reference.repeat_kv(v, n_rep)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and doc_ids is None, **kw)

    def sdpa_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, v)

    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:
            sdpa_flash(q, k, v)
            return sdpa_flash, "flash"
        except RuntimeError as e:
            if is_oom(e):
                raise
            why = next((str(w.message) for w in caught), str(e)).splitlines()[0][:160]
    return sdpa, f"{_sdpa_choice(q, k, v, causal, gqa)} (flash refused: {why})"



def time_mode(fn: Callable, q, k, v, mode: str, timer: Timer, device: torch.device) -> dict[str, Any]:
    if mode == "fwd":
        def call() -> None:
            with torch.no_grad():
                fn(q, k, v)
    else:
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        dout = torch.randn_like(q)  # (B, H, N, D)
        out = fn(qg, kg, vg) if mode == "bwd" else None  # the graph every bwd call walks again

        def call() -> None:
            qg.grad = kg.grad = vg.grad = None  # fresh gradients, no accumulate kernel timed
            (out if out is not None else fn(qg, kg, vg)).backward(dout, retain_graph=out is not None)
    call()  # first call: compile, autotune, lazy initialisation; never timed
    mem, note = peak_memory(call, device, "the attention call's")
    times, how = timer(call)
    return dict(median_ms=statistics.median(times), min_ms=min(times), n_timed=len(times), timer=how,
                peak_mem_mib=mem, peak_mem_note=note)


# ---------------------------------------------------------------------------- the sweep
def run_config(args, timer: Timer, cfg: dict[str, Any], ceilings: dict[str, float | None]) -> list[dict]:
    """Every provider x mode of one shape/causal/dtype configuration, including its skipped rows."""
    device, B, N, H, Hkv, D = args.device, cfg["batch"], cfg["seqlen"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    rows: dict[tuple[str, str], dict] = {}
    n_docs = cfg.get("documents") or 0
    doc_ids = document_ids(B, N, n_docs, args.seed).to(device) if n_docs else None  # (B, N)

    def put(provider: str, modes, **fields) -> None:
        for m in modes:
            if (provider, m) not in rows:
                flops = attention_flops(m, B, H, N, D, cfg["causal"]) if doc_ids is None else \
                    document_flops(m, H, D, doc_ids)
                rows[(provider, m)] = {**{k: None for k in CSV_FIELDS}, **cfg, "provider": provider, "mode": m,
                                       "status": "ok", "flops": flops}
            rows[(provider, m)].update(fields)

    if H % Hkv:
        for pr in args.providers:
            put(pr, args.modes, status="skipped", reason=f"kv heads {Hkv} do not divide heads {H}")
        return list(rows.values())
    torch.manual_seed(args.seed)
    dtype = DTYPES[cfg["dtype"]]
    q = torch.randn(B, H, N, D, device=device, dtype=dtype)  # (B, H, N, D)
    k = torch.randn(B, Hkv, N, D, device=device, dtype=dtype)  # (B, Hkv, N, D)
    v = torch.randn(B, Hkv, N, D, device=device, dtype=dtype)
    bound = error_bound(cfg["dtype"], device)
    ref = None
    for pr in args.providers:
        reason = skip_reason(pr, device, getattr(args, "interpreter", False))
        if reason:
            put(pr, args.modes, status="skipped", reason=reason)
            continue
        failure = None
        try:  # correctness once per configuration; an OOM or error here ends the provider's rows
            if ref is None:
                ref = reference_fp32(q, k, v, cfg["causal"], doc_ids)  # (B, H, N, D) float32
            fn, backend = build_provider(pr, q, k, v, cfg["causal"], doc_ids)
            with torch.no_grad():
                err = (fn(q, k, v).float() - ref).abs().max().item()
        except Exception as e:
            failure = _failure(e)
        if failure:
            put(pr, args.modes, **failure)
            release(device)  # after the except block: the traceback no longer holds the tensors
            continue
        put(pr, args.modes, backend=backend, max_abs_err=err, err_bound=bound)
        if not err <= bound:  # NaN fails too
            put(pr, args.modes, status="failed", error=f"max_abs_err {err:.3g} > {bound:g} against the reference")
            continue
        for mode in args.modes:
            try:
                put(pr, [mode], **time_mode(fn, q, k, v, mode, timer, device))
            except Exception as e:  # an OOM is a result; either way only this row is lost
                put(pr, [mode], **_failure(e))
            release(device)  # after the except block: the traceback no longer holds the tensors
    out = list(rows.values())
    for r in out:
        if r["status"] == "ok" and r["median_ms"]:
            r["tflops"] = r["flops"] / (r["median_ms"] * 1e-3) / 1e12
            r["peak_tflops"] = ceilings.get(cfg["dtype"])
            r["pct_of_peak"] = 100 * r["tflops"] / r["peak_tflops"] if r["peak_tflops"] else None
            base = rows.get(("sdpa", r["mode"]))
            if r["provider"] != "sdpa" and base and base["status"] == "ok":
                r["vs_sdpa"] = base["median_ms"] / r["median_ms"]
    return out


def _failure(e: BaseException) -> dict[str, str]:
    """Row fields for an exception: status oom with the reason, or failed with the error (and traceback)."""
    oom = is_oom(e)
    if not oom:
        traceback.print_exception(e, file=sys.stderr)
    msg = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
    return {"status": "oom", "reason": msg} if oom else {"status": "failed", "error": msg}


# ---------------------------------------------------------------------------- reporting
def _progress(r: dict) -> None:
    what = (f"{r['provider']:<7} {r['mode']:<7} causal={str(r['causal']):<5} {r['dtype']:<8} B={r['batch']} "
            f"N={r['seqlen']} H={r['heads']}/{r['kv_heads']} D={r['head_dim']}"
            + (f" docs={r['documents']}" if r.get("documents") else ""))
    if r["status"] != "ok":
        print(f"{what}: {r['status'].upper()} {r['reason'] or r['error']}", file=sys.stderr, flush=True)
        return
    extra = f", vs sdpa {r['vs_sdpa']:.2f}x" if r["vs_sdpa"] else ""
    print(f"{what}: {r['median_ms']:.3f} ms, {r['tflops']:.3g} TFLOP/s{extra}, err {r['max_abs_err']:.1e}",
          file=sys.stderr, flush=True)


def table(rows: list[dict]) -> str:
    cols = [("mode", "mode", ""), ("provider", "provider", ""), ("causal", "causal", ""), ("docs", "documents", "d"),
            ("dtype", "dtype", ""), ("B", "batch", "d"), ("N", "seqlen", "d"), ("H", "heads", "d"), ("Hkv", "kv_heads", "d"),
            ("D", "head_dim", "d"), ("ms", "median_ms", ".3f"), ("TFLOP/s", "tflops", ".3g"),
            ("% peak", "pct_of_peak", ".1f"), ("vs sdpa", "vs_sdpa", ".2f"), ("peak MiB", "peak_mem_mib", ",.0f"),
            ("max err", "max_abs_err", ".1e"), ("status", "status", "")]
    body, notes = [], []
    for r in rows:
        cells = [fmt(r[key], spec) for _, key, spec in cols]
        note = f"{r['provider']}: {r['status']}: {r['reason'] or r['error']}" if r["status"] != "ok" else \
            f"sdpa ran as: {r['backend']}" if r["provider"] == "sdpa" else None
        if note and note not in notes:
            notes.append(note)
        body.append(cells)
    return format_table([h for h, _, _ in cols], body, n_left=5, notes=notes)


def plot(path: Path, meta: dict, rows: list[dict]) -> bool:
    """TFLOP/s vs N per provider; a panel per (mode, causal) for the first dtype/heads/head dim."""
    plt = pyplot()
    if plt is None:
        return False
    c = meta["config"]
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return False
    keys = ("dtype", "heads", "kv_heads", "head_dim")
    first = {k: ok[0][k] for k in keys}  # rows come in sweep order: the first combination that ran
    sel = [r for r in ok if all(r[k] == first[k] for k in keys)]
    modes, causals = c["modes"], c["causal"]
    fig, axes = plt.subplots(len(modes), len(causals), figsize=(4.8 * len(causals), 3.6 * len(modes)),
                             squeeze=False)
    peak = meta["peak_tflops"].get(first["dtype"])
    for i, mode in enumerate(modes):
        for j, causal in enumerate(causals):
            ax = axes[i][j]
            for n, pr in enumerate(PROVIDERS):
                pts = sorted((r["seqlen"], r["tflops"]) for r in sel
                             if r["provider"] == pr and r["mode"] == mode and r["causal"] == causal)
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=f"C{n}", label=pr)
            if peak:
                ax.axhline(peak, color="gray", linestyle="--", linewidth=1, label=f"peak {peak:g}")
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
            ax.set_xticks(c["seqlens"], [str(s) for s in c["seqlens"]], fontsize=8)
            ax.set_title(f"{mode}, {'causal' if causal else 'non-causal'}", fontsize=10)
            ax.set_xlabel("sequence length N")
            ax.set_ylabel("TFLOP/s (median)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"attention, {first['dtype']}, H={first['heads']}, Hkv={first['kv_heads']}, D={first['head_dim']}, "
                 f"{c['tokens']} tokens per call, {meta['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = start_device(args.device, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)  # now, so an unwritable --out fails before the timing
    env = environment(device)
    timer = Timer.from_args(args, device)
    ceilings, ceiling_src = {}, {}
    for dt in args.dtypes:
        ceilings[dt], ceiling_src[dt] = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else \
            peak_tflops(env.get("device_name", ""), dt, device)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "device")}
    config.update(out=str(args.out), device=str(device), kv_heads=[h or "same" for h in args.kv_heads])
    meta: dict[str, Any] = {
        "script": "bench/flash_attention.py", "date": utc_now_iso(), **env, **versions(),
        "timing": timer.describe(),
        "precision": "inputs in the row's dtype; triton and sdpa accumulate in fp32; eager and compile (the "
                     "reference) compute scores, softmax and PV in fp32 and cast the output",
        "flops": "fwd 4*B*H*N^2*D (/2 causal); bwd 2.5x fwd; fwd+bwd 3.5x fwd; with --documents the sum over "
                 "documents of 4*H*n_d^2*D/2",
        "correctness": "forward output vs llama_mini.kernels.reference.attention in float32, max abs error under err_bound",
        "triton_status": (INTERPRETER_NOTE if skip_reason("triton", device, args.interpreter) is None else NO_GPU)
                         if device.type != "cuda" else kernels.triton_unavailable_reason(),
        "peak_tflops": ceilings, "peak_tflops_source": ceiling_src, "config": config,
    }
    print(f"flash attention benchmark: device={device} [{meta['device_name']}], timer={timer.method}, "
          f"torch {meta['torch']}, triton {meta['triton']}", flush=True)
    if device.type != "cuda" and skip_reason("triton", device, args.interpreter) is None:
        print("note: " + INTERPRETER_NOTE, flush=True)
    elif device.type != "cuda":
        print(NO_GPU + "; timing the PyTorch providers only", flush=True)
    if args.cpu_defaults:
        print(f"CPU-sized defaults for {', '.join('--' + n.replace('_', '-') for n in args.cpu_defaults)} (the GPU "
              f"sweep would take hours and tens of GB here): seqlens {args.seqlens}, tokens {args.tokens}, heads "
              f"{args.heads}, head dims {args.head_dims}, dtypes {args.dtypes}, providers {args.providers}", flush=True)
    warn_if_cpu_busy(env)

    rows: list[dict] = []
    t_start = time.perf_counter()
    for dt in args.dtypes:
        for H in args.heads:
            for kv in args.kv_heads:
                for D in args.head_dims:
                    for causal in args.causal:
                        for N in args.seqlens:
                            B = max(1, args.tokens // N)
                            cfg = dict(dtype=dt, batch=B, seqlen=N, heads=H, kv_heads=kv or H, head_dim=D,
                                       causal=causal, documents=args.documents, tokens=B * N)
                            new = run_config(args, timer, cfg, ceilings)
                            for r in new:
                                _progress(r)
                            rows += new
    meta.update(elapsed_s=round(time.perf_counter() - t_start, 2), load_avg_1m_at_end=load_avg_1m(),
                cpu_busy_by_others_at_end=cpu_busy() if device.type == "cpu" else None)

    stem = args.name or f"flash_attention_{device.type}_{utc_stamp()}"
    json_path, csv_path, png_path = result_paths(args.out, stem)
    write_json(json_path, meta, rows)
    write_csv(csv_path, meta, rows, CSV_FIELDS)
    plotted = False if args.no_plot else plot(png_path, meta, rows)
    order = {p: i for i, p in enumerate(PROVIDERS)}
    print(table(sorted(rows, key=lambda r: (r["dtype"], r["heads"], r["kv_heads"], r["head_dim"], not r["causal"],
                                            MODES.index(r["mode"]), r["seqlen"], order[r["provider"]]))))
    if device.type != "cuda":
        print(f"peak memory and % peak: not measured on {device.type} (see peak_mem_note in the JSON/CSV)")
    print("wrote " + ", ".join(str(p) for p in [json_path, csv_path] + ([png_path] if plotted else [])))
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
