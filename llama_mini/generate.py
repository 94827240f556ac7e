"""Text generation on the KV-cache path: greedy, temperature and top-p sampling.

    python -m llama_mini.generate --checkpoint DIR --prompt "The meaning of life is"

DIR is a Meta-format checkpoint (``consolidated.NN.pth`` + ``params.json``) with a
``tokenizer.model`` beside it (or pass ``--tokenizer``).

Batched prompts of different lengths are laid out left-aligned in one (B, total_len) buffer,
as in Meta's reference: decoding starts at the shortest prompt's end; at a position still
inside a longer prompt, that prompt's own token is kept instead of the sampled one. Since
attention is causal, padding to the right of the current position is never seen, so every
sequence is decoded exactly as if it were alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

from .model import Transformer

__all__ = ["generate", "sample_top_p", "GenerationResult", "main"]


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches
    ``top_p``, renormalise, sample. probs: (B, V) -> token ids (B,)."""
    sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    # drop a token when the mass before it already reaches top_p (the first token always stays)
    sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs >= top_p, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)  # (B, 1)
    return torch.gather(sorted_idx, -1, choice).squeeze(-1)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (prompt excluded, EOS excluded)
    finished: list[bool]  # True where the sequence stopped at EOS


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
) -> GenerationResult:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    temperature == 0 is greedy decoding; otherwise logits are divided by temperature and
    sampled with top-p. A sequence stops at ``eos_id``; all stop when every one has.
    """
    if not prompts:
        raise ValueError("generate: no prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    args = model.args
    B = len(prompts)
    min_len, max_len = min(len(p) for p in prompts), max(len(p) for p in prompts)
    total_len = min(args.max_seq_len, max_len + max_new_tokens)
    if max_len >= total_len:
        raise ValueError(f"generate: the longest prompt ({max_len} tokens) leaves no room within max_seq_len={args.max_seq_len}")
    device = model.output.weight.device
    tokens = torch.full((B, total_len), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    is_prompt = torch.arange(total_len, device=device)[None, :] < lengths[:, None]  # (B, total_len)
    eos_reached = torch.zeros(B, dtype=torch.bool, device=device)
    ended_at = torch.full((B,), total_len, dtype=torch.long, device=device)

    cache = model.new_cache(B, total_len)
    prev_pos = 0
    was_training = model.training
    model.eval()
    try:
        for cur_pos in range(min_len, total_len):
            logits = model.forward_inference(tokens[:, prev_pos:cur_pos], prev_pos, cache)[:, -1]  # (B, V)
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_token = sample_top_p(probs, top_p, generator)
            else:
                next_token = torch.argmax(logits, dim=-1)
            next_token = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            budget_left = cur_pos < lengths + max_new_tokens  # (B,) this token is within budget
            if eos_id is not None:
                newly = (~is_prompt[:, cur_pos]) & budget_left & (next_token == eos_id) & ~eos_reached
                ended_at = torch.where(newly, torch.full_like(ended_at, cur_pos), ended_at)
                eos_reached |= newly
            prev_pos = cur_pos
            if bool((eos_reached | (cur_pos + 1 >= lengths + max_new_tokens)).all()):
                break
    finally:
        model.train(was_training)
    out = []
    for i in range(B):
        start = int(lengths[i])
        stop = min(int(ended_at[i]), start + max_new_tokens, prev_pos + 1)
        out.append(tokens[i, start:stop].tolist())
    return GenerationResult(out, eos_reached.tolist())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama_mini.generate", description="Generate text from a Meta-format checkpoint."
    )
    parser.add_argument("--checkpoint", required=True, help="directory with consolidated.NN.pth and params.json")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece model (default: CHECKPOINT/tokenizer.model)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; else sampling temperature")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (with temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    parser.add_argument("--attn-backend", default=None, help="attention backend override (eager, sdpa, ...)")
    ns = parser.parse_args(argv)

    from .checkpoint import load_meta_checkpoint
    from .tokenizer import Tokenizer

    tok_path = ns.tokenizer or os.path.join(ns.checkpoint, "tokenizer.model")
    tokenizer = Tokenizer(tok_path)
    overrides = {"attn_backend": ns.attn_backend} if ns.attn_backend else {}
    model = load_meta_checkpoint(ns.checkpoint, **overrides)
    if model.args.vocab_size < tokenizer.vocab_size:
        raise SystemExit(
            f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but the model only {model.args.vocab_size}"
        )
    model = model.to(device=ns.device, dtype=getattr(torch, ns.dtype)).eval()
    generator = torch.Generator(device=ns.device).manual_seed(ns.seed)
    prompts = [tokenizer.encode(p, bos=True) for p in ns.prompt]
    result = generate(
        model, prompts, ns.max_new_tokens, temperature=ns.temperature, top_p=ns.top_p,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, generator=generator,
    )
    for prompt_ids, ids, done in zip(prompts, result.tokens, result.finished):
        print(tokenizer.decode(prompt_ids + ids) + ("" if done else " [...]"))
        print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
