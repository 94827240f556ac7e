"""llama_mini.training.step: the one training step. Host reads are counted by patching every
tensor-to-Python conversion during a step and compared with what the step reports and with the
documented minimum; accumulation is token-weighted; clipping on the device gives the numbers
``optim.clip_grad_norm_`` gives; non-finite and fp16-overflow steps are skipped without touching
the weights; the trainer's step reports the same count."""

from __future__ import annotations

import contextlib

import pytest
import torch

from llama_mini import ModelArgs, Transformer
from llama_mini.training.optim import build_optimizer, clip_grad_norm_
from llama_mini.training.precision import LossScaler
from llama_mini.training.step import MIN_HOST_SYNCS, EmptyBatchError, train_step

VOCAB = 64
_READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy")


def tiny(validate: bool = True, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs.preset("debug", vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                                        multiple_of=16, max_seq_len=32, validate_inputs=validate))


def batch(seed: int, B: int = 2, T: int = 12, ignored: int = 0, docs: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    b = {"input_ids": ids[:, :-1].clone(), "target_ids": ids[:, 1:].clone()}
    if ignored:
        b["target_ids"][:, -ignored:] = -100  # padding at the end of every row
    if docs:  # two documents per row: positions restart at T // 2
        half = T // 2
        b["position_ids"] = torch.cat([torch.arange(half), torch.arange(T - half)]).repeat(B, 1)
        b["document_ids"] = torch.cat([torch.zeros(half), torch.ones(T - half)]).long().repeat(B, 1)
    return b


@contextlib.contextmanager
def count_host_reads(optimizer: torch.optim.Optimizer):
    """Counts every Tensor -> Python conversion (and torch.cuda.synchronize) while the block runs,
    except inside ``optimizer.step``: non-fused AdamW reads its per-parameter step counters, CPU
    tensors by design (a fused one reads none), which wait for no device."""
    seen: list[str] = []
    inside = [False]
    real = {name: getattr(torch.Tensor, name) for name in _READS}
    real_sync, real_step = torch.cuda.synchronize, optimizer.step

    def counting(name):
        def read(self, *args, **kwargs):
            if not inside[0]:
                seen.append(name)
            return real[name](self, *args, **kwargs)
        return read

    def sync(*args, **kwargs):
        seen.append("cuda.synchronize")
        return real_sync(*args, **kwargs)

    def step(*args, **kwargs):
        inside[0] = True
        try:
            return real_step(*args, **kwargs)
        finally:
            inside[0] = False

    for name in _READS:
        setattr(torch.Tensor, name, counting(name))
    torch.cuda.synchronize, optimizer.step = sync, step
    try:
        yield seen
    finally:
        for name, fn in real.items():
            setattr(torch.Tensor, name, fn)
        torch.cuda.synchronize = real_sync
        del optimizer.step  # the instance attribute: the class's method again


def test_the_step_reads_the_host_twice_whatever_the_accumulation():
    """Three micro-batches (one entirely ignored), clipping, a stop-flag extra: two reads."""
    model = tiny(validate=False)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    micro = [batch(1, ignored=3), batch(2, ignored=12), batch(3)]
    train_step(model, opt, micro, grad_clip=1.0)  # AdamW's state exists from here on
    with count_host_reads(opt) as seen:
        out = train_step(model, opt, micro, lr=2e-3, grad_clip=0.5, extra=[0.0, 1.0])
    assert seen == ["tolist", "tolist"], seen
    assert len(seen) == out.host_syncs == MIN_HOST_SYNCS == 2
    assert out.tokens == 2 * 9 + 0 + 2 * 12 and out.processed == 3 * 2 * 12 and out.extra == [0.0, 1.0]
    assert not out.skipped and out.lr == 2e-3 and all(g["lr"] == 2e-3 for g in opt.param_groups)

    with count_host_reads(opt) as seen:  # counts the caller holds: the first read goes
        out = train_step(model, opt, micro, grad_clip=0.5, counts=[18, 0, 24])
    assert len(seen) == out.host_syncs == 1


@pytest.mark.parametrize("docs", [False, True])
def test_the_models_input_checks_are_counted_too(docs):
    """A Transformer with validate_inputs reads its id tensors' ranges: one read per tensor given
    (input_ids, target_ids, position_ids) per micro-batch that runs; the step reports them."""
    model = tiny(validate=True)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    micro = [batch(1, docs=docs), batch(2, ignored=12, docs=docs), batch(3, docs=docs)]
    with count_host_reads(opt) as seen:
        out = train_step(model, opt, micro, grad_clip=1.0)
    per_batch = 3 if docs else 2
    assert len(seen) == out.host_syncs == MIN_HOST_SYNCS + 2 * per_batch  # the ignored one never runs


@pytest.mark.parametrize("docs", [False, True])
def test_the_kernels_input_checks_are_counted_too(docs):
    """With every op on Triton (the CUDA default; the interpreter here) the fused loss checks its
    targets (one read per call) and RoPE its position ids (one read per micro-batch that gives
    them): the step's count is what was read, every read."""
    from llama_mini.ops import triton_runs_on

    if not triton_runs_on(torch.device("cpu"))[0]:
        pytest.skip(triton_runs_on(torch.device("cpu"))[1])
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset(
        "debug", vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, multiple_of=16, max_seq_len=32,
        attn_backend="triton", norm_impl="triton", rope_impl="triton", mlp_impl="triton", loss_impl="triton",
        linear_loss_impl="triton"))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    micro = [batch(1, docs=docs), batch(2, ignored=12, docs=docs), batch(3, T=7, docs=docs)]
    with count_host_reads(opt) as seen:
        out = train_step(model, opt, micro, grad_clip=1.0)
    model_checks = 3 if docs else 2  # tokens, targets (and positions)
    kernel_checks = 1 + (1 if docs else 0)  # the loss's targets (and RoPE's positions)
    assert len(seen) == out.host_syncs == MIN_HOST_SYNCS + 2 * (model_checks + kernel_checks), seen


