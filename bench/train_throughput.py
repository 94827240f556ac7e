"""Training-step throughput and memory: tokens/s, ms/step, TFLOP/s and MFU, peak memory, and the
largest batch that fits, per attention backend x fused kernels x activation checkpointing; on
CPU also a same-step comparison against a plain PyTorch LLaMA of the same shape.

    python bench/train_throughput.py                  # CPU default: debug + homework, ~2-3 min on 2 idle cores
    python bench/train_throughput.py --quick          # smoke run, well under a minute (the test runs it)
    python bench/train_throughput.py --device cuda    # GPU default: tinyllama-1.1b, B=8, T=2048, bfloat16
    python bench/train_throughput.py --presets homework --backends sdpa --fused off --checkpointing off,on \
        --batch-size 8 --seq-len 256 --no-max-batch

One training step is the step users run: ``llama_mini.training.step.train_step``, the function
``Trainer.train_step`` calls, on one micro-batch: ``loss = model(tokens, targets)`` under the
trainer's autocast for ``--dtype`` (fp32 weights; the trainer's ``LossScaler`` for float16),
backward, global gradient-norm clipping at the trainer's default ``optim.grad_clip``, AdamW from
``optim.build_optimizer`` with the trainer's default ``OptimConfig`` (weight decay on matrices
only; fused on CUDA, torch's default elsewhere) and ``zero_grad(set_to_none=True)``, on one fixed
random (batch, seq_len) batch. Axes, one row per combination and preset:

backend        ``ModelArgs.attn_backend``: eager, sdpa, triton, ... A name missing from
               ``llama_mini.attention_backends()`` gives a *skipped* row with the reason; a
               registered one that cannot run here falls back to sdpa inside the model, and the
               row's ``attn_used`` says so (the table marks it ``*``).
fused          off: every ``ModelArgs`` op switch (``llama_mini.ops.IMPL_FIELDS``: norm, rope,
               mlp, loss, linear loss) ``"torch"``; on: all ``"triton"``. If any op has no
               runnable "triton" implementation the row is *skipped* with the reason (never
               silently run as something else). ``op_resolutions`` records what ran
               (``llama_mini.resolutions()``).
checkpointing  ``ModelArgs.activation_checkpointing``.

Figures per row: ms/step (median and min of the timed steps; at least ``--steps``, more when
``--min-time`` asks), tokens/s = batch * seq_len / median, achieved TFLOP/s = tokens/s *
``model.flops_per_token(seq_len)`` (6N + causal attention counted as half, recomputation under
checkpointing not counted: the usual MFU convention), MFU = TFLOP/s over the device's dense
datasheet peak (``common.peak_tflops`` or ``--peak-tflops``; none on CPU) and ``mfu_matmul`` =
TFLOP/s over the rate of one large matmul in the step's dtype measured at the start of the run
(``llama_mini.hardware.measure_matmul_flops``; 8192^3 on CUDA, 512^3 on CPU), both shown, peak memory
(``torch.cuda.max_memory_allocated`` over one step after warmup; null on CPU, with the reason),
parameter count, the attention backend actually used, the op resolutions, and ``host_syncs``: the
device-to-host reads the step made (``StepResult.host_syncs``: two of the step's own, plus our
model's input range checks, two more, which ``PlainLlama`` does not make, plus the fused loss's
target check with the fused ops on). Timing: do_bench
on CUDA, wall clock elsewhere (``bench/common.py``'s ``Timer``).

Largest batch (``--max-batch``, on by default), per (preset, backend, checkpointing), with the
fused kernels on where they can run, else off, at ``--seq-len``:
  CUDA  an OOM search: batch 1, 2, 4, ... until ``torch.cuda.OutOfMemoryError`` (or
        ``--max-batch-limit``), then bisection; a batch fits when two full training steps
        complete. Gradients, the failed step's tensors and the allocator cache are freed between
        tries.
  CPU   there is no allocator OOM to search for, so it is an ESTIMATE from measured allocation:
        ``torch.profiler`` (``profile_memory=True``) records every CPU tensor allocation and free
        of one training step, at two batch sizes (``--memory-probe-batches``; more validate the
        fit). The steps make the same allocations in the same order, so the live bytes after each
        event are fitted as C + D * batch (weights-sized tensors plus activations); with the
        persistent bytes (weights, AdamW state) the peak at any batch is the max over events. The
        largest batch whose peak stays <= ``--memory-budget-gib`` is reported, with the slope D at
        its binding event as the per-sample memory (checkpointing must make it smaller). Fitting
        every event, not just the peak, matters: at small batches the peak sits where the
        gradients are, at large ones where the activations are. Allocations that bypass torch's
        CPU allocator (oneDNN/MKL scratch) and the interpreter are not counted.

Plain-PyTorch comparison (``--compare-plain``, default on CPU only): ``PlainLlama`` below is a
compact nanoGPT-style LLaMA (RMSNorm, complex RoPE, GQA via repeat_interleave, SwiGLU,
``F.scaled_dot_product_attention(is_causal=True)``, untied output), loaded with our weights
(same parameter count, asserted) and trained with the same step; its rows have backend
``plain-pytorch``. Ours (sdpa, fused off, no checkpointing) and plain are timed interleaved (one
step of each per round, order alternating), so background load hits both alike. PASS when
ours tokens/s / plain tokens/s >= 0.97 ("not slower", 3% for timing noise).

GPU target: MFU >= 45% for a model of 0.5-2B parameters at seq_len 2048 in bfloat16 on CUDA
(tinyllama-1.1b is the issue's "about 1B" shape); each such row gets PASS/MISS.

Output (``--out``, default ``bench/results/train_throughput/``): ``<name>.json`` (metadata:
device, versions, date, config, comparison, MFU target; then one record per row, ``kind`` train
or max_batch), ``<name>.csv`` (the same records after ``# key: value`` metadata lines; read
with ``pandas.read_csv(path, comment="#")``) and ``<name>.png`` (tokens/s per configuration;
largest batch). Progress goes to stderr, tables to stdout. Exits 1 if a row failed (an OOM row
is a result, not a failure; a skipped row is neither).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import llama_mini

# ``python bench/train_throughput.py`` puts bench/ first on sys.path: these are bench/ modules.
from common import (
    DTYPES, cpu_busy, environment, fmt, format_table, HelpFormatter, is_oom, load_avg_1m, peak_memory, peak_tflops,
    parse_overrides, pyplot, release, resolve_device, result_paths, results_dir, start_device, synchronizer, Timer,
    utc_now_iso, utc_stamp, versions, warn_if_cpu_busy, write_csv, write_json,
)
from llama_mini.hardware import measure_matmul_flops
from llama_mini import PRESETS, ModelArgs, Transformer, attention_backends, attention_fallbacks, resolutions
from llama_mini import ops as llama_ops
from llama_mini.training.config import OptimConfig
from llama_mini.training.optim import build_optimizer
from llama_mini.training.precision import LossScaler, autocast_factory
from llama_mini.training.step import train_step
from model_throughput import _split, attn_used

DEFAULT_OUT = results_dir("train_throughput")
PLAIN = "plain-pytorch"
RATIO_THRESHOLD = 0.97  # ours/plain tokens/s at or above this is "not slower" (3% timing noise)
MFU_TARGET = 0.45
MFU_TARGET_SHAPE = dict(seq_len=2048, dtype="bfloat16", min_params=0.5e9, max_params=2e9)
IMPL_FIELDS = llama_ops.IMPL_FIELDS
FUSED_IMPL = {"off": "torch", "on": "triton"}
OPTIM = OptimConfig()  # the trainer's defaults: lr, AdamW betas/eps/weight decay, grad_clip
PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
MAX_TIMED = 200

CSV_FIELDS = [
    "kind", "preset", "attn_backend", "attn_used", "fused", "checkpointing", "batch_size", "seq_len", "dtype",
    "status", "reason", "median_ms", "min_ms", "n_timed", "timer", "tokens_per_s", "flops_per_token", "tflops",
    "peak_tflops", "mfu", "mfu_matmul", "mfu_result", "peak_mem_mib", "peak_mem_note", "n_params", "op_resolutions", "loss",
    "max_batch", "max_batch_capped", "max_batch_method", "memory_budget_gib", "persistent_mib", "fixed_mib",
    "per_sample_mib", "probe", "host_syncs", "error",
]


# ---------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/train_throughput.py", description=__doc__.split("\n\n")[0],
        epilog="CPU defaults (debug + homework at B=4, T=256, fp32; 1 warmup + >= 3 timed steps; max-batch "
        "estimate) take about 2-3 minutes on 2 idle cores: homework's step is ~2-4 s there. Use --threads 1 on a "
        "busy machine. Defaults in [brackets] depend on the device or --quick. The module docstring explains "
        "every figure.",
        formatter_class=HelpFormatter,
    )
    m = p.add_argument_group("axes (comma-separated lists)")
    m.add_argument("--presets", default=None, help="ModelArgs presets [cpu: debug,homework; cuda: tinyllama-1.1b; "
                   f"quick: debug]; any of {sorted(PRESETS)}")
    m.add_argument("--backends", default="eager,sdpa,triton",
                   help="attention backends; unregistered names give skipped rows with the reason")
    m.add_argument("--fused", default="off,on", help="fused kernels: off (all ops 'torch'), on (all 'triton')")
    m.add_argument("--checkpointing", default="off,on", help="activation checkpointing: off, on or off,on")
    m.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelArgs field (repeatable), e.g. --override n_layers=4; the axes set "
                   "attn_backend, activation_checkpointing and the *_impl fields themselves")
    m.add_argument("--register-module", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (repeatable), e.g. one that registers Triton kernels")
    m.add_argument("--seed", type=int, default=0, help="seed for weights and random tokens")

    s = p.add_argument_group("shapes and precision")
    s.add_argument("--batch-size", type=int, default=None, help="batch size [cpu: 4; cuda: 8; quick: 2]")
    s.add_argument("--seq-len", type=int, default=None, help="sequence length [cpu: 256; cuda: 2048; quick: 32]")
    s.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="compute dtype under autocast, fp32 weights [cpu: float32; cuda: bfloat16]")
    s.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    s.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs [torch's default]")
    s.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for MFU [datasheet table for known GPUs; none on CPU]")

    t = p.add_argument_group("timing")
    t.add_argument("--timer", default="auto", choices=["auto", "do_bench", "cuda-events", "wall"],
                   help="auto: do_bench on CUDA if triton imports, else CUDA events; wall clock elsewhere")
    t.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per configuration, >= 1: the first allocates the AdamW state [cpu: 1; cuda: 3]")
    t.add_argument("--steps", type=int, default=None, help="timed steps, at least [cpu: 3; cuda: 10; quick: 2]")
    t.add_argument("--min-time", type=float, default=None,
                   help="time more steps until about this many seconds per configuration (max 200 steps) "
                   "[cpu: 3; cuda and quick: 0]")
    t.add_argument("--warmup-ms", type=float, default=50.0, help="do_bench warmup budget in ms")
    t.add_argument("--rep-ms", type=float, default=200.0, help="do_bench timing budget in ms (stretched to >= 5 steps)")
    t.add_argument("--compare-plain", default="auto", choices=["auto", "on", "off"],
                   help="time a plain PyTorch LLaMA against ours, interleaved (auto: on CPU only)")
    t.add_argument("--quick", action="store_true", help="debug preset, tiny shapes, 2 steps: a smoke run")

    b = p.add_argument_group("largest batch")
    b.add_argument("--max-batch", action=argparse.BooleanOptionalAction, default=True,
                   help="find the largest batch per (backend, checkpointing): OOM search on CUDA, estimate on CPU")
    b.add_argument("--memory-budget-gib", type=float, default=16.0,
                   help="CPU estimate: memory a training step may use (ignored on CUDA, where the GPU's memory is)")
    b.add_argument("--memory-probe-batches", default="2,4",
                   help="CPU estimate: batch sizes measured; the two smallest are fitted, others check the fit")
    b.add_argument("--max-batch-limit", type=int, default=256, help="CUDA search: stop doubling here")

    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="directory for the JSON, CSV and PNG [bench/results/train_throughput/ of this checkout]")
    o.add_argument("--name", default=None, help="file stem of the outputs [<presets>_<device>_<dtype>_<UTC time>]")
    o.add_argument("--no-plot", action="store_true", help="do not write the PNG")

    args = p.parse_args(argv)
    for mod in args.register_module:
        importlib.import_module(mod)
    args.device = resolve_device(args.device)
    kind = "quick" if args.quick else ("cuda" if args.device.type == "cuda" else "cpu")
    defaults = {  # cpu, cuda, quick
        "presets": ("debug,homework", "tinyllama-1.1b", "debug"), "batch_size": (4, 8, 2),
        "seq_len": (256, 2048, 32), "warmup": (1, 3, 1), "steps": (3, 10, 2), "min_time": (3.0, 0.0, 0.0),
        "dtype": ("float32", "bfloat16", "float32" if args.device.type == "cpu" else "bfloat16"),
    }
    for name, values in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, values[("cpu", "cuda", "quick").index(kind)])
    if args.quick:
        args.rep_ms, args.warmup_ms = min(args.rep_ms, 10.0), min(args.warmup_ms, 5.0)
    for name in ("batch_size", "seq_len", "warmup", "steps", "max_batch_limit"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.presets = _split(args.presets)
    bad = [x for x in args.presets if x not in PRESETS]
    if bad or not args.presets:
        p.error(f"unknown preset(s) {bad}; choose from {sorted(PRESETS)}")
    args.backends = _split(args.backends)
    for flag, allowed in (("fused", ("off", "on")), ("checkpointing", ("off", "on"))):
        values = _split(getattr(args, flag))
        if not values or any(v not in allowed for v in values):
            p.error(f"--{flag} takes off, on or off,on; got {getattr(args, flag)!r}")
        setattr(args, flag, values)
    try:
        args.memory_probe_batches = sorted({int(x) for x in _split(args.memory_probe_batches)})
        args.overrides = parse_overrides(args.override)
    except ValueError as e:
        p.error(str(e))
    if len(args.memory_probe_batches) < 2 or args.memory_probe_batches[0] < 1:
        p.error("--memory-probe-batches takes two (or more, to validate the fit) different positive batch sizes")
    args.compare = args.compare_plain == "on" or (args.compare_plain == "auto" and args.device.type == "cpu")
    return args


# ---------------------------------------------------------------------------- the plain PyTorch LLaMA
class PlainRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def plain_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Meta's complex RoPE: x (B, T, H, D) as D/2 complex pairs times freqs_cis (T, D/2)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, H, D/2)
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).type_as(x)


class PlainAttention(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=False)
        self.k_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.v_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = plain_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), freqs_cis)  # (B, T, H, D)
        k = plain_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), freqs_cis)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:  # GQA: kv head j serves query heads j*rep .. j*rep+rep-1
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, H, T, D) -> (B, T, C)


class PlainMLP(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.gate = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.up = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.down = nn.Linear(a.hidden_dim, a.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class PlainBlock(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.norm1, self.attn = PlainRMSNorm(a.dim, a.norm_eps), PlainAttention(a)
        self.norm2, self.mlp = PlainRMSNorm(a.dim, a.norm_eps), PlainMLP(a)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), freqs_cis)
        return x + self.mlp(self.norm2(x))


class PlainLlama(nn.Module):
    """The same architecture written the short way, for the speed comparison. ``forward(idx,
    targets)`` returns the mean cross-entropy, like ``Transformer(tokens, targets)``."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        if a.rope_scaling.type != "none":
            raise ValueError("PlainLlama has no RoPE scaling")
        self.embed = nn.Embedding(a.vocab_size, a.dim)
        self.blocks = nn.ModuleList(PlainBlock(a) for _ in range(a.n_layers))
        self.norm_f = PlainRMSNorm(a.dim, a.norm_eps)
        self.lm_head = nn.Linear(a.dim, a.vocab_size, bias=False)
        D = a.head_dim
        freqs = 1.0 / a.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
        angles = torch.outer(torch.arange(a.max_seq_len, dtype=torch.float64), freqs)  # (T_max, D/2)
        freqs_cis = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
        self.register_buffer("freqs_cis", freqs_cis, persistent=False)
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)  # (B, T, C)
        freqs_cis = self.freqs_cis[: idx.shape[1]]
        for block in self.blocks:
            x = block(x, freqs_cis)
        logits = self.lm_head(self.norm_f(x)).float()  # (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


