"""Chinchilla scaling: compute-optimal model and data size for a FLOP budget, with and without
a cap on unique data, and a LLaMA shape of about that size.

    llama-mini scaling --flops 1e21
    llama-mini scaling --flops 1e21 --unique-tokens 1e10 --json
    llama-mini scaling --params 7e9 --tokens 2e12     # just C = 6ND and the loss

    from llama_mini.scaling import ChinchillaFit, suggest_shape
    opt = ChinchillaFit().optimal(1e21)          # .n_params, .n_tokens, .loss, ...

Loss model (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", the
parametric fit of section 3.3, "approach 3"): L(N, D) = E + A / N^alpha + B / D^beta, in nats per token,
N = parameters (all of them, embeddings included, as Chinchilla counts), D = training tokens,
training compute C = 6 N D FLOPs. With the rounded published constants the optimum at
Chinchilla's own budget (5.76e23) is about 32B parameters and 3.0T tokens (~93 tokens per
parameter), far from the ~20 of the paper's approaches 1 and 2: a known inconsistency of the
published approach-3 fit (Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt").
Pass your own constants (``--E --A --B --alpha --beta``) where you have a better fit.

Data-constrained variant (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models",
section 3): repeated tokens and parameters beyond what the unique data can feed are
worth less than fresh ones; the loss is L(N', D') with the effective counts of
``effective_tokens`` and ``effective_params`` and the published decay constants
R_D* = 15.4, R_N* = 5.3 (fitted there on top of their own refit of E, A, B, alpha, beta; here
they sit on whichever ``ChinchillaFit`` you use).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass

from .config import PRESETS, ModelArgs
from .model import count_params

__all__ = [
    "ChinchillaFit", "Optimum", "DataConstrainedOptimum", "ShapeSuggestion", "R_D_STAR", "R_N_STAR",
    "SHAPE_FACTOR", "flops_for", "effective_tokens", "effective_params", "suggest_shape", "main",
]

R_D_STAR = 15.4  # Muennighoff et al. 2023: the R_D-th repetition is worth exp(-R_D / R_D*) of fresh data
R_N_STAR = 5.3  # Muennighoff et al. 2023: the same for excess parameters
SHAPE_FACTOR = 1.03  # generated shapes land this close to targets in [1e8, 1e12] (worst seen: 1.0296)
_GRID_POINTS = 801  # log-N grid of the data-constrained search, over N_opt * [1e-4, 1e4]


def _check(name: str, value: float, allow_zero: bool = False) -> float:
    """``value`` as a float if it is a finite real number > 0 (>= 0 with allow_zero)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def flops_for(n_params: float, n_tokens: float) -> float:
    """Training compute C = 6 N D: 2 FLOPs per parameter per token forward, 4 backward."""
    return 6.0 * _check("n_params", n_params) * _check("n_tokens", n_tokens)


def effective_tokens(n_tokens: float, unique_tokens: float, r_d_star: float = R_D_STAR) -> float:
    """D' = U_D + U_D R_D* (1 - exp(-R_D / R_D*)), U_D = min(D, unique), R_D = D / U_D - 1.

    The first epoch counts in full; each repetition is worth less, so D' -> U_D (1 + R_D*)."""
    d, u = _check("n_tokens", n_tokens), _check("unique_tokens", unique_tokens)
    u_d = min(d, u)
    return u_d + u_d * r_d_star * (1.0 - math.exp(-(d / u_d - 1.0) / _check("r_d_star", r_d_star)))


def effective_params(n_params: float, unique_params: float, r_n_star: float = R_N_STAR) -> float:
    """N' = U_N + U_N R_N* (1 - exp(-R_N / R_N*)), U_N = min(N, unique_params), R_N = N / U_N - 1.

    ``unique_params`` is the size the unique data can feed (``ChinchillaFit.unique_params``)."""
    n, u = _check("n_params", n_params), _check("unique_params", unique_params)
    u_n = min(n, u)
    return u_n + u_n * r_n_star * (1.0 - math.exp(-(n / u_n - 1.0) / _check("r_n_star", r_n_star)))


