"""The sequence-length ablation: how the handling of sequence length changes what a LLaMA model
sees and learns from the first N documents of a shard.

    python bench/seq_len_ablation.py                 # CPU default: 128 documents of the default data, ~5 min on 2 cores
    python bench/seq_len_ablation.py --quick         # smoke run, seconds (the test runs it)
    python bench/seq_len_ablation.py --full --data /data/pile/train/00.jsonl.zst \\
        --val-data /data/pile/val.jsonl.zst --tokenizer /models/llama-2-7b/tokenizer.model   # the homework's model, GPU

Fixed inputs: the first ``--documents`` documents of ``--data`` in file order (default: shard
00 of the built-in default data's train split), tokenized as ``[BOS] + text -> text + [EOS]``;
fixed model arguments (the homework's dim 512, 8 layers, 8 heads, norm_eps 1e-5, batch 8 under
``--full``; dim 128, 4 layers, 4 heads on CPU by default); a fixed seed, so every configuration
starts from the same weights and reads its batches in the same order. Rounds (``--rounds``):

naive      max_len = the shortest document: ``naive-discard`` (each document cut to it) and
           ``naive-impute`` (documents concatenated and cut into windows of it)
padding    ``pad+discard`` and ``pad+impute`` at each of ``--lengths`` (100 and 250)
informed   ``informed`` at ``--informed-len`` (100) with each of ``--tolerances`` (50..200): the
           overflow past max_len becomes sequences of its own when it is >= the tolerance
packing    ``best-fit`` and ``packed-docmask`` (document-masked attention) at each of ``--lengths``

For every configuration the policy's own counts (sequences, tokens kept / dropped / padded,
documents truncated and split) describe what the model sees, and one fresh model trains on its
batches in order, one AdamW step per batch (constant learning rate after a short warmup), until
it has seen ``--token-budget`` counted target tokens or the batches run out. Reported losses:

  first-16    token-weighted mean training loss over the first ``--first-batches`` batches (the
              homework's measure: equal batches, but not equal data, since a batch of 8 x 42
              tokens holds a sixth of a batch of 8 x 250)
  budget      token-weighted mean training loss over the steps that reach the token budget
  val         mean loss on fixed validation batches (``impute`` windows of ``--val-len`` tokens
              of ``--val-data``), evaluated at the same counts of tokens seen for every
              configuration: the comparison at equal tokens, on the same held-out text

Outputs (``--out``, default ``bench/results/seq_len_ablation/``): ``report.md`` (tables, figures,
and what the numbers of this run say), ``results.json`` (rows plus every loss curve),
``results.csv``, ``round_<name>.png`` (training loss per batch and against tokens seen, one
figure per round: the homework's figures 12 to 14, plus packing), ``equal_tokens.png``
(validation loss against tokens seen, every configuration) and ``data.png`` (kept, dropped and
padded tokens per configuration).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common import HelpFormatter, int_list, name_list, results_dir, start_device
from experiment import (FitConfig, Report, batches_of, build_model, config_dict, data_arguments, data_sources,
                        device_arguments, eval_batches, first_documents, fit, markdown_table,
                        plot_curves, read_documents, say)

from llama_mini import ModelArgs, count_params
from llama_mini.training.metrics import ema

ROUNDS = ("naive", "padding", "informed", "packing")
FIELDS = ("round", "config", "policy", "max_len", "tolerance", "documents", "batches", "sequences", "tokens_in", "tokens_kept",
          "tokens_dropped", "pad_tokens", "documents_truncated", "documents_split", "kept_frac", "pad_frac",
          "targets_available", "loss_first", "steps", "tokens_seen", "stopped", "loss_budget", "val_at_common",
          "common_at_step", "multi_doc_frac",
          "val_final", "seconds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    d = p.add_argument_group("data")
    data_arguments(d, "the default data's train/00.jsonl.zst")
    d.add_argument("--documents", type=int, default=128, help="the first N documents of --data, in order")
    d.add_argument("--val-len", type=int, default=128, help="validation window length")
    d.add_argument("--val-batches", type=int, default=4, help="validation batches (of --batch-size windows)")
    c = p.add_argument_group("configurations")
    c.add_argument("--rounds", default=",".join(ROUNDS), help=f"comma-separated subset of {', '.join(ROUNDS)}")
    c.add_argument("--lengths", default="100,250", help="max_len of the padding and packing rounds")
    c.add_argument("--informed-len", type=int, default=100, help="max_len of the informed round")
    c.add_argument("--tolerances", default="50,100,150,200", help="tolerances of the informed round")
    c.add_argument("--pack-buffer", type=int, default=64,
                   help="pieces best-fit and packed-docmask hold while packing; small, so that sequences holding "
                        "several documents come all along the stream (best-fit-decreasing emits full one-document "
                        "bins first, so with a buffer holding every document the two packing policies train the "
                        "same single-document sequences until near the end)")
    m = p.add_argument_group("model and training")
    m.add_argument("--dim", type=int, default=128)
    m.add_argument("--n-layers", type=int, default=4)
    m.add_argument("--n-heads", type=int, default=4)
    m.add_argument("--norm-eps", type=float, default=1e-5)
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--token-budget", type=int, default=128_000, help="counted target tokens each configuration trains on")
    m.add_argument("--first-batches", type=int, default=16, help="batches of the first-batches loss")
    m.add_argument("--eval-points", type=int, default=6, help="evaluations spread evenly up to the budget")
    m.add_argument("--lr", type=float, default=1e-3)
    m.add_argument("--warmup-steps", type=int, default=10)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--attn-backend", default="sdpa", help="attention backend (eager | sdpa | triton)")
    g = p.add_argument_group("run")
    device_arguments(g)
    g.add_argument("--full", action="store_true",
                   help="the homework's model (dim 512, 8 layers, 8 heads) and a 256k-token budget; device auto")
    g.add_argument("--quick", action="store_true", help="smoke run: 12 documents, a tiny model, 4k-token budget")
    g.add_argument("--out", type=Path, default=results_dir("seq_len_ablation"), help="output directory")
    args = p.parse_args(argv)
    if args.full and args.quick:
        p.error("--full and --quick exclude each other")
    if args.data and not args.val_data:
        p.error("--val-data is required with --data (validate on the same kind of text)")
    if args.threads is None and not args.full:
        args.threads = 1  # see experiment.device_arguments
    if args.full:
        args.dim, args.n_layers, args.n_heads, args.token_budget = 512, 8, 8, 256_000
    if args.quick:
        args.documents, args.dim, args.n_layers, args.n_heads = 12, 32, 1, 2
        args.token_budget, args.val_len, args.val_batches, args.eval_points, args.pack_buffer = 4000, 32, 2, 3, 32
        args.lengths, args.tolerances, args.first_batches, args.informed_len = "40,90", "30,50", 4, 100
    try:
        args.rounds = name_list("--rounds", args.rounds, ROUNDS)
        args.lengths = int_list("--lengths", args.lengths)
        args.tolerances = sorted(int_list("--tolerances", args.tolerances))
    except ValueError as e:
        p.error(str(e))
    for name in ("documents", "val_len", "val_batches", "informed_len", "batch_size", "token_budget", "first_batches",
                 "eval_points", "pack_buffer", "dim", "n_layers", "n_heads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(round, label, policy, max_len, options) of every configuration, in report order."""
    out = []
    if "naive" in args.rounds:
        out += [dict(round="naive", policy=p, max_len=None, options={}) for p in ("naive-discard", "naive-impute")]
    if "padding" in args.rounds:
        out += [dict(round="padding", policy=p, max_len=L, options={})
                for L in args.lengths for p in ("pad+discard", "pad+impute")]
    if "informed" in args.rounds:
        out += [dict(round="informed", policy="informed", max_len=args.informed_len, options={"tolerance": t})
                for t in args.tolerances]
    if "packing" in args.rounds:
        out += [dict(round="packing", policy=p, max_len=L, options={"buffer_size": args.pack_buffer})
                for L in args.lengths for p in ("best-fit", "packed-docmask")]
    for c in out:
        c["config"] = c["policy"] + (f"@{c['max_len']}" if c["max_len"] else "") + \
            (f" tol {c['options']['tolerance']}" if "tolerance" in c["options"] else "")
    return out


