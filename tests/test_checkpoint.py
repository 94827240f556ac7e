"""Meta-format checkpoints: round trip, multi-shard merge, Meta's extra key, shape errors,
corrupt files, atomic writes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import make_model
from llama_mini import (
    CheckpointMismatchError,
    ModelArgs,
    RopeScaling,
    Transformer,
    load_meta_checkpoint,
    save_meta_checkpoint,
    shard_state_dict,
)
from llama_mini.checkpoint import atomic_torch_save


def test_meta_round_trip_gives_identical_outputs(tmp_path):
    model = make_model(rope_scaling=RopeScaling(type="linear", factor=2.0), attn_backend="eager")
    save_meta_checkpoint(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["consolidated.00.pth", "llama_mini.json", "params.json"]
    params = json.loads((tmp_path / "params.json").read_text())
    # only keys Meta's own ModelArgs accepts, so Meta's code can load the directory
    assert set(params) <= {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                           "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope"}
    loaded = load_meta_checkpoint(tmp_path)
    assert loaded.args == model.args
    tokens = torch.randint(0, 97, (2, 19))
    assert torch.equal(loaded(tokens), model(tokens))


def test_plain_load_state_dict_of_a_meta_file_with_rope_freqs(tmp_path):
    model = make_model()
    sd = model.state_dict()
    # LLaMA-1/2 consolidated files carry the RoPE inverse frequencies as "rope.freqs" (bf16)
    sd["rope.freqs"] = model.rope.freqs.to(torch.bfloat16)
    torch.save(sd, tmp_path / "consolidated.00.pth")
    other = make_model(seed=1)
    other.load_state_dict(torch.load(tmp_path / "consolidated.00.pth", weights_only=True))
    assert torch.equal(other.output.weight, model.output.weight)
    sd["rope.freqs"] = sd["rope.freqs"] * 2
    with pytest.raises(ValueError, match="rope.freqs"):
        other.load_state_dict(sd)


def test_meta_vocab_minus_one_is_read_from_the_weights(tmp_path):
    model = make_model()
    save_meta_checkpoint(model, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    params["vocab_size"] = -1
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert load_meta_checkpoint(tmp_path).args.vocab_size == 97


def test_two_shard_checkpoint_loads_into_one_process(tmp_path):
    model = make_model(vocab_size=98)  # the vocabulary is split across ranks: must divide
    full = model.state_dict()
    for rank in range(2):
        torch.save(shard_state_dict(full, rank, 2), tmp_path / f"consolidated.{rank:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps(model.args.meta_params()))
    loaded = load_meta_checkpoint(tmp_path, max_seq_len=64)
    for k, v in full.items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = make_model(seed=1).state_dict()  # every other tensor differs from the model's
    sd["layers.1.feed_forward.w3.weight"] = torch.zeros(7, 64)
    with pytest.raises(CheckpointMismatchError, match=r"layers\.1\.feed_forward\.w3\.weight: checkpoint has shape \(7, 64\), model expects \(176, 64\)"):
        model.load_state_dict(sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was copied before the check failed"
    sd = model.state_dict()
    del sd["norm.weight"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match=r"missing tensors: \['norm.weight'\][\s\S]*unexpected tensors: \['extra.weight'\]"):
        model.load_state_dict(sd)


def test_checkpoint_for_a_different_shape_is_refused(tmp_path):
    save_meta_checkpoint(make_model(), tmp_path)
    with pytest.raises(CheckpointMismatchError, match="tok_embeddings.weight: checkpoint has shape"):
        load_meta_checkpoint(tmp_path, dim=128, n_heads=8, n_kv_heads=4)


def test_missing_and_corrupt_checkpoints_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found: .*nowhere"):
        load_meta_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no consolidated.NN.pth shard"):
        load_meta_checkpoint(tmp_path)
    save_meta_checkpoint(make_model(), tmp_path)
    path = tmp_path / "consolidated.00.pth"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a download or a save cut short
    with pytest.raises(ValueError, match=r"cannot load checkpoint shard .*consolidated\.00\.pth"):
        load_meta_checkpoint(tmp_path)


def test_weights_only_refuses_arbitrary_pickles(tmp_path):
    save_meta_checkpoint(make_model(), tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"tok_embeddings.weight": Evil()}, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match="cannot load checkpoint shard"):
        load_meta_checkpoint(tmp_path)


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = make_model()
    save_meta_checkpoint(model, tmp_path)
    good = (tmp_path / "consolidated.00.pth").read_bytes()

    def dies_midway(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save(make_model(seed=9).state_dict(), tmp_path / "consolidated.00.pth")
    monkeypatch.undo()
    assert (tmp_path / "consolidated.00.pth").read_bytes() == good
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert torch.equal(load_meta_checkpoint(tmp_path).output.weight, model.output.weight)


def test_vocab_minus_one_model_cannot_be_built_blind():
    with pytest.raises(ValueError, match="vocab_size is -1"):
        Transformer(ModelArgs.preset("debug", vocab_size=-1))


def test_meta_llama2_checkpoint_loads_with_rope_scaling_added(tmp_path):
    model = make_model()
    sd = model.state_dict()
    sd["rope.freqs"] = model.rope.freqs.to(torch.bfloat16)  # frequencies it was trained with
    scaled = make_model(seed=1, rope_scaling=RopeScaling(type="linear", factor=2.0))
    scaled.load_state_dict(sd)  # the file's unscaled frequencies are consistent with the args
    assert torch.equal(scaled.output.weight, model.output.weight)


def test_params_json_is_what_llama2_code_accepts():
    # Meta's LLaMA-2 7B params.json has exactly these keys (vocab_size -1 there, from the tokenizer)
    assert ModelArgs.preset("llama2-7b").meta_params() == {
        "dim": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": 32000, "multiple_of": 256, "norm_eps": 1e-05,
    }
    gqa = ModelArgs.preset("tinyllama-1.1b", rope_theta=500000.0).meta_params()
    assert gqa["n_kv_heads"] == 4 and gqa["rope_theta"] == 500000.0


def test_load_builds_no_random_weights_and_honours_dtype_and_device(tmp_path, monkeypatch):
    model = make_model()
    save_meta_checkpoint(model.to(torch.bfloat16), tmp_path)  # weights stored in bf16, as Meta's
    devices = []
    real_normal = torch.nn.init.normal_
    def spy(*a, **k):
        devices.append((a[0] if a else k["tensor"]).device.type)
        return real_normal(*a, **k)

    monkeypatch.setattr(torch.nn.init, "normal_", spy)
    kept = load_meta_checkpoint(tmp_path, dtype=None)
    # built on the meta device: initialising weights about to be replaced costs no memory or time
    assert devices and set(devices) == {"meta"}
    assert kept.output.weight.dtype == torch.bfloat16 and kept.output.weight.device.type == "cpu"
    assert torch.equal(kept.output.weight, model.output.weight)
    fp32 = load_meta_checkpoint(tmp_path)
    assert fp32.output.weight.dtype == torch.float32 and fp32.output.weight.requires_grad
    assert not any(p.is_meta for p in fp32.parameters())
    monkeypatch.undo()
    partial = load_meta_checkpoint(tmp_path, strict=False)
    assert torch.equal(partial.output.weight.bfloat16(), model.output.weight)
