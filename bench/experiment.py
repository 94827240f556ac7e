"""Shared pieces of the experiment scripts (``seq_len_ablation``, ``sweep``, ``epoch_frenzy``,
``context_length``): fixed inputs, a small deterministic training loop, and the report folder.

Not a runnable script; a script in ``bench/`` imports it with ``from experiment import ...``.

options   ``data_arguments`` (--data, --val-data, --tokenizer) and ``data_sources`` (the built-in
          default data where they are not given), ``device_arguments`` (one thread on CPU),
          ``field_value`` (a ``ModelArgs`` field parsed from text by its type).
inputs    ``first_documents(source, n, tokenizer)``: the first ``n`` documents of a source, in
          file order, tokenized (``[BOS] + text`` -> ``text + [EOS]``), an error if there are fewer;
          ``read_documents``: the first ``limit`` or just enough for ``need_tokens``;
          ``batches_of(examples, policy, max_len, batch_size)``: every batch a policy makes of
          them, plus the policy and its counts; ``eval_batches``: fixed validation batches
          (``impute``: full windows, no padding).
training  ``build_model(args, seed, device)`` (weights depend on the seed only) and ``fit``: one
          optimizer step per batch, until a step count, a budget of counted target tokens, or the
          data runs out; each step is the trainer's (``llama_mini.training.step.train_step``:
          AdamW from ``optim.build_optimizer``, global-norm clipping, fp32, one host read of
          loss and norm after the count ``fit`` takes on the CPU). It records per step the loss, the counted
          targets n (targets != ignore_index), the positions (B * T, padding included), the
          cumulative tokens seen (sum of n) and the learning rate, and evaluates at chosen
          token counts. Everything is seeded, so two runs of a script give the same numbers on
          the same machine and torch build.
report    ``Report(out_dir)``: ``report.md`` (Markdown tables and figures), ``results.json`` /
          ``results.csv`` (metadata: device, versions, date, configuration) and PNG figures;
          ``markdown_table``; ``plot_curves`` (one axis per group of labelled curves).

The loss ``fit`` records is the model's mean cross-entropy over the counted targets of a batch;
curves against tokens seen put runs with different padding or sequence lengths on one axis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from common import (add_device_arguments, environment, markdown_table, pyplot, utc_now_iso, versions, write_csv,
                    write_json)

from llama_mini.data import PileReader, Tokenizer, build_policy
from llama_mini.data.tokenized import tokenize_document
from llama_mini import ModelArgs, Transformer
from llama_mini.parallel import init_weights
from llama_mini.training.config import coerce_field
from llama_mini.training.evaluate import evaluate_loss
from llama_mini.training.optim import build_optimizer, lr_at
from llama_mini.training.step import train_step

__all__ = [
    "data_arguments", "data_sources", "device_arguments", "field_value", "read_documents", "first_documents",
    "batches_of", "eval_batches", "build_model", "FitConfig", "FitResult", "fit", "Report", "markdown_table",
    "plot_curves", "say", "config_dict", "timed",
]


def say(tag: str, message: str) -> None:
    """A progress line on stderr, flushed (tables and reports go to stdout and files)."""
    print(f"[{tag}] {message}", file=sys.stderr, flush=True)


# ---- inputs ---------------------------------------------------------------------------------

def data_arguments(group: Any, train_default: str = "the default data's train split") -> None:
    """``--data``, ``--val-data`` and ``--tokenizer``, which ``data_sources`` reads."""
    group.add_argument("--data", help=f"training source: file, glob, directory or URL [{train_default}]")
    group.add_argument("--val-data", help="validation source [the default data's val split]; required with --data")
    group.add_argument("--tokenizer", help="SentencePiece .model [the default data's tokenizer]")


def data_sources(args: Any) -> tuple[Tokenizer, str, str]:
    """The tokenizer and the train / validation sources from ``args.tokenizer``, ``args.data`` and
    ``args.val_data``; the built-in default data's where one is not given."""
    if args.data and args.tokenizer:
        return Tokenizer(args.tokenizer), args.data, args.val_data
    from llama_mini.data.builtin import ensure_default_data

    dd = ensure_default_data(progress=False)
    return Tokenizer(args.tokenizer or dd.tokenizer), args.data or dd.train, args.val_data or dd.val


def read_documents(source: Any, tokenizer: Any, need_tokens: int = 0, limit: int = 0) -> list[dict]:
    """Documents of ``source`` in file order, tokenized: the first ``limit`` (if > 0), else just
    enough to hold ``need_tokens`` tokens (fewer if the source ends first)."""
    reader = PileReader(source, max_documents=limit or None, keep_meta=True, shuffle=False, rank=0, world_size=1)
    examples, total = [], 0
    for doc in reader:
        examples.append(tokenize_document(tokenizer, doc))
        total += len(examples[-1]["input_ids"])
        if not limit and total >= need_tokens:
            break
    return examples


