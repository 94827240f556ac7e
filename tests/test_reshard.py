"""llama_mini.reshard: merge / split Meta checkpoints (round trips bitwise, the expected slices
in each shard, the trainer's `latest` indirection, every refusal writing nothing, the CLI)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import make_model
from llama_mini import load_meta_checkpoint, save_meta_checkpoint
from llama_mini.parallel import shard_state_dict
from llama_mini.reshard import main, reshard_checkpoint



def _load(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _shards(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("consolidated."))


@pytest.fixture
def saved(tmp_path):
    """A single-shard checkpoint of a model whose sharded dims divide 2 and 4."""
    model = make_model(vocab_size=96).eval()
    src = tmp_path / "mp1"
    save_meta_checkpoint(model, src)
    (src / "tokenizer.model").write_bytes(b"\x00sentencepiece bytes\xff")
    return model, src


def test_split_and_merge_round_trip_is_bitwise(saved, tmp_path):
    model, src = saved
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lines = []
    d2, d4, d1 = tmp_path / "mp2", tmp_path / "mp4", tmp_path / "back1"

    written = reshard_checkpoint(src, d2, 2, progress=lines.append)
    assert written[:2] == [str(d2 / "consolidated.00.pth"), str(d2 / "consolidated.01.pth")]
    assert _shards(d2) == ["consolidated.00.pth", "consolidated.01.pth"]
    assert sum(ln.startswith("read") and "consolidated.00.pth" in ln and "21 tensors" in ln for ln in lines) == 1
    assert sum(ln.startswith("wrote") and "MiB" in ln for ln in lines) == 2

    s0, s1 = _load(d2 / "consolidated.00.pth"), _load(d2 / "consolidated.01.pth")
    wq = original["layers.0.attention.wq.weight"]
    assert s0["layers.0.attention.wq.weight"].shape == (wq.shape[0] // 2, wq.shape[1])
    assert torch.equal(s0["layers.0.attention.wq.weight"], wq[: wq.shape[0] // 2])
    assert torch.equal(s1["layers.0.attention.wq.weight"], wq[wq.shape[0] // 2:])
    wo = original["layers.1.attention.wo.weight"]
    assert torch.equal(s1["layers.1.attention.wo.weight"], wo[:, wo.shape[1] // 2:])
    w2 = original["layers.0.feed_forward.w2.weight"]
    assert torch.equal(s0["layers.0.feed_forward.w2.weight"], w2[:, : w2.shape[1] // 2])
    emb = original["tok_embeddings.weight"]  # this library's (and LLaMA 1/2's) layout: model dim
    assert torch.equal(s1["tok_embeddings.weight"], emb[:, emb.shape[1] // 2:])
    out = original["output.weight"]
    assert torch.equal(s1["output.weight"], out[out.shape[0] // 2:])
    for s in (s0, s1):
        assert torch.equal(s["norm.weight"], original["norm.weight"])
        assert torch.equal(s["layers.1.ffn_norm.weight"], original["layers.1.ffn_norm.weight"])

    reshard_checkpoint(d2, d4, 4, progress=None)
    assert _shards(d4) == [f"consolidated.{r:02d}.pth" for r in range(4)]
    s3 = _load(d4 / "consolidated.03.pth")
    assert torch.equal(s3["layers.0.attention.wk.weight"], original["layers.0.attention.wk.weight"].chunk(4, 0)[3])
    reshard_checkpoint(d4, d1, 1, progress=None)
    assert _shards(d1) == ["consolidated.00.pth"]

    merged = _load(d1 / "consolidated.00.pth")
    assert merged.keys() == original.keys()
    for name, tensor in original.items():
        assert merged[name].dtype == tensor.dtype and torch.equal(merged[name], tensor), name

    tokens = torch.randint(0, 96, (2, 13))
    with torch.no_grad():
        expected = model(tokens)
        for d in (d2, d4, d1):
            assert (d / "params.json").read_bytes() == (src / "params.json").read_bytes()
            assert (d / "llama_mini.json").read_bytes() == (src / "llama_mini.json").read_bytes()
            assert (d / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
            loaded = load_meta_checkpoint(d)
            assert loaded.args == model.args
            assert torch.equal(loaded(tokens), expected), d


def test_tokenizer_is_optional(saved, tmp_path):
    _, src = saved
    os.unlink(src / "tokenizer.model")
    written = reshard_checkpoint(src, tmp_path / "out", 2, progress=None)
    assert sorted(os.listdir(tmp_path / "out")) == ["consolidated.00.pth", "consolidated.01.pth",
                                                    "llama_mini.json", "params.json"]
    assert len(written) == 4


def test_llama3_vocab_split_embedding_is_merged(saved, tmp_path):
    """Llama 3 splits tok_embeddings on the vocabulary; a merge must rebuild the table."""
    model, _ = saved
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    src = tmp_path / "llama3"
    src.mkdir()
    for r in range(2):
        shard = {}
        for name, t in full.items():
            if name == "tok_embeddings.weight":
                shard[name] = t.chunk(2, 0)[r].clone()
            else:
                shard[name] = shard_state_dict({name: t}, r, 2)[name]
        torch.save(shard, src / f"consolidated.{r:02d}.pth")
    reshard_checkpoint(src, tmp_path / "out", 1, progress=None)
    merged = _load(tmp_path / "out" / "consolidated.00.pth")
    assert torch.equal(merged["tok_embeddings.weight"], full["tok_embeddings.weight"])


def test_latest_indirection_and_trainer_files_are_left_out(saved, tmp_path):
    _, src = saved
    root = tmp_path / "run"
    step = root / "step-00000100"
    reshard_checkpoint(src, step, 2, progress=None)
    for name in ("optimizer.00.pt", "optimizer.01.pt", "data.00.pt", "rng.000.pt", "trainer.json"):
        (step / name).write_bytes(b"training state")
    (root / "step-00000050").mkdir()  # an older step the pointer does not name
    (root / "latest").write_text("step-00000100\n")

    lines = []
    dst = tmp_path / "out"
    reshard_checkpoint(root, dst, 1, progress=lines.append)
    assert sorted(os.listdir(dst)) == ["consolidated.00.pth", "llama_mini.json", "params.json", "tokenizer.model"]
    assert any("step-00000100" in ln and ln.startswith("read") for ln in lines)
    note = [ln for ln in lines if "not copied" in ln]
    assert len(note) == 1 and "optimizer.00.pt" in note[0] and "trainer.json" in note[0]
    assert torch.equal(_load(dst / "consolidated.00.pth")["output.weight"], _load(src / "consolidated.00.pth")["output.weight"])

    (root / "latest").write_text("step-00000200")
    with pytest.raises(FileNotFoundError, match="step-00000200"):
        reshard_checkpoint(root, tmp_path / "out2", 1, progress=None)
    (root / "latest").write_text("step-00000100")
    with pytest.raises(ValueError, match="source"):
        reshard_checkpoint(root, step, 1, progress=None, force=True)


@pytest.mark.parametrize("vocab, mp, tensor", [
    (97, 2, "output.weight"),
    (96, 3, "layers.0.attention.wk.weight"),  # n_kv_heads 2 x head_dim 16 = 32 rows
])
def test_non_divisible_split_names_the_tensor_and_writes_nothing(tmp_path, vocab, mp, tensor):
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_meta_checkpoint(make_model(vocab_size=vocab), src)
    with pytest.raises(ValueError) as info:
        reshard_checkpoint(src, dst, mp, progress=None)
    message = str(info.value)
    assert tensor in message and "dim 0" in message and f"not divisible by {mp}" in message
    assert "(97, 64)" in message if vocab == 97 else "(32, 64)" in message
    assert not dst.exists()


def test_mp_size_must_be_positive(saved, tmp_path):
    _, src = saved
    for bad in (0, -1):
        with pytest.raises(ValueError, match=">= 1"):
            reshard_checkpoint(src, tmp_path / "dst", bad, progress=None)
    assert not (tmp_path / "dst").exists()


def test_destination_is_source_is_refused(saved, tmp_path):
    _, src = saved
    before = {n: (src / n).read_bytes() for n in os.listdir(src)}
    with pytest.raises(ValueError, match="source"):
        reshard_checkpoint(src, src, 2, force=True, progress=None)
    os.symlink(src, tmp_path / "alias")
    with pytest.raises(ValueError, match="source"):
        reshard_checkpoint(src, tmp_path / "alias", 2, force=True, progress=None)
    assert {n: (src / n).read_bytes() for n in os.listdir(src)} == before


def test_existing_shards_need_force_and_stale_ranks_are_removed(saved, tmp_path):
    model, src = saved
    dst = tmp_path / "dst"
    reshard_checkpoint(src, dst, 4, progress=None)
    stamp = (dst / "consolidated.00.pth").read_bytes()
    with pytest.raises(ValueError, match="force"):
        reshard_checkpoint(src, dst, 2, progress=None)
    assert _shards(dst) == [f"consolidated.{r:02d}.pth" for r in range(4)]
    assert (dst / "consolidated.00.pth").read_bytes() == stamp

    reshard_checkpoint(src, dst, 2, force=True, progress=None)
    assert _shards(dst) == ["consolidated.00.pth", "consolidated.01.pth"]
    tokens = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        assert torch.equal(load_meta_checkpoint(dst)(tokens), model(tokens))


def test_truncated_shard_is_named(saved, tmp_path):
    _, src = saved
    d2 = tmp_path / "mp2"
    reshard_checkpoint(src, d2, 2, progress=None)
    shard = d2 / "consolidated.01.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="consolidated.01.pth"):
        reshard_checkpoint(d2, tmp_path / "out", 1, progress=None)
    assert not (tmp_path / "out").exists()


def test_missing_rank_is_named(saved, tmp_path):
    _, src = saved
    d3 = tmp_path / "gap"  # ranks 00 and 02 only
    reshard_checkpoint(src, d3, 4, progress=None)
    os.unlink(d3 / "consolidated.01.pth")
    os.unlink(d3 / "consolidated.03.pth")
    with pytest.raises(ValueError, match=r"not numbered 00\.\.01.*consolidated\.02\.pth"):
        reshard_checkpoint(d3, tmp_path / "out", 1, progress=None)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        reshard_checkpoint(tmp_path / "nowhere", tmp_path / "out", 1, progress=None)
    assert not (tmp_path / "out").exists()


def test_help_explains_every_option(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for option in ("SRC", "DST", "--mp", "--force", "--quiet", "latest"):
        assert option in text


def test_cli(saved, tmp_path):
    _, src = saved
    run = [sys.executable, "-m", "llama_mini", "reshard"]
    ok = subprocess.run(run + [str(src), str(tmp_path / "out"), "--mp", "2"],
                        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stdout and "consolidated.01.pth" in ok.stdout and "done" in ok.stdout
    assert _shards(tmp_path / "out") == ["consolidated.00.pth", "consolidated.01.pth"]
    bad = subprocess.run(run + [str(src), str(tmp_path / "out"), "--mp", "1"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 1  # an expected failure: one line naming the fix, no traceback
    assert bad.stderr.startswith("llama-mini reshard: error: ") and "--force" in bad.stderr
    assert bad.stderr.count("\n") == 1, bad.stderr
