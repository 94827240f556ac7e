"""GPU readiness of the flash attention kernels, checked without a GPU.

Every forward and backward kernel, in every autotune configuration and head dim it can launch
with, is compiled ahead of time for sm_80 (A100) and sm_90 (H100) by ``kernels.aot``; from each
cubin: no register spills, shared memory within the target's limit, and matrix products on the
tensor cores (HMMA on sm_80, Hopper's warpgroup HGMMA on sm_90). The checker itself is shown
to catch each failure on configurations known to be bad.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

KINDS = ("fwd", "dkdv", "dq", "pre")


def _bad_specs():
    """Configurations outside the tables, each unfit for sm_90 in one known way."""
    import torch

    from llama_mini.kernels import flash_attention as fa

    base = next(s for s in fa.aot_specs(90, head_dims=(128,)) if s.kernel == "_attn_fwd")
    spills = dataclasses.replace(  # head dim 256: spilled in every tiling tried
        base, label="bad: spills", num_warps=4, num_stages=2,
        constexprs=dict(base.constexprs, HEAD_DIM=256, BLOCK_D=256, BLOCK_M=64, BLOCK_N=64))
    too_much_smem = dataclasses.replace(  # 4 stages of 128 x 128 k and v tiles
        base, label="bad: shared memory", num_warps=8, num_stages=4,
        constexprs=dict(base.constexprs, BLOCK_M=128, BLOCK_N=128))
    fp32 = next(s for s in fa.aot_specs(90, head_dims=(32,), dtypes=(torch.float32,)) if s.kernel == "_attn_fwd")
    no_tensor_cores = dataclasses.replace(  # IEEE fp32 products run on FMA units
        fp32, label="bad: no tensor cores", constexprs=dict(fp32.constexprs, PRECISION="ieee"))
    return [spills, too_much_smem, no_tensor_cores]


@pytest.fixture(scope="module")
def reports():
    """All compiles in one parallel batch (a few minutes on two cores): the kernels' own specs
    for each arch, plus the known-bad ones for sm_90."""
    from llama_mini.kernels import aot
    from llama_mini.kernels import flash_attention as fa

    bad = _bad_specs()
    results = aot.check(lambda arch: fa.aot_specs(arch) + (bad if arch == 90 else []), archs=(80, 90))
    return [r for r in results if not r.label.startswith("bad:")], [r for r in results if r.label.startswith("bad:")]


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("kind", KINDS)
def test_every_config_compiles_without_spills_within_shared_memory_on_tensor_cores(reports, arch, kind):
    from llama_mini.kernels.aot import describe_toolchain

    mine = [r for r in reports[0] if r.arch == arch and r.label.startswith(kind)]
    assert mine, f"no {kind} kernels compiled for sm_{arch}"
    bad = [f"{r.label}: {'; '.join(r.problems())}" for r in mine if r.problems()]
    assert not bad, f"with {describe_toolchain(mine)}:\n" + "\n".join(bad)
    want = {80: "HMMA", 90: "HGMMA"}[arch]
    assert all(r.mma.get(want, 0) > 0 for r in mine if r.expect_mma)


@pytest.mark.slow
def test_every_autotune_config_and_head_dim_was_compiled(reports):
    from llama_mini.kernels import flash_attention as fa

    labels = {(r.arch, r.label) for r in reports[0]}
    for arch in (80, 90):
        for head_dim in fa.AOT_HEAD_DIMS:
            block_d = fa.block_d_for(head_dim)
            tables = {"fwd": fa.fwd_configs(block_d, arch), **fa.bwd_configs(block_d, arch)}
            for kind, table in tables.items():
                for c in table:
                    label = (f"{kind:<4} D={head_dim:<3} bf16 causal M{c.block_m} N{c.block_n} "
                             f"w{c.num_warps} s{c.num_stages}")
                    assert (arch, label) in labels, f"sm_{arch} {label} not compiled"


@pytest.mark.slow
def test_the_checker_catches_spills_shared_memory_and_missing_tensor_cores(reports):
    found = {r.label: r.problems() for r in reports[1]}
    assert any("register spills" in p for p in found["bad: spills"]), found
    assert any("shared memory" in p and "over the sm_90 limit" in p for p in found["bad: shared memory"]), found
    assert any("do not use HGMMA" in p for p in found["bad: no tensor cores"]), found


def test_every_kernel_head_dim_and_arch_has_candidates():
    """Each autotuned kernel needs at least one candidate per padded head dim and architecture
    family, and a Hopper table only replaces head dims the Ampere table has."""
    from llama_mini.kernels import flash_attention as fa

    for arch in (80, 86, 89, 90, 100):
        for block_d in sorted({fa.block_d_for(d) for d in fa.AOT_HEAD_DIMS}):
            tables = {"fwd": fa.fwd_configs(block_d, arch), **fa.bwd_configs(block_d, arch)}
            for kind, table in tables.items():
                assert table, f"no {kind} candidates for padded head dim {block_d} on sm_{arch}"
                assert len(set(table)) == len(table), f"{kind} D={block_d} sm_{arch}: duplicates {table}"
    for ampere, hopper in ((fa._FWD, fa._FWD_HOPPER), (fa._DKDV, fa._DKDV_HOPPER), (fa._DQ, fa._DQ_HOPPER)):
        assert set(hopper) <= set(ampere)


def test_report_problems_from_numbers():
    from llama_mini.kernels.aot import CompileReport

    fit = CompileReport("k", 90, registers=128, stack=0, local=0, shared=1000, shared_limit=2000, mma={"HGMMA": 4})
    assert fit.problems() == []
    assert "ok" in fit.line()
    spill = dataclasses.replace(fit, stack=16)
    assert spill.problems() == ["register spills: stack 16 B, local 0 B (128 registers)"]
    big = dataclasses.replace(fit, shared=3000)
    assert "shared memory 3000 B over the sm_90 limit 2000 B" in big.problems()
    ampere_mma_on_hopper = dataclasses.replace(fit, mma={"HMMA": 8})
    assert "do not use HGMMA" in ampere_mma_on_hopper.problems()[0]
    no_mma_needed = dataclasses.replace(fit, mma={}, expect_mma=False)
    assert no_mma_needed.problems() == []
    failed = dataclasses.replace(fit, error="CompilationError: boom")
    assert failed.problems() == ["compile failed: CompilationError: boom"]


def test_reports_name_the_triton_and_ptxas_versions():
    from llama_mini.kernels.aot import CompileReport, describe_toolchain

    reports = [CompileReport("k", 80, triton="3.9.0", ptxas="12.9.86"),
               CompileReport("k", 90, triton="3.9.0", ptxas="13.4.59"),
               CompileReport("j", 90, triton="3.9.0", ptxas="13.4.59")]
    assert describe_toolchain(reports) == "triton 3.9.0, ptxas 12.9.86 (sm_80); 13.4.59 (sm_90)"
    same = [dataclasses.replace(r, ptxas="12.8.93", triton="3.6.0") for r in reports]
    assert describe_toolchain(same) == "triton 3.6.0, ptxas 12.8.93 (sm_80, sm_90)"
    assert describe_toolchain([CompileReport("k", 90)]) == "triton unknown, ptxas unknown"
