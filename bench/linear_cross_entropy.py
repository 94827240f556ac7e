"""Linear cross-entropy microbenchmark: our fused output projection + loss (logits never
materialised) against ``F.cross_entropy(x @ W.T, targets)`` and torch.compile of the reference:
time, TFLOP/s and peak memory, ours/eager ratios.

    python bench/linear_cross_entropy.py              # GPU: 16k tokens, C 4096, V 32000 and 128256, bf16
    python bench/linear_cross_entropy.py --device cpu # CPU: 512 tokens, C 256, V 2000 and 8000, fp32
    python bench/linear_cross_entropy.py --vocabs 128256 --weights fp32 --modes fwd+bwd --providers triton,eager
    python bench/linear_cross_entropy.py --help       # every option

Inputs: x (N, C) in the row's dtype (``--tokens``, ``--hidden``), W (V, C) (``--vocabs``), int64
targets (N,); loss = mean over tokens. Weight setups (``--weights``):

same   W in the row's dtype (bf16 weights in a bf16 run).
fp32   fp32 master weights with compute in the row's dtype: x in that dtype, W fp32, every
       provider called under ``torch.autocast(dtype)`` (eager casts W to bf16 there; ours casts
       W per tile inside its GEMM and accumulates dW in fp32). Skipped in a float32 run, where
       it is the ``same`` setup.

Providers: triton ``llama_mini.kernels.linear_cross_entropy.linear_cross_entropy(x, W, targets,
chunk_size=--chunk-size)``; eager ``F.cross_entropy(x @ W.T, targets)`` (logits in the compute
dtype, as a user writes it); compile ``torch.compile`` of ``llama_mini.kernels.reference.linear_cross_entropy``.
Ours computes dx and dW inside the forward when gradients are enabled and hands them to the
first backward (which only scales them by grad_output and refuses ``retain_graph``), so its
``bwd`` rows are skipped with that reason: compare ``fwd+bwd`` (a training step's work).

FLOPs (the two GEMMs of the backward counted, no recomputation): fwd 2*N*C*V, bwd 4*N*C*V,
fwd+bwd 6*N*C*V. Peak memory: ``torch.cuda.max_memory_allocated`` over one call (x, W, and the
gradients included); ``mem_vs_eager`` = ours / eager's peak, ``time_vs_eager`` = ours / eager's
median time. Targets (CUDA, fwd+bwd at V = 128256): peak memory <= 1/4 of eager's and time <=
eager's. The correctness check compares the loss with a float32 reference computed a chunk of
tokens at a time. See ``bench/op_bench.py`` for the modes and the outputs.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from op_bench import ERR_BOUND, Inputs, Op, Target, compiled, ints, load_kernel, run
from llama_mini.kernels import reference

IGNORE_INDEX = -100
REF_CHUNK_ELEMENTS = 2**28  # fp32 logits per chunk of the reference (1 GiB)
BIG_VOCAB = lambda row: row["vocab"] >= 128256  # noqa: E731  the targets' vocabulary


class LinearCrossEntropyBench(Op):
    name = "linear_cross_entropy"
    title = "linear cross-entropy (output projection + loss)"
    doc = __doc__
    memory_bound = False
    sweep = {
        "tokens": ("16384", "512", "tokens N per call (a list sweeps)"),
        "hidden": ("4096", "256", "hidden sizes C"),
        "vocabs": ("32000,128256", "2000,8000", "vocabulary sizes V"),
        "weights": ("same,fp32", "same", "weight setups: same (W in the row's dtype), fp32 (master weights, autocast)"),
    }
    case_fields = ("size", "tokens", "hidden", "vocab", "weights")
    table_cols = (("N x C x V", "size", ""), ("weights", "weights", ""))
    targets = (
        Target("linear CE peak memory <= 1/4 of eager at V=128,256", "mem_vs_eager", "<=", 0.25, ("fwd+bwd",),
               BIG_VOCAB),
        Target("linear CE time <= eager at V=128,256", "time_vs_eager", "<=", 1.0, ("fwd+bwd",), BIG_VOCAB),
    )
    flops_doc = "fwd 2*N*C*V; bwd 4*N*C*V; fwd+bwd 6*N*C*V"
    precision = ("x in the row's dtype; W in it (same) or fp32 under torch.autocast (fp32); triton accumulates "
                 "in fp32, eager's logits are in the compute dtype, compile (the reference) upcasts logits to fp32")

    def add_arguments(self, group) -> None:
        group.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk of ours [its heuristic]")

    def cases(self, args) -> list[dict]:
        weights = [w.strip() for w in args.weights.split(",") if w.strip()]
        if not weights or any(w not in ("same", "fp32") for w in weights):
            raise ValueError(f"--weights takes same and/or fp32, got {args.weights!r}")
        return [{"size": f"{N}x{C}x{V}", "tokens": N, "hidden": C, "vocab": V, "weights": w}
                for N in ints(args.tokens, "--tokens") for C in ints(args.hidden, "--hidden")
                for V in ints(args.vocabs, "--vocabs") for w in weights]

    def skip_case(self, case, dtype):
        if case["weights"] == "fp32" and dtype == "float32":
            return "fp32 master weights in a float32 run are the 'same' setup"
        return None

    def make_inputs(self, case, dtype, device, args) -> Inputs:
        N, C, V = case["tokens"], case["hidden"], case["vocab"]
        x = torch.randn(N, C, device=device, dtype=dtype)  # (N, C)
        w_dtype = torch.float32 if case["weights"] == "fp32" else dtype
        w = (torch.randn(V, C, device=device) * C**-0.5).to(w_dtype)  # (V, C): logits ~ N(0, 1)
        targets = torch.randint(0, V, (N,), device=device)  # (N,) int64
        return Inputs((x, w, targets), grad=(0, 1))

    def build(self, provider, case, args):
        if provider == "triton":
            lce = load_kernel("llama_mini.kernels.linear_cross_entropy", "linear_cross_entropy")
            fn = lambda x, w, t: lce(x, w, t, IGNORE_INDEX, chunk_size=args.chunk_size)  # noqa: E731
        elif provider == "compile":
            fn = compiled(reference.linear_cross_entropy)
        else:
            fn = lambda x, w, t: F.cross_entropy(x @ w.t(), t, ignore_index=IGNORE_INDEX)  # noqa: E731
        if case["weights"] != "fp32":
            return fn

        def autocast(x, w, t):  # what a mixed-precision training step does around the loss
            with torch.autocast(x.device.type, dtype=x.dtype):
                return fn(x, w, t)
        return autocast

    def reference(self, case, inputs, args):
        x, w, targets = inputs.args
        w32 = w.float()
        rows = max(1, REF_CHUNK_ELEMENTS // case["vocab"])
        total = torch.zeros((), device=x.device)
        for i in range(0, x.shape[0], rows):
            logits = x[i:i + rows].float() @ w32.t()  # (rows, V) fp32
            total += F.cross_entropy(logits, targets[i:i + rows], ignore_index=IGNORE_INDEX, reduction="sum")
        return (total / (targets != IGNORE_INDEX).sum().clamp(min=1),)

    def error_bound(self, dtype, device):
        if dtype == "float32" and device.type == "cuda":
            return 5e-3  # tl.dot on fp32 operands uses TF32 on a GPU unless told otherwise
        return ERR_BOUND[dtype]

    def flops(self, case, mode):
        return {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * case["tokens"] * case["hidden"] * case["vocab"]

    def mode_skip(self, provider, mode):
        if provider == "triton" and mode == "bwd":
            return ("ours computes dx and dW in the forward and hands them to the first backward, which "
                    "refuses retain_graph: a backward alone cannot be timed (its cost is in fwd+bwd)")
        return None


OP = LinearCrossEntropyBench()


def main(argv: list[str] | None = None) -> int:
    return run(OP, argv)


if __name__ == "__main__":
    sys.exit(main())