def first_documents(source: Any, n: int, tokenizer: Any) -> list[dict]:
    """The first ``n`` documents of ``source`` (a shard, glob, directory or URL), in order,
    tokenized. Raises ``ValueError`` naming the source when it holds fewer than ``n``."""
    if n < 1:
        raise ValueError(f"the number of documents must be >= 1, got {n}")
    examples = read_documents(source, tokenizer, limit=n)
    if len(examples) < n:
        raise ValueError(f"{source}: asked for the first {n} documents, but it holds only {len(examples)}")
    return examples


def batches_of(examples: Sequence[dict], policy: str, max_len: int | None, batch_size: int, *,
               pad_id: int, ignore_index: int = -100, **options: Any) -> tuple[list[dict], Any]:
    """Every batch ``policy`` makes of ``examples`` (in order, last batch kept) and the policy,
    whose ``counts`` and resolved ``max_len`` describe them."""
    kwargs = dict(pad_id=pad_id, ignore_index=ignore_index, **options)
    if max_len is not None:
        kwargs["max_len"] = max_len
    pol = build_policy(policy, **kwargs)
    return list(pol.batches(examples, batch_size)), pol


def eval_batches(examples: Sequence[dict], max_len: int, batch_size: int, n_batches: int, *, pad_id: int,
                 ignore_index: int = -100, where: str = "validation data") -> list[dict]:
    """The first ``n_batches`` batches of full ``max_len`` windows of ``examples`` (``impute``)."""
    batches, _ = batches_of(examples, "impute", max_len, batch_size, pad_id=pad_id, ignore_index=ignore_index)
    full = [b for b in batches if b["input_ids"].shape[0] == batch_size][:n_batches]
    if not full:
        raise ValueError(f"{where} holds fewer than {batch_size * max_len} tokens: not one batch of "
                         f"{batch_size} x {max_len}; use more documents, a smaller batch or a shorter length")
    return full


# ---- training -------------------------------------------------------------------------------

def field_value(name: str, text: str) -> Any:
    """``text`` parsed to the type of ``ModelArgs.<name>`` by the trainer's own rules
    (``llama_mini.training.config.coerce_field``: ``none`` for optional fields, true/false,
    ints, floats); ``ValueError`` naming the field otherwise."""
    names = [f.name for f in dataclasses.fields(ModelArgs)]
    if name not in names:
        raise ValueError(f"unknown ModelArgs field {name!r} (fields: {', '.join(names)})")
    return coerce_field(ModelArgs, name, text, name, "command line")


def device_arguments(group: Any) -> None:
    """``common.add_device_arguments`` with the experiments' --threads default in its help: one
    thread on CPU. These models gain at most ~1.6x from a second core of an idle 2-core machine,
    and lose 4-12x when another process keeps one core busy (measured here: a dim-128 step of
    8 x 42 tokens took 0.09 s on one thread and 1.15 s on two beside a busy core), so one thread
    is the setting whose timings mean something on a shared machine."""
    add_device_arguments(group)
    for action in group._group_actions:
        if action.dest == "threads":
            action.help = "torch.set_num_threads [1 on CPU defaults and --quick; --full: torch's default]"


def build_model(args: ModelArgs, seed: int, device: torch.device | str) -> Transformer:
    """A fresh model whose weights depend on ``seed`` only (``llama_mini.parallel.init_weights``)."""
    model = Transformer(args)
    init_weights(model, seed)
    return model.to(device)


@dataclass
class FitConfig:
    """AdamW and the learning-rate schedule of ``fit`` (``llama_mini.training.optim``)."""

    lr: float = 1e-3  # peak learning rate
    warmup_steps: int = 10  # linear warmup from lr/warmup to lr
    decay: str = "constant"  # after warmup: constant | cosine | linear (over total_steps)
    min_lr_ratio: float = 0.1  # floor of cosine/linear decay, as a fraction of lr
    weight_decay: float = 0.1  # on matrices only
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = none
    seed: int = 0  # weight init and any dropout-free randomness


