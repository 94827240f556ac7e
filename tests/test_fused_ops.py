"""The fused kernels inside the model: registration, choice, visible fallbacks, equivalence
with the reference ops, and a short training run with every kernel on against every kernel off.

The kernels themselves are tested op by op against float64 in ``test_*_kernel.py``; here the
question is whether the model wires them in correctly (arguments, shapes, position ids, the
residual stream, the loss) and whether training with them follows the same path.
"""

from __future__ import annotations

import pytest
import torch

from llama_mini import kernels
from llama_mini.kernels.common import is_interpreting
from llama_mini import ModelArgs, Transformer, ops
from llama_mini.ops import IMPL_FIELDS

from conftest import make_model

# CPU tensors under the interpreter (CI), CUDA tensors with compiled kernels (TRITON_INTERPRET=0).
DEVICE = torch.device("cpu" if is_interpreting() or not torch.cuda.is_available() else "cuda")
pytestmark = pytest.mark.skipif(not ops.triton_runs_on(DEVICE)[0], reason=ops.triton_runs_on(DEVICE)[1])

ALL_ON = {field: "triton" for field in IMPL_FIELDS}
ALL_OFF = {field: "torch" for field in IMPL_FIELDS}


def _batch(B: int = 2, T: int = 24, vocab: int = 97, seed: int = 0):
    """Tokens, targets with ignored positions, and packed-document position ids."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    targets = torch.randint(0, vocab, (B, T), generator=g)
    targets[0, :5] = -100  # a padded stretch
    targets[1, -1] = -100
    # Two documents in row 0 (positions restart at the boundary), one in the other rows.
    cut = T // 3
    position_ids = torch.arange(T).expand(B, T).clone()
    position_ids[0, cut:] = torch.arange(T - cut)
    return tokens.to(DEVICE), targets.to(DEVICE), position_ids.to(DEVICE)


def test_every_op_has_a_triton_implementation_and_each_switch_names_its_ops():
    assert set(op for names in IMPL_FIELDS.values() for op in names) == set(ops.OPS)
    for op in ops.OPS:
        assert "triton" in ops.registered(op)
    fields = {f for f in ModelArgs.__dataclass_fields__ if f.endswith("_impl")}
    assert fields == set(IMPL_FIELDS)


def test_auto_keeps_the_reference_on_cpu_and_says_why():
    for op in ops.OPS:
        name, _ = ops.resolve_impl(op, "auto", torch.device("cpu"))
        assert name == "torch"
        reason = ops.resolutions()[f"{op}@cpu (auto)"]["reason"]
        # the interpreter runs them on CPU tensors, but only when asked for by name
        assert "not the default on cpu" in reason or "triton unavailable" in reason


def test_triton_on_a_device_it_cannot_use_is_an_error_naming_the_op():
    with pytest.raises(RuntimeError, match="rms_norm implementation 'triton' cannot run on meta"):
        ops.resolve_op("rms_norm", "triton", torch.device("meta"))


def test_float64_model_runs_the_reference_and_records_why():
    model = make_model(dtype=torch.float64, **ALL_ON).to(DEVICE)
    ref = make_model(dtype=torch.float64, **ALL_OFF).to(DEVICE)
    tokens, targets, position_ids = _batch()
    loss = model(tokens, targets, position_ids=position_ids)
    assert torch.equal(loss, ref(tokens, targets, position_ids=position_ids))
    fell_back = ops.fallbacks()
    for op in ("rms_norm", "add_rms_norm", "rope", "swiglu", "linear_cross_entropy"):
        assert "float64 is not a kernel dtype" in fell_back[f"{op}@{DEVICE.type}/float64"]


def _loss_and_grads(model: Transformer, *batch, **kw):
    tokens, targets, position_ids = batch
    model.zero_grad(set_to_none=True)
    loss = model(tokens, targets, position_ids=position_ids, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("linear_loss", ["triton", "torch"], ids=["fused-loss", "logits-then-loss"])
def test_all_kernels_give_the_reference_loss_and_every_gradient(linear_loss):
    """One fp32 step of a GQA model on a packed batch with ignored targets: the loss and the
    gradient of every parameter agree. fp32 kernels and references differ only in summation
    order, ~1e-7 relative per op; through two layers and the loss 1e-5 relative is ample and
    still fails for any real mistake (a wrong position, a dropped residual gradient, a
    mis-scaled loss give errors of order 1)."""
    on = make_model(**{**ALL_ON, "linear_loss_impl": linear_loss}).to(DEVICE)
    off = make_model(**ALL_OFF).to(DEVICE)
    batch = _batch()
    loss_on, grads_on = _loss_and_grads(on, *batch)
    loss_off, grads_off = _loss_and_grads(off, *batch)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=0)
    for name, g in grads_off.items():
        scale = g.abs().max().clamp(min=1e-12)
        assert (grads_on[name] - g).abs().max() / scale < 1e-5, name
    used = ops.resolutions()
    for field, names in IMPL_FIELDS.items():
        impl = on.args.__dict__[field]
        for op in names:
            if op == "cross_entropy" and linear_loss == "triton":
                continue  # the fused loss never forms logits, so the plain loss is not called
            assert used[f"{op}@{DEVICE.type} ({impl})"]["impl"] == impl


def test_logits_without_targets_match():
    on, off = make_model(**ALL_ON).to(DEVICE), make_model(**ALL_OFF).to(DEVICE)
    tokens, _, position_ids = _batch()
    with torch.no_grad():
        torch.testing.assert_close(on(tokens, position_ids=position_ids), off(tokens, position_ids=position_ids),
                                   rtol=1e-5, atol=1e-5)


def test_position_ids_reach_the_rotary_kernel():
    """Restarting positions change what a model without document masking computes (tokens past
    the boundary attend across it at other relative distances), so a model that dropped the ids
    on the way to the rotary op would give the same logits with and without them. The kernels
    and the reference must agree on the ids' effect."""
    on, off = make_model(**ALL_ON).to(DEVICE), make_model(**ALL_OFF).to(DEVICE)
    tokens, _, position_ids = _batch()
    with torch.no_grad():
        with_ids, without = on(tokens, position_ids=position_ids), on(tokens)
        assert (with_ids - without).abs().max() > 1e-3
        torch.testing.assert_close(with_ids, off(tokens, position_ids=position_ids), rtol=1e-5, atol=1e-5)


