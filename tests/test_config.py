"""ModelArgs: validation, presets, Meta's hidden-size rule, params.json, parameter counts."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, strategies as st

from llama_mini import PRESETS, ModelArgs, RopeScaling, Transformer, count_params
from llama_mini.config import ffn_hidden_dim


# Published parameter counts (Meta's model cards / the TinyLlama release).
@pytest.mark.parametrize(
    "name, expected",
    [("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320), ("tinyllama-1.1b", 1_100_048_384)],
)
def test_published_shapes_have_published_parameter_counts(name, expected):
    args = ModelArgs.preset(name)
    assert count_params(args) == expected
    with torch.device("meta"):  # instantiate without allocating memory
        model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_published_hidden_sizes():
    assert ModelArgs.preset("llama2-7b").hidden_dim == 11008
    assert ModelArgs.preset("llama2-13b").hidden_dim == 13824
    assert ModelArgs.preset("tinyllama-1.1b").hidden_dim == 5632
    # Llama 3 8B: multiple_of 1024, ffn_dim_multiplier 1.3 -> 14336
    assert ffn_hidden_dim(4096, 1024, 1.3) == 14336


def test_homework_preset_matches_the_homework():
    a = ModelArgs.preset("homework")
    assert (a.dim, a.n_layers, a.n_heads, a.max_seq_len) == (512, 8, 8, 256)


@given(dim=st.integers(1, 4096), multiple_of=st.sampled_from([1, 8, 32, 256]))
def test_hidden_rule_rounds_up_to_multiple(dim, multiple_of):
    h = ffn_hidden_dim(dim, multiple_of, None)
    assert h % multiple_of == 0
    assert int(8 * dim / 3) <= h < int(8 * dim / 3) + multiple_of


def test_every_preset_is_valid_and_overridable():
    for name in PRESETS:
        assert ModelArgs.preset(name).dim > 0
    assert ModelArgs.preset("debug", n_layers=3).n_layers == 3
    with pytest.raises(KeyError, match="unknown ModelArgs preset 'nope'"):
        ModelArgs.preset("nope")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=65, n_heads=4), r"dim \(65\) must be divisible by n_heads \(4\)"),
        (dict(n_heads=6, n_kv_heads=4, dim=96), r"n_heads \(6\) must be divisible by n_kv_heads \(4\)"),
        (dict(dim=12, n_heads=4, n_kv_heads=4), "head_dim .* must be even"),
        (dict(norm_eps=0.0), "norm_eps must be > 0"),
        (dict(n_layers=0), "n_layers must be a positive integer"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(rope_scaling=dict(type="yarn")), "rope_scaling.type must be one of"),
        (dict(rope_scaling=dict(type="linear", factor=0.5)), "factor must be >= 1"),
    ],
)
def test_impossible_configs_raise_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs(**kwargs)


def test_unknown_backend_or_impl_fails_at_construction():
    with pytest.raises(ValueError, match="unknown attention backend 'flashy'"):
        Transformer(ModelArgs.preset("debug", attn_backend="flashy"))
    with pytest.raises(ValueError, match="norm_impl='cuda-magic'"):
        Transformer(ModelArgs.preset("debug", norm_impl="cuda-magic"))


def test_from_params_json_reads_meta_files(tmp_path):
    # LLaMA-2 7B's params.json, verbatim (vocab_size -1 means "from the tokenizer/weights")
    p = tmp_path / "params.json"
    p.write_text('{"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}')
    args = ModelArgs.from_params_json(p, max_seq_len=4096)
    assert (args.dim, args.n_layers, args.n_kv_heads, args.vocab_size, args.max_seq_len) == (4096, 32, 32, -1, 4096)
    assert args.hidden_dim == 11008
    # Llama 3.1 8B's params.json, with use_scaled_rope
    p.write_text(json.dumps({
        "dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
        "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256,
    }))
    args = ModelArgs.from_params_json(p)
    assert args.rope_scaling == RopeScaling(type="llama3", factor=8.0)
    assert args.hidden_dim == 14336 and args.n_kv_heads == 8
    assert args.meta_params()["use_scaled_rope"] is True


def test_from_params_json_errors_name_the_file_and_key(tmp_path):
    p = tmp_path / "params.json"
    with pytest.raises(FileNotFoundError, match="params.json not found"):
        ModelArgs.from_params_json(p)
    p.write_text('{"dim": 64,')
    with pytest.raises(ValueError, match=r"params\.json: not valid JSON"):
        ModelArgs.from_params_json(p)
    p.write_text('{"dim": 64, "n_heads": 4, "moe_experts": 8}')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['moe_experts'\]"):
        ModelArgs.from_params_json(p)
    p.write_text('{"dim": 66, "n_heads": 4}')
    with pytest.raises(ValueError, match=r"params\.json: .*divisible by n_heads"):
        ModelArgs.from_params_json(p)


def test_dict_round_trip():
    args = ModelArgs.preset("debug", rope_scaling=RopeScaling(type="linear", factor=4.0))
    again = ModelArgs.from_dict(args.to_dict())
    assert again == args
    with pytest.raises(ValueError, match=r"unknown ModelArgs field\(s\) \['bogus'\]"):
        ModelArgs.from_dict({**args.to_dict(), "bogus": 1})
