"""The LLaMA decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

    from llama_mini import ModelArgs, Transformer
    model = Transformer(ModelArgs.preset("debug"))
    logits = model(tokens)                   # (B, T) int64 -> (B, T, V) fp32
    loss = model(tokens, targets)            # mean CE over targets != ignore_index

Architecture (shapes for one process; under model parallel H, Hkv, hidden are per rank):

    h = tok_embeddings(tokens)                                   (B, T, C)
    for each TransformerBlock:
        h = h + attention(attention_norm(h))                      q (B, T, H, D), k/v (B, T, Hkv, D)
        h = h + feed_forward(ffn_norm(h))                         w2(silu(w1 x) * w3 x)
    logits = output(norm(h))                                     (B, T, V)

Two forward paths share the weights:
- ``forward``: cache-free training/eval path; logits for every position, or the loss.
- ``forward_inference``: the KV-cache generation path (``KVCache``), fed a few tokens at a
  time starting at ``start_pos``.

Parameter names are Meta's, so ``consolidated.00.pth`` loads with ``load_state_dict``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from . import ops, parallel
from .attention import get_attention_backend
from .config import ModelArgs
from .kernels.common import host_read
from .kv_cache import KVCache
from .rope import RotaryEmbedding, rope_frequencies

__all__ = ["RMSNorm", "Attention", "FeedForward", "TransformerBlock", "Transformer", "count_params"]


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim (weight initialised to ones)."""

    def __init__(self, dim: int, eps: float = 1e-5, impl: str = "auto") -> None:
        super().__init__()
        self.eps = eps
        self.impl = impl
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.resolve_op("rms_norm", self.impl, x.device)(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add fused with this norm: h = x + residual; returns (norm(h), h)."""
        return ops.resolve_op("add_rms_norm", self.impl, x.device)(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads and rotary position embeddings."""

    def __init__(self, args: ModelArgs, parallel_layers: bool = False, mp_size: int = 1) -> None:
        super().__init__()
        self.args = args
        self.n_local_heads = args.n_heads // mp_size
        self.n_local_kv_heads = args.n_kv_heads // mp_size
        self.head_dim = args.head_dim
        std, out_std = args.init_std, args.init_std / math.sqrt(2 * args.n_layers)
        self.wq = parallel.column_linear(args.dim, args.n_heads * self.head_dim, std, parallel_layers)
        self.wk = parallel.column_linear(args.dim, args.n_kv_heads * self.head_dim, std, parallel_layers)
        self.wv = parallel.column_linear(args.dim, args.n_kv_heads * self.head_dim, std, parallel_layers)
        self.wo = parallel.row_linear(args.n_heads * self.head_dim, args.dim, out_std, parallel_layers)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer_id: int = 0,
        start_pos: int = 0,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C). cos, sin: (L, D/2) rotary tables; token (b, t) uses row
        position_ids[b, t], or row t when position_ids is None (the caller slices the tables
        to start at start_pos). Returns (B, T, C)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_local_heads, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(B, T, self.n_local_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.wv(x).view(B, T, self.n_local_kv_heads, self.head_dim)
        q, k = ops.resolve_op("rope", self.args.rope_impl, x.device)(q, k, cos, sin, position_ids)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if cache is not None:
            k, v = cache.update(layer_id, start_pos, k, v)  # (B, Hkv, start_pos + T, D)
        attn = get_attention_backend(self.args.attn_backend, x.device)
        out = attn(q, k, v, causal=True, document_ids=document_ids, scale=self.head_dim**-0.5)
        out = out.transpose(1, 2).reshape(B, T, self.n_local_heads * self.head_dim)  # (B, T, H*D)
        return self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x), hidden size by Meta's rule (``ModelArgs.hidden_dim``)."""

    def __init__(self, args: ModelArgs, parallel_layers: bool = False) -> None:
        super().__init__()
        self.impl = args.mlp_impl
        hidden = args.hidden_dim
        std, out_std = args.init_std, args.init_std / math.sqrt(2 * args.n_layers)
        self.w1 = parallel.column_linear(args.dim, hidden, std, parallel_layers)
        self.w2 = parallel.row_linear(hidden, args.dim, out_std, parallel_layers)
        self.w3 = parallel.column_linear(args.dim, hidden, std, parallel_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        swiglu = ops.resolve_op("swiglu", self.impl, x.device)
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, layer_id: int, args: ModelArgs, parallel_layers: bool = False, mp_size: int = 1) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, parallel_layers, mp_size)
        self.feed_forward = FeedForward(args, parallel_layers)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, args.norm_impl)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, args.norm_impl)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start_pos: int = 0,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attn = self.attention(self.attention_norm(x), cos, sin, document_ids, cache, self.layer_id, start_pos, position_ids)
        normed, h = self.ffn_norm.add_forward(x, attn)  # h = x + attn in the same pass as ffn_norm(h)
        return h + self.feed_forward(normed)


