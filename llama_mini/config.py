"""Model configuration: ``ModelArgs`` in Meta's vocabulary, named presets, ``params.json``.

    from llama_mini import ModelArgs
    args = ModelArgs.preset("debug", n_layers=4)        # preset plus overrides
    args = ModelArgs.from_params_json("llama-2-7b/params.json", vocab_size=32000)

Every field is validated in ``__post_init__`` so an impossible configuration fails before any
tensor is allocated, with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelArgs", "PRESETS", "RopeScaling", "ffn_hidden_dim"]

ROPE_SCALING_TYPES = ("none", "linear", "ntk", "llama3")


@dataclass
class RopeScaling:
    """How rotary frequencies are stretched to reach contexts longer than training used."""

    type: str = "none"  # none | linear (position interpolation) | ntk (NTK-aware base) | llama3
    factor: float = 1.0  # context extension factor (new context / original context)
    low_freq_factor: float = 1.0  # llama3 only: wavelengths above orig/low are fully scaled
    high_freq_factor: float = 4.0  # llama3 only: wavelengths below orig/high are untouched
    original_max_seq_len: int = 8192  # llama3 only: the context the model was trained with

    def __post_init__(self) -> None:
        if self.type not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling.type must be one of {ROPE_SCALING_TYPES}, got {self.type!r}")
        if not (self.factor >= 1.0):
            raise ValueError(f"rope_scaling.factor must be >= 1, got {self.factor}")
        if self.type == "llama3" and not (self.high_freq_factor > self.low_freq_factor > 0):
            raise ValueError(
                "rope_scaling: llama3 needs high_freq_factor > low_freq_factor > 0, got "
                f"{self.high_freq_factor} and {self.low_freq_factor}"
            )


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU hidden size: 2/3 of 4*dim, optionally scaled, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelArgs:
    """Shape and behaviour of a LLaMA-style decoder."""

    # --- Meta's fields -------------------------------------------------------------------
    dim: int = 4096  # model (residual stream) width C
    n_layers: int = 32  # number of transformer blocks
    n_heads: int = 32  # query heads; head_dim = dim // n_heads
    n_kv_heads: int | None = None  # key/value heads (GQA); None means n_heads (plain MHA)
    vocab_size: int = 32000  # tokens; -1 (as in Meta's params.json) means "take it from the weights"
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # optional scale of the SwiGLU hidden size
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base: frequency i is theta^(-2i/head_dim)
    max_seq_len: int = 2048  # longest sequence the model accepts (training and the KV cache)
    max_batch_size: int = 32  # KV-cache batch capacity for generation

    # --- llama-mini's additions ------------------------------------------------------------
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)  # context extension
    attn_backend: str = "sdpa"  # attention backend by registry name: eager | sdpa | triton
    norm_impl: str = "auto"  # RMSNorm and residual-add+RMSNorm: auto (triton on CUDA, else torch) | torch | triton
    rope_impl: str = "auto"  # rotary embedding of q and k: auto | torch | triton
    mlp_impl: str = "auto"  # SwiGLU activation silu(a)*b: auto | torch | triton
    loss_impl: str = "auto"  # cross-entropy over materialised logits: auto | torch | triton
    linear_loss_impl: str = "auto"  # output projection + loss in token chunks, logits never whole: auto | torch | triton
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    init_std: float = 0.02  # std of normal weight init; residual outputs scaled by 1/sqrt(2L)
    ignore_index: int = -100  # target id that does not count towards the loss
    validate_inputs: bool = True  # range-check token/target/position ids each forward (one host sync)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len", "max_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.vocab_size, int) or (self.vocab_size <= 0 and self.vocab_size != -1):
            raise ValueError(
                f"ModelArgs.vocab_size must be a positive integer (or -1 = from checkpoint), got {self.vocab_size!r}"
            )
        if self.dim % self.n_heads != 0:
            raise ValueError(f"ModelArgs.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"ModelArgs.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim = dim / n_heads = {self.head_dim} must be even for rotary embeddings")
        if not (self.norm_eps > 0):
            raise ValueError(f"ModelArgs.norm_eps must be > 0, got {self.norm_eps}")
        if not (self.rope_theta > 1):
            raise ValueError(f"ModelArgs.rope_theta must be > 1, got {self.rope_theta}")
        if self.ffn_dim_multiplier is not None and not (self.ffn_dim_multiplier > 0):
            raise ValueError(f"ModelArgs.ffn_dim_multiplier must be > 0, got {self.ffn_dim_multiplier}")
        if not (self.init_std > 0):
            raise ValueError(f"ModelArgs.init_std must be > 0, got {self.init_std}")

    # --- derived quantities -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """The SwiGLU hidden size (Meta's rule)."""
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    # --- presets and (de)serialisation --------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelArgs":
        """A named preset (see ``PRESETS``) with keyword overrides applied."""
        if name not in PRESETS:
            raise KeyError(f"unknown ModelArgs preset {name!r}; choose from {sorted(PRESETS)}")
        values = dict(PRESETS[name])
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "dict") -> "ModelArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ModelArgs field(s) {unknown}")
        return cls(**values)

    def meta_params(self) -> dict[str, Any]:
        """The dict Meta writes as params.json. Keys that LLaMA-2's reference code does not
        know (n_kv_heads, ffn_dim_multiplier, rope_theta, use_scaled_rope) are written only
        when they differ from its defaults, so the file loads in the oldest code that can run
        the model."""
        params: dict[str, Any] = {
            "dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "vocab_size": self.vocab_size, "multiple_of": self.multiple_of, "norm_eps": self.norm_eps,
        }
        if self.n_kv_heads != self.n_heads:
            params["n_kv_heads"] = self.n_kv_heads
        if self.ffn_dim_multiplier is not None:
            params["ffn_dim_multiplier"] = self.ffn_dim_multiplier
        if self.rope_theta != 10000.0:
            params["rope_theta"] = self.rope_theta
        if self.rope_scaling.type == "llama3" and self.rope_scaling == RopeScaling(type="llama3", factor=8.0):
            params["use_scaled_rope"] = True  # Llama 3.1's spelling of its default scaling
        return params

    @classmethod
    def from_params_json(cls, path: str | os.PathLike, **overrides: Any) -> "ModelArgs":
        """Read Meta's params.json (LLaMA 1/2/3). Keyword overrides win (e.g. max_seq_len)."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                params = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"params.json not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(params, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(params).__name__}")
        params = dict(params)
        if params.pop("use_scaled_rope", False):
            params["rope_scaling"] = RopeScaling(type="llama3", factor=8.0)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown} in params.json")
        params.update(overrides)
        try:
            return cls(**params)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


# Named presets. ``debug`` trains a step in well under a second on a CPU; ``homework`` is the
# configuration of the reference homework; the rest are published shapes.
PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=256,
        max_batch_size=8,
    ),
    "homework": dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256, max_seq_len=256),
    "tinyllama-1.1b": dict(
        dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, multiple_of=256, max_seq_len=2048,
    ),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, max_seq_len=4096),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256, max_seq_len=4096),
}
