"""Model parallelism: state-dict sharding arithmetic, and a real two-process run under
``torchrun --nproc_per_node=2`` (gloo, CPU) that must reproduce single-process logits, loss and
gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_model
from llama_mini import load_meta_checkpoint, merge_state_dicts, shard_state_dict
from llama_mini.parallel import model_parallel_is_initialized, model_parallel_size, shard_dim

HERE = os.path.dirname(os.path.abspath(__file__))


def test_shard_dims_follow_meta_layout():
    assert shard_dim("tok_embeddings.weight") == 1
    assert shard_dim("layers.3.attention.wq.weight") == 0
    assert shard_dim("layers.3.attention.wo.weight") == 1
    assert shard_dim("layers.0.feed_forward.w1.weight") == 0
    assert shard_dim("layers.0.feed_forward.w2.weight") == 1
    assert shard_dim("output.weight") == 0
    assert shard_dim("layers.0.attention_norm.weight") is None
    assert shard_dim("norm.weight") is None


def test_shard_then_merge_is_identity():
    full = make_model(vocab_size=98).state_dict()
    shards = [shard_state_dict(full, r, 2) for r in range(2)]
    assert shards[0]["layers.0.attention.wq.weight"].shape == (32, 64)
    assert shards[1]["layers.0.attention.wo.weight"].shape == (64, 32)
    merged = merge_state_dicts(shards)
    for k in full:
        assert torch.equal(merged[k], full[k]), k
    with pytest.raises(ValueError, match="output.weight: dim 0 of shape \\(97, 64\\) is not divisible"):
        shard_state_dict(make_model().state_dict(), 0, 2)
    del shards[1]["norm.weight"]
    with pytest.raises(ValueError, match="shard 1 has different tensors"):
        merge_state_dicts(shards)


def test_merge_reads_llama3_vocab_parallel_embeddings_and_checks_replicas():
    full = make_model(vocab_size=98).state_dict()
    shards = [shard_state_dict(full, r, 2) for r in range(2)]
    for r in range(2):  # Llama 3 splits the embedding table on the vocabulary, not the width
        shards[r]["tok_embeddings.weight"] = full["tok_embeddings.weight"].chunk(2, dim=0)[r]
    assert torch.equal(merge_state_dicts(shards)["tok_embeddings.weight"], full["tok_embeddings.weight"])
    shards[1]["norm.weight"] = shards[1]["norm.weight"] + 1
    with pytest.raises(ValueError, match="norm.weight: replicated tensor differs between shard 0 and shard 1"):
        merge_state_dicts(shards)
    shards = [shard_state_dict(full, r, 2) for r in range(2)]
    shards[1]["layers.0.attention.wq.weight"] = torch.zeros(32, 3)
    with pytest.raises(ValueError, match=r"layers.0.attention.wq.weight: shards of shapes \[\(32, 64\), \(32, 3\)\]"):
        merge_state_dicts(shards)


def test_single_process_needs_no_distributed_setup():
    assert not model_parallel_is_initialized()
    assert model_parallel_size() == 1
    model = make_model()
    assert isinstance(model.layers[0].attention.wq, torch.nn.Linear)


@pytest.mark.distributed
def test_model_parallel_2_matches_single_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "mp_worker.py"), str(tmp_path)]
    for _attempt in range(2):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        # --standalone picks a free port, which another process can take before the
        # rendezvous binds it; that (and only that) is worth one retry
        if proc.returncode == 0 or "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["ok"]
    assert result["max_abs_diff"]["logits"] < 1e-5
    assert set(result["errors"]) == {"n_kv_heads=1", "vocab_size=97"}
    # the two-shard checkpoint written by the parallel run loads into one process
    model = load_meta_checkpoint(tmp_path / "ckpt", max_seq_len=64, attn_backend="eager")
    assert model.mp_size == 1
    tokens = torch.load(tmp_path / "tokens.pt", weights_only=True)
    expected = torch.load(tmp_path / "logits_ref.pt", weights_only=True)
    torch.testing.assert_close(model(tokens), expected, rtol=0, atol=0)
