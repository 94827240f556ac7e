"""llama-mini: a from-scratch LLaMA-style decoder you can read, train and measure.

    from llama_mini import ModelArgs, Transformer
    model = Transformer(ModelArgs.preset("debug"))

Public pieces: ``ModelArgs`` and presets, the model (``Transformer`` and its blocks), the
attention-backend and op registries, checkpoint I/O (Meta format, Hugging Face conversion),
the SentencePiece ``Tokenizer`` and ``train_tokenizer``, and KV-cache ``generate``.
Triton is optional: importing this package never imports it.
"""

from .attention import attention_backends, attention_fallbacks, get_attention_backend, register_attention_backend
from .checkpoint import (
    CheckpointMismatchError,
    check_state_dict,
    load_meta_checkpoint,
    load_meta_state_dict,
    save_meta_checkpoint,
)
from .config import PRESETS, ModelArgs, RopeScaling
from .generation import GenerationResult, generate
from .hf import args_from_hf_config, hf_config_dict, hf_to_meta_state_dict, meta_to_hf_state_dict
from .kv_cache import KVCache
from .model import Attention, FeedForward, RMSNorm, Transformer, TransformerBlock, count_params
from . import fused  # registers the Triton implementations of the ops  # noqa: F401
from .ops import fallbacks as op_fallbacks
from .ops import register_op, resolutions
from .parallel import gather_state_dict, merge_state_dicts, shard_state_dict
from .rope import apply_rotary_emb, precompute_freqs_cis
from .tokenizer import Tokenizer, train_tokenizer

__version__ = "0.1.0"

__all__ = [
    "ModelArgs", "RopeScaling", "PRESETS",
    "Transformer", "TransformerBlock", "Attention", "FeedForward", "RMSNorm", "count_params",
    "register_attention_backend", "attention_backends", "get_attention_backend", "attention_fallbacks",
    "register_op", "resolutions", "op_fallbacks",
    "KVCache", "generate", "GenerationResult",
    "save_meta_checkpoint", "load_meta_checkpoint", "load_meta_state_dict", "check_state_dict",
    "CheckpointMismatchError",
    "meta_to_hf_state_dict", "hf_to_meta_state_dict", "hf_config_dict", "args_from_hf_config",
    "shard_state_dict", "merge_state_dicts", "gather_state_dict",
    "apply_rotary_emb", "precompute_freqs_cis",
    "Tokenizer", "train_tokenizer",
]
