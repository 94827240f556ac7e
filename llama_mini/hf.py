"""Conversion between llama-mini (Meta layout) and Hugging Face ``LlamaForCausalLM``.

Names map one to one (``layers.N.attention.wq`` <-> ``model.layers.N.self_attn.q_proj`` ...).
The one real difference is RoPE: Meta rotates adjacent pairs (x[2i], x[2i+1]); Hugging Face
rotates halves (x[i], x[i + D/2]). The rows of wq and wk are permuted so that both layouts
compute identical attention scores:

    meta -> hf:  W.view(H, D/2, 2, C).transpose(1, 2).reshape(H*D, C)
    hf -> meta:  W.view(H, 2, D/2, C).transpose(1, 2).reshape(H*D, C)

(H is n_heads for wq and n_kv_heads for wk.) The state-dict conversions are plain tensor work.
``hf_config_dict`` targets transformers >= 5, whose ``LlamaConfig`` takes RoPE settings as
``rope_parameters``; ``args_from_hf_config`` also reads the older ``rope_theta``/``rope_scaling``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .config import ModelArgs, RopeScaling, ffn_hidden_dim

__all__ = [
    "meta_to_hf_state_dict",
    "hf_to_meta_state_dict",
    "hf_config_dict",
    "args_from_hf_config",
]

_LAYER_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_features, in_features = w.shape
    return w.view(n_heads, out_features // n_heads // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def _permute_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_features, in_features = w.shape
    return w.view(n_heads, 2, out_features // n_heads // 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def meta_to_hf_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """A llama-mini / Meta state dict as a ``LlamaForCausalLM`` state dict."""
    out = {}
    for name, tensor in state_dict.items():
        if name == "rope.freqs":
            continue
        if name in _TOP_MAP:
            out[_TOP_MAP[name]] = tensor
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if not m or m.group(2) not in _LAYER_MAP:
            raise KeyError(f"no Hugging Face name for tensor {name!r}")
        layer, rest = m.groups()
        if rest == "attention.wq.weight":
            tensor = _permute_to_hf(tensor, args.n_heads)
        elif rest == "attention.wk.weight":
            tensor = _permute_to_hf(tensor, args.n_kv_heads)
        out[f"model.layers.{layer}.{_LAYER_MAP[rest]}"] = tensor
    return out


def hf_to_meta_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """A ``LlamaForCausalLM`` state dict as a llama-mini / Meta state dict. Tied embeddings
    (no ``lm_head.weight``) are untied by copying the embedding table."""
    top = {v: k for k, v in _TOP_MAP.items()}
    layer_map = {v: k for k, v in _LAYER_MAP.items()}
    out = {}
    for name, tensor in state_dict.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name in top:
            out[top[name]] = tensor
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if not m or m.group(2) not in layer_map:
            raise KeyError(f"no llama-mini name for Hugging Face tensor {name!r}")
        layer, rest = m.groups()
        if rest == "self_attn.q_proj.weight":
            tensor = _permute_to_meta(tensor, args.n_heads)
        elif rest == "self_attn.k_proj.weight":
            tensor = _permute_to_meta(tensor, args.n_kv_heads)
        out[f"layers.{layer}.{layer_map[rest]}"] = tensor
    if "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    return out


def _rope_parameters(args: ModelArgs) -> dict[str, Any]:
    s = args.rope_scaling
    params: dict[str, Any] = {"rope_theta": float(args.rope_theta)}
    if s.type == "none":
        params["rope_type"] = "default"
    elif s.type == "linear":
        params.update(rope_type="linear", factor=float(s.factor))
    elif s.type == "llama3":
        params.update(
            rope_type="llama3",
            factor=float(s.factor),
            low_freq_factor=float(s.low_freq_factor),
            high_freq_factor=float(s.high_freq_factor),
            original_max_position_embeddings=int(s.original_max_seq_len),
        )
    else:
        raise ValueError(f"RoPE scaling {s.type!r} has no Hugging Face equivalent (it would use 'dynamic')")
    return params


def hf_config_dict(args: ModelArgs) -> dict[str, Any]:
    """Keyword arguments for ``transformers.LlamaConfig`` describing the same model."""
    return dict(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim,
        rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_seq_len,
        rope_parameters=_rope_parameters(args),
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )


def args_from_hf_config(config: Any, **overrides: Any) -> ModelArgs:
    """ModelArgs for a ``LlamaConfig`` (or its dict). ``multiple_of`` and
    ``ffn_dim_multiplier`` are chosen so that Meta's rule gives the same intermediate size."""
    c = config if isinstance(config, dict) else config.to_dict()
    dim, hidden = int(c["hidden_size"]), int(c["intermediate_size"])
    n_heads = int(c["num_attention_heads"])
    if c.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"head_dim {c['head_dim']} != hidden_size / num_attention_heads; not a LLaMA shape")
    rope = c.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
    scaling = rope if rope.get("rope_type") not in (None, "default") else (c.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        rope_scaling = RopeScaling()
    elif kind == "linear":
        rope_scaling = RopeScaling(type="linear", factor=float(scaling["factor"]))
    elif kind == "llama3":
        rope_scaling = RopeScaling(
            type="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_seq_len=int(scaling["original_max_position_embeddings"]),
        )
    else:
        raise ValueError(f"Hugging Face rope type {kind!r} is not supported")
    # Prefer a plain multiple_of that reproduces the size under Meta's rule; otherwise use
    # multiple_of = 1 and a multiplier m with int(m * int(8 dim / 3)) == intermediate_size
    # (the +0.5 keeps float rounding from landing one below).
    base = int(2 * (4 * dim) / 3)
    multiple_of, multiplier = 1, (hidden + 0.5) / base
    for candidate in (1024, 512, 256, 128, 64, 32, 16, 8):
        if ffn_hidden_dim(dim, candidate, None) == hidden:
            multiple_of, multiplier = candidate, None
            break
    values = dict(
        dim=dim,
        n_layers=int(c["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
        vocab_size=int(c["vocab_size"]),
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=float(c["rms_norm_eps"]),
        rope_theta=rope_theta,
        max_seq_len=int(c.get("max_position_embeddings", 2048)),
        rope_scaling=rope_scaling,
    )
    values.update(overrides)
    args = ModelArgs(**values)
    if args.hidden_dim != hidden:
        raise ValueError(f"cannot express intermediate_size={hidden} with Meta's hidden-size rule (got {args.hidden_dim})")
    return args
