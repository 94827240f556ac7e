"""Context-length study: what a longer training context costs (time per step, memory, the largest
batch) per attention backend and activation-checkpointing setting, and what it buys in validation
perplexity, including a model trained short and evaluated long with and without RoPE scaling.

    python bench/context_length.py              # CPU default: debug model, T = 512 and 2048, ~5 min on 2 cores
    python bench/context_length.py --quick      # smoke run (the test runs it): T = 64 and 256, seconds
    python bench/context_length.py --full       # GPU: homework model (dim 512, 8 layers, 8 heads), bf16 cost part
    python bench/context_length.py --seq-lens 256,1024 --parts quality --override n_layers=4

Part 1, cost (``--parts cost``). For each attention backend (eager, sdpa, triton) x activation
checkpointing (off, on) x sequence length T of ``--seq-lens``, ``bench/train_throughput.py`` (imported,
not re-implemented) times the training step of one model (forward + loss, backward, AdamW step,
zero_grad) on a fixed random batch of B x T tokens, fused kernels off so that only attention differs:

    ms/step      median of the timed steps          tokens/s = B * T / median
    peak memory  torch.cuda.max_memory_allocated over one step (CUDA); null on CPU, with the reason
    max batch    CUDA: MEASURED by an OOM search (doubling, then bisection).
                 CPU: an ESTIMATE, not an OOM search: torch.profiler records every allocation of a step
                 at two batch sizes, the live bytes are fitted as C + D * batch, and the largest batch
                 whose peak (plus weights and AdamW state) fits --memory-budget-gib is reported.

Triton attention runs compiled only on CUDA; on a CPU its rows are skipped with the reason (the
interpreter runs one program at a time: hours at T = 2048). A backend that falls back to sdpa inside
the model is reported as skipped with the fallback's reason, never under its own name.

Part 2, quality (``--parts quality``). Model A (max_seq_len S, the first of --seq-lens) and model B
(max_seq_len L, the last) start from the same seed-determined weights and train with AdamW
(``experiment.fit``, sdpa) on the same token stream: the first --train-docs documents of the training
data concatenated and cut into full windows (policy ``impute``), --tokens-per-step tokens per step
(A: tokens/S windows, B: tokens/L), so both take the same steps over the same tokens until
--token-budget. Each is saved as a Meta checkpoint and evaluated with
``llama_mini.training.evaluate.perplexity_at_lengths`` on the validation data at every length:

    loss = token-weighted mean cross-entropy over full windows of that length;   ppl = exp(loss)

model A with RoPE scaling none, linear:F and ntk:F where F = L / S (linear: every frequency / F, the
positions squeezed into the trained range; ntk: base theta * F^(D/(D-2)), low frequencies stretched,
high ones kept), model B with none.

Outputs (--out, default bench/results/context_length/): report.md (tables, figures and "What the
numbers say", computed from this run), results.json / results.csv (one row per cost configuration and
per evaluation; column ``part`` = cost | quality), cost.png, perplexity.png, checkpoints/A_T<S>,
checkpoints/B_T<L>.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common import (HelpFormatter, fmt, int_list, is_oom, name_list, parse_overrides, pyplot, release, results_dir,
                    start_device)
from experiment import (FitConfig, Report, batches_of, build_model, config_dict, data_arguments, data_sources,
                        device_arguments, first_documents, fit, markdown_table, say, timed)
import train_throughput as tt

from llama_mini.data import PileReader, Tokenizer
from llama_mini.data.tokenized import tokenize_document
from llama_mini import ModelArgs, attention_backends, count_params
from llama_mini.checkpoint import save_meta_checkpoint
from llama_mini.training.evaluate import perplexity_at_lengths

TAG = "context_length"
PARTS = ("cost", "quality")
FIELDS = [
    "part", "backend", "checkpointing", "seq_len", "batch_size", "dtype", "status", "reason", "attn_used",
    "ms_per_step", "min_ms", "n_timed", "tokens_per_s", "peak_mem_mib", "peak_mem_note", "max_batch",
    "max_batch_capped", "max_batch_how", "per_sample_mib", "max_batch_method", "n_params",
    "model", "trained_at", "evaluated_at", "rope_scaling", "rope_factor", "tokens", "loss", "ppl",
]
# name: (CPU default, --full, --quick)
DEFAULTS = {
    "seq_lens": ("512,2048", "512,2048", "64,256"), "preset": ("debug", "homework", "debug"),
    "batch_size": (2, 8, 2), "steps": (3, 10, 1), "min_time": (1.0, 0.0, 0.0), "train_docs": (128, 1040, 24),
    "tokens_per_step": (2048, 16384, 512), "token_budget": (262_144, 3_000_000, 2048), "lr": (5e-3, 1e-3, 5e-3),
    "eval_tokens": (65_536, 262_144, 1024), "eval_batch_size": (4, 4, 2),
}


# ---------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/context_length.py", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="Defaults in [brackets] are CPU / --full / --quick. The module docstring "
                                       "explains every figure.")
    g = p.add_argument_group("study")
    g.add_argument("--seq-lens", help="comma list of increasing sequence lengths; first = short (model A), "
                   "last = long (model B) [512,2048 / 512,2048 / 64,256]")
    g.add_argument("--parts", default="cost,quality", help="cost, quality or both")
    g.add_argument("--preset", help="ModelArgs preset, vocab_size from the tokenizer [debug / homework / debug]")
    g.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                   help="ModelArgs field for both parts (repeatable), e.g. --override n_layers=4")
    g.add_argument("--seed", type=int, default=0, help="weights (both models start equal) and random batches")
    c = p.add_argument_group("cost part")
    c.add_argument("--backends", default="eager,sdpa,triton", help="attention backends")
    c.add_argument("--checkpointing", default="off,on", help="activation checkpointing: off, on or off,on")
    c.add_argument("--batch-size", type=int, help="batch of the timed step [2 / 8 / 2]")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype of the cost part [cpu: float32; cuda: bfloat16]")
    c.add_argument("--steps", type=int, help="timed steps, at least [3 / 10 / 1]")
    c.add_argument("--min-time", type=float, help="time more steps up to about this many seconds [1 / 0 / 0]")
    c.add_argument("--max-batch", action=argparse.BooleanOptionalAction, default=True,
                   help="largest batch: OOM search on CUDA, profiler estimate on CPU")
    c.add_argument("--memory-budget-gib", type=float, default=16.0, help="CPU estimate: memory a step may use")
    c.add_argument("--max-batch-limit", type=int, default=256, help="CUDA OOM search: stop doubling here")
    q = p.add_argument_group("quality part")
    data_arguments(q)
    q.add_argument("--train-docs", type=int, help="train on the first N documents [128 / 1040 / 24]")
    q.add_argument("--tokens-per-step", type=int, help="tokens per optimizer step, a multiple of the short "
                   "and the long length [2048 / 16384 / 512]")
    q.add_argument("--token-budget", type=int, help="counted target tokens per model [262144 / 3000000 / 2048]")
    q.add_argument("--lr", type=float, help="peak learning rate, cosine decay to 10%% [5e-3 / 1e-3 / 5e-3]")
    q.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps")
    q.add_argument("--eval-tokens", type=int, help="validation tokens per evaluation [65536 / 262144 / 1024]")
    q.add_argument("--eval-batch-size", type=int, help="windows per evaluation batch [4 / 4 / 2]")
    r = p.add_argument_group("run")
    device_arguments(r)
    r.add_argument("--full", action="store_true", help="GPU sizes: homework model, bf16 cost part, 3M-token budget")
    r.add_argument("--quick", action="store_true", help="smoke run: T = 64,256, tiny budgets (seconds)")
    r.add_argument("--out", type=Path, default=results_dir(TAG),
                   help="output directory [bench/results/context_length/]")
    args = p.parse_args(argv)

    if args.full and args.quick:
        p.error("--full and --quick exclude each other")
    if args.data and not args.val_data:
        p.error("--val-data is required with --data (validate on the same kind of text)")
    col = 1 if args.full else 2 if args.quick else 0
    if args.threads is None and not args.full:
        args.threads = 1  # see experiment.device_arguments
    for name, values in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[col])
    try:
        args.seq_lens = int_list("--seq-lens", args.seq_lens)
        args.parts = name_list("--parts", args.parts, PARTS)
        args.backends = name_list("--backends", args.backends, attention_backends())
        args.checkpointing = name_list("--checkpointing", args.checkpointing, ("off", "on"))
    except ValueError as e:
        p.error(str(e))
    lens = args.seq_lens
    if len(lens) < 2 or any(b <= a for a, b in zip(lens, lens[1:])) or lens[0] < 2:
        p.error(f"--seq-lens needs two or more strictly increasing lengths >= 2 (short first, long last), got {lens}")
    for name in ("batch_size", "steps", "train_docs", "tokens_per_step", "token_budget", "eval_tokens",
                 "eval_batch_size", "max_batch_limit"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    bad = [L for L in (args.seq_lens[0], args.seq_lens[-1]) if args.tokens_per_step % L]
    if "quality" in args.parts and bad:
        p.error(f"--tokens-per-step {args.tokens_per_step} must be a multiple of the first and last --seq-lens "
                f"(not of {bad}): both models take the same tokens per step")
    try:
        fixed = set(parse_overrides(args.override)) & {"vocab_size", "max_seq_len", "attn_backend",
                                                       "activation_checkpointing"}
    except ValueError as e:
        p.error(str(e))
    if fixed:
        p.error(f"--override {', '.join(sorted(fixed))}: the study sets these itself (vocab from the tokenizer, "
                "lengths from --seq-lens, backends from --backends, --checkpointing)")
    return args


# ---------------------------------------------------------------------------- part 1: cost
def cost_namespace(args: argparse.Namespace, T: int, vocab: int) -> argparse.Namespace:
    """train_throughput's own options for one sequence length (our overrides last, so they win)."""
    argv = ["--presets", args.preset, "--backends", ",".join(args.backends), "--fused", "off",
            "--checkpointing", ",".join(args.checkpointing), "--batch-size", str(args.batch_size),
            "--seq-len", str(T), "--dtype", args.dtype, "--device", str(args.device), "--steps", str(args.steps),
            "--min-time", str(args.min_time), "--compare-plain", "off", "--seed", str(args.seed),
            "--memory-budget-gib", str(args.memory_budget_gib), "--max-batch-limit", str(args.max_batch_limit)]
    for item in args.override + [f"vocab_size={vocab}", f"max_seq_len={T}"]:
        argv += ["--override", item]
    return tt.parse_args(argv)


