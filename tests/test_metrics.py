"""Tests of llama_mini.training.metrics (JSONL logger, reader, plot, MFU, throughput) and
llama_mini.hardware (datasheet peaks, peak memory). CPU only; no optional packages needed."""

from __future__ import annotations

import builtins
import json
import math
import sys
import types

import pytest
import torch

from llama_mini import hardware
from llama_mini.training import metrics
from llama_mini.training.metrics import MetricsLogger, Throughput, mfu, plot_training, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------- JSONL logger
def test_round_trip_with_nested_dicts(tmp_path):
    path = tmp_path / "deep" / "dir" / "metrics.jsonl"  # parents are created
    with MetricsLogger(path) as log:
        log.log({"loss": 3.25, "lr": 1e-3, "policy": {"kept": 10, "dropped": 2, "by_len": {"short": 1}}}, step=1)
        log.log({"val_loss": 3.5, "note": "eval"}, step=2)
        log.log({"loss": torch.tensor(2.5)}, step=3)  # 0-d tensors become numbers
    recs = read_metrics(path)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[0]["policy"] == {"kept": 10, "dropped": 2, "by_len": {"short": 1}}
    assert recs[0]["loss"] == 3.25 and recs[0]["lr"] == 1e-3 and "nonfinite" not in recs[0]
    assert recs[1]["val_loss"] == 3.5 and recs[1]["note"] == "eval"
    assert recs[2]["loss"] == 2.5
    assert all(isinstance(r["time"], float) and r["time"] > 1.6e9 for r in recs)  # unix seconds


def test_flushes_after_each_line(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLogger(path)
    log.log({"loss": 1.0}, step=1)
    assert len(_lines(path)) == 1  # visible before close
    log.close()
    log.close()  # twice is fine


def test_nonfinite_written_as_null_and_named(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as log:
        log.log({"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-4,
                 "parts": {"aux": float("-inf"), "ok": 1.0}}, step=7)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    (rec,) = _lines(path)
    assert rec["loss"] is None and rec["grad_norm"] is None and rec["parts"] == {"aux": None, "ok": 1.0}
    assert sorted(rec["nonfinite"]) == ["grad_norm", "loss", "parts/aux"]
    assert rec["lr"] == 1e-4


def test_reserved_keys_rejected(tmp_path):
    with MetricsLogger(tmp_path / "m.jsonl") as log, pytest.raises(ValueError, match="reserved"):
        log.log({"step": 3, "loss": 1.0}, step=3)


def test_resume_step_keeps_exactly_steps_up_to_k(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as log:
        for step in range(1, 11):
            log.log({"loss": 10.0 - step}, step=step)
            if step % 4 == 0:
                log.log({"val_loss": 9.0 - step}, step=step)
    with open(path, "a") as f:
        f.write('{"step": 11, "loss": 0.')  # torn last write of the killed run
    with MetricsLogger(path, resume_step=6) as log:
        assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 4, 5, 6]
        log.log({"loss": 3.9}, step=7)
    recs = read_metrics(path)  # still valid JSONL
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 4, 5, 6, 7]
    assert recs[-1]["loss"] == 3.9 and "val_loss" in recs[4]
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]  # no temp file left behind


def test_resume_step_on_missing_file(tmp_path):
    path = tmp_path / "new.jsonl"
    with MetricsLogger(path, resume_step=5) as log:
        log.log({"loss": 1.0}, step=6)
    assert [r["step"] for r in read_metrics(path)] == [6]


def test_disabled_logger_creates_nothing(tmp_path):
    path = tmp_path / "sub" / "m.jsonl"
    with MetricsLogger(path, enabled=False, tensorboard_dir=str(tmp_path / "tb"), wandb={"project": "p"}) as log:
        log.log({"loss": 1.0}, step=1)
    assert list(tmp_path.iterdir()) == []