def test_generation_path_with_kernels_matches_the_cache_free_path():
    """forward_inference slices the rotary tables at start_pos; the rotary kernel must use them."""
    model = make_model(**ALL_ON).to(DEVICE)
    tokens = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    cache = model.new_cache(1)
    with torch.no_grad():
        full = model(tokens)
        first = model.forward_inference(tokens[:, :7], 0, cache)
        rest = model.forward_inference(tokens[:, 7:], 7, cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_fused_loss_under_model_parallel_falls_back_visibly():
    model = make_model(**ALL_ON).to(DEVICE)
    model.mp_size = 2  # as if the output weight were split over two ranks
    tokens, targets, position_ids = _batch()
    model(tokens, targets, position_ids=position_ids)
    assert "split over 2 model-parallel ranks" in ops.fallbacks()["linear_cross_entropy@model-parallel/2"]


def _train(impls: dict, steps: int, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                                  max_seq_len=64, **impls)).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    losses = []
    for step in range(steps):
        tokens, targets, position_ids = _batch(T=12, seed=step % 4)
        loss = model(tokens, targets, position_ids=position_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_training_with_every_kernel_on_follows_the_reference_run():
    """A tiny model trained for 24 steps with every fused kernel on and with every one off sees
    the same losses. Both runs are fp32 and start from the same weights; kernel and reference
    differ by rounding only (~1e-7 relative per op), which Adam's normalised updates carry
    along without blowing up over so few steps: the measured largest difference is 3.7e-7
    relative, and the bound below is 1e-5. The run must also learn (measured: 4.57 -> 2.58;
    asserted: the last loss below 70% of the first), so the two runs are not trivially equal."""
    steps = 24
    on, off = _train(ALL_ON, steps), _train(ALL_OFF, steps)
    for step, (a, b) in enumerate(zip(on, off)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: kernels {a!r} vs reference {b!r}"
    assert off[-1] < 0.7 * off[0]


def test_fused_loss_under_autocast_computes_in_the_autocast_dtype_with_fp32_weight_gradients():
    """Under autocast the fused loss gets the hidden states in the autocast dtype (as F.linear
    would) and the fp32 master weight as stored: the products run in fp16, the weight gradient
    comes back fp32. Compared with float64 math on the fp16-rounded operands, what remains is
    fp32 accumulation order, far inside the bounds; skipping the cast (computing on the fp32
    x) was measured to put the weight gradient 5e-3 relative off, which the bounds catch."""
    from llama_mini import fused

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 32, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(50, 32, generator=g) * 0.2).to(DEVICE).requires_grad_()
    targets = torch.randint(0, 50, (2, 9), generator=g).to(DEVICE)
    targets[0, 0] = -100
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        loss = fused.linear_cross_entropy(x, w, targets, -100)
    loss.backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    x64 = x.detach().half().double().requires_grad_()
    w64 = w.detach().half().double().requires_grad_()
    from llama_mini.kernels import reference

    ref = reference.linear_cross_entropy(x64, w64, targets, -100)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-3, atol=1e-5)


def test_fused_add_under_mixed_dtypes_adds_in_the_wider_dtype_without_falling_back():
    """Under autocast with fp32 weights the residual stream is fp32 and the attention output
    fp16: the kernel path adds in fp32 (as x + residual does) instead of refusing the call."""
    from llama_mini import fused

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 40, generator=g).to(DEVICE).requires_grad_()
    r = torch.randn(3, 5, 40, generator=g).half().to(DEVICE).requires_grad_()
    w = torch.randn(40, generator=g).to(DEVICE).requires_grad_()
    y, h = fused.add_rms_norm(x, r, w, 1e-5)
    assert h.dtype == y.dtype == torch.float32
    (y.sum() + (h * h).sum()).backward()
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, r, w))
    from llama_mini.kernels import reference

    y64, h64 = reference.add_rms_norm(x64, r64, w64, 1e-5)
    (y64.sum() + (h64 * h64).sum()).backward()
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.double(), h64, rtol=1e-6, atol=0)
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert r.grad.dtype == torch.float16
    torch.testing.assert_close(r.grad.double(), x64.grad.half().double(), rtol=1e-3, atol=0)
    assert f"add_rms_norm@{DEVICE.type}/float32" not in ops.fallbacks()