_NAME_MAP = [
    (r"tok_embeddings\.", "embed."), (r"^norm\.", "norm_f."), (r"^output\.", "lm_head."), (r"^layers\.", "blocks."),
    (r"\.attention\.wq\.", ".attn.q_proj."), (r"\.attention\.wk\.", ".attn.k_proj."),
    (r"\.attention\.wv\.", ".attn.v_proj."), (r"\.attention\.wo\.", ".attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate."), (r"\.feed_forward\.w3\.", ".mlp.up."),
    (r"\.feed_forward\.w2\.", ".mlp.down."), (r"\.attention_norm\.", ".norm1."), (r"\.ffn_norm\.", ".norm2."),
]


def plain_state_dict(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (Meta's) parameter names -> PlainLlama's."""
    out = {}
    for name, tensor in ours.items():
        for pattern, repl in _NAME_MAP:
            name = re.sub(pattern, repl, name)
        out[name] = tensor
    return out


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- models and the step
def model_args(args: argparse.Namespace, preset: str, backend: str = "sdpa", fused: str = "off",
               ckpt: str = "off") -> ModelArgs:
    fields = dict(args.overrides, attn_backend=backend, activation_checkpointing=ckpt == "on")
    fields.update({f: FUSED_IMPL[fused] for f in IMPL_FIELDS})
    return ModelArgs.preset(preset, **fields)


def build(cls: Callable[[ModelArgs], nn.Module], margs: ModelArgs, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: a 1B model's CPU init takes seconds
        return cls(margs).train()


class TrainStep:
    """One optimizer step of ``model`` on a fixed random batch, the callable that is timed: the
    trainer's step (``llama_mini.training.step.train_step``) with the trainer's optimizer
    (``optim.build_optimizer``: AdamW, decay on matrices only, fused on CUDA), its default
    ``OptimConfig`` (lr, betas, eps, weight decay, ``grad_clip`` global-norm clipping), its
    ``LossScaler`` for float16 and its autocast for the dtype. ``model`` is anything with
    ``model(tokens, targets) -> mean loss``: ours or ``PlainLlama``."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, vocab: int, seed: int) -> None:
        self.model, self.device, self.dtype, self.vocab, self.seed = model, device, dtype, vocab, seed
        self.opt = build_optimizer(model, lr=OPTIM.lr, weight_decay=OPTIM.weight_decay,
                                   betas=(OPTIM.beta1, OPTIM.beta2), eps=OPTIM.eps)
        self.scaler = LossScaler(dtype == torch.float16)
        self.autocast = autocast_factory(PRECISION[dtype], device)
        self.loss: float | None = None  # of the first step
        self.host_syncs: int | None = None  # of the last step
        self.batch: dict | None = None

    def set_batch(self, batch: int, seq_len: int) -> None:
        self.batch = None  # free the old batch before the new one
        gen = torch.Generator().manual_seed(self.seed + 1)
        data = torch.randint(0, self.vocab, (batch, seq_len + 1), generator=gen).to(self.device)
        self.batch = {"input_ids": data[:, :-1].contiguous(), "target_ids": data[:, 1:].contiguous()}  # (B, T) each

    def __call__(self) -> None:
        out = train_step(self.model, self.opt, [self.batch], lr=OPTIM.lr, grad_clip=OPTIM.grad_clip,
                         scaler=self.scaler, autocast=self.autocast, device=self.device)
        self.host_syncs = out.host_syncs
        if self.loss is None:
            self.loss = out.loss

    def persistent_bytes(self) -> int:
        """Weights, buffers and optimizer state: what lives between steps (gradients are None)."""
        seen: dict[int, int] = {}
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        tensors += [v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v)]
        for t in tensors:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())