def test_fp16_scaling_and_autocast_add_no_read():
    model = tiny(validate=False)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    scaler = LossScaler(True, init_scale=2.0**8, growth_interval=1)
    with count_host_reads(opt) as seen:
        out = train_step(model, opt, [batch(1), batch(2)], grad_clip=1.0, scaler=scaler,
                         autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert len(seen) == out.host_syncs == 2 and not out.skipped and scaler.scale == 2.0**9


def test_accumulation_is_token_weighted_and_equals_one_big_batch():
    """Micro-batches of 4 and 8 counted targets give the step of the 12-target batch they make."""
    a, b = batch(1, B=1, ignored=8), batch(2, B=1, ignored=4)
    big = {k: torch.cat([a[k], b[k]]) for k in a}
    m1, m2 = tiny(), tiny()
    # plain SGD, so the weights move by the gradient (Adam's first step is ~lr * sign(g), which
    # turns fp32 rounding of gradients near 0 into lr-sized differences)
    o1, o2 = (torch.optim.SGD(m.parameters(), lr=1.0) for m in (m1, m2))
    r1 = train_step(m1, o1, [a, b], grad_clip=1.0)
    r2 = train_step(m2, o2, [big], grad_clip=1.0)
    assert r1.tokens == r2.tokens == 12 and r1.processed == r2.processed == 24
    assert r1.loss == pytest.approx(r2.loss, rel=1e-6) and r1.grad_norm == pytest.approx(r2.grad_norm, rel=1e-5)
    for (name, p), q in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
        assert p.grad is None  # zeroed (set to None) after the step


def test_the_step_equals_the_loop_it_replaces():
    """One micro-batch: backward, optim.clip_grad_norm_, AdamW step at lr: the same bits."""
    model, ref = tiny(), tiny()
    opt, ref_opt = (build_optimizer(m, lr=1e-2, weight_decay=0.1) for m in (model, ref))
    for i in range(3):
        b = batch(10 + i, ignored=2)
        out = train_step(model, opt, [b], lr=1e-2 * (i + 1), grad_clip=0.05)
        loss = ref(b["input_ids"], b["target_ids"])
        loss.backward()
        norm = clip_grad_norm_(ref.named_parameters(), 0.05)
        for g in ref_opt.param_groups:
            g["lr"] = 1e-2 * (i + 1)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        assert out.loss == float(loss.detach()) and out.grad_norm == float(norm)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name


def test_clipping_is_decided_on_the_device():
    """optim.clip_grad_norm_ reads nothing on the host and scales every gradient by
    min(1, max_norm / (norm + 1e-6)) bit for bit; a non-finite norm leaves the gradients alone."""
    grads = [torch.randn(5, 3), torch.randn(7)]
    for scale, max_norm in ((1.0, 0.1), (1.0, 100.0), (float("inf"), 0.1)):
        p = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for a, g in zip(p, grads):
            a.grad = g * scale
        opt = torch.optim.SGD(p, lr=0.0)  # count_host_reads needs an optimizer to exempt
        with count_host_reads(opt) as seen:
            norm = clip_grad_norm_([(str(i), x) for i, x in enumerate(p)], max_norm)
        assert seen == []
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0) if torch.isfinite(norm) else torch.ones(())
        for a, g in zip(p, grads):
            torch.testing.assert_close(a.grad, (g * scale) * coef, rtol=0, atol=0, equal_nan=True)