def count_params(args: ModelArgs, include_embeddings: bool = True) -> int:
    """Parameters of the full (unsharded) model, computed from the arguments alone."""
    C, D, V = args.dim, args.head_dim, args.vocab_size
    attn = C * args.n_heads * D * 2 + C * args.n_kv_heads * D * 2  # wq, wo, wk, wv
    ffn = 3 * C * args.hidden_dim
    per_layer = attn + ffn + 2 * C
    total = args.n_layers * per_layer + C + V * C  # + final norm + output
    if include_embeddings:
        total += V * C
    return total


class Transformer(nn.Module):
    """The decoder-only LLaMA model. See the module docstring for shapes and paths."""

    def __init__(self, args: ModelArgs, model_parallel: bool | None = None) -> None:
        """``model_parallel``: None = use fairscale's layers iff its model parallel is
        initialised with size > 1; False = plain layers even then (a reference copy);
        True = require initialised model parallel (an error otherwise)."""
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError(
                "ModelArgs.vocab_size is -1 (unknown); set it, or load with load_meta_checkpoint, "
                "which reads it from the weights"
            )
        if model_parallel is True and not parallel.model_parallel_is_initialized():
            raise RuntimeError(
                "Transformer(model_parallel=True) but fairscale model parallel is not initialised; call "
                "fairscale.nn.model_parallel.initialize.initialize_model_parallel(size) after init_process_group"
            )
        mp_size = parallel.model_parallel_size() if model_parallel is not False else 1
        use_parallel = mp_size > 1
        _check_parallel_args(args, mp_size)
        for field_name, op_names in ops.IMPL_FIELDS.items():
            for op in op_names:
                ops.check_choice(op, getattr(args, field_name), field_name)
        get_attention_backend(args.attn_backend)  # raises on an unknown name

        self.args = args
        self.mp_size = mp_size
        self.activation_checkpointing = args.activation_checkpointing
        self.tok_embeddings = parallel.embedding(args.vocab_size, args.dim, args.init_std, use_parallel)
        self.layers = nn.ModuleList(TransformerBlock(i, args, use_parallel, mp_size) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.norm_impl)
        self.output = parallel.column_linear(args.dim, args.vocab_size, args.init_std, use_parallel, gather_output=True)
        self.rope = RotaryEmbedding(args)
        # Meta's LLaMA-1/2 checkpoints carry the RoPE frequencies as "rope.freqs"; we compute
        # them instead, so accept and check that entry rather than failing a strict load.
        self._register_load_state_dict_pre_hook(self._drop_rope_freqs)

    # ------------------------------------------------------------------ helpers
    def _drop_rope_freqs(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "rope.freqs"
        if key in state_dict:
            freqs = state_dict.pop(key).double().cpu()
            # The file records the frequencies the model was trained with; RoPE scaling added
            # now (to reach longer contexts) legitimately changes ours, so compare unscaled.
            trained = rope_frequencies(self.args.head_dim, self.args.rope_theta)
            # Meta stores them in bf16: 8 significant bits, relative rounding error <= 2^-8.
            if freqs.shape != trained.shape or not torch.allclose(freqs, trained, rtol=4e-3, atol=0):
                raise ValueError(
                    f"checkpoint's rope.freqs (shape {tuple(freqs.shape)}) disagree with the RoPE frequencies "
                    f"implied by head_dim={self.args.head_dim}, rope_theta={self.args.rope_theta}"
                )

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward (saves memory, costs ~1 forward)."""
        self.activation_checkpointing = bool(enabled)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameters of the full model (all model-parallel shards together)."""
        return count_params(self.args, include_embeddings)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM's estimate with causal attention
        counted as half:

            6 * N_matmul + 6 * n_layers * dim * seq_len

        N_matmul counts weights used in matrix products (all but the embedding table and the
        norms, which do no matmul): 2 FLOPs each forward, 4 backward. The second term is
        attention's q k^T and p v: 4 * dim * seq_len per token and layer forward over the full
        T x T, twice that backward, halved because a causal model needs only the pairs on and
        below the diagonal. Counting the masked half (PaLM's 12 instead of 6) would credit work
        no causal kernel needs to do and inflate MFU. Recomputation (activation checkpointing,
        flash attention's backward) is not counted: these are model FLOPs."""
        seq_len = self.args.max_seq_len if seq_len is None else seq_len
        n_matmul = count_params(self.args, include_embeddings=False) - self.args.dim * (2 * self.args.n_layers + 1)
        return 6.0 * n_matmul + 6.0 * self.args.n_layers * self.args.dim * seq_len

    def _validate(self) -> bool:
        """Whether to range-check ids now: on unless switched off (ModelArgs.validate_inputs)
        or while torch.compile traces (data-dependent checks would break the graph)."""
        return self.args.validate_inputs and not torch.compiler.is_compiling()

    def _check_tokens(self, tokens: torch.Tensor, name: str = "tokens") -> None:
        if tokens.dim() != 2:
            raise ValueError(f"{name} must be (batch, seq_len), got shape {tuple(tokens.shape)}")
        if tokens.dtype not in _INT_DTYPES:
            raise TypeError(f"{name} must be an integer tensor, got {tokens.dtype}")
        if tokens.numel() and self._validate():
            lo, hi = _min_max(tokens)
            if lo < 0 or hi >= self.args.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"{name} contains id {bad} outside [0, vocab_size={self.args.vocab_size})")

    # ------------------------------------------------------------------ training path
    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cache-free forward.

        tokens: (B, T) int. targets: optional (B, T) int, ignore_index where not counted.
        position_ids: optional (B, T) positions (e.g. restarting per packed document).
        document_ids: optional (B, T) ids; attention stays within a document.
        Returns logits (B, T, V) in fp32 (or wider) when targets is None, else the scalar mean loss.
        """
        self._check_tokens(tokens)
        B, T = tokens.shape
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds ModelArgs.max_seq_len={self.args.max_seq_len}")
        for name, extra in (("targets", targets), ("position_ids", position_ids), ("document_ids", document_ids)):
            if extra is None:
                continue
            if tuple(extra.shape) != (B, T):
                raise ValueError(f"{name} must have the shape of tokens {(B, T)}, got {tuple(extra.shape)}")
            if extra.dtype not in _INT_DTYPES:
                raise TypeError(f"{name} must be an integer tensor, got {extra.dtype}")
        if targets is not None and targets.numel() and self._validate():
            lo, hi = _min_max(torch.where(targets == self.args.ignore_index, 0, targets))
            if lo < 0 or hi >= self.args.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"targets contain id {bad} outside [0, vocab_size={self.args.vocab_size}) "
                    f"(and not ignore_index={self.args.ignore_index})"
                )
        if position_ids is not None and position_ids.numel() and self._validate():
            lo, hi = _min_max(position_ids)
            if lo < 0 or hi >= self.args.max_seq_len:
                raise ValueError(
                    f"position_ids must lie in [0, max_seq_len={self.args.max_seq_len}), got values in [{lo}, {hi}]"
                )

        h = self.tok_embeddings(tokens)  # (B, T, C)
        # (L, D/2) tables: rows 0..T-1 by default, rows position_ids[b, t] when given.
        cos, sin = self.rope.table(tokens.device, h.dtype)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, document_ids, None, 0, position_ids, use_reentrant=False)
            else:
                h = layer(h, cos, sin, document_ids, position_ids=position_ids)
        h = self.norm(h)
        if targets is not None and self._fused_loss(h):
            fused = ops.resolve_op("linear_cross_entropy", self.args.linear_loss_impl, h.device)
            return fused(h, self.output.weight, targets, self.args.ignore_index)  # no (B, T, V) logits
        logits = _to_at_least_fp32(self.output(h))  # (B, T, V)
        if targets is None:
            return logits
        loss_fn = ops.resolve_op("cross_entropy", self.args.loss_impl, logits.device)
        return loss_fn(logits, targets, self.args.ignore_index)

    def _fused_loss(self, h: torch.Tensor) -> bool:
        """Whether the loss comes from the fused output projection + cross-entropy: when
        ``linear_loss_impl`` resolves to a kernel and the output weight is whole on this rank."""
        name, _ = ops.resolve_impl("linear_cross_entropy", self.args.linear_loss_impl, h.device)
        if name == "torch":
            return False
        if self.mp_size > 1:
            ops.record_fallback(
                "linear_cross_entropy", f"model-parallel/{self.mp_size}",
                f"the output weight is split over {self.mp_size} model-parallel ranks (the fused loss needs "
                "the whole vocabulary); computing gathered logits and loss_impl instead",
            )
            return False
        return True

    # ------------------------------------------------------------------ generation path
    def new_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache on this model's device for ``batch_size`` sequences."""
        p = self.output.weight
        return KVCache(
            self.args, batch_size, max_seq_len,
            n_kv_heads=self.args.n_kv_heads // self.mp_size, device=p.device, dtype=dtype or p.dtype,
        )

    @torch.no_grad()
    def forward_inference(self, tokens: torch.Tensor, start_pos: int, cache: KVCache) -> torch.Tensor:
        """Feed tokens (B, T) at positions start_pos..start_pos+T-1, reading and extending the
        cache. Returns fp32 logits (B, T, V)."""
        self._check_tokens(tokens)
        B, T = tokens.shape
        if start_pos < 0 or start_pos + T > cache.max_seq_len:
            raise ValueError(
                f"positions {start_pos}..{start_pos + T - 1} do not fit the KV cache of length {cache.max_seq_len}"
            )
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope.table(tokens.device, h.dtype)
        cos, sin = cos[start_pos : start_pos + T], sin[start_pos : start_pos + T]  # (T, D/2)
        for layer in self.layers:
            h = layer(h, cos, sin, None, cache, start_pos)
        return _to_at_least_fp32(self.output(self.norm(h)))

    # ------------------------------------------------------------------ loading
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` after a check that names every tensor whose shape
        differs from this model's (with both shapes), before any tensor is copied."""
        from .checkpoint import check_state_dict

        check_state_dict(self, state_dict, strict=strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def _min_max(t: torch.Tensor) -> tuple[int, int]:
    """(min, max) of an integer tensor as Python ints, with a single device-to-host copy."""
    lo, hi = host_read(torch.stack([t.min(), t.max()]))  # counted: the training step reports it
    return int(lo), int(hi)


def _to_at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Logits leave the model in fp32 (fp64 stays fp64, so float64 references stay exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_parallel_args(args: ModelArgs, mp_size: int) -> None:
    if mp_size == 1:
        return
    for name, value in (
        ("n_heads", args.n_heads),
        ("n_kv_heads", args.n_kv_heads),
        ("vocab_size", args.vocab_size),
        ("dim", args.dim),
        ("hidden_dim (SwiGLU)", args.hidden_dim),
    ):
        if value % mp_size != 0:
            raise ValueError(f"model-parallel size {mp_size} does not divide ModelArgs.{name}={value}")