@dataclass
class FitResult:
    """What ``fit`` saw: per-step records, evaluations, why it stopped and the time it took."""

    steps: list[dict] = field(default_factory=list)  # step, loss, tokens, positions, tokens_seen, lr
    evals: list[dict] = field(default_factory=list)  # step, tokens_seen, val_loss
    stopped: str = ""  # "steps", "budget" or "data"
    seconds: float = 0.0

    @property
    def tokens_seen(self) -> int:
        return self.steps[-1]["tokens_seen"] if self.steps else 0

    def mean_loss(self, first: int | None = None, last: int | None = None) -> float | None:
        """Token-weighted mean training loss over the first ``first`` steps, or the last ``last``
        (all when neither is given)."""
        rows = self.steps[:first] if first is not None else self.steps[-last:] if last else self.steps
        n = sum(r["tokens"] for r in rows)
        return sum(r["loss"] * r["tokens"] for r in rows) / n if n else None

    def final_train_loss(self) -> float | None:
        """Token-weighted mean training loss of the last 10% of the steps (at least one)."""
        return self.mean_loss(last=max(1, len(self.steps) // 10))

    def val_at(self, tokens: int) -> float | None:
        """Validation loss at exactly ``tokens`` counted targets seen, interpolated linearly in
        tokens between the evaluations just before and just after the step that crossed it
        (``fit`` makes both for each of its ``eval_at_tokens``); None if the run never got there."""
        after = next((i for i, e in enumerate(self.evals) if e["tokens_seen"] >= tokens), None)
        if after is None:
            return None
        hi = self.evals[after]
        if hi["tokens_seen"] == tokens or after == 0:
            return hi["val_loss"]
        lo = self.evals[after - 1]
        w = (tokens - lo["tokens_seen"]) / (hi["tokens_seen"] - lo["tokens_seen"])
        return lo["val_loss"] + w * (hi["val_loss"] - lo["val_loss"])


def fit(model: Transformer, batches: Iterable[dict], cfg: FitConfig, *, max_steps: int | None = None,
        token_budget: int | None = None, total_steps: int | None = None,
        val_batches: Sequence[dict] | None = None, eval_at_tokens: Sequence[int] = (),
        eval_every_steps: int = 0, device: torch.device | str = "cpu", tag: str = "fit",
        log_every_s: float = 30.0) -> FitResult:
    """Train ``model`` on ``batches``: one step of the trainer's ``train_step`` per batch (AdamW
    at the scheduled lr, clipping at ``cfg.grad_clip``). A step whose loss or gradient norm is
    not finite is not applied and raises ``FloatingPointError`` naming it.

    Stops after ``max_steps`` steps, once ``token_budget`` counted targets were seen (the step
    that crosses it is the last), or when ``batches`` ends; ``FitResult.stopped`` says which.
    ``total_steps`` sets the length of a cosine/linear decay (default: ``max_steps``).
    Validation (token-weighted mean loss over ``val_batches``) runs before the first step, just
    before and just after the step that first reaches each of ``eval_at_tokens`` (so
    ``FitResult.val_at`` can interpolate to that exact count), every ``eval_every_steps`` steps,
    and after the last step. A progress line goes to stderr every ``log_every_s`` seconds.
    """
    if max_steps is None and token_budget is None:
        raise ValueError("fit needs max_steps or token_budget (or both)")
    decay_steps = total_steps or max_steps or 1
    if cfg.decay != "constant" and not (total_steps or max_steps):
        raise ValueError(f"decay {cfg.decay!r} needs total_steps or max_steps")
    device = torch.device(device)
    ignore = model.args.ignore_index
    opt = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    pending = sorted(set(int(t) for t in eval_at_tokens))
    result = FitResult()
    torch.manual_seed(cfg.seed)

    def evaluate(step: int, seen: int) -> None:
        if val_batches and not (result.evals and result.evals[-1]["step"] == step):
            loss = evaluate_loss(model, val_batches, device=device)["loss"]
            result.evals.append({"step": step, "tokens_seen": seen, "val_loss": loss})

    start = last_log = time.perf_counter()
    evaluate(0, 0)
    seen, step = 0, 0
    model.train()
    result.stopped = "data"
    for batch in batches:
        lr = lr_at(step, lr=cfg.lr, min_lr=cfg.lr * cfg.min_lr_ratio, warmup_steps=cfg.warmup_steps,
                   total_steps=decay_steps, decay=cfg.decay)
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "target_ids", "position_ids", "document_ids")
                  and v is not None}
        # counted here (the batch is still on the CPU), before the step: an evaluation may be due
        # before it; the step is given the count instead of reading it again
        n = int((inputs["target_ids"] != ignore).sum())
        if n == 0:  # an all-padding batch has no loss (mean over nothing); the policy never makes one
            raise ValueError(f"{tag}: batch {step} has no counted target token")
        if pending and seen + n >= pending[0] > seen:
            evaluate(step, seen)  # the lower end of the interpolation to pending[0]
        out = train_step(model, opt, [inputs], lr=lr, grad_clip=cfg.grad_clip, device=device, ignore_index=ignore,
                         counts=[n])
        step += 1
        seen += n
        value = out.loss
        if out.nonfinite:
            raise FloatingPointError(f"{tag}: the loss became {value} (gradient norm {out.grad_norm}) at step {step}")
        result.steps.append({"step": step, "loss": value, "tokens": n, "positions": out.processed,
                             "tokens_seen": seen, "lr": lr})
        crossed = bool(pending) and seen >= pending[0]
        while pending and seen >= pending[0]:
            pending.pop(0)
        if crossed or (eval_every_steps and step % eval_every_steps == 0):
            evaluate(step, seen)
        now = time.perf_counter()
        if now - last_log >= log_every_s:
            say(tag, f"step {step}  loss {value:.4f}  tokens {seen:,}  ({now - start:.0f}s)")
            last_log = now
        if max_steps is not None and step >= max_steps:
            result.stopped = "steps"
            break
        if token_budget is not None and seen >= token_budget:
            result.stopped = "budget"
            break
    evaluate(step, seen)
    result.seconds = time.perf_counter() - start
    return result


