"""Cross-entropy microbenchmark: our Triton cross-entropy over the vocabulary (online
log-sum-exp, gradient written in the forward pass) against ``F.cross_entropy`` and torch.compile
of the reference, forward, backward and both, in GB/s against copy bandwidth.

    python bench/cross_entropy.py                     # GPU: N x V sweep at V = 32000 and 128256, bf16
    python bench/cross_entropy.py --device cpu        # CPU: small sizes, fp32, under a minute
    python bench/cross_entropy.py --sizes 16384x128256 --modes fwd+bwd --providers triton,eager
    python bench/cross_entropy.py --help              # every option

Providers, on logits (N, V) (``--sizes`` NxV) in the row's dtype and int64 targets (N,), mean
over the counted targets (``--ignore-frac`` of them set to -100): triton
``llama_mini.kernels.cross_entropy.cross_entropy(logits, targets)``; eager ``F.cross_entropy(logits,
targets)`` on the logits as they are (what a user writes); compile ``torch.compile`` of
``llama_mini.kernels.reference.cross_entropy`` (which upcasts the logits to fp32).

Bytes each pass must move (s = bytes per element of the logits; targets are int64; the scalar
loss is not counted):

=======  ==========================================================  =================
pass     what                                                        bytes
=======  ==========================================================  =================
fwd      read logits, targets                                        N*V*s + 8*N
bwd      read logits, targets, lse (fp32); write dlogits             2*N*V*s + 12*N
fwd+bwd  read logits, targets once; write dlogits (fused: the loss   2*N*V*s + 8*N
         is the last op, so its gradient can be written in the
         forward, as ours does)
=======  ==========================================================  =================

Ours computes the gradient inside the forward when gradients are enabled and hands it to the
first backward (which only scales it by grad_output and refuses ``retain_graph``), so its ``bwd``
rows are skipped with that reason: compare ``fwd+bwd`` across providers. Its ``fwd`` under
``torch.no_grad`` writes no gradient. Copy bandwidth: ``dst.copy_(src)`` of a buffer the
size of the logits, timed in the same run. No target is set for this op. See
``bench/op_bench.py`` for the modes, the correctness check and the outputs.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from op_bench import Inputs, Op, compiled, esize, load_kernel, parse_shapes, run
from llama_mini.kernels import reference

IGNORE_INDEX = -100


class CrossEntropyBench(Op):
    name = "cross_entropy"
    title = "cross-entropy over the vocabulary"
    doc = __doc__
    sweep = {"sizes": ("4096x32000,16384x32000,4096x128256,16384x128256", "256x2000,1024x8000",
                       "sizes N x V (tokens x vocabulary)")}
    case_fields = ("size", "rows", "vocab")
    table_cols = (("N x V", "size", ""),)
    bytes_doc = {"fwd": "N*V*s + 8*N", "bwd": "2*N*V*s + 12*N", "fwd+bwd": "2*N*V*s + 8*N (fused minimum)",
                 "note": "s = bytes per element of the logits; targets int64"}
    precision = ("logits in the row's dtype; triton and compile (the reference) compute in fp32, eager is "
                 "F.cross_entropy on the logits as given")

    def add_arguments(self, group) -> None:
        group.add_argument("--ignore-frac", type=float, default=0.0,
                           help="fraction of targets set to ignore_index (-100)")

    def cases(self, args) -> list[dict]:
        if not 0.0 <= args.ignore_frac < 1.0:
            raise ValueError(f"--ignore-frac must be in [0, 1), got {args.ignore_frac}")
        return parse_shapes(args.sizes, ("rows", "vocab"))

    def make_inputs(self, case, dtype, device, args) -> Inputs:
        N, V = case["rows"], case["vocab"]
        logits = (3 * torch.randn(N, V, device=device)).to(dtype)  # (N, V)
        targets = torch.randint(0, V, (N,), device=device)  # (N,) int64
        targets[torch.rand(N, device=device) < args.ignore_frac] = IGNORE_INDEX
        return Inputs((logits, targets), grad=(0,))

    def build(self, provider, case, args):
        if provider == "triton":
            return load_kernel("llama_mini.kernels.cross_entropy", "cross_entropy")
        if provider == "compile":
            return compiled(reference.cross_entropy)
        return lambda logits, targets: F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)

    def reference(self, case, inputs, args):
        logits, targets = inputs.args
        return (reference.cross_entropy(logits.float(), targets, IGNORE_INDEX),)

    def pass_bytes(self, case, dtype) -> dict[str, int]:
        N, V, s = case["rows"], case["vocab"], esize(dtype)
        return {"fwd": N * V * s + 8 * N, "bwd": 2 * N * V * s + 12 * N, "fwd+bwd": 2 * N * V * s + 8 * N}

    def mode_skip(self, provider, mode):
        if provider == "triton" and mode == "bwd":
            return ("ours computes the gradient in the forward and hands it to the first backward, which "
                    "refuses retain_graph: a backward alone cannot be timed (its cost is in fwd+bwd)")
        return None


OP = CrossEntropyBench()


def main(argv: list[str] | None = None) -> int:
    return run(OP, argv)


if __name__ == "__main__":
    sys.exit(main())