def test_a_nonfinite_step_is_skipped_and_leaves_the_weights():
    model = tiny()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    train_step(model, opt, [batch(1)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = train_step(model, opt, [batch(2)], forward=lambda *a, **k: model(*a, **k) * float("nan"))
    assert out.skipped and out.nonfinite and not out.overflow and out.loss != out.loss
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_an_fp16_overflow_halves_the_scale_and_skips():
    model = tiny()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    scaler = LossScaler(True, init_scale=2.0**10)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    # a finite loss whose gradients overflow
    hook = model.output.weight.register_hook(lambda g: g * float("inf"))
    out = train_step(model, opt, [batch(1)], scaler=scaler)
    hook.remove()
    assert out.skipped and out.overflow and not out.nonfinite and scaler.scale == 2.0**9
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_empty_global_batch_is_refused_before_anything_runs():
    model = tiny()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    with pytest.raises(EmptyBatchError, match="no target token"):
        train_step(model, opt, [batch(1, ignored=12), batch(2, ignored=12)])
    with pytest.raises(ValueError, match="counts has 1 entries for 2"):
        train_step(model, opt, [batch(1), batch(2)], counts=[5])
    assert all(p.grad is None for p in model.parameters())


def test_a_model_with_the_same_interface_runs_through_the_step():
    """Anything with forward(input_ids, target_ids) -> mean loss: a plain module, no args."""

    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(VOCAB, VOCAB)

        def forward(self, idx, targets):
            return torch.nn.functional.cross_entropy(self.table(idx).flatten(0, 1), targets.flatten())

    model = Bigram()
    opt = build_optimizer(model, lr=1e-1, weight_decay=0.0)
    b = batch(1)
    first = train_step(model, opt, [b], grad_clip=1.0)
    for _ in range(5):
        last = train_step(model, opt, [b], grad_clip=1.0)
    assert last.loss < first.loss and last.host_syncs == 2


def test_the_trainers_step_reports_what_it_reads(tmp_path, train_data):
    from llama_mini.training.config import load_config
    from llama_mini.training.trainer import Trainer

    trainer = Trainer(load_config(overrides=train_data.overrides(tmp_path, "--schedule.grad_accum", 3)))
    trainer.train_step()
    with count_host_reads(trainer.optimizer) as seen:
        out = trainer.train_step()
    # two of the step's own, and tokens + targets range checks for each of the 3 micro-batches
    assert len(seen) == out["host_syncs"] == MIN_HOST_SYNCS + 2 * 3
    assert out["tokens"] > 0 and trainer.tokens_seen > out["tokens"] and not trainer.stop_agreed
