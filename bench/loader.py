"""Data-loader throughput on one CPU core: zstd and SentencePiece limits, the Pile reader, the
tokenized stream and every sequence-length policy, on the same documents of one shard.

    python bench/loader.py                                   # first train shard of the built-in data
    python bench/loader.py --policies pad,impute,best-fit --repeats 5
    python bench/loader.py --shard pile/00.jsonl.zst --tokenizer tokenizer.model --max-docs 20000
    python bench/loader.py --profile                         # + cProfile hot spots of every MISS

Defaults: the first shard (in ``expand_sources`` order) of the built-in default data's train split
and its tokenizer (``llama_mini.data.builtin.ensure_default_data()``, built on first use, about ten seconds),
max_len 512, informed tolerance 128, 3 timed runs per stage.

One core. The process pins itself to one core (``os.sched_setaffinity(0, {--core})``, default the
last core it may run on) and sets ``torch.set_num_threads(1)``; the metadata records both, plus
how busy other processes kept that core just before and after (``/proc/stat``). Every stage is
single-threaded Python anyway, but on a shared machine a pinned process cannot be helped (or
hidden) by the second core, and another process on the same core shows up in ``core_busy``.

Every row processes the same N documents: the first N documents (``--max-docs``, default all) of
the shard, read once before timing to count them, keep their texts and their decompressed bytes.
Rows (stages):

limit: zstd            ``zstandard.ZstdDecompressor().stream_reader(file)`` read in 1 MiB chunks up
                       to the decompressed bytes of those N documents' lines (the whole shard
                       without --max-docs). No line splitting, no JSON: decompression alone.
limit: sentencepiece   ``tokenizer.encode(text)`` for each of the N texts, held in memory.
reader                 ``PileReader(shard, max_documents=N)`` iterated to the end: decompression,
                       line splitting, UTF-8 and JSON decoding, checks.
reader+tokenizer       ``StreamingTokenizedDataset(PileReader(...), tokenizer)`` iterated: the
                       above plus encode and the BOS/EOS example (``input_ids``/``target_ids``).
+<policy>              ``build_policy(name, max_len=..., pad_id=tokenizer.pad_id)`` (``tolerance``
                       for informed; no max_len for the naive ones, which take the shortest
                       document and materialise their input) applied to that stream, every
                       sequence consumed (``for seq in policy(examples)``).

Each stage builds its reader/dataset/policy inside the timed call (construction is microseconds;
the tokenizer is loaded once, outside). Time per stage t: the median (min also shown) of
``--repeats`` wall-clock runs (``time.perf_counter``), after ``--warmup`` untimed rounds; the pass
that counts the documents warms the page cache and the imports first. The runs are interleaved:
round 1 runs every stage once, then round 2, and so on, so a burst of another process slows one
run of several stages rather than every run of one stage. Each run's process CPU time
(``time.process_time``) is recorded too: it does not grow while another process has the core.
Figures per row, all from the median wall time t:

docs/s          N / t.
decomp MB/s     decompressed shard bytes of those N documents' lines / t (MB = 1e6 bytes); rows
                that decompress (limit: zstd, reader and everything after it).
text MB/s       UTF-8 bytes of the N texts / t; rows that deliver or encode texts.
tokens/s        SentencePiece tokens of the N texts (no BOS/EOS) / t; rows that tokenize.
seq/s           training sequences the policy emitted / t.
% of limit      this row's docs/s as a percentage of the slower limit's docs/s:
                100 * (N / t) / min(N / t_zstd, N / t_sentencepiece) = 100 * max(t_zstd, t_sp) / t.
                Both limits handle the same N documents, so the slower limit is the one with the
                longer time; it is 100% by definition, and the faster limit shows how much faster
                it is. The pipeline does both limits' work one after the other on one core, so
                100% is the ceiling only when the faster limit costs next to nothing.
overhead        policy rows: 100 * (t_policy - t_reader+tokenizer) / t_reader+tokenizer.
cpu ovh         the same from the median CPU times: a cross-check on a shared machine.
alone           policy rows: the same policy fed the N examples already tokenized and held in
                memory (median of the same number of runs), as a percentage of t_reader+tokenizer:
                the policy's own cost, measured without the tokenizer's noise. overhead ~ alone.

Targets (from the data-pipeline issue), printed PASS/MISS from the median wall times:
reader+tokenizer at least 85% of the slower limit; each policy at most 5% overhead over
reader+tokenizer. The overhead is a small difference of two long, noisy times (on a shared VM,
runs of one stage vary by 10-20%), so each policy is also judged by its ``alone`` figure against
the same 5% (``alone_result``): it measures the policy's own work directly, in runs ~20x
shorter, so its error is a fraction of a point where the difference's is several points.
``--profile`` runs every stage that misses either way once more under cProfile (a policy also
alone, on the pre-tokenized examples, which shows its own cost without the tokenizer's) and
prints (and saves) the functions with the most own time; cProfile's per-call cost inflates small
Python functions, so read it for where the time goes, not for the amounts.

Output (``--out``, default ``bench/results/loader/``, created if missing): ``<name>.json``
(metadata: CPU, pinning, library versions, date, shard and tokenizer, the full config; one
record per stage with the policy's counts, and profile hot spots where taken), ``<name>.csv``
(the same records without the nested fields; metadata as leading ``# `` lines, read it with
``pandas.read_csv(path, comment="#")``), ``<name>.png`` (time per stage and policy overheads;
needs matplotlib, skipped with a note if it is missing) and, with ``--profile``,
``<name>_profile_<stage>.txt``. A progress line per run goes to stderr, the table to stdout.
Exits 1 if a stage failed (recorded, the others still run); a MISS does not change the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import os
import pstats
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]  # for short profile paths

# ``python bench/loader.py`` puts bench/ first on sys.path, so this is bench/common.py.
from common import (
    HelpFormatter, cpu_busy, environment, fmt, format_table, load_avg_1m, pyplot, result_paths,
    results_dir, utc_now_iso, utc_stamp, versions, write_csv, write_json,
)

from llama_mini import data
from llama_mini.data.policies import POLICIES, build_policy
from llama_mini.data.reader import PileReader
from llama_mini.data.sources import expand_sources, is_url
from llama_mini.data.tokenized import StreamingTokenizedDataset
from llama_mini.data.tokenizer import Tokenizer

DEFAULT_OUT = results_dir("loader")
# The order of the policy table in llama_mini.data.policies, then the packing policies; others follow sorted.
POLICY_ORDER = ["pad", "discard", "impute", "pad+discard", "pad+impute", "informed", "naive-discard",
                "naive-impute", "best-fit", "packed-docmask"]
ZSTD_CHUNK = 1 << 20
MB = 1e6
RT = "reader+tokenizer"
TARGET_PCT_OF_LIMIT = 85.0
TARGET_POLICY_OVERHEAD = 5.0

CSV_FIELDS = [
    "stage", "kind", "policy", "docs", "decompressed_bytes", "text_bytes", "tokens", "sequences",
    "median_s", "min_s", "n_timed", "cpu_median_s", "docs_per_s", "decompressed_mb_per_s", "text_mb_per_s",
    "tokens_per_s", "sequences_per_s", "pct_of_limit", "overhead_pct", "cpu_overhead_pct", "alone_median_s",
    "alone_pct", "target", "result", "alone_result", "error",
]
CSV_META_KEYS = ("date", "device_name", "cpu_model", "pinning", "torch", "zstandard", "sentencepiece", "python",
                 "timing", "shard", "tokenizer", "config")


# ---------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/loader.py",
        description=__doc__.split("\n\n")[0],
        epilog="example: python bench/loader.py --policies pad,impute,best-fit\n"
        "Defaults in [brackets] depend on other options. The module docstring defines every figure.",
        formatter_class=HelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--shard", default=None,
                   help="one .jsonl.zst shard, path or URL (a URL is downloaded to a temporary file first, "
                   "so the network is not timed) [first train shard of the built-in default data]")
    d.add_argument("--tokenizer", default=None,
                   help="SentencePiece .model file [the built-in default data's tokenizer]")
    d.add_argument("--max-docs", type=int, default=None, help="use the first N documents of the shard [all]")
    s = p.add_argument_group("policies")
    s.add_argument("--policies", default="all",
                   help=f"comma-separated policy names, 'all' or 'none'; known: {', '.join(_policy_names())}")
    s.add_argument("--max-len", type=int, default=512, help="max_len of every policy but the naive ones")
    s.add_argument("--tolerance", type=int, default=128, help="tolerance of the informed policy")
    t = p.add_argument_group("timing")
    t.add_argument("--repeats", type=int, default=3, help="timed runs per stage (median and min reported)")
    t.add_argument("--warmup", type=int, default=0, help="untimed runs per stage before the timed ones")
    t.add_argument("--core", type=int, default=None,
                   help="CPU core to pin the process to [the last core of the current affinity mask]")
    t.add_argument("--no-alone", action="store_true",
                   help="skip the policy-alone runs (policy fed pre-tokenized examples from memory)")
    t.add_argument("--profile", action="store_true",
                   help="run every stage that misses its target once more under cProfile and report hot spots")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory [bench/results/loader/]")
    o.add_argument("--name", default=None, help="file stem of the outputs [loader_<shard>_<UTC time>]")
    o.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.max_docs is not None and args.max_docs < 1:
        p.error("--max-docs must be >= 1")
    if args.max_len < 1 or args.tolerance < 1:
        p.error("--max-len and --tolerance must be >= 1")
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    if names == ["all"]:
        names = _policy_names()
    elif names == ["none"]:
        names = []
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        p.error(f"unknown policy {unknown[0]!r}; known: {', '.join(_policy_names())}")
    args.policy_names = names
    return args


def _policy_names() -> list[str]:
    return [n for n in POLICY_ORDER if n in POLICIES] + sorted(n for n in POLICIES if n not in POLICY_ORDER)


# ---------------------------------------------------------------------------- one core
def _core_stat(core: int) -> tuple[int, int] | None:
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            for line in f:
                if line.startswith(f"cpu{core} "):
                    vals = [int(v) for v in line.split()[1:]]
                    return sum(vals), vals[3] + (vals[4] if len(vals) > 4 else 0)
    except (OSError, ValueError, IndexError):
        pass
    return None


def core_busy(core: int | None, seconds: float = 0.3) -> float | None:
    """Fraction of ``core`` that other processes kept busy while this one slept (Linux)."""
    if core is None:
        return None
    a = _core_stat(core)
    time.sleep(seconds)
    b = _core_stat(core)
    if a is None or b is None:
        return None
    return round(1 - (b[1] - a[1]) / max(b[0] - a[0], 1), 3)


def pin_to_one_core(core: int | None) -> dict[str, Any]:
    """Pin this process to one core and torch to one thread; return what was done, for the metadata."""
    torch.set_num_threads(1)
    info: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "core": None}
    if not hasattr(os, "sched_setaffinity"):
        info["note"] = "not pinned: os.sched_setaffinity is not available on this platform"
        return info
    allowed = sorted(os.sched_getaffinity(0))
    if core is None:
        core = allowed[-1]
    if core not in allowed:
        raise SystemExit(f"--core {core}: this process may only run on cores {allowed}")
    os.sched_setaffinity(0, {core})
    info.update(core=core, affinity_before=allowed, affinity_after=sorted(os.sched_getaffinity(0)),
                how=f"os.sched_setaffinity(0, {{{core}}}); torch.set_num_threads(1)")
    return info


# ---------------------------------------------------------------------------- inputs
def resolve_inputs(args: argparse.Namespace, stack: contextlib.ExitStack) -> dict[str, Any]:
    """Local shard path and tokenizer path, plus where they came from."""
    src: dict[str, Any] = {}
    dd = None
    if args.shard is None or args.tokenizer is None:
        from llama_mini.data.builtin import ensure_default_data

        print("loader bench: default data (built on first use)", file=sys.stderr, flush=True)
        dd = ensure_default_data(progress=True)
    if args.shard is None:
        shard = expand_sources(dd.train)[0]
        src["shard_source"] = f"built-in default data, first train shard ({dd.root})"
    elif is_url(args.shard):
        from llama_mini.data.http import open_url

        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="loader-bench-"))
        name = re.sub(r"[^A-Za-z0-9._-]", "_", args.shard.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])
        shard = os.path.join(tmp, name or "shard.jsonl.zst")
        print(f"loader bench: downloading {args.shard} (not timed)", file=sys.stderr, flush=True)
        with open_url(args.shard) as r, open(shard, "wb") as f:
            while chunk := r.read(ZSTD_CHUNK):
                f.write(chunk)
        src["shard_source"] = f"{args.shard}, downloaded to a temporary file before timing"
    else:
        (shard,) = expand_sources(args.shard)  # one shard: a file, or a glob/dir matching exactly one
        src["shard_source"] = "--shard"
    if not shard.lower().endswith((".zst", ".zstd")):
        raise SystemExit(f"--shard {shard}: the zstd limit needs a .jsonl.zst shard")
    tok = args.tokenizer if args.tokenizer is not None else dd.tokenizer
    src["tokenizer_source"] = "--tokenizer" if args.tokenizer is not None else "built-in default data"
    return {"shard": os.path.abspath(shard), "tokenizer": os.path.abspath(tok), **src}


def load_reference(shard: str, tokenizer: Tokenizer, max_docs: int | None) -> dict[str, Any]:
    """One untimed pass: the N texts, their decompressed bytes, text bytes and token count."""
    reader = PileReader(shard, max_documents=max_docs)
    texts = list(reader)
    if not texts:
        raise SystemExit(f"{shard}: no documents")
    return {
        "texts": texts,
        "docs": len(texts),
        "decompressed_bytes": reader.counts.bytes_decompressed,
        "lines": reader.counts.lines,
        "skipped": dict(reader.counts.skipped),
        "text_bytes": sum(len(t.encode("utf-8")) for t in texts),
        "tokens": sum(len(tokenizer.encode(t)) for t in texts),
        "compressed_bytes": os.path.getsize(shard),
    }


# ---------------------------------------------------------------------------- stages
class Stage:
    """A named zero-argument run that returns its counts, and which figures apply to it."""

    def __init__(self, name: str, kind: str, fn: Callable[[], dict[str, Any]], policy: str | None = None,
                 decompresses: bool = True, texts: bool = True, tokens: bool = True,
                 alone: Callable[[], int] | None = None) -> None:
        self.name, self.kind, self.fn, self.policy = name, kind, fn, policy
        self.decompresses, self.texts, self.tokens = decompresses, texts, tokens
        self.alone = alone  # policy rows: the policy on pre-tokenized examples in memory


def policy_kwargs(name: str, args: argparse.Namespace, pad_id: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"pad_id": pad_id}
    if POLICIES[name].max_len_rule != "forbidden":
        kw["max_len"] = args.max_len
    if name == "informed":
        kw["tolerance"] = args.tolerance
    return kw


def make_stages(args: argparse.Namespace, shard: str, tok: Tokenizer, ref: dict[str, Any]) -> list[Stage]:
    texts, n, nbytes = ref["texts"], ref["docs"], ref["decompressed_bytes"]
    examples = list(StreamingTokenizedDataset(texts, tok)) if args.policy_names and not args.no_alone else None
    max_docs = args.max_docs

    def zstd_limit() -> dict[str, int]:
        import zstandard

        left = nbytes
        with open(shard, "rb") as f:
            r = zstandard.ZstdDecompressor().stream_reader(f)
            while left > 0:
                chunk = r.read(min(ZSTD_CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
        if left:
            raise RuntimeError(f"zstd stream ended {left} bytes before the reader's byte count")
        return {"docs": n, "decompressed_bytes": nbytes}

    def sp_limit() -> dict[str, int]:
        encode = tok.encode
        tokens = 0
        for t in texts:
            tokens += len(encode(t))
        return {"docs": len(texts), "tokens": tokens}

    def reader() -> dict[str, int]:
        rd = PileReader(shard, max_documents=max_docs)
        docs = 0
        for _ in rd:
            docs += 1
        return {"docs": docs, "decompressed_bytes": rd.counts.bytes_decompressed}

    def stream() -> tuple[PileReader, StreamingTokenizedDataset]:
        rd = PileReader(shard, max_documents=max_docs)
        return rd, StreamingTokenizedDataset(rd, tok)

    def reader_tokenizer() -> dict[str, int]:
        rd, ds = stream()
        for _ in ds:
            pass
        return {"docs": ds.counts["documents"], "decompressed_bytes": rd.counts.bytes_decompressed,
                "tokens": ds.counts["tokens"] - ds.counts["documents"]}

    def with_policy(name: str) -> Callable[[], dict[str, int]]:
        kw = policy_kwargs(name, args, tok.pad_id)

        def run() -> dict[str, int]:
            rd, ds = stream()
            policy = build_policy(name, **kw)
            seqs = 0
            for _ in policy(ds):
                seqs += 1
            return {"docs": ds.counts["documents"], "decompressed_bytes": rd.counts.bytes_decompressed,
                    "tokens": ds.counts["tokens"] - ds.counts["documents"], "sequences": seqs,
                    "policy_counts": policy.counts.as_dict(), "policy_max_len": policy.max_len}

        return run

    stages = [
        Stage("limit: zstd", "limit", zstd_limit, texts=False, tokens=False),
        Stage("limit: sentencepiece", "limit", sp_limit, decompresses=False),
        Stage("reader", "pipeline", reader, tokens=False),
        Stage(RT, "pipeline", reader_tokenizer),
    ]
    stages += [Stage(f"+{name}", "policy", with_policy(name), policy=name,
                     alone=policy_alone(name, args, tok.pad_id, examples) if examples is not None else None)
               for name in args.policy_names]
    return stages


def policy_alone(name: str, args: argparse.Namespace, pad_id: int, examples: list[dict]) -> Callable[[], int]:
    kw = policy_kwargs(name, args, pad_id)

    def run() -> int:
        return sum(1 for _ in build_policy(name, **kw)(examples))

    return run


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    t1, c1 = time.perf_counter(), time.process_time()
    return t1 - t0, c1 - c0, out


def measure(stages: list[Stage], warmup: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Run every stage ``warmup + repeats`` times, interleaved: round 1 runs each stage once, then
    round 2, ... A slow spell of another process then slows one run of many stages instead of
    every run of one stage, and the medians compare like with like.

    Returns per stage: ``wall`` / ``cpu`` (timed runs' seconds), ``alone`` (seconds of the
    policy-alone runs), ``counts`` (of the last run) and ``error`` (the first exception; a stage
    that fails is not run again)."""
    res = {s.name: {"wall": [], "cpu": [], "alone": [], "alone_cpu": [], "counts": {}, "error": None,
                    "alone_error": None} for s in stages}
    rounds = warmup + repeats
    for rnd in range(rounds):
        tag = f"warmup {rnd + 1}/{warmup}" if rnd < warmup else f"run {rnd - warmup + 1}/{repeats}"
        for i, stage in enumerate(stages, 1):
            m = res[stage.name]
            if m["error"]:
                continue
            print(f"[{tag}] [{i}/{len(stages)}] {stage.name} ...", end="", file=sys.stderr, flush=True)
            gc.collect()
            try:
                wall, cpu, counts = _timed(stage.fn)
            except Exception as e:  # record and go on: one broken policy must not hide the others
                print("", file=sys.stderr)
                traceback.print_exc(file=sys.stderr)
                m["error"] = f"{type(e).__name__}: {e}"
                print(f"  {stage.name}: FAILED, not run again", file=sys.stderr, flush=True)
                continue
            msg = f" {wall:.3f} s (cpu {cpu:.3f} s)"
            if rnd >= warmup:
                m["wall"].append(wall)
                m["cpu"].append(cpu)
                m["counts"] = counts
            if stage.alone is not None and not m["alone_error"]:
                gc.collect()
                try:
                    a_wall, a_cpu, _ = _timed(stage.alone)
                    msg += f"; alone {a_wall:.3f} s"
                    if rnd >= warmup:
                        m["alone"].append(a_wall)
                        m["alone_cpu"].append(a_cpu)
                except Exception as e:
                    m["alone_error"] = f"{type(e).__name__}: {e}"
                    msg += f"; alone FAILED {m['alone_error']}"
            print(msg, file=sys.stderr, flush=True)
    return res


