"""Rotary position embeddings (RoPE) with real arithmetic only.

Meta's reference multiplies complex numbers: the head vector is viewed as D/2 complex values
x[2i] + i*x[2i+1], each multiplied by e^{i p f_i} at position p, with frequencies
f_i = theta^(-2i/D). Here the same rotation is written with cos/sin tables, so the model runs
where complex dtypes do not (Apple's MPS, some compilers) and kernels can fuse it. The complex
formulation is kept (``apply_rotary_emb_complex``) as the reference the tests compare against.

RoPE scaling stretches the frequencies so a model reaches longer contexts:
  linear  position interpolation: f_i / factor (equivalently positions / factor)
  ntk     NTK-aware base change: theta' = theta * factor^(D / (D - 2))
  llama3  Llama 3.1's rule: long wavelengths divided by factor, short ones untouched,
          a smooth blend in between.
"""

from __future__ import annotations

import math

import torch

from .kernels import reference

from .config import ModelArgs, RopeScaling

__all__ = [
    "rope_frequencies",
    "rope_cos_sin",
    "apply_rotary_emb",
    "apply_rotary_emb_complex",
    "precompute_freqs_cis",
    "RotaryEmbedding",
]


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies f_i, i = 0..D/2-1, as a float64 CPU tensor of shape (D/2,)."""
    scaling = scaling or RopeScaling()
    if scaling.type == "ntk":
        theta = theta * scaling.factor ** (head_dim / (head_dim - 2))
    # device="cpu" explicitly: models are also built under a `with torch.device("meta")` context
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    if scaling.type == "linear":
        freqs = freqs / scaling.factor
    elif scaling.type == "llama3":
        low_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
        high_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / freqs
        scaled = torch.where(wavelen > low_wavelen, freqs / scaling.factor, freqs)
        smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        freqs = torch.where(medium, blended, scaled)
    return freqs


def rope_cos_sin(
    positions: torch.Tensor, freqs: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles positions x freqs, computed in float64, returned in ``dtype``
    (fp32 by default) on positions' device.

    positions: (T,) or (B, T) integers; freqs: (D/2,). Returns two tensors of shape
    positions.shape + (D/2,).
    """
    # float64 on the CPU (some backends, e.g. MPS, have no float64), then fp32 on the target.
    angles = positions.to("cpu", torch.float64)[..., None] * freqs.to("cpu", torch.float64)
    return torch.cos(angles).to(dtype).to(positions.device), torch.sin(angles).to(dtype).to(positions.device)


def apply_rotary_emb(
    xq: torch.Tensor, xk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries (B, T, H, D) and keys (B, T, Hkv, D) by the angles in cos/sin, which
    are (T, D/2) or (B, T, D/2). Real-arithmetic equivalent of Meta's function of this name."""
    return reference.apply_rotary(xq, cos, sin), reference.apply_rotary(xk, cos, sin)


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """Meta's complex table e^{i p f_i}, shape (end, D/2), complex64. Reference only: written
    as Meta writes it (fp32 frequencies), independently of ``rope_frequencies``."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device="cpu")[: head_dim // 2].float() / head_dim))
    t = torch.arange(end, device="cpu", dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rotary_emb_complex(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta's complex formulation, kept as the reference: x (B, T, H, D), freqs_cis (T, D/2)."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    fc = freqs_cis[None, :, None, :]
    xq_out = torch.view_as_real(xq_ * fc).flatten(3)
    xk_out = torch.view_as_real(xk_ * fc).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class RotaryEmbedding:
    """Caches cos/sin tables per device for positions 0..max_seq_len-1.

    Deliberately not an ``nn.Module`` buffer: the tables stay fp32 when the model is cast to
    fp16/bf16 (fp64 for a float64 model, so float64 references are exact), never appear in a
    state dict, and are rebuilt lazily for whatever device the input lives on (no ``.cuda()``
    anywhere).
    """

    def __init__(self, args: ModelArgs) -> None:
        self.freqs = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
        self.max_seq_len = args.max_seq_len
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def table(self, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The (max_seq_len, D/2) cos and sin tables, fp32 unless float64 is asked for."""
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (device, dtype)
        if key not in self._tables:
            positions = torch.arange(self.max_seq_len, device=device)
            self._tables[key] = rope_cos_sin(positions, self.freqs, dtype)
        return self._tables[key]
