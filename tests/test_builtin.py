"""Built-in default data (data/builtin.py): format, splits, tokenizer, caching, crash and race safety.

One small build (2 MB of train text, 512 pieces) is shared by the session; tests that damage a
cache work on a copy of it. Shards are read with plain zstandard here, not the library's
reader, so a reader bug cannot hide a writer bug.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import zstandard

from llama_mini.data import builtin
from llama_mini.data.builtin import DEFAULT_DATA_VERSION, DefaultData, default_cache_dir, ensure_default_data
from llama_mini.data.tokenizer import Tokenizer

SMALL = dict(vocab_size=512, max_train_bytes=2_000_000)
SETS = {"python-stdlib-source", "python-stdlib-docstrings"}


def read_shard(path: str) -> list[dict]:
    with open(path, "rb") as raw:
        stream = zstandard.ZstdDecompressor().stream_reader(raw)
        return [json.loads(line) for line in io.TextIOWrapper(stream, encoding="utf-8")]


def read_split(directory: str) -> list[dict]:
    names = sorted(os.listdir(directory))
    return [doc for name in names for doc in read_shard(os.path.join(directory, name))]


def shard_hashes(manifest: dict) -> dict:
    return {s: [sh["sha256"] for sh in manifest["splits"][s]["shards"]] for s in ("train", "val", "test")}


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> DefaultData:
    return ensure_default_data(str(tmp_path_factory.mktemp("cache")), progress=False, **SMALL)


@pytest.fixture
def copy_of_built(built, tmp_path):
    """A private cache holding a copy of the session build, free to damage."""
    cache = tmp_path / "cache"
    shutil.copytree(built.root, cache / os.path.basename(built.root))
    return str(cache), DefaultData.at(str(cache / os.path.basename(built.root)))


def test_layout_and_manifest_match_the_files(built):
    assert os.path.basename(built.root) == f"default-data-v{DEFAULT_DATA_VERSION}-vocab512-train2000000"
    m = built.manifest()
    assert m["version"] == DEFAULT_DATA_VERSION and m["settings"] == SMALL
    assert m["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert os.path.isfile(built.tokenizer) and built.tokenizer == os.path.join(built.root, "tokenizer.model")
    for split, n_shards in (("train", 4), ("val", 2), ("test", 2)):
        directory = built.split(split)
        assert directory == os.path.join(built.root, split) and os.path.isdir(directory)
        entry = m["splits"][split]
        names = [sh["name"] for sh in entry["shards"]]
        assert names == [f"{i:02d}.jsonl.zst" for i in range(n_shards)] == sorted(os.listdir(directory))
        docs = read_split(directory)
        assert entry["documents"] == len(docs) > 0
        assert entry["text_bytes"] == sum(len(d["text"].encode("utf-8")) for d in docs)
        for sh in entry["shards"]:  # every shard holds documents: sharding across readers is real
            assert sh["documents"] == len(read_shard(os.path.join(directory, sh["name"]))) > 0
    # the cap holds for train, and val/test are capped in proportion (5/90 of it)
    assert 1_800_000 < m["splits"]["train"]["text_bytes"] <= SMALL["max_train_bytes"]
    for split in ("val", "test"):
        assert m["splits"][split]["text_bytes"] <= SMALL["max_train_bytes"] * 5 // 90


def test_every_line_is_a_pile_record(built):
    seen_sets = set()
    for split in ("train", "val", "test"):
        for shard in sorted(os.listdir(built.split(split))):
            with open(os.path.join(built.split(split), shard), "rb") as raw:
                lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
                for line in lines:
                    assert line.endswith("\n")
                    record = json.loads(line)  # one object per line: a text with newlines is escaped
                    assert set(record) == {"text", "meta"}
                    assert isinstance(record["text"], str) and record["text"].strip()
                    assert record["meta"]["pile_set_name"] in SETS
                    seen_sets.add(record["meta"]["pile_set_name"])
    assert seen_sets == SETS
    train = read_split(built.train)
    sources = [d["text"] for d in train if d["meta"]["pile_set_name"] == "python-stdlib-source"]
    docstrings = [d["text"] for d in train if d["meta"]["pile_set_name"] == "python-stdlib-docstrings"]
    assert any("def " in t and "import " in t for t in sources)
    # docstring documents are prose, not code
    assert not any(t.lstrip().startswith(("import ", "from ", '"""')) for t in docstrings)


def test_splits_are_disjoint_and_train_is_largest(built):
    texts = {s: [d["text"] for d in read_split(built.split(s))] for s in ("train", "val", "test")}
    for split, items in texts.items():
        assert len(items) == len(set(items)), f"{split} repeats a document"
    assert not set(texts["train"]) & set(texts["val"])
    assert not set(texts["train"]) & set(texts["test"])
    assert not set(texts["val"]) & set(texts["test"])
    assert len(texts["train"]) > 5 * max(len(texts["val"]), len(texts["test"]))


