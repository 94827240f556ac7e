"""The whole model under ``torch.compile`` with every Triton kernel selected, and its FLOPs.

* One graph: ``fullgraph=True`` with the ``aot_eager`` backend (AOTAutograd traces forward and
  backward through the custom ops' fake implementations and autograd formulas, then runs the
  real kernels) compiles the model with no graph break, every kernel appears in the graph as a
  ``llama_mini`` op, and loss and every gradient equal eager mode's.
* Fallbacks (float64 here) are decided while tracing and recorded without a graph break.
* FLOPs: ``FlopCounterMode`` over one forward + backward counts our ops through their formulas,
  and the total equals ``Transformer.flops_per_token`` times the tokens plus the one product its
  estimate leaves out (see ``_expected_flops``).

Tolerance for compiled against eager: both run the same kernels on the same inputs; the graph
around them is the same aten ops, decomposed, so results agree to fp32 rounding of reordered
elementwise work: 1e-6 relative.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.common import aot_autograd  # noqa: F401  (imported for aot_eager's registration)
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

from llama_mini import ModelArgs, Transformer, attention, ops
from llama_mini.kernels.common import is_interpreting
from llama_mini.ops import IMPL_FIELDS

from conftest import make_model

DEVICE = torch.device("cpu" if is_interpreting() or not torch.cuda.is_available() else "cuda")
pytestmark = pytest.mark.skipif(not ops.triton_runs_on(DEVICE)[0], reason=ops.triton_runs_on(DEVICE)[1])

ALL_TRITON = {**{field: "triton" for field in IMPL_FIELDS}, "attn_backend": "triton"}
OUR_OPS = ("flash_attention_fwd", "rms_norm_fwd", "add_rms_norm_fwd", "rotary", "swiglu_fwd")


def _batch(B: int = 2, T: int = 17, vocab: int = 97, packed: bool = False):
    """Tokens and targets with ignored positions; with ``packed``, position and document ids of
    three documents in row 0 and two in row 1 (positions restart per document)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    targets = torch.randint(0, vocab, (B, T), generator=g)
    targets[0, :4] = -100
    kw = {}
    if packed:
        docs = torch.zeros(B, T, dtype=torch.int64)
        docs[0, 6:], docs[0, 15:], docs[1, 9:] = 1, 2, 1
        starts = torch.cat([torch.ones(B, 1, dtype=torch.bool), docs[:, 1:] != docs[:, :-1]], dim=1)
        idx = torch.arange(T).expand(B, T)
        last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
        kw = {"document_ids": docs.to(DEVICE), "position_ids": (idx - last_start).to(DEVICE)}
    return tokens.to(DEVICE), targets.to(DEVICE), kw


def _loss_and_grads(model, tokens, targets, kw):
    model.zero_grad(set_to_none=True)
    loss = model(tokens, targets, **kw)
    loss.backward()
    # A compiled module names its parameters "_orig_mod.<name>".
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.detach().clone() for n, p in model.named_parameters()}


def _compile_one_graph(model):
    """torch.compile(model, aot_eager, fullgraph=True), keeping the dynamo graphs for inspection."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    return torch.compile(model, backend=backend, fullgraph=True), graphs


@pytest.mark.parametrize("linear_loss,packed", [("torch", False), ("triton", False), ("triton", True)],
                         ids=["cross-entropy", "fused-linear-loss", "packed-documents"])
def test_compiled_model_is_one_graph_with_our_ops_and_matches_eager(linear_loss, packed):
    model = make_model(**{**ALL_TRITON, "linear_loss_impl": linear_loss}).to(DEVICE)
    assert model.args.validate_inputs  # the range checks are skipped while tracing, not switched off
    tokens, targets, kw = _batch(packed=packed)
    loss, grads = _loss_and_grads(model, tokens, targets, kw)

    compiled, graphs = _compile_one_graph(model)
    got_loss, got_grads = _loss_and_grads(compiled, tokens, targets, kw)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(graphs) == 1
    code = graphs[0].code
    loss_op = "linear_cross_entropy_fwd" if linear_loss == "triton" else "cross_entropy_fwd"
    for op in OUR_OPS + (loss_op,):
        assert f"llama_mini.{op}" in code, op
    torch.testing.assert_close(got_loss, loss, rtol=1e-6, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_compiled_model_still_rejects_bad_targets_inside_the_loss_op():
    """While compiling, the model skips its own data-dependent range checks (a host read would
    break the graph); the loss kernel's check inside the opaque op still runs on every call."""
    model = make_model(**ALL_TRITON).to(DEVICE)
    tokens, targets, _ = _batch(T=9)
    compiled, _ = _compile_one_graph(model)
    compiled(tokens, targets)
    bad = targets.clone()
    bad[1, 3] = 500  # outside the vocabulary of 97
    with pytest.raises(ValueError, match="vocab_size=97"):
        model(tokens, bad)  # eager: the model's check
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 97\)"):
        compiled(tokens, bad)  # compiled: the kernel's check