def not_runnable(backend: str, device: Any) -> str | None:
    reason = tt.skip_reason(backend, "off", device)
    if reason is None and backend == "triton" and device.type != "cuda":
        reason = (f"Triton attention runs compiled only on a CUDA GPU; on {device.type} only Triton's "
                  "interpreter could run it (one program at a time: hours at these lengths, and its time would "
                  "say nothing about the kernel)")
    return reason


def _guarded(fn, what: str) -> tuple[dict | None, str | None, str | None]:
    """(row, status, message): an OOM is a result; another error is recorded and the study goes on."""
    try:
        return fn(), None, None
    except Exception as e:  # noqa: BLE001 - one failed configuration must not end the study
        oom = is_oom(e)
        say(TAG, f"{what}: {'OOM' if oom else 'FAILED'} {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None, "oom" if oom else "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def cost_config(ns: argparse.Namespace, device: Any, backend: str, ckpt: str) -> dict:
    T, what = ns.seq_len, f"cost {backend} ckpt={ckpt} T={ns.seq_len}"
    row = {k: None for k in FIELDS}
    row.update(part="cost", backend=backend, checkpointing=ckpt, seq_len=T, batch_size=ns.batch_size,
               dtype=ns.dtype, status="ok")
    reason = not_runnable(backend, device)
    if reason:
        row.update(status="skipped", reason=reason)
        say(TAG, f"{what}: skipped ({reason})")
        return row
    preset = ns.presets[0]
    train, status, msg = _guarded(lambda: tt.run_ours(ns, device, preset, backend, "off", ckpt, None), what)
    if train is None:
        row.update(status=status, reason=msg)
        return row
    if train["attn_used"] != backend:  # its numbers are sdpa's: drop them rather than print them under this name
        row.update(status="skipped", reason=f"ran as {train['attn_used']}; not reported as {backend}",
                   attn_used=train["attn_used"])
        return row
    row.update(attn_used=train["attn_used"], ms_per_step=train["median_ms"], min_ms=train["min_ms"],
               n_timed=train["n_timed"], tokens_per_s=train["tokens_per_s"], peak_mem_mib=train["peak_mem_mib"],
               peak_mem_note=train["peak_mem_note"], n_params=train["n_params"])
    if ns.max_batch:
        search = tt.max_batch_cuda if device.type == "cuda" else tt.max_batch_cpu
        mb, status, msg = _guarded(lambda: search(ns, device, preset, backend, "off", ckpt), what + " max batch")
        if mb is None:
            row.update(max_batch_how=status, max_batch_method=msg)
        else:
            row.update(max_batch=mb["max_batch"], max_batch_capped=bool(mb["max_batch_capped"]),
                       per_sample_mib=mb["per_sample_mib"], max_batch_method=mb["max_batch_method"],
                       max_batch_how="measured" if device.type == "cuda" else "estimated")
    say(TAG, f"{what}: {row['ms_per_step']:.1f} ms/step, {row['tokens_per_s']:,.0f} tokens/s, "
             f"largest batch {fmt(row['max_batch'], 'd')} ({row['max_batch_how'] or 'not searched'})")
    return row


def run_cost(args: argparse.Namespace, device: Any, vocab: int) -> list[dict]:
    rows = []
    for T in args.seq_lens:
        ns = cost_namespace(args, T, vocab)
        ns.max_batch = args.max_batch
        for backend in args.backends:
            for ckpt in args.checkpointing:
                rows.append(cost_config(ns, device, backend, ckpt))
                release(device)
    return rows


# ---------------------------------------------------------------------------- part 2: quality
def quality_model_args(args: argparse.Namespace, T: int, vocab: int) -> ModelArgs:
    fields = parse_overrides(args.override)
    fields.update(vocab_size=vocab, max_seq_len=T, attn_backend="sdpa", activation_checkpointing=False)
    return ModelArgs.preset(args.preset, **fields)


def train_one(name: str, T: int, examples: list, tok: Tokenizer, args, device, out: Path) -> tuple[Path, dict]:
    """Train one model at max_seq_len T, save it as a Meta checkpoint with its tokenizer."""
    batch = args.tokens_per_step // T
    margs = quality_model_args(args, T, tok.vocab_size)
    model = build_model(margs, args.seed, device)
    batches, _ = batches_of(examples, "impute", T, batch, pad_id=tok.pad_id, ignore_index=margs.ignore_index)
    total = math.ceil(args.token_budget / args.tokens_per_step)
    cfg = FitConfig(lr=args.lr, warmup_steps=args.warmup_steps, decay="cosine", seed=args.seed)
    with timed(TAG, f"train model {name}: T={T}, batch {batch}, budget {args.token_budget:,} tokens"):
        res = fit(model, batches, cfg, token_budget=args.token_budget, total_steps=total, device=device,
                  tag=f"{TAG} {name}")
    ckpt = out / "checkpoints" / f"{name}_T{T}"
    save_meta_checkpoint(model, ckpt)
    shutil.copyfile(tok.model_path, ckpt / "tokenizer.model")
    summary = dict(model=name, trained_at=T, batch_size=batch, steps=len(res.steps), tokens_seen=res.tokens_seen,
                   step_tokens=[s["tokens"] for s in res.steps], stopped=res.stopped, seconds=res.seconds,
                   final_loss=res.steps[-1]["loss"], checkpoint=str(ckpt),
                   mean_loss_last_10=statistics.fmean(s["loss"] for s in res.steps[-10:]),
                   n_params=count_params(margs))
    del model
    release(device)
    return ckpt, summary


def unigram_reference(examples: list, budget: int, val_src: Any, tok: Tokenizer, n_tokens: int) -> dict:
    """A model that ignores context: the unigram distribution of the first ``budget`` training
    targets (add-one smoothed over the vocabulary), scored on the first ``n_tokens`` validation
    targets. A trained model near this ppl uses little context, so no length or scaling can matter."""
    counts: Counter = Counter()
    for ex in examples:
        counts.update(ex["target_ids"][: budget - sum(counts.values())])
    total = sum(counts.values()) + tok.vocab_size
    nll, n = 0.0, 0
    for doc in PileReader(val_src, shuffle=False, rank=0, world_size=1):
        for t in tokenize_document(tok, doc)["target_ids"][: n_tokens - n]:
            nll -= math.log((counts[t] + 1) / total)
            n += 1
        if n >= n_tokens:
            break
    return dict(tokens=n, loss=nll / n, ppl=math.exp(nll / n), train_tokens=total - tok.vocab_size)


def run_quality(args, device, tok: Tokenizer, train_src, val_src, out: Path) -> tuple[list[dict], list[dict], dict]:
    S, L = args.seq_lens[0], args.seq_lens[-1]
    factor = L / S
    with timed(TAG, f"tokenize the first {args.train_docs} documents of {train_src}"):
        examples = first_documents(train_src, args.train_docs, tok)
    plans = [("A", S, ["none", f"linear:{factor:g}", f"ntk:{factor:g}"]), ("B", L, ["none"])]
    unigram = unigram_reference(examples, args.token_budget, val_src, tok, args.eval_tokens)
    rows, training = [], []
    for name, T, scalings in plans:
        ckpt, summary = train_one(name, T, examples, tok, args, device, out)
        training.append(summary)
        evals = perplexity_at_lengths(str(ckpt), val_src, context_lengths=args.seq_lens, rope_scalings=scalings,
                                      batch_size=args.eval_batch_size, max_tokens=args.eval_tokens, device=device)
        for e in evals:
            row = {k: None for k in FIELDS}
            row.update(part="quality", model=name, trained_at=T, evaluated_at=e["context"],
                       rope_scaling=e["rope_scaling"], rope_factor=1.0 if e["rope_scaling"] == "none" else factor,
                       tokens=e["tokens"], loss=e["loss"], ppl=e["ppl"], status="ok", backend="sdpa")
            rows.append(row)
    return rows, training, unigram


# ---------------------------------------------------------------------------- report
def cost_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        mb = None if r["max_batch"] is None else (">=" if r["max_batch_capped"] else "") + f"{r['max_batch']}"
        body.append([r["backend"], r["checkpointing"], r["seq_len"], r["batch_size"], fmt(r["ms_per_step"], ",.1f"),
                     fmt(r["tokens_per_s"], ",.0f"), fmt(r["peak_mem_mib"], ",.0f") if r["peak_mem_mib"] is not None
                     else ("-" if r["status"] != "ok" else "not measured"), mb, r["max_batch_how"],
                     fmt(r["per_sample_mib"], ",.2f"), r["status"] if r["status"] == "ok" else
                     f"{r['status']}: {r['reason']}"])
    return markdown_table(["backend", "ckpt", "seq", "B", "ms/step", "tokens/s", "peak MiB", "largest batch",
                           "how", "MiB/sample", "status"], body,
                          right=[False, False] + [True] * 8 + [False])


def quality_table(rows: list[dict]) -> str:
    body = [[r["model"], r["trained_at"], r["evaluated_at"], r["rope_scaling"], f"{r['tokens']:,}",
             f"{r['loss']:.4f}", f"{r['ppl']:.2f}"] for r in rows]
    return markdown_table(["model", "trained at", "evaluated at", "RoPE scaling", "tokens evaluated", "loss", "ppl"],
                          body, right=[False, True, True, False, True, True, True])


def training_table(training: list[dict]) -> str:
    body = [[t["model"], t["trained_at"], t["batch_size"], t["steps"], f"{t['tokens_seen']:,}", t["stopped"],
             f"{t['mean_loss_last_10']:.4f}", f"{t['seconds']:.1f}"] for t in training]
    return markdown_table(["model", "max_seq_len", "batch", "steps", "tokens seen", "stopped by",
                           "train loss (last 10 steps)", "seconds"], body,
                          right=[False] + [True] * 4 + [False, True, True])


def plot_cost(path: Path, rows: list[dict], lens: list[int]) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens/s (higher is better)"),
                           (axes[1], "max_batch", "largest batch (CPU: estimate; CUDA: measured)")):
        xs, labels = [], []
        for i, r in enumerate(rows):
            x = i + lens.index(r["seq_len"])  # a gap between lengths
            xs.append(x)
            labels.append(f"{r['backend']}\nckpt {r['checkpointing']}\nT={r['seq_len']}")
            value = r[key] if r["status"] == "ok" else None
            if value is None:
                ax.annotate(r["status"] if r["status"] != "ok" else "n/a", (x, 0), ha="center", va="bottom",
                            rotation=90, fontsize=7, xytext=(0, 3), textcoords="offset points")
                continue
            bar = ax.bar(x, value, color=f"C{lens.index(r['seq_len'])}", edgecolor="black", linewidth=0.5,
                         hatch="//" if r["checkpointing"] == "on" else None)[0]
            ax.annotate(f"{value:,.0f}", (x, bar.get_height()), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(xs, labels, fontsize=6)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Training-step cost per attention backend x checkpointing (hatched) x sequence length", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_ppl(path: Path, rows: list[dict], lens: list[int], unigram: dict) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for m, t, s in dict.fromkeys((r["model"], r["trained_at"], r["rope_scaling"]) for r in rows):
        pts = sorted((r["evaluated_at"], r["ppl"]) for r in rows if (r["model"], r["rope_scaling"]) == (m, s))
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", linestyle="-" if m == "A" else "--",
                label=f"model {m} (trained at {t}), RoPE {s}")
        for x, y in pts:
            ax.annotate(f"{y:,.1f}", (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    values = [r["ppl"] for r in rows]
    if max(values) / min(values) > 3:  # log only where the spread needs it: it flattens small differences
        ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lens, [str(L) for L in lens])
    ax.set_xlabel("evaluation context (tokens)")
    ax.set_ylabel("validation perplexity (lower is better)")
    ax.set_title(f"reference: a context-free unigram model scores ppl {unigram['ppl']:,.1f}",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _pct(new: float, old: float) -> str:
    change = (new / old - 1) * 100
    return f"{change:+.1f}%" if abs(change) >= 0.1 else f"{change:+.3f}%"


def cost_findings(rows: list[dict], lens: list[int], device: Any) -> list[str]:
    ok = [r for r in rows if r["status"] == "ok"]
    by_key = {(r["backend"], r["checkpointing"], r["seq_len"]): r for r in ok}
    get = lambda b, c, T: by_key.get((b, c, T))  # noqa: E731
    out = []
    for T in lens:
        for ckpt in ("off", "on"):
            cand = sorted((r for r in ok if r["seq_len"] == T and r["checkpointing"] == ckpt),
                          key=lambda r: -r["tokens_per_s"])
            if len(cand) >= 2:
                others = ", ".join(f"{cand[0]['tokens_per_s'] / r['tokens_per_s']:.2f}x {r['backend']}'s"
                                   for r in cand[1:])
                out.append(f"At T={T} (checkpointing {ckpt}) the fastest backend is **{cand[0]['backend']}** at "
                           f"{cand[0]['tokens_per_s']:,.0f} tokens/s: {others}.")
    S, L = lens[0], lens[-1]
    for b in dict.fromkeys(r["backend"] for r in ok):
        short, long = get(b, "off", S), get(b, "off", L)
        if short and long:
            change = long["tokens_per_s"] / short["tokens_per_s"] - 1
            out.append(f"{b} (checkpointing off): tokens/s {'drops' if change < 0 else 'rises'} by {abs(change):.1%} "
                       f"from T={S} to T={L} ({short['tokens_per_s']:,.0f} -> {long['tokens_per_s']:,.0f}).")
    time_cost, batch_gain = [], []
    for r in (r for r in ok if r["checkpointing"] == "on"):
        off = get(r["backend"], "off", r["seq_len"])
        if off:
            time_cost.append((r["ms_per_step"] / off["ms_per_step"] - 1, r))
            if r["max_batch"] and off["max_batch"] and not (r["max_batch_capped"] or off["max_batch_capped"]):
                batch_gain.append((r["max_batch"] / off["max_batch"], r))
    if time_cost:
        lo, hi = min(time_cost, key=lambda x: x[0]), max(time_cost, key=lambda x: x[0])
        med = statistics.median(c for c, _ in time_cost)
        out.append(f"Activation checkpointing changes the step time by {med:+.1%} "
                   f"(median of {len(time_cost)} pairs; from {lo[0]:+.1%} for {lo[1]['backend']} T={lo[1]['seq_len']} "
                   f"to {hi[0]:+.1%} for {hi[1]['backend']} T={hi[1]['seq_len']}).")
    if batch_gain:
        how = "measured" if device.type == "cuda" else "estimated"
        best = max(batch_gain, key=lambda x: x[0])
        out.append(f"It multiplies the largest batch ({how}) by {statistics.median(g for g, _ in batch_gain):.2f}x "
                   f"(median), most for {best[1]['backend']} at T={best[1]['seq_len']}: {best[0]:.2f}x.")
    longs = [r for r in ok if r["seq_len"] == L and r["checkpointing"] == "off" and r["max_batch"]
             and not r["max_batch_capped"]]  # a capped search says ">= limit", not a size to compare
    if len(longs) >= 2:
        big, small = max(longs, key=lambda r: r["max_batch"]), min(longs, key=lambda r: r["max_batch"])
        out.append(f"At T={L} without checkpointing the largest batch is {big['max_batch']} with {big['backend']} "
                   f"against {small['max_batch']} with {small['backend']}.")
    for b in dict.fromkeys(r["backend"] for r in rows):
        bad = [r for r in rows if r["backend"] == b and r["status"] != "ok"]
        if bad:
            where = "any configuration" if len(bad) == sum(r["backend"] == b for r in rows) else \
                ", ".join(f"T={r['seq_len']} ckpt {r['checkpointing']}" for r in bad)
            reasons = "; ".join(dict.fromkeys(f"{r['status']}: {r['reason']}" for r in bad))
            out.append(f"{b} has no numbers in {where} ({reasons}).")
    return out


def quality_findings(rows: list[dict], training: list[dict], lens: list[int], unigram: dict) -> list[str]:
    S, L = lens[0], lens[-1]
    ppl = {(r["model"], r["rope_scaling"], r["evaluated_at"]): r["ppl"] for r in rows}
    out = []
    best = min(rows, key=lambda r: r["ppl"])
    spread = max(r["ppl"] for r in rows) / best["ppl"] - 1
    gain = 1 - best["ppl"] / unigram["ppl"]
    out.append(f"The best ppl, {best['ppl']:.2f} (model {best['model']}, {best['rope_scaling']}, at "
               f"{best['evaluated_at']}), is {abs(gain):.1%} {'below' if gain > 0 else 'above'} a context-free "
               f"unigram model's {unigram['ppl']:.2f}; all {len(rows)} evaluations lie within {spread:.2%} of each "
               "other"
               + (" - too close for length or RoPE scaling to matter at this budget; the sizes of --full learn "
                  "more context." if spread < 0.01 else "."))
    a, b = (next(t for t in training if t["model"] == m) for m in ("A", "B"))
    out.append(f"Both models trained on {a['tokens_seen']:,} (A) and {b['tokens_seen']:,} (B) tokens in "
               f"{a['steps']} and {b['steps']} steps; training took {a['seconds']:.1f} s at T={S} and "
               f"{b['seconds']:.1f} s at T={L}.")
    a_s, a_l = ppl.get(("A", "none", S)), ppl.get(("A", "none", L))
    if a_s and a_l:
        verdict = ("left it within 1%" if abs(a_l / a_s - 1) < 0.01 else
                   f"made it **{'worse' if a_l > a_s else 'better'}**")
        out.append(f"Model A (trained at {S}) without scaling: ppl {a_s:.2f} at {S} -> {a_l:.2f} at {L} "
                   f"({_pct(a_l, a_s)}): the longer context {verdict}.")
    a_long = sorted(((s, v) for (m, s, T), v in ppl.items() if m == "A" and T == L), key=lambda x: x[1])
    if len(a_long) > 1 and a_l:
        best, v = a_long[0]
        ranking = " < ".join(f"{s} ({p:.2f})" for s, p in a_long)
        verdict = "no scaling beat none" if best == "none" else f"**{best}** helped most, {_pct(v, a_l)} against none"
        out.append(f"Model A at {L}, ranked by ppl: {ranking}; {verdict}.")
        for s, p in a_long:
            short = ppl.get(("A", s, S))
            if s != "none" and short and a_s:
                out.append(f"{s} at the trained length {S}: ppl {short:.2f} vs {a_s:.2f} unscaled "
                           f"({_pct(short, a_s)}).")
    b_s, b_l = ppl.get(("B", "none", S)), ppl.get(("B", "none", L))
    if b_s and b_l:
        out.append(f"Model B (trained at {L}): ppl {b_s:.2f} at {S} -> {b_l:.2f} at {L} ({_pct(b_l, b_s)}).")
    if b_l and a_long:
        best, v = a_long[0]
        out.append(f"At {L}, model B ({b_l:.2f}) is {_pct(b_l, v)} against model A's best ({best}, {v:.2f}).")
    if b_s and a_s:
        out.append(f"At {S}, model B ({b_s:.2f}) is {_pct(b_s, a_s)} against model A unscaled ({a_s:.2f}).")
    return out


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = start_device(args.device, args.threads)
    args.device = device
    if args.dtype is None:
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    if args.full and device.type != "cuda":
        say(TAG, "warning: --full on a CPU trains a homework-sized model for hours")
    tok, train_src, val_src = data_sources(args)
    args.out.mkdir(parents=True, exist_ok=True)
    S, L = args.seq_lens[0], args.seq_lens[-1]
    margs = quality_model_args(args, L, tok.vocab_size)
    config = dict(config_dict(args), device=str(device), vocab_size=tok.vocab_size, tokenizer=tok.model_path,
                  train_source=str(train_src), val_source=str(val_src), rope_factor=L / S,
                  model=dict(preset=args.preset, dim=margs.dim, n_layers=margs.n_layers, n_heads=margs.n_heads,
                             n_kv_heads=margs.n_kv_heads, hidden_dim=margs.hidden_dim, n_params=count_params(margs)))
    report = Report(args.out, f"Context-length study: cost and quality of {S} vs {L} tokens", device, config)
    start = time.perf_counter()
    cost = run_cost(args, device, tok.vocab_size) if "cost" in args.parts else []
    quality, training, unigram = run_quality(args, device, tok, train_src, val_src, args.out) \
        if "quality" in args.parts else ([], [], None)

    report.add(f"Model: preset `{args.preset}` with vocab {tok.vocab_size} (the tokenizer's): dim {margs.dim}, "
               f"{margs.n_layers} layers, {margs.n_heads} heads ({margs.n_kv_heads} kv), SwiGLU hidden "
               f"{margs.hidden_dim}, {count_params(margs):,} parameters. Lengths: {args.seq_lens}.")
    findings: list[str] = []
    if cost:
        how = ("measured by an OOM search on the GPU" if device.type == "cuda" else
               f"an ESTIMATE on {device.type} (torch.profiler's allocations of one step at batch 2 and 4, fitted as "
               f"C + D x batch, under {args.memory_budget_gib:g} GiB), not an OOM search")
        peak = "torch.cuda.max_memory_allocated" if device.type == "cuda" else \
            f"not measured on {device.type} (see peak_mem_note)"
        report.add(f"## Cost of a training step\n\nB = {args.batch_size}, {args.dtype}, fused kernels off, timed by "
                   f"bench/train_throughput.py. Peak memory: {peak}. Largest batch: "
                   f"{how if args.max_batch else 'not searched (--no-max-batch)'}.\n\n{cost_table(cost)}")
        report.figure("cost.png", "tokens/s and largest batch per configuration",
                      lambda p: plot_cost(p, cost, args.seq_lens))
        findings += cost_findings(cost, args.seq_lens, device)
    if quality:
        report.add(f"## Quality: trained at {S} and at {L}, evaluated at {args.seq_lens}\n\nSame seed, same first "
                   f"{args.train_docs} documents (impute), {args.tokens_per_step} tokens per step, lr {args.lr:g} "
                   f"cosine; RoPE factor F = {L}/{S} = {L / S:g}.\n\n{training_table(training)}\n\n"
                   f"{quality_table(quality)}\n\n"
                   f"Reference without context: the unigram distribution of the {unigram['train_tokens']:,} training "
                   f"tokens (add-one) scores ppl {unigram['ppl']:.2f} (loss {unigram['loss']:.4f}) on the first "
                   f"{unigram['tokens']:,} validation tokens.")
        report.figure("perplexity.png", "validation perplexity per model and RoPE scaling at each length",
                      lambda p: plot_ppl(p, quality, args.seq_lens, unigram))
        findings += quality_findings(quality, training, args.seq_lens, unigram)
    report.add("## What the numbers say\n\n" + "\n".join(f"- {f}" for f in findings))
    rows = cost + quality
    elapsed = round(time.perf_counter() - start, 1)
    report.write(rows, FIELDS, extra={"training": training, "unigram": unigram, "elapsed_s": elapsed,
                                      "findings": findings, "rope_factor": L / S, "seq_lens": args.seq_lens})
    if cost:
        print(cost_table(cost) + "\n")
    if quality:
        print(training_table(training) + "\n\n" + quality_table(quality) + "\n")
    print("\n".join(f"- {f}" for f in findings))
    print(f"wrote {args.out / 'report.md'} ({time.perf_counter() - start:.0f} s)")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
