"""The trainer's data: sources and tokenizer from the config, training streams, validation batches.

Data streams. The training data is read as ``S = data.streams`` independent streams (reader
shards: stream s reads what ``PileReader(rank=s, world_size=S)`` owns). Data-parallel rank r of D
owns streams ``r*S/D .. (r+1)*S/D - 1`` and micro-step j of a step takes its micro-batch from its
stream ``j mod S/D``. So one optimizer step always consumes, from each stream, the same number of
micro-batches, and the global batch of step t is the same set of sequences for any layout with
the same S and the same global batch (micro-batch x accumulation x D): one process with
``--schedule.grad_accum 2 --data.streams 2`` sees exactly what two data-parallel ranks with
``--data.streams 2`` see. By default S = D.

Each stream loops over its data forever, one epoch after another (the reader reshuffles per
epoch); its state (epoch, reader position, policy buffers) resumes exactly.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterator

from ..data import DataPipeline, Tokenizer

from .config import DataConfig
from .distributed import DistInfo, barrier

__all__ = ["ResolvedData", "resolve_data", "TrainStreams", "validation_batches", "model_vocab_size"]


@dataclass
class ResolvedData:
    train: list[str]
    val: list[str]
    tokenizer: str
    builtin: bool  # the built-in default data


def resolve_data(cfg: DataConfig, dist_info: DistInfo, progress: bool = True) -> ResolvedData:
    """Sources and tokenizer path: the config's, or the built-in default data (built once, on
    rank 0 first so the others find it cached)."""
    if cfg.train:
        if not cfg.tokenizer:
            raise ValueError(
                "data.tokenizer: training on your own sources (data.train) needs a SentencePiece "
                "tokenizer .model (e.g. Meta's tokenizer.model, or one from llama_mini.train_tokenizer)"
            )
        return ResolvedData(list(cfg.train), list(cfg.val), cfg.tokenizer, builtin=False)
    from ..data.builtin import ensure_default_data

    if dist_info.is_main:
        dd = ensure_default_data(vocab_size=cfg.default_vocab, progress=progress)
    barrier()
    if not dist_info.is_main:
        dd = ensure_default_data(vocab_size=cfg.default_vocab, progress=False)
    return ResolvedData([dd.train], [dd.val], cfg.tokenizer or dd.tokenizer, builtin=True)


def model_vocab_size(requested: int, tokenizer: Tokenizer, mp_size: int, field: str = "model.vocab_size") -> int:
    """-1: the tokenizer's vocabulary rounded up to a multiple of lcm(64, mp_size) (fast matmuls,
    and divisible by the model-parallel size). Otherwise the requested size, which must hold
    every token id."""
    if requested == -1:
        step = math.lcm(64, mp_size)
        return -(-tokenizer.vocab_size // step) * step
    if requested < tokenizer.vocab_size:
        raise ValueError(
            f"{field}={requested} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size}); "
            "use -1 to take it from the tokenizer"
        )
    return requested


def _policy_options(cfg: DataConfig, policy: str) -> dict[str, Any]:
    if policy == "informed":
        return {"tolerance": cfg.tolerance}
    if policy in ("best-fit", "packed-docmask"):
        return {"buffer_size": cfg.pack_buffer}
    return {}


def _reader_options(cfg: DataConfig) -> dict[str, Any]:
    return dict(
        include_sets=cfg.include_sets or None, exclude_sets=cfg.exclude_sets or None,
        max_documents=cfg.max_documents or None, on_error=cfg.on_error,
    )


class TrainStreams:
    """This data-parallel rank's training streams (see the module docstring)."""

    def __init__(self, cfg: DataConfig, sources: list[str], tokenizer: Tokenizer, max_len: int | None,
                 dist_info: DistInfo, grad_accum: int, ignore_index: int = -100) -> None:
        n = cfg.streams or dist_info.dp_size
        if n % dist_info.dp_size:
            raise ValueError(f"data.streams={n} must be a multiple of the data-parallel size {dist_info.dp_size}")
        per_rank = n // dist_info.dp_size
        if grad_accum % per_rank:
            raise ValueError(
                f"schedule.grad_accum={grad_accum} must be a multiple of the streams per data-parallel rank "
                f"({per_rank} = data.streams {n} / data-parallel size {dist_info.dp_size})"
            )
        self.num_streams = n
        self.ids = [dist_info.dp_rank * per_rank + i for i in range(per_rank)]
        self.pipelines = [
            DataPipeline.build(
                sources, tokenizer, policy=cfg.policy, max_len=max_len, batch_size=cfg.batch_size,
                policy_options=_policy_options(cfg, cfg.policy), ignore_index=ignore_index,
                shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                rank=sid, world_size=n, **_reader_options(cfg),
            )
            for sid in self.ids
        ]
        self.epochs = [0] * per_rank
        self._iters: list[Iterator | None] = [None] * per_rank

    def next_batch(self, micro_step: int) -> dict:
        """The micro-batch for micro-step ``micro_step`` of the current optimizer step."""
        i = micro_step % len(self.pipelines)
        for attempt in range(2):
            if self._iters[i] is None:
                self._iters[i] = iter(self.pipelines[i])
            try:
                return next(self._iters[i])
            except StopIteration:
                self._iters[i] = None
                self.epochs[i] += 1
                self.pipelines[i].set_epoch(self.epochs[i])
        raise ValueError(
            f"training stream {self.ids[i]} of {self.num_streams} yields no batch: its share of data.train "
            "holds no document that survives the policy (fewer shards/documents than streams?)"
        )

    def state_dict(self) -> dict:
        return {
            "num_streams": self.num_streams,
            "streams": {sid: {"epoch": e, "pipeline": p.state_dict()}
                        for sid, e, p in zip(self.ids, self.epochs, self.pipelines)},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_streams") != self.num_streams:
            raise ValueError(f"checkpoint has {state.get('num_streams')} data streams, this run {self.num_streams} (data.streams)")
        for i, sid in enumerate(self.ids):
            if sid not in state["streams"]:
                raise ValueError(f"checkpoint has no state for data stream {sid}")
            saved = state["streams"][sid]
            self.epochs[i] = int(saved["epoch"])
            self.pipelines[i].set_epoch(self.epochs[i])
            self.pipelines[i].load_state_dict(saved["pipeline"])
            self._iters[i] = None

    def counts(self) -> dict[str, int]:
        """This rank's policy counts summed over its streams (ints only), plus epochs."""
        total: dict[str, int] = {}
        for p in self.pipelines:
            for k, v in p.counts()["policy"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
        total["epochs_completed"] = sum(self.epochs)
        return total


def validation_batches(cfg: DataConfig, sources: list[str], tokenizer: Tokenizer, max_len: int, num_batches: int,
                       dist_info: DistInfo, ignore_index: int = -100) -> Iterator[dict]:
    """This data-parallel rank's share of the first ``num_batches`` validation batches.

    The batches are those of one unsharded pass over the validation data, cut by
    ``data.val_policy`` (the same tokens whatever the training policy), and rank r of D takes
    batches r, r + D, r + 2D, ...: so every evaluation, under any process layout, measures the
    same tokens. Each rank reads (cheaply) the whole prefix and computes only its own batches."""
    options = _reader_options(cfg)
    options["max_documents"] = None  # a cap on training documents, not on validation
    pipe = DataPipeline.build(
        sources, tokenizer, policy=cfg.val_policy, max_len=max_len, batch_size=cfg.batch_size,
        policy_options=_policy_options(cfg, cfg.val_policy), ignore_index=ignore_index,
        shuffle=False, rank=0, world_size=1, **options,
    )
    return itertools.islice(pipe, dist_info.dp_rank, num_batches, dist_info.dp_size)