@dataclass(frozen=True)
class Optimum:
    """The compute-optimal allocation of a FLOP budget."""

    n_params: float  # N_opt, all parameters
    n_tokens: float  # D_opt, training tokens
    tokens_per_param: float  # D_opt / N_opt
    loss: float  # L(N_opt, D_opt), nats per token
    flops: float  # C = 6 N_opt D_opt


@dataclass(frozen=True)
class DataConstrainedOptimum:
    """The best allocation of a FLOP budget when only ``unique_tokens`` distinct tokens exist."""

    flops: float
    unique_tokens: float  # U_D
    constrained: bool  # False: D_opt <= U_D, so this is the plain Chinchilla optimum
    n_params: float  # N, with D = C / 6N
    n_tokens: float  # D, tokens seen counting repeats
    epochs: float  # D / U_D
    effective_params: float  # N'
    effective_tokens: float  # D'
    loss: float  # L(N', D')
    unconstrained: Optimum  # Chinchilla's optimum, its loss as if every token were fresh
    naive_loss: float  # L(N', D') at Chinchilla's allocation, repeating data to fill D_opt


@dataclass(frozen=True)
class ChinchillaFit:
    """L(N, D) = E + A / N^alpha + B / D^beta; defaults: Hoffmann et al. 2022, approach 3."""

    E: float = 1.69  # irreducible loss (entropy of text), nats per token
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.34  # parameter exponent
    beta: float = 0.28  # data exponent

    def __post_init__(self) -> None:
        _check("E", self.E, allow_zero=True)
        for name in ("A", "B", "alpha", "beta"):
            _check(name, getattr(self, name))

    def loss(self, n_params: float, n_tokens: float) -> float:
        """E + A / N^alpha + B / D^beta."""
        n, d = _check("n_params", n_params), _check("n_tokens", n_tokens)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def G(self) -> float:
        """G = (alpha A / (beta B))^(1 / (alpha + beta))."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def optimal(self, flops: float) -> Optimum:
        """Minimise L subject to 6 N D = C (Hoffmann et al. 2022, section 3.3).

        Put D = C / 6N; dL/dN = 0 gives alpha A / N^alpha = beta B / D^beta, hence
        N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b, a = beta / (alpha+beta), b = alpha / (alpha+beta)."""
        x = _check("flops", flops) / 6.0
        s = self.alpha + self.beta
        n, d = self.G * x ** (self.beta / s), x ** (self.alpha / s) / self.G
        return Optimum(n, d, d / n, self.loss(n, d), 6.0 * n * d)

    def unique_params(self, unique_tokens: float) -> float:
        """U_N: the N whose compute-optimal D is U_D, i.e. N_opt for C = 6 N U_D.

        From D_opt = G^-1 (C/6)^b: C/6 = (G U_D)^(1/b), so U_N = G (G U_D)^(a/b) = G (G U_D)^(beta/alpha)
        (Muennighoff et al. 2023, section 3)."""
        return self.G * (self.G * _check("unique_tokens", unique_tokens)) ** (self.beta / self.alpha)

    def data_constrained_loss(self, n_params: float, n_tokens: float, unique_tokens: float,
                              r_d_star: float = R_D_STAR, r_n_star: float = R_N_STAR) -> float:
        """L(N', D') with D' = effective_tokens(D, U_D), N' = effective_params(N, U_N)."""
        n_eff = effective_params(n_params, self.unique_params(unique_tokens), r_n_star)
        return self.loss(n_eff, effective_tokens(n_tokens, unique_tokens, r_d_star))

    def data_constrained(self, flops: float, unique_tokens: float,
                         r_d_star: float = R_D_STAR, r_n_star: float = R_N_STAR) -> DataConstrainedOptimum:
        """The N (and D = C / 6N) minimising L(N', D') for a budget C and U_D unique tokens.

        If D_opt <= U_D no token repeats and N_opt <= U_N, so this is the plain optimum. Otherwise
        the search is deterministic: f(u) = L(N', D') at N = e^u is evaluated on 801 points evenly
        spaced in u over N_opt * [1e-4, 1e4], then golden-section search refines the bracket of
        the two grid neighbours of the smallest value until it is narrower than 1e-12 in u. Far
        past both saturations (R_D >> R_D*, R_N >> R_N*) L is flat in N to float precision; the N
        returned is then one point of that plateau, and only the loss is meaningful."""
        c, u_d = _check("flops", flops), _check("unique_tokens", unique_tokens)
        plain = self.optimal(c)

        def result(n: float, constrained: bool) -> DataConstrainedOptimum:
            d = c / (6.0 * n)
            n_eff = effective_params(n, self.unique_params(u_d), r_n_star)
            d_eff = effective_tokens(d, u_d, r_d_star)
            naive = self.data_constrained_loss(plain.n_params, plain.n_tokens, u_d, r_d_star, r_n_star)
            return DataConstrainedOptimum(c, u_d, constrained, n, d, d / u_d, n_eff, d_eff,
                                          self.loss(n_eff, d_eff), plain, naive)

        if plain.n_tokens <= u_d:
            return result(plain.n_params, False)

        def f(u: float) -> float:
            n = math.exp(u)
            return self.data_constrained_loss(n, c / (6.0 * n), u_d, r_d_star, r_n_star)

        span = 4.0 * math.log(10.0)
        lo0 = math.log(plain.n_params) - span
        grid = [lo0 + 2.0 * span * i / (_GRID_POINTS - 1) for i in range(_GRID_POINTS)]
        best = min(range(_GRID_POINTS), key=lambda i: f(grid[i]))
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, _GRID_POINTS - 1)]
        inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
        x1, x2 = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
        f1, f2 = f(x1), f(x2)
        while hi - lo > 1e-12:
            if f1 <= f2:
                hi, x2, f2 = x2, x1, f1
                x1 = hi - inv_phi * (hi - lo)
                f1 = f(x1)
            else:
                lo, x1, f1 = x1, x2, f2
                x2 = lo + inv_phi * (hi - lo)
                f2 = f(x2)
        return result(math.exp((lo + hi) / 2.0), True)


@dataclass(frozen=True)
class ShapeSuggestion:
    """Nearest preset and a generated LLaMA shape for a parameter target."""

    target: float
    preset: str  # nearest of PRESETS by |log(count / target)|, each with its own vocab_size
    preset_params: int
    preset_ratio: float  # preset_params / target
    args: ModelArgs  # generated shape
    params: int  # count_params(args), embeddings included
    ratio: float  # params / target


def _shape_args(dim: int, n_layers: int, vocab_size: int) -> ModelArgs:
    head_dim = 64 if dim < 2048 else 128
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=dim // head_dim, vocab_size=vocab_size, multiple_of=256)


def suggest_shape(n_params: float, vocab_size: int = 32000) -> ShapeSuggestion:
    """The nearest preset and a generated shape, both counted with embeddings (input and output
    matrices), since Chinchilla's N counts every parameter.

    Generated shapes: dim a multiple of 64 with head_dim 64 below 2048, a multiple of 128 with
    head_dim 128 from 2048 up to 32768; n_heads = dim / head_dim, plain multi-head attention,
    Meta's SwiGLU width (multiple_of 256). Depth follows an aspect-ratio rule, 64 <= dim /
    n_layers <= 128: LLaMA-2 7B and 13B sit at 128, Llama-2 70B at 102, TinyLlama at 93, the
    homework preset at 64, and Kaplan et al. 2020 (fig. 5) found loss within a few percent over
    a much wider range, so the window keeps shapes conventional at no cost in predicted loss.
    Among all such (dim, n_layers) the one whose count is closest in log wins. Within
    SHAPE_FACTOR of targets in [1e8, 1e12] at vocab 32000; near the ends of the range (a model
    much smaller than its embeddings) only the closest candidate is promised."""
    target = _check("n_params", n_params)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")

    def dist(count: float) -> float:
        return abs(math.log(count / target))

    counts = {name: count_params(ModelArgs.preset(name), include_embeddings=True) for name in PRESETS}
    preset = min(counts, key=lambda name: dist(counts[name]))
    best: tuple[float, int, int] | None = None
    for dim in [*range(64, 2048, 64), *range(2048, 32768 + 1, 128)]:
        c1 = count_params(_shape_args(dim, 1, vocab_size))
        per_layer = count_params(_shape_args(dim, 2, vocab_size)) - c1
        fixed = c1 - per_layer  # embeddings, output, final norm
        lo, hi = max(1, math.ceil(dim / 128)), max(1, dim // 64)
        l_star = (target - fixed) / per_layer  # count is linear in depth
        for n_layers in {min(max(math.floor(l_star), lo), hi), min(max(math.ceil(l_star), lo), hi)}:
            d = dist(fixed + n_layers * per_layer)
            if best is None or d < best[0]:
                best = (d, dim, n_layers)
    assert best is not None
    args = _shape_args(best[1], best[2], vocab_size)
    params = count_params(args, include_embeddings=True)
    return ShapeSuggestion(target, preset, counts[preset], counts[preset] / target, args, params, params / target)


# --- command line ---------------------------------------------------------------------------

def _number(allow_zero: bool = False):
    def parse(text: str) -> float:
        try:
            return _check("value", float(text), allow_zero)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'>= 0' if allow_zero else '> 0'} (e.g. 1e21), got {text!r}") from None
    return parse


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def build_parser(prog: str = "llama-mini scaling") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--flops", type=_number(), help="training compute budget C in FLOPs, e.g. 1e21")
    p.add_argument("--params", type=_number(), help="with --tokens instead of --flops: a model size N")
    p.add_argument("--tokens", type=_number(), help="with --params: training tokens D")
    p.add_argument("--unique-tokens", type=_number(), help="unique tokens available (data-constrained variant)")
    p.add_argument("--vocab-size", type=_positive_int, default=32000, help="vocabulary of the generated shape")
    defaults = ChinchillaFit()
    for name in ("E", "A", "B", "alpha", "beta"):
        p.add_argument(f"--{name}", type=_number(allow_zero=name == "E"), default=getattr(defaults, name),
                       help=f"loss-fit constant (default {getattr(defaults, name)})")
    p.add_argument("--json", action="store_true", help="print JSON instead of the report")
    return p


def _shape_dict(s: ShapeSuggestion) -> dict:
    a = s.args
    return {"target": s.target, "preset": s.preset, "preset_params": s.preset_params, "preset_ratio": s.preset_ratio,
            "shape": {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
                      "head_dim": a.head_dim, "hidden_dim": a.hidden_dim, "vocab_size": a.vocab_size,
                      "multiple_of": a.multiple_of},
            "params": s.params, "ratio": s.ratio}


def _report(out: dict, fit: ChinchillaFit) -> str:
    lines = [f"loss fit: L = {fit.E:g} + {fit.A:g}/N^{fit.alpha:g} + {fit.B:g}/D^{fit.beta:g}  (nats/token)"]
    o = out["optimum"] if "optimum" in out else out["given"]
    lines += [f"compute          C = {o['flops']:.4g} FLOPs  (C = 6 N D)",
              f"{'compute-optimal' if 'optimum' in out else 'given':<16} N = {o['n_params']:.4g} parameters, "
              f"D = {o['n_tokens']:.4g} tokens ({o['tokens_per_param']:.1f} tokens/param)",
              f"predicted loss   L = {o['loss']:.4f}"]
    s = out["shape"]
    a = s["shape"]
    lines += [f"nearest preset   {s['preset']}: {s['preset_params']:.4g} parameters ({s['preset_ratio']:.2f}x N)",
              f"generated shape  dim={a['dim']} n_layers={a['n_layers']} n_heads={a['n_heads']} "
              f"head_dim={a['head_dim']} hidden_dim={a['hidden_dim']} vocab_size={a['vocab_size']}: "
              f"{s['params']:.4g} parameters ({s['ratio']:.3f}x N)"]
    dc = out.get("data_constrained")
    if dc is not None:
        lines.append(f"data-constrained (Muennighoff et al. 2023, R_D*={R_D_STAR}, R_N*={R_N_STAR}), "
                     f"U_D = {dc['unique_tokens']:.4g} unique tokens")
        if "constrained" in dc and not dc["constrained"]:
            lines.append(f"  enough data: the optimum uses {dc['epochs']:.3f} epochs, nothing repeats")
        else:
            lines += [f"  allocation     N = {dc['n_params']:.4g}, D = {dc['n_tokens']:.4g} ({dc['epochs']:.2f} epochs)",
                      f"  effective      N' = {dc['effective_params']:.4g}, D' = {dc['effective_tokens']:.4g}",
                      f"  predicted loss L = {dc['loss']:.4f}"]
            if "constrained" in dc:
                fresh = out["optimum"]["loss"]
                lines += [f"  vs {fresh:.4f} if Chinchilla's {o['n_tokens']:.4g} tokens were all fresh "
                          f"(repetition costs {dc['loss'] - fresh:+.4f})",
                          f"  Chinchilla's allocation repeating the data: L = {dc['naive_loss']:.4f} "
                          f"({o['n_tokens'] / dc['unique_tokens']:.2f} epochs)"]
    return "\n".join(lines)


def run(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The ``scaling`` command on parsed ``ns``: prints the report (or JSON)."""
    if ns.flops is not None and (ns.params is not None or ns.tokens is not None):
        parser.error("give either --flops or --params with --tokens, not both")
    if ns.flops is None and (ns.params is None or ns.tokens is None):
        parser.error("give --flops, or --params together with --tokens")
    fit = ChinchillaFit(E=ns.E, A=ns.A, B=ns.B, alpha=ns.alpha, beta=ns.beta)
    out: dict = {"fit": dataclasses.asdict(fit)}
    if ns.flops is not None:
        out["optimum"] = dataclasses.asdict(fit.optimal(ns.flops))
        n = out["optimum"]["n_params"]
        if ns.unique_tokens is not None:
            dc = dataclasses.asdict(fit.data_constrained(ns.flops, ns.unique_tokens))
            del dc["unconstrained"]  # the same as out["optimum"]
            out["data_constrained"] = dc
    else:
        n, d = ns.params, ns.tokens
        out["given"] = {"n_params": n, "n_tokens": d, "tokens_per_param": d / n, "loss": fit.loss(n, d),
                        "flops": flops_for(n, d)}
        if ns.unique_tokens is not None:
            n_eff = effective_params(n, fit.unique_params(ns.unique_tokens))
            d_eff = effective_tokens(d, ns.unique_tokens)
            out["data_constrained"] = {"unique_tokens": ns.unique_tokens, "n_params": n, "n_tokens": d,
                                       "epochs": d / ns.unique_tokens, "effective_params": n_eff,
                                       "effective_tokens": d_eff, "loss": fit.loss(n_eff, d_eff)}
    out["shape"] = _shape_dict(suggest_shape(n, ns.vocab_size))
    print(json.dumps(out, indent=2) if ns.json else _report(out, fit))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``llama-mini scaling ARGS`` from Python: the exit status, errors reported in one line."""
    from .cli import run_command

    return run_command("scaling", list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
