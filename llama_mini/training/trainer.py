"""The training loop: model + data + AdamW on one process or a torchrun job (model x data parallel).

    from llama_mini.training import Trainer, load_config
    summary = Trainer(load_config(overrides=["--schedule.steps", "100"])).run()

One optimizer step, on every rank, is ``llama_mini.training.step.train_step``, the same function
the experiment loop and the throughput benchmarks run (its docstring has the details):

  1. take ``schedule.grad_accum`` micro-batches from this data-parallel rank's streams;
  2. count the targets that count (``!= ignore_index``): n_j per micro-batch, N over the whole
     global batch (one all-reduce);
  3. for each micro-batch: loss_j = mean cross-entropy; backward of loss_j * n_j / N (times the
     fp16 loss scale), so one process with accumulation and many processes give the same step;
  4. after the last micro-batch only: sum the gradients over the data-parallel group;
  5. clip by the global gradient norm (model-parallel shards summed, replicas counted once);
  6. one all-reduce of the loss together with this rank's stop flag, one read of loss, flag and
     norm to the host (the step's two host syncs; the model's input checks add their own);
  7. AdamW step at the scheduled learning rate, unless the loss or norm is not finite.

The trainer keeps what is its own: the learning-rate schedule, the stop flags (a non-finite step
stops the run naming the step, or is skipped if asked), logging (``host_syncs`` per step in the
metrics and the summary), evaluation and checkpoints.

Around it: validation now and then, checkpoints (atomic, last K kept, exact resume), SIGINT/SIGTERM
(save and exit at the end of the current step, agreed by every rank), metrics (JSONL, TensorBoard,
W&B), a loss-curve plot, and a sample at the end. Only global rank 0 prints and writes shared files.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Any

import torch

from .. import ops
from ..checkpoint import atomic_write_text
from ..generation import generate
from ..hardware import measure_matmul_flops, peak_flops, peak_memory, reset_peak_memory
from ..model import Transformer
from ..parallel import init_weights
from .checkpointing import latest_checkpoint, load_checkpoint, read_trainer_state, resolve_resume, save_checkpoint
from .config import TrainConfig
from .data import TrainStreams, model_vocab_size, resolve_data, validation_batches
from .distributed import DistInfo, all_reduce, dp_group, mp_group, setup
from .evaluate import evaluate_loss
from .metrics import MetricsLogger, Throughput, mfu, plot_training, read_metrics
from .optim import build_optimizer, lr_at
from .precision import LossScaler, autocast_factory
from .step import EmptyBatchError, train_step

__all__ = ["Trainer", "NonFiniteLossError"]


def fmt_tflops(flops: float | None) -> str:
    """FLOP/s as "989.4 TFLOP/s" ("1.23 TFLOP/s" below 10), or "none"."""
    if flops is None:
        return "none"
    t = flops / 1e12
    return f"{t:.1f} TFLOP/s" if t >= 10 else f"{t:.3g} TFLOP/s"


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


class Trainer:
    """Builds everything from a ``TrainConfig`` and trains; ``run()`` returns a summary dict."""

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.dist = dist_info or setup(cfg.parallel.model, cfg.parallel.backend, cfg.run.device, cfg.parallel.timeout_s)
        self.run_dir = cfg.run_dir()
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        self.stop_requested = False  # a signal arrived here (this rank only)
        self.stop_agreed = False  # some rank got a signal: all stop after this step, together
        self._signal_time, self._signal_name, self._signal_said = 0.0, "", False
        self._bar = None
        if self.dist.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
        self._log_file = open(os.path.join(self.run_dir, "train.log"), "a", encoding="utf-8") if self.dist.is_main else None

        from ..data import Tokenizer

        # data and tokenizer
        show = self.dist.is_main and cfg.logging.progress
        self.data = resolve_data(cfg.data, self.dist, progress=show)
        self.tokenizer = Tokenizer(self.data.tokenizer)
        if self.data.val:
            from ..data import expand_sources

            try:
                expand_sources(self.data.val)  # fail now, not at the first evaluation
            except (FileNotFoundError, ValueError) as e:
                raise ValueError(f"data.val: {e}") from None
        args = cfg.model
        args.vocab_size = model_vocab_size(args.vocab_size, self.tokenizer, self.dist.mp_size)
        self.max_len = None if cfg.data.policy.startswith("naive-") else (cfg.data.max_len or args.max_seq_len)
        self.streams = TrainStreams(cfg.data, self.data.train, self.tokenizer, self.max_len, self.dist,
                                    cfg.schedule.grad_accum, args.ignore_index)

        # The MFU ceiling measured on this device, before the model exists: its buffers (384 MiB at
        # 8192^2 in bf16) are freed again and then lie below the training step's peak memory.
        self.compute_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
                              "fp16": torch.float16}[cfg.run.precision]
        self._matmul = measure_matmul_flops(self.dist.device, self.compute_dtype)
        reset_peak_memory(self.dist.device)

        # model: the same weights on every rank for a seed, whatever the layout
        torch.manual_seed(cfg.run.seed)
        self.model = Transformer(args).to(self.dist.device)
        init_weights(self.model, cfg.run.seed)
        if cfg.run.init_from:
            self._init_from(cfg.run.init_from)
        # distinct per data-parallel rank from here on, identical across model-parallel ranks
        torch.manual_seed(cfg.run.seed + 1_000_003 * self.dist.dp_rank)
        self.forward = torch.compile(self.model) if cfg.run.compile else self.model
        self.optimizer = build_optimizer(
            self.model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
            betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
        )
        self.autocast = autocast_factory(cfg.run.precision, self.dist.device)
        self.scaler = LossScaler(cfg.run.precision == "fp16")
        self.step = 0
        self.tokens_seen = 0  # counted target tokens, all ranks
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.history: dict[str, Any] = {}

    def _init_from(self, path: str) -> None:
        """Weights of a Meta checkpoint (any number of shards), sliced for this rank."""
        from ..checkpoint import load_meta_state_dict

        try:
            state = load_meta_state_dict(path, self.dist.mp_rank, self.dist.mp_size)
            self.model.load_state_dict({k: v.to(self.dist.device) for k, v in state.items()})
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"run.init_from {path}: {e}") from None

    # ------------------------------------------------------------------ output
    def say(self, message: str) -> None:
        """A log line on rank 0: on stderr (above the progress bar) and in RUN/train.log."""
        if not self.dist.is_main:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)
        if self._log_file is not None:
            self._log_file.write(time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n")
            self._log_file.flush()

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, Any]:
        """One optimizer step (``step.train_step``, see the module docstring). Returns loss, grad
        norm, lr, counted tokens, processed positions, skipped and host_syncs."""
        cfg = self.cfg
        batches = [self.streams.next_batch(j) for j in range(cfg.schedule.grad_accum)]
        lr = lr_at(self.step, lr=cfg.optim.lr, min_lr=cfg.optim.lr * cfg.schedule.min_lr_ratio,
                   warmup_steps=cfg.warmup_steps(), total_steps=cfg.schedule.steps, decay=cfg.schedule.decay)
        try:
            # the stop flags ride in the step's all-reduce of the loss, so every rank decides to
            # save and stop after the same step without a collective of their own
            out = train_step(self.model, self.optimizer, batches, forward=self.forward, lr=lr,
                             grad_clip=cfg.optim.grad_clip, scaler=self.scaler, autocast=self.autocast,
                             device=self.dist.device, ignore_index=self.model.args.ignore_index,
                             dp_group=dp_group(), mp_group=mp_group(), extra=[float(self.stop_requested)])
        except EmptyBatchError as e:
            raise ValueError(f"step {self.step + 1}: {e}") from None
        self.stop_agreed = out.extra[0] > 0
        if out.nonfinite:
            self._nonfinite(out.loss, out.grad_norm)
        elif not out.skipped:
            self.consecutive_skips = 0
        self.step += 1
        self.tokens_seen += out.tokens
        if out.skipped:
            self.skipped_steps += 1
        return {"loss": out.loss, "grad_norm": out.grad_norm, "lr": lr, "tokens": out.tokens,
                "processed": out.processed, "skipped": out.skipped, "host_syncs": out.host_syncs}

    def _nonfinite(self, loss: float, norm: float) -> None:
        where = f"step {self.step + 1}: loss {loss}, gradient norm {norm}"
        if self.cfg.run.on_nonfinite == "stop":
            last = latest_checkpoint(self.ckpt_root)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
            raise NonFiniteLossError(
                f"{where}: training stopped ({kept}; the step was not applied). Lower optim.lr, use "
                "run.precision fp32/bf16, or set run.on_nonfinite=skip to drop such steps"
            )
        self.consecutive_skips += 1
        self.say(f"{where}: step skipped ({self.consecutive_skips} in a row)")
        if self.consecutive_skips > self.cfg.run.max_skips:
            raise NonFiniteLossError(f"{where}: more than run.max_skips={self.cfg.run.max_skips} non-finite steps in a row")

    # ------------------------------------------------------------------ evaluation, checkpoints
    def evaluate(self) -> dict[str, float] | None:
        if not self.data.val:
            return None
        batches = validation_batches(self.cfg.data, self.data.val, self.tokenizer,
                                     self.max_len or self.model.args.max_seq_len, self.cfg.run.eval_batches,
                                     self.dist, self.model.args.ignore_index)
        result = evaluate_loss(self.model, batches, device=self.dist.device,
                               autocast=self.autocast, all_reduce=lambda t: all_reduce(t, dp_group()),
                               ignore_index=self.model.args.ignore_index)
        return {"val_loss": result["loss"], "val_ppl": result["ppl"], "val_tokens": result["tokens"]}

    def data_counts(self) -> dict[str, int]:
        """The sequence-length policy's counts summed over every data-parallel rank."""
        local = self.streams.counts()
        keys = sorted(local)
        t = torch.tensor([float(local[k]) for k in keys], dtype=torch.float64, device=self.dist.device)
        all_reduce(t, dp_group())
        return {k: int(v) for k, v in zip(keys, t.tolist())}

    def save(self) -> str:
        state = {
            "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
            "loss_scaler": self.scaler.state_dict(), "config": self.cfg.to_dict(), "history": self.history,
        }
        path = save_checkpoint(self.ckpt_root, self.step, dist_info=self.dist, model=self.model,
                               optimizer=self.optimizer, data_state=self.streams.state_dict(),
                               trainer_state=state, tokenizer_path=self.data.tokenizer,
                               keep=self.cfg.run.keep_checkpoints)
        self.say(f"step {self.step}: checkpoint {path}")
        return path

    def resume(self) -> bool:
        path = resolve_resume(self.cfg.run.resume, self.ckpt_root, self.dist)
        if path is None:
            return False
        self._check_resumable(path, read_trainer_state(path).get("config", {}))
        state, data_state = load_checkpoint(path, dist_info=self.dist, model=self.model, optimizer=self.optimizer)
        self.streams.load_state_dict(data_state)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.skipped_steps = int(state["skipped_steps"])
        self.scaler.load_state_dict(state["loss_scaler"])
        self.history = dict(state.get("history", {}))
        self.say(f"resumed from {path} at step {self.step}")
        return True

    # Settings that may change between a checkpoint and its resumption: how attention and the
    # ops are computed, evaluation. Everything else in model and data, and the accumulation,
    # decides what the next step computes, so exact resume needs it unchanged.
    _RESUME_FREE = {
        "model": {"preset", "attn_backend", *ops.IMPL_FIELDS, "activation_checkpointing", "validate_inputs",
                  "max_batch_size"},
        "data": {"val", "val_policy"},
    }

    def _check_resumable(self, path: str, saved: dict) -> None:
        now = self.cfg.to_dict()
        fixed, changed = [], []
        for section in ("model", "data", "schedule", "optim"):
            for key in sorted(set(saved.get(section, {})) | set(now[section])):
                old, new = saved.get(section, {}).get(key), now[section].get(key)
                if old == new or key in self._RESUME_FREE.get(section, set()):
                    continue
                entry = f"{section}.{key} (checkpoint {old!r}, now {new!r})"
                if section in ("model", "data") or (section, key) == ("schedule", "grad_accum"):
                    fixed.append(entry)
                else:
                    changed.append(entry)
        if fixed:
            raise ValueError(
                f"cannot resume {path}: it was trained with other settings: {'; '.join(fixed)}. Restore them, "
                "use another run.name, or start a new run from its weights with run.init_from"
            )
        if changed:
            self.say(f"resuming {path} with changed settings (used from now on): {'; '.join(changed)}")

    def _plot(self) -> None:
        """loss.png from the metrics so far; a plotting failure is reported, never fatal."""
        if not (self.cfg.logging.plot and self.dist.is_main):
            return
        try:
            plot_training(read_metrics(self.metrics_path), os.path.join(self.run_dir, "loss.png"), self.cfg.run.name)
        except Exception as e:  # noqa: BLE001 - a figure must not end a training run
            self.say(f"loss.png not written: {type(e).__name__}: {e}")

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        # Only flags here: printing from a handler can interrupt a print (a reentrant-call crash).
        now = time.monotonic()
        if self.stop_requested and signum == signal.SIGINT and now - self._signal_time > 2.0:
            raise KeyboardInterrupt  # a second Ctrl-C (not the copy torchrun forwards): stop now, unsaved
        if not self.stop_requested:
            self.stop_requested, self._signal_time = True, now
            self._signal_name = signal.Signals(signum).name

    def _install_signals(self) -> dict:
        previous = {}
        if hasattr(signal, "SIGTERM"):
            try:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        return previous

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        resumed = self.resume()
        if not resumed and self.dist.is_main and os.path.exists(self.metrics_path):
            # a fresh start: an earlier attempt's records (it saved no checkpoint) are kept aside
            os.replace(self.metrics_path, self.metrics_path + ".prev")
            self.say(f"fresh start: the earlier {self.metrics_path} was moved to {self.metrics_path}.prev")
        logger = MetricsLogger(
            self.metrics_path, enabled=self.dist.is_main, resume_step=self.step if resumed else None,
            tensorboard_dir=os.path.join(self.run_dir, "tensorboard") if cfg.logging.tensorboard else None,
            wandb={"project": cfg.logging.wandb_project, "name": cfg.run.name, "mode": cfg.logging.wandb_mode,
                   "dir": self.run_dir, "config": cfg.to_dict()} if cfg.logging.wandb else None,
        )
        if self.dist.is_main:
            import json

            atomic_write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", os.path.join(self.run_dir, "config.json"))
        previous = self._install_signals()
        try:
            return self._run(logger, resumed)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            logger.close()
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def _run(self, logger: MetricsLogger, resumed: bool) -> dict[str, Any]:
        cfg, args = self.cfg, self.model.args
        seq_len = self.max_len or args.max_seq_len
        peak, peak_note = peak_flops(self.dist.device, self.compute_dtype)
        # MFU against two named ceilings: the card's datasheet peak (none on a CPU) and what one
        # large matmul reaches on this device (clocks, power limit, library build included).
        matmul, matmul_note = self._matmul
        ceilings = {"peak": peak, "peak_note": peak_note, "matmul": matmul, "matmul_note": matmul_note}
        flops_per_token = self.model.flops_per_token(seq_len)
        n_params = self.model.num_params()
        global_batch = cfg.data.batch_size * cfg.schedule.grad_accum * self.dist.dp_size
        self.say(
            f"llama-mini: {n_params / 1e6:.2f}M parameters (dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, "
            f"vocab {args.vocab_size}) on {self.dist.device} x{self.dist.world_size} "
            f"(model parallel {self.dist.mp_size} x data parallel {self.dist.dp_size}), {cfg.run.precision}"
        )
        self.say(
            f"data: {'built-in default data' if self.data.builtin else ', '.join(self.data.train)}, policy "
            f"{cfg.data.policy}, seq {seq_len if self.max_len else 'from data'}, global batch {global_batch} sequences "
            f"({cfg.data.batch_size} x {cfg.schedule.grad_accum} accumulation x {self.dist.dp_size} ranks); "
            f"{self.streams.num_streams} data stream(s); run directory {self.run_dir}"
        )
        self.say(f"MFU ceilings: datasheet {fmt_tflops(peak)} ({peak_note}); matmul {fmt_tflops(matmul)} "
                 f"({matmul_note})")
        if not resumed:
            logger.log({"event": "start", "params": n_params, "layout": {
                "world_size": self.dist.world_size, "mp_size": self.dist.mp_size, "dp_size": self.dist.dp_size},
                "device": str(self.dist.device), "flops_per_token": flops_per_token,
                "peak_flops": peak, "peak_flops_note": peak_note, "matmul_flops": matmul, "matmul_flops_note": matmul_note,
                "global_batch": global_batch, "seq_len": seq_len,
                "config": cfg.to_dict()}, step=0)
            first_eval = self.evaluate()
            if first_eval is not None:
                self.history["val_loss_start"] = first_eval["val_loss"]
                logger.log(first_eval, step=0)
                self.say(f"step 0: val loss {first_eval['val_loss']:.4f}, ppl {first_eval['val_ppl']:.1f}")
        if self.step >= cfg.schedule.steps:
            self.say(f"the run is complete at step {self.step} (schedule.steps={cfg.schedule.steps}); "
                     "nothing to train. Use another run.name to train again.")
            return self._finish(logger, ceilings, flops_per_token, seq_len, trained=False)

        stop_at = cfg.run.stop_at or cfg.schedule.steps
        show_bar = self.dist.is_main and cfg.logging.progress and sys.stderr.isatty()
        if show_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=cfg.schedule.steps, initial=self.step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr)
        speed = Throughput(window=20)
        interval_losses: list[float] = []
        while self.step < stop_at:
            t0 = time.perf_counter()
            out = self.train_step()
            # time in train_step only (no evaluation, checkpoint or plot), kept across resumes
            self.history["train_seconds"] = self.history.get("train_seconds", 0.0) + time.perf_counter() - t0
            self.history["tokens_processed"] = self.history.get("tokens_processed", 0) + out["processed"]
            tok_s = speed.update(out["processed"])
            if self.stop_agreed and not self._signal_said:
                self._signal_said = True
                self.say(f"{self._signal_name or 'a signal on another rank'}: saving a checkpoint at the end of "
                         "this step, then stopping (Ctrl-C again to abort)")
            self.history["host_syncs"] = out["host_syncs"]  # the last step's (a micro-batch with no counted
            # target runs no forward and makes fewer reads; every record logs its own step's count)
            interval_losses.append(out["loss"])
            self.history.setdefault("loss_first", out["loss"])
            self.history["loss_last"] = out["loss"]
            if self._bar is not None:
                self._bar.update(1)
                self._bar.set_postfix(loss=f"{out['loss']:.3f}", lr=f"{out['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
            if self.step % cfg.logging.log_interval == 0 or self.step == stop_at:
                util = mfu(tok_s, flops_per_token, peak, self.dist.world_size)
                util_matmul = mfu(tok_s, flops_per_token, matmul, self.dist.world_size)
                record = {"loss": out["loss"], "loss_avg": sum(interval_losses) / len(interval_losses),
                          "lr": out["lr"], "grad_norm": out["grad_norm"], "tokens": self.tokens_seen,
                          "tok_s": tok_s, "mfu": util, "mfu_matmul": util_matmul, "skipped_steps": self.skipped_steps,
                          "host_syncs": out["host_syncs"]}
                if self.scaler.enabled:
                    record["loss_scale"] = self.scaler.scale
                logger.log(record, step=self.step)
                interval_losses = []
                if self._bar is None:
                    self.say(f"step {self.step}/{cfg.schedule.steps}: loss {out['loss']:.4f} lr {out['lr']:.2e} "
                             f"grad norm {out['grad_norm']:.3f} {tok_s:,.0f} tok/s"
                             + (f" mfu {util:.1%}" if util is not None else "")
                             + f" ({util_matmul:.0%} of matmul)")
            last = self.step == stop_at
            if (cfg.run.eval_interval and self.step % cfg.run.eval_interval == 0) or (last and stop_at == cfg.schedule.steps):
                result = self.evaluate()
                if result is not None:
                    self.history["val_loss_last"] = result["val_loss"]
                    logger.log({**result, "tokens": self.tokens_seen, "data": self.data_counts()}, step=self.step)
                    self.say(f"step {self.step}: val loss {result['val_loss']:.4f}, ppl {result['val_ppl']:.1f}")
                self._plot()
                speed.reset()
            if self.stop_agreed or last or (cfg.run.checkpoint_interval and self.step % cfg.run.checkpoint_interval == 0):
                self.save()
                speed.reset()
            if self.stop_agreed:
                self.say(f"stopped at step {self.step}; run the same command again to resume")
                break
        if self._bar is not None:  # the summary prints below a finished bar
            self._bar.close()
            self._bar = None
        if self.step < cfg.schedule.steps:  # interrupted or stop_at
            return {"step": self.step, "stopped": True, "checkpoint": latest_checkpoint(self.ckpt_root)}
        return self._finish(logger, ceilings, flops_per_token, seq_len, trained=True)

    def _finish(self, logger: MetricsLogger, ceilings: dict[str, Any], flops_per_token: float, seq_len: int,
                trained: bool) -> dict[str, Any]:
        cfg = self.cfg
        mem, mem_note = peak_memory(self.dist.device)
        seconds = self.history.get("train_seconds", 0.0)
        tok_s = self.history.get("tokens_processed", 0) / seconds if seconds else 0.0
        summary = {
            "step": self.step, "tokens": self.tokens_seen, "params": self.model.num_params(),
            "loss_first": self.history.get("loss_first"), "loss_last": self.history.get("loss_last"),
            "val_loss_start": self.history.get("val_loss_start"), "val_loss": self.history.get("val_loss_last"),
            "tok_s": tok_s, "mfu": mfu(tok_s, flops_per_token, ceilings["peak"], self.dist.world_size),
            "mfu_matmul": mfu(tok_s, flops_per_token, ceilings["matmul"], self.dist.world_size),
            "mfu_ceilings": ceilings,
            "peak_memory_bytes": mem, "peak_memory_note": mem_note, "skipped_steps": self.skipped_steps,
            "host_syncs": self.history.get("host_syncs"),
            "train_seconds": self.history.get("train_seconds"), "data": self.data_counts(),
            "checkpoint": latest_checkpoint(self.ckpt_root), "stopped": False,
        }
        if cfg.run.sample_prompt and cfg.run.sample_tokens:
            summary["sample"] = self.sample(cfg.run.sample_prompt)
        if trained:
            logger.log({"event": "end", **{k: v for k, v in summary.items() if k not in ("checkpoint", "step")}}, step=self.step)
        if self.dist.is_main:
            self._plot()
            if "sample" in summary:
                atomic_write_text(summary["sample"] + "\n", os.path.join(self.run_dir, "sample.txt"))
            self._print_summary(summary)
        return summary

    @torch.no_grad()
    def sample(self, prompt: str) -> str:
        """Text continued from ``prompt`` (every model-parallel rank takes part; same seed everywhere)."""
        cfg = self.cfg
        was_training = self.model.training
        self.model.eval()
        try:
            ids = self.tokenizer.encode(prompt, bos=True)
            room = self.model.args.max_seq_len - len(ids)
            gen = torch.Generator(device=self.dist.device).manual_seed(cfg.run.seed)
            result = generate(self.model, [ids], max(0, min(cfg.run.sample_tokens, room)),
                              temperature=cfg.run.sample_temperature, top_p=0.9, eos_id=self.tokenizer.eos_id,
                              pad_id=self.tokenizer.pad_id, generator=gen, vocab_limit=self.tokenizer.vocab_size)
            return self.tokenizer.decode(ids + result.tokens[0])
        finally:
            self.model.train(was_training)

    def _print_summary(self, s: dict[str, Any]) -> None:
        def fmt(v, spec):
            return "n/a" if v is None else format(v, spec)

        lines = [
            "", "=" * 72, f"run {self.cfg.run.name}: {s['step']} steps, {s['tokens']:,} target tokens",
            f"  train loss     {fmt(s['loss_first'], '.4f')} (step 1) -> {fmt(s['loss_last'], '.4f')} (step {s['step']})",
        ]
        if s["val_loss"] is not None:
            start = s["val_loss_start"]
            lines.append(
                f"  val loss       {fmt(start, '.4f')} (step 0) -> {s['val_loss']:.4f}, perplexity "
                f"{fmt(math.exp(start) if start is not None else None, ',.1f')} -> {math.exp(s['val_loss']):,.1f}"
            )
        lines += [
            f"  throughput     {s['tok_s']:,.0f} tokens/s"
            + (f", {s['host_syncs']} host syncs per step" if s["host_syncs"] is not None else ""),
            "  MFU            " + (f"{s['mfu']:.1%} of the datasheet peak ({s['mfu_ceilings']['peak_note']}, "
                                    f"{fmt_tflops(s['mfu_ceilings']['peak'])}); " if s["mfu"] is not None else "")
            + f"{fmt(s['mfu_matmul'], '.1%')} of the matmul rate ({s['mfu_ceilings']['matmul_note']}, "
              f"{fmt_tflops(s['mfu_ceilings']['matmul'])})",
            f"  peak memory    {fmt(s['peak_memory_bytes'] and s['peak_memory_bytes'] / 2**20, ',.0f')} MiB ({s['peak_memory_note']})",
            f"  data           {s['data'].get('documents', 0):,} documents, {s['data'].get('sequences', 0):,} sequences, "
            f"kept {s['data'].get('tokens_kept', 0):,} / dropped {s['data'].get('tokens_dropped', 0):,} / "
            f"padded {s['data'].get('pad_tokens', 0):,} tokens",
            f"  checkpoint     {s['checkpoint']}",
            f"  metrics        {self.metrics_path}" + (f", plot {os.path.join(self.run_dir, 'loss.png')}" if self.cfg.logging.plot else ""),
        ]
        if "sample" in s:
            lines += ["  sample:", "    " + s["sample"].replace("\n", "\n    ")]
        lines.append("=" * 72)
        for line in lines:
            self.say(line)