def model_args(args, vocab_size: int, max_seq_len: int) -> ModelArgs:
    """The ``homework`` preset under --full (its SwiGLU rounding, multiple_of 256), else ``debug``'s
    small-model settings, with the sizes of the command line."""
    return ModelArgs.preset("homework" if args.full else "debug", vocab_size=vocab_size, dim=args.dim,
                            n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_heads,
                            norm_eps=args.norm_eps, max_seq_len=max_seq_len, attn_backend=args.attn_backend,
                            **({} if args.full else {"multiple_of": 32}))


def run_config(c: dict, args, val, tok, device, eval_points: list[int]) -> tuple[dict, dict]:
    """Train a fresh model on the configuration's batches; (row, curves)."""
    batches, pol, targets = c["batches"], c["policy_obj"], c["targets"]
    counts = pol.counts.as_dict()
    max_len = pol.max_len
    margs = model_args(args, tok.vocab_size, max(max_len, args.val_len))
    model = build_model(margs, args.seed, device)
    cfg = FitConfig(lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed)
    res = fit(model, batches, cfg, token_budget=args.token_budget, val_batches=val, eval_at_tokens=eval_points,
              device=device, tag=c["config"])
    common = eval_points[0]
    crossing = next((s for s in res.steps if s["tokens_seen"] >= common), None)
    trained = batches[:len(res.steps)]
    multi = None
    if c["policy"] == "packed-docmask":  # sequences that hold more than one document, among those trained
        rows = [len(d[t != -100].unique()) > 1 for b in trained for d, t in zip(b["document_ids"], b["target_ids"])]
        multi = sum(rows) / len(rows)  # padding has a document id of its own, but no counted target
    row = {
        "round": c["round"], "config": c["config"], "policy": c["policy"], "max_len": max_len,
        "tolerance": c["options"].get("tolerance"), **{k: counts[k] for k in FIELDS if k in counts},
        "kept_frac": counts["tokens_kept"] / counts["tokens_in"],
        "pad_frac": counts["pad_tokens"] / max(1, counts["tokens_kept"] + counts["pad_tokens"]),
        "targets_available": targets, "loss_first": res.mean_loss(args.first_batches), "steps": len(res.steps),
        "tokens_seen": res.tokens_seen, "stopped": res.stopped, "loss_budget": res.mean_loss(),
        "val_at_common": res.val_at(common), "common_at_step": crossing["step"] if crossing else None,
        "multi_doc_frac": multi,
        "val_final": res.evals[-1]["val_loss"], "seconds": res.seconds,
    }
    return row, {"steps": res.steps, "evals": res.evals}


