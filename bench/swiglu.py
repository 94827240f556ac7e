"""SwiGLU microbenchmark: our Triton ``silu(a) * b`` against the eager reference and torch.compile
of it, forward, backward and both, in GB/s against copy bandwidth.

    python bench/swiglu.py                            # GPU: N x F sweep at F = 14336 (LLaMA-3 8B) and 11008, bf16
    python bench/swiglu.py --device cpu               # CPU: small sizes, fp32, under a minute
    python bench/swiglu.py --sizes 16384x14336 --modes fwd+bwd --providers triton,eager
    python bench/swiglu.py --help                     # every option

Providers, on a and b (N, F) (``--sizes`` NxF) in the row's dtype: triton
``llama_mini.kernels.swiglu.swiglu(a, b)``; eager ``llama_mini.kernels.reference.swiglu`` (``F.silu(a) * b``: two kernels
forward, more backward); compile ``torch.compile`` of it.

Bytes each pass must move (s = bytes per element; the backward recomputes sigmoid(a) from a):

=======  ===================================  ============
pass     what                                 bytes
=======  ===================================  ============
fwd      read a, b; write y                   3*N*F*s
bwd      read dy, a, b; write da, db          5*N*F*s
fwd+bwd  both                                 8*N*F*s
=======  ===================================  ============

Copy bandwidth: ``dst.copy_(src)`` of a buffer the size of a, timed in the same run. Target
(CUDA): >= 80% of copy bandwidth. See ``bench/op_bench.py`` for the modes, the correctness check
and the outputs.
"""

from __future__ import annotations

import sys

import torch

from op_bench import Inputs, Op, Target, compiled, esize, load_kernel, parse_shapes, run
from llama_mini.kernels import reference


class SwiGLUBench(Op):
    name = "swiglu"
    title = "SwiGLU silu(a) * b"
    doc = __doc__
    sweep = {"sizes": ("1024x14336,4096x14336,16384x14336,16384x11008", "1024x512,4096x1024",
                       "sizes N x F (rows x hidden)")}
    case_fields = ("size", "rows", "hidden")
    table_cols = (("N x F", "size", ""),)
    targets = (Target("SwiGLU >= 80% of copy bandwidth", "pct_of_copy", ">=", 80.0),)
    bytes_doc = {"fwd": "3*N*F*s", "bwd": "5*N*F*s", "fwd+bwd": "8*N*F*s", "note": "s = bytes per element"}
    precision = "a, b in the row's dtype; triton computes in fp32, eager/compile in the input dtype (as PyTorch does)"

    def cases(self, args) -> list[dict]:
        return parse_shapes(args.sizes, ("rows", "hidden"))

    def make_inputs(self, case, dtype, device, args) -> Inputs:
        N, F = case["rows"], case["hidden"]
        a = 2 * torch.randn(N, F, device=device, dtype=dtype)  # (N, F) gate pre-activation
        b = torch.randn(N, F, device=device, dtype=dtype)  # (N, F) up projection
        return Inputs((a, b), grad=(0, 1))

    def build(self, provider, case, args):
        if provider == "triton":
            return load_kernel("llama_mini.kernels.swiglu", "swiglu")
        return compiled(reference.swiglu) if provider == "compile" else reference.swiglu

    def reference(self, case, inputs, args):
        return (reference.swiglu(*(t.float() for t in inputs.args)),)

    def pass_bytes(self, case, dtype) -> dict[str, int]:
        n = case["rows"] * case["hidden"] * esize(dtype)
        return {"fwd": 3 * n, "bwd": 5 * n}


OP = SwiGLUBench()


def main(argv: list[str] | None = None) -> int:
    return run(OP, argv)


if __name__ == "__main__":
    sys.exit(main())