def skip_reason(backend: str, fused: str, device: torch.device) -> str | None:
    """Why this (backend, fused) cannot run here, or None. Never silent: the row keeps it."""
    if backend != PLAIN and backend not in attention_backends():
        return f"attention backend {backend!r} is not registered (llama_mini.attention_backends() = {attention_backends()})"
    if fused == "on":
        for field, op in ((f, op) for f, names in IMPL_FIELDS.items() for op in names):
            if "triton" not in llama_ops.registered(op):
                return f"fused on: no 'triton' implementation of {op} ({field}) is registered " \
                       f"(registered: {llama_ops.registered(op)})"
            try:
                llama_ops.resolve_op(op, "triton", device)
            except RuntimeError as e:
                return f"fused on: {e}"
    return None


def used_ops(fused: str, device: torch.device) -> str:
    res = resolutions()
    got = [f"{op}={res.get(f'{op}@{device.type} ({FUSED_IMPL[fused]})', {}).get('impl', '?')}"
           for names in IMPL_FIELDS.values() for op in names]
    return " ".join(got)


# ---------------------------------------------------------------------------- throughput rows
def _row(kind: str, preset: str, backend: str, fused: str, ckpt: str, args: argparse.Namespace, **kw: Any) -> dict:
    row = {k: None for k in CSV_FIELDS}
    row.update(kind=kind, preset=preset, attn_backend=backend, fused=fused, checkpointing=ckpt,
               seq_len=args.seq_len, dtype=args.dtype, status="ok")
    row.update(kw)
    return row


