"""Rotary-embedding microbenchmark: our Triton RoPE (q and k rotated in one launch) against the
eager reference and torch.compile of it, forward, backward and both, in GB/s against copy bandwidth.

    python bench/rotary.py                            # GPU: B x T sweep, 32 query / 8 kv heads, D 128, bf16
    python bench/rotary.py --device cpu               # CPU: small sizes, fp32, under a minute
    python bench/rotary.py --sizes 8x2048 --heads 32 --kv-heads 32 --modes fwd+bwd
    python bench/rotary.py --help                     # every option

Providers, on q (B, T, H, D), k (B, T, Hkv, D) in the row's dtype and fp32 cos/sin tables
(T, D/2) of positions 0..T-1 (theta 500000, ``llama_mini.rope``), no position_ids:
triton ``llama_mini.kernels.rotary.apply_rotary(q, k, cos, sin)``; eager ``llama_mini.kernels.reference.apply_rotary_qk``
(complex multiply in fp32); compile ``torch.compile`` of the same reference (which switches to its
real-arithmetic form while compiling). Sizes (``--sizes``) are B x T; ``--heads``, ``--kv-heads``
and ``--head-dims`` are lists, swept too.

Bytes each pass must move (s = bytes per element of q and k; the tables are read once):

=======  ============================================  ====================================
pass     what                                          bytes
=======  ============================================  ====================================
fwd      read q, k, cos, sin; write q_out, k_out       2*B*T*(H+Hkv)*D*s + 2*T*(D/2)*4
bwd      read dq_out, dk_out, cos, sin; write dq, dk   2*B*T*(H+Hkv)*D*s + 2*T*(D/2)*4
fwd+bwd  both                                          fwd + bwd
=======  ============================================  ====================================

Copy bandwidth: ``dst.copy_(src)`` of a buffer the size of q, timed in the same run. Target
(CUDA): >= 80% of copy bandwidth. See ``bench/op_bench.py`` for the modes, the correctness check
and the outputs.
"""

from __future__ import annotations

import sys

import torch

from op_bench import Inputs, Op, Target, compiled, esize, ints, load_kernel, parse_shapes, run
from llama_mini.kernels import reference
from llama_mini.rope import rope_cos_sin, rope_frequencies


class RotaryBench(Op):
    name = "rotary"
    title = "rotary embedding of q and k"
    doc = __doc__
    sweep = {
        "sizes": ("1x2048,4x2048,8x2048,16x2048,8x8192", "1x128,4x256", "sizes B x T (batch x sequence length)"),
        "heads": ("32", "8", "query heads H"),
        "kv_heads": ("8", "2", "key/value heads Hkv"),
        "head_dims": ("128", "64", "head dims D (even)"),
    }
    case_fields = ("size", "batch", "seqlen", "heads", "kv_heads", "head_dim")
    table_cols = (("B x T", "size", ""), ("H", "heads", "d"), ("Hkv", "kv_heads", "d"), ("D", "head_dim", "d"))
    group_fields = ("heads", "kv_heads", "head_dim")
    targets = (Target("rotary >= 80% of copy bandwidth", "pct_of_copy", ">=", 80.0),)
    bytes_doc = {"fwd": "2*B*T*(H+Hkv)*D*s + 2*T*(D/2)*4", "bwd": "2*B*T*(H+Hkv)*D*s + 2*T*(D/2)*4",
                 "fwd+bwd": "fwd + bwd", "note": "s = bytes per element of q and k; cos/sin fp32"}
    precision = "q, k in the row's dtype, cos/sin fp32; every provider rotates in fp32 and casts back"

    def add_arguments(self, group) -> None:
        group.add_argument("--theta", type=float, default=500000.0, help="RoPE base of the tables")

    def cases(self, args) -> list[dict]:
        heads, kv, dims = ints(args.heads, "--heads"), ints(args.kv_heads, "--kv-heads"), ints(args.head_dims,
                                                                                               "--head-dims")
        if any(d % 2 for d in dims):
            raise ValueError(f"--head-dims must be even, got {dims}")
        return [{**s, "heads": h, "kv_heads": hk, "head_dim": d}
                for h in heads for hk in kv for d in dims for s in parse_shapes(args.sizes, ("batch", "seqlen"))]

    def make_inputs(self, case, dtype, device, args) -> Inputs:
        B, T, H, Hkv, D = (case[k] for k in ("batch", "seqlen", "heads", "kv_heads", "head_dim"))
        q = torch.randn(B, T, H, D, device=device, dtype=dtype)  # (B, T, H, D)
        k = torch.randn(B, T, Hkv, D, device=device, dtype=dtype)  # (B, T, Hkv, D)
        cos, sin = rope_cos_sin(torch.arange(T, device=device), rope_frequencies(D, args.theta))  # (T, D/2) fp32
        return Inputs((q, k, cos, sin), grad=(0, 1))

    def build(self, provider, case, args):
        if provider == "triton":
            return load_kernel("llama_mini.kernels.rotary", "apply_rotary")
        return compiled(reference.apply_rotary_qk) if provider == "compile" else reference.apply_rotary_qk

    def reference(self, case, inputs, args):
        q, k, cos, sin = inputs.args
        return reference.apply_rotary_qk(q.float(), k.float(), cos, sin)  # (q_out, k_out)

    def pass_bytes(self, case, dtype) -> dict[str, int]:
        B, T, H, Hkv, D = (case[k] for k in ("batch", "seqlen", "heads", "kv_heads", "head_dim"))
        one = 2 * B * T * (H + Hkv) * D * esize(dtype) + 2 * T * (D // 2) * 4
        return {"fwd": one, "bwd": one}


OP = RotaryBench()


def main(argv: list[str] | None = None) -> int:
    return run(OP, argv)


if __name__ == "__main__":
    sys.exit(main())