def make_row(stage: Stage, ref: dict[str, Any], m: dict[str, Any]) -> dict[str, Any]:
    if m["error"]:
        row = {k: None for k in CSV_FIELDS}
        row.update(stage=stage.name, kind=stage.kind, policy=stage.policy, docs=ref["docs"], error=m["error"])
        return row
    times, counts = m["wall"], m["counts"]
    t = statistics.median(times)
    if counts.get("docs") != ref["docs"]:
        raise RuntimeError(f"{stage.name}: processed {counts.get('docs')} documents, the reference pass {ref['docs']}")
    dec = counts.get("decompressed_bytes") if stage.decompresses else None
    text = ref["text_bytes"] if stage.texts else None
    tokens = counts.get("tokens") if stage.tokens else None
    seqs = counts.get("sequences")
    return {
        "stage": stage.name, "kind": stage.kind, "policy": stage.policy,
        "docs": ref["docs"], "decompressed_bytes": dec, "text_bytes": text, "tokens": tokens, "sequences": seqs,
        "median_s": t, "min_s": min(times), "n_timed": len(times), "times_s": times,
        "cpu_median_s": statistics.median(m["cpu"]), "cpu_times_s": m["cpu"],
        "docs_per_s": ref["docs"] / t,
        "decompressed_mb_per_s": dec / MB / t if dec is not None else None,
        "text_mb_per_s": text / MB / t if text is not None else None,
        "tokens_per_s": tokens / t if tokens is not None else None,
        "sequences_per_s": seqs / t if seqs is not None else None,
        "policy_max_len": counts.get("policy_max_len"),
        "policy_counts": counts.get("policy_counts"),
        "pct_of_limit": None, "overhead_pct": None, "cpu_overhead_pct": None,
        "alone_median_s": statistics.median(m["alone"]) if m["alone"] else None, "alone_times_s": m["alone"],
        "alone_error": m["alone_error"], "alone_pct": None, "alone_result": None,
        "target": None, "result": None, "error": None,
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """% of the slower limit for every row; overhead and targets where they apply."""
    ok = {r["stage"]: r for r in rows if not r.get("error")}
    limits = [ok.get("limit: zstd"), ok.get("limit: sentencepiece")]
    slower = max(r["median_s"] for r in limits) if all(limits) else None
    rt = ok.get(RT)
    for r in rows:
        if r.get("error"):
            continue
        if slower is not None:
            r["pct_of_limit"] = 100 * slower / r["median_s"]
        if r["stage"] == RT and r["pct_of_limit"] is not None:
            r["target"] = f">= {TARGET_PCT_OF_LIMIT:g}% of limit"
            r["result"] = "PASS" if r["pct_of_limit"] >= TARGET_PCT_OF_LIMIT else "MISS"
        if r["kind"] == "policy" and rt is not None:
            r["overhead_pct"] = 100 * (r["median_s"] - rt["median_s"]) / rt["median_s"]
            r["cpu_overhead_pct"] = 100 * (r["cpu_median_s"] - rt["cpu_median_s"]) / rt["cpu_median_s"]
            r["target"] = f"<= {TARGET_POLICY_OVERHEAD:g}% overhead"
            r["result"] = "PASS" if r["overhead_pct"] <= TARGET_POLICY_OVERHEAD else "MISS"
            if r["alone_median_s"] is not None:
                r["alone_pct"] = 100 * r["alone_median_s"] / rt["median_s"]
                r["alone_result"] = "PASS" if r["alone_pct"] <= TARGET_POLICY_OVERHEAD else "MISS"


# ---------------------------------------------------------------------------- profiling
def profile_call(fn: Callable[[], Any], top: int = 20) -> tuple[str, list[dict[str, Any]]]:
    """One call of ``fn`` under cProfile: (pstats text sorted by own time, top entries)."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    total = stats.total_tt or 1e-12
    entries = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = func if file == "~" else f"{_short(file)}:{line}({func})"
        entries.append({"function": where, "tottime_s": tt, "cumtime_s": ct, "calls": nc, "tottime_frac": tt / total})
    entries.sort(key=lambda e: -e["tottime_s"])
    return buf.getvalue(), entries[:top]


def _short(path: str) -> str:
    p = Path(path)
    with contextlib.suppress(ValueError):
        return str(p.resolve().relative_to(ROOT))
    return p.name


# ---------------------------------------------------------------------------- reporting
def table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("stage", "stage", ""), ("median s", "median_s", ".3f"), ("min s", "min_s", ".3f"),
        ("docs/s", "docs_per_s", ",.0f"), ("decomp MB/s", "decompressed_mb_per_s", ",.2f"),
        ("text MB/s", "text_mb_per_s", ",.2f"), ("tokens/s", "tokens_per_s", ",.0f"),
        ("seq/s", "sequences_per_s", ",.0f"), ("% of limit", "pct_of_limit", ",.1f"),
        ("overhead %", "overhead_pct", "+.1f"), ("cpu ovh %", "cpu_overhead_pct", "+.1f"),
        ("alone %", "alone_pct", ".1f"),
    ]
    body, notes = [], []
    for r in rows:
        if r.get("error"):
            body.append([r["stage"], "FAILED"] + ["-"] * (len(cols) - 1))
            notes.append(f"{r['stage']}: {r['error']}")
            continue
        cells = [fmt(r.get(k), s) for _, k, s in cols]
        cells.append(f"{r['result']} ({r['target']})" if r.get("result") else "")
        cells.append(r.get("alone_result") or "")
        body.append(cells)
    return format_table([h for h, _, _ in cols] + ["target (median wall times)", "alone <= 5%"], body, n_left=1,
                        notes=notes)


def noise_note(rows: list[dict[str, Any]]) -> str | None:
    """A warning when the runs are too noisy for the 5% overhead target: the spread of the
    reader+tokenizer runs, and policies that came out faster than the stream they consume."""
    rt = next((r for r in rows if r["stage"] == RT and not r.get("error")), None)
    if rt is None:
        return None
    spread = 100 * (max(rt["times_s"]) - min(rt["times_s"])) / rt["median_s"]
    faster = [r["stage"] for r in rows if r.get("overhead_pct") is not None and r["overhead_pct"] < -2]
    if spread <= TARGET_POLICY_OVERHEAD and not faster:
        return None
    msg = (f"noise: the {rt['n_timed']} {RT} runs spread over {spread:.0f}% of their median "
           f"({', '.join(f'{t:.3f}' for t in rt['times_s'])} s)")
    if faster:
        msg += (f", and {', '.join(faster)} came out faster than {RT} although a policy only adds work: "
                "end-to-end overheads this close to 5% are within the noise; trust 'alone %', or use more --repeats")
    return msg


def plot(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    good = [r for r in rows if not r.get("error")]
    if not good:
        return False
    pol = [r for r in good if r["kind"] == "policy" and r.get("overhead_pct") is not None]
    kind_color = {"limit": "C7", "pipeline": "C0", "policy": "C1"}
    fig, axes = plt.subplots(1, 2 if pol else 1, figsize=(13 if pol else 7, 0.38 * len(good) + 1.8), squeeze=False)
    ax = axes[0][0]
    y = range(len(good))
    ax.barh(y, [r["median_s"] for r in good], color=[kind_color[r["kind"]] for r in good],
            edgecolor="black", linewidth=0.5)
    ax.set_yticks(list(y), [r["stage"] for r in good], fontsize=9)
    ax.invert_yaxis()
    limits = [r for r in good if r["kind"] == "limit"]
    if len(limits) == 2:
        slower = max(r["median_s"] for r in limits)
        ax.axvline(slower, color="black", ls="--", lw=1, label=f"slower limit ({slower:.3g} s)")
        ax.axvline(slower / (TARGET_PCT_OF_LIMIT / 100), color="C3", ls=":", lw=1.2,
                   label=f"{TARGET_PCT_OF_LIMIT:g}% of limit (target for {RT})")
        ax.legend(fontsize=8, loc="upper right")
    for i, r in enumerate(good):
        note = f"{r['docs_per_s']:,.0f} docs/s"
        if r.get("pct_of_limit") is not None and r["kind"] != "limit":
            note += f", {r['pct_of_limit']:.0f}%"
        ax.annotate(note, (r["median_s"], i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    ax.set_xlim(0, max(r["median_s"] for r in good) * 1.35)
    ax.set_xlabel("median seconds per pass over the documents (lower is better)")
    ax.set_title("time per stage (same documents in every row)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    if pol:
        ax2 = axes[0][1]
        yy = range(len(pol))
        ax2.barh(yy, [r["overhead_pct"] for r in pol], edgecolor="black", linewidth=0.5,
                 color=["C2" if r["result"] == "PASS" else "C3" for r in pol], label="end to end")
        alone = [r.get("alone_pct") for r in pol]
        if any(a is not None for a in alone):
            ax2.scatter([a if a is not None else float("nan") for a in alone], list(yy), marker="D", color="black",
                        s=14, zorder=3, label="policy alone (pre-tokenized)")
        ax2.axvline(TARGET_POLICY_OVERHEAD, color="C3", ls=":", lw=1.2, label=f"target {TARGET_POLICY_OVERHEAD:g}%")
        ax2.axvline(0, color="black", lw=0.8)
        ax2.set_yticks(list(yy), [r["stage"] for r in pol], fontsize=9)
        ax2.invert_yaxis()
        for i, r in enumerate(pol):
            ax2.annotate(f"{r['overhead_pct']:+.1f}% {r['result']}", (max(r["overhead_pct"], 0), i), xytext=(3, 0),
                         textcoords="offset points", va="center", fontsize=7)
        hi = max([r["overhead_pct"] for r in pol] + [a for a in alone if a is not None] + [TARGET_POLICY_OVERHEAD])
        lo = min([r["overhead_pct"] for r in pol] + [0])
        ax2.set_xlim(lo - 2, hi * 1.3 + 2)
        ax2.set_xlabel(f"time over {RT} (%, lower is better)")
        ax2.set_title(f"policy overhead (max_len {meta['config']['max_len']})", fontsize=10)
        ax2.legend(fontsize=8, loc="best")
        ax2.grid(axis="x", alpha=0.3)
        ax2.set_axisbelow(True)
    fig.suptitle(f"llama-mini data loader, 1 core of {meta['device_name']}: {meta['docs']} docs of "
                 f"{Path(meta['shard']).name}, {meta['text_bytes'] / MB:.2f} MB text", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _lib_version(name: str) -> str | None:
    try:
        mod = __import__(name)
    except Exception:
        return None
    return getattr(mod, "__version__", "unknown")


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pinning = pin_to_one_core(args.core)
    args.out.mkdir(parents=True, exist_ok=True)  # now, so an unwritable --out fails before the timing
    with contextlib.ExitStack() as stack:
        inputs = resolve_inputs(args, stack)
        return run(args, pinning, inputs)


def run(args: argparse.Namespace, pinning: dict[str, Any], inputs: dict[str, Any]) -> int:
    device = torch.device("cpu")
    shard, tok_path = inputs["shard"], inputs["tokenizer"]
    tok = Tokenizer(tok_path)
    print(f"loader bench: reading {shard} once (untimed) to count documents", file=sys.stderr, flush=True)
    ref = load_reference(shard, tok, args.max_docs)
    env = environment(device)
    pinning["core_busy_by_others_at_start"] = core_busy(pinning.get("core"))
    if (pinning["core_busy_by_others_at_start"] or 0) > 0.1:
        print(f"warning: other processes keep {pinning['core_busy_by_others_at_start']:.0%} of core "
              f"{pinning['core']} busy; timings will be slower and noisier (try another --core)",
              file=sys.stderr)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "policies", "policy_names")}
    config.update(out=str(args.out), policies=args.policy_names)
    meta: dict[str, Any] = {
        "script": "bench/loader.py",
        "date": utc_now_iso(),
        **env,
        "pinning": pinning,
        **versions(),  # torch, triton, python
        "zstandard": _lib_version("zstandard"),
        "sentencepiece": _lib_version("sentencepiece"),
        "data_package": os.path.dirname(data.__file__),
        "timing": {"method": "wall (time.perf_counter); process CPU time (time.process_time) recorded beside it",
                   "statistic": "median and min of per-run seconds",
                   "runs": f"{args.warmup} warmup + {args.repeats} timed rounds, each running every stage once "
                           "(interleaved)"},
        "shard": shard,
        "tokenizer": tok_path,
        **{k: v for k, v in inputs.items() if k not in ("shard", "tokenizer")},
        "tokenizer_vocab_size": tok.vocab_size,
        "docs": ref["docs"],
        "lines": ref["lines"],
        "skipped_lines": ref["skipped"],
        "compressed_bytes": ref["compressed_bytes"],
        "decompressed_bytes": ref["decompressed_bytes"],
        "text_bytes": ref["text_bytes"],
        "tokens": ref["tokens"],
        "definitions": {
            "pct_of_limit": "100 * max(t_zstd, t_sentencepiece) / t_row: docs/s relative to the slower limit's",
            "overhead_pct": "100 * (t_policy - t_reader+tokenizer) / t_reader+tokenizer",
            "alone_pct": "100 * t_policy_on_pretokenized_examples / t_reader+tokenizer",
            "MB": "1e6 bytes",
            "tokens": "SentencePiece tokens of the texts, without BOS/EOS",
        },
        "targets": {RT: f"pct_of_limit >= {TARGET_PCT_OF_LIMIT:g}",
                    "each policy": f"overhead_pct <= {TARGET_POLICY_OVERHEAD:g}"},
        "config": config,
    }
    print(f"loader bench: {ref['docs']} docs, {ref['text_bytes'] / MB:.2f} MB text, "
          f"{ref['decompressed_bytes'] / MB:.2f} MB decompressed, {ref['tokens']:,} tokens; "
          f"core {pinning.get('core')}, {args.repeats} timed runs per stage", file=sys.stderr, flush=True)

    stages = make_stages(args, shard, tok, ref)
    t_start = time.perf_counter()
    measured = measure(stages, args.warmup, args.repeats)
    rows = [make_row(stage, ref, measured[stage.name]) for stage in stages]
    add_ratios(rows)

    profiles: dict[str, str] = {}
    if args.profile:
        by_name = {s.name: s for s in stages}
        for r in rows:
            if "MISS" not in (r.get("result"), r.get("alone_result")):
                continue
            stage = by_name[r["stage"]]
            print(f"profiling {stage.name} (one run under cProfile) ...", file=sys.stderr, flush=True)
            text, r["profile_top"] = profile_call(stage.fn)
            profiles[stage.name] = text
            if stage.alone is not None:  # where the policy's own time goes, without the tokenizer
                text, r["alone_profile_top"] = profile_call(stage.alone)
                profiles[f"{stage.name} alone"] = text
    meta.update(
        elapsed_s=round(time.perf_counter() - t_start, 2),
        load_avg_1m_at_end=load_avg_1m(),
        cpu_busy_by_others_at_end=cpu_busy(),
    )
    pinning["core_busy_by_others_at_end"] = core_busy(pinning.get("core"))

    stem = args.name or f"loader_{Path(shard).name.split('.')[0]}_{utc_stamp()}"
    json_path, csv_path, png_path = result_paths(args.out, stem)
    write_json(json_path, meta, rows)
    write_csv(csv_path, meta, rows, CSV_FIELDS, CSV_META_KEYS)
    written = [json_path, csv_path]
    for name, text in profiles.items():
        p = args.out / f"{stem}_profile_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.txt"
        p.write_text(text, encoding="utf-8")
        written.append(p)
    if not args.no_plot and plot(png_path, meta, rows):
        written.append(png_path)

    print(f"llama-mini data loader on one core (core {pinning.get('core')}, {meta['device_name']}): "
          f"{ref['docs']} docs of {shard}, {ref['text_bytes'] / MB:.2f} MB text, "
          f"{ref['decompressed_bytes'] / MB:.2f} MB decompressed, {ref['tokens']:,} tokens "
          f"(vocab {tok.vocab_size}); max_len {args.max_len}, tolerance {args.tolerance}; "
          f"median of {args.repeats} runs")
    print(table(rows))
    print(f"% of limit = docs/s / docs/s of the slower limit; overhead = policy wall time over {RT}'s; "
          "cpu ovh = the same from process CPU time (blind to other processes on the core); "
          f"alone = the policy on pre-tokenized examples, as % of {RT}'s time: the policy's own cost, "
          f"a far less noisy estimate of its overhead (the runs are ~20x shorter); 'alone <= 5%' judges it")
    for r in rows:
        for key, what, n in (("profile_top", "", 6), ("alone_profile_top", " alone (pre-tokenized examples)", 8)):
            if r.get(key):
                print(f"\nhot spots of {r['stage']}{what}, cProfile own time (share of the traced run):")
                for e in r[key][:n]:
                    print(f"  {e['tottime_frac']:6.1%}  {e['tottime_s']:7.3f} s  {e['calls']:>9,} calls  "
                          f"{e['function']}")
    noise = noise_note(rows)
    if noise:
        print(noise)
    busy = [pinning.get("core_busy_by_others_at_start"), pinning.get("core_busy_by_others_at_end")]
    if any(b is not None and b > 0.1 for b in busy):
        print(f"note: other processes kept core {pinning['core']} busy ({fmt(busy[0], '.0%')} before, "
              f"{fmt(busy[1], '.0%')} after): "
              "the numbers are slower and noisier than on an idle core")
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