def _warm(step: TrainStep, args: argparse.Namespace, device: torch.device) -> tuple[float, float | None, str | None]:
    """args.warmup untimed steps; the last is timed roughly and, on CUDA, measured for peak memory."""
    sync = synchronizer(device)
    for _ in range(args.warmup - 1):
        step()
    sync()
    t0 = time.perf_counter()
    mem, note = peak_memory(step, device, "the training step's")
    if mem is None:  # peak_memory only calls fn where it can measure
        step()
    sync()
    return time.perf_counter() - t0, mem, note


def _n_timed(args: argparse.Namespace, step_s: float) -> int:
    return max(args.steps, min(MAX_TIMED, math.ceil(args.min_time / max(step_s, 1e-9))))


def _fill(row: dict, times: list[float], timer: str, flops_per_token: float, ceiling: float | None,
          n: int, args: argparse.Namespace) -> None:
    med = statistics.median(times)
    tps = args.batch_size * args.seq_len / (med / 1e3)
    tflops = tps * flops_per_token / 1e12
    row.update(median_ms=med, min_ms=min(times), n_timed=len(times), timer=timer, tokens_per_s=tps,
               flops_per_token=flops_per_token, tflops=tflops, peak_tflops=ceiling, n_params=n,
               mfu=tflops / ceiling if ceiling else None)
    if ceiling and mfu_target_applies(args, n, row["attn_backend"]):
        row["mfu_result"] = "PASS" if row["mfu"] >= MFU_TARGET else "MISS"


def mfu_target_applies(args: argparse.Namespace, n: int, backend: str) -> bool:
    s = MFU_TARGET_SHAPE
    return (args.device.type == "cuda" and backend != PLAIN and args.seq_len == s["seq_len"]
            and args.dtype == s["dtype"] and s["min_params"] <= n <= s["max_params"])


def run_ours(args, device, preset: str, backend: str, fused: str, ckpt: str, ceiling) -> dict:
    row = _row("train", preset, backend, fused, ckpt, args, batch_size=args.batch_size)
    model = build(Transformer, model_args(args, preset, backend, fused, ckpt), device, args.seed)
    step = TrainStep(model, device, DTYPES[args.dtype], model.args.vocab_size, args.seed)
    step.set_batch(args.batch_size, args.seq_len)
    step_s, mem, note = _warm(step, args, device)
    timer = Timer(device, args.timer, warmup=0, repeats=_n_timed(args, step_s), warmup_ms=args.warmup_ms,
                  rep_ms=args.rep_ms)
    times, how = timer(step)
    _fill(row, times, how, model.flops_per_token(args.seq_len), ceiling, n_params(model), args)
    row.update(attn_used=attn_used(backend, device), op_resolutions=used_ops(fused, device), loss=step.loss,
               peak_mem_mib=mem, peak_mem_note=note, host_syncs=step.host_syncs)
    return row


