"""The decoder: fp32 forward and gradients against a float64 copy, backends agree, the loss
honours the ignore index, the paths and switches behave, bad input is refused."""

from __future__ import annotations


import pytest
import torch

from conftest import make_model, tiny_args
from llama_mini.kernels import reference
from llama_mini import Transformer, resolutions


def _batch(args, B=3, T=29, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, args.vocab_size, (B, T), generator=g)
    targets[0, :5] = -100
    return tokens, targets


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_fp32_model_matches_float64_reference_forward_and_backward(backend):
    model = make_model(attn_backend=backend)
    ref = make_model(attn_backend="eager", dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    tokens, targets = _batch(model.args)
    loss = model(tokens, targets)
    loss_ref = ref(tokens, targets)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    loss_ref.backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        # fp32 accumulation over a few thousand terms: relative error ~1e-5 of the largest entry
        scale = p_ref.grad.abs().max().item()
        torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_logits_for_every_position_and_causality():
    model = make_model()
    tokens, _ = _batch(model.args, B=2, T=20)
    logits = model(tokens)
    assert logits.shape == (2, 20, model.args.vocab_size) and logits.dtype == torch.float32
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % model.args.vocab_size
    logits2 = model(changed)
    assert torch.equal(logits[:, :12], logits2[:, :12])  # the future never leaks
    assert not torch.allclose(logits[:, 12:], logits2[:, 12:])


def test_eager_equals_sdpa_at_model_level():
    eager = make_model(attn_backend="eager")
    sdpa = make_model(attn_backend="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    tokens, _ = _batch(eager.args)
    torch.testing.assert_close(eager(tokens), sdpa(tokens), rtol=1e-5, atol=1e-5)


def test_loss_ignores_masked_targets_exactly():
    model = make_model()
    tokens, targets = _batch(model.args)
    logits = model(tokens)
    loss = model(tokens, targets)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep].double(), targets[keep])
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    # what sits at an ignored position cannot matter: put a far-from-argmax token there
    # under a different ignore index and compare with the same targets under -100
    sentinel = make_model(ignore_index=96)
    sentinel.load_state_dict(model.state_dict())
    targets2 = targets.clone()
    targets2[targets2 == 96] = 95  # keep counted targets off the sentinel
    as_sentinel = targets2.clone()
    as_sentinel[0, :5] = 96
    assert sentinel(tokens, as_sentinel).item() == model(tokens, targets2).item()
    assert model(tokens, as_sentinel).item() != model(tokens, targets2).item()  # 96 counted there
    custom = make_model(ignore_index=0)
    t = targets.clamp(min=0)
    manual = reference.cross_entropy(custom(tokens), t, ignore_index=0)
    assert custom(tokens, t).item() == manual.item()


def test_document_ids_and_position_ids_make_packed_documents_independent():
    model = make_model(attn_backend="sdpa")
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 97, (1, 11), generator=g)
    b = torch.randint(0, 97, (1, 6), generator=g)
    packed = torch.cat([a, b], dim=1)
    doc = torch.tensor([[0] * 11 + [1] * 6])
    pos = torch.tensor([list(range(11)) + list(range(6))])
    out = model(packed, document_ids=doc, position_ids=pos)
    torch.testing.assert_close(out[:, :11], model(a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 11:], model(b), rtol=1e-5, atol=1e-5)
    eager = make_model(attn_backend="eager")
    torch.testing.assert_close(eager(packed, document_ids=doc, position_ids=pos), out, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_identical_gradients():
    plain = make_model()
    ckpt = make_model(activation_checkpointing=True)
    tokens, targets = _batch(plain.args)
    calls = {"plain": 0, "ckpt": 0}
    for key, model in (("plain", plain), ("ckpt", ckpt)):
        for layer in model.layers:  # count calls of each block's feed-forward
            def counted(x, orig=layer.feed_forward.forward, key=key):
                calls[key] += 1
                return orig(x)

            layer.feed_forward.forward = counted
    plain(tokens, targets).backward()
    ckpt(tokens, targets).backward()
    n = plain.args.n_layers
    assert calls == {"plain": n, "ckpt": 2 * n}  # each checkpointed block reruns in backward
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)  # same ops, same order
    ckpt.set_activation_checkpointing(False)
    assert not ckpt.activation_checkpointing


