"""bench/train_throughput.py: the quick run writes well-formed results (timings are not asserted:
speed is measured by the script, never by tests), and its plain PyTorch LLaMA is the same model
as ours (same parameters, same loss and gradients from the same weights), so the speed
comparison it makes is fair."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from llama_mini import ModelArgs, Transformer, attention_backends, count_params
from llama_mini import ops as llama_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "train_throughput.py")


@pytest.fixture(scope="module")
def tt():
    """The script as a module (it imports bench/common.py and bench/model_throughput.py)."""
    bench = os.path.join(ROOT, "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_results(tmp_path):
    env = dict(os.environ)
    # Triton's interpreter would run any later-registered kernel one program at a time; without
    # it a Triton backend that cannot run on CPU falls back (or is skipped) visibly instead.
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, SCRIPT, "--quick", "--device", "cpu", "--out", str(tmp_path), "--name", "quick"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "quick.json").read_text())
    meta, rows = data["metadata"], data["results"]
    assert meta["torch"] and meta["device_name"] and meta["date"] and meta["config"]["presets"] == ["debug"]

    train = [r for r in rows if r["kind"] == "train"]
    ran = {r["attn_backend"] for r in train if r["status"] == "ok"}
    assert {"eager", "sdpa", "plain-pytorch"} <= ran
    for r in train:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert r["reason"], r  # never skipped silently
            continue
        assert r["tokens_per_s"] > 0 and r["median_ms"] >= r["min_ms"] > 0 and r["tflops"] > 0
        assert r["peak_mem_mib"] is None and "not measured" in r["peak_mem_note"]
        assert r["n_params"] == count_params(ModelArgs.preset("debug"))
        assert abs(r["loss"] - math.log(512)) < 0.2  # a fresh model predicts ~uniformly over 512 tokens
        assert r["mfu"] is None  # no CPU peak
        # the other ceiling: the matmul rate measured at the start of the same run
        assert r["mfu_matmul"] == pytest.approx(r["tflops"] / meta["matmul_tflops"]) and "matmul" in meta["matmul_note"]
        if r["attn_backend"] != "plain-pytorch":
            assert r["op_resolutions"] and "?" not in r["op_resolutions"]
        # the step's two reads, plus our model's range checks of tokens and targets, plus the fused
        # loss kernel's target check when the fused ops are on
        expected = 2 if r["attn_backend"] == "plain-pytorch" else 4 + (r["fused"] == "on")
        assert r["host_syncs"] == expected, r
    triton = [r for r in train if r["attn_backend"] == "triton"]
    assert len(triton) == 4  # fused off/on x checkpointing off/on
    if "triton" not in attention_backends():
        assert all(r["status"] == "skipped" and "not registered" in r["reason"] for r in triton)
    if "triton" not in llama_ops.registered("rms_norm"):
        fused_on = [r for r in train if r["fused"] == "on"]
        assert fused_on and all(r["status"] == "skipped" and "triton" in r["reason"] for r in fused_on)

    (cmp,) = meta["comparison"]
    assert cmp["preset"] == "debug" and cmp["result"] in ("PASS", "MISS") and cmp["threshold"] == 0.97
    assert cmp["ratio"] == pytest.approx(cmp["ours_tokens_per_s"] / cmp["plain_tokens_per_s"])

    mb = {(r["attn_backend"], r["checkpointing"]): r for r in rows if r["kind"] == "max_batch"}
    assert "ESTIMATE" in meta["max_batch_method"] and "not an OOM search" in meta["max_batch_method"]
    for backend in ("eager", "sdpa"):
        off, on = mb[(backend, "off")], mb[(backend, "on")]
        for r in (off, on):
            assert r["status"] == "ok" and r["max_batch"] > 0 and r["per_sample_mib"] > 0, r
            assert "estimate" in r["max_batch_method"] and r["memory_budget_gib"] == 16.0
        assert on["per_sample_mib"] < off["per_sample_mib"]  # checkpointing saves activation memory
        assert on["max_batch"] > off["max_batch"]
        assert meta["checkpointing_lowers_per_sample_memory"][f"debug/{backend}"]["lower"] is True

    lines = [line for line in (tmp_path / "quick.csv").read_text().splitlines() if not line.startswith("#")]
    assert len(list(csv.DictReader(lines))) == len(rows)
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "quick.png").stat().st_size > 0
    assert "ours/plain-pytorch debug" in proc.stdout and "max batch" in proc.stdout


def test_plain_llama_is_our_model(tt):
    """Same parameter count, and the same loss and gradients when loaded with our weights (names
    mapped): the plain model is the same shape and math, so timing it against ours is fair."""
    # GQA (4 query heads over 2 kv heads), non-default theta; init_std 0.1 instead of 0.02 so that
    # attention is far from uniform and a wrong RoPE (e.g. rotating the other way) moves the loss
    # by ~1e-2, not ~1e-5 as at the default init.
    args = ModelArgs.preset("debug", max_seq_len=64, rope_theta=50000.0, init_std=0.1)
    torch.manual_seed(0)
    ours = Transformer(args)
    plain = tt.PlainLlama(args)
    assert tt.n_params(plain) == tt.n_params(ours) == count_params(args)
    plain.load_state_dict(tt.plain_state_dict(ours.state_dict()))  # strict: every name maps

    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, args.vocab_size, (3, 49), generator=gen)
    tokens, targets = data[:, :-1], data[:, 1:]
    loss_ours, loss_plain = ours(tokens, targets), plain(tokens, targets)
    # fp32 with the same kernels, up to RoPE's formulation (cos/sin vs complex multiply): a few
    # ulp at most (bit-identical on the development machine)
    torch.testing.assert_close(loss_plain, loss_ours, rtol=1e-6, atol=1e-6)
    loss_ours.backward()
    loss_plain.backward()
    grads_plain = {n: p.grad for n, p in plain.named_parameters()}
    for name, g in tt.plain_state_dict({n: p.grad for n, p in ours.named_parameters()}).items():
        torch.testing.assert_close(grads_plain[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_the_timed_step_is_the_trainers_step(tt):
    """TrainStep is train_step with the trainer's optimizer (two AdamW groups, decay on matrices
    only), default OptimConfig (lr, grad_clip) and precision: the same weights after two steps."""
    from llama_mini.training.config import OptimConfig
    from llama_mini.training.optim import build_optimizer
    from llama_mini.training.step import train_step

    args = ModelArgs.preset("debug", max_seq_len=64)
    cpu = torch.device("cpu")
    ours, ref = (tt.build(Transformer, args, cpu, 0) for _ in range(2))
    step = tt.TrainStep(ours, cpu, torch.float32, args.vocab_size, seed=0)
    step.set_batch(2, 16)
    assert [g["weight_decay"] for g in step.opt.param_groups] == [OptimConfig().weight_decay, 0.0]
    assert not step.scaler.enabled and tt.TrainStep(ours, cpu, torch.float16, 8, 0).scaler.enabled
    cfg = OptimConfig()
    opt = build_optimizer(ref, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    for _ in range(2):
        step()
        out = train_step(ref, opt, [step.batch], lr=cfg.lr, grad_clip=cfg.grad_clip)
    assert step.host_syncs == out.host_syncs == 4 and step.loss is not None
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name

    plain = tt.build(tt.PlainLlama, args, cpu, 0)  # another model with the same interface
    pstep = tt.TrainStep(plain, cpu, torch.float32, args.vocab_size, seed=0)
    pstep.set_batch(2, 16)
    pstep()
    assert pstep.host_syncs == 2 and abs(pstep.loss - math.log(args.vocab_size)) < 0.2