def run_comparison(args, device, preset: str, ceiling) -> tuple[list[dict], dict]:
    """Ours (sdpa, fused off, no checkpointing) and PlainLlama with our weights, timed interleaved."""
    ours = build(Transformer, model_args(args, preset), device, args.seed)
    plain = build(PlainLlama, ours.args, device, args.seed)
    plain.load_state_dict(plain_state_dict(ours.state_dict()))
    n_ours, n_plain = n_params(ours), n_params(plain)
    assert n_ours == n_plain == llama_mini.count_params(ours.args), (n_ours, n_plain)
    dtype = DTYPES[args.dtype]
    steps = [TrainStep(m, device, dtype, ours.args.vocab_size, args.seed) for m in (ours, plain)]
    warm = []
    for s in steps:
        s.set_batch(args.batch_size, args.seq_len)
        warm.append(_warm(s, args, device))
    # At least --steps rounds, more until each model had ~--min-time (not from one warmup step's
    # time: a burst of outside load there would cut the rounds short).
    sync, times, deadline = synchronizer(device), [[], []], time.perf_counter() + 2 * args.min_time
    rounds = 0
    while rounds < args.steps or (rounds < MAX_TIMED and time.perf_counter() < deadline):
        for i in ((0, 1) if rounds % 2 == 0 else (1, 0)):  # ABBA...: neither always runs first
            sync()
            t0 = time.perf_counter()
            steps[i]()
            sync()
            times[i].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    how = "wall, interleaved with the other model of the comparison"
    fpt = ours.flops_per_token(args.seq_len)
    rows = []
    for i, backend in enumerate(("sdpa", PLAIN)):
        row = _row("train", preset, backend, "off", "off", args, batch_size=args.batch_size)
        _fill(row, times[i], how, fpt, ceiling, (n_ours, n_plain)[i], args)
        note = warm[i][2] or "measured with both models of the comparison resident (the other's weights, " \
                             "gradients and AdamW state included)"
        row.update(loss=steps[i].loss, peak_mem_mib=warm[i][1], peak_mem_note=note, host_syncs=steps[i].host_syncs)
        if i == 0:
            row.update(attn_used=attn_used("sdpa", device), op_resolutions=used_ops("off", device))
        else:
            row.update(attn_used="F.scaled_dot_product_attention(is_causal=True)",
                       op_resolutions="plain PyTorch: RMSNorm, complex RoPE, SwiGLU, F.cross_entropy")
        rows.append(row)
    paired = statistics.median(p / o for o, p in zip(*times))  # per-round plain ms / ours ms
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    summary = dict(preset=preset, ours_tokens_per_s=rows[0]["tokens_per_s"], plain_tokens_per_s=rows[1]["tokens_per_s"],
                   ratio=ratio, paired_median_ratio=paired, rounds=rounds, threshold=RATIO_THRESHOLD,
                   result="PASS" if ratio >= RATIO_THRESHOLD else "MISS", n_params=n_ours,
                   losses=[steps[0].loss, steps[1].loss])
    return rows, summary


# ---------------------------------------------------------------------------- largest batch
@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints profiler start/stop lines on fd 2 from C++; keep the progress readable."""
    sys.stderr.flush()
    try:
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_step_timeline(step: TrainStep) -> list[int]:
    """Signed bytes of every CPU tensor allocation (+) and free (-) of one training step, in order,
    from ``torch.profiler`` with ``profile_memory=True``."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    mem = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
           if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    if not mem:
        raise RuntimeError("torch.profiler recorded no CPU memory events; cannot measure the step's memory")
    return [n for _, n in sorted(mem, key=lambda x: x[0])]  # stable: same-time records keep their order


def _cumsum(xs: list[int]) -> list[int]:
    out, live = [], 0
    for x in xs:
        live += x
        out.append(live)
    return out


def fit_memory(batches: list[int], timelines: list[list[int]]) -> tuple[list[float], list[float], str]:
    """Live bytes after each allocation event as C[i] + D[i] * batch, from the first two probes,
    and what was fitted.

    A step runs the same ops in the same order at every batch size, so event i of one probe is
    event i of the other; each tensor's size is a constant (weights-sized: gradients, optimizer
    temporaries) plus a part proportional to the batch (activations). Fitting every point of the
    timeline, not just its peak, keeps the estimate right when the peak moves: at small batches it
    sits where the gradients are (end of backward, optimizer step), at large ones where the
    activations are (start of backward)."""
    (b1, b2), (t1, t2) = batches[:2], timelines[:2]
    l1, l2 = _cumsum(t1), _cumsum(t2)
    if len(t1) != len(t2) or any((x > 0) != (y > 0) for x, y in zip(t1, t2)):
        # Some kernels take another path at some sizes (batch 1 matmuls do): fit the peaks alone,
        # which is right once both probes' peaks are activation-bound.
        print(f"  note: the steps at batch {b1} and {b2} allocate differently ({len(t1)} vs {len(t2)} events); "
              "fitting their peaks only", file=sys.stderr)
        l1, l2 = [max(l1)], [max(l2)]
    D = [(y - x) / (b2 - b1) for x, y in zip(l1, l2)]
    C = [x - d * b1 for x, d in zip(l1, D)]
    return C, D, "every allocation event" if len(l1) > 1 else "the step's peak only (event timelines differ)"


def predicted_peak(C: list[float], D: list[float], batch: int) -> tuple[float, int]:
    """(peak live bytes above the step's start, the event index where it happens) at ``batch``."""
    return max((c + d * batch, i) for i, (c, d) in enumerate(zip(C, D)))


