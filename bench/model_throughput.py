"""End-to-end model throughput: training step time, tokens/s, TFLOP/s, peak memory, and
KV-cache prefill/decode tokens/s, per attention backend and activation-checkpointing setting.

    python bench/model_throughput.py --preset debug --batch-size 8 --seq-len 128
    python bench/model_throughput.py --preset homework --device cuda --dtype bfloat16 \
        --backends eager,sdpa --checkpointing off,on
    python bench/model_throughput.py --quick          # a few seconds: smoke run for tests

What it measures, for each attention backend (any name in ``llama_mini.attention_backends()``):

train    one training step on random tokens (batch, seq_len): the trainer's own
         ``llama_mini.training.step.train_step`` (forward + loss, backward, global-norm clipping,
         AdamW from ``optim.build_optimizer`` with the trainer's default ``OptimConfig``,
         ``zero_grad``), as ``bench/train_throughput.py`` times it; ``host_syncs`` is the
         step's count of device-to-host reads. Reports step time (median and min),
         tokens/s = batch * seq_len / median, achieved
         TFLOP/s = tokens/s * ``model.flops_per_token(seq_len)`` (model FLOPs, PaLM's 6N +
         attention estimate; recomputation under activation checkpointing is *not* counted,
         the usual MFU convention) and, where the device's dense peak is known (or given with
         ``--peak-tflops``), the fraction of it (MFU). Once per ``--checkpointing`` value.
prefill  ``forward_inference(prompt, 0, cache)`` on a (decode_batch, prompt_len) prompt into a
         cache from ``model.new_cache(decode_batch, prompt_len + decode_tokens)``.
decode   ``decode_tokens`` greedy steps of ``forward_inference(next_token, pos, cache)`` after
         the prompt (argmax included); decode tokens/s = decode_batch * decode_tokens / time.

Timing. CUDA: ``triton.testing.do_bench`` (per-call times, L2 flushed between calls; median and
min reported; its ``rep`` budget is stretched so that at least min(5, --repeats) calls are
timed even when one call is slow) when triton imports, else CUDA events around each call. CPU and other devices:
repeated wall-clock calls after warmup, with a device synchronize where the device has one;
median and min reported.

Peak memory. CUDA: ``torch.cuda.max_memory_allocated`` over one call after warmup, with the
counters reset per config and outside the timed loop (do_bench's 256 MB L2-flush buffer would
otherwise count). Elsewhere it is null and ``peak_mem_note`` says why: PyTorch keeps no
allocator statistics for CPU tensors, and process RSS would mix in the interpreter, other
models and allocator caching, so it would not be the model's peak.

Precision (``--dtype``). float32: no autocast, no cast. bfloat16/float16: training keeps fp32
weights and gradients and runs the forward under ``torch.autocast(device, dtype)`` (mixed
precision as the trainer runs it, with its ``LossScaler`` for float16); inference
casts the model to the dtype (``model.to(dtype)``) and allocates the KV cache in it (how
low-precision generation runs).

Output (``--out``, default ``bench/results/model_throughput/``, created if missing):
``<name>.json`` (metadata: device, library versions, date, full config; then one record per
config; ``seq_len`` of a prefill/decode record is the context length it ends at),
``<name>.csv`` (the same records; metadata as leading ``# `` lines, read it with
``pandas.read_csv(path, comment="#")``) and ``<name>.png`` (bar plots of tokens/s; needs
matplotlib, skipped with a note if it is missing). A progress line per config goes to stderr,
a summary table to stdout. Exits 1 if any config failed (the failure is recorded, the other
configs still run).

The model-independent parts (environment and versions, timers, peak memory, the peak-TFLOP/s
table, the text table and the JSON/CSV writers) live in ``bench/common.py``.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

try:
    import llama_mini
except ImportError:  # running from a checkout without ``pip install -e .``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import llama_mini

# ``python bench/model_throughput.py`` puts bench/ first on sys.path, so this is bench/common.py.
from common import (
    DTYPES, cpu_busy, environment, fmt, format_table, HelpFormatter, load_avg_1m, peak_memory, peak_tflops,
    parse_overrides, pyplot, release, result_paths, results_dir, start_device, Timer, utc_now_iso, utc_stamp, versions,
    warn_if_cpu_busy, write_csv, write_json,
)
from llama_mini import PRESETS, ModelArgs, Transformer, attention_backends, attention_fallbacks, resolutions
from llama_mini.training.config import OptimConfig
from llama_mini.training.optim import build_optimizer
from llama_mini.training.precision import LossScaler, autocast_factory
from llama_mini.training.step import train_step

DEFAULT_OUT = results_dir("model_throughput")

CSV_FIELDS = [
    "phase", "attn_backend", "attn_used", "checkpointing", "batch_size", "seq_len", "prompt_len", "decode_tokens",
    "tokens_per_call",
    "median_ms", "min_ms", "n_timed", "timer", "tokens_per_s", "ms_per_decode_step", "flops_per_token",
    "tflops", "peak_tflops", "mfu", "peak_mem_mib", "peak_mem_note", "loss", "host_syncs", "error",
]


# ---------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/model_throughput.py",
        description=__doc__.split("\n\n")[0],
        epilog="example: python bench/model_throughput.py --preset debug --batch-size 8 --seq-len 128\n"
        "Defaults in [brackets] depend on other options. The module docstring explains every figure.",
        formatter_class=HelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="debug", choices=sorted(PRESETS), help="ModelArgs preset to build")
    m.add_argument(
        "--override", action="append", default=[], metavar="FIELD=VALUE",
        help="override a ModelArgs field (repeatable), e.g. --override n_layers=4 --override max_seq_len=512; "
        "VALUE is a Python literal or a bare string",
    )
    m.add_argument(
        "--backends", default="eager,sdpa",
        help="comma-separated attention backends; any of llama_mini.attention_backends() "
        "(after --register-module imports)",
    )
    m.add_argument(
        "--checkpointing", default="off",
        help="comma-separated activation-checkpointing settings to train with: off, on, or off,on",
    )
    m.add_argument(
        "--register-module", action="append", default=[], metavar="MODULE",
        help="import MODULE first (repeatable), e.g. one that calls register_attention_backend or register_op",
    )
    m.add_argument("--seed", type=int, default=0, help="seed for weights and random tokens")

    s = p.add_argument_group("shapes (defaults shrink under --quick unless given)")
    s.add_argument("--batch-size", type=int, default=None, help="training batch size [8; quick: 2]")
    s.add_argument("--seq-len", type=int, default=None, help="training sequence length [128; quick: 32]")
    s.add_argument("--decode-batch-size", type=int, default=None, help="inference batch size [--batch-size]")
    s.add_argument("--prompt-len", type=int, default=None,
                   help="prompt tokens prefilled into the KV cache [64; quick: 16]")
    s.add_argument("--decode-tokens", type=int, default=None,
                   help="tokens decoded one at a time after the prompt [64; quick: 4]")
    s.add_argument(
        "--phases", default="train,inference",
        help="what to run: train, inference (prefill + decode), or both",
    )

    d = p.add_argument_group("device and precision")
    d.add_argument("--device", default="auto",
                   help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps, ...")
    d.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES),
        help="compute dtype: training uses autocast with fp32 weights; inference casts the model and KV cache",
    )
    d.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs [torch's default]")
    d.add_argument(
        "--peak-tflops", type=float, default=None,
        help="the device's peak TFLOP/s for the MFU column [from a datasheet table for known GPUs; none on CPU]",
    )

    t = p.add_argument_group("timing")
    t.add_argument(
        "--timer", default="auto", choices=["auto", "do_bench", "cuda-events", "wall"],
        help="auto: do_bench on CUDA if triton imports, else CUDA events; wall-clock elsewhere",
    )
    t.add_argument("--warmup", type=int, default=None,
                   help="untimed calls before timing (wall and cuda-events timers) [5; quick: 1]")
    t.add_argument("--repeats", type=int, default=None, help="timed calls (wall and cuda-events timers) [20; quick: 2]")
    t.add_argument("--warmup-ms", type=float, default=None, help="do_bench warmup budget in ms [50; quick: 5]")
    t.add_argument("--rep-ms", type=float, default=None, help="do_bench timing budget in ms [200; quick: 10]")
    t.add_argument("--quick", action="store_true",
                   help="tiny shapes and iteration counts: a smoke run of a few seconds")

    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="directory for the JSON, CSV and PNG, created if missing "
                   "[bench/results/model_throughput/ of this checkout]")
    o.add_argument("--name", default=None, help="file stem of the outputs [<preset>_<device>_<dtype>_<UTC time>]")
    o.add_argument("--no-plot", action="store_true", help="do not write the PNG")

    args = p.parse_args(argv)
    q = args.quick
    for name, normal, quick in (
        ("batch_size", 8, 2), ("seq_len", 128, 32), ("prompt_len", 64, 16), ("decode_tokens", 64, 4),
        ("warmup", 5, 1), ("repeats", 20, 2), ("warmup_ms", 50.0, 5.0), ("rep_ms", 200.0, 10.0),
    ):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else normal)
    if args.decode_batch_size is None:
        args.decode_batch_size = args.batch_size
    for name in ("batch_size", "seq_len", "decode_batch_size", "prompt_len", "decode_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")

    for mod in args.register_module:
        importlib.import_module(mod)
    args.backends = _split(args.backends)
    unknown = [b for b in args.backends if b not in attention_backends()]
    if unknown or not args.backends:
        p.error(f"unknown attention backend(s) {unknown}; registered: {attention_backends()}")
    ckpt = _split(args.checkpointing)
    if not ckpt or any(c not in ("off", "on") for c in ckpt):
        p.error(f"--checkpointing takes off, on or off,on; got {args.checkpointing!r}")
    args.checkpointing = [c == "on" for c in ckpt]
    args.phases = _split(args.phases)
    if not args.phases or any(ph not in ("train", "inference") for ph in args.phases):
        p.error(f"--phases takes train, inference or train,inference; got {args.phases}")
    try:
        args.overrides = parse_overrides(args.override)
    except ValueError as e:
        p.error(str(e))
    return args


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------------- configs
def build_model(args: argparse.Namespace, device: torch.device, backend: str, checkpointing: bool) -> Transformer:
    overrides = dict(args.overrides)
    overrides.update(attn_backend=backend, activation_checkpointing=checkpointing)
    # the KV cache must hold the inference batch; the capacity changes nothing else
    preset_capacity = ModelArgs.preset(args.preset, **args.overrides).max_batch_size
    overrides["max_batch_size"] = max(preset_capacity, args.decode_batch_size)
    torch.manual_seed(args.seed)
    return Transformer(ModelArgs.preset(args.preset, **overrides)).to(device)


def attn_used(backend: str, device: torch.device) -> str:
    """``backend``, or ``"sdpa (fallback: why)"`` when the model ran sdpa instead: a fallback is
    recorded per device (``triton@cuda``) or per input (``triton@cuda/float32/D=256``)."""
    where = f"{backend}@{device.type}"
    why = next((w for k, w in attention_fallbacks().items() if k == where or k.startswith(where + "/")), None)
    return f"sdpa (fallback: {why})" if why else backend


def _row(phase: str, backend: str, **fields: Any) -> dict[str, Any]:
    row = {k: None for k in CSV_FIELDS}
    row.update(phase=phase, attn_backend=backend, **fields)
    return row


def _timing_fields(times: list[float], timer: str, tokens: int) -> dict[str, Any]:
    median = statistics.median(times)
    return dict(
        median_ms=median, min_ms=min(times), n_timed=len(times), timer=timer,
        tokens_per_call=tokens, tokens_per_s=tokens / (median / 1e3),
    )


def run_train(args, device, timer, backend: str, checkpointing: bool, ceiling: float | None) -> dict[str, Any]:
    dtype = DTYPES[args.dtype]
    model = build_model(args, device, backend, checkpointing).train()
    B, T = args.batch_size, args.seq_len
    gen = torch.Generator().manual_seed(args.seed + 1)
    data = torch.randint(0, model.args.vocab_size, (B, T + 1), generator=gen).to(device)
    batch = {"input_ids": data[:, :-1].contiguous(), "target_ids": data[:, 1:].contiguous()}  # (B, T) each
    cfg = OptimConfig()  # the trainer's defaults
    opt = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    scaler = LossScaler(dtype == torch.float16)
    autocast = autocast_factory({torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype], device)
    results = []

    def step() -> None:
        out = train_step(model, opt, [batch], lr=cfg.lr, grad_clip=cfg.grad_clip, scaler=scaler, autocast=autocast,
                         device=device)
        if len(results) < 2:
            results.append(out)

    step()  # first call: lazy allocations (rope tables, autocast caches, cuBLAS handles)
    mem, mem_note = peak_memory(step, device)
    times, how = timer(step)
    fields = _timing_fields(times, how, B * T)
    fpt = model.flops_per_token(T)
    tflops = fields["tokens_per_s"] * fpt / 1e12
    row = _row(
        "train", backend, attn_used=attn_used(backend, device), checkpointing="on" if checkpointing else "off",
        batch_size=B, seq_len=T, flops_per_token=fpt, tflops=tflops, peak_tflops=ceiling,
        mfu=tflops / ceiling if ceiling else None, peak_mem_mib=mem, peak_mem_note=mem_note, loss=results[0].loss,
        host_syncs=results[-1].host_syncs, **fields,
    )
    del model, opt
    return row


def run_inference(args, device, timer, backend: str) -> list[dict[str, Any]]:
    dtype = DTYPES[args.dtype]
    model = build_model(args, device, backend, False).eval().to(dtype)
    B, P, N = args.decode_batch_size, args.prompt_len, args.decode_tokens
    cache = model.new_cache(B, P + N, dtype=dtype)
    gen = torch.Generator().manual_seed(args.seed + 2)
    prompt = torch.randint(0, model.args.vocab_size, (B, P), generator=gen).to(device)  # (B, P)
    first = torch.zeros(B, 1, dtype=torch.long, device=device)

    def prefill() -> None:
        logits = model.forward_inference(prompt, 0, cache)  # (B, P, V)
        first.copy_(logits[:, -1].argmax(-1, keepdim=True))

    def decode() -> None:
        tok = first  # (B, 1); positions P..P+N-1 are rewritten on every call
        for pos in range(P, P + N):
            tok = model.forward_inference(tok, pos, cache)[:, -1].argmax(-1, keepdim=True)

    rows = []
    for phase, fn, tokens, ctx in (("prefill", prefill, B * P, P), ("decode", decode, B * N, P + N)):
        fn()
        mem, mem_note = peak_memory(fn, device)
        times, how = timer(fn)
        fields = _timing_fields(times, how, tokens)
        extra = {"ms_per_decode_step": fields["median_ms"] / N} if phase == "decode" else {}
        rows.append(_row(
            phase, backend, attn_used=attn_used(backend, device), checkpointing="n/a", batch_size=B,
            seq_len=ctx, prompt_len=P, decode_tokens=N if phase == "decode" else 0,
            peak_mem_mib=mem, peak_mem_note=mem_note, **extra, **fields,
        ))
    del model, cache
    return rows


# ---------------------------------------------------------------------------- reporting
def _progress(i: int, n: int, row: dict[str, Any]) -> None:
    what = f"[{i}/{n}] {row['phase']:<7} backend={row['attn_backend']:<8} ckpt={row['checkpointing']:<3} " \
           f"B={row['batch_size']} T={row['seq_len']}"
    if row.get("error"):
        print(f"{what}: FAILED {row['error']}", file=sys.stderr, flush=True)
        return
    msg = (f"{what}: {row['median_ms']:.3f} ms (min {row['min_ms']:.3f}, n={row['n_timed']}) "
           f"{row['tokens_per_s']:,.0f} tok/s")
    if row.get("tflops") is not None:
        msg += f", {row['tflops']:.3g} TFLOP/s"
    if row.get("peak_mem_mib") is not None:
        msg += f", peak {row['peak_mem_mib']:,.0f} MiB"
    if row.get("attn_used") not in (None, row["attn_backend"]):
        msg += f"  [ran as {row['attn_used']}]"
    print(msg, file=sys.stderr, flush=True)


def table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("phase", "phase", ""), ("backend", "attn_backend", ""), ("ckpt", "checkpointing", ""),
        ("B", "batch_size", "d"), ("T/ctx", "seq_len", "d"), ("median ms", "median_ms", ".3f"),
        ("min ms", "min_ms", ".3f"), ("tokens/s", "tokens_per_s", ",.0f"), ("TFLOP/s", "tflops", ".3g"),
        ("MFU", "mfu", ".1%"), ("peak MiB", "peak_mem_mib", ",.0f"), ("syncs", "host_syncs", "d"),
    ]
    body: list[list[str]] = []
    notes: list[str] = []
    for r in rows:
        row = [fmt(r[k], s) for _, k, s in cols]
        if r.get("error"):
            row[5:] = ["FAILED"] + ["-"] * (len(cols) - 6)
            note = f"{r['phase']} {r['attn_backend']}: {r['error']}"
            if note not in notes:
                notes.append(note)
        elif r.get("attn_used") not in (None, r["attn_backend"]):
            row[1] += "*"
            note = f"{r['attn_backend']}* ran as {r['attn_used']}"
            if note not in notes:
                notes.append(note)
        body.append(row)
    return format_table([h for h, _, _ in cols], body, n_left=3, notes=notes)


def plot(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    phases = [ph for ph in ("train", "prefill", "decode") if any(r["phase"] == ph and not r.get("error") for r in rows)]
    if not phases:
        return False
    cfg = meta["config"]
    titles = {
        "train": f"training step (train_step)\nB={cfg['batch_size']}, T={cfg['seq_len']}",
        "prefill": f"prefill (KV cache)\nB={cfg['decode_batch_size']}, prompt={cfg['prompt_len']}",
        "decode": f"decode (KV cache)\nB={cfg['decode_batch_size']}, {cfg['decode_tokens']} tokens after the prompt",
    }
    color = {b: f"C{i}" for i, b in enumerate(cfg["backends"])}  # one colour per backend in every panel
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, len(phases), figsize=(4.2 * len(phases) + 0.6, 4.4), squeeze=False)
    for ax, ph in zip(axes[0], phases):
        sel = [r for r in rows if r["phase"] == ph and not r.get("error")]
        labels = [r["attn_backend"] + ("*" if r.get("attn_used") != r["attn_backend"] else "")
                  + (f"\nckpt {r['checkpointing']}" if ph == "train" else "") for r in sel]
        values = [r["tokens_per_s"] for r in sel]
        bars = ax.bar(range(len(sel)), values, color=[color.get(r["attn_backend"], "C7") for r in sel],
                      hatch=None, edgecolor="black", linewidth=0.5)
        for bar, r in zip(bars, sel):
            if r["checkpointing"] == "on":
                bar.set_hatch("//")
            note = f"{r['tokens_per_s']:,.0f}"
            if r.get("tflops") is not None and meta["device_type"] == "cuda":
                note += f"\n{r['tflops']:.3g} TF/s"
            ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(sel)), labels, fontsize=9)
        ax.set_ylim(0, max(values) * 1.22)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_title(titles[ph], fontsize=10)
        ax.set_ylabel("tokens/s (median; higher is better)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    fig.suptitle(f"llama-mini {cfg['preset']} ({meta['n_params'] / 1e6:.2f}M params), {cfg['dtype']}, "
                 f"{meta['device_name']}", fontsize=10)
    if any(r.get("attn_used") not in (None, r["attn_backend"]) for r in rows if not r.get("error")):
        fig.text(0.01, 0.01, "* the backend could not run here and fell back to sdpa (see attn_used)", fontsize=8)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = start_device(args.device, args.threads)
    # Fail on impossible shapes before any timing, with the override that fixes them.
    try:
        probe = ModelArgs.preset(args.preset, **args.overrides)
    except (TypeError, ValueError, KeyError) as e:
        raise SystemExit(f"--preset {args.preset} with --override {args.overrides}: {e}") from None
    if args.seq_len > probe.max_seq_len or args.prompt_len + args.decode_tokens > probe.max_seq_len:
        raise SystemExit(
            f"seq_len={args.seq_len} and prompt_len + decode_tokens={args.prompt_len + args.decode_tokens} must "
            f"fit max_seq_len={probe.max_seq_len} of preset {args.preset!r}; add --override max_seq_len=N"
        )

    args.out.mkdir(parents=True, exist_ok=True)  # now, so an unwritable --out fails before the timing
    env = environment(device)
    timer = Timer.from_args(args, device)
    warn_if_cpu_busy(env)
    ceiling, ceiling_src = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else \
        peak_tflops(env.get("device_name", ""), args.dtype, device)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "override")}
    config.update(out=str(args.out), device=str(device),
                  checkpointing=["on" if c else "off" for c in args.checkpointing])
    meta: dict[str, Any] = {
        "script": "bench/model_throughput.py",
        "date": utc_now_iso(),
        **env,
        **versions(),  # torch, triton, python
        "llama_mini": getattr(llama_mini, "__version__", None),
        "timing": timer.describe(),
        "precision": (
            "float32 throughout" if args.dtype == "float32" else
            f"train: fp32 weights/grads, forward under torch.autocast({device.type}, {args.dtype}); "
            f"inference: model and KV cache cast to {args.dtype}"
        ),
        "flops": "model.flops_per_token(seq_len): 6*N_matmul + 6*n_layers*dim*seq_len per trained token (causal "
                 "attention counted as half); "
                 "activation-checkpointing recompute not counted",
        "peak_tflops": ceiling,
        "peak_tflops_source": ceiling_src,
        "config": config,
    }

    plan: list[tuple[str, str, bool]] = []
    for backend in args.backends:
        if "train" in args.phases:
            plan += [("train", backend, c) for c in args.checkpointing]
        if "inference" in args.phases:
            plan.append(("inference", backend, False))
    n_rows = sum(2 if kind == "inference" else 1 for kind, _, _ in plan)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for kind, backend, ckpt in plan:
        try:
            new = [run_train(args, device, timer, backend, ckpt, ceiling)] if kind == "train" \
                else run_inference(args, device, timer, backend)
        except Exception as e:  # record and go on (e.g. CUDA OOM for one config)
            traceback.print_exc(file=sys.stderr)
            phases = ["train"] if kind == "train" else ["prefill", "decode"]
            new = [_row(ph, backend, checkpointing=("on" if ckpt else "off") if kind == "train" else "n/a",
                        batch_size=args.batch_size if kind == "train" else args.decode_batch_size,
                        seq_len=args.seq_len if kind == "train" else
                        args.prompt_len + (args.decode_tokens if ph == "decode" else 0),
                        error=f"{type(e).__name__}: {e}") for ph in phases]
        for r in new:
            rows.append(r)
            _progress(len(rows), n_rows, r)
        release(device)

    model_args = ModelArgs.preset(args.preset, **args.overrides)
    meta.update(
        model_args=model_args.to_dict(),
        n_params=llama_mini.count_params(model_args),
        n_params_no_embeddings=llama_mini.count_params(model_args, include_embeddings=False),
        op_resolutions=resolutions(),
        attention_fallbacks=attention_fallbacks(),
        elapsed_s=round(time.perf_counter() - t_start, 2),
        load_avg_1m_at_end=load_avg_1m(),
        cpu_busy_by_others_at_end=cpu_busy() if device.type == "cpu" else None,
    )

    stem = args.name or f"{args.preset}_{device.type}_{args.dtype}_{utc_stamp()}"
    json_path, csv_path, png_path = result_paths(args.out, stem)
    write_json(json_path, meta, rows)
    write_csv(csv_path, meta, rows, CSV_FIELDS)
    plotted = False if args.no_plot else plot(png_path, meta, rows)

    print(f"llama-mini model throughput: preset={args.preset} ({meta['n_params'] / 1e6:.2f}M params), "
          f"device={device} [{meta['device_name']}], dtype={args.dtype}, timer={timer.method}, "
          f"torch {meta['torch']}, triton {meta['triton']}")
    print(table(rows))
    if device.type != "cuda":
        print(f"peak memory: not measured on {device.type} (see peak_mem_note in the JSON/CSV)")
    if ceiling is None and "train" in args.phases:
        print(f"MFU: no ceiling ({ceiling_src})")
    written = [json_path, csv_path] + ([png_path] if plotted else [])
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
