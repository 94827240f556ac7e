"""Hyperparameter sweep: train every configuration of a grid of ``ModelArgs`` fields on the same
data for the same compute, then compare learning curves and final validation loss.

    python bench/sweep.py                   # CPU default: dim {32,64} x n_layers {1,2} x n_heads {2,4}
                                            #   x max_seq_len {32,128} = 16 runs, ~3-5 min on 2 cores
    python bench/sweep.py --quick           # 4 tiny runs, a few seconds (the test runs this)
    python bench/sweep.py --full            # the homework grid on a GPU: dim {128,512} x n_layers {2,8}
                                            #   x n_heads {2,4,8} x max_seq_len {32,128,512} = 36 runs
    python bench/sweep.py --grid dim=64,128 n_layers=1,2 n_heads=2,4 max_seq_len=32,128 --steps 500

A grid is ``FIELD=V1,V2,...`` per ``ModelArgs`` field; values are parsed to the field's type.
Fields not in the grid come from ``--preset`` (debug on CPU, homework under ``--full``), with
``vocab_size`` = the tokenizer's and ``n_kv_heads`` = ``n_heads`` (plain multi-head attention)
unless the grid sets them. A configuration that ``ModelArgs`` rejects (``dim`` not divisible by
``n_heads``, an odd head dimension) or whose batch would be empty is a *skipped* row with the
reason; nothing is dropped silently.

Fair comparison. Every run trains on the same stream: the first N documents of the training
source in file order (N = ``--documents``, or just enough to hold ``steps * batch_tokens``
tokens), cut by the ``impute`` policy into full windows of the run's own ``max_seq_len`` T. A
step is one batch of B = ``batch_tokens // T`` windows, so every run sees B * T =
``batch_tokens`` tokens per step (when T divides it) for ``--steps`` AdamW steps, with the same
seed and the same schedule (linear warmup, then cosine decay to 10% of the peak over the known
step count: ``FitConfig(decay="cosine")``).

Validation: fixed batches of the validation source (``impute`` windows of the run's T, the
first ``--val-tokens`` tokens), evaluated ``--evals`` times at equal step intervals and after
the last step. A run is evaluated at the context it was trained for; the loss is the mean
cross-entropy per target token, so longer windows score lower partly because their later
tokens have more context, not only because the model is better.

Figures per run: parameters (``model.num_params()``), final train loss (token-weighted mean of
the last 10% of steps), final val loss and perplexity exp(val loss), best val loss, wall
seconds, tokens seen. A run *diverged* when its loss became non-finite (``fit`` stops it) or its
final val loss is above its val loss at initialisation.

Sizes. CPU default: the ``debug`` preset's other fields (multiple_of 32), 300 steps of 512
tokens (154k tokens per run), lr 3e-3, 8 evaluations on 8192 validation tokens. ``--full``: the
``homework`` preset's (multiple_of 256), 360 steps of 8192 tokens (2.95M tokens: nearly all of the
default data's 3.2M-token train split; give ``--data`` for more), lr 1e-3, fp32, 65536 validation
tokens. The effect of a hyperparameter is the spread of its per-value mean final val loss,
set against the pooled standard deviation among runs that share a value.

CPU runs default to ``--threads 1`` (``--full`` keeps torch's default): these models are too
small to gain from a second thread, and on a shared 2-core machine a second thread waiting for a
busy core made the same run 7x slower (80 s instead of 12 s).

Outputs in ``--out`` (default ``bench/results/sweep/``): ``report.md`` (tables sorted best first,
the marginal table: mean and min final val loss per value of each hyperparameter, the figures and
"What the numbers say"), ``results.json`` (one row per configuration, skipped ones included, with
its per-step training losses and its evaluations so curves can be re-plotted), ``results.csv``
(the scalar columns) and ``curves_<field>.png``: validation loss against tokens seen, thin lines
per run and a thick mean curve per value of that field.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from common import HelpFormatter, fmt, format_table, pyplot, release, results_dir, start_device
from experiment import (FitConfig, Report, batches_of, build_model, data_arguments, data_sources, device_arguments,
                        eval_batches, field_value, fit, markdown_table, read_documents, say)

from llama_mini import PRESETS, ModelArgs

TAG = "sweep"
HOMEWORK_GRID = ["dim=128,512", "n_layers=2,8", "n_heads=2,4,8", "max_seq_len=32,128,512"]
# Defaults per mode; an option given on the command line wins over all of them.
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": dict(grid=["dim=32,64", "n_layers=1,2", "n_heads=2,4", "max_seq_len=32,128"], preset="debug",
                steps=300, batch_tokens=512, lr=3e-3, evals=8, val_tokens=8192, threads=1),
    "quick": dict(grid=["dim=16,32", "n_layers=1", "n_heads=2", "max_seq_len=16,32"], preset="debug",
                  steps=8, batch_tokens=64, lr=3e-3, evals=4, val_tokens=256, threads=1),
    "full": dict(grid=HOMEWORK_GRID, preset="homework", steps=360, batch_tokens=8192, lr=1e-3, evals=8,
                 val_tokens=65536),
}
FIELDS = ["run", "label", "status", "reason", "params", "batch_size", "tokens_per_step", "steps", "tokens_seen",
          "val_tokens", "init_val_loss", "final_train_loss", "final_val_loss", "val_ppl", "best_val_loss",
          "diverged", "seconds"]


# ---- command line -----------------------------------------------------------------------------

def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["dim=32,64", ...]`` -> ``{"dim": [32, 64], ...}`` in the order given."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        name, eq, values = item.partition("=")
        name = name.strip()
        if not eq or not values.strip():
            raise ValueError(f"{item!r} is not FIELD=V1,V2,...")
        if name in grid:
            raise ValueError(f"{name} is given twice")
        parsed = [field_value(name, v.strip()) for v in values.split(",")]
        if len(set(map(repr, parsed))) != len(parsed):
            raise ValueError(f"{name} repeats a value: {values}")
        grid[name] = parsed
    return grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("grid and model")
    g.add_argument("--grid", nargs="+", metavar="FIELD=V1,V2", default=None,
                   help="ModelArgs fields and their values [CPU: dim=32,64 n_layers=1,2 n_heads=2,4 "
                        "max_seq_len=32,128; --full: the homework grid]")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="ModelArgs preset for the fields the grid leaves alone [debug; --full: homework]")
    g.add_argument("--full", action="store_true", help="the homework grid and sizes (meant for a GPU)")
    g.add_argument("--quick", action="store_true", help="4 tiny runs, a few seconds (for tests)")
    t = p.add_argument_group("training (the same for every run)")
    t.add_argument("--steps", type=int, default=None, help="AdamW steps per run [300; quick 8; full 360]")
    t.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per step; batch size = batch_tokens // max_seq_len [512; quick 64; full 8192]")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate [3e-3; full 1e-3]")
    t.add_argument("--warmup", type=int, default=None, help="warmup steps [10%% of --steps]")
    t.add_argument("--seed", type=int, default=0, help="weight-init seed, the same for every run")
    t.add_argument("--documents", type=int, default=0,
                   help="train on the first N documents (0: just enough for steps * batch_tokens)")
    t.add_argument("--evals", type=int, default=None, help="validation points per run, plus step 0 [8; quick 4]")
    t.add_argument("--val-tokens", type=int, default=None,
                   help="validation tokens per evaluation [8192; quick 256; full 65536]")
    d = p.add_argument_group("data (default: the built-in default data)")
    data_arguments(d)
    o = p.add_argument_group("device and output")
    device_arguments(o)
    o.add_argument("--out", type=Path, default=results_dir(TAG), help="output directory [bench/results/sweep/]")
    return p


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill unset options from the mode's profile and check them (errors name the option)."""
    if args.full and args.quick:
        parser.error("--full and --quick exclude each other")
    profile = PROFILES["full" if args.full else "quick" if args.quick else "cpu"]
    for key, value in profile.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup is None:
        args.warmup = max(1, args.steps // 10)
    for name in ("steps", "batch_tokens", "evals", "val_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.documents < 0 or args.warmup < 0 or not args.lr > 0:
        parser.error("--documents and --warmup must be >= 0 and --lr > 0")
    if args.data and not args.val_data:
        parser.error("--val-data is required with --data (validate on the same kind of text)")
    try:
        args.grid_values = parse_grid(args.grid)
    except ValueError as e:
        parser.error(f"--grid: {e}")


# ---- data ---------------------------------------------------------------------------------------

# ---- one run --------------------------------------------------------------------------------------

def label_of(combo: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in combo.items())


def run_config(i: int, combo: dict[str, Any], args: argparse.Namespace, vocab: int, pad_id: int,
               train: list[dict], val: list[dict], device: torch.device) -> dict[str, Any]:
    """Train one configuration; returns its row (status ok, skipped, diverged or oom)."""
    row: dict[str, Any] = {"run": i, "label": label_of(combo), **combo, "status": "skipped", "reason": None,
                           "steps": args.steps}
    overrides = {"vocab_size": vocab, "n_kv_heads": None, **combo}
    try:
        margs = ModelArgs.preset(args.preset, **overrides)
    except (ValueError, TypeError) as e:
        row["reason"] = str(e)
        return row
    if margs.vocab_size < vocab:
        row["reason"] = f"vocab_size {margs.vocab_size} < the tokenizer's {vocab}"
        return row
    T = margs.max_seq_len
    B = args.batch_tokens // T
    if B < 1:
        row["reason"] = f"batch_tokens {args.batch_tokens} < max_seq_len {T}: batch size would be 0"
        return row
    batches = batches_of(train, "impute", T, B, pad_id=pad_id, ignore_index=margs.ignore_index)[0][:args.steps]
    if len(batches) < args.steps or batches[-1]["input_ids"].shape[0] != B:  # read_documents sized it: a bug
        raise RuntimeError(f"{row['label']}: the training stream holds fewer than {args.steps} batches of {B}x{T}")
    try:
        vb = eval_batches(val, T, B, max(1, args.val_tokens // (B * T)), pad_id=pad_id,
                          ignore_index=margs.ignore_index, where="the validation source")
    except ValueError as e:
        row["reason"] = str(e)
        return row
    model = build_model(margs, args.seed, device)
    row.update(params=model.num_params(), batch_size=B, tokens_per_step=B * T,
               val_tokens=sum(b["input_ids"].numel() for b in vb))
    cfg = FitConfig(lr=args.lr, warmup_steps=args.warmup, decay="cosine", seed=args.seed)
    try:
        res = fit(model, batches, cfg, max_steps=args.steps, total_steps=args.steps, val_batches=vb,
                  eval_every_steps=max(1, args.steps // args.evals), device=device, tag=f"{TAG} {i}")
    except FloatingPointError as e:
        row.update(status="diverged", reason=str(e), diverged=True)
        return row
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="oom", reason=str(e).splitlines()[0])
        return row
    finally:
        del model
        release(device)
    vals = [e["val_loss"] for e in res.evals]
    row.update(status="ok", tokens_seen=res.tokens_seen, init_val_loss=vals[0], final_val_loss=vals[-1],
               val_ppl=math.exp(vals[-1]), best_val_loss=min(vals), final_train_loss=res.final_train_loss(),
               diverged=vals[-1] > vals[0], seconds=round(res.seconds, 2), evals=res.evals,
               train_steps={k: [r[k] for r in res.steps] for k in ("step", "loss", "tokens", "tokens_seen", "lr")})
    if row["diverged"]:
        row["reason"] = "final val loss above its value at initialisation"
    return row


# ---- analysis ---------------------------------------------------------------------------------------

def finished(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "ok"]


def marginals(rows: list[dict], grid: dict[str, list[Any]]) -> list[dict]:
    """Mean and min final val loss (and run count) per value of each hyperparameter."""
    out = []
    for hp, values in grid.items():
        for v in values:
            losses = [r["final_val_loss"] for r in finished(rows) if r[hp] == v]
            out.append({"hyperparameter": hp, "value": v, "runs": len(losses),
                        "mean_val": statistics.fmean(losses) if losses else None,
                        "min_val": min(losses) if losses else None})
    return out


def within_std(rows: list[dict], hp: str) -> float | None:
    """Pooled standard deviation of final val loss among finished runs that share a value of ``hp``:
    how much the other hyperparameters move the loss, the yardstick for this one's spread."""
    groups: dict[str, list[float]] = {}
    for r in finished(rows):
        groups.setdefault(repr(r[hp]), []).append(r["final_val_loss"])
    dof = sum(len(g) - 1 for g in groups.values())
    if dof < 1:
        return None
    return math.sqrt(sum((x - statistics.fmean(g)) ** 2 for g in groups.values() for x in g) / dof)


def effects(marg: list[dict], grid: dict[str, list[Any]], best: dict | None, rows: list[dict] = ()) -> list[str]:
    """One sentence per swept hyperparameter, largest spread of mean val loss first."""
    found = []
    for hp, values in grid.items():
        ms = [m for m in marg if m["hyperparameter"] == hp and m["runs"]]
        if len(values) < 2 or len(ms) < 2:
            continue
        lo, hi = min(ms, key=lambda m: m["mean_val"]), max(ms, key=lambda m: m["mean_val"])
        means = [m["mean_val"] for m in ms]
        trend = ""
        if all(isinstance(m["value"], (int, float)) for m in ms):
            by_value = [m["mean_val"] for m in sorted(ms, key=lambda m: m["value"])]
            if all(a > b for a, b in zip(by_value, by_value[1:])):
                trend = f"; the mean falls as {hp} grows"
            elif all(a < b for a, b in zip(by_value, by_value[1:])):
                trend = f"; the mean rises as {hp} grows"
            else:
                trend = "; the mean is not monotonic in it"
        agree = ""
        if best is not None:
            agree = (f"; the best run also has {hp}={best[hp]}" if best[hp] == lo["value"]
                     else f"; but the best run has {hp}={best[hp]}")
        spread, sd = max(means) - min(means), within_std(list(rows), hp)
        size = "" if sd is None else (
            f"; larger than the spread among runs sharing a value (pooled std {sd:.3f})" if spread > sd else
            f"; smaller than the spread among runs sharing a value (pooled std {sd:.3f}), so a weak effect here")
        found.append((spread,
                      f"**{hp}**: {hp}={lo['value']} gives the lowest mean final val loss ({lo['mean_val']:.3f}, "
                      f"{lo['runs']} runs), {hp}={hi['value']} the highest ({hi['mean_val']:.3f}): a spread of "
                      f"{spread:.3f} nats{trend}{agree}{size}."))
    found.sort(key=lambda x: -x[0])
    return [f"{k + 1}. {s}" for k, (_, s) in enumerate(found)]


def strongest_pair(rows: list[dict], grid: dict[str, list[Any]], marg: list[dict]) -> str | None:
    """The two hyperparameters whose joint cell means spread the most: an interaction that the
    one-at-a-time marginals average away shows up here."""
    found = None
    names = [hp for hp, values in grid.items() if len(values) > 1]
    for a, b in itertools.combinations(names, 2):
        cells: dict[tuple, list[float]] = {}
        for r in finished(rows):
            cells.setdefault((r[a], r[b]), []).append(r["final_val_loss"])
        means = {k: statistics.fmean(v) for k, v in cells.items()}
        spread = max(means.values()) - min(means.values()) if len(means) > 1 else 0.0
        if len(means) > 1 and (found is None or spread > found[0]):
            found = (spread, a, b, means)
    if found is None:
        return None
    spread, a, b, means = found
    cells = "; ".join(f"{a}={k[0]}, {b}={k[1]}: {m:.3f}" for k, m in sorted(means.items(), key=lambda kv: kv[1]))
    single = max(max(ms) - min(ms) for ms in ([m["mean_val"] for m in marg if m["hyperparameter"] == hp and m["runs"]]
                                              for hp in (a, b)))
    note = (f" That is more than twice the larger spread of their marginal means ({single:.3f}): they interact, "
            "and the marginal table understates both." if spread > 2 * single else "")
    return (f"- Strongest pair: **{a} x {b}**, mean final val loss per combination, best first: {cells} "
            f"(spread {spread:.3f} nats).{note}")


def conclusions(rows: list[dict], grid: dict[str, list[Any]], marg: list[dict]) -> str:
    ok = sorted(finished(rows), key=lambda r: r["final_val_loss"])
    lines = ["## What the numbers say", ""]
    if not ok:
        return "\n".join(lines + ["No configuration finished, so there is nothing to compare."])
    best = ok[0]
    lines.append(f"- Best configuration: **{best['label']}**, final val loss {best['final_val_loss']:.3f} "
                 f"(ppl {best['val_ppl']:.1f}), {best['params']:,} parameters.")
    if len(ok) > 1:
        second, worst = ok[1], ok[-1]
        lines.append(f"- It beats the runner-up ({second['label']}) by "
                     f"{second['final_val_loss'] - best['final_val_loss']:.3f} nats and the worst ({worst['label']}) "
                     f"by {worst['final_val_loss'] - best['final_val_loss']:.3f}.")
    lines += ["", "Effect of each hyperparameter, from the marginal table (largest spread first):", ""]
    lines += effects(marg, grid, best, rows) or ["(no hyperparameter has two measured values)"]
    pair = strongest_pair(rows, grid, marg)
    if pair:
        lines += ["", pair]
    if "max_seq_len" in grid and len(grid["max_seq_len"]) > 1:
        lines += ["", "max_seq_len is confounded with evaluation: each run is scored at its own context, and "
                  "the mean loss per token over a longer window is lower partly because its later tokens see "
                  "more context, not only because that model is better."]
    bad = [r for r in rows if r.get("diverged")]
    lines += ["", "- Diverged: " + ("; ".join(f"{r['label']} ({r['reason']})" for r in bad) if bad else
                                    "none (every finished run ended below its val loss at initialisation).")]
    skipped = [r for r in rows if r["status"] in ("skipped", "oom")]
    if skipped:
        lines.append(f"- Not trained: {len(skipped)} of {len(rows)} configurations (see the skipped table); "
                     "the marginal means of the values they involve average over fewer runs.")
    return "\n".join(lines)


# ---- output -------------------------------------------------------------------------------------------

def draw_by_value(path: Path, rows: list[dict], hp: str, values: list[Any]) -> bool:
    """Validation curves of all finished runs, coloured by their value of ``hp``; thick = mean."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    cmap, later = plt.get_cmap("tab10"), []
    for k, v in enumerate(values):
        runs = [r for r in finished(rows) if r[hp] == v]
        if not runs:
            continue
        color = cmap(k % 10)
        for r in runs:
            ax.plot([e["tokens_seen"] for e in r["evals"]], [e["val_loss"] for e in r["evals"]],
                    color=color, alpha=0.3, linewidth=0.8)
            later += [e["val_loss"] for e in r["evals"][1:]]
        n = min(len(r["evals"]) for r in runs)
        xs = [statistics.fmean(r["evals"][j]["tokens_seen"] for r in runs) for j in range(n)]
        ys = [statistics.fmean(r["evals"][j]["val_loss"] for r in runs) for j in range(n)]
        ax.plot(xs, ys, color=color, linewidth=2.4, marker="o", markersize=3, label=f"{hp}={v} (mean of {len(runs)})")
    if later:  # the step-0 loss (about ln V for every run) would squash the interesting part
        span = max(later) - min(later) or 1.0
        ax.set_ylim(min(later) - 0.05 * span, max(later) + 0.05 * span)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"validation loss by {hp}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def result_table(rows: list[dict], grid: dict[str, list[Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["rank", *grid, "params", "B", "train loss", "val loss", "val ppl", "best val", "tokens", "s"]
    body = [[str(k + 1), *(str(r[hp]) for hp in grid), f"{r['params']:,}", str(r["batch_size"]),
             f"{r['final_train_loss']:.3f}", f"{r['final_val_loss']:.3f}", f"{r['val_ppl']:.1f}",
             f"{r['best_val_loss']:.3f}", f"{r['tokens_seen']:,}", f"{r['seconds']:.1f}"]
            for k, r in enumerate(sorted(finished(rows), key=lambda r: r["final_val_loss"]))]
    return header, body


def write_report(args: argparse.Namespace, device: torch.device, rows: list[dict], n_docs: int,
                 train_tokens: int) -> Path:
    grid = args.grid_values
    marg = marginals(rows, grid)
    config = {k: v for k, v in vars(args).items() if k not in ("grid_values",)}
    config["out"] = str(args.out)
    rep = Report(args.out, "Hyperparameter sweep", device, config)
    tps = sorted({r["tokens_per_step"] for r in rows if r.get("tokens_per_step")})
    rep.add(f"{len(rows)} configurations of the grid {label_of(grid)} ({len(finished(rows))} trained), other fields "
            f"from the `{args.preset}` preset with the tokenizer's vocab ({rows[0]['vocab'] if rows else '-'}). "
            f"Every run: {args.steps} AdamW steps of {args.batch_tokens} tokens (batch = {args.batch_tokens} // "
            f"max_seq_len), lr {args.lr:g} with {args.warmup} warmup steps then cosine decay, seed {args.seed}, "
            f"on the same stream: the first {n_docs} training documents ({train_tokens:,} tokens) in order, cut "
            f"by `impute` at the run's max_seq_len. Validation: the first {args.val_tokens:,} tokens of the "
            f"validation source in windows of the run's own max_seq_len (a model is evaluated at the context it "
            f"was trained for; longer windows give lower loss per token partly because later tokens have more "
            f"context), {args.evals} times plus at step 0. Final train loss = mean of the last 10% of steps.")
    if len(tps) > 1:
        rep.add(f"Note: tokens per step differ between runs ({tps}) because --batch-tokens is not a multiple of "
                "every max_seq_len; compare the curves by tokens seen.")
    header, body = result_table(rows, grid)
    rep.add("## Final validation loss, best first\n\n" + markdown_table(header, body))
    skipped = [r for r in rows if r["status"] != "ok" or r.get("diverged")]
    if skipped:
        rep.add("## Not trained or diverged\n\n" + markdown_table(
            ["configuration", "status", "reason"], [[r["label"], r["status"], r["reason"]] for r in skipped],
            right=[False, False, False]))
    rep.add("## Marginal table\n\nFinal val loss over the finished runs with each value.\n\n" + markdown_table(
        ["hyperparameter", "value", "runs", "mean val loss", "min val loss"],
        [[m["hyperparameter"], m["value"], m["runs"], fmt(m["mean_val"], ".3f"), fmt(m["min_val"], ".3f")]
         for m in marg], right=[False, False, True, True, True]))
    if finished(rows):
        for hp, values in grid.items():
            rep.figure(f"curves_{hp}.png", f"Validation loss against tokens seen, coloured by {hp} (thin: runs; "
                       f"thick: mean per value; the step-0 loss is above the plot)",
                       lambda p, hp=hp, values=values: draw_by_value(p, rows, hp, values))
    rep.add(conclusions(rows, grid, marg))
    fields = FIELDS[:3] + list(grid) + FIELDS[3:]
    path = rep.write(rows, fields, extra={"marginals": marg, "train_documents": n_docs, "train_tokens": train_tokens})
    print(format_table(header, body, n_left=0))
    print()
    print(format_table(["hyperparameter", "value", "runs", "mean val", "min val"],
                       [[m["hyperparameter"], str(m["value"]), str(m["runs"]), fmt(m["mean_val"], ".3f"),
                         fmt(m["min_val"], ".3f")] for m in marg], n_left=2))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve(parser, args)
    device = start_device(args.device, args.threads)
    if args.full and device.type == "cpu":
        say(TAG, "warning: --full on a CPU will take hours; it is meant for a GPU")
    tokenizer, train_src, val_src = data_sources(args)
    need = args.steps * args.batch_tokens
    train = read_documents(train_src, tokenizer, need, args.documents)
    train_tokens = sum(len(e["input_ids"]) for e in train)
    if args.documents and len(train) < args.documents:
        parser.error(f"--documents {args.documents}: {train_src} holds only {len(train)} documents")
    if train_tokens < need:
        parser.error(f"--steps x --batch-tokens = {need:,} tokens, but the training documents ({len(train)} of "
                     f"{train_src}) hold only {train_tokens:,}; lower them or give more --documents / --data")
    val = read_documents(val_src, tokenizer, max(args.val_tokens, args.batch_tokens) + 1)
    combos = [dict(zip(args.grid_values, vs)) for vs in itertools.product(*args.grid_values.values())]
    say(TAG, f"{len(combos)} configurations, {args.steps} steps x {args.batch_tokens} tokens each, "
             f"{len(train)} train documents ({train_tokens:,} tokens), device {device}")
    rows = []
    for i, combo in enumerate(combos, 1):
        row = run_config(i, combo, args, tokenizer.vocab_size, tokenizer.pad_id, train, val, device)
        row["vocab"] = tokenizer.vocab_size
        rows.append(row)
        what = (f"val {row['final_val_loss']:.3f} train {row['final_train_loss']:.3f} ({row['seconds']:.1f}s)"
                if row["status"] == "ok" else f"{row['status']}: {row['reason']}")
        say(TAG, f"{i}/{len(combos)} {row['label']}: {what}")
    path = write_report(args, device, rows, len(train), train_tokens)
    say(TAG, f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
