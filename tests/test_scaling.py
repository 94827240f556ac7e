"""llama_mini.scaling: Chinchilla optimum, data-constrained variant, shape suggestion, CLI.

Expected values are worked by hand: either plain ``math`` following the closed form step by
step (never the module's code path), or literals whose arithmetic is written beside them.
Closed forms are compared at relative 1e-9: the same formula evaluated in another order
differs by a few ulps (~1e-15), so 1e-9 fails on any real mistake and never on rounding.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from llama_mini import ModelArgs, count_params
from llama_mini.scaling import (
    R_D_STAR, R_N_STAR, SHAPE_FACTOR, ChinchillaFit, effective_params, effective_tokens, flops_for, main,
    suggest_shape,
)

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28  # Hoffmann et al. 2022, approach 3
FIT = ChinchillaFit()


def hand_optimum(C, e=E, a_=A, b_=B, alpha=ALPHA, beta=BETA):
    """N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b, written out independently of the module."""
    a = beta / (alpha + beta)  # 0.28 / 0.62 = 14/31
    b = alpha / (alpha + beta)  # 0.34 / 0.62 = 17/31
    G = (alpha * a_ / (beta * b_)) ** (1 / (alpha + beta))  # (138.176 / 114.996)^(1/0.62) = 1.3447106...
    n, d = G * (C / 6) ** a, (C / 6) ** b / G
    return n, d, e + a_ / n**alpha + b_ / d**beta


def test_published_defaults():
    assert (FIT.E, FIT.A, FIT.B, FIT.alpha, FIT.beta) == (E, A, B, ALPHA, BETA)
    assert (R_D_STAR, R_N_STAR) == (15.4, 5.3)  # Muennighoff et al. 2023
    with pytest.raises(dataclasses.FrozenInstanceError):
        FIT.E = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("C", [1e15, 1e18, 1e21, 5.76e23, 1e26])
def test_optimum_matches_the_closed_form(C):
    n, d, loss = hand_optimum(C)
    opt = FIT.optimal(C)
    assert opt.n_params == pytest.approx(n, rel=1e-9)
    assert opt.n_tokens == pytest.approx(d, rel=1e-9)
    assert opt.tokens_per_param == pytest.approx(d / n, rel=1e-9)
    assert opt.loss == pytest.approx(loss, rel=1e-9)
    # C = 6 N D holds for the optimum
    assert opt.flops == pytest.approx(C, rel=1e-9)
    assert 6 * opt.n_params * opt.n_tokens == pytest.approx(C, rel=1e-9)
    # the first-order condition of the Lagrangian, a derivation the closed form does not use:
    # d/dN [A N^-alpha + B (C/6N)^-beta] = 0  <=>  alpha A / N^alpha = beta B / D^beta
    assert ALPHA * A / opt.n_params**ALPHA == pytest.approx(BETA * B / opt.n_tokens**BETA, rel=1e-9)


def test_chinchilla_budget_worked_by_hand():
    # Gopher/Chinchilla budget C = 5.76e23, so C/6 = 9.6e22.
    # G = (0.34*406.4 / (0.28*410.7))^(1/0.62) = (138.176/114.996)^1.6129032 = 1.2015722^1.6129032 = 1.3447106
    # (C/6)^(14/31) = 2.3938131e10 -> N_opt = 1.3447106 * 2.3938131e10 = 3.2189859e10
    # (C/6)^(17/31) = 4.0103382e12 -> D_opt = 4.0103382e12 / 1.3447106 = 2.9823057e12
    # D/N = 92.647; L = 1.69 + 406.4/3.2189859e10^0.34 + 410.7/2.9823057e12^0.28 = 1.930748
    # Literals carry 7-8 significant digits, hence rel 1e-6 here.
    opt = FIT.optimal(5.76e23)
    assert opt.n_params == pytest.approx(3.2189859e10, rel=1e-6)
    assert opt.n_tokens == pytest.approx(2.9823057e12, rel=1e-6)
    assert opt.tokens_per_param == pytest.approx(92.64737, rel=1e-6)
    assert opt.loss == pytest.approx(1.930748, abs=1e-6)


def test_loss_of_chinchilla_itself_worked_by_hand():
    # 70e9^0.34 = 4867.8068 -> 406.4 / 4867.8068 = 0.08348729
    # 1.4e12^0.28 = 2517.1891 -> 410.7 / 2517.1891 = 0.16315818
    # L = 1.69 + 0.08348729 + 0.16315818 = 1.93664547  (8 decimals written, hence abs 1e-7)
    assert FIT.loss(70e9, 1.4e12) == pytest.approx(1.93664547, abs=1e-7)
    assert FIT.loss(70e9, 1.4e12) == pytest.approx(E + A / 70e9**ALPHA + B / 1.4e12**BETA, rel=1e-12)


def test_flops_for_is_6nd():
    assert flops_for(70e9, 1.4e12) == pytest.approx(5.88e23, rel=1e-12)  # 6 * 70e9 * 1.4e12
    assert flops_for(1, 1) == 6.0


@pytest.mark.parametrize("C", [1e18, 1e21, 5.76e23])
@pytest.mark.parametrize("factor", [1.1, 1.01])
def test_optimum_minimises_loss_on_the_iso_flop_curve(C, factor):
    opt = FIT.optimal(C)
    for n in (opt.n_params * factor, opt.n_params / factor):
        assert FIT.loss(n, C / (6 * n)) > opt.loss


def test_overridden_constants_follow_the_closed_form():
    fit = ChinchillaFit(E=2.0, A=300.0, B=500.0, alpha=0.5, beta=0.3)
    n, d, loss = hand_optimum(1e20, 2.0, 300.0, 500.0, 0.5, 0.3)
    opt = fit.optimal(1e20)
    assert (opt.n_params, opt.n_tokens, opt.loss) == pytest.approx((n, d, loss), rel=1e-9)


# --- data-constrained (Muennighoff et al. 2023) ---------------------------------------------

def test_effective_tokens_without_repetition_is_the_token_count():
    assert effective_tokens(1e9, 1e9) == 1e9  # one epoch: R_D = 0, D' = U_D = D
    assert effective_tokens(3e8, 1e9) == 3e8  # less than an epoch: every token is fresh


def test_effective_tokens_four_epochs_worked_by_hand():
    # U = 1e9, D = 4e9: R_D = 3, exp(-3/15.4) = 0.82299497,
    # D' = 1e9 * (1 + 15.4 * (1 - 0.82299497)) = 1e9 * 3.7258775215 (10 digits, hence rel 1e-10)
    assert effective_tokens(4e9, 1e9) == pytest.approx(3.7258775215e9, rel=1e-10)
    assert effective_tokens(4e9, 1e9) == pytest.approx(1e9 * (1 + 15.4 * (1 - math.exp(-3 / 15.4))), rel=1e-12)


def test_effective_tokens_saturate_at_u_times_one_plus_r_star():
    # R_D = 40 R_D*: exp(-40) = 4e-18 is below double precision, so D' = U (1 + 15.4) = 16.4 U
    u = 1e9
    assert effective_tokens(u * (1 + 40 * 15.4), u) == pytest.approx(16.4 * u, rel=1e-12)
    values = [effective_tokens(u * epochs, u) for epochs in (1, 2, 4, 16, 64, 256)]
    assert values == sorted(values) and all(v < 16.4 * u for v in values)
    assert all(v <= u * e for v, e in zip(values, (1, 2, 4, 16, 64, 256)))


def test_effective_params_worked_by_hand():
    assert effective_params(5e8, 1e9) == 5e8  # no excess parameters
    # N = 3 U_N: R_N = 2, exp(-2/5.3) = 0.68567..., N' = U_N (1 + 5.3 (1 - 0.6856702)) = 2.6659478153 U_N
    assert effective_params(3e9, 1e9) == pytest.approx(2.6659478153e9, rel=1e-10)


def test_unique_params_is_the_optimum_that_uses_the_unique_data_once():
    # U_N = G (G U_D)^(beta/alpha); for U_D = 1e10: 1.3447106 * (1.3447106e10)^(0.28/0.34) = 2.9502077e8
    u_n = FIT.unique_params(1e10)
    assert u_n == pytest.approx(2.9502077e8, rel=1e-7)  # 8 digits written
    opt = FIT.optimal(6 * u_n * 1e10)  # the budget that trains U_N on U_D once ...
    assert opt.n_tokens == pytest.approx(1e10, rel=1e-9)  # ... is optimal at exactly U_D tokens
    assert opt.n_params == pytest.approx(u_n, rel=1e-9)


@pytest.mark.parametrize("spare", [1.0, 1.1, 2.0])  # unique tokens / D_opt
def test_data_constrained_is_the_plain_optimum_when_data_suffices(spare):
    C = 1e21
    plain = FIT.optimal(C)
    r = FIT.data_constrained(C, unique_tokens=plain.n_tokens * spare)
    assert not r.constrained
    assert r.n_params == plain.n_params and r.n_tokens == pytest.approx(plain.n_tokens, rel=1e-12)
    assert r.loss == pytest.approx(plain.loss, rel=1e-12) and r.naive_loss == pytest.approx(plain.loss, rel=1e-12)
    assert r.epochs == pytest.approx(1 / spare, rel=1e-12)
    assert (r.effective_params, r.effective_tokens) == (r.n_params, pytest.approx(r.n_tokens, rel=1e-12))


@pytest.mark.parametrize("C, unique", [(1e21, 1e10), (5.76e23, 1e12), (1e24, 1e11), (1e19, 1e8)])
def test_data_constrained_when_data_is_scarce(C, unique):
    r = FIT.data_constrained(C, unique)
    plain = FIT.optimal(C)
    assert r.constrained and plain.n_tokens > unique
    assert 6 * r.n_params * r.n_tokens == pytest.approx(C, rel=1e-9)
    assert r.epochs == pytest.approx(r.n_tokens / unique, rel=1e-12) and r.epochs > 1
    # repetition never beats fresh data, and the search never does worse than just repeating
    assert r.loss > r.unconstrained.loss == plain.loss
    assert r.loss <= r.naive_loss
    # the loss reported is L(N', D') at the reported allocation, by the formulas written out
    u_n = min(r.n_params, FIT.G * (FIT.G * unique) ** (BETA / ALPHA))
    n_eff = u_n * (1 + 5.3 * (1 - math.exp(-(r.n_params / u_n - 1) / 5.3)))
    d_eff = unique * (1 + 15.4 * (1 - math.exp(-(r.epochs - 1) / 15.4)))
    assert (r.effective_params, r.effective_tokens) == pytest.approx((n_eff, d_eff), rel=1e-9)
    assert r.loss == pytest.approx(E + A / n_eff**ALPHA + B / d_eff**BETA, rel=1e-9)
    # an independent dense scan (N_opt * [1e-3, 1e3], 4001 points) finds nothing lower;
    # 1e-12 relative allows for the float noise of the flat bottom
    scan = [plain.n_params * 10 ** (-3 + 6 * i / 4000) for i in range(4001)]
    lowest = min(FIT.data_constrained_loss(n, C / (6 * n), unique) for n in scan)
    assert r.loss <= lowest * (1 + 1e-12)


# --- shapes ---------------------------------------------------------------------------------

def test_preset_counts_this_test_relies_on():
    counts = {name: count_params(ModelArgs.preset(name), include_embeddings=True)
              for name in ("tinyllama-1.1b", "llama2-7b", "llama2-13b", "homework")}
    assert counts == {"tinyllama-1.1b": 1_100_048_384, "llama2-7b": 6_738_415_616,
                      "llama2-13b": 13_015_864_320, "homework": 60_039_680}


@pytest.mark.parametrize("target, preset", [(6.7e9, "llama2-7b"), (1.1e9, "tinyllama-1.1b"),
                                            (1.3e10, "llama2-13b"), (6e7, "homework"), (2e5, "debug")])
def test_nearest_preset(target, preset):
    s = suggest_shape(target)
    assert s.preset == preset
    assert s.preset_params == count_params(ModelArgs.preset(preset), include_embeddings=True)
    assert s.preset_ratio == pytest.approx(s.preset_params / target, rel=1e-12)


@pytest.mark.parametrize("target", [10 ** (8 + k / 10) for k in range(41)] + [1.4256e8])
def test_generated_shape_is_within_the_stated_factor(target):
    s = suggest_shape(target)
    a = s.args
    assert s.params == count_params(a, include_embeddings=True)
    assert s.ratio == pytest.approx(s.params / target, rel=1e-12)
    assert 1 / SHAPE_FACTOR <= s.ratio <= SHAPE_FACTOR
    head_dim = 64 if a.dim < 2048 else 128
    assert a.dim % head_dim == 0 and a.head_dim == head_dim and a.n_heads == a.dim // head_dim
    assert 64 <= a.dim / a.n_layers <= 128  # the aspect-ratio rule
    assert (a.vocab_size, a.multiple_of, a.n_kv_heads) == (32000, 256, a.n_heads)


def test_generated_shape_honours_vocab_size_and_small_targets():
    assert suggest_shape(1e9, vocab_size=128256).args.vocab_size == 128256
    # 1e6 is below the smallest candidate (dim 64, 1 layer: 2 * 32000 * 64 embeddings alone = 4.1e6)
    s = suggest_shape(1e6)
    assert (s.args.dim, s.args.n_layers) == (64, 1) and s.ratio > 4


# --- validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda: FIT.optimal(-1), "flops must be a finite number > 0, got -1"),
    (lambda: FIT.optimal(float("inf")), "flops must be a finite number > 0, got inf"),
    (lambda: FIT.optimal(float("nan")), "flops must be a finite number > 0, got nan"),
    (lambda: FIT.optimal(True), "flops must be a finite number > 0, got True"),
    (lambda: FIT.optimal("1e21"), "flops must be a finite number > 0, got '1e21'"),
    (lambda: FIT.loss(0, 1e9), "n_params must be a finite number > 0, got 0"),
    (lambda: FIT.loss(1e9, -5.0), "n_tokens must be a finite number > 0, got -5.0"),
    (lambda: flops_for(1e9, 0), "n_tokens must be a finite number > 0, got 0"),
    (lambda: effective_tokens(1e9, 0), "unique_tokens must be a finite number > 0, got 0"),
    (lambda: effective_params(1e9, -1), "unique_params must be a finite number > 0, got -1"),
    (lambda: FIT.data_constrained(1e21, 0), "unique_tokens must be a finite number > 0, got 0"),
    (lambda: ChinchillaFit(alpha=0), "alpha must be a finite number > 0, got 0"),
    (lambda: ChinchillaFit(E=-1), "E must be a finite number >= 0, got -1"),
    (lambda: suggest_shape(0), "n_params must be a finite number > 0, got 0"),
    (lambda: suggest_shape(1e9, vocab_size=0), "vocab_size must be a positive integer, got 0"),
])
def test_bad_inputs_name_the_argument(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


# --- command line ---------------------------------------------------------------------------

def test_cli_report(capsys):
    assert main(["--flops", "1e21"]) == 0
    out = capsys.readouterr().out
    n, d, loss = hand_optimum(1e21)  # 1.8242177e9 parameters, 9.1363365e10 tokens, 2.3288829
    s = suggest_shape(n)
    for text in (f"N = {n:.4g}", f"D = {d:.4g}", f"({d / n:.1f} tokens/param)", f"L = {loss:.4f}",
                 "N = 1.824e+09", "D = 9.136e+10", "L = 2.3289", "tinyllama-1.1b",
                 f"dim={s.args.dim} n_layers={s.args.n_layers}", f"{s.params:.4g} parameters"):
        assert text in out, text
    assert "data-constrained" not in out


def test_cli_json_and_data_constrained(capsys):
    assert main(["--flops", "1e21", "--unique-tokens", "1e10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    n, d, loss = hand_optimum(1e21)
    assert (out["optimum"]["n_params"], out["optimum"]["n_tokens"], out["optimum"]["loss"]) == \
        pytest.approx((n, d, loss), rel=1e-9)
    dc = out["data_constrained"]
    r = FIT.data_constrained(1e21, 1e10)
    assert dc["constrained"] is True and dc["epochs"] == pytest.approx(r.epochs, rel=1e-12) and dc["epochs"] > 1
    assert dc["loss"] == pytest.approx(r.loss, rel=1e-12) and dc["loss"] > loss
    assert out["shape"]["preset"] == "tinyllama-1.1b"
    assert out["shape"]["params"] == count_params(ModelArgs(**{k: v for k, v in out["shape"]["shape"].items()
                                                               if k not in ("head_dim", "hidden_dim")}))


def test_cli_text_data_constrained(capsys):
    main(["--flops", "1e21", "--unique-tokens", "1e10"])
    out = capsys.readouterr().out
    r = FIT.data_constrained(1e21, 1e10)
    assert f"({r.epochs:.2f} epochs)" in out and f"L = {r.loss:.4f}" in out
    assert f"repetition costs {r.loss - r.unconstrained.loss:+.4f}" in out


def test_cli_params_tokens_and_overrides(capsys):
    main(["--params", "70e9", "--tokens", "1.4e12", "--json"])
    given = json.loads(capsys.readouterr().out)["given"]
    assert given["flops"] == pytest.approx(5.88e23, rel=1e-12)
    assert given["loss"] == pytest.approx(1.93664547, abs=1e-7)  # worked above
    main(["--flops", "1e20", "--E", "2", "--A", "300", "--B", "500", "--alpha", "0.5", "--beta", "0.3", "--json"])
    opt = json.loads(capsys.readouterr().out)["optimum"]
    n, d, loss = hand_optimum(1e20, 2.0, 300.0, 500.0, 0.5, 0.3)
    assert (opt["n_params"], opt["n_tokens"], opt["loss"]) == pytest.approx((n, d, loss), rel=1e-9)


@pytest.mark.parametrize("argv, message", [
    (["--flops", "-1"], "argument --flops: must be a finite number > 0 (e.g. 1e21), got '-1'"),
    (["--flops", "lots"], "argument --flops: must be a finite number > 0"),
    (["--flops", "nan"], "argument --flops: must be a finite number > 0"),
    (["--flops", "1e21", "--unique-tokens", "0"], "argument --unique-tokens: must be a finite number > 0"),
    (["--flops", "1e21", "--vocab-size", "0"], "argument --vocab-size: must be a positive integer, got '0'"),
    (["--flops", "1e21", "--alpha", "0"], "argument --alpha: must be a finite number > 0"),
    (["--flops", "1e21", "--E", "-1"], "argument --E: must be a finite number >= 0"),
    (["--params", "1e9"], "give --flops, or --params together with --tokens"),
    ([], "give --flops, or --params together with --tokens"),
    (["--flops", "1e21", "--params", "1e9", "--tokens", "1e10"], "give either --flops or --params with --tokens"),
])
def test_cli_bad_arguments_exit_naming_the_option(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("llama-mini scaling: error: ") and err.count("\n") == 1, err


def test_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "llama_mini.scaling", "--flops", "5.76e23", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["optimum"]["n_params"] == pytest.approx(3.2189859e10, rel=1e-6)
