"""Built-in default data: a small Pile-format corpus and tokenizer made from Python's own stdlib.

    from llama_mini.data.builtin import ensure_default_data
    dd = ensure_default_data()        # builds once (about ten seconds), reused afterwards
    dd.train, dd.val, dd.test         # directories of .jsonl.zst shards
    dd.tokenizer                      # tokenizer.model trained on the train split

    llama-mini build-data [--cache-dir DIR] [--force]       # build (if needed) and print paths

Why the standard library: ``python train.py`` with no arguments must have real text to train on,
on a fresh machine with no network. Every Python installation carries its standard library's
sources, which are real, varied text (code, comments, docstrings) of about 12 MB.

Two kinds of document, both in The Pile's format (one JSON object per line,
``{"text": ..., "meta": {"pile_set_name": ...}}``, zstandard-compressed):

- ``python-stdlib-source``: one module's source, whole;
- ``python-stdlib-docstrings``: the docstrings of one module, its classes and functions
  (``ast.get_docstring``), each under its dotted name: natural-language-ish text.

Files are walked in sorted order; skipped are ``site-packages``, test directories (``test``,
``tests``, ``idle_test``), ``__pycache__``, the machine-specific ``_sysconfigdata*``, generated
codec tables, files over 256 KiB, tiny files, files that are not UTF-8, and exact duplicates.
A module goes to train, val or test (90/5/5) by a hash of its path, so both of its documents land
in the same split and no text appears in two splits. Documents are ordered by another hash of
the path (a fixed shuffle) and dealt round-robin into shards (4 train, 2 val, 2 test), so
several readers can share a split. The result is the same on every run with the same Python.

The cache lives in ``<cache>/default-data-v{DEFAULT_DATA_VERSION}`` (see ``default_cache_dir``);
non-default settings get their own directory (``...-vocab512-train2000000``) so they never
clobber the default. A build happens in a temporary directory beside the target, under an
exclusive ``fcntl.flock`` on ``<target>.lock``, and is moved into place with one ``os.rename``;
``manifest.json`` (counts, bytes, shard names, sha256 of every file, Python version) is written
last. A cache is used only if its manifest matches the files (sha256 included: a truncated zstd
shard would otherwise read as a shorter valid one), so a killed build's leftover is never taken
for data; leftovers are deleted by the next build. Several processes (torchrun ranks) may call
``ensure_default_data`` at once: one builds, the others wait on the lock and reuse its result.

A cache built by another Python version is reused as is (the manifest records which one), so a
Python upgrade does not silently change the data an experiment trains on; ``--force`` rebuilds.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Iterator

__all__ = ["DEFAULT_DATA_VERSION", "DefaultData", "default_cache_dir", "ensure_default_data", "main"]

log = logging.getLogger(__name__)

# Bump when the corpus or its format changes: a new version gets a new directory, so an old
# cache is never read as the new one.
DEFAULT_DATA_VERSION = 1
DEFAULT_VOCAB_SIZE = 4096

SPLITS = ("train", "val", "test")
SPLIT_PERCENT = {"train": 90, "val": 5, "test": 5}
SHARDS = {"train": 4, "val": 2, "test": 2}
SOURCE_SET = "python-stdlib-source"
DOCSTRING_SET = "python-stdlib-docstrings"

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib-dynload"}
MAX_FILE_BYTES = 256 * 1024  # drops pydoc_data/topics.py (750 KB): one document that size dwarfs the rest
MIN_DOC_CHARS = 128  # tiny __init__.py files and one-line docstrings teach nothing
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
STALE_TMP_SECONDS = 24 * 3600  # a temp dir from another host is assumed dead after this long


@dataclass(frozen=True)
class DefaultData:
    """Paths of a built default corpus: split directories of shards and the tokenizer model."""

    root: str  # the cache directory holding everything below and manifest.json
    train: str  # directory of train .jsonl.zst shards
    val: str  # directory of validation shards
    test: str  # directory of test shards
    tokenizer: str  # SentencePiece tokenizer.model trained on the train split

    def split(self, name: str) -> str:
        """Directory of split ``name`` (``train``, ``val`` or ``test``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; the default data has {', '.join(SPLITS)}")
        return getattr(self, name)

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.root, MANIFEST)

    def manifest(self) -> dict:
        """The build's manifest: counts, bytes, shard names and hashes, Python version."""
        with open(self.manifest_path, encoding="utf-8") as f:
            return json.load(f)

    @classmethod
    def at(cls, root: str) -> "DefaultData":
        root = os.path.abspath(root)
        return cls(root=root, tokenizer=os.path.join(root, TOKENIZER),
                   **{s: os.path.join(root, s) for s in SPLITS})


