"""Training metrics: a JSONL logger (optionally mirrored to TensorBoard and Weights & Biases),
a reader, a loss/learning-rate plot, model FLOPs utilisation and a sliding-window throughput.

    with MetricsLogger("runs/x/metrics.jsonl", enabled=rank == 0, resume_step=ckpt_step) as log:
        log.log({"loss": 3.2, "lr": 3e-4, "tokens": 65536, "policy": {"kept": 10, "dropped": 1}}, step=1)
    plot_training(read_metrics("runs/x/metrics.jsonl"), "runs/x/training.png", title="debug")

The JSONL file is the record of truth: one object per line, ``{"step", "time", **record}``,
``time`` in Unix seconds. JSON has no NaN or infinity, so such values are written as ``null``
and their "/"-joined key paths listed under ``"nonfinite"``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write, atomic_write_text

__all__ = ["MetricsLogger", "read_metrics", "plot_training", "ema", "mfu", "Throughput"]

_RESERVED = ("step", "time", "nonfinite")


def _clean(value: Any, path: str, nonfinite: list[str]) -> Any:
    """``value`` with 0-d tensors / numpy scalars as Python numbers and non-finite floats as None
    (their paths appended to ``nonfinite``); dicts and lists are walked."""
    if isinstance(value, dict):
        return {k: _clean(v, f"{path}/{k}" if path else str(k), nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, f"{path}/{i}", nonfinite) for i, v in enumerate(value)]
    if not isinstance(value, (str, int, float, bool)) and callable(getattr(value, "item", None)):
        try:
            value = value.item()  # torch / numpy scalar
        except (ValueError, RuntimeError):  # more than one element: left to json's default=str
            return value
    if isinstance(value, float) and not math.isfinite(value):
        nonfinite.append(path)
        return None
    return value


def _leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Flattens nested dicts to {"a/b": leaf}; lists stay leaves."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_leaves(v, f"{path}/{k}" if path else str(k)))
        return out
    return {path: value}


class MetricsLogger:
    """Appends one JSON line per ``log`` call to ``path``; mirrors numbers to TensorBoard / W&B.

    ``enabled=False`` (non-zero ranks) makes every method a no-op and creates nothing.
    ``resume_step``: first rewrite the file (atomically) keeping only records with
    ``step <= resume_step``, because a run killed after its last checkpoint left lines that the
    resumed run will log again; unreadable lines (a torn last write) are dropped with a note.
    ``tensorboard_dir`` needs the tensorboard package; ``wandb`` is a dict of ``wandb.init``
    arguments (project, name, mode = "offline" by default / "online" / "disabled", dir, config);
    mode "disabled" needs no package and logs nothing there.
    """

    def __init__(self, path: str | os.PathLike | None, *, enabled: bool = True, tensorboard_dir: str | None = None,
                 wandb: dict | None = None, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(path) if path is not None else None
        self._file = self._tb = self._wandb = None
        if not enabled:
            return
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("logging.tensorboard needs the tensorboard package: pip install tensorboard") from None
            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))
        if wandb is not None and wandb.get("mode", "offline") != "disabled":
            try:
                import wandb as wandb_lib
            except ImportError:
                raise RuntimeError("logging.wandb needs the wandb package: pip install wandb") from None
            self._wandb = wandb_lib.init(**{"mode": "offline", **wandb})
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.exists():
                self._truncate(resume_step)
            self._file = open(self.path, "a", encoding="utf-8")
            if self._file.tell() > 0:  # a torn last line must not swallow our first one
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        self._file.write("\n")

    def _truncate(self, resume_step: int) -> None:
        keep, dropped_bad = [], 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    dropped_bad += 1
                    continue
                step = rec.get("step") if isinstance(rec, dict) else None
                if not _num(step) or step <= resume_step:  # records without a step are not ours to judge
                    keep.append(line if line.endswith("\n") else line + "\n")
        if dropped_bad:
            print(f"note: {self.path}: dropped {dropped_bad} unreadable line(s) while truncating to step "
                  f"{resume_step}", file=sys.stderr)
        atomic_write_text("".join(keep), self.path)

    def log(self, record: dict, step: int) -> None:
        """Writes ``{"step": step, "time": unix seconds, **record}`` and flushes. Nested dicts are
        kept; TensorBoard gets every finite number as a scalar tagged with its "/"-joined keys."""
        if not self.enabled:
            return
        clash = [k for k in _RESERVED if k in record]
        if clash:
            raise ValueError(f"metrics record uses reserved key(s) {clash}")
        nonfinite: list[str] = []
        clean = _clean(dict(record), "", nonfinite)
        line = {"step": int(step), "time": time.time(), **clean}
        if nonfinite:
            line["nonfinite"] = nonfinite
        if self._file is not None:
            self._file.write(json.dumps(line, allow_nan=False, default=str) + "\n")
            self._file.flush()
        if self._tb is None and self._wandb is None:
            return
        flat = _leaves(clean)
        if self._tb is not None:
            for tag, v in flat.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(tag, v, global_step=int(step))
        if self._wandb is not None:
            self._wandb.log(flat, step=int(step))

    def close(self) -> None:
        """Closes the file and the TensorBoard / W&B writers; safe to call twice."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file = self._tb = self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics JSONL file, in order; blank lines are skipped.
    Raises ValueError naming the file and the 1-based line number of a line that is not a JSON object."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: line {n} is not a JSON object: {line.strip()[:80]!r}")
            records.append(rec)
    return records


