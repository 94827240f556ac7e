"""KV-cache generation equals cache-free greedy recomputation; EOS, sampling and the CLI."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import make_model
from llama_mini import generate, save_meta_checkpoint
from llama_mini.generate import main
from llama_mini.generation import sample_top_p

PROMPTS = [[1, 5, 9, 13, 2, 40], [1, 7], [1, 3, 3, 3, 60, 61, 62, 63, 64, 65, 66], [1, 90, 4]]


def _greedy_without_cache(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0, -1]  # full recomputation, training path
        seq.append(int(logits.argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_kv_cache_greedy_equals_recomputation_for_ragged_batch(dtype, backend):
    model = make_model(dtype=dtype, attn_backend=backend, init_std=0.2).eval()  # peaky logits
    result = generate(model, PROMPTS, max_new_tokens=12)
    for prompt, got in zip(PROMPTS, result.tokens):
        assert got == _greedy_without_cache(model, prompt, 12)
    assert result.finished == [False] * 4


def test_incremental_logits_match_full_forward():
    model = make_model(dtype=torch.float64).eval()
    tokens = torch.randint(0, 97, (2, 20))
    full = model(tokens)
    cache = model.new_cache(2, 32)
    pieces = [model.forward_inference(tokens[:, a:b], a, cache) for a, b in ((0, 7), (7, 8), (8, 20))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-12, atol=1e-12)


def test_stops_at_eos():
    model = make_model(init_std=0.2).eval()
    free = generate(model, PROMPTS, max_new_tokens=10).tokens
    eos = free[0][3]
    first = free[0].index(eos)
    result = generate(model, PROMPTS, max_new_tokens=10, eos_id=eos)
    assert result.tokens[0] == free[0][:first] and result.finished[0]
    for got, full in zip(result.tokens, free):
        expected = full[: full.index(eos)] if eos in full else full
        assert got == expected


def test_eos_beyond_a_prompts_budget_does_not_finish_it():
    model = make_model(init_std=0.2).eval()
    prompts = [[1, 7], [1, 3, 3, 3, 60, 61, 62, 63]]  # the short prompt decodes 6 extra steps
    free = generate(model, prompts, 12).tokens
    eos = next(t for t in free[0][3:12] if t not in free[0][:3])  # emitted only after 3 tokens
    result = generate(model, prompts, 3, eos_id=eos)
    assert result.tokens[0] == free[0][:3] and result.finished[0] is False


def test_sampling_is_seeded_and_top_p_tiny_is_greedy():
    model = make_model(init_std=0.2).eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = generate(model, PROMPTS, 8, temperature=1.0, top_p=0.9, generator=g()).tokens
    b = generate(model, PROMPTS, 8, temperature=1.0, top_p=0.9, generator=g()).tokens
    assert a == b
    greedy = generate(model, PROMPTS, 8).tokens
    assert generate(model, PROMPTS, 8, temperature=0.7, top_p=1e-6, generator=g()).tokens == greedy
    # a vanishing temperature concentrates all mass on the argmax
    assert generate(model, PROMPTS, 8, temperature=1e-4, generator=g()).tokens == greedy
    # real sampling departs from greedy, and another seed gives another sample
    hot = generate(model, PROMPTS, 8, temperature=5.0, generator=g()).tokens
    assert hot != greedy
    other = generate(model, PROMPTS, 8, temperature=5.0, generator=torch.Generator().manual_seed(1)).tokens
    assert other != hot


def test_sample_top_p_keeps_the_nucleus_only():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(20000, 1)
    draws = sample_top_p(probs, 0.75, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).double() / len(draws)
    assert counts[2] == 0 and counts[3] == 0  # mass before token 2 is 0.8 >= 0.75
    # 20000 draws: the standard error of a frequency near 0.6 is ~0.0035
    torch.testing.assert_close(counts[:2], torch.tensor([0.625, 0.375], dtype=torch.float64), atol=0.02, rtol=0)


def test_generation_errors():
    model = make_model().eval()
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], 4)
    with pytest.raises(ValueError, match="leaves no room within max_seq_len=64"):
        generate(model, [[1] * 64], 4)
    with pytest.raises(ValueError, match="batch size 9 exceeds ModelArgs.max_batch_size=8"):
        generate(model, [[1]] * 9, 4)
    cache = model.new_cache(1, 16)
    with pytest.raises(ValueError, match="do not fit the KV cache of length 16"):
        model.forward_inference(torch.zeros(1, 4, dtype=torch.long), 14, cache)
    with pytest.raises(ValueError, match="tokens contains id 97"):
        model.forward_inference(torch.tensor([[97]]), 0, cache)


def test_cli_generates_from_a_checkpoint_directory(tmp_path, capsys, trained_tokenizer):
    model = make_model(vocab_size=trained_tokenizer.vocab_size, max_seq_len=64)
    save_meta_checkpoint(model, tmp_path)
    shutil.copy(trained_tokenizer.model_path, tmp_path / "tokenizer.model")
    assert main(["--checkpoint", str(tmp_path), "--prompt", "The meaning of life is", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The meaning of life is")
    prompt_ids = trained_tokenizer.encode("The meaning of life is", bos=True)
    expected = generate(model.eval(), [prompt_ids], 5, eos_id=trained_tokenizer.eos_id)
    text = trained_tokenizer.decode(prompt_ids + expected.tokens[0])
    assert out.splitlines()[0].startswith(text)


def test_vocab_limit_keeps_padded_ids_out():
    model = make_model(init_std=0.2).eval()
    free = generate(model, PROMPTS, 10).tokens
    top = max(max(t) for t in free)
    limited = generate(model, PROMPTS, 10, vocab_limit=top).tokens
    assert all(i < top for t in limited for i in t)


def test_module_cli_runs_without_import_warnings():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "llama_mini.generate", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--checkpoint" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr, proc.stderr
