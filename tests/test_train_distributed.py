"""The trainer under torchrun (gloo, CPU): model parallel 2, and model parallel 2 x data parallel 2
with a stop and resume in the middle, give the losses of one process on the same data; a rank that
crashes or hangs ends the job with a clear error instead of a hang."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from llama_mini import load_meta_checkpoint
from llama_mini.training.checkpointing import latest_checkpoint
from llama_mini.training.config import load_config
from llama_mini.training.metrics import read_metrics
from llama_mini.training.trainer import Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
pytestmark = pytest.mark.distributed


def torchrun(nproc: int, script: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
           *map(str, args)]
    for _attempt in range(2):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        # --standalone picks a free port that another process can take first; only that is retried
        if proc.returncode == 0 or "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    return proc


def records(run_dir) -> tuple[dict[int, float], dict[int, float]]:
    rs = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "event" not in r]
    return ({r["step"]: r["loss"] for r in rs if "loss" in r}, {r["step"]: r["val_loss"] for r in rs if "val_loss" in r})


def assert_same_losses(a, b):
    # same data and weights; fp32 sums in another order across ranks: a few ulps of the loss
    assert sorted(a) == sorted(b)
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=2e-6), (step, a[step], b[step])


def single(tmp_path, train_data, *extra) -> str:
    Trainer(load_config(overrides=train_data.overrides(tmp_path, *extra))).run()
    return str(tmp_path / "debug")


def test_model_parallel_2_equals_one_process(tmp_path, train_data):
    common = ("--schedule.steps", 4, "--run.eval_interval", 2)
    ref = single(tmp_path / "one", train_data, *common)
    proc = torchrun(2, os.path.join(REPO, "train.py"), *train_data.overrides(tmp_path / "mp", *common),
                    "--parallel.model", 2)
    assert proc.returncode == 0, proc.stderr[-6000:]
    run = str(tmp_path / "mp" / "debug")
    (la, va), (lb, vb) = records(ref), records(run)
    assert_same_losses(la, lb)
    assert_same_losses(va, vb)
    val_tokens = [[r["val_tokens"] for r in read_metrics(os.path.join(d, "metrics.jsonl")) if "val_tokens" in r]
                  for d in (ref, run)]
    assert val_tokens[0] == val_tokens[1]  # summed over the data-parallel group only, not the world
    assert "model parallel 2 x data parallel 1" in proc.stderr
    assert proc.stderr.count("val loss") == 3 + 1  # rank 0 alone prints (3 evaluations + the summary)
    ckpt = latest_checkpoint(os.path.join(run, "checkpoints"))
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("consolidated")) == ["consolidated.00.pth", "consolidated.01.pth"]
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("optimizer")) == ["optimizer.00.pt", "optimizer.01.pt"]
    assert load_meta_checkpoint(ckpt).mp_size == 1  # the 2-shard checkpoint loads in one process


def test_model_parallel_2_x_data_parallel_2_with_resume_equals_one_process(tmp_path, train_data):
    """4 ranks (2 replicas of a 2-way sharded model, 2 accumulation steps each) with data.streams 2
    see the global batch that one process sees with 2 streams and 4 accumulation steps; stopped
    at step 2 and resumed. Accumulation inside each replica checks that gradients are reduced
    once per step, after the last micro-batch (a reduce per micro-step would count early ones twice)."""
    common = ("--schedule.steps", 4, "--run.eval_interval", 2, "--data.streams", 2, "--data.batch_size", 2)
    ref = single(tmp_path / "one", train_data, *common, "--schedule.grad_accum", 4)
    args = train_data.overrides(tmp_path / "dp", *common, "--schedule.grad_accum", 2)
    first = torchrun(4, os.path.join(REPO, "train.py"), *args, "--parallel.model", 2, "--run.stop_at", 2)
    assert first.returncode == 0, first.stderr[-6000:]
    assert "model parallel 2 x data parallel 2" in first.stderr
    ckpt = latest_checkpoint(str(tmp_path / "dp" / "debug" / "checkpoints"))
    assert ckpt.endswith("step-00000002")
    files = sorted(os.listdir(ckpt))
    assert [f for f in files if f.startswith("data.")] == ["data.00.pt", "data.01.pt"]
    assert [f for f in files if f.startswith("rng.")] == [f"rng.{r:03d}.pt" for r in range(4)]
    second = torchrun(4, os.path.join(REPO, "train.py"), *args, "--parallel.model", 2)
    assert second.returncode == 0, second.stderr[-6000:]
    assert "resumed from" in second.stderr
    (la, va), (lb, vb) = records(ref), records(str(tmp_path / "dp" / "debug"))
    assert_same_losses(la, lb)
    assert_same_losses(va, vb)


def test_a_crashing_rank_ends_the_job_with_its_error(tmp_path, train_data):
    import shutil

    bad = tmp_path / "train"
    shutil.copytree(train_data.train, bad)
    blob = (bad / "01.jsonl.zst").read_bytes()
    (bad / "01.jsonl.zst").write_bytes(blob[: len(blob) // 2])  # one data-parallel rank reads this shard
    args = train_data.overrides(tmp_path / "runs", "--parallel.timeout_s", 30)
    args[args.index("--data.train") + 1] = str(bad)
    t0 = time.time()
    proc = torchrun(2, os.path.join(REPO, "train.py"), *args, timeout=240)
    assert proc.returncode != 0
    assert time.time() - t0 < 120
    # the rank that read the shard names it; the other learns that its peer is gone
    assert re.search(r"rank [01]\): error: CorruptShardError: \S*01.jsonl.zst: truncated", proc.stderr), proc.stderr[-3000:]


def test_a_hanging_rank_makes_the_others_fail_after_the_timeout():
    t0 = time.time()
    proc = torchrun(2, os.path.join(HERE, "hang_worker.py"), 4, timeout=240)
    assert proc.returncode != 0
    assert "rank 0: collective failed after" in proc.stderr, proc.stderr[-3000:]
    waited = float(proc.stderr.split("collective failed after ")[1].split("s:")[0])
    assert 3 < waited < 60
    assert time.time() - t0 < 200


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path, train_data):
    args = train_data.overrides(tmp_path, "--schedule.steps", 50, "--run.checkpoint_interval", 0)
    proc = torchrun(2, os.path.join(HERE, "train_worker.py"), "sigterm", *args)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "rank 0: done at step 2" in proc.stderr and "rank 1: done at step 2" in proc.stderr
    ckpt = latest_checkpoint(str(tmp_path / "debug" / "checkpoints"))
    assert ckpt.endswith("step-00000002") and "stopped at step 2" in proc.stderr


def test_a_rank_with_no_counted_target_still_takes_part_in_the_step(tmp_path, train_data):
    args = train_data.overrides(tmp_path, "--schedule.steps", 3, "--parallel.timeout_s", 60)
    proc = torchrun(2, os.path.join(HERE, "train_worker.py"), "no-targets", *args)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "rank 1: done at step 3" in proc.stderr