def test_fallbacks_under_compile_run_the_reference_record_why_and_keep_one_graph(monkeypatch):
    """A float64 model asks for every kernel; none takes float64. The choice is made while
    tracing (dtype is static), recorded once, and the graph has no break and no llama_mini op."""
    monkeypatch.setattr(ops, "_FALLBACKS", {})
    monkeypatch.setattr(attention, "_FALLBACKS", {})
    model = make_model(dtype=torch.float64, **ALL_TRITON).to(DEVICE)
    ref = make_model(dtype=torch.float64, **{field: "torch" for field in IMPL_FIELDS}, attn_backend="sdpa").to(DEVICE)
    tokens, targets, kw = _batch(packed=True)
    compiled, graphs = _compile_one_graph(model)
    loss = compiled(tokens, targets, **kw)
    assert not counters["graph_break"] and len(graphs) == 1
    assert "llama_mini." not in graphs[0].code
    torch.testing.assert_close(loss, ref(tokens, targets, **kw), rtol=1e-12, atol=0)
    for op in ("rms_norm", "add_rms_norm", "rope", "swiglu", "linear_cross_entropy"):
        assert "float64 is not a kernel dtype" in ops.fallbacks()[f"{op}@{DEVICE.type}/float64"]
    assert "float64" in attention.attention_fallbacks()[f"triton@{DEVICE.type}/float64/D=16"]


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def _expected_flops(model: Transformer, B: int, T: int) -> int:
    """``flops_per_token(T)`` counts 6 N_matmul (every weight matrix: 2 forward, 4 backward;
    the embedding table and norms do no product) plus 6 L C T for causal attention: q k^T and
    p v, 4 L C T forward over the full T x T and twice that backward, halved for causality.
    The counter also counts 6 N_matmul B T for the linear layers and the fused loss, and for
    attention our formulas: causal 2 B H T^2 D forward (half of PyTorch's sdpa count) and 2.5x
    that backward, since the backward recomputes q k^T. With H D = C that is 7 L B T^2 C, so
    the counter exceeds ``flops_per_token * B * T`` by exactly the recomputed product,
    L B T^2 C. An MFU from flops_per_token therefore never credits the masked half nor the
    recomputation."""
    args = model.args
    C = args.n_heads * args.head_dim
    return int(model.flops_per_token(T) * B * T) + args.n_layers * B * T * T * C


def _count_step(model, tokens, targets, **kw):
    with FlopCounterMode(display=False) as counter:
        model(tokens, targets, **kw).backward()
    per_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), per_op


def test_flop_counter_sees_our_ops_and_matches_flops_per_token():
    """A real eager step of the tiny model with every kernel: the counter's total is exact."""
    model = make_model(**ALL_TRITON).to(DEVICE)
    B, T = 2, 17
    tokens, targets, kw = _batch(B, T, packed=True)
    total, per_op = _count_step(model, tokens, targets, **kw)
    L, H, D = model.args.n_layers, model.args.n_heads, model.args.head_dim
    assert per_op["llama_mini.flash_attention_fwd"] == L * 2 * B * H * T * T * D  # causal: half of 4 B H T^2 D
    assert per_op["llama_mini.flash_attention_bwd"] == L * 5 * B * H * T * T * D
    assert per_op["llama_mini.linear_cross_entropy_fwd"] == 6 * B * T * model.args.dim * model.args.vocab_size
    assert total == _expected_flops(model, B, T)


@pytest.mark.parametrize("preset", ["debug", "homework", "tinyllama-1.1b"])
def test_flop_counter_matches_flops_per_token_for_presets(preset):
    """Presets at their real widths (GQA in debug and tinyllama, vocabulary 32,000), 2 layers
    and T = 128 (flops_per_token is linear in the layers, and T enters through its T argument),
    traced on fake tensors: shapes and FLOPs only, so even a 1.1B-wide model costs nothing.
    Input checks are off because fake tensors have no values to range-check."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = dataclasses.replace(ModelArgs.preset(preset), n_layers=2, validate_inputs=False, **ALL_TRITON)
    B, T = 2, 128
    with FakeTensorMode(), torch.device(DEVICE):  # CUDA with compiled kernels, the CPU under the interpreter
        model = Transformer(args)
        tokens = torch.randint(0, args.vocab_size, (B, T))
        targets = torch.randint(0, args.vocab_size, (B, T))
        total, per_op = _count_step(model, tokens, targets)
    assert per_op["llama_mini.flash_attention_fwd"] == 2 * 2 * B * args.n_heads * T * T * args.head_dim
    assert "llama_mini.flash_attention_bwd" in per_op and "llama_mini.linear_cross_entropy_fwd" in per_op
    assert total == _expected_flops(model, B, T)
