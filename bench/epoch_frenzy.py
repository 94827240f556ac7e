"""Epoch frenzy: the same training compute spent on few documents many times or on many documents
once (the homework's 25 documents x 100 epochs, 250 x 10 and 2500 x 1), with training and
validation loss curves.

    python bench/epoch_frenzy.py            # CPU default: 4x100, 40x10, 400x1, documents capped at
                                            #   768 tokens, dim 64 / 2 layers, ~3-4 min on 2 cores
    python bench/epoch_frenzy.py --quick    # 2x4, 4x2, 8x1 on a tiny model, a few seconds (for tests)
    python bench/epoch_frenzy.py --full --data pile/train/00.jsonl.zst --val-data pile/val.jsonl.zst \
        --tokenizer tokenizer.model         # GPU: 25x100, 250x10, 2500x1, the homework model (dim 512,
                                            #   8 layers, 8 heads), T=256, batch 32, whole documents
    python bench/epoch_frenzy.py --full --runs 10x100,100x10,1000x1   # --full on the default data

A run ``DxE`` trains on the first D documents of the training source in file order (so the 25
are among the 250, which are among the 2500), each cut to its first ``--doc-tokens`` K tokens
(0: whole). Its unique tokens U_D are the tokens of those documents. The run reads them epoch
after epoch, in the same order every epoch (``--shuffle``: a new order per epoch from a fixed
seed), as one stream that the ``impute`` policy cuts into full windows of ``--seq-len`` T, so a
window may span an epoch boundary and no token is padded or dropped. A step is one batch of
``--batch-size`` B windows: exactly B * T counted tokens.

Equal compute: every run makes the same number of AdamW steps, steps = budget // (B * T), with
budget = ``--token-budget`` or, by default, U_D * E of the run with the most documents (for
2500x1: one epoch of its 2500 documents). All runs therefore see exactly steps * B * T tokens
(checked, and stated in the report); the epochs a run makes are tokens seen / U_D, which differs
from its nominal E because documents differ in length. Same seed, same learning-rate schedule
(warmup, then cosine over the known step count: ``FitConfig(decay="cosine")``).

Why cap documents on CPU: the default data's 1040 training documents are long (median ~1400
tokens, the first 400 hold ~1.1M), far beyond what 2 cores train in minutes. Capping at 768
tokens keeps the 10x/100x ratios of documents and of epochs (4x100, 40x10, 400x1; ~227k tokens
per run, ~440 steps of 512 tokens) while a 4-document run still has ~2.4k unique tokens to
memorise, which it does within a few dozen epochs: the overfitting the homework looks for.

Measured: training loss per step (plotted raw, faintly, and as a trailing mean of ``--smooth``
steps) and validation loss (fixed ``impute`` batches of the validation source's first
``--val-tokens`` tokens) at ``--evals`` equal step intervals, against tokens seen, epoch
boundaries ticked. Table: documents, unique tokens, epochs, steps, tokens seen, final train loss
(mean of the last 10% of steps), final val loss, gap = val - train, best val loss and where.
A run *overfits* when its val loss ends more than 0.01 above its best while the training loss
(mean over the steps between evaluations) is lower at the end than at that best point.

CPU runs default to ``--threads 1`` (``--full`` keeps torch's default): these models are too
small to gain from a second thread, and on a shared 2-core machine a second thread waiting for a
busy core made the same run 7x slower (80 s instead of 12 s).

Outputs in ``--out`` (default ``bench/results/epoch_frenzy/``): ``report.md``, ``results.json``
(rows with per-step losses, evaluations and epoch boundaries), ``results.csv``, ``curves.png``.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from common import HelpFormatter, format_table, pyplot, release, results_dir, start_device
from experiment import (FitConfig, Report, build_model, data_arguments, data_sources, device_arguments, eval_batches,
                        field_value, fit, markdown_table, read_documents, say)

from llama_mini.data import build_policy
from llama_mini import PRESETS, ModelArgs

TAG = "epoch_frenzy"
OVERFIT_TOL = 0.01  # nats: a val rise smaller than this is noise at these eval sizes
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": dict(runs="4x100,40x10,400x1", doc_tokens=768, seq_len=128, batch_size=4, preset="debug",
                set=["dim=64", "n_layers=2", "n_heads=4"], lr=3e-3, evals=16, val_tokens=8192, threads=1),
    "quick": dict(runs="2x4,4x2,8x1", doc_tokens=32, seq_len=16, batch_size=2, preset="debug",
                  set=["dim=16", "n_layers=1", "n_heads=2"], lr=3e-3, evals=4, val_tokens=128, threads=1),
    "full": dict(runs="25x100,250x10,2500x1", doc_tokens=0, seq_len=256, batch_size=32, preset="homework",
                 set=[], lr=1e-3, evals=16, val_tokens=65536),
}
FIELDS = ["run", "documents", "nominal_epochs", "unique_tokens", "epochs", "steps", "tokens_seen",
          "final_train_loss", "final_val_loss", "gap", "best_val_loss", "best_val_tokens", "best_val_epoch",
          "overfits", "seconds"]


# ---- command line -----------------------------------------------------------------------------

def parse_runs(text: str) -> list[tuple[int, int]]:
    """``"25x100,250x10"`` -> ``[(25, 100), (250, 10)]``; ValueError on anything else."""
    runs = []
    for item in text.split(","):
        d, x, e = item.strip().partition("x")
        if not x or not d.isdigit() or not e.isdigit() or int(d) < 1 or int(e) < 1:
            raise ValueError(f"{item.strip()!r} is not DOCUMENTSxEPOCHS with both >= 1")
        runs.append((int(d), int(e)))
    if len(set(runs)) != len(runs):
        raise ValueError(f"{text!r} repeats a run")
    return runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    r = p.add_argument_group("runs")
    r.add_argument("--runs", default=None, help="DOCSxEPOCHS list [4x100,40x10,400x1; --full 25x100,250x10,2500x1]")
    r.add_argument("--doc-tokens", type=int, default=None, help="cap each document at its first K tokens, 0 = "
                   "whole [768; quick 32; full 0]")
    r.add_argument("--token-budget", type=int, default=None,
                   help="training tokens per run [unique tokens x epochs of the run with the most documents]")
    r.add_argument("--shuffle", action="store_true", help="reshuffle the documents every epoch (fixed seed)")
    r.add_argument("--full", action="store_true", help="the homework's runs and model (meant for a GPU)")
    r.add_argument("--quick", action="store_true", help="tiny runs, a few seconds (for tests)")
    m = p.add_argument_group("model and training")
    m.add_argument("--preset", default=None, choices=sorted(PRESETS), help="ModelArgs preset [debug; full homework]")
    m.add_argument("--set", nargs="*", metavar="FIELD=VALUE", default=None,
                   help="ModelArgs overrides [dim=64 n_layers=2 n_heads=4; quick dim=16 n_layers=1 n_heads=2]")
    m.add_argument("--seq-len", type=int, default=None, help="window length T = max_seq_len [128; quick 16; full 256]")
    m.add_argument("--batch-size", type=int, default=None, help="windows per step B [4; quick 2; full 32]")
    m.add_argument("--lr", type=float, default=None, help="peak learning rate [3e-3; full 1e-3]")
    m.add_argument("--seed", type=int, default=0, help="weight-init (and --shuffle) seed, the same for every run")
    m.add_argument("--evals", type=int, default=None, help="validation points per run, plus step 0 [16; quick 4]")
    m.add_argument("--val-tokens", type=int, default=None, help="validation tokens [8192; quick 128; full 65536]")
    m.add_argument("--smooth", type=int, default=0, help="training-loss window in steps (0: steps // 40)")
    d = p.add_argument_group("data (default: the built-in default data)")
    data_arguments(d)
    o = p.add_argument_group("device and output")
    device_arguments(o)
    o.add_argument("--out", type=Path, default=results_dir(TAG), help="output directory [bench/results/epoch_frenzy/]")
    return p


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill unset options from the mode's profile and check them (errors name the option)."""
    if args.full and args.quick:
        parser.error("--full and --quick exclude each other")
    for key, value in PROFILES["full" if args.full else "quick" if args.quick else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.run_list = parse_runs(args.runs)
    except ValueError as e:
        parser.error(f"--runs: {e}")
    for name in ("seq_len", "batch_size", "evals", "val_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.doc_tokens < 0 or args.smooth < 0 or (args.token_budget is not None and args.token_budget < 1):
        parser.error("--doc-tokens and --smooth must be >= 0 and --token-budget >= 1")
    if args.data and not args.val_data:
        parser.error("--val-data is required with --data (validate on the same kind of text)")
    args.overrides = {}
    for item in args.set:
        name, eq, value = item.partition("=")
        try:
            if not eq:
                raise ValueError(f"{item!r} is not FIELD=VALUE")
            args.overrides[name.strip()] = field_value(name.strip(), value.strip())
        except ValueError as e:
            parser.error(f"--set: {e}")
    if "max_seq_len" in args.overrides:
        parser.error("--set max_seq_len: the window length is --seq-len")


# ---- data and one run -----------------------------------------------------------------------------

def epoch_stream(docs: Sequence[dict], shuffle: bool, seed: int) -> Iterator[dict]:
    """``docs`` epoch after epoch, forever: the same order each epoch, or a fresh seeded shuffle."""
    epoch = 0
    while True:
        order = list(range(len(docs)))
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for i in order:
            yield docs[i]
        epoch += 1


def window_mean(xs: Sequence[float], w: int) -> list[float]:
    """Trailing mean over the last ``w`` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - w] if i >= w else 0.0)
        out.append(acc / min(i + 1, w))
    return out


def analyse(row: dict[str, Any], res: Any) -> None:
    """Best val point, train loss between evaluations and the overfitting verdict, into ``row``."""
    ev, steps = res.evals, res.steps
    j = min(range(len(ev)), key=lambda k: ev[k]["val_loss"])
    between = []  # mean training loss over the steps since the previous evaluation
    for k in range(1, len(ev)):
        seg = [s["loss"] for s in steps[ev[k - 1]["step"]:ev[k]["step"]]]
        between.append(sum(seg) / len(seg) if seg else None)
    row.update(best_val_loss=ev[j]["val_loss"], best_val_tokens=ev[j]["tokens_seen"],
               best_val_epoch=ev[j]["tokens_seen"] / row["unique_tokens"],
               train_at_best=between[j - 1] if j > 0 else None, train_at_end=between[-1] if between else None)
    rise = ev[-1]["val_loss"] - ev[j]["val_loss"]
    row["overfits"] = bool(rise > OVERFIT_TOL and row["train_at_best"] is not None
                           and row["train_at_end"] < row["train_at_best"])


def run_one(d: int, e: int, docs: list[dict], args: argparse.Namespace, margs: ModelArgs, steps: int,
            val: list[dict], pad_id: int, device: torch.device) -> dict[str, Any]:
    mine = docs[:d]
    unique = sum(len(x["input_ids"]) for x in mine)
    row: dict[str, Any] = {"run": f"{d}x{e}", "documents": d, "nominal_epochs": e, "unique_tokens": unique,
                           "steps": steps}
    policy = build_policy("impute", max_len=args.seq_len, pad_id=pad_id, ignore_index=margs.ignore_index)
    batches = policy.batches(epoch_stream(mine, args.shuffle, args.seed), args.batch_size)
    model = build_model(margs, args.seed, device)
    row["params"] = model.num_params()
    cfg = FitConfig(lr=args.lr, warmup_steps=max(1, steps // 20), decay="cosine", seed=args.seed)
    res = fit(model, batches, cfg, max_steps=steps, total_steps=steps, val_batches=val,
              eval_every_steps=max(1, steps // args.evals), device=device, tag=f"{TAG} {d}x{e}")
    del model
    release(device)
    seen = res.tokens_seen
    row.update(tokens_seen=seen, epochs=seen / unique, seconds=round(res.seconds, 2),
               final_train_loss=res.final_train_loss(),
               final_val_loss=res.evals[-1]["val_loss"],
               epoch_boundaries=[k * unique for k in range(1, seen // unique + 1) if k * unique < seen],
               evals=res.evals, train_steps={k: [s[k] for s in res.steps] for k in ("step", "loss", "tokens",
                                                                                    "tokens_seen")})
    row["gap"] = row["final_val_loss"] - row["final_train_loss"]
    analyse(row, res)
    return row


# ---- report ---------------------------------------------------------------------------------------------

def draw(path: Path, rows: list[dict], smooth: int) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(13, 4.8))
    cmap, tops = plt.get_cmap("tab10"), []
    for k, r in enumerate(rows):
        c, st = cmap(k % 10), r["train_steps"]
        smoothed = window_mean(st["loss"], smooth)
        ax_t.plot(st["tokens_seen"], st["loss"], color=c, alpha=0.15, linewidth=0.6)
        ax_t.plot(st["tokens_seen"], smoothed, color=c, linewidth=1.6, label=f"{r['run']} ({r['epochs']:.1f} epochs)")
        tops.append(max(smoothed[len(smoothed) // 10:] or smoothed))
        # epoch boundaries: short ticks along the bottom, one band per run
        ax_t.vlines(r["epoch_boundaries"], 0.03 * k, 0.03 * (k + 1), transform=ax_t.get_xaxis_transform(),
                    colors=[c], linewidth=0.7)
        ev = r["evals"]
        ax_v.plot([x["tokens_seen"] for x in ev], [x["val_loss"] for x in ev], color=c, marker="o", markersize=3,
                  linewidth=1.6, label=r["run"])
        ax_v.plot([r["best_val_tokens"]], [r["best_val_loss"]], color=c, marker="*", markersize=12)
    low = min(min(r["train_steps"]["loss"]) for r in rows)
    ax_t.set_ylim(low - 0.1, max(tops) + 0.3)  # the first steps (~ln V) would squash the rest
    ax_t.set_title(f"training loss (faint: per step; solid: mean of {smooth} steps; ticks: epoch ends)", fontsize=10)
    ax_v.set_title("validation loss (star: best)", fontsize=10)
    for ax in (ax_t, ax_v):
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8, loc="upper right")  # the epoch ticks run along the bottom
    ax_v.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def conclusions(rows: list[dict], budget: int) -> str:
    ranked = sorted(rows, key=lambda r: r["final_val_loss"])
    lines = ["## What the numbers say", ""]
    seen = {r["tokens_seen"] for r in rows}
    lines.append(f"- Equal compute: every run saw exactly {budget:,} training tokens." if seen == {budget} else
                 f"- NOT equal compute: tokens seen differ ({sorted(seen)}).")
    lines.append("- Ranked by final val loss: " + " < ".join(f"{r['run']} ({r['final_val_loss']:.3f})" for r in ranked)
                 + ".")
    by_docs = [r["final_val_loss"] for r in sorted(rows, key=lambda r: -r["documents"])]
    if len(rows) > 1:
        if all(a < b for a, b in zip(by_docs, by_docs[1:])):
            lines.append("- Val loss rises steadily as the same compute is spent on fewer documents, more epochs: "
                         f"{ranked[0]['run']} is {ranked[-1]['final_val_loss'] - ranked[0]['final_val_loss']:.3f} "
                         f"nats better than {ranked[-1]['run']}.")
        else:
            lines.append("- The order is not monotone in the number of documents.")
    for r in rows:
        if r["overfits"]:
            lines.append(f"- {r['run']} overfits: its val loss was lowest, {r['best_val_loss']:.3f}, at "
                         f"{r['best_val_tokens']:,} tokens (epoch {r['best_val_epoch']:.1f}), then rose to "
                         f"{r['final_val_loss']:.3f} (+{r['final_val_loss'] - r['best_val_loss']:.3f}) while the "
                         f"training loss fell from {r['train_at_best']:.3f} to {r['train_at_end']:.3f}.")
        elif r["final_val_loss"] - r["best_val_loss"] <= OVERFIT_TOL:
            lines.append(f"- {r['run']}: no overfitting in the curves; val loss ends within {OVERFIT_TOL} of its "
                         f"best ({r['best_val_loss']:.3f}).")
        else:
            lines.append(f"- {r['run']}: val loss ends {r['final_val_loss'] - r['best_val_loss']:.3f} above its best "
                         "but the training loss did not fall meanwhile, so this is not overfitting by our test.")
    widest = max(rows, key=lambda r: r["gap"])
    lines.append(f"- Largest generalisation gap (val - train): {widest['run']}, {widest['gap']:.3f} nats.")
    return "\n".join(lines)


def write_report(args: argparse.Namespace, device: torch.device, rows: list[dict], margs: ModelArgs, params: int,
                 budget: int, source: str) -> Path:
    config = {k: v for k, v in vars(args).items() if k not in ("run_list",)}
    config["out"] = str(args.out)
    rep = Report(args.out, "Epoch frenzy: equal compute, different repetition", device, config)
    cap = f"cut to their first {args.doc_tokens} tokens" if args.doc_tokens else "whole"
    rep.add(f"Runs {args.runs} (documents x nominal epochs) on the first documents of `{source}` in order, "
            f"documents {cap}, read epoch after epoch in {'a reshuffled' if args.shuffle else 'the same'} order "
            f"and cut by `impute` into windows of {args.seq_len}; batch {args.batch_size}, so "
            f"{args.seq_len * args.batch_size} tokens per step. Every run: {rows[0]['steps']} AdamW steps = "
            f"{budget:,} tokens (the budget), lr {args.lr:g}, warmup then cosine decay, seed {args.seed}. Model: "
            f"`{args.preset}` preset with dim {margs.dim}, n_layers {margs.n_layers}, n_heads {margs.n_heads}, "
            f"vocab {margs.vocab_size} ({params:,} parameters). Validation: the first {args.val_tokens:,} tokens of the "
            f"validation source, {args.evals} times plus at step 0.")
    header = ["run", "docs", "unique tok", "epochs", "steps", "tokens seen", "train", "val", "gap", "best val",
              "best at tokens (epoch)"]
    body = [[r["run"], f"{r['documents']}", f"{r['unique_tokens']:,}", f"{r['epochs']:.2f}", f"{r['steps']}",
             f"{r['tokens_seen']:,}", f"{r['final_train_loss']:.3f}", f"{r['final_val_loss']:.3f}", f"{r['gap']:.3f}",
             f"{r['best_val_loss']:.3f}", f"{r['best_val_tokens']:,} ({r['best_val_epoch']:.1f})"] for r in rows]
    rep.add("## Results\n\n" + markdown_table(header, body))
    rep.figure("curves.png", "Training loss (left) and validation loss (right) against tokens seen",
               lambda p: draw(p, rows, args.smooth or max(1, rows[0]["steps"] // 40)))
    rep.add(conclusions(rows, budget))
    path = rep.write(rows, FIELDS, extra={"token_budget": budget, "equal_tokens": len({r["tokens_seen"] for r in rows})
                                          == 1, "params": params})
    print(format_table(header, body, n_left=1))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve(parser, args)
    device = start_device(args.device, args.threads)
    tokenizer, train_src, val_src = data_sources(args)
    most = max(d for d, _ in args.run_list)
    docs = read_documents(train_src, tokenizer, 0, limit=most)
    for d, e in args.run_list:
        if d > len(docs):
            parser.error(f"--runs: run {d}x{e} asks for the first {d} documents, but {train_src} holds only "
                         f"{len(docs)}")
    if args.doc_tokens:
        docs = [{"input_ids": x["input_ids"][:args.doc_tokens], "target_ids": x["target_ids"][:args.doc_tokens]}
                for x in docs]
    d0, e0 = max(args.run_list)
    per_step = args.seq_len * args.batch_size
    steps = (args.token_budget or sum(len(x["input_ids"]) for x in docs[:d0]) * e0) // per_step
    if steps < 1:
        parser.error(f"--token-budget: the budget holds not one step of {per_step} tokens")
    budget = steps * per_step
    margs = ModelArgs.preset(args.preset, **{"vocab_size": tokenizer.vocab_size, "n_kv_heads": None,
                                             **args.overrides, "max_seq_len": args.seq_len})
    val_docs = read_documents(val_src, tokenizer, args.val_tokens + 1)
    try:
        val = eval_batches(val_docs, args.seq_len, args.batch_size, max(1, args.val_tokens // per_step),
                           pad_id=tokenizer.pad_id, ignore_index=margs.ignore_index, where=val_src)
    except ValueError as e:
        parser.error(f"--val-data: {e}")
    say(TAG, f"{len(args.run_list)} runs, {steps} steps x {per_step} tokens = {budget:,} tokens each, device {device}")
    rows = []
    for d, e in args.run_list:
        rows.append(run_one(d, e, docs, args, margs, steps, val, tokenizer.pad_id, device))
        r = rows[-1]
        say(TAG, f"{r['run']}: {r['epochs']:.2f} epochs, train {r['final_train_loss']:.3f}, val "
                 f"{r['final_val_loss']:.3f} ({r['seconds']:.1f}s)")
    if len({r["tokens_seen"] for r in rows}) != 1:  # fit stops by steps on an endless stream: cannot happen
        raise RuntimeError(f"runs saw different token counts: {[r['tokens_seen'] for r in rows]}")
    path = write_report(args, device, rows, margs, rows[0]["params"], budget, train_src)
    say(TAG, f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