def ema(values: list[float]) -> list[float]:
    """Bias-corrected exponential moving average; its window grows with the run (~n/50 points,
    at most 50), so short runs stay readable and long ones smooth without lagging far behind."""
    beta = 1.0 - 1.0 / max(1.0, min(50.0, len(values) / 50))
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i) if beta > 0 else v)
    return out


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_training(records: list[dict], png_path: str | os.PathLike, title: str = "") -> bool:
    """Two panels sharing the step axis: training ``loss`` (raw, faint, plus an EMA line) with
    ``val_loss`` as markers and non-finite losses as red crosses, tokens seen on a top axis when
    records carry a cumulative ``tokens`` count; then ``lr``. Written atomically as PNG (Agg).
    Records without ``loss`` or ``val_loss`` are ignored. Returns False (note on stderr) when
    matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        print("note: matplotlib is not installed, so no training plot was written (pip install matplotlib)",
              file=sys.stderr)
        return False
    recs = [r for r in records if "loss" in r or "val_loss" in r]
    train = sorted((r["step"], r["loss"]) for r in recs if _num(r.get("loss")))
    evals = sorted((r["step"], r["val_loss"]) for r in recs if _num(r.get("val_loss")))
    bad = sorted(r["step"] for r in recs if "loss" in (r.get("nonfinite") or ()))
    lrs = sorted((r["step"], r["lr"]) for r in recs if _num(r.get("lr")))
    toks = sorted((r["step"], r["tokens"]) for r in recs if _num(r.get("tokens")))

    fig = Figure(figsize=(9, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    if train:
        s, v = zip(*train)
        ax.plot(s, v, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss (raw)")
        smooth = ema(list(v))
        ax.plot(s, smooth, color="tab:blue", linewidth=2, label=f"train loss (EMA): {smooth[-1]:.4g} at step {s[-1]}")
    if evals:
        s, v = zip(*evals)
        ax.plot(s, v, "o-", color="tab:orange", markersize=5, linewidth=1,
                label=f"val loss: {v[-1]:.4g} at step {s[-1]}")
    if bad:
        ax.plot(bad, [1.0] * len(bad), "x", color="red", transform=ax.get_xaxis_transform(), clip_on=False,
                label=f"non-finite loss ({len(bad)} step{'s' * (len(bad) != 1)})")
    if not (train or evals):
        ax.text(0.5, 0.5, "no loss records", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=9)
    _tokens_axis(ax, toks, EngFormatter(sep=""))

    if lrs:
        s, v = zip(*lrs)
        ax_lr.plot(s, v, color="tab:green", linewidth=1.5)
    else:
        ax_lr.text(0.5, 0.5, "no lr records", ha="center", va="center", transform=ax_lr.transAxes)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.grid(alpha=0.3)
    if title:
        fig.suptitle(title)

    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=110), "wb")
    return True


def _tokens_axis(ax: Any, toks: list[tuple[int, float]], formatter: Any) -> None:
    """A top x axis in tokens seen when ``tokens`` grows with ``step``; else a corner note."""
    if not toks:
        return
    steps, counts = [float(s) for s, _ in toks], [float(t) for _, t in toks]
    increasing = all(b[0] > a[0] and b[1] > a[1] for a, b in zip(toks, toks[1:]))
    if len(toks) < 2 or not increasing:
        ax.annotate(f"{formatter(counts[-1])} tokens at step {toks[-1][0]}", xy=(0.01, 0.02),
                    xycoords="axes fraction", fontsize=9, color="0.35")
        return
    import numpy as np

    def interp(x: Any, xp: list[float], fp: list[float]) -> Any:  # linear, extrapolated past both ends
        x = np.asarray(x, dtype=float)
        y = np.interp(x, xp, fp)
        lo, hi = (fp[1] - fp[0]) / (xp[1] - xp[0]), (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
        return np.where(x < xp[0], fp[0] + (x - xp[0]) * lo, np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * hi, y))

    top = ax.secondary_xaxis("top", functions=(lambda x: interp(x, steps, counts), lambda t: interp(t, counts, steps)))
    top.set_xlabel("tokens seen")
    top.xaxis.set_major_formatter(formatter)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_device: float | None,
        n_devices: int) -> float | None:
    """Model FLOPs utilisation, a fraction in [0, 1]: achieved FLOP/s
    (``tokens_per_s`` * ``flops_per_token``, all devices together) over
    ``peak_flops_per_device`` (FLOP/s, e.g. from ``hardware.peak_flops``) * ``n_devices``.
    None without a peak."""
    if peak_flops_per_device is None or peak_flops_per_device <= 0:
        return None
    if n_devices < 1:
        raise ValueError(f"n_devices must be at least 1, got {n_devices}")
    return tokens_per_s * flops_per_token / (peak_flops_per_device * n_devices)


class Throughput:
    """Tokens per second over the last ``window`` steps (``time.perf_counter`` wall clock).

    Call ``update(tokens)`` once per step, right after it; a step's time runs from the previous
    ``update`` (or ``reset``, or construction). Call ``reset()`` after a pause (evaluation,
    checkpointing) so the pause is not counted; the window's earlier steps are kept.
    """

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._steps: deque[tuple[float, float]] = deque(maxlen=window)  # (tokens, seconds)
        self._last = time.perf_counter()

    def reset(self) -> None:
        """Restarts the clock: the time since the last ``update`` is not counted."""
        self._last = time.perf_counter()

    def update(self, tokens: int | float) -> float:
        """Records one step of ``tokens`` tokens; returns the current rate in tokens/s."""
        now = time.perf_counter()
        self._steps.append((float(tokens), now - self._last))
        self._last = now
        return self.rate

    @property
    def rate(self) -> float:
        """Tokens/s over the window; 0.0 before the first step."""
        seconds = sum(s for _, s in self._steps)
        return sum(t for t, _ in self._steps) / seconds if seconds > 0 else 0.0
