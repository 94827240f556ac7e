"""Ahead-of-time compile checks: is a Triton kernel fit for a GPU, judged on a machine without one?

``triton.compile`` lowers a ``@triton.jit`` kernel for any CUDA target without a device
(``GPUTarget("cuda", 90, 32)`` is an H100, ``("cuda", 80, 32)`` an A100), and the triton wheel
ships NVIDIA's ``cuobjdump``. From the cubin we read, per kernel and configuration:

* registers, stack and local memory (``cuobjdump --dump-resource-usage``): any stack or local
  memory means register spills, which cost a round trip to memory inside the hot loop;
* shared memory: Triton's dynamic allocation plus the static amount, against the target's
  per-block limit (:data:`SHARED_LIMIT`), since a config over it fails to launch;
* the matrix instructions in the SASS (``cuobjdump --dump-sass``): Hopper's warpgroup
  ``HGMMA`` on sm_90, Ampere's ``HMMA`` on sm_80. A kernel whose ``tl.dot`` fell back to FMA
  would run an order of magnitude below the tensor-core roofline.

Every kernel file lists what to check as :class:`KernelSpec` objects (its ``aot_specs(arch)``), and
its test calls :func:`check`. Compilation runs in subprocesses with ``TRITON_INTERPRET`` unset,
because under the interpreter ``@triton.jit`` returns functions that cannot be compiled, and in
parallel, because each compile takes a second or more.

Run by hand::

    llama-mini aot flash_attention [--arch 80 90] [--jobs 2]

(any kernel module of this package, by its short name or as ``llama_mini.kernels.flash_attention``)
prints the triton and ptxas versions it compiled with (spills differ between triton releases:
see :func:`toolchain`), one line per kernel, configuration and target, and a summary, and exits 1
if any has a problem. The compile workers run ``python -m llama_mini.kernels.aot --worker``
with the same interpreter, so a virtual environment with another triton checks that triton
(``bench/triton_compat.sh``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = [
    "KernelSpec", "CompileReport", "SHARED_LIMIT", "MMA_INSTRUCTION", "check", "compile_spec", "describe_toolchain",
    "signature", "tool", "toolchain",
]

# Maximum shared memory per block (opt-in), bytes: A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# The tensor-core instruction each target's matrix products should use.
MMA_INSTRUCTION = {80: "HMMA", 90: "HGMMA"}


def signature(kernel: Any, types: dict[str, str], ints: Sequence[str] = ()) -> dict[str, str]:
    """The Triton signature of ``kernel``'s parameters, in order: ``types[name]`` where given
    (``"*bf16"``, ``"fp32"``, ``"constexpr"``, ...), ``"i32"`` for the names in ``ints`` and for
    every other ``stride_*``, and ``"constexpr"`` for the rest (the block sizes and flags)."""
    import inspect

    sig = {}
    for name in inspect.signature(getattr(kernel, "fn", kernel)).parameters:
        if name in types:
            sig[name] = types[name]
        elif name in ints or name.startswith("stride_"):
            sig[name] = "i32"
        else:
            sig[name] = "constexpr"
    return sig


@dataclass(frozen=True)
class KernelSpec:
    """One kernel in one configuration, as ``triton.compile`` needs it.

    module, kernel: where the ``@triton.jit`` function lives (imported in the subprocess).
    signature: every argument name -> Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``,
        ``"constexpr"``), in the kernel's order.
    constexprs: values of the ``constexpr`` arguments.
    divisible: arguments the launcher guarantees to be multiples of 16 (pointers are 16-byte
        aligned, strides of contiguous heads are); Triton's runtime specialises on this and
        vectorises loads, so the check compiles the same way.
    expect_mma: whether the matrix products must run on tensor cores.
    """

    module: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    label: str
    divisible: tuple[str, ...] = ()
    expect_mma: bool = True

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "KernelSpec":
        d = dict(d)
        d["divisible"] = tuple(d.get("divisible", ()))
        return cls(**d)


@dataclass
class CompileReport:
    """What the cubin of one spec on one target says."""

    label: str
    arch: int
    registers: int = -1
    stack: int = -1
    local: int = -1
    shared: int = -1  # bytes: Triton's dynamic shared memory + the static amount
    shared_limit: int = 0
    mma: dict[str, int] = field(default_factory=dict)  # mnemonic -> count, e.g. {"HGMMA": 24}
    expect_mma: bool = True
    error: str | None = None
    triton: str = ""  # the triton version that compiled it
    ptxas: str = ""  # the ptxas release triton ran for this target, e.g. "12.8.93"

    def problems(self) -> list[str]:
        """Human-readable reasons this kernel is unfit for the target (empty when fit)."""
        if self.error:
            return [f"compile failed: {self.error}"]
        out = []
        if self.stack or self.local:
            out.append(f"register spills: stack {self.stack} B, local {self.local} B ({self.registers} registers)")
        if self.shared > self.shared_limit:
            out.append(f"shared memory {self.shared} B over the sm_{self.arch} limit {self.shared_limit} B")
        want = MMA_INSTRUCTION.get(self.arch)
        if self.expect_mma and want and not self.mma.get(want):
            found = ", ".join(f"{k} x{v}" for k, v in sorted(self.mma.items())) or "none"
            out.append(f"matrix products do not use {want} (tensor-core instructions found: {found})")
        return out

    def line(self) -> str:
        status = "ok" if not self.problems() else "; ".join(self.problems())
        mma = ",".join(f"{k}x{v}" for k, v in sorted(self.mma.items())) or "-"
        return (f"sm_{self.arch} {self.label:<58} regs {self.registers:>3} spill {self.stack + self.local:>4} "
                f"smem {self.shared / 1024:6.1f}/{self.shared_limit // 1024} KiB  {mma:<16} {status}")


def tool(name: str) -> str:
    """Path of a CUDA binary tool (``cuobjdump``, ``nvdisasm``, ``ptxas``) shipped in the triton wheel."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found at {path}; this triton wheel does not ship CUDA tools")
    return path


