"""The trainer end to end on a tiny corpus, in one process: loss falls, resume is exact, gradient
accumulation equals a bigger batch, checkpoints survive a killed save, SIGTERM saves and exits,
non-finite losses stop (or skip) naming the step, and the run leaves its outputs behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from llama_mini import load_meta_checkpoint
from llama_mini.training.checkpointing import latest_checkpoint
from llama_mini.training.config import load_config
from llama_mini.training.metrics import read_metrics
from llama_mini.training.trainer import NonFiniteLossError, Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(tmp_path, train_data, *extra) -> tuple[Trainer, dict]:
    trainer = Trainer(load_config(overrides=train_data.overrides(tmp_path, *extra)))
    return trainer, trainer.run()


def losses(path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(path) if "loss" in r and "event" not in r}


def test_tiny_run_learns_and_leaves_its_outputs(tmp_path, train_data):
    trainer, summary = train(tmp_path, train_data, "--schedule.steps", 40, "--run.eval_interval", 20,
                             "--run.checkpoint_interval", 20, "--logging.plot", "true")
    run = tmp_path / "debug"
    by_step = losses(run / "metrics.jsonl")
    assert sorted(by_step) == list(range(1, 41))
    first, last5 = by_step[1], sum(by_step[s] for s in range(36, 41)) / 5
    # ln(448) = 6.1 at the start; 40 steps on repetitive synthetic text get far below it
    assert first > 5.5 and last5 < first - 1.5, (first, last5)
    records = read_metrics(run / "metrics.jsonl")
    vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and "event" not in r]
    assert [s for s, _ in vals] == [0, 20, 40]
    assert vals[-1][1] < vals[0][1] - 1.5
    assert summary["val_loss"] == vals[-1][1] and summary["val_loss_start"] == vals[0][1]
    # the policy's counts are recorded, and balance
    data = summary["data"]
    # in = kept + dropped + still buffered (the stream stopped mid-epoch)
    assert data["tokens_in"] >= data["tokens_kept"] + data["tokens_dropped"] > 0
    assert data["documents"] > 0 and data["sequences"] > 0
    start = next(r for r in records if r.get("event") == "start")
    assert start["params"] == trainer.model.num_params() and start["layout"]["world_size"] == 1
    end = next(r for r in records if r.get("event") == "end")
    assert end["tok_s"] > 0 and end["peak_memory_bytes"] > 0
    # MFU against the measured matmul rate (a CPU has no datasheet peak): logged, and consistent
    assert start["peak_flops"] is None and start["matmul_flops"] > 0 and "matmul" in start["matmul_flops_note"]
    assert summary["mfu"] is None and summary["mfu_matmul"] == pytest.approx(
        summary["tok_s"] * start["flops_per_token"] / start["matmul_flops"])
    assert all(r["mfu_matmul"] > 0 for r in records if "tok_s" in r and "event" not in r)
    assert "of the matmul rate" in (run / "train.log").read_text()
    # outputs: plot, sample, config, log, and a Meta checkpoint that loads on its own
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "sample.txt").read_text().startswith("The meaning of life is")
    assert json.loads((run / "config.json").read_text())["schedule"]["steps"] == 40
    assert "val loss" in (run / "train.log").read_text()
    ckpt = latest_checkpoint(str(run / "checkpoints"))
    assert ckpt.endswith("step-00000040")
    model = load_meta_checkpoint(run / "checkpoints")  # a run's checkpoints/ root loads its latest
    for name, p in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name
    assert os.path.isfile(os.path.join(ckpt, "tokenizer.model"))


def test_resume_is_exact(tmp_path, train_data):
    """Stopped after step 4 and resumed: steps 5..8 lose exactly what the uninterrupted run loses."""
    common = ("--schedule.steps", 8, "--data.shuffle", "true", "--run.eval_interval", 3)
    train(tmp_path / "a", train_data, *common, "--run.stop_at", 4)
    assert latest_checkpoint(str(tmp_path / "a" / "debug" / "checkpoints")).endswith("step-00000004")
    _, resumed = train(tmp_path / "a", train_data, *common)
    _, straight = train(tmp_path / "b", train_data, *common)
    a, b = losses(tmp_path / "a" / "debug" / "metrics.jsonl"), losses(tmp_path / "b" / "debug" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == list(range(1, 9))  # the resumed run's metrics have each step once
    for step in range(5, 9):
        assert a[step] == b[step], (step, a[step], b[step])  # bit for bit on CPU in fp32
    assert resumed["val_loss"] == straight["val_loss"]
    assert resumed["data"] == straight["data"]
    assert resumed["sample"] == straight["sample"]


def test_grad_accumulation_equals_the_bigger_batch(tmp_path, train_data):
    """2 micro-batches of 4 from one stream = 1 batch of 8: the same sequences, token-weighted."""
    train(tmp_path / "acc", train_data, "--schedule.grad_accum", 2, "--data.shuffle", "false", "--schedule.steps", 4)
    train(tmp_path / "big", train_data, "--data.batch_size", 8, "--data.shuffle", "false", "--schedule.steps", 4)
    a, b = losses(tmp_path / "acc" / "debug" / "metrics.jsonl"), losses(tmp_path / "big" / "debug" / "metrics.jsonl")
    for step in range(1, 5):  # same math, summed in another order: fp32 rounding only
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6)


def test_keep_last_k_and_resume_auto_of_a_finished_run(tmp_path, train_data):
    train(tmp_path, train_data, "--run.checkpoint_interval", 1, "--run.keep_checkpoints", 2)
    root = tmp_path / "debug" / "checkpoints"
    assert sorted(p for p in os.listdir(root) if p.startswith("step-")) == ["step-00000005", "step-00000006"]
    assert (root / "latest").read_text().strip() == "step-00000006"
    _, again = train(tmp_path, train_data)  # same command: the run is complete, nothing retrained
    assert again["step"] == 6 and len(losses(tmp_path / "debug" / "metrics.jsonl")) == 6
    with pytest.raises(ValueError, match="run.resume=never but .* already holds checkpoints"):
        train(tmp_path, train_data, "--run.resume", "never")


class _PoisonedForward:
    """Wraps the model: the loss of optimizer step ``bad_step`` (1-based) becomes NaN."""

    def __init__(self, trainer: Trainer, bad_step: int) -> None:
        self.trainer, self.bad_step = trainer, bad_step

    def __call__(self, *args, **kwargs):
        loss = self.trainer.model(*args, **kwargs)
        return loss * float("nan") if self.trainer.step + 1 == self.bad_step else loss


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, train_data):
    trainer = Trainer(load_config(overrides=train_data.overrides(tmp_path, "--run.checkpoint_interval", 2)))
    trainer.forward = _PoisonedForward(trainer, bad_step=3)
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss nan.*last good checkpoint is .*step-00000002"):
        trainer.run()
    assert latest_checkpoint(str(tmp_path / "debug" / "checkpoints")).endswith("step-00000002")


def test_nan_loss_skip_drops_the_step(tmp_path, train_data):
    trainer = Trainer(load_config(overrides=train_data.overrides(tmp_path, "--run.on_nonfinite", "skip")))
    trainer.forward = _PoisonedForward(trainer, bad_step=3)
    before = {}
    real_step = trainer.train_step

    def spy():
        if trainer.step == 2:
            before.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        out = real_step()
        if trainer.step == 3:
            assert out["skipped"]
            for k, v in trainer.model.state_dict().items():  # weights untouched by the skipped step
                assert torch.equal(v, before[k]), k
        return out

    trainer.train_step = spy
    summary = trainer.run()
    assert summary["skipped_steps"] == 1 and summary["step"] == 6
    assert before, "the spy never saw step 2"


def test_too_many_skips_stop(tmp_path, train_data):
    trainer = Trainer(load_config(overrides=train_data.overrides(
        tmp_path, "--run.on_nonfinite", "skip", "--run.max_skips", 1)))
    trainer.forward = lambda *a, **k: trainer.model(*a, **k) * float("inf")
    with pytest.raises(NonFiniteLossError, match="more than run.max_skips=1"):
        trainer.run()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, train_data, precision):
    _, summary = train(tmp_path, train_data, "--run.precision", precision, "--schedule.steps", 8)
    assert summary["step"] == 8 and summary["skipped_steps"] == 0
    by_step = losses(tmp_path / "debug" / "metrics.jsonl")
    assert all(v == v for v in by_step.values()) and by_step[8] < by_step[1]


def test_activation_checkpointing_gives_the_same_losses(tmp_path, train_data):
    train(tmp_path / "a", train_data, "--model.activation_checkpointing", "true", "--schedule.steps", 3)
    train(tmp_path / "b", train_data, "--schedule.steps", 3)
    a, b = losses(tmp_path / "a" / "debug" / "metrics.jsonl"), losses(tmp_path / "b" / "debug" / "metrics.jsonl")
    assert a == pytest.approx(b, rel=1e-6)


def _subprocess_env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))


_KILL_DURING_SAVE = r"""
import os, sys
import llama_mini.training.checkpointing as ck
from llama_mini.training.config import load_config
from llama_mini.training.trainer import Trainer

