"""The key/value cache used only by the generation path.

The training forward never allocates one. A cache holds, per layer, keys and values of shape
(batch_size, n_local_kv_heads, max_seq_len, head_dim), with batch_size <= ModelArgs.max_batch_size
and max_seq_len <= ModelArgs.max_seq_len; position p of sequence b is written
once, when the token at p is fed, and read by every later step.
"""

from __future__ import annotations

import torch

from .config import ModelArgs

__all__ = ["KVCache"]


class KVCache:
    """Per-layer key/value buffers for incremental decoding.

    ``n_kv_heads`` is the number of heads this process holds (n_kv_heads / model-parallel size).
    """

    def __init__(
        self,
        args: ModelArgs,
        batch_size: int,
        max_seq_len: int | None = None,
        *,
        n_kv_heads: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        max_seq_len = args.max_seq_len if max_seq_len is None else max_seq_len
        if batch_size > args.max_batch_size:
            raise ValueError(f"batch size {batch_size} exceeds ModelArgs.max_batch_size={args.max_batch_size}")
        if max_seq_len > args.max_seq_len:
            raise ValueError(f"cache length {max_seq_len} exceeds ModelArgs.max_seq_len={args.max_seq_len}")
        n_kv = args.n_kv_heads if n_kv_heads is None else n_kv_heads
        shape = (batch_size, n_kv, max_seq_len, args.head_dim)
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at positions start_pos..start_pos+T-1 of ``layer`` and
        return all keys and values so far, (B, Hkv, start_pos + T, D)."""
        B, _, T, _ = k.shape
        end = start_pos + T
        if end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: position {end} > cache length {self.max_seq_len}")
        if B > self.batch_size:
            raise ValueError(f"batch {B} exceeds the cache's batch size {self.batch_size}")
        self.k[layer][:B, :, start_pos:end] = k
        self.v[layer][:B, :, start_pos:end] = v
        return self.k[layer][:B, :, :end], self.v[layer][:B, :, :end]