def test_split_is_fixed_by_module_path():
    assert builtin._split_of("json/decoder.py") == builtin._split_of("json/decoder.py")
    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(4000):
        counts[builtin._split_of(f"pkg{i}/mod.py")] += 1
    assert 3450 < counts["train"] < 3750 and 120 < counts["val"] < 280 and 120 < counts["test"] < 280


def fake_module(i: int) -> str:
    return (f'"""Module {i}: documentation for module number {i}, long enough to be kept as a '
            f'document of its own."""\n\nimport os\n\n\nclass Thing{i}:\n    """Thing {i} does '
            f'things."""\n\n    def run(self):\n        """Run thing {i} once."""\n'
            f'        return os.getcwd()  # code {i}\n')


def test_collect_skips_what_it_should_and_keeps_modules_whole(tmp_path):
    lib = tmp_path / "lib"
    for i in range(200):
        (lib / f"pkg{i % 7}").mkdir(parents=True, exist_ok=True)
        (lib / f"pkg{i % 7}" / f"mod{i}.py").write_text(fake_module(i))
    (lib / "dup_a.py").write_text(fake_module(999))
    (lib / "dup_b.py").write_text(fake_module(999))  # identical files: one text, kept once
    skipped = {
        "test/test_x.py": fake_module(1000), "tests/t.py": fake_module(1001),
        "idlelib/idle_test/t.py": fake_module(1002), "site-packages/pkg/m.py": fake_module(1003),
        "__pycache__/m.py": fake_module(1004), "_sysconfigdata__linux.py": fake_module(1005),
        "encodings/cp999.py": '""" Python Character Mapping Codec generated from X with gencodec.py.\n"""\n'
                              + fake_module(1006),
        "huge.py": fake_module(1007) + "# padding\n" * 30000,
        "tiny.py": "x = 1\n",
    }
    for rel, text in skipped.items():
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_text(text)
    (lib / "latin1.py").write_bytes(fake_module(1008).encode() + b"# caf\xe9\n")  # not UTF-8

    docs = builtin._collect(str(lib), None, progress=False)
    assert docs == builtin._collect(str(lib), None, progress=False)  # deterministic
    texts = [t for split in docs.values() for _, t in split]
    assert len(texts) == len(set(texts)) == 2 * 201  # 200 modules + one of the twins, 2 kinds each
    for i in range(1000, 1009):
        assert not any(f"module number {i}," in t for t in texts), i
    for i in list(range(200)) + [999]:
        homes = {(split, name) for split, items in docs.items() for name, t in items if f"number {i}," in t}
        assert {name for _, name in homes} == SETS
        assert len({split for split, _ in homes}) == 1, f"module {i} is split across {homes}"
    docstrings = [t for split in docs.values() for name, t in split if name == "python-stdlib-docstrings"]
    assert any(t.startswith("pkg3.mod3\nModule 3:") and "\n\npkg3.mod3.Thing3.run\nRun thing 3 once.\n" in t
               for t in docstrings)
    assert not any("import os" in t for t in docstrings)


def test_tokenizer_loads_and_round_trips(built):
    tok = Tokenizer(built.tokenizer)
    assert tok.vocab_size == built.manifest()["tokenizer"]["vocab_size"] == 512
    sample = [d["text"] for s in ("train", "val", "test") for d in read_split(built.split(s))[:8]]
    n_bytes = n_tokens = 0
    for text in sample:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        n_bytes, n_tokens = n_bytes + len(text.encode("utf-8")), n_tokens + len(ids)
    # 512 pieces (256 of them bytes) trained on this text give about 1.8 bytes per token; a
    # tokenizer that fell back to bytes would give 1
    assert n_bytes / n_tokens > 1.5


def test_second_call_reuses_without_building(built, monkeypatch):
    manifest_mtime = os.stat(built.manifest_path).st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a valid cache")

    monkeypatch.setattr(builtin, "_build", no_build)
    start = time.perf_counter()
    again = ensure_default_data(os.path.dirname(built.root), progress=False, **SMALL)
    assert time.perf_counter() - start < 1.0
    assert again == built
    assert os.stat(built.manifest_path).st_mtime_ns == manifest_mtime


@pytest.mark.parametrize("damage", ["manifest-missing", "manifest-garbage", "shard-truncated", "tokenizer-missing"])
def test_damaged_cache_is_rebuilt_identically(copy_of_built, built, damage, caplog):
    cache, dd = copy_of_built
    if damage == "manifest-missing":
        os.remove(dd.manifest_path)
    elif damage == "manifest-garbage":
        with open(dd.manifest_path, "w") as f:
            f.write('{"version": 1, "settings"')
    elif damage == "shard-truncated":  # a zstd reader would take the rest for a shorter valid shard
        shard = os.path.join(dd.train, "00.jsonl.zst")
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
    else:
        os.remove(dd.tokenizer)
    with caplog.at_level("WARNING", logger="llama_mini.data.builtin"):
        rebuilt = ensure_default_data(cache, progress=False, **SMALL)
    assert rebuilt == dd
    assert "not a valid build" in caplog.text
    m, original = rebuilt.manifest(), built.manifest()
    # the build is deterministic: the same shards and tokenizer, byte for byte
    assert shard_hashes(m) == shard_hashes(original)
    assert m["tokenizer"] == original["tokenizer"]
    assert len(read_split(rebuilt.train)) == m["splits"]["train"]["documents"]
    assert [e for e in os.listdir(cache) if ".tmp+" in e] == []


