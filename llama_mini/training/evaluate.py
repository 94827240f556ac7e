"""Evaluation: token-weighted validation loss, and perplexity at several context lengths.

``evaluate_loss(model, batches)`` is what the trainer calls every ``eval_every`` steps. The model
returns the *mean* cross-entropy over the counted targets of a batch (targets != ignore_index).
Batches count different numbers of targets (padding, masked pieces), so the loss of the whole
evaluation set is the token-weighted mean, not the mean of batch means::

    n_b    = #{ (i, t) : target_b[i, t] != ignore_index }        counted targets of batch b
    loss   = sum_b (mean_loss_b * n_b) / sum_b n_b                = mean CE over every counted token
    ppl    = exp(loss)                                            (inf when it overflows)

Under data parallelism every rank evaluates its own share; the trainer passes ``all_reduce``
(an in-place SUM over the data-parallel group) and the float64 pair ``[sum_b mean_loss_b * n_b,
sum_b n_b]`` is reduced before the division, so every rank returns the same numbers, weighted
by the tokens each rank saw.

``perplexity_at_lengths`` answers "how does the model do at contexts longer than it was trained
with, and does RoPE scaling help": for each context length L and each RoPE scaling spec it loads
the checkpoint (``max_seq_len`` raised, ``rope_scaling`` replaced), concatenates the validation
documents into one stream cut into full windows of L tokens (policy ``impute``: no padding, so
every position of a window is a counted target), and evaluates about the same number of tokens
(``max_tokens``) at every length. RoPE scaling specs::

    none        the checkpoint's frequencies, unscaled (replaces any scaling it was saved with)
    linear:F    position interpolation: frequencies / F
    ntk:F       NTK-aware base: theta * F^(D / (D - 2))
    llama3:F    Llama 3.1's rule, with original_max_seq_len = the trained context

The trained context is the checkpoint's ``max_seq_len``. Run it::

    llama-mini evaluate --checkpoint runs/x/checkpoints \\
        --context 256 512 1024 --rope-scaling none linear:2 ntk:4 --out ppl.json
    python train.py evaluate --checkpoint ...      # the same, from a checkout

``--checkpoint`` is a Meta checkpoint directory, or a training run's checkpoint root whose file
``latest`` names the step directory to use. ``--data`` defaults to the built-in default data's
validation split. ``--dtype bfloat16`` evaluates under autocast (the weights stay fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time
from typing import Any, Callable, ContextManager, Iterable, Sequence

import torch

from ..checkpoint import atomic_write_text, load_meta_checkpoint, read_args, resolve_checkpoint_dir
from ..config import RopeScaling
from ..hardware import device_name

__all__ = ["evaluate_loss", "parse_rope_scaling", "perplexity_at_lengths", "main"]

_MOVED_KEYS = ("input_ids", "target_ids", "position_ids", "document_ids")
ROPE_SPEC_FORMS = "none, linear:F, ntk:F, llama3:F (F a number >= 1, e.g. linear:4)"


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    batches: Iterable[dict],
    *,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    autocast: Callable[[], ContextManager] | None = None,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
    ignore_index: int | None = None,
) -> dict:
    """Token-weighted mean loss of ``model`` over ``batches`` (see the module docstring).

    batches: dicts with ``input_ids`` and ``target_ids`` (B, T), optionally ``position_ids`` and
    ``document_ids`` (passed to the model when present). At most ``max_batches`` are pulled from
    the iterable. ``autocast()`` wraps each forward; ``all_reduce(t)`` sums the float64 tensor
    ``[loss_sum, tokens]`` in place over data-parallel ranks. ``ignore_index`` defaults to the
    model's; another value is mapped onto the model's before the forward.

    Returns ``{"loss", "ppl", "tokens", "batches"}``: ``tokens`` is the counted targets (summed
    over ranks), ``batches`` the batches this process evaluated. Raises ``ValueError`` when no
    target is counted. The model runs in eval mode; its training mode is restored on return.
    """
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches must be >= 0 or None, got {max_batches}")
    device = torch.device(device)
    model_ignore = int(model.args.ignore_index)
    ignore = model_ignore if ignore_index is None else int(ignore_index)
    # Accumulate on the device (no host sync per batch); MPS has no float64.
    acc_device = torch.device("cpu") if device.type == "mps" else device
    loss_sum = torch.zeros((), dtype=torch.float64, device=acc_device)
    count = torch.zeros((), dtype=torch.float64, device=acc_device)
    n_batches = 0
    was_training = model.training
    model.eval()
    try:
        if max_batches != 0:
            for batch in batches:
                inputs = {k: batch[k].to(device, non_blocking=True) for k in _MOVED_KEYS if batch.get(k) is not None}
                targets = inputs.pop("target_ids")
                counted = targets != ignore
                if ignore != model_ignore:
                    targets = torch.where(counted, targets, torch.full_like(targets, model_ignore))
                with autocast() if autocast is not None else contextlib.nullcontext():
                    loss = model(inputs.pop("input_ids"), targets, **inputs)
                n = counted.sum().to(acc_device, torch.float64)
                # a batch with no counted target has a NaN mean; it must add nothing, not NaN
                loss_sum += torch.where(n > 0, loss.detach().to(acc_device, torch.float64) * n, 0.0)
                count += n
                n_batches += 1
                if max_batches is not None and n_batches >= max_batches:
                    break  # stop before pulling another batch (a resumable pipeline stays put)
    finally:
        model.train(was_training)
    totals = torch.stack([loss_sum, count])  # (2,) float64: [sum of mean*n, n]
    if all_reduce is not None:
        all_reduce(totals)
    total_loss, tokens = totals.tolist()
    if tokens <= 0:
        raise ValueError(
            f"the evaluation data holds no target token (counted targets != ignore_index={ignore}) "
            f"in {n_batches} batch(es)"
        )
    loss = total_loss / tokens
    return {"loss": loss, "ppl": _safe_exp(loss), "tokens": int(round(tokens)), "batches": n_batches}


def parse_rope_scaling(spec: str, trained_len: int) -> RopeScaling:
    """``"none"`` | ``"linear:F"`` | ``"ntk:F"`` | ``"llama3:F"`` -> ``RopeScaling``; llama3
    takes ``original_max_seq_len=trained_len``. Anything else raises ``ValueError``."""
    text = str(spec).strip().lower()
    if text == "none":
        return RopeScaling()
    kind, sep, factor_text = text.partition(":")
    bad = ValueError(f"bad RoPE scaling spec {spec!r}; allowed forms: {ROPE_SPEC_FORMS}")
    if not sep or kind not in ("linear", "ntk", "llama3"):
        raise bad
    try:
        factor = float(factor_text)
    except ValueError:
        raise bad from None
    if not (math.isfinite(factor) and factor >= 1.0):
        raise bad
    if kind == "llama3":
        return RopeScaling(type="llama3", factor=factor, original_max_seq_len=int(trained_len))
    return RopeScaling(type=kind, factor=factor)


def _find_tokenizer(root: str, resolved: str) -> str:
    candidates = [os.path.join(d, "tokenizer.model") for d in dict.fromkeys([resolved, root])]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"no tokenizer found at {' or '.join(candidates)}; pass the SentencePiece model with --tokenizer PATH"
    )


def _eval_batches(sources: Any, tokenizer: Any, L: int, batch_size: int, max_tokens: int, ignore_index: int) -> list:
    """The first ceil(max_tokens / (L * batch_size)) batches of full L-token windows."""
    from ..data.pipeline import DataPipeline

    n_batches = -(-max_tokens // (L * batch_size))
    pipe = DataPipeline.build(sources, tokenizer, policy="impute", max_len=L, batch_size=batch_size,
                              ignore_index=ignore_index, rank=0, world_size=1)
    out = []
    for batch in pipe:
        out.append(batch)
        if len(out) >= n_batches:
            break
    if not out:
        tokens = pipe.counts()["policy"].get("tokens_in", 0)
        raise ValueError(
            f"context length {L}: the evaluation data has only {tokens} tokens, not one full window of {L}; "
            "use a shorter context or more data"
        )
    return out


def perplexity_at_lengths(
    checkpoint: str,
    sources: Any,
    *,
    tokenizer: str | None = None,
    context_lengths: Sequence[int] = (512, 2048),
    rope_scalings: Sequence[str] = ("none",),
    batch_size: int = 4,
    max_tokens: int = 65536,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_backend: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Loss and perplexity of a checkpoint at each (context length, RoPE scaling) pair.

    Rows: ``{"context", "rope_scaling", "trained_context", "tokens", "loss", "ppl", "seconds"}``
    (``seconds``: the evaluation itself, without loading the model or reading the data). The
    model is loaded once per scaling with ``max_seq_len = max(context_lengths)``, which only
    bounds the input (the RoPE table covers positions 0..max-1; frequencies do not depend on
    it), and the batches of each length are built once and reused across scalings. ``dtype``
    other than float32 runs the forward under ``torch.autocast``; the weights stay fp32.
    """
    from ..data.tokenizer import Tokenizer

    lengths = [int(L) for L in context_lengths]
    if not lengths or any(L < 1 for L in lengths):
        raise ValueError(f"context lengths must be positive integers, got {list(context_lengths)}")
    if batch_size < 1 or max_tokens < 1:
        raise ValueError(f"batch_size and max_tokens must be >= 1, got {batch_size} and {max_tokens}")
    root = os.fspath(checkpoint)
    resolved = resolve_checkpoint_dir(root)
    trained = read_args(resolved).max_seq_len
    specs = [(str(s), parse_rope_scaling(s, trained)) for s in rope_scalings]  # bad specs fail first
    if not specs:
        raise ValueError("no RoPE scaling given; use at least 'none'")
    tok = Tokenizer(tokenizer if tokenizer is not None else _find_tokenizer(root, resolved))
    device = torch.device(device)
    autocast = None
    if dtype != torch.float32:
        autocast = lambda: torch.autocast(device_type=device.type, dtype=dtype)  # noqa: E731

    overrides: dict[str, Any] = {"max_seq_len": max(lengths)}
    if attn_backend is not None:
        overrides["attn_backend"] = attn_backend
    data: dict[int, list] = {}
    rows = []
    for spec, scaling in specs:
        model = load_meta_checkpoint(resolved, device=device, dtype=torch.float32, rope_scaling=scaling, **overrides)
        if model.args.vocab_size < tok.vocab_size:
            raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model only {model.args.vocab_size}")
        for L in lengths:
            if L not in data:
                data[L] = _eval_batches(sources, tok, L, batch_size, max_tokens, model.args.ignore_index)
            start = time.perf_counter()
            result = evaluate_loss(model, data[L], device=device, autocast=autocast)
            row = {"context": L, "rope_scaling": spec, "trained_context": trained, "tokens": result["tokens"],
                   "loss": result["loss"], "ppl": result["ppl"], "seconds": time.perf_counter() - start}
            rows.append(row)
            if progress:
                print(f"[evaluate] context {L:>6} rope {spec:<10} tokens {row['tokens']:>8}  loss {row['loss']:.4f}"
                      f"  ppl {row['ppl']:.3f}  ({row['seconds']:.1f}s)", file=sys.stderr, flush=True)
        del model
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table; contexts beyond the trained one are marked with ``*``."""
    header = f"{'context':>9} | {'rope scaling':<12} | {'tokens':>9} | {'loss':>8} | {'ppl':>10}"
    lines = [header, "-" * len(header)]
    beyond = False
    for r in rows:
        mark = "*" if r["context"] > r["trained_context"] else " "
        beyond |= mark == "*"
        lines.append(f"{r['context']:>8}{mark} | {r['rope_scaling']:<12} | {r['tokens']:>9} | "
                     f"{r['loss']:>8.4f} | {r['ppl']:>10.3f}")
    if rows:
        lines.append(f"trained context: {rows[0]['trained_context']}" + ("  (* = beyond it)" if beyond else ""))
    return "\n".join(lines)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser(prog: str = "llama-mini evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Validation loss and perplexity of a checkpoint at several context lengths and RoPE "
                    "scalings (documents concatenated and cut into full windows of each length).",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="Meta checkpoint directory, or a training run's checkpoint root holding a file "
                        "'latest' that names the step directory to use")
    p.add_argument("--data", nargs="+", metavar="SOURCE",
                   help="validation shards: files, directories, globs or URLs (default: the built-in "
                        "default data's val split)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="SentencePiece tokenizer.model (default: tokenizer.model in the checkpoint directory)")
    p.add_argument("--context", nargs="+", type=int, default=[512, 2048], metavar="L",
                   help="context lengths to evaluate (default: 512 2048)")
    p.add_argument("--rope-scaling", nargs="+", default=["none"], metavar="SPEC",
                   help=f"RoPE scalings to compare, each one of: {ROPE_SPEC_FORMS} (default: none)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward (default: 4)")
    p.add_argument("--max-tokens", type=int, default=65536,
                   help="tokens to evaluate per row, rounded up to whole batches (default: 65536)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                   help="compute dtype: float32, or bfloat16/float16 under autocast (weights stay fp32)")
    p.add_argument("--attn-backend", default=None, help="attention backend (default: the checkpoint's)")
    p.add_argument("--out", metavar="FILE.json", help="write the rows and run metadata as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """The ``evaluate`` command on parsed ``args``: prints the table, writes ``--out``. Failures
    (a missing checkpoint, bad data, a context the model cannot take) raise; the command line
    reports them in one line (``llama_mini.cli``)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = args.tokenizer
    sources = args.data
    if sources is None:
        from ..data.builtin import ensure_default_data

        sources = ensure_default_data().val
    rows = perplexity_at_lengths(
        args.checkpoint, sources, tokenizer=tokenizer, context_lengths=args.context,
        rope_scalings=args.rope_scaling, batch_size=args.batch_size, max_tokens=args.max_tokens,
        device=device, dtype=_DTYPES[args.dtype], attn_backend=args.attn_backend, progress=not args.quiet,
    )
    print(format_table(rows))
    if args.out:
        report = {
            "checkpoint": os.path.abspath(resolve_checkpoint_dir(args.checkpoint)),
            "data": sources if isinstance(sources, list) else [sources],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device),
            "dtype": args.dtype,
            "torch": torch.__version__,
            "batch_size": args.batch_size,
            "max_tokens": args.max_tokens,
            "rows": rows,
        }
        # ppl may be inf: json writes Infinity, which Python's json reads back
        atomic_write_text(json.dumps(report, indent=2) + "\n", args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``llama-mini evaluate ARGS`` from Python: the exit status, errors reported in one line."""
    from ..cli import run_command

    return run_command("evaluate", list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
