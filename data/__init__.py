"""Data pipeline for llama-mini: document readers, tokenized datasets, sequence-length policies
and collators. Never imports ``llama_mini``.

    from data import DataPipeline, Tokenizer, ensure_default_data
    dd = ensure_default_data()                       # built-in default data, built once
    pipe = DataPipeline.build(dd.train, Tokenizer(dd.tokenizer), policy="pad+impute", max_len=256)
    for batch in pipe: ...                           # {"input_ids": (B, T), "target_ids": (B, T)}

Stages, each usable alone (see ``docs/data.md``):
  ``data.reader``     ``PileReader``: streaming ``.jsonl.zst``/``.gz``/``.jsonl`` from files, dirs,
                      globs and URLs; sharding over ranks and workers; shuffle; exact resume
  ``data.tokenized``  ``TokenizedDataset`` / ``StreamingTokenizedDataset``: BOS + tokens -> tokens + EOS
  ``data.policies``   sequence-length policies by name (``build_policy``) and their counts
  ``data.collate``    collators: sequences -> (B, T) tensors
  ``data.pipeline``   ``DataPipeline``: all of it with one ``state_dict``
  ``data.builtin``    the built-in default data (Python's standard library as a Pile-format corpus)
  ``data.tokenizer``  the SentencePiece ``Tokenizer`` and ``train_tokenizer`` (re-exported by llama_mini)
"""

from .collate import Collator, DocMaskCollator, build_collator
from .compression import CorruptShardError
from .http import HTTPSourceError
from .pipeline import DataPipeline
from .policies import POLICIES, PolicyCounts, SequencePolicy, TrainingSequence, build_policy, register_policy
from .reader import BadDocumentError, PileReader, describe_sample
from .sources import expand_sources, open_shard
from .tokenized import StreamingTokenizedDataset, TokenizedDataset, tokenize_document
from .tokenizer import Tokenizer, train_tokenizer


def __getattr__(name: str):
    # data.builtin is imported on first use, so ``python -m data.builtin`` does not find it
    # already imported (runpy warns about that)
    if name in ("DefaultData", "default_cache_dir", "ensure_default_data"):
        from . import builtin

        return getattr(builtin, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")

__all__ = [
    "PileReader", "describe_sample", "expand_sources", "open_shard",
    "CorruptShardError", "BadDocumentError", "HTTPSourceError",
    "TokenizedDataset", "StreamingTokenizedDataset", "tokenize_document",
    "POLICIES", "build_policy", "register_policy", "SequencePolicy", "TrainingSequence", "PolicyCounts",
    "Collator", "DocMaskCollator", "build_collator", "DataPipeline",
    "DefaultData", "default_cache_dir", "ensure_default_data",
    "Tokenizer", "train_tokenizer",
]