def default_cache_dir() -> str:
    """``$LLAMA_MINI_CACHE``, else ``$XDG_CACHE_HOME/llama_mini``, else ``~/.cache/llama_mini``."""
    explicit = os.environ.get("LLAMA_MINI_CACHE")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME")
    home = os.path.expanduser("~")
    if xdg:
        base = os.path.expanduser(xdg)
    elif os.path.isabs(home):
        base = os.path.join(home, ".cache")
    else:  # no HOME and no passwd entry (containers run as an arbitrary uid): not the cwd
        base = os.path.join(tempfile.gettempdir(), f"llama_mini-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
    return os.path.abspath(os.path.join(base, "llama_mini"))


def _dir_name(vocab_size: int, max_train_bytes: int | None) -> str:
    name = f"default-data-v{DEFAULT_DATA_VERSION}"
    if vocab_size != DEFAULT_VOCAB_SIZE:
        name += f"-vocab{vocab_size}"
    if max_train_bytes is not None:
        name += f"-train{max_train_bytes}"
    return name


# ----------------------------------------------------------------------------- progress


def _say(msg: str, progress: bool) -> None:
    """Log ``msg``; when progress is on and logging would not show it, print it under the bars."""
    log.info(msg)
    if progress and not (log.isEnabledFor(logging.INFO) and log.hasHandlers()):
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)


def _bar(iterable, progress: bool, **kw):
    from tqdm import tqdm

    return tqdm(iterable, disable=not progress, file=sys.stderr, **kw)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- collecting