def test_leftover_temp_dirs_are_not_data(built, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    name = os.path.basename(built.root)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # a killed build's temp dir, complete-looking (manifest and all) but never renamed
    killed = cache / f".{name}.tmp+{socket.gethostname()}+{dead.pid}+abc123"
    shutil.copytree(built.root, killed)
    manifest = json.loads((killed / "manifest.json").read_text())
    manifest["created"] = "KILLED"  # so a copy of it in the target would show
    (killed / "manifest.json").write_text(json.dumps(manifest))
    # another host's build may still be running (flock may not reach across hosts): kept
    foreign = cache / f".{name}.tmp+some-other-host+{os.getpid()}+xyz789"
    foreign.mkdir()
    dd = ensure_default_data(str(cache), progress=False, **SMALL)
    assert dd.root == str(cache / name)
    assert dd.manifest()["created"] not in ("KILLED", "")  # a real build happened in the target
    assert os.stat(dd.manifest_path).st_ino != os.stat(built.manifest_path).st_ino
    assert not killed.exists()
    assert foreign.exists()


def test_force_rebuilds(copy_of_built, built):
    cache, dd = copy_of_built
    with open(os.path.join(dd.root, "stray-file"), "w") as f:
        f.write("left in the old build")
    rebuilt = ensure_default_data(cache, progress=False, force=True, **SMALL)
    assert rebuilt == dd
    assert not os.path.exists(os.path.join(dd.root, "stray-file"))  # a fresh directory, swapped in
    assert shard_hashes(rebuilt.manifest()) == shard_hashes(built.manifest())


WORKER = """
import json, logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
from llama_mini.data.builtin import ensure_default_data
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # start together
dd = ensure_default_data(sys.argv[1], vocab_size=512, max_train_bytes=2_000_000, progress=False)
print(json.dumps({"paths": dd.__dict__, "manifest": dd.manifest()}, sort_keys=True))
"""


def test_concurrent_processes_build_once_and_agree(tmp_path):
    cache = str(tmp_path / "cache")
    start_at = str(time.time() + 1.5)
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, cache, start_at], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    outs = [json.loads(out) for out, _ in results]
    assert outs[0] == outs[1]
    builds = sum(err.count("default data: building") for _, err in results)
    assert builds == 1, [err for _, err in results]  # the other process waited on the lock
    assert sorted(os.listdir(cache)) == sorted([os.path.basename(outs[0]["paths"]["root"]),
                                               os.path.basename(outs[0]["paths"]["root"]) + ".lock"])


def test_cli_prints_paths_and_reuses(built):
    mtime = os.stat(built.manifest_path).st_mtime_ns
    out = subprocess.run(
        [sys.executable, "-m", "llama_mini", "build-data", "--cache-dir", os.path.dirname(built.root),
         "--vocab-size", "512", "--max-train-bytes", "2000000", "--quiet"],
        cwd=os.path.dirname(built.root), capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert f"root: {built.root}\n" in out.stdout and f"tokenizer: {built.tokenizer}\n" in out.stdout
    assert "vocab_size: 512" in out.stdout
    assert os.stat(built.manifest_path).st_mtime_ns == mtime


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_MINI_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "explicit")
    monkeypatch.delenv("LLAMA_MINI_CACHE")
    assert default_cache_dir() == str(tmp_path / "xdg" / "llama_mini")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "llama_mini")
    # no HOME and no passwd entry (a container's arbitrary uid): a temp dir, never the cwd
    import pwd
    import tempfile

    monkeypatch.delenv("HOME")
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    monkeypatch.chdir(tmp_path)
    path = default_cache_dir()
    assert path.startswith(tempfile.gettempdir()) and "~" not in path and path.endswith("llama_mini")


def test_errors(built, tmp_path):
    with pytest.raises(ValueError, match="unknown split 'validation'; the default data has train, val, test"):
        built.split("validation")
    with pytest.raises(ValueError, match="vocab_size must exceed 259"):
        ensure_default_data(str(tmp_path), vocab_size=100, progress=False)
    with pytest.raises(ValueError, match="max_train_bytes must be positive"):
        ensure_default_data(str(tmp_path), max_train_bytes=0, progress=False)
    assert os.listdir(tmp_path) == []  # argument errors are raised before anything is written