def _num(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def tables(rows: list[dict], args) -> tuple[str, str]:
    data = markdown_table(
        ["configuration", "max_len", "batches", "sequences", "tokens kept", "dropped", "padded", "kept %",
         "pad %", "docs truncated", "docs split"],
        [[r["config"], r["max_len"], r["batches"], r["sequences"], f"{r['tokens_kept']:,}",
          f"{r['tokens_dropped']:,}", f"{r['pad_tokens']:,}", f"{100 * r['kept_frac']:.1f}",
          f"{100 * r['pad_frac']:.1f}", r["documents_truncated"], r["documents_split"]] for r in rows])
    loss = markdown_table(
        ["configuration", f"loss, first {args.first_batches} batches", "tokens in them", "steps to budget",
         "tokens seen", "loss over budget", "val @ common", "step", "val, final", "stopped by"],
        [[r["config"], _num(r["loss_first"]), f"{r['tokens_first']:,}", r["steps"], f"{r['tokens_seen']:,}",
          _num(r["loss_budget"]), _num(r["val_at_common"]), r["common_at_step"], _num(r["val_final"]),
          r["stopped"]] for r in rows])
    return data, loss


def findings(rows: list[dict], common: int, args) -> list[str]:
    """Statements computed from this run's numbers."""
    out = []
    by = {r["config"]: r for r in rows}
    naive = [r for r in rows if r["round"] == "naive"]
    if naive:
        L = naive[0]["max_len"]
        parts = ", ".join(f"{r['config']} keeps {100 * r['kept_frac']:.1f}% of the {r['tokens_in']:,} tokens"
                          for r in naive)
        out.append(f"The shortest of the {args.documents} documents has {L} tokens, so the naive round trains on "
                   f"{L}-token sequences: {parts}.")
    most_pad = max(rows, key=lambda r: r["pad_frac"])
    least_kept = min(rows, key=lambda r: r["kept_frac"])
    out.append(f"Least data kept: {least_kept['config']} ({100 * least_kept['kept_frac']:.1f}% of the tokens). "
               f"Most padding: {most_pad['config']} ({100 * most_pad['pad_frac']:.1f}% of its positions are padding).")
    informed = [r for r in rows if r["round"] == "informed"]
    if len(informed) > 1:
        lo, hi = informed[0], informed[-1]
        out.append(f"Informed overflow at max_len {lo['max_len']}: raising the tolerance from {lo['tolerance']} to "
                   f"{hi['tolerance']} changes the tokens kept from {100 * lo['kept_frac']:.1f}% to "
                   f"{100 * hi['kept_frac']:.1f}% and the padding from {100 * lo['pad_frac']:.1f}% to "
                   f"{100 * hi['pad_frac']:.1f}% of positions.")
    short = [r for r in rows if r["stopped"] == "data"]
    if short:
        out.append("Ran out of data before the budget of " + f"{args.token_budget:,} tokens: " +
                   ", ".join(f"{r['config']} ({r['tokens_seen']:,})" for r in short) + ".")
    ranked_first = sorted(rows, key=lambda r: r["loss_first"])
    ranked_val = sorted([r for r in rows if r["val_at_common"] is not None], key=lambda r: r["val_at_common"])
    out.append(f"By training loss over the first {args.first_batches} batches the order is "
               + ", ".join(f"{r['config']} ({r['loss_first']:.3f})" for r in ranked_first[:3]) + " first, "
               + f"{ranked_first[-1]['config']} ({ranked_first[-1]['loss_first']:.3f}) last; those batches hold "
               f"between {min(r['tokens_first'] for r in rows):,} and {max(r['tokens_first'] for r in rows):,} "
               "tokens, so equal batches are not equal data.")
    if ranked_val:
        best, worst = ranked_val[0], ranked_val[-1]
        out.append(f"At equal tokens seen ({common:,}, the most every configuration reached) the validation loss "
                   f"is lowest for {best['config']} ({best['val_at_common']:.3f}) and highest for "
                   f"{worst['config']} ({worst['val_at_common']:.3f}), a spread of "
                   f"{worst['val_at_common'] - best['val_at_common']:.3f} nats. {best['config']} had made "
                   f"{best['common_at_step']} optimizer steps by then and {worst['config']} "
                   f"{worst['common_at_step']}: with a batch of {args.batch_size} sequences, shorter sequences "
                   "mean more updates per token.")
        agree = [r["config"] for r in ranked_first[:3]] == [r["config"] for r in ranked_val[:3]]
        out.append("The first-batches ranking and the equal-tokens ranking "
                   + ("agree on the top three." if agree else "disagree on the top three: the first-batches "
                      "loss compares different amounts of data, on each configuration's own text."))
    reached = [r for r in rows if r["stopped"] != "data"]
    if len(reached) > 1:
        best = min(reached, key=lambda r: r["val_final"])
        worst = max(reached, key=lambda r: r["val_final"])
        out.append(f"At the full budget of {args.token_budget:,} tokens the best validation loss is "
                   f"{best['config']} ({best['val_final']:.3f}, {best['steps']} steps), the worst {worst['config']} "
                   f"({worst['val_final']:.3f}, {worst['steps']} steps).")
    for L in args.lengths:
        pair = [by.get(f"pad+impute@{L}"), by.get(f"best-fit@{L}"), by.get(f"packed-docmask@{L}")]
        if all(pair) and all(r["stopped"] != "data" for r in pair):
            pad, bf, dm = pair
            if dm["multi_doc_frac"] is not None:
                out.append(f"At max_len {L}, {100 * dm['multi_doc_frac']:.1f}% of the packed sequences trained on "
                           "held more than one document: document masking can only matter in those.")
            out.append(f"At max_len {L}: pad+impute pads {100 * pad['pad_frac']:.1f}% of positions and needs "
                       f"{pad['steps']} steps for the budget, best-fit {100 * bf['pad_frac']:.1f}% and "
                       f"{bf['steps']} steps; final validation loss pad+impute {pad['val_final']:.3f}, best-fit "
                       f"{bf['val_final']:.3f}, packed-docmask {dm['val_final']:.3f} "
                       f"({_compare('document masking', bf['val_final'], dm['val_final'])}).")
    return out


def _compare(what: str, before: float, after: float, noise: float = 0.01) -> str:
    """'<what> helps by x' / 'hurts by x', or 'no difference beyond noise' under ``noise`` nats."""
    diff = before - after
    if abs(diff) < noise:
        return f"{what} changes it by {abs(diff):.3f}, less than {noise} nats"
    return f"{what} {'helps' if diff > 0 else 'hurts'} by {abs(diff):.3f}"


def figures(report: Report, rows: list[dict], curves: dict[str, dict], args) -> None:
    for rnd in dict.fromkeys(r["round"] for r in rows):
        names = [r["config"] for r in rows if r["round"] == rnd]
        per_batch = {n: ([s["step"] for s in curves[n]["steps"][:4 * args.first_batches]],
                         [s["loss"] for s in curves[n]["steps"][:4 * args.first_batches]]) for n in names}
        per_token = {n: ([s["tokens_seen"] for s in curves[n]["steps"]],
                         ema([s["loss"] for s in curves[n]["steps"]])) for n in names}
        report.figure(f"round_{rnd}.png", f"Round '{rnd}': training loss per batch (left) and against tokens "
                      "seen, smoothed (right)",
                      lambda path, a=per_batch, b=per_token, r=rnd: plot_curves(
                          path, {f"{r}: loss per batch (first {4 * args.first_batches})": a,
                                 f"{r}: loss vs tokens seen (EMA)": b},
                          xlabel=["batch", "counted target tokens seen"], ylabel="training loss"))
    val = {r["config"]: ([e["tokens_seen"] for e in curves[r["config"]]["evals"]],
                         [e["val_loss"] for e in curves[r["config"]]["evals"]]) for r in rows}
    report.figure("equal_tokens.png", "Validation loss against tokens seen: the comparison at equal data",
                  lambda path: plot_curves(path, {"validation loss at equal tokens seen": val},
                                           xlabel="counted target tokens seen", ylabel="validation loss", ncols=1))
    report.figure("data.png", "What each configuration keeps, drops and pads, in tokens",
                  lambda path: _plot_data(path, rows))


def _plot_data(path: Path, rows: list[dict]) -> bool:
    from common import pyplot
    plt = pyplot()
    if plt is None:
        return False
    names = [r["config"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.55 * len(rows)), 4.2))
    kept = [r["tokens_kept"] for r in rows]
    dropped = [r["tokens_dropped"] for r in rows]
    ax.bar(names, kept, label="kept")
    ax.bar(names, dropped, bottom=kept, label="dropped")
    ax.bar(names, [r["pad_tokens"] for r in rows], bottom=[k + d for k, d in zip(kept, dropped)], label="padding")
    ax.set_ylabel("tokens")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = start_device(args.device, args.threads)
    tok, train_src, val_src = data_sources(args)
    source = args.data or str(Path(train_src) / "00.jsonl.zst")
    say("ablation", f"reading the first {args.documents} documents of {source}")
    examples = first_documents(source, args.documents, tok)
    need = args.val_batches * args.batch_size * args.val_len + 1
    val = eval_batches(read_documents(val_src, tok, need), args.val_len, args.batch_size, args.val_batches,
                       pad_id=tok.pad_id, where=f"--val-data {val_src}")
    configs = configurations(args)
    # every configuration is evaluated at the same token counts; the first is the most that every
    # configuration can reach (the smallest number of counted targets any of them keeps)
    for c in configs:
        c["batches"], c["policy_obj"] = batches_of(examples, c["policy"], c["max_len"], args.batch_size,
                                                   pad_id=tok.pad_id, **c["options"])
        c["targets"] = sum(int((b["target_ids"] != -100).sum()) for b in c["batches"])
    common = min(args.token_budget, *(c["targets"] for c in configs))
    grid = [round(args.token_budget * k / args.eval_points) for k in range(1, args.eval_points + 1)]
    eval_points = [common] + [t for t in grid if t != common]
    rows, curves = [], {}
    for i, c in enumerate(configs):
        row, curve = run_config(c, args, val, tok, device, eval_points)
        del c["batches"], c["policy_obj"]
        row["tokens_first"] = sum(s["tokens"] for s in curve["steps"][:args.first_batches])
        rows.append(row)
        curves[c["config"]] = curve
        say("ablation", f"{i + 1}/{len(configs)} {c['config']:<24} max_len {row['max_len']:>4}  "
            f"steps {row['steps']:>4}  first-{args.first_batches} {row['loss_first']:.3f}  "
            f"val {row['val_final']:.3f}  ({row['seconds']:.0f}s)")
    report = Report(args.out, "Sequence-length ablation", device, config_dict(args))
    margs = model_args(args, tok.vocab_size, args.val_len)
    report.add(f"The first {args.documents} documents of `{source}` ({sum(len(e['input_ids']) for e in examples):,} "
               f"tokens), one fresh model per configuration (dim {args.dim}, {args.n_layers} layers, "
               f"{args.n_heads} heads, SwiGLU hidden {margs.hidden_dim}, {count_params(margs):,} parameters with "
               f"vocab {tok.vocab_size}, norm_eps {args.norm_eps}, batch {args.batch_size}, seed {args.seed}"
               + ("; the homework's model" if args.full else "; smaller than the homework's dim 512 / 8 layers / "
                  "8 heads so that it runs on a CPU (`--full` uses those)")
               + f"), trained to {args.token_budget:,} counted target tokens. Validation: "
               f"{args.val_batches} batches of {args.batch_size} x {args.val_len} tokens.")
    data_t, loss_t = tables(rows, args)
    report.add("## What each configuration feeds the model\n\n" + data_t)
    report.add("## Training and validation loss\n\n" + loss_t + f"\n\n'val @ common' is the validation loss once "
               f"{common:,} tokens were seen, the most every configuration reached (interpolated in tokens between "
               "evaluations just before and just after the step that crossed it; 'step' is that step); 'stopped by' "
               "says whether a run reached the token budget or ran out of data.")
    figures(report, rows, curves, args)
    report.add("## What the numbers say\n\n" + "\n".join(f"- {s}" for s in findings(rows, common, args)))
    path = report.write(rows, FIELDS + ("tokens_first",), extra={"common_tokens": common, "eval_points": eval_points,
                                                                 "curves": curves})
    print(loss_t)
    say("ablation", f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