def _hash_int(salt: str, rel: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{rel}".encode()).digest()[:8], "big")


def _split_of(rel: str) -> str:
    """Split of the module at ``rel`` (a posix path relative to the stdlib): fixed by its name."""
    bucket = _hash_int("split", rel) % 100
    if bucket < SPLIT_PERCENT["train"]:
        return "train"
    return "val" if bucket < SPLIT_PERCENT["train"] + SPLIT_PERCENT["val"] else "test"


def _candidate_files(stdlib: str) -> list[str]:
    """Posix paths (relative to ``stdlib``) of the .py files worth reading, sorted."""
    found = []
    for directory, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-"))
        rel_dir = os.path.relpath(directory, stdlib)
        for name in sorted(files):
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue  # _sysconfigdata holds this machine's build paths: not portable text
            rel = name if rel_dir == "." else os.path.join(rel_dir, name)
            found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _read_source(path: str) -> str | None:
    """The file's text, or None if it is too big, not UTF-8, or a generated codec table."""
    try:
        if os.path.getsize(path) > MAX_FILE_BYTES:
            return None
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if "gencodec.py" in text[:2000]:  # encodings/cp*.py: 256-entry tables, no language in them
        return None
    return text.replace("\r\n", "\n").lstrip("\ufeff")


def _docstrings(tree: ast.AST, module: str) -> str:
    """The docstrings of a module and everything defined in it, each under its dotted name."""
    blocks: list[str] = []

    def visit(node: ast.AST, qualname: str) -> None:
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc and doc.strip():
            blocks.append(f"{qualname}\n{doc.strip()}")
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{qualname}.{child.name}")
            elif isinstance(child, (ast.stmt, ast.excepthandler)):
                # defs under if/try/with blocks still belong to the enclosing scope
                for grandchild in _nested_defs(child):
                    visit(grandchild, f"{qualname}.{grandchild.name}")

    visit(tree, module)
    return "\n\n".join(blocks) + "\n" if blocks else ""


def _nested_defs(stmt: ast.AST) -> Iterator[ast.AST]:
    """Class and function definitions inside a compound statement (if, try, with, for...)."""
    for child in ast.iter_child_nodes(stmt):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield child
        elif isinstance(child, (ast.stmt, ast.excepthandler)):
            yield from _nested_defs(child)


def _module_name(rel: str) -> str:
    parts = rel[: -len(".py")].split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _module_documents(rel: str, source: str) -> list[tuple[str, str]]:
    """``(pile_set_name, text)`` pairs for one module: its source and, if rich enough, its docstrings."""
    docs = []
    if len(source.strip()) >= MIN_DOC_CHARS:
        docs.append((SOURCE_SET, source))
    with warnings.catch_warnings():  # old modules trip "invalid escape sequence" warnings
        warnings.simplefilter("ignore")
        try:
            tree = ast.parse(source, filename=rel)
        except (SyntaxError, ValueError):  # written for another Python version: keep the source
            return docs
    text = _docstrings(tree, _module_name(rel))
    if len(text.strip()) >= MIN_DOC_CHARS:
        docs.append((DOCSTRING_SET, text))
    return docs


def _collect(stdlib: str, max_train_bytes: int | None, progress: bool) -> dict[str, list[tuple[str, str]]]:
    """Documents per split, in a fixed pseudo-random order, under the byte caps."""
    files = _candidate_files(stdlib)
    if not files:
        raise RuntimeError(
            f"no standard-library sources (*.py) found under {stdlib!r}; this Python ships without "
            "them, so the built-in default data cannot be made here: pass your own data instead"
        )
    # A fixed shuffle of modules: documents of one package do not all sit together, and a byte
    # cap takes a sample across the whole library rather than its alphabetical head.
    files.sort(key=lambda rel: (_hash_int("order", rel), rel))
    caps: dict[str, int | None] = {s: None for s in SPLITS}
    if max_train_bytes is not None:
        caps = {s: max_train_bytes * SPLIT_PERCENT[s] // SPLIT_PERCENT["train"] for s in SPLITS}
    out: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    used = dict.fromkeys(SPLITS, 0)
    seen: set[bytes] = set()
    for rel in _bar(files, progress, desc="default data: collecting", unit="file"):
        split = _split_of(rel)
        cap = caps[split]
        if cap is not None and cap - used[split] < MIN_DOC_CHARS:
            continue  # this split is full; others may not be
        source = _read_source(os.path.join(stdlib, *rel.split("/")))
        if source is None:
            continue
        # A copy of a module seen before is skipped whole: the two copies could fall in two
        # splits, and its docstrings (headed by the module's own name) would differ from the
        # first copy's and slip through.
        digest = hashlib.sha256(source.encode("utf-8")).digest()
        if digest in seen:
            continue
        seen.add(digest)
        for set_name, text in _module_documents(rel, source):
            size = len(text.encode("utf-8"))
            if cap is not None and used[split] + size > cap:
                continue
            out[split].append((set_name, text))
            used[split] += size
    for split in SPLITS:
        if not out[split]:
            raise RuntimeError(
                f"the standard library under {stdlib!r} gave no {split} documents "
                f"(max_train_bytes={max_train_bytes}); too little text to build the default data"
            )
    return out


# ----------------------------------------------------------------------------- writing


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_write(path: str, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_split(directory: str, docs: list[tuple[str, str]], n_shards: int, progress: bool, desc: str) -> dict:
    """Deal ``docs`` round-robin into ``n_shards`` zstd-compressed JSON-lines shards."""
    import zstandard

    os.makedirs(directory)
    shards = []
    per_shard: list[list[tuple[str, str]]] = [docs[i::n_shards] for i in range(n_shards)]
    bar = _bar(None, progress, total=len(docs), desc=desc, unit="doc")
    with bar:
        for i, shard_docs in enumerate(per_shard):
            name = f"{i:02d}.jsonl.zst"
            path = os.path.join(directory, name)
            text_bytes = 0

            def write(f, shard_docs=shard_docs):
                nonlocal text_bytes
                # The checksum makes a corrupted frame an error for any zstd reader.
                cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
                with cctx.stream_writer(f, closefd=False) as w:
                    for set_name, text in shard_docs:
                        # ensure_ascii: lines hold no U+2028 or U+0085, which str.splitlines
                        # would take for line ends
                        line = json.dumps({"text": text, "meta": {"pile_set_name": set_name}})
                        w.write(line.encode("ascii") + b"\n")
                        text_bytes += len(text.encode("utf-8"))
                        bar.update(1)

            _fsync_write(path, write)
            shards.append({
                "name": name, "documents": len(shard_docs), "text_bytes": text_bytes,
                "compressed_bytes": os.path.getsize(path), "sha256": _sha256(path),
            })
    sets: dict[str, int] = {}
    for set_name, _ in docs:
        sets[set_name] = sets.get(set_name, 0) + 1
    return {
        "documents": len(docs),
        "text_bytes": sum(s["text_bytes"] for s in shards),
        "compressed_bytes": sum(s["compressed_bytes"] for s in shards),
        "sets": dict(sorted(sets.items())),
        "shards": shards,
    }


def _build(tmp: str, vocab_size: int, max_train_bytes: int | None, progress: bool) -> dict:
    """Write the whole corpus, tokenizer and (last) the manifest into ``tmp``."""
    from .tokenizer import train_tokenizer

    start = time.time()
    stdlib = sysconfig.get_paths()["stdlib"]
    _say(f"default data: collecting Python {platform.python_version()} stdlib sources from {stdlib}", progress)
    docs = _collect(stdlib, max_train_bytes, progress)
    splits = {}
    for split in SPLITS:
        splits[split] = _write_split(os.path.join(tmp, split), docs[split], SHARDS[split], progress,
                                     desc=f"default data: writing {split}")
    train_docs = [text for _, text in docs["train"]]
    _say(f"default data: training a {vocab_size}-piece tokenizer on {len(train_docs)} train documents "
         f"({_mb(splits['train']['text_bytes'])})", progress)
    tok = train_tokenizer(
        _bar(train_docs, progress, desc="default data: tokenizer input", unit="doc"),
        os.path.join(tmp, TOKENIZER[: -len(".model")]),
        vocab_size=vocab_size,
    )
    for name in (TOKENIZER, "tokenizer.vocab"):
        with open(os.path.join(tmp, name), "rb+") as f:
            os.fsync(f.fileno())
    manifest = {
        "format": "pile-jsonl-zst",
        "version": DEFAULT_DATA_VERSION,
        "settings": {"vocab_size": vocab_size, "max_train_bytes": max_train_bytes},
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "stdlib": stdlib,
        "splits": splits,
        "tokenizer": {"file": TOKENIZER, "vocab_size": tok.vocab_size,
                      "sha256": _sha256(os.path.join(tmp, TOKENIZER))},
        "build_seconds": round(time.time() - start, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _fsync_write(os.path.join(tmp, MANIFEST),
                 lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode("utf-8")))
    return manifest


# ----------------------------------------------------------------------------- validating


def _check(root: str, vocab_size: int, max_train_bytes: int | None, deep: bool = True) -> tuple[dict | None, str]:
    """``(manifest, "")`` if ``root`` holds a complete build with these settings, else ``(None, why)``."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        return None, "not built"
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None, "manifest.json is missing"
    except (OSError, ValueError) as e:
        return None, f"manifest.json is unreadable ({e})"
    try:
        if manifest["version"] != DEFAULT_DATA_VERSION:
            return None, f"manifest version {manifest['version']} != {DEFAULT_DATA_VERSION}"
        want = {"vocab_size": vocab_size, "max_train_bytes": max_train_bytes}
        if manifest["settings"] != want:
            return None, f"built with {manifest['settings']}, asked for {want}"
        files = [(os.path.join(s, sh["name"]), sh["sha256"]) for s in SPLITS
                 for sh in manifest["splits"][s]["shards"]]
        files.append((manifest["tokenizer"]["file"], manifest["tokenizer"]["sha256"]))
    except (KeyError, TypeError) as e:
        return None, f"manifest.json lacks an entry ({e!r})"
    for rel, digest in files:
        full = os.path.join(root, rel)
        if not os.path.isfile(full):
            return None, f"{rel} is missing"
        # sha256 of every file (a few MB, milliseconds): a truncated zstd shard reads as a
        # shorter, valid one, so sizes or a manifest alone would not catch it
        if deep and _sha256(full) != digest:
            return None, f"{rel} does not match its sha256 in the manifest"
    return manifest, ""


# ----------------------------------------------------------------------------- locking


@contextlib.contextmanager
def _locked(lock_path: str, progress: bool) -> Iterator[bool]:
    """Hold an exclusive flock on ``lock_path``; yields whether a real lock is held."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the final rename still keeps one winner
        yield False
        return
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"default data: waiting for another process building it ({lock_path})", progress)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError as e:  # a file system without flock (some NFS/FUSE mounts): rename-only, as on Windows
            log.warning("default data: cannot lock %s (%s); relying on the atomic rename alone", lock_path, e)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _tmp_prefix(name: str) -> str:
    return f".{name}.tmp+"


def _remove_stale_tmp(cache_dir: str, name: str) -> None:
    """Delete temp dirs left by builds that died; called with the lock held.

    The temp name records host and pid. On this host, a builder of the same target would hold
    the lock, so a dir whose pid is gone is dead; another host's (shared file system, where
    flock may not reach) is left alone for a day.
    """
    prefix = _tmp_prefix(name)
    host = socket.gethostname()
    for entry in os.listdir(cache_dir):
        if not entry.startswith(prefix):
            continue
        path = os.path.join(cache_dir, entry)
        parts = entry[len(prefix):].split("+")
        dead = False
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit():
            dead = not _pid_alive(int(parts[1])) or int(parts[1]) == os.getpid()
        with contextlib.suppress(OSError):
            dead = dead or time.time() - os.path.getmtime(path) > STALE_TMP_SECONDS
        if dead:
            log.info("default data: removing %s left by an interrupted build", path)
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists under another user (or cannot tell): treat as alive
    return True


# ----------------------------------------------------------------------------- entry point


def _summary(m: dict, root: str) -> str:
    parts = [f"{s} {m['splits'][s]['documents']} docs {_mb(m['splits'][s]['text_bytes'])} "
             f"({len(m['splits'][s]['shards'])} shards, {_mb(m['splits'][s]['compressed_bytes'])} zst)"
             for s in SPLITS]
    return (f"default data at {root}: " + "; ".join(parts)
            + f"; tokenizer vocab {m['tokenizer']['vocab_size']}; built in {m['build_seconds']} s")


def _install(tmp: str, target: str, manifest: dict, cache_dir: str, name: str, vocab_size: int,
             max_train_bytes: int | None, replace: bool) -> dict:
    """Move the finished build ``tmp`` to ``target``; return the manifest of what is there.

    ``replace``: an existing target is stale (we hold the lock and found it invalid, or were
    forced). Otherwise (no flock) a rival may have finished first: its valid build wins.
    """
    for _ in range(2):
        if os.path.exists(target):
            rival = None if replace else _check(target, vocab_size, max_train_bytes)[0]
            if rival is not None:
                return rival
            # move aside, then swap in with one rename: readers never see a half-written target
            trash = tempfile.mkdtemp(prefix=f"{_tmp_prefix(name)}{socket.gethostname()}+{os.getpid()}+",
                                     dir=cache_dir)
            os.rename(target, os.path.join(trash, "old"))
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, target)
            return manifest
        except OSError:
            if replace:
                raise
    raise RuntimeError(f"could not move the default data build into {target}")


def ensure_default_data(
    cache_dir: str | os.PathLike | None = None,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    progress: bool = True,
    max_train_bytes: int | None = None,
    force: bool = False,
) -> DefaultData:
    """Build the default corpus and tokenizer once under ``cache_dir``; return their paths.

    cache_dir: defaults to ``default_cache_dir()``.
    vocab_size: tokenizer pieces (an upper bound, see ``train_tokenizer``).
    progress: tqdm bars and stage messages on stderr (stage messages always go to the log).
    max_train_bytes: cap on the train split's text; val and test are capped in proportion
        (5/90 of it each). None takes every module.
    force: rebuild even if a valid build exists.

    Safe to call from several processes at once (all get the same data, one builds) and after a
    killed build (its leftovers are ignored, then removed).
    """
    if vocab_size <= 259:
        raise ValueError(f"vocab_size must exceed 259 (256 byte pieces + unk/bos/eos), got {vocab_size}")
    if max_train_bytes is not None and max_train_bytes <= 0:
        raise ValueError(f"max_train_bytes must be positive or None, got {max_train_bytes}")
    cache_dir = os.path.abspath(os.fspath(cache_dir) if cache_dir is not None else default_cache_dir())
    name = _dir_name(vocab_size, max_train_bytes)
    target = os.path.join(cache_dir, name)
    if not force:
        manifest, _ = _check(target, vocab_size, max_train_bytes)
        if manifest is not None:
            log.debug("default data: reusing %s", target)
            return DefaultData.at(target)
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the default-data cache directory {cache_dir!r} ({e}); "
                      "set LLAMA_MINI_CACHE or pass cache_dir") from None

    with _locked(os.path.join(cache_dir, name + ".lock"), progress) as have_lock:
        manifest, why = _check(target, vocab_size, max_train_bytes)
        if manifest is not None and not force:  # another process built it while we waited
            _say(_summary(manifest, target), progress)
            return DefaultData.at(target)
        if have_lock:
            _remove_stale_tmp(cache_dir, name)
        if os.path.exists(target) and not force:
            log.warning("default data: %s is not a valid build (%s); rebuilding it", target, why)
        _say(f"default data: building {target}", progress)
        tmp = tempfile.mkdtemp(prefix=f"{_tmp_prefix(name)}{socket.gethostname()}+{os.getpid()}+",
                               dir=cache_dir)
        try:
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would lock other users out of a shared cache
            manifest = _build(tmp, vocab_size, max_train_bytes, progress)
            manifest = _install(tmp, target, manifest, cache_dir, name, vocab_size, max_train_bytes,
                                replace=force or have_lock)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _say(_summary(manifest, target), progress)
    return DefaultData.at(target)


def build_parser(prog: str = "llama-mini build-data") -> argparse.ArgumentParser:
    """``llama-mini build-data``: build the default data if needed and print where it is."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help=f"cache directory (default {default_cache_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid build exists")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="tokenizer pieces")
    parser.add_argument("--max-train-bytes", type=int, default=None, help="cap on train text bytes")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Build (or reuse) the default data under ``args.cache_dir`` and print its paths and sizes."""
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    dd = ensure_default_data(args.cache_dir, vocab_size=args.vocab_size, progress=not args.quiet,
                             max_train_bytes=args.max_train_bytes, force=args.force)
    m = dd.manifest()
    for field in ("root", "train", "val", "test", "tokenizer"):
        print(f"{field}: {getattr(dd, field)}")
    for split in SPLITS:
        s = m["splits"][split]
        print(f"{split}: {s['documents']} documents, {s['text_bytes']} text bytes, "
              f"{s['compressed_bytes']} compressed bytes, {len(s['shards'])} shards")
    print(f"vocab_size: {m['tokenizer']['vocab_size']}")
    print(f"python: {m['python_version']}")
    return 0
