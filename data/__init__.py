"""Data pipeline for llama-mini: document readers, tokenized datasets, sequence-length policies
and collators. Installed as ``llama_mini.data`` (from the folder ``data/``); it never imports the
rest of ``llama_mini`` and imports its own modules relatively.

    from llama_mini.data import DataPipeline, Tokenizer, ensure_default_data
    dd = ensure_default_data()                       # built-in default data, built once
    pipe = DataPipeline.build(dd.train, Tokenizer(dd.tokenizer), policy="pad+impute", max_len=256)
    for batch in pipe: ...                           # {"input_ids": (B, T), "target_ids": (B, T)}

Stages, each usable alone (see ``docs/data.md``), as modules of ``llama_mini.data``:
  ``reader``          ``PileReader``: streaming ``.jsonl.zst``/``.gz``/``.jsonl`` from files, dirs,
                      globs and URLs; sharding over ranks and workers; shuffle; exact resume
  ``tokenized``       ``TokenizedDataset`` / ``StreamingTokenizedDataset``: BOS + tokens -> tokens + EOS
  ``policies``        sequence-length policies by name (``build_policy``) and their counts
  ``collate``         collators: sequences -> (B, T) tensors
  ``pipeline``        ``DataPipeline``: all of it with one ``state_dict``
  ``builtin``         the built-in default data (Python's standard library as a Pile-format corpus)
  ``preview``         the ``llama-mini data`` command: what a policy makes of some data
  ``tokenizer``       the SentencePiece ``Tokenizer`` and ``train_tokenizer`` (re-exported by llama_mini)
"""

from .builtin import DefaultData, default_cache_dir, ensure_default_data
from .collate import Collator, DocMaskCollator, build_collator
from .compression import CorruptShardError
from .http import HTTPSourceError
from .pipeline import DataPipeline
from .policies import POLICIES, PolicyCounts, SequencePolicy, TrainingSequence, build_policy, register_policy
from .reader import BadDocumentError, PileReader, describe_sample
from .sources import expand_sources, open_shard
from .tokenized import StreamingTokenizedDataset, TokenizedDataset, tokenize_document
from .tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "PileReader", "describe_sample", "expand_sources", "open_shard",
    "CorruptShardError", "BadDocumentError", "HTTPSourceError",
    "TokenizedDataset", "StreamingTokenizedDataset", "tokenize_document",
    "POLICIES", "build_policy", "register_policy", "SequencePolicy", "TrainingSequence", "PolicyCounts",
    "Collator", "DocMaskCollator", "build_collator", "DataPipeline",
    "DefaultData", "default_cache_dir", "ensure_default_data",
    "Tokenizer", "train_tokenizer",
]
