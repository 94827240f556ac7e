"""The ``generate`` command: text from a Meta-format checkpoint on the KV-cache path.

    llama-mini generate --checkpoint DIR --prompt "The meaning of life is"

DIR holds ``consolidated.NN.pth`` shard(s) + ``params.json`` (as written by
``save_meta_checkpoint`` or by Meta), with a ``tokenizer.model`` beside them (or pass
``--tokenizer``). Several ``--prompt`` flags decode as one batch. ``--help`` lists every option.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .generation import generate

__all__ = ["build_parser", "run", "main"]


def build_parser(prog: str = "llama-mini generate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Generate text from a Meta-format checkpoint.")
    parser.add_argument("--checkpoint", required=True,
                        help="directory with consolidated.NN.pth and params.json, or a training run's checkpoints/ (its latest)")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece model (default: CHECKPOINT/tokenizer.model)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; else sampling temperature")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (with temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    parser.add_argument(
        "--max-seq-len", type=int, default=None,
        help="context length (default: the checkpoint's llama_mini.json, else 2048); prompt + new tokens must fit",
    )
    parser.add_argument("--attn-backend", default=None, help="attention backend override (eager, sdpa, ...)")
    return parser


def run(ns: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Decode ``ns.prompt`` as one batch and print each completion. A checkpoint or tokenizer
    that cannot be used raises with a message naming the file."""
    from .checkpoint import load_meta_checkpoint, resolve_checkpoint_dir
    from .tokenizer import Tokenizer

    checkpoint = resolve_checkpoint_dir(ns.checkpoint)  # a run's checkpoints/ root: its latest
    tok_path = ns.tokenizer or os.path.join(checkpoint, "tokenizer.model")
    tokenizer = Tokenizer(tok_path)
    overrides = {"attn_backend": ns.attn_backend} if ns.attn_backend else {}
    if ns.max_seq_len is not None:
        overrides["max_seq_len"] = ns.max_seq_len
    model = load_meta_checkpoint(checkpoint, device=ns.device, dtype=getattr(torch, ns.dtype), **overrides)
    if model.args.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but the model in {checkpoint} only "
            f"{model.args.vocab_size}; pass the tokenizer it was trained with (--tokenizer)"
        )
    model.eval()
    generator = torch.Generator(device=ns.device).manual_seed(ns.seed)
    prompts = [tokenizer.encode(p, bos=True) for p in ns.prompt]
    result = generate(
        model, prompts, ns.max_new_tokens, temperature=ns.temperature, top_p=ns.top_p,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, generator=generator, vocab_limit=tokenizer.vocab_size,
    )
    for prompt_ids, ids, done in zip(prompts, result.tokens, result.finished):
        print(tokenizer.decode(prompt_ids + ids) + ("" if done else " [...]"))
        print("-" * 40)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``llama-mini generate ARGS`` from Python: the exit status, errors reported in one line."""
    from .cli import run_command

    return run_command("generate", list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
