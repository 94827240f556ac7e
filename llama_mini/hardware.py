"""Device facts that the trainer and the benchmarks share: datasheet peak FLOP/s, peak memory
and a readable device name.

    from llama_mini.hardware import peak_flops, peak_memory, device_name
    flops, note = peak_flops(torch.device("cuda"), torch.bfloat16)   # (989.4e12, "...") on an H100 SXM
    rate, note = measure_matmul_flops(torch.device("cuda"), torch.bfloat16)  # what an 8192^3 matmul reaches
    peak, what = peak_memory(torch.device("cpu"))                     # (bytes, "process max RSS")

Units: ``peak_flops`` returns FLOP/s (not TFLOP/s), ``peak_memory`` returns bytes. Depends on
torch and the standard library only; never imports triton.
"""

from __future__ import annotations

import platform
import sys

import torch

__all__ = [
    "PEAK_TFLOPS", "datasheet_tflops", "peak_flops", "measure_matmul_flops", "peak_memory", "reset_peak_memory",
    "device_name",
]

# Dense (no sparsity) peak matrix TFLOP/s from NVIDIA's datasheets, by a substring of
# torch.cuda.get_device_name(). First match wins, so the more specific names come first.
# "tf32" is the float32 ceiling when torch.backends.cuda.matmul.allow_tf32 is on.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9}),
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "tf32": 378.0, "float32": 51.2}),
    ("H100", {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9}),  # SXM
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5}),
]

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def _dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` / ``"bfloat16"`` / ``"bf16"`` -> ``"bfloat16"``."""
    name = str(dtype).removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


def datasheet_tflops(name: str, dtype: torch.dtype | str) -> tuple[float | None, str]:
    """(dense peak TFLOP/s of the GPU called ``name`` for ``dtype``, where it comes from), or
    (None, why). float32 reads the tf32 column while ``torch.backends.cuda.matmul.allow_tf32``
    is on, because that is what float32 matmuls then run at."""
    dt = _dtype_name(dtype)
    key = "tf32" if dt == "float32" and torch.backends.cuda.matmul.allow_tf32 else dt
    for pattern, peaks in PEAK_TFLOPS:
        if pattern in name:
            if key not in peaks:
                return None, f"no datasheet {key} peak for '{pattern}'"
            return peaks[key], f"NVIDIA datasheet dense {key} peak for '{pattern}'"
    return None, f"{name!r} is not in the datasheet table"


def device_name(device: torch.device | str) -> str:
    """The GPU's name (``torch.cuda.get_device_name``), or the CPU model from ``/proc/cpuinfo``
    (``platform.processor()``, then ``platform.machine()`` where that file does not exist), or
    ``str(device)`` for other backends."""
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_name(idx)
    if device.type == "cpu":
        return cpu_model() or platform.processor() or platform.machine() or "cpu"
    return str(device)


def cpu_model() -> str | None:
    """The CPU model from ``/proc/cpuinfo`` (Linux), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def peak_flops(device: torch.device | str, dtype: torch.dtype | str) -> tuple[float | None, str]:
    """(dense peak FLOP/s of one ``device`` for matmuls in ``dtype``, where the figure comes from),
    or (None, why) for CPUs, other backends and GPUs not in ``PEAK_TFLOPS``.

    FLOP/s, not TFLOP/s: multiply ``PEAK_TFLOPS`` by 1e12. float32 honours
    ``torch.backends.cuda.matmul.allow_tf32`` (tf32 peak while it is on).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None, f"no datasheet peak for device type {device.type!r}"
    name = device_name(device)
    tflops, note = datasheet_tflops(name, dtype)
    return (None if tflops is None else tflops * 1e12), note


# Matrix size of the measured matmul rate: 8192^3 on a GPU (1.1 TFLOP, a few ms on an H100: large
# enough to reach the tensor cores' steady state), 512^3 on a CPU (0.27 GFLOP, a few ms on two
# cores: cheap enough for every trainer start-up).
MATMUL_N = {"cuda": 8192, "cpu": 512}


def measure_matmul_flops(device: torch.device | str, dtype: torch.dtype | str = torch.bfloat16, n: int | None = None,
                         repeats: int = 10) -> tuple[float, str]:
    """(FLOP/s of an n x n x n ``torch.matmul`` in ``dtype`` on ``device``, a note naming what ran).

    The achievable ceiling of this device and library build, as opposed to the datasheet's:
    MFU against it says how close a training step comes to what a single large matmul reaches
    here and now (clocks, power limit and cuBLAS included). 2 n^3 FLOPs per call; the median of
    ``repeats`` calls after three warm-up calls, timed with CUDA events on a GPU and the wall
    clock elsewhere. ``n`` defaults to ``MATMUL_N`` (8192 on CUDA, 512 on CPU). float32 honours
    ``torch.backends.cuda.matmul.allow_tf32`` as every float32 matmul does.
    """
    import statistics
    import time

    device = torch.device(device)
    dtype = getattr(torch, _dtype_name(dtype)) if isinstance(dtype, str) else dtype
    n = n or MATMUL_N.get(device.type, MATMUL_N["cpu"])
    if n < 1 or repeats < 1:
        raise ValueError(f"measure_matmul_flops: n and repeats must be positive, got n={n}, repeats={repeats}")
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)  # (n, n)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)  # (n, n)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        how = "CUDA events"
    else:
        # Other accelerators queue work like CUDA does: wait for each call, or the launch is timed.
        backend = getattr(torch, device.type, None)
        sync = getattr(backend, "synchronize", None) if device.type != "cpu" else None
        for _ in range(repeats):
            if sync:
                sync()
            t0 = time.perf_counter()
            torch.matmul(a, b, out=out)
            if sync:
                sync()
            times.append(time.perf_counter() - t0)
        how = "wall clock" + (f", torch.{device.type}.synchronize" if sync else "")
        if device.type == "cpu":
            how += f", {torch.get_num_threads()} threads"
    rate = 2 * n**3 / statistics.median(times)
    return rate, f"measured: {_dtype_name(dtype)} matmul {n}x{n}x{n}, median of {repeats} ({how})"


def peak_memory(device: torch.device | str) -> tuple[int | None, str]:
    """(peak memory in bytes, what that number is), or (None, why) where nothing is measured.

    CUDA: ``torch.cuda.max_memory_allocated(device)``, tensors allocated by PyTorch on that GPU
    since the last ``reset_peak_memory`` (note ``"CUDA max allocated"``).
    CPU: the whole process's peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``, which
    Linux reports in KiB and macOS in bytes), note ``"process max RSS"``. It includes the Python
    interpreter, imported libraries, data loaders' buffers and anything else the process ever
    held, and cannot be reset, so it is an upper bound on the model's own peak, never a
    measurement of it.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "CUDA max allocated"
    if device.type == "cpu":
        try:
            import resource
        except ImportError:  # Windows
            return None, "process max RSS is not available on this platform (no resource module)"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024), "process max RSS"
    return None, f"no peak-memory statistic for device type {device.type!r}"


def reset_peak_memory(device: torch.device | str) -> None:
    """Starts a new peak for ``peak_memory``: ``torch.cuda.reset_peak_memory_stats`` on CUDA.
    A no-op on CPU and other devices: the process max RSS cannot be reset."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
