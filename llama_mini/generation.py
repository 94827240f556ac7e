"""Text generation on the KV-cache path: greedy, temperature and top-p sampling.

    from llama_mini import generate
    result = generate(model, [tokenizer.encode("Hello", bos=True)], max_new_tokens=32)

The command line lives in ``llama_mini/generate.py`` (``llama-mini generate``).

Batched prompts of different lengths are laid out left-aligned in one (B, total_len) buffer,
as in Meta's reference: decoding starts at the shortest prompt's end; at a position still
inside a longer prompt, that prompt's own token is kept instead of the sampled one. Since
attention is causal, padding to the right of the current position is never seen, so every
sequence is decoded exactly as if it were alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import Transformer

__all__ = ["generate", "sample_top_p", "GenerationResult"]


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
    vocab_limit: int | None = None,
) -> GenerationResult:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    temperature == 0 is greedy decoding; otherwise logits are divided by temperature and
    sampled with top-p. A sequence stops at ``eos_id``; all stop when every one has.
    ``vocab_limit``: never produce ids >= this (a model whose embedding table is padded past
    the tokenizer's vocabulary).
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
            if vocab_limit is not None and vocab_limit < logits.shape[-1]:
                logits[:, vocab_limit:] = float("-inf")
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
