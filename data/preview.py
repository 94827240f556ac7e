"""The ``data`` command: what a sequence-length policy makes of some data.

    llama-mini data                                    # built-in default data, pad+impute, 256
    llama-mini data --policy informed --max-len 100 --tolerance 50 --max-documents 128
    llama-mini data --source "/data/pile/val/*.jsonl.zst" --tokenizer llama/tokenizer.model \\
                    --policy packed-docmask --max-len 2048 --show 2

Prints what the first records look like, runs the whole pipeline (reader -> tokenizer -> policy
-> collator) over the documents, and reports the reader's and the policy's counts; ``--show N``
also decodes the first N sequences so you can see where documents were cut or joined.
"""

from __future__ import annotations

import argparse
import json

from .pipeline import DataPipeline
from .policies import POLICIES
from .reader import describe_sample


__all__ = ["build_parser", "run"]


def build_parser(prog: str = "llama-mini data") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", nargs="+", default=None,
                   help="files, directories, globs or URLs (default: the built-in default data's train split)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: the built-in default data's)")
    p.add_argument("--policy", default="pad+impute", choices=sorted(POLICIES), help="sequence-length policy")
    p.add_argument("--max-len", type=int, default=None,
                   help="sequence length (default 256; 0 for none with pad; the naive policies take the shortest document)")
    p.add_argument("--tolerance", type=int, default=None, help="informed: shortest overflow kept")
    p.add_argument("--buffer-size", type=int, default=None, help="best-fit / packed-docmask: pieces packed at once")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-documents", type=int, default=None, help="read at most this many documents")
    p.add_argument("--include-sets", nargs="+", default=None, help="keep only these pile_set_name values")
    p.add_argument("--exclude-sets", nargs="+", default=None, help="drop these pile_set_name values")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="bad lines: raise or skip and count")
    p.add_argument("--show", type=int, default=0, help="decode the first N sequences")
    p.add_argument("--json", action="store_true", help="print the counts as JSON only")
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Print samples, the first ``--show`` sequences and the counts. Bad sources raise
    (``CorruptShardError``, ``BadDocumentError``, ``FileNotFoundError``) naming the file and line."""
    from .tokenizer import Tokenizer

    source, tokenizer = args.source, args.tokenizer
    if source is None or tokenizer is None:
        from .builtin import ensure_default_data

        default = ensure_default_data()
        source = source or [default.train]
        tokenizer = tokenizer or default.tokenizer
    tok = Tokenizer(tokenizer)
    options = {k: v for k, v in (("tolerance", args.tolerance), ("buffer_size", args.buffer_size)) if v is not None}
    max_len = args.max_len
    if max_len is None:
        max_len = None if POLICIES[args.policy].max_len_rule == "forbidden" else 256
    pipe = DataPipeline.build(
        source, tok, policy=args.policy, max_len=max_len or None, batch_size=args.batch_size,
        policy_options=options, max_documents=args.max_documents, include_sets=args.include_sets,
        exclude_sets=args.exclude_sets, on_error=args.on_error,
    )
    if not args.json:
        print(describe_sample(source, n=2, max_chars=120))
        print(f"\npolicy: {pipe.policy!r}")
    shown = 0
    for batch in pipe:
        for row in range(batch["input_ids"].shape[0]):
            if shown >= args.show:
                break
            ids = [int(t) for t, y in zip(batch["input_ids"][row], batch["target_ids"][row]) if int(y) != pipe.policy.ignore_index]
            print(f"\nsequence {shown} ({len(ids)} tokens, {batch['input_ids'].shape[1] - len(ids)} pad):")
            print("  " + tok.decode(ids)[:2000].replace("\n", "\n  "))
            shown += 1
    counts = pipe.counts()
    if args.json:
        print(json.dumps(counts, indent=2))
        return 0
    print("\nreader:   " + ", ".join(f"{k}={v}" for k, v in counts["reader"].items()))
    print("policy:   " + ", ".join(f"{k}={v}" for k, v in counts["policy"].items()))
    c = counts["policy"]
    if c["tokens_in"]:
        print(f"kept {c['tokens_kept'] / c['tokens_in']:.1%} of {c['tokens_in']} tokens, dropped "
              f"{c['tokens_dropped'] / c['tokens_in']:.1%}; padding is {c['pad_tokens'] / max(1, c['pad_tokens'] + c['tokens_kept']):.1%} "
              f"of the batch positions")
    return 0
