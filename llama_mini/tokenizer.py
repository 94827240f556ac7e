"""The SentencePiece tokenizer, re-exported: it lives in ``llama_mini.data.tokenizer`` so the data package
can train one without importing ``llama_mini`` (dependencies point one way)."""

from .data.tokenizer import Tokenizer, train_tokenizer

__all__ = ["Tokenizer", "train_tokenizer"]
