"""Parity with Hugging Face ``LlamaForCausalLM`` on the same random weights, both directions,
with grouped-query attention and a non-default rope_theta (and RoPE scaling)."""

from __future__ import annotations

import pytest
import torch

import transformers  # noqa: F401  (a dev requirement: parity must never skip silently)
from conftest import make_model, tiny_args
from llama_mini import (
    RopeScaling,
    Transformer,
    args_from_hf_config,
    hf_config_dict,
    hf_to_meta_state_dict,
    meta_to_hf_state_dict,
)


def _hf_model(args, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**hf_config_dict(args), attn_implementation="eager")
    return _randomise_norms(LlamaForCausalLM(config).float().eval())


def _randomise_norms(model):
    """Norm weights start at ones; perturb them so the name map of norms is really tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _ours_from_hf(args):
    """A random HF model and our model loaded from it through the conversion."""
    hf = _hf_model(args)
    ours = Transformer(args).eval()
    ours.load_state_dict(hf_to_meta_state_dict(hf.state_dict(), args))
    return ours, hf


def _batch(vocab, B=2, T=23, seed=5):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    labels = tokens.clone()
    labels[1, 3:7] = -100  # ignored label positions
    # our targets are already shifted: target[t] = label[t + 1]; the last position counts nothing
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    return tokens, labels, targets


def _compare(ours: Transformer, hf, args):
    tokens, labels, targets = _batch(args.vocab_size)
    with torch.no_grad():
        hf_out = hf(input_ids=tokens, labels=labels)
        logits = ours(tokens)
        loss = ours(tokens, targets)
    # Same fp32 math in a different order: differences are a few ulps of O(1) values.
    torch.testing.assert_close(logits, hf_out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, hf_out.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_hf_to_ours_same_logits_and_loss(backend):
    args = tiny_args(attn_backend=backend)
    _compare(*_ours_from_hf(args), args)


def test_ours_to_hf_same_logits_and_loss():
    ours = _randomise_norms(make_model().eval())
    args = ours.args
    hf = _hf_model(args, seed=123)
    missing, unexpected = hf.load_state_dict(meta_to_hf_state_dict(ours.state_dict(), args), strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    _compare(ours, hf, args)


@pytest.mark.parametrize(
    "scaling", [RopeScaling(type="linear", factor=2.0), RopeScaling(type="llama3", factor=4.0, original_max_seq_len=32)]
)
def test_rope_scaling_parity(scaling):
    args = tiny_args(rope_scaling=scaling)
    _compare(*_ours_from_hf(args), args)


def test_round_trip_state_dict_is_exact():
    ours = make_model()
    sd = ours.state_dict()
    back = hf_to_meta_state_dict(meta_to_hf_state_dict(sd, ours.args), ours.args)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_config_round_trip():
    from transformers import LlamaConfig

    for args in (tiny_args(), tiny_args(multiple_of=256), tiny_args(ffn_dim_multiplier=1.3, multiple_of=7)):
        again = args_from_hf_config(LlamaConfig(**hf_config_dict(args)), max_seq_len=args.max_seq_len)
        assert again.hidden_dim == args.hidden_dim
        assert (again.dim, again.n_heads, again.n_kv_heads, again.rope_theta, again.norm_eps) == (
            args.dim, args.n_heads, args.n_kv_heads, args.rope_theta, args.norm_eps,
        )


def test_tied_embeddings_are_untied_and_unknown_names_rejected():
    args = tiny_args()
    sd = meta_to_hf_state_dict(make_model().state_dict(), args)
    del sd["lm_head.weight"]
    ours = hf_to_meta_state_dict(sd, args)
    assert torch.equal(ours["output.weight"], ours["tok_embeddings.weight"])
    sd["model.layers.0.mlp.experts.0.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="model.layers.0.mlp.experts.0.weight"):
        hf_to_meta_state_dict(sd, args)


def test_gradients_match_hugging_face():
    """Every parameter's gradient equals the Hugging Face model's, mapped through the same
    conversion (linear in the weights, so it maps gradients too): an independent check of the
    backward of our block (the fused residual add into ffn_norm, the norms, rotary, the loss),
    which the fp32-vs-float64 tests of our own model cannot give. fp32 with summation order as
    the only difference: 1e-4 relative to each tensor's largest entry."""
    args = tiny_args()
    ours, hf = _ours_from_hf(args)
    tokens, labels, targets = _batch(args.vocab_size)
    hf(input_ids=tokens, labels=labels).loss.backward()
    ours(tokens, targets).backward()
    hf_grads = hf_to_meta_state_dict({n: p.grad for n, p in hf.named_parameters()}, args)
    for name, p in ours.named_parameters():
        want = hf_grads[name]
        assert (p.grad - want).abs().max() <= 1e-4 * want.abs().max(), name
