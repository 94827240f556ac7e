"""llama_mini.training.optim: AdamW groups (norm gains not decayed), the warmup + decay schedule,
and the global gradient norm / clipping, single-process against torch and in a real
two-process fairscale model-parallel run (gloo, CPU) against a single-process reference."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from llama_mini import ModelArgs, Transformer
from llama_mini.training.optim import (
    build_optimizer, clip_grad_norm_, global_grad_norm, lr_at, param_groups, set_lr,
)


def debug_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs.preset("debug"))


# ---------------------------------------------------------------- parameter groups, AdamW


def test_param_groups_split_matrices_from_norm_gains():
    model = debug_model()
    groups = param_groups(model, 0.1)
    assert len(groups) == 2
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    named = dict(model.named_parameters())
    assert set(no_decay["names"]) == {n for n in named if n.endswith("norm.weight")}
    assert "norm.weight" in no_decay["names"] and "layers.1.ffn_norm.weight" in no_decay["names"]
    assert set(decay["names"]) == {n for n, p in named.items() if p.ndim == 2}
    assert "tok_embeddings.weight" in decay["names"] and "output.weight" in decay["names"]
    # every parameter exactly once, and names line up with params
    all_names = decay["names"] + no_decay["names"]
    assert sorted(all_names) == sorted(named) and len(set(all_names)) == len(all_names)
    for g in groups:
        assert all(named[n] is p for n, p in zip(g["names"], g["params"]))


def test_param_groups_skip_frozen_and_omit_empty_group():
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)
    groups = param_groups(model, 0.1)
    assert len(groups) == 1 and groups[0]["names"] == ["0.weight", "1.weight"]


def test_adamw_decays_matrices_but_not_norm_gains():
    model = debug_model()
    lr, wd = 0.1, 0.5
    opt = build_optimizer(model, lr=lr, weight_decay=wd)
    assert isinstance(opt, torch.optim.AdamW)
    assert not opt.defaults["fused"]  # CPU params: the default (foreach) implementation
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # zero grads: the Adam update is exactly 0/(0+eps)=0, so only the decay p *= 1 - lr*wd acts.
    # One fp32 multiply each, by the same factor torch uses: equal to 1 ulp.
    for n, p in model.named_parameters():
        if p.ndim < 2:
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p.detach(), before[n] * (1 - lr * wd), rtol=1.2e-7, atol=0, msg=n)
            assert not torch.equal(p, before[n]), n


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=0.0), "lr"), (dict(lr=-1e-3), "lr"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=(0.9, 1.0)), "betas"), (dict(betas=(-0.1, 0.95)), "betas"), (dict(eps=0.0), "eps"),
])
def test_build_optimizer_rejects_bad_arguments(kwargs, name):
    args = dict(lr=1e-3, weight_decay=0.1) | kwargs
    with pytest.raises(ValueError, match=name):
        build_optimizer(nn.Linear(2, 2), **args)


def test_set_lr_sets_every_group():
    opt = build_optimizer(debug_model(), lr=1e-3, weight_decay=0.1)
    set_lr(opt, 2.5e-4)
    assert [g["lr"] for g in opt.param_groups] == [2.5e-4, 2.5e-4]


# ---------------------------------------------------------------- schedule

S = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110)


def test_warmup_is_linear_and_starts_above_zero():
    assert lr_at(0, **S) == pytest.approx(1e-4, rel=1e-12)  # lr * 1/10, not 0
    assert lr_at(4, **S) == pytest.approx(5e-4, rel=1e-12)
    assert lr_at(9, **S) == pytest.approx(1e-3, rel=1e-12)  # the last warmup step reaches the peak
    assert lr_at(10, **S) == pytest.approx(1e-3, rel=1e-12)  # decay starts at the peak
    assert lr_at(0, **(S | dict(warmup_steps=0))) == pytest.approx(1e-3, rel=1e-12)


def test_cosine_midpoint_floor_and_monotone():
    # progress = 0.5 at step 10 + 100/2: cos(pi/2) = 0, so exactly halfway (to float rounding)
    assert lr_at(60, **S) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-12)
    for step in (110, 111, 10_000):
        assert lr_at(step, **S) == 1e-4
    values = [lr_at(s, **S) for s in range(10, 200)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[-1] == 1e-4 and min(values) == 1e-4


def test_linear_and_constant():
    lin = S | dict(decay="linear")
    assert lr_at(60, **lin) == pytest.approx(5.5e-4, rel=1e-12)
    assert lr_at(35, **lin) == pytest.approx(1e-3 - 9e-4 * 0.25, rel=1e-12)
    assert lr_at(110, **lin) == 1e-4
    values = [lr_at(s, **lin) for s in range(10, 120)]
    assert all(a > b for a, b in zip(values[:100], values[1:101]))
    const = S | dict(decay="constant")
    assert lr_at(3, **const) == pytest.approx(4e-4, rel=1e-12)  # warmup applies to constant too
    assert lr_at(10, **const) == lr_at(500, **const) == 1e-3


@pytest.mark.parametrize("bad, name", [
    (dict(decay="exp"), "decay"), (dict(min_lr=2e-3), "min_lr"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(total_steps=0), "total_steps"), (dict(lr=0.0), "lr"),
])
def test_lr_at_rejects_bad_arguments(bad, name):
    with pytest.raises(ValueError, match=name) as info:
        lr_at(0, **(S | bad))
    if name == "decay":
        assert all(d in str(info.value) for d in ("cosine", "linear", "constant"))


# ---------------------------------------------------------------- norm and clipping, one process


def _model_with_grads(seed: int = 0) -> Transformer:
    model = debug_model(seed)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 512, (2, 17), generator=g)
    model(tokens, torch.randint(0, 512, (2, 17), generator=g)).backward()
    return model


def test_norm_and_clip_match_torch():
    model, ref = _model_with_grads(), _model_with_grads()
    norm = global_grad_norm(model.named_parameters())
    assert norm.dtype == torch.float32 and norm.ndim == 0
    max_norm = 0.25 * norm.item()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    # a generator, as the trainer passes it: must be consumed once only
    pre = clip_grad_norm_(model.named_parameters(), max_norm)
    # same fp32 squares summed in a different order: a few ulps
    torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
    torch.testing.assert_close(pre, ref_norm, rtol=1e-6, atol=0)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-6, atol=0, msg=n)
    torch.testing.assert_close(global_grad_norm(model.named_parameters()), torch.tensor(max_norm),
                               rtol=1e-5, atol=0)


def test_no_clip_when_max_norm_not_positive_and_none_grads_skipped():
    model = _model_with_grads()
    model.norm.weight.grad = None
    expected = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double().norm()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for max_norm in (0.0, -1.0):
        norm = clip_grad_norm_(model.named_parameters(), max_norm)
        torch.testing.assert_close(norm.double(), expected, rtol=1e-6, atol=0)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, [p for p in model.parameters() if p.grad is not None]))


def test_norm_is_fp32_for_half_grads():
    p = nn.Parameter(torch.zeros(1000, dtype=torch.float16))
    p.grad = torch.full((1000,), 300.0, dtype=torch.float16)  # 300^2 overflows fp16 (max 65504)
    norm = global_grad_norm([("w", p)])
    assert norm.dtype == torch.float32
    assert norm.item() == pytest.approx(300 * math.sqrt(1000), rel=1e-6)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_grad_gives_non_finite_norm_and_no_clip(bad):
    model = _model_with_grads()
    model.layers[0].attention.wq.weight.grad[3, 5] = bad
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = clip_grad_norm_(model.named_parameters(), 1e-3)
    assert not torch.isfinite(norm)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]) or (bad != bad and torch.equal(p.grad.isnan(), grads[n].isnan())), n


# ---------------------------------------------------------------- two-process model parallel


def _mp_worker(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as mpu

    from llama_mini.parallel import shard_dim, shard_state_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mpu.initialize_model_parallel(2)
        group = mpu.get_model_parallel_group()
        args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=16,
                         max_seq_len=64, attn_backend="eager")
        torch.manual_seed(0)  # identical weights on both ranks
        ref = Transformer(args, model_parallel=False)
        model = Transformer(args)
        assert model.mp_size == 2
        model.load_state_dict(shard_state_dict(ref.state_dict(), rank, 2))
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 100, (3, 21), generator=g)
        targets = torch.randint(0, 100, (3, 21), generator=g)

        def gain_penalty(m: nn.Module) -> torch.Tensor:
            # the norm gains' own grads are ~1e-4 of the total squared norm; this term (same on
            # every rank, as replicated compute is) gives them about half, so counting them
            # twice or not at all moves the norm far outside the tolerance
            return 0.05 * sum(p.pow(2).sum() for n, p in m.named_parameters() if shard_dim(n) is None)

        (model(tokens, targets) + gain_penalty(model)).backward()
        (ref(tokens, targets) + gain_penalty(ref)).backward()

        # reference full norm in fp64, and the share of the replicated (norm gain) grads in it
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        full_sq = sum(g.double().pow(2).sum() for g in ref_grads.values()).item()
        rep_sq = sum(g.double().pow(2).sum() for n, g in ref_grads.items() if shard_dim(n) is None).item()
        full = math.sqrt(full_sq)

        calls = []
        real_all_reduce = dist.all_reduce

        def counting_all_reduce(tensor, *a, **k):
            calls.append(tensor.numel())
            return real_all_reduce(tensor, *a, **k)

        dist.all_reduce = counting_all_reduce
        try:
            norm = global_grad_norm(model.named_parameters())
        finally:
            dist.all_reduce = real_all_reduce

        def gathered_grads() -> dict[str, torch.Tensor]:
            out = {}
            for name, p in model.named_parameters():
                grad, dim = p.grad, shard_dim(name)
                if dim is not None:
                    parts = [torch.empty_like(grad) for _ in range(2)]
                    dist.all_gather(parts, grad.contiguous(), group=group)
                    grad = torch.cat(parts, dim=dim)
                out[name] = grad.clone()
            return out

        before = gathered_grads()
        max_norm = 0.1 * full
        pre = clip_grad_norm_(model.named_parameters(), max_norm)
        after = gathered_grads()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        result = dict(rank=rank, norm=norm.item(), pre=pre.item(), full=full, rep_sq=rep_sq, full_sq=full_sq,
                      all_reduce_calls=calls, ref_norm=ref_norm.item(), max_norm=max_norm,
                      post_norm=global_grad_norm(model.named_parameters()).item())
        # clipping scaled exactly what the norm said (same fp32 multiply): tight
        coef = min(1.0, max_norm / (pre.item() + 1e-6))
        for name in before:
            torch.testing.assert_close(after[name], before[name] * coef, rtol=1e-6, atol=0, msg=name)
        # against the single-process clipped grads: the MP grads already differ from the
        # reference by reordered fp32 partial sums (mp_worker.py's tolerance), clipping adds ~1 ulp
        for name, grad in after.items():
            expected = ref_grads[name]
            scale = expected.abs().max().item()
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6 * max(scale, 1.0), msg=name)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_global_norm_and_clip_under_model_parallel_2(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_mp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        # exactly one collective, of one scalar
        assert r["all_reduce_calls"] == [1], r
        # fp32 per-tensor norms vs an fp64 reference, grads equal to mp_worker.py's tolerance
        assert r["norm"] == pytest.approx(r["full"], rel=1e-5), r
        assert r["pre"] == pytest.approx(r["norm"], rel=1e-6), r
        assert r["ref_norm"] == pytest.approx(r["full"], rel=1e-5), r
        assert r["post_norm"] == pytest.approx(r["max_norm"], rel=1e-5), r
        # counting the replicated norm gains twice (or not at all) moves the norm by far more
        # than the tolerance above: this run can tell the difference
        assert r["rep_sq"] > 0
        double = math.sqrt(r["full_sq"] + r["rep_sq"])
        missing = math.sqrt(r["full_sq"] - r["rep_sq"])
        assert (double - r["full"]) / r["full"] > 100 * 1e-5, r
        assert abs(r["norm"] - r["full"]) < 0.01 * (double - r["full"]), r
        assert r["norm"] != pytest.approx(double, rel=1e-5) and r["norm"] != pytest.approx(missing, rel=1e-5)
    assert results[0]["norm"] == results[1]["norm"]  # every rank sees the same norm
