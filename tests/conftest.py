"""Shared fixtures. Tests run on CPU; Triton kernels run under its interpreter, which must be
switched on before triton is imported.

Tests see the project as an installed user does. ``python -m pytest`` puts the working directory
(the checkout root) first on ``sys.path``, and pytest-xdist adds it to ``PYTHONPATH`` for every
process a test starts; from there the folders ``kernels/`` and ``data/`` would be importable as
bare ``kernels`` and ``data``, and transformers' ``import kernels`` (Hugging Face's package) would
load ours. So the root comes off both before anything else is imported: the project is imported
by its installed names only (``llama_mini``, ``llama_mini.kernels``, ``llama_mini.data``), and a
test that still used a bare name would fail here as it would for a user.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _not_root(entry: str) -> bool:
    return os.path.realpath(entry or os.curdir) != os.path.realpath(ROOT)


sys.path[:] = [p for p in sys.path if _not_root(p)]
if "PYTHONPATH" in os.environ:
    _kept = [p for p in os.environ["PYTHONPATH"].split(os.pathsep) if p and _not_root(p)]
    if _kept:
        os.environ["PYTHONPATH"] = os.pathsep.join(_kept)
    else:
        del os.environ["PYTHONPATH"]

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from llama_mini import ModelArgs, Transformer

# Under pytest-xdist every worker would start torch's default thread count (one per core), so
# two workers on two cores would run four threads, and a thread waiting for a busy core makes
# a step several times slower (bench/experiment.py: device_arguments). One core's share each.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def tiny_args(**overrides) -> ModelArgs:
    """A small GQA model: 4 query heads over 2 kv heads, head_dim 16, non-default theta."""
    values = dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
        max_seq_len=64, max_batch_size=8, rope_theta=50000.0,
    )
    values.update(overrides)
    return ModelArgs(**values)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_args(**overrides)).to(dtype)


def check_kernel_result(name: str, got, want, dtype: torch.dtype, baseline=None) -> None:
    """A kernel's output or gradient against a float64 reference ``want``. fp32: 1e-5 relative
    and absolute. fp16/bf16: the flash-attention rule, error at most twice the error PyTorch
    makes in the same dtype (``baseline``, computed by PyTorch from the same rounded inputs)
    plus 1e-6. NaN anywhere fails (``poisoned_outputs`` fills unwritten elements with NaN)."""
    assert got is not None, f"{name}: no gradient"
    got, want = got.double(), want.double()
    assert not torch.isnan(got).any(), f"{name}: NaN in the kernel's result (an unwritten element?)"
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    else:
        err = (got - want).abs().max().item()
        base = (baseline.double() - want).abs().max().item()
        assert err <= 2 * base + 1e-6, f"{name}: error {err:.3g} > 2 x PyTorch {dtype} error {base:.3g}"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def synthetic_corpus(n_docs: int = 200, seed: int = 0) -> list[str]:
    """Deterministic English-like documents with numbers and punctuation."""
    import random

    rng = random.Random(seed)
    words = (
        "the meaning of life is a question that people ask when they train small language models "
        "and study how data length padding packing changes what each model learns from text"
    ).split()
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(1, 6)):
            s = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
            if rng.random() < 0.3:
                s += f" in {rng.randint(1900, 2030)}"
            sentences.append(s.capitalize() + rng.choice([".", "!", "?"]))
        docs.append(" ".join(sentences) + ("\n" if rng.random() < 0.5 else ""))
    return docs


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory):
    from llama_mini import train_tokenizer

    prefix = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(synthetic_corpus(), prefix, vocab_size=400)


@pytest.fixture(scope="session")
def train_data(tmp_path_factory, trained_tokenizer):
    """A tiny Pile-format corpus for trainer tests: train/ (two .jsonl.zst shards of synthetic
    English), val/ (one shard) and the session tokenizer (vocab 400). Returns an object with
    ``train``, ``val``, ``tokenizer`` paths and ``overrides(tmp_path, *extra)``: command-line
    options for a seconds-long run of a small model on it."""
    from types import SimpleNamespace

    from shards import write_shard

    root = tmp_path_factory.mktemp("train_data")
    docs = synthetic_corpus(n_docs=400, seed=1)
    os.makedirs(root / "train")
    os.makedirs(root / "val")
    for s in range(2):
        write_shard(root / "train" / f"{s:02d}.jsonl.zst", [{"text": t} for t in docs[s * 180:(s + 1) * 180]])
    write_shard(root / "val" / "00.jsonl.zst", [{"text": t} for t in docs[360:]])
    data = SimpleNamespace(train=str(root / "train"), val=str(root / "val"), tokenizer=trained_tokenizer.model_path)

    def overrides(tmp_path, *extra):
        return [
            "--data.train", data.train, "--data.val", data.val, "--data.tokenizer", data.tokenizer,
            "--model.max_seq_len", "32", "--model.attn_backend", "eager", "--data.batch_size", "4",
            "--schedule.steps", "6", "--run.out_dir", str(tmp_path), "--run.eval_batches", "2",
            "--run.eval_interval", "0", "--logging.log_interval", "1", "--logging.plot", "false",
            "--run.sample_tokens", "4", "--logging.progress", "false", *map(str, extra),
        ]

    data.overrides = overrides
    return data