def toolchain(arch: int) -> tuple[str, str]:
    """(triton version, ptxas version) that compile for ``sm_{arch}`` in this process.

    Spills depend on both: the triton wheel lowers the kernel to PTX and runs its own bundled
    ``ptxas`` (triton 3.6 ships ptxas 12.8 for every target below sm_100; triton 3.9 ships 12.9
    for sm_80 and runs its newer ``ptxas-blackwell`` from sm_90 up). ``TRITON_PTXAS_PATH`` and
    its kin override the choice, so the version is asked of the ptxas triton would run."""
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        m = re.search(r"V(\d+(?:\.\d+)+)", get_ptxas_version(arch))
        ptxas = m.group(1) if m else "unknown"
    except Exception:  # an older or newer triton with another layout: the check still runs
        ptxas = "unknown"
    return triton.__version__, ptxas


def describe_toolchain(reports: Sequence[CompileReport]) -> str:
    """One phrase naming the triton and ptxas versions behind ``reports``, e.g. ``triton 3.6.0,
    ptxas 12.8.93 (sm_80, sm_90)``."""
    tritons = sorted({r.triton for r in reports if r.triton}) or ["unknown"]
    by_ptxas: dict[str, list[int]] = {}
    for r in reports:
        if r.ptxas and r.arch not in by_ptxas.setdefault(r.ptxas, []):
            by_ptxas[r.ptxas].append(r.arch)
    ptxas = "; ".join(f"{v} ({', '.join(f'sm_{a}' for a in sorted(archs))})" for v, archs in sorted(by_ptxas.items()))
    return f"triton {', '.join(tritons)}, ptxas {ptxas or 'unknown'}"


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_MMA = re.compile(r"\b(HGMMA|HMMA|IMMA|DMMA|UTCHMMA|UTCQMMA)\b")