def test_read_metrics_names_bad_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": \n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl: line 3"):
        read_metrics(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2 is not a JSON object"):
        read_metrics(path)


# ---------------------------------------------------------------------------- optional backends
def test_tensorboard_without_package_raises(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if missing
    with pytest.raises(RuntimeError, match=r"logging\.tensorboard.*pip install tensorboard"):
        MetricsLogger(tmp_path / "m.jsonl", tensorboard_dir=str(tmp_path / "tb"))
    assert not (tmp_path / "m.jsonl").exists()


def test_wandb_without_package_raises(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(RuntimeError, match=r"logging\.wandb.*pip install wandb"):
        MetricsLogger(tmp_path / "m.jsonl", wandb={"project": "p"})
    MetricsLogger(None, wandb={"mode": "disabled"}).close()  # disabled needs no package


def test_mirrors_to_tensorboard_and_wandb(tmp_path, monkeypatch):
    calls = {"scalars": [], "wandb": [], "init": None}

    class Writer:
        def __init__(self, log_dir):
            calls["tb_dir"] = log_dir

        def add_scalar(self, tag, value, global_step):
            calls["scalars"].append((tag, value, global_step))

        def close(self):
            calls["tb_closed"] = True

    class Run:
        def log(self, data, step):
            calls["wandb"].append((data, step))

        def finish(self):
            calls["finished"] = True

    def init(**kw):
        calls["init"] = kw
        return Run()

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with MetricsLogger(None, tensorboard_dir="tb", wandb={"project": "p", "name": "n"}) as log:
        log.log({"loss": 2.0, "ok": True, "tag": "x", "bad": float("nan"), "policy": {"kept": 3}}, step=5)
    assert calls["init"] == {"mode": "offline", "project": "p", "name": "n"}
    assert sorted(calls["scalars"]) == [("loss", 2.0, 5), ("policy/kept", 3, 5)]
    ((data, step),) = calls["wandb"]
    assert step == 5 and data["policy/kept"] == 3 and data["loss"] == 2.0
    assert calls["tb_closed"] and calls["finished"]


# ---------------------------------------------------------------------------- plot
def _mixed_records(n=60):
    recs = []
    for s in range(1, n + 1):
        recs.append({"step": s, "loss": 6.0 * math.exp(-s / 20) + 2 + 0.1 * math.sin(s), "lr": 1e-3 * min(1, s / 10),
                     "tokens": 512 * s})
        if s % 20 == 0:
            recs.append({"step": s, "val_loss": 6.0 * math.exp(-s / 20) + 2.2})
    recs.append({"step": n + 1, "loss": None, "nonfinite": ["loss"], "lr": 1e-3})
    recs.append({"step": n + 1, "event": "checkpoint"})  # neither loss nor val_loss: ignored
    return recs


def test_plot_training_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plots" / "training.png"
    assert plot_training(_mixed_records(), png, title="debug run") is True
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert [p.name for p in png.parent.iterdir()] == ["training.png"]  # temp file replaced
    assert plot_training([{"step": 1, "val_loss": 3.0}], tmp_path / "eval_only.png")  # no train, no lr
    assert plot_training([], tmp_path / "empty.png")


def test_plot_training_without_matplotlib(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert plot_training(_mixed_records(), tmp_path / "t.png") is False
    assert not (tmp_path / "t.png").exists()
    err = capsys.readouterr().err
    assert "matplotlib" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- mfu, throughput
def test_mfu_arithmetic():
    # 1e4 tokens/s * 6e9 FLOP/token = 6e13 FLOP/s over 2 x 1e14 FLOP/s = 0.3
    assert mfu(1e4, 6e9, 1e14, 2) == pytest.approx(0.3)
    assert mfu(1e4, 6e9, 1e14, 1) == pytest.approx(0.6)
    assert mfu(1e4, 6e9, None, 1) is None
    with pytest.raises(ValueError):
        mfu(1e4, 6e9, 1e14, 0)


def test_throughput_sliding_window_and_reset(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    tp = Throughput(window=2)
    assert tp.rate == 0.0
    clock[0] += 1.0
    assert tp.update(100) == pytest.approx(100.0)  # 100 tokens in 1 s
    clock[0] += 3.0
    assert tp.update(500) == pytest.approx(600 / 4)  # window: (100, 1 s), (500, 3 s)
    clock[0] += 1.0
    assert tp.update(300) == pytest.approx(800 / 4)  # first step left the window
    clock[0] += 50.0  # an evaluation pause ...
    tp.reset()  # ... that is not counted
    clock[0] += 2.0
    assert tp.update(200) == pytest.approx(500 / 3)
    with pytest.raises(ValueError):
        Throughput(window=0)


# ---------------------------------------------------------------------------- hardware
@pytest.mark.parametrize("name, dtype, tf32, expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989.4e12),
    ("NVIDIA H100 80GB HBM3", "float16", False, 989.4e12),
    ("NVIDIA H100 PCIe", "bf16", False, 756.0e12),
    ("NVIDIA H200", torch.float32, True, 494.7e12),
    ("NVIDIA A100-SXM4-80GB", torch.float32, False, 19.5e12),
    ("NVIDIA A100-SXM4-80GB", torch.float32, True, 156.0e12),
])
def test_peak_flops_for_named_gpus(monkeypatch, name, dtype, tf32, expected):
    monkeypatch.setattr(hardware, "device_name", lambda device: name)
    # allow_tf32 is a property of torch's cuBLAS module object, which monkeypatch cannot always
    # restore (some pytest versions try to delete it), so it is set and restored by hand
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = tf32
    try:
        flops, note = hardware.peak_flops(torch.device("cuda", 0), dtype)
    finally:
        matmul.allow_tf32 = before
    assert flops == pytest.approx(expected) and "datasheet" in note


def test_peak_flops_unknown_gpu_and_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "device_name", lambda device: "NVIDIA GeForce GTX 1080")
    flops, note = hardware.peak_flops(torch.device("cuda"), torch.bfloat16)
    assert flops is None and "GTX 1080" in note
    flops, note = hardware.peak_flops(torch.device("cpu"), torch.float32)
    assert flops is None and "cpu" in note


def test_peak_memory_and_device_name_on_cpu():
    peak, what = hardware.peak_memory(torch.device("cpu"))
    assert isinstance(peak, int) and peak > 10 * 2**20 and what == "process max RSS"  # the interpreter alone
    hardware.reset_peak_memory(torch.device("cpu"))  # documented no-op
    assert hardware.device_name("cpu")


def test_bench_common_shares_the_table():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "common.py")
    spec = importlib.util.spec_from_file_location("_bench_common_under_test", path)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)  # not registered in sys.modules: no stray "common" module
    assert common.PEAK_TFLOPS is hardware.PEAK_TFLOPS
    assert common.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16", torch.device("cuda")) == (
        989.4, "NVIDIA datasheet dense bfloat16 peak for 'H100'")
