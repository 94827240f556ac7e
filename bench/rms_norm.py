"""RMSNorm microbenchmark: our Triton RMSNorm and fused residual-add + RMSNorm against the eager
reference and torch.compile of it, forward, backward and both, in GB/s against copy bandwidth.

    python bench/rms_norm.py                          # GPU: the sweep below, both variants, bf16
    python bench/rms_norm.py --device cpu             # CPU: small sizes, fp32, under a minute
    python bench/rms_norm.py --sizes 16384x4096 --variants add --modes fwd+bwd --providers triton,eager
    python bench/rms_norm.py --help                   # every option

Variants (``--variants``), on x (N, C) (``--sizes`` NxC) and weight (C,) in the row's dtype:

rms   ``y = rms_norm(x, w, eps)``: ``llama_mini.kernels.rms_norm.rms_norm`` (triton),
      ``llama_mini.kernels.reference.rms_norm`` (eager), ``torch.compile`` of the reference (compile).
add   ``y, h = add_rms_norm(x, r, w, eps)`` with h = x + r (the block's residual add fused with
      the next norm): ``llama_mini.kernels.rms_norm.add_rms_norm`` / ``llama_mini.kernels.reference.add_rms_norm``.

Bytes each pass must move (s = bytes per element of x; rstd is the fp32 1/rms per row):

=======  ====================================================  =========================
variant  pass                                                  bytes
=======  ====================================================  =========================
rms      fwd: read x, w; write y, rstd                         2*N*C*s + C*s + 4*N
rms      bwd: read dy, x, w, rstd; write dx, dw                3*N*C*s + 2*C*s + 4*N
add      fwd: read x, r, w; write y, h, rstd                   4*N*C*s + C*s + 4*N
add      bwd: read dy, dh, h, w, rstd; write dx (= dr), dw     4*N*C*s + 2*C*s + 4*N
both     fwd+bwd                                               fwd + bwd
=======  ====================================================  =========================

dw counts as one (C,) write: the kernel's P x C fp32 partial sums (P = two programs per SM, summed
afterwards) depend on the GPU and are left out; at C = 4096 and P = 264 (an H100) they are under 2%
of the bytes at N = 16384, so the figure is slightly conservative for the triton rows. The same byte count
is used for every provider, so GB/s compares times. Copy bandwidth: ``dst.copy_(src)`` of a buffer
the size of x, timed in the same run. Targets (CUDA): fwd+bwd >= 85% of copy bandwidth and >= 3x
eager. See ``bench/op_bench.py`` for the modes, the correctness check and the outputs.
"""

from __future__ import annotations

import sys

import torch

from op_bench import Inputs, Op, Target, compiled, esize, load_kernel, parse_shapes, run
from llama_mini.kernels import reference


class RMSNormBench(Op):
    name = "rms_norm"
    title = "RMSNorm (rms) and residual-add + RMSNorm (add)"
    doc = __doc__
    sweep = {
        "sizes": ("1024x4096,4096x4096,16384x4096,65536x4096,16384x8192", "1024x512,4096x1024",
                  "sizes N x C (rows x hidden)"),
        "variants": ("rms,add", "rms,add", "rms (rms_norm), add (add_rms_norm)"),
    }
    case_fields = ("variant", "size", "rows", "hidden")
    table_cols = (("variant", "variant", ""), ("N x C", "size", ""))
    group_fields = ("variant",)
    targets = (
        Target("RMSNorm fwd+bwd >= 85% of copy bandwidth", "pct_of_copy", ">=", 85.0, ("fwd+bwd",)),
        Target("RMSNorm fwd+bwd >= 3x eager", "speedup_vs_eager", ">=", 3.0, ("fwd+bwd",)),
    )
    bytes_doc = {"rms fwd": "2*N*C*s + C*s + 4*N", "rms bwd": "3*N*C*s + 2*C*s + 4*N",
                 "add fwd": "4*N*C*s + C*s + 4*N", "add bwd": "4*N*C*s + 2*C*s + 4*N", "fwd+bwd": "fwd + bwd",
                 "note": "s = bytes per element of x; dw partial sums not counted"}
    precision = "x, residual and weight in the row's dtype; every provider normalises in fp32"

    def add_arguments(self, group) -> None:
        group.add_argument("--eps", type=float, default=1e-5, help="epsilon added to mean(x^2)")

    def cases(self, args) -> list[dict]:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        if not variants or any(v not in ("rms", "add") for v in variants):
            raise ValueError(f"--variants takes rms and/or add, got {args.variants!r}")
        shapes = parse_shapes(args.sizes, ("rows", "hidden"))
        return [{"variant": v, **s} for v in variants for s in shapes]

    def make_inputs(self, case, dtype, device, args) -> Inputs:
        N, C = case["rows"], case["hidden"]
        x = torch.randn(N, C, device=device, dtype=dtype)  # (N, C)
        w = (1 + 0.1 * torch.randn(C, device=device)).to(dtype)  # (C,), not all ones
        if case["variant"] == "rms":
            return Inputs((x, w), grad=(0, 1))
        r = torch.randn(N, C, device=device, dtype=dtype)  # (N, C) residual stream
        return Inputs((x, r, w), grad=(0, 1, 2))

    def build(self, provider, case, args):
        eps, add = args.eps, case["variant"] == "add"
        if provider == "triton":
            fn = load_kernel("llama_mini.kernels.rms_norm", "add_rms_norm" if add else "rms_norm")
        else:
            fn = reference.add_rms_norm if add else reference.rms_norm
            if provider == "compile":
                fn = compiled(fn)
        return lambda *a: fn(*a, eps)

    def reference(self, case, inputs, args):
        f32 = [t.float() for t in inputs.args]
        if case["variant"] == "add":
            return reference.add_rms_norm(*f32, args.eps)  # (y, h)
        return (reference.rms_norm(*f32, args.eps),)

    def pass_bytes(self, case, dtype) -> dict[str, int]:
        N, C, s = case["rows"], case["hidden"], esize(dtype)
        if case["variant"] == "rms":
            return {"fwd": 2 * N * C * s + C * s + 4 * N, "bwd": 3 * N * C * s + 2 * C * s + 4 * N}
        return {"fwd": 4 * N * C * s + C * s + 4 * N, "bwd": 4 * N * C * s + 2 * C * s + 4 * N}


OP = RMSNormBench()


def main(argv: list[str] | None = None) -> int:
    return run(OP, argv)


if __name__ == "__main__":
    sys.exit(main())