def compile_spec(spec: KernelSpec, arch: int) -> CompileReport:
    """Compile ``spec`` for ``sm_{arch}`` in this process (the interpreter must be off)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    report = CompileReport(spec.label, arch, shared_limit=SHARED_LIMIT.get(arch, 48 * 1024), expect_mma=spec.expect_mma)
    report.triton, report.ptxas = toolchain(arch)
    try:
        fn = getattr(importlib.import_module(spec.module), spec.kernel)
        if not hasattr(fn, "arg_names"):
            raise TypeError(f"{spec.module}.{spec.kernel} is not a compilable @triton.jit function "
                            "(is TRITON_INTERPRET set in this process?)")
        names = list(spec.signature)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.divisible}
        src = ASTSource(fn=fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs), attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", f.name],
                                   capture_output=True, text=True, check=True).stdout
            sass = subprocess.run([tool("cuobjdump"), "--dump-sass", f.name],
                                  capture_output=True, text=True, check=True).stdout
        m = _RESOURCE.search(usage)
        if m is None:
            raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{usage}")
        report.registers, report.stack, static_shared, report.local = (int(x) for x in m.groups())
        report.shared = int(compiled.metadata.shared) + static_shared
        report.mma = dict(Counter(_MMA.findall(sass)))
    except Exception as exc:  # reported, not raised: one bad config should not hide the others
        report.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return report


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice; same as its default
    return env


def check(
    specs: Sequence[KernelSpec] | Callable[[int], Sequence[KernelSpec]],
    archs: Sequence[int] = (80, 90),
    jobs: int | None = None,
) -> list[CompileReport]:
    """Compile specs for every arch in ``jobs`` parallel subprocesses (default: one per CPU).

    ``specs`` is a list compiled for every arch, or a function arch -> list (a kernel whose
    autotune candidates differ per architecture). Reports come back in arch-major, spec order.
    """
    work = [(i, spec, arch) for arch in archs
            for i, spec in enumerate(specs(arch) if callable(specs) else specs)]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    chunks = [work[j::jobs] for j in range(jobs)]
    procs = []
    for chunk in chunks:
        payload = json.dumps([{"spec": s.to_json(), "arch": a, "index": i} for i, s, a in chunk])
        p = subprocess.Popen([sys.executable, "-m", f"{__package__}.aot", "--worker"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_worker_env())
        procs.append((p, payload))
    results: list[tuple[int, int, CompileReport]] = []
    for p, payload in procs:
        out, err = p.communicate(payload)
        if p.returncode != 0:
            raise RuntimeError(f"AOT compile worker failed (exit {p.returncode}):\n{err[-4000:]}")
        for r in json.loads(out):
            results.append((r.pop("index"), r["arch"], CompileReport(**r)))
    order = {a: n for n, a in enumerate(archs)}
    return [r for _, _, r in sorted(results, key=lambda t: (order[t[1]], t[0]))]


def _worker() -> None:
    items = json.loads(sys.stdin.read())
    out = []
    for item in items:
        report = compile_spec(KernelSpec.from_json(item["spec"]), item["arch"])
        out.append({**dataclasses.asdict(report), "index": item["index"]})
    json.dump(out, sys.stdout)


def build_parser(prog: str = "llama-mini aot") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("module", nargs="?",
                        help="a kernel module with aot_specs(): flash_attention, rms_norm, rotary, swiglu, "
                             "cross_entropy, linear_cross_entropy (or its full name, llama_mini.kernels.NAME)")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def _kernel_module(name: str):
    """The kernel module ``name`` (short, ``flash_attention``, or full) with an ``aot_specs``."""
    package = __package__  # this package, whatever it is installed as (llama_mini.kernels)
    full = name if "." in name else f"{package}.{name}"
    try:
        module = importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name != full:
            raise
        raise ValueError(f"no kernel module {name!r} (looked for {full})") from None
    if not hasattr(module, "aot_specs"):
        raise ValueError(f"{full} has no aot_specs(): not a kernel module with compile checks")
    return module


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Compile and print the reports; exit status 1 if any configuration has a problem."""
    if args.worker:
        _worker()
        return 0
    if not args.module:
        parser.error("name a kernel module, e.g. flash_attention")
    reports = check(_kernel_module(args.module).aot_specs, args.arch, args.jobs)
    print(f"# {describe_toolchain(reports)}")
    for r in reports:
        print(r.line())
    bad = [r for r in reports if r.problems()]
    print(f"{len(reports) - len(bad)}/{len(reports)} fit; {len(bad)} with problems ({describe_toolchain(reports)})")
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checker on ``argv`` with plain argparse (the ``llama-mini aot`` command wraps the
    same parser and ``run`` with one-line errors)."""
    parser = build_parser("python -m llama_mini.kernels.aot")
    return run(parser.parse_args(argv), parser)


if __name__ == "__main__":
    raise SystemExit(main())