def max_batch_cpu(args, device, preset: str, backend: str, fused: str, ckpt: str) -> dict:
    row = _row("max_batch", preset, backend, fused, ckpt, args, memory_budget_gib=args.memory_budget_gib)
    model = build(Transformer, model_args(args, preset, backend, fused, ckpt), device, args.seed)
    step = TrainStep(model, device, DTYPES[args.dtype], model.args.vocab_size, args.seed)
    timelines = []
    for batch in args.memory_probe_batches:
        step.set_batch(batch, args.seq_len)
        if not timelines:
            step()  # the AdamW state and RoPE tables exist from now on: persistent, not per step
        timelines.append(cpu_step_timeline(step))
    persistent = step.persistent_bytes()
    C, D, fitted = fit_memory(args.memory_probe_batches, timelines)
    room = args.memory_budget_gib * 2**30 - persistent
    if predicted_peak(C, D, 1)[0] > room:
        best = 0
    elif max(D) <= 0:
        best = None  # nothing grows with the batch: no limit to report
    else:  # every event must fit: C[i] + D[i] * batch <= room
        best = min(int((room - c) // d) for c, d in zip(C, D) if d > 0)
    _, at = predicted_peak(C, D, max(best or 1, 1))  # where the binding peak is: its slope is per-sample memory
    mib = 2**20
    checks = []
    for batch, tl in list(zip(args.memory_probe_batches, timelines))[2:]:  # extra probes validate the fit
        measured, predicted = max(_cumsum(tl)), predicted_peak(C, D, batch)[0]
        checks.append(f"B={batch}: measured {(persistent + measured) / mib:.1f} MiB, predicted "
                      f"{(persistent + predicted) / mib:.1f} MiB ({predicted / max(measured, 1) - 1:+.2%} of the step)")
    row.update(
        max_batch=best, attn_used=attn_used(backend, device), host_syncs=step.host_syncs,
        max_batch_method=f"estimate from measured per-step allocation (torch.profiler profile_memory), "
                         f"{fitted} fitted as C + D * batch; not an OOM search",
        persistent_mib=persistent / mib, fixed_mib=(persistent + C[at]) / mib, per_sample_mib=D[at] / mib,
        probe="; ".join([f"B={b}: peak {(persistent + max(_cumsum(tl))) / mib:.1f} MiB"
                         for b, tl in zip(args.memory_probe_batches[:2], timelines)] + checks),
    )
    return row



def max_batch_cuda(args, device, preset: str, backend: str, fused: str, ckpt: str) -> dict:
    row = _row("max_batch", preset, backend, fused, ckpt, args)
    model = build(Transformer, model_args(args, preset, backend, fused, ckpt), device, args.seed)
    step = TrainStep(model, device, DTYPES[args.dtype], model.args.vocab_size, args.seed)
    log: list[str] = []

    def fits(batch: int) -> bool:
        ok = True
        try:
            step.set_batch(batch, args.seq_len)
            step()
            step()
            torch.cuda.synchronize(device)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            ok = False  # the exception (and the frames holding the step's tensors) is gone after this block
        step.batch = None
        step.opt.zero_grad(set_to_none=True)
        release(device)
        log.append(f"{batch}:{'ok' if ok else 'oom'}")
        print(f"    max-batch {preset} {backend} ckpt={ckpt}: B={batch} {'fits' if ok else 'OOM'}",
              file=sys.stderr, flush=True)
        return ok

    lo, hi = 0, None  # lo fits (0 = nothing yet), hi does not
    batch = 1
    while batch <= args.max_batch_limit:
        if not fits(batch):
            hi = batch
            break
        lo, batch = batch, batch * 2
    if hi is not None:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    row.update(max_batch=lo, max_batch_capped=hi is None, attn_used=attn_used(backend, device),
               host_syncs=step.host_syncs,
               max_batch_method=f"OOM search (doubling, then bisection; fits = 2 training steps complete; "
                                f"limit {args.max_batch_limit})",
               probe=" ".join(log))
    return row


# ---------------------------------------------------------------------------- reporting
def _progress(i: int, n: int, row: dict) -> None:
    what = (f"[{i}/{n}] {row['kind']:<9} {row['preset']} backend={row['attn_backend']} fused={row['fused']} "
            f"ckpt={row['checkpointing']}")
    if row["status"] != "ok":
        msg = f"{what}: {row['status'].upper()} {row['reason'] or row['error']}"
    elif row["kind"] == "max_batch":
        msg = f"{what}: max batch {fmt(row['max_batch'], 'd')}"
        if row["per_sample_mib"] is not None:
            msg += f" (estimate; {row['per_sample_mib']:.1f} MiB/sample + {row['fixed_mib']:.0f} MiB)"
    else:
        msg = (f"{what} B={row['batch_size']} T={row['seq_len']}: {row['median_ms']:.1f} ms (min {row['min_ms']:.1f}, "
               f"n={row['n_timed']}) {row['tokens_per_s']:,.0f} tok/s, {row['tflops']:.3g} TFLOP/s")
        if row["mfu"] is not None:
            msg += f", MFU {row['mfu']:.1%}"
        if row["peak_mem_mib"] is not None:
            msg += f", peak {row['peak_mem_mib']:,.0f} MiB"
    print(msg, file=sys.stderr, flush=True)


def _marks(r: dict, notes: list[str]) -> str:
    b = r["attn_backend"]
    if r["status"] == "ok" and r["attn_used"] not in (None, b) and r["attn_backend"] != PLAIN:
        b += "*"
        note = f"{r['attn_backend']}* ran as {r['attn_used']}"
        if note not in notes:
            notes.append(note)
    if r["status"] != "ok":
        note = f"{r['attn_backend']} fused={r['fused']}: {r['status']}: {r['reason'] or r['error']}"
        if note not in notes:
            notes.append(note)
    return b


def train_table(rows: list[dict]) -> str:
    cols = [("preset", "preset", ""), ("backend", "attn_backend", ""), ("fused", "fused", ""),
            ("ckpt", "checkpointing", ""), ("B", "batch_size", "d"), ("T", "seq_len", "d"),
            ("median ms", "median_ms", ",.1f"), ("min ms", "min_ms", ",.1f"), ("tokens/s", "tokens_per_s", ",.0f"),
            ("TFLOP/s", "tflops", ".3g"), ("MFU", "mfu", ".1%"), ("MFU mm", "mfu_matmul", ".1%"),
            ("target", "mfu_result", ""),
            ("peak MiB", "peak_mem_mib", ",.0f"), ("params", "n_params", ",d"), ("syncs", "host_syncs", "d")]
    body, notes = [], []
    for r in rows:
        cells = [fmt(r[k], s) for _, k, s in cols]
        cells[1] = _marks(r, notes)
        if r["status"] != "ok":
            cells[6:] = [r["status"]] + ["-"] * (len(cols) - 7)
        body.append(cells)
    return format_table([h for h, _, _ in cols], body, n_left=4, notes=notes)


def max_batch_table(rows: list[dict]) -> str:
    cols = [("preset", "preset", ""), ("backend", "attn_backend", ""), ("fused", "fused", ""),
            ("ckpt", "checkpointing", ""), ("T", "seq_len", "d"), ("max batch", "max_batch", "d"),
            ("MiB/sample", "per_sample_mib", ",.1f"), ("fixed MiB", "fixed_mib", ",.0f"),
            ("budget GiB", "memory_budget_gib", "g")]
    body, notes = [], []
    for r in rows:
        cells = [fmt(r[k], s) for _, k, s in cols]
        cells[1] = _marks(r, notes)
        if r["max_batch_capped"]:
            cells[5] = f">={r['max_batch']}"
        if r["status"] != "ok":
            cells[5:] = [r["status"]] + ["-"] * (len(cols) - 6)
        body.append(cells)
    return format_table([h for h, _, _ in cols], body, n_left=4, notes=notes)


def plot(path: Path, meta: dict, rows: list[dict]) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    presets = meta["config"]["presets"]
    train = [r for r in rows if r["kind"] == "train" and r["status"] == "ok"]
    mb = [r for r in rows if r["kind"] == "max_batch" and r["status"] == "ok" and r["max_batch"] is not None]
    if not train and not mb:
        return False
    colors = {b: f"C{i}" for i, b in enumerate(meta["config"]["backends"] + [PLAIN])}
    n_rows = 1 + bool(mb)
    widest = max([sum(r["preset"] == p for r in train) for p in presets] + [4])
    fig, axes = plt.subplots(n_rows, len(presets), figsize=(max(5.0, 0.9 * widest + 1) * len(presets), 4.6 * n_rows),
                             squeeze=False)
    for j, preset in enumerate(presets):
        for i, (sel, key, ylabel) in enumerate(((train, "tokens_per_s", "tokens/s (median; higher is better)"),
                                                (mb, "max_batch", "largest batch"))[:n_rows]):
            ax, sel = axes[i][j], [r for r in sel if r["preset"] == preset]
            if not sel:
                ax.set_axis_off()
                continue
            labels = [f"{r['attn_backend']}" + ("*" if r["attn_used"] not in (None, r["attn_backend"]) and
                                                 r["attn_backend"] != PLAIN else "")
                      + f"\nfused {r['fused']}\nckpt {r['checkpointing']}" for r in sel]
            bars = ax.bar(range(len(sel)), [r[key] for r in sel], edgecolor="black", linewidth=0.5,
                          color=[colors.get(r["attn_backend"], "C7") for r in sel])
            for bar, r in zip(bars, sel):
                if r["checkpointing"] == "on":
                    bar.set_hatch("//")
                note = f"{r[key]:,.0f}" + (f"\nMFU {r['mfu']:.0%}" if key == "tokens_per_s" and r["mfu"] else "")
                ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=8, xytext=(0, 2), textcoords="offset points")
            ax.set_xticks(range(len(sel)), labels, fontsize=8)
            ax.set_ylim(0, max(r[key] for r in sel) * 1.25 or 1)
            ax.set_ylabel(ylabel)
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
            n = meta["presets"][preset]["n_params"]
            cfg = meta["config"]
            if key == "tokens_per_s":
                ax.set_title(f"{preset} ({n / 1e6:,.1f}M params): training step, B={cfg['batch_size']}, "
                             f"T={cfg['seq_len']}, {cfg['dtype']}", fontsize=9)
            else:
                how = f"estimate under {cfg['memory_budget_gib']:g} GiB" if meta["device_type"] != "cuda" \
                    else "OOM search"
                ax.set_title(f"{preset}: largest batch at T={cfg['seq_len']} ({how})", fontsize=9)
    fig.suptitle(f"llama-mini training throughput on {meta['device_name']} (torch {meta['torch']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = start_device(args.device, args.threads)
    presets_meta = {}
    for preset in args.presets:
        try:
            margs = model_args(args, preset)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"--presets {preset} with --override {args.overrides}: {e}") from None
        if args.seq_len > margs.max_seq_len:
            raise SystemExit(f"--seq-len {args.seq_len} exceeds max_seq_len={margs.max_seq_len} of preset {preset!r}; "
                             "add --override max_seq_len=N")
        presets_meta[preset] = dict(n_params=llama_mini.count_params(margs), model_args=margs.to_dict())

    args.out.mkdir(parents=True, exist_ok=True)  # now, so an unwritable --out fails before the timing
    env = environment(device)
    warn_if_cpu_busy(env)
    ceiling, ceiling_src = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else \
        peak_tflops(env.get("device_name", ""), args.dtype, device)
    # The second MFU ceiling: what one large matmul in the step's dtype reaches here, now.
    matmul, matmul_note = measure_matmul_flops(device, DTYPES[args.dtype])
    print(f"MFU ceilings: datasheet {fmt(ceiling, '.1f')} TFLOP/s ({ceiling_src}); measured matmul "
          f"{matmul / 1e12:.3g} TFLOP/s ({matmul_note})", flush=True)
    timer = Timer(device, args.timer, warmup=args.warmup, repeats=args.steps, warmup_ms=args.warmup_ms,
                  rep_ms=args.rep_ms)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "override", "device", "compare")}
    config.update(out=str(args.out), device=str(device), compare_plain=args.compare)

    plan: list[tuple] = []
    for preset in args.presets:
        if args.compare:
            plan.append(("compare", preset))
        for backend in args.backends:
            for fused in args.fused:
                for ckpt in args.checkpointing:
                    if not (args.compare and (backend, fused, ckpt) == ("sdpa", "off", "off")):
                        plan.append(("train", preset, backend, fused, ckpt))
        if args.max_batch:
            for backend in args.backends:
                fused = "on" if skip_reason(backend, "on", device) is None else "off"
                for ckpt in args.checkpointing:
                    plan.append(("max_batch", preset, backend, fused, ckpt))
    n_rows = sum(2 if p[0] == "compare" else 1 for p in plan)
    rows: list[dict] = []
    comparisons: list[dict] = []
    t_start = time.perf_counter()
    for item in plan:
        kind, preset = item[0], item[1]
        backend, fused, ckpt = item[2:] if kind != "compare" else ("sdpa", "off", "off")
        reason = skip_reason(backend, fused, device) if kind != "compare" else None
        try:
            if reason:
                new = [_row(kind, preset, backend, fused, ckpt, args, status="skipped", reason=reason,
                            batch_size=args.batch_size if kind == "train" else None)]
            elif kind == "compare":
                new, summary = run_comparison(args, device, preset, ceiling)
                comparisons.append(summary)
            elif kind == "train":
                new = [run_ours(args, device, preset, backend, fused, ckpt, ceiling)]
            else:
                search = max_batch_cuda if device.type == "cuda" else max_batch_cpu
                new = [search(args, device, preset, backend, fused, ckpt)]
        except Exception as e:  # record and go on; an OOM on a GPU is a result, not a failure
            oom = is_oom(e)
            if not oom:
                traceback.print_exc(file=sys.stderr)
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if oom else e}"
            new = [_row("train" if kind == "compare" else kind, preset, backend, fused, ckpt, args,
                        status="oom" if oom else "failed", batch_size=args.batch_size,
                        **{"reason" if oom else "error": msg})]
        for r in new:
            if r.get("tflops"):
                r["mfu_matmul"] = r["tflops"] * 1e12 / matmul
            rows.append(r)
            _progress(len(rows), n_rows, r)
        release(device)

    checks = {}
    for preset in args.presets:  # checkpointing must cut the per-sample (activation) memory
        per = {(r["attn_backend"], r["checkpointing"]): r["per_sample_mib"] for r in rows
               if r["kind"] == "max_batch" and r["preset"] == preset and r["per_sample_mib"] is not None}
        for backend in args.backends:
            off, on = per.get((backend, "off")), per.get((backend, "on"))
            if off is not None and on is not None:
                checks[f"{preset}/{backend}"] = dict(per_sample_mib_off=off, per_sample_mib_on=on, lower=on < off)
    mfu_rows = [r for r in rows if r["mfu_result"]]
    meta: dict[str, Any] = {
        "script": "bench/train_throughput.py", "date": utc_now_iso(), **env, **versions(),
        "llama_mini": getattr(llama_mini, "__version__", None), "timing": timer.describe(),
        "precision": "float32 throughout" if args.dtype == "float32" else
        f"fp32 weights, grads and AdamW state; forward under torch.autocast({device.type}, {args.dtype})"
        + ("; the trainer's LossScaler" if args.dtype == "float16" else ""),
        "training_step": f"llama_mini.training.step.train_step, the trainer's step: forward with targets, backward, "
                         f"global-norm clip at {OPTIM.grad_clip}, AdamW from optim.build_optimizer (lr {OPTIM.lr}, "
                         f"weight decay {OPTIM.weight_decay} on matrices, fused={device.type == 'cuda'}), "
                         "zero_grad(set_to_none=True); one fixed random batch, one micro-batch",
        "host_syncs": "device-to-host reads per step (train_step's count): 2 of the step's own (the target count, "
                      "then loss and gradient norm in one read) plus, for our model, its input range checks "
                      "(ModelArgs.validate_inputs: tokens and targets)",
        "flops": "model.flops_per_token(seq_len): 6*N_matmul + 6*n_layers*dim*seq_len per trained token (causal "
                 "attention counted as half); activation-checkpointing recompute not counted",
        "peak_tflops": ceiling, "peak_tflops_source": ceiling_src, "matmul_tflops": matmul / 1e12,
        "matmul_note": matmul_note, "config": config, "presets": presets_meta,
        "comparison": comparisons,
        "comparison_rule": f"ours (sdpa, fused off, no checkpointing) tokens/s / plain-pytorch tokens/s >= "
                           f"{RATIO_THRESHOLD}: PASS ('not slower', allowing 3% timing noise); timed interleaved",
        "mfu_target": dict(target=MFU_TARGET, **MFU_TARGET_SHAPE, device="cuda",
                           best=max((r["mfu"] for r in mfu_rows), default=None),
                           result=("PASS" if any(r["mfu_result"] == "PASS" for r in mfu_rows) else "MISS")
                           if mfu_rows else "not applicable to this run"),
        "max_batch_method": None if not args.max_batch else (
            "OOM search on the GPU" if device.type == "cuda" else
            f"CPU ESTIMATE from measured per-step allocation, not an OOM search: every CPU allocation/free of a "
            f"training step (torch.profiler profile_memory) at batch {args.memory_probe_batches[:2]}, live bytes "
            f"per event fitted as C + D*batch, plus weights and AdamW state; largest batch whose peak stays under "
            f"{args.memory_budget_gib:g} GiB"),
        "checkpointing_lowers_per_sample_memory": checks,
        "op_resolutions": resolutions(), "attention_fallbacks": attention_fallbacks(),
        "elapsed_s": round(time.perf_counter() - t_start, 2), "load_avg_1m_at_end": load_avg_1m(),
        "cpu_busy_by_others_at_end": cpu_busy() if device.type == "cpu" else None,
    }
    stem = args.name or f"{'+'.join(args.presets)}_{device.type}_{args.dtype}_{utc_stamp()}"
    json_path, csv_path, png_path = result_paths(args.out, stem)
    write_json(json_path, meta, rows)
    write_csv(csv_path, meta, rows, CSV_FIELDS)
    plotted = False if args.no_plot else plot(png_path, meta, rows)

    print(f"llama-mini training throughput: device={device} [{meta['device_name']}], dtype={args.dtype}, "
          f"timer={timer.method}, torch {meta['torch']}, triton {meta['triton']}")
    print(train_table([r for r in rows if r["kind"] == "train"]))
    if device.type != "cuda":
        print(f"peak memory: not measured on {device.type} (see peak_mem_note)"
              + ("; the max-batch estimate below measures allocations" if args.max_batch else ""))
    for c in comparisons:
        print(f"ours/plain-pytorch {c['preset']}: {c['ours_tokens_per_s']:,.0f} / {c['plain_tokens_per_s']:,.0f} "
              f"tokens/s = {c['ratio']:.3f} (paired median {c['paired_median_ratio']:.3f}, {c['rounds']} interleaved "
              f"rounds); target >= {RATIO_THRESHOLD} (not slower, 3% noise allowed): {c['result']}")
    if mfu_rows:
        best = max(mfu_rows, key=lambda r: r["mfu"])
        print(f"MFU target (>= {MFU_TARGET:.0%}, ~1B params, T=2048, bf16): best {best['mfu']:.1%} "
              f"({best['attn_backend']}, fused {best['fused']}, ckpt {best['checkpointing']}): {best['mfu_result']}")
    elif ceiling is None:
        print(f"MFU: no ceiling ({ceiling_src})")
    mb = [r for r in rows if r["kind"] == "max_batch"]
    if mb:
        print()
        print(max_batch_table(mb))
        print(f"method: {meta['max_batch_method']}")
        for key, c in checks.items():
            print(f"checkpointing per-sample memory {key}: {c['per_sample_mib_on']:.2f} MiB (on) vs "
                  f"{c['per_sample_mib_off']:.2f} MiB (off): {'lower' if c['lower'] else 'NOT LOWER'}")
    written = [json_path, csv_path] + ([png_path] if plotted else [])
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