def test_a_few_steps_of_training_reduce_the_loss():
    model = make_model()
    tokens, targets = _batch(model.args, B=4, T=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model(tokens, targets)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_initialisation_is_not_identity_and_scaled():
    args = tiny_args(n_layers=4)
    torch.manual_seed(0)
    model = Transformer(args)
    std = args.init_std
    assert abs(model.layers[0].attention.wq.weight.std().item() - std) < 0.1 * std
    out_std = std / (2 * args.n_layers) ** 0.5
    assert abs(model.layers[0].feed_forward.w2.weight.std().item() - out_std) < 0.1 * out_std
    assert torch.equal(model.norm.weight, torch.ones(args.dim))
    # initial loss is close to uniform over the vocabulary
    tokens, targets = _batch(args)
    assert abs(model(tokens, targets).item() - torch.log(torch.tensor(97.0)).item()) < 0.1


def test_num_params_and_flops_per_token():
    model = make_model()
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    a = model.args
    emb = a.vocab_size * a.dim
    assert model.num_params(include_embeddings=False) == model.num_params() - emb
    # count the matmul FLOPs a real forward + backward performs (eager attention does its
    # q k^T and p v as matmuls too, over the full T x T: 12 L C T^2 per sequence, of which
    # flops_per_token credits the causal half): exact up to the masked half eager computes anyway
    from torch.utils.flop_counter import FlopCounterMode

    eager = make_model(attn_backend="eager")
    B, T = 2, 32
    tokens = torch.randint(0, a.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        eager(tokens, tokens).backward()
    masked_half = 6 * a.n_layers * B * T * T * a.n_heads * a.head_dim
    assert counter.get_total_flops() == eager.flops_per_token(T) * B * T + masked_half
    assert eager.flops_per_token(T) == 6 * model.num_params(include_embeddings=False) - 6 * a.dim * (
        2 * a.n_layers + 1) + 6 * a.n_layers * a.dim * T


def test_op_choices_are_visible():
    model = make_model(norm_impl="torch")
    model(torch.zeros(1, 3, dtype=torch.long))
    res = resolutions()
    assert res["rms_norm@cpu (torch)"]["impl"] == "torch"
    assert res["swiglu@cpu (auto)"]["impl"] == "torch"
    # On a CPU the Triton kernels are never the default: either they cannot run (no interpreter)
    # or they run in the interpreter only when asked for by name. Either way the reason says so.
    reason = res["swiglu@cpu (auto)"]["reason"]
    assert "triton unavailable" in reason or "triton is not the default on cpu" in reason


@pytest.mark.parametrize(
    "tokens, message",
    [
        (torch.tensor([[1, 2, 97]]), r"tokens contains id 97 outside \[0, vocab_size=97\)"),
        (torch.tensor([[1, -1, 2]]), r"tokens contains id -1 outside"),
        (torch.zeros(1, 65, dtype=torch.long), r"sequence length 65 exceeds ModelArgs.max_seq_len=64"),
        (torch.zeros(5, dtype=torch.long), r"tokens must be \(batch, seq_len\)"),
        (torch.zeros(1, 5), r"tokens must be an integer tensor"),
    ],
)
def test_bad_tokens_raise_before_any_tensor_work(tokens, message):
    model = make_model()
    with pytest.raises((ValueError, TypeError), match=message):
        model(tokens)


def test_bad_targets_and_positions_raise():
    model = make_model()
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="targets must have the shape of tokens"):
        model(tokens, torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets contain id 500 outside"):
        model(tokens, torch.tensor([[1, 2, 500, -100]]))
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, max_seq_len=64\), got values in \[0, 64\]"):
        model(tokens, position_ids=torch.tensor([[0, 1, 2, 64]]))
    with pytest.raises(TypeError, match="position_ids must be an integer tensor, got torch.float32"):
        model(tokens, position_ids=torch.zeros(1, 4))
    with pytest.raises(TypeError, match="document_ids must be an integer tensor"):
        model(tokens, document_ids=torch.zeros(1, 4))
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        model(tokens, torch.zeros(1, 4))


def test_model_casts_and_keeps_rope_tables_in_fp32():
    model = make_model(dtype=torch.bfloat16)
    logits = model(torch.randint(0, 97, (2, 9)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    cos, _ = model.rope.table(torch.device("cpu"))
    assert cos.dtype == torch.float32
    assert not any("rope" in k for k in model.state_dict())


def test_no_kv_cache_on_the_training_path(monkeypatch):
    import llama_mini.kv_cache as kvc

    def boom(*a, **k):
        raise AssertionError("training path allocated a KV cache")

    monkeypatch.setattr(kvc.KVCache, "__init__", boom)
    model = make_model()
    model(*_batch(model.args)).backward()


def test_validation_can_be_switched_off_for_speed():
    model = make_model(validate_inputs=False)
    checked = make_model()
    tokens = torch.randint(0, 97, (2, 9))
    assert torch.equal(model(tokens), checked(tokens))
    with pytest.raises(IndexError):  # torch's own error, not ours: the range check is off
        model(torch.tensor([[97]]))


def test_requiring_model_parallel_without_initialising_it_fails():
    with pytest.raises(RuntimeError, match="model parallel is not initialised"):
        Transformer(tiny_args(), model_parallel=True)