real = ck.atomic_torch_save
def dying(obj, path):
    # the second checkpoint (step 4): write the weights, then die before the optimizer state
    if ".step-00000004.partial" in path and os.path.basename(path).startswith("optimizer"):
        os._exit(9)
    real(obj, path)
ck.atomic_torch_save = dying
Trainer(load_config(overrides=sys.argv[1:])).run()
"""


def test_a_process_killed_during_a_save_leaves_the_previous_checkpoint(tmp_path, train_data):
    args = train_data.overrides(tmp_path, "--run.checkpoint_interval", 2)
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, *args], env=_subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-3000:]
    root = tmp_path / "debug" / "checkpoints"
    assert (root / ".step-00000004.partial").is_dir()  # the killed save, never renamed
    assert latest_checkpoint(str(root)).endswith("step-00000002")
    load_meta_checkpoint(latest_checkpoint(str(root)))  # the previous one still loads
    _, summary = train(tmp_path, train_data, "--run.checkpoint_interval", 2)  # resumes from step 2
    assert summary["step"] == 6
    assert not (root / ".step-00000004.partial").exists()  # cleaned by the next save
    _, straight = train(tmp_path / "b", train_data, "--run.checkpoint_interval", 2)
    assert losses(tmp_path / "debug" / "metrics.jsonl") == losses(tmp_path / "b" / "debug" / "metrics.jsonl")


def test_sigterm_saves_and_exits_cleanly(tmp_path, train_data):
    args = train_data.overrides(tmp_path, "--schedule.steps", 100000, "--run.eval_batches", 1)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args], env=_subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "debug" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(losses(metrics)) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saving a checkpoint" in err and "stopped at step" in err
    ckpt = latest_checkpoint(str(tmp_path / "debug" / "checkpoints"))
    step = json.loads(open(os.path.join(ckpt, "trainer.json")).read())["step"]
    assert step >= 3 and max(losses(metrics)) == step


@pytest.mark.parametrize("policy", ["pad", "discard", "impute", "pad+discard", "pad+impute", "informed",
                                    "naive-discard", "naive-impute", "best-fit", "packed-docmask"])
def test_every_policy_trains(tmp_path, train_data, policy):
    extra = ["--data.tolerance", 8] if policy == "informed" else []
    trainer, summary = train(tmp_path, train_data, "--data.policy", policy, "--schedule.steps", 2, *extra)
    assert summary["step"] == 2 and summary["data"]["sequences"] >= 8
    assert trainer.streams.pipelines[0].policy.name == policy
    if policy.startswith("naive-"):  # the length comes from the shortest document, not max_seq_len
        assert trainer.streams.pipelines[0].policy.max_len < 32


def test_default_command_on_the_builtin_data(tmp_path):
    """``python train.py`` as the README gives it, shortened: the built-in data and tokenizer."""
    out = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--schedule.steps", "3",
                          "--run.eval_batches", "1", "--run.sample_tokens", "4", "--run.out_dir", str(tmp_path)],
                         env=_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "built-in default data" in out.stderr and "vocab 4096" in out.stderr
    for name in ("metrics.jsonl", "loss.png", "sample.txt", "config.json", "train.log"):
        assert (tmp_path / "debug" / name).is_file(), name


def test_torch_compile_gives_the_eager_losses(tmp_path, train_data):
    """run.compile: the compiled forward trains like the eager one (CPU inductor; ~1 min)."""
    train(tmp_path / "c", train_data, "--run.compile", "--schedule.steps", 2)
    train(tmp_path / "e", train_data, "--schedule.steps", 2)
    a, b = losses(tmp_path / "c" / "debug" / "metrics.jsonl"), losses(tmp_path / "e" / "debug" / "metrics.jsonl")
    assert a == pytest.approx(b, rel=1e-5)  # fused kernels reorder fp32 sums; nothing else differs


def test_init_from_starts_a_new_run_from_saved_weights(tmp_path, train_data):
    """run.init_from takes the weights (any shard count; here resharded to 2) but not the state."""
    from llama_mini.reshard import reshard_checkpoint

    _, first = train(tmp_path / "a", train_data)
    reshard_checkpoint(str(tmp_path / "a" / "debug" / "checkpoints"), str(tmp_path / "two"), 2, progress=None)
    trainer, second = train(tmp_path / "b", train_data, "--run.init_from", tmp_path / "two")
    assert second["val_loss_start"] == pytest.approx(first["val_loss"], rel=1e-6)  # same weights, same val tokens
    assert second["step"] == 6 and second["val_loss"] < second["val_loss_start"]
    with pytest.raises(Exception, match="run.init_from: checkpoint directory not found"):
        load_config(overrides=train_data.overrides(tmp_path, "--run.init_from", tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"(?s)run.init_from .*tok_embeddings.weight: checkpoint has shape"):
        Trainer(load_config(overrides=train_data.overrides(tmp_path / "c", "--run.init_from", tmp_path / "two",
                                                          "--model.dim", 32)))


def test_records_carry_the_scheduled_lr_and_each_step_once(tmp_path, train_data):
    from llama_mini.training.optim import lr_at

    train(tmp_path, train_data, "--schedule.steps", 6, "--run.stop_at", 3)
    train(tmp_path, train_data, "--schedule.steps", 6)
    records = [r for r in read_metrics(tmp_path / "debug" / "metrics.jsonl") if "loss" in r and "event" not in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # no line twice after the resume
    cfg = load_config(overrides=train_data.overrides(tmp_path, "--schedule.steps", 6))
    for r in records:
        assert r["lr"] == lr_at(r["step"] - 1, lr=cfg.optim.lr, min_lr=cfg.optim.lr * cfg.schedule.min_lr_ratio,
                                warmup_steps=cfg.warmup_steps(), total_steps=6)
        assert r["grad_norm"] > 0


def test_resume_refuses_changed_settings_and_names_them(tmp_path, train_data):
    train(tmp_path, train_data, "--run.stop_at", 2)
    with pytest.raises(ValueError, match=r"cannot resume .*step-00000002.*data.batch_size \(checkpoint 4, now 3\)"):
        Trainer(load_config(overrides=train_data.overrides(tmp_path, "--data.batch_size", 3))).run()
    with pytest.raises(ValueError, match=r"model.dim \(checkpoint 64, now 32\)"):
        Trainer(load_config(overrides=train_data.overrides(tmp_path, "--model.dim", 32))).run()
    trainer, summary = train(tmp_path, train_data, "--optim.lr", 1e-3, "--model.attn_backend", "sdpa")
    assert summary["step"] == 6  # a new learning rate or attention backend is fine
    log = (tmp_path / "debug" / "train.log").read_text()
    assert "with changed settings (used from now on): optim.lr (checkpoint 0.003, now 0.001)" in log


def test_fresh_start_keeps_an_earlier_attempts_metrics_aside(tmp_path, train_data):
    run = tmp_path / "debug"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')  # crashed, torn, no checkpoint
    train(tmp_path, train_data, "--logging.plot", "true")
    assert (run / "metrics.jsonl.prev").read_text().startswith('{"step": 1, "loss": 9.0}')
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r and "event" not in r] == list(range(1, 7))
    assert (run / "loss.png").exists()


def test_resuming_an_earlier_checkpoint_prunes_the_abandoned_later_ones(tmp_path, train_data):
    train(tmp_path, train_data, "--run.checkpoint_interval", 2)
    root = tmp_path / "debug" / "checkpoints"
    assert sorted(p for p in os.listdir(root) if p.startswith("step-")) == ["step-00000002", "step-00000004", "step-00000006"]
    train(tmp_path, train_data, "--run.checkpoint_interval", 2, "--run.resume", root / "step-00000002",
          "--run.stop_at", 4, "--run.keep_checkpoints", 1)
    assert sorted(p for p in os.listdir(root) if p.startswith("step-")) == ["step-00000004"]  # 6 was abandoned
    assert latest_checkpoint(str(root)).endswith("step-00000004")


def test_a_non_finite_gradient_alone_stops_naming_the_step(tmp_path, train_data):
    trainer = Trainer(load_config(overrides=train_data.overrides(tmp_path)))
    weight = trainer.model.layers[0].feed_forward.w2.weight
    weight.register_hook(lambda g: g * float("inf") if trainer.step + 1 == 4 else g)
    with pytest.raises(NonFiniteLossError, match=r"step 4: loss [0-9.]+, gradient norm (inf|nan)"):
        trainer.run()


def test_fp16_gradients_are_unscaled_before_clipping_and_logging(tmp_path, train_data):
    train(tmp_path / "a", train_data, "--run.precision", "fp16", "--schedule.steps", 2)
    train(tmp_path / "b", train_data, "--schedule.steps", 2)
    a = [r for r in read_metrics(tmp_path / "a" / "debug" / "metrics.jsonl") if "grad_norm" in r]
    b = [r for r in read_metrics(tmp_path / "b" / "debug" / "metrics.jsonl") if "grad_norm" in r]
    # fp16 matmuls: ~1e-3 relative; a forgotten 1/S would be off by 2^16
    assert a[0]["grad_norm"] == pytest.approx(b[0]["grad_norm"], rel=2e-2)
    assert a[0]["loss_scale"] == 2.0**16
