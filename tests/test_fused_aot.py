"""GPU readiness of the fused kernels (RMSNorm, rotary, SwiGLU, cross-entropy, fused linear +
cross-entropy), checked without a GPU.

Every kernel each launcher can pick, in every block configuration its heuristics choose for
realistic sizes (each module's ``aot_specs(arch)``), is compiled ahead of time for sm_80 (A100)
and sm_90 (H100) by ``llama_mini.kernels.aot``. From each cubin: no register spills and shared memory
within the target's limit; and the fused linear + cross-entropy's matrix products run on the
tensor cores (HMMA on sm_80, Hopper's warpgroup HGMMA on sm_90).
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

MODULES = ("rms_norm", "rotary", "swiglu", "cross_entropy", "linear_cross_entropy")
ARCHS = (80, 90)


def _specs(arch: int) -> list:
    specs = []
    for name in MODULES:
        specs += importlib.import_module(f"llama_mini.kernels.{name}").aot_specs(arch)
    return specs


@pytest.fixture(scope="module")
def reports() -> dict:
    """(arch, module) -> [(spec, report)] from one parallel batch of compiles."""
    from llama_mini.kernels import aot

    results = aot.check(_specs, archs=ARCHS)  # arch-major, in spec order
    specs = [(arch, s) for arch in ARCHS for s in _specs(arch)]
    assert len(results) == len(specs)
    out: dict = {}
    for (arch, spec), report in zip(specs, results):
        assert report.arch == arch and report.label == spec.label
        out.setdefault((arch, spec.module.rsplit(".", 1)[-1]), []).append((spec, report))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", MODULES)
def test_every_kernel_compiles_without_spills_within_shared_memory(reports, module, arch):
    mine = reports.get((arch, module), [])
    assert mine, f"llama_mini.kernels.{module}.aot_specs({arch}) compiled nothing"
    from llama_mini.kernels.aot import describe_toolchain

    bad = [f"{s.kernel} {r.label}: {'; '.join(r.problems())}" for s, r in mine if r.problems()]
    assert not bad, f"with {describe_toolchain([r for _, r in mine])}:\n" + "\n".join(bad)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_linear_cross_entropy_products_use_tensor_cores(reports, arch):
    want = {80: "HMMA", 90: "HGMMA"}[arch]
    gemms = [(s, r) for s, r in reports[(arch, "linear_cross_entropy")] if s.expect_mma]
    assert gemms, "no matrix-product kernel among the fused linear + cross-entropy specs"
    missing = [r.label for s, r in gemms if r.mma.get(want, 0) == 0]
    assert not missing, f"sm_{arch}: no {want} in {missing}"