# ---- report ---------------------------------------------------------------------------------

def plot_curves(path: Path, panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]], *,
                xlabel: str | Sequence[str], ylabel: str, title: str = "", logx: bool = False, ncols: int = 2) -> bool:
    """One axis per panel, one labelled line per curve (x, y); False when matplotlib is missing.
    ``xlabel`` is one label for every panel or one per panel."""
    plt = pyplot()
    if plt is None:
        return False
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.2 * nrows), squeeze=False)
    xlabels = [xlabel] * len(panels) if isinstance(xlabel, str) else list(xlabel)
    for ax, xl, (name, curves) in zip(axes.flat, xlabels, panels.items()):
        for label, (xs, ys) in curves.items():
            ax.plot(xs, ys, label=label, linewidth=1.2, marker="." if len(xs) <= 20 else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xl)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


class Report:
    """An experiment's output folder: ``report.md``, ``results.json``, ``results.csv``, PNGs."""

    def __init__(self, out_dir: Path | str, title: str, device: torch.device, config: dict[str, Any]) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.meta: dict[str, Any] = {"date": utc_now_iso(), **versions(), "environment": environment(device),
                                     "config": config}
        self.meta["device_name"] = self.meta["environment"].get("device_name")
        self.sections: list[str] = []

    def add(self, text: str) -> None:
        """Append a Markdown block (a heading, a paragraph, a table)."""
        self.sections.append(text.strip("\n"))

    def figure(self, name: str, caption: str, draw: Callable[[Path], bool]) -> None:
        """Draw ``name`` (a PNG file name) with ``draw(path)`` and reference it in the report."""
        path = self.out / name
        if draw(path):
            self.add(f"![{caption}]({name})\n\n*{caption}*")
        else:
            self.add(f"*{caption}: not drawn (matplotlib is not installed).*")

    def machine(self) -> str:
        env = self.meta["environment"]
        return (f"{env.get('device_name')} ({env.get('device_type')}, {env.get('cpu_count')} CPUs, "
                f"{env.get('torch_threads')} torch threads), torch {self.meta['torch']}, "
                f"python {self.meta['python']}, {self.meta['date']}")

    def write(self, rows: list[dict[str, Any]], fields: Sequence[str], extra: dict[str, Any] | None = None) -> Path:
        """Write ``results.json`` (metadata, rows, ``extra``), ``results.csv`` and ``report.md``."""
        meta = dict(self.meta, **(extra or {}))
        write_json(self.out / "results.json", meta, rows)
        write_csv(self.out / "results.csv", meta, rows, fields, meta_keys=("date", "device_name", "torch", "python",
                                                                             "config"))
        head = f"# {self.title}\n\nMachine: {self.machine()}.\n\nConfiguration:\n\n```json\n" \
               f"{json.dumps(self.meta['config'], indent=1, default=str)}\n```"
        path = self.out / "report.md"
        path.write_text("\n\n".join([head] + self.sections) + "\n", encoding="utf-8")
        return path


def config_dict(args: Any) -> dict[str, Any]:
    """An argparse namespace or dataclass as a JSON-friendly dict (for the report's metadata)."""
    d = asdict(args) if hasattr(args, "__dataclass_fields__") else dict(vars(args))
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


@contextlib.contextmanager
def timed(tag: str, what: str) -> Iterator[None]:
    """Say ``what`` on stderr and, when the block ends, how long it took."""
    say(tag, what + " ...")
    start = time.perf_counter()
    yield
    say(tag, f"{what}: done in {time.perf_counter() - start:.1f}s")
