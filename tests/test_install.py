"""Install and import anywhere: the wheel and the editable install, each in a fresh virtual
environment that also holds Hugging Face's ``kernels`` package (transformers requires it), used
from a user's project that has its own ``data/`` and ``kernels/`` packages.

What each case checks, from outside the checkout:
- the build: a wheel holds ``llama_mini/`` (with ``llama_mini/kernels/`` and ``llama_mini/data/``)
  and its ``.dist-info`` only, and nothing of it lands at the top level of site-packages;
- the library from the user's project: a model's forward and backward, a Triton kernel under the
  interpreter against the plain-PyTorch reference, the built-in data streamed through a policy,
  the ``llama-mini`` console script; the user's own ``data`` and ``kernels`` stay theirs;
- Hugging Face beside it: ``import kernels`` is Hugging Face's package, ``LlamaForCausalLM`` gives
  our logits after converting weights both ways, and ``packages_distributions()`` maps only
  ``llama_mini`` to this distribution;
- Hugging Face's files are byte-identical after our install and after our uninstall, and the
  uninstall leaves no ``llama_mini`` behind.

The virtual environment is made without pip and without the system site-packages; it sees the
already installed torch, transformers and the rest through a ``.pth`` entry to a folder of links
to them, which leaves out this checkout's own installation and Hugging Face's ``kernels``, a real
copy of which goes into the venv's own site-packages, where our wheel is installed too. Nothing
is downloaded. Both cases together take about a minute and a half on two cores.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("setup.py", "pyproject.toml", "README.md", "llama_mini", "kernels", "data")
OURS = "llama-mini"

# Run inside the user's project (its folder is sys.path[0]): the user's packages and ours together.
USER_APP = r'''
import json, os, sys
import data, kernels  # the user's own packages (bare name on purpose)
assert (data.WHO, kernels.WHO) == ("user data", "user kernels"), (data.__file__, kernels.__file__)

import torch
import llama_mini
from llama_mini import ModelArgs, Transformer
from llama_mini.data import DataPipeline, Tokenizer, ensure_default_data
from llama_mini.kernels import reference, triton_available
from llama_mini.kernels.flash_attention import flash_attention

torch.manual_seed(0)
model = Transformer(ModelArgs.preset("debug"))
tokens = torch.randint(0, model.args.vocab_size, (2, 12))
loss = model(tokens, tokens.roll(-1, dims=1))
loss.backward()
assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())

assert triton_available(), "TRITON_INTERPRET=1 is set: the Triton path must run"
q, k, v = (torch.randn(1, h, 19, 16, dtype=torch.float64).float() for h in (4, 2, 2))
err = (flash_attention(q, k, v, causal=True) - reference.attention(q.double(), k.double(), v.double()).float())
assert err.abs().max().item() < 1e-5, err.abs().max().item()

dd = ensure_default_data()
pipe = DataPipeline.build(dd.train, Tokenizer(dd.tokenizer), policy="best-fit", max_len=64, batch_size=2,
                          max_documents=3)
batch = next(iter(pipe))
assert tuple(batch["input_ids"].shape) == (2, 64)

print(json.dumps({"llama_mini": llama_mini.__file__, "kernels": llama_mini.kernels.__file__,
                  "data": llama_mini.data.__file__, "user_data": data.__file__}))
'''

# Run from a neutral folder: transformers and Hugging Face's kernels beside ours.
HF_CHECK = r'''
import importlib.metadata, json, sys
import kernels  # Hugging Face's (bare name on purpose)
assert hasattr(kernels, "get_kernel"), f"not Hugging Face's kernels: {kernels.__file__}"
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from llama_mini import ModelArgs, Transformer, args_from_hf_config, hf_config_dict
from llama_mini import hf_to_meta_state_dict, meta_to_hf_state_dict

torch.manual_seed(0)
args = ModelArgs.preset("debug")
ours = Transformer(args).eval()
hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(args), attn_implementation="eager")).float().eval()
hf.load_state_dict(meta_to_hf_state_dict(ours.state_dict(), args))
back = Transformer(args_from_hf_config(hf.config)).eval()
back.load_state_dict(hf_to_meta_state_dict(hf.state_dict(), args))
tokens = torch.randint(0, args.vocab_size, (2, 9))
with torch.no_grad():
    a, b, c = ours(tokens), hf(input_ids=tokens).logits, back(tokens)
assert (a - b).abs().max().item() < 1e-4, (a - b).abs().max().item()
assert torch.equal(a, c)

names = importlib.metadata.packages_distributions()
files = [str(f) for f in importlib.metadata.distribution("llama-mini").files]
print(json.dumps({"hf_kernels": kernels.__file__,
                  "ours": sorted(n for n, dists in names.items() if "llama-mini" in dists),
                  "kernels_dists": names.get("kernels"), "data_dists": names.get("data"), "files": files}))
'''


def _run(cmd, cwd, env=None, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _digest(folder: str) -> dict[str, str]:
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]  # importing writes bytecode; that is not ours
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _hf_kernels() -> tuple[str, str]:
    """Hugging Face's installed ``kernels``: its package folder and its .dist-info folder."""
    spec = importlib.util.find_spec("kernels")  # conftest took the checkout off sys.path
    assert spec is not None and spec.origin, "Hugging Face's kernels is a dev requirement"
    dist = importlib.metadata.distribution("kernels")
    package = os.path.dirname(spec.origin)
    info = str(dist.locate_file(f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}.dist-info"))
    assert os.path.isdir(info) and os.path.dirname(package) == os.path.dirname(info), (package, info)
    return package, info


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A copy of the sources, and a folder of links to the installed dependencies."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            os.makedirs(src, exist_ok=True)
            shutil.copy2(path, src / name)

    ours = importlib.metadata.distribution(OURS)
    our_entries = {str(f).split("/")[0] for f in ours.files or ()} | {"llama_mini"}
    hf_package, hf_dist = _hf_kernels()
    skip = our_entries | {os.path.basename(hf_package), os.path.basename(hf_dist)}
    deps = root / "deps"
    os.makedirs(deps)
    dirs = [d for d in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(d)]
    for d in dirs:
        for entry in os.listdir(d):
            if entry in skip or entry.endswith(".pth") or (deps / entry).exists():
                continue
            os.symlink(os.path.join(d, entry), deps / entry)

    user = root / "project"  # a user's project with its own data/ and kernels/
    for name in ("data", "kernels"):
        os.makedirs(user / name)
        (user / name / "__init__.py").write_text(f'WHO = "user {name}"\n')
    (user / "app.py").write_text(USER_APP)
    neutral = root / "neutral"
    os.makedirs(neutral)
    (neutral / "hf_check.py").write_text(HF_CHECK)
    return {"root": root, "src": src, "deps": deps, "user": user, "neutral": neutral,
            "hf": (hf_package, hf_dist)}


def _venv(staged, name: str):
    venv = staged["root"] / name
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=staged["root"])
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "_llama_mini_test_deps.pth"), "w") as f:
        f.write(str(staged["deps"]) + "\n")
    hf_package, hf_dist = staged["hf"]
    for folder in (hf_package, hf_dist):
        shutil.copytree(folder, os.path.join(purelib, os.path.basename(folder)),
                        ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(TRITON_INTERPRET="1", PATH=str(venv / "bin") + os.pathsep + os.environ.get("PATH", ""),
               PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return venv, python, purelib, env


def _pip(python, env, cwd, *args):
    return _run([python, "-m", "pip", *args, "--quiet"], cwd=cwd, env=env)


@pytest.fixture(scope="module")
def wheel(staged):
    dist = staged["root"] / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
          "-w", str(dist), str(staged["src"])], cwd=staged["root"])
    (path,) = [os.path.join(dist, f) for f in os.listdir(dist) if f.endswith(".whl")]
    return path


def test_the_wheel_holds_llama_mini_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"llama_mini", "llama_mini-0.1.0.dist-info"}, tops
    for path in ("llama_mini/__init__.py", "llama_mini/cli.py", "llama_mini/training/trainer.py",
                 "llama_mini/kernels/__init__.py", "llama_mini/kernels/flash_attention.py",
                 "llama_mini/data/__init__.py", "llama_mini/data/reader.py", "llama_mini/data/preview.py"):
        assert path in names, path
    meta = zipfile.ZipFile(wheel).read("llama_mini-0.1.0.dist-info/entry_points.txt").decode()
    assert "llama-mini = llama_mini.cli:main" in meta


@pytest.mark.parametrize("how", ["wheel", "editable"])
def test_install_and_import_anywhere_beside_hugging_face(staged, wheel, how):
    venv, python, purelib, env = _venv(staged, f"venv-{how}")
    hf_copy = os.path.join(purelib, os.path.basename(staged["hf"][0]))
    before = _digest(hf_copy)
    if how == "wheel":
        _pip(python, env, staged["root"], "install", "--no-deps", wheel)
        expect_under = purelib
    else:
        _pip(python, env, staged["root"], "install", "--no-deps", "--no-build-isolation", "-e", str(staged["src"]))
        expect_under = str(staged["src"])
    assert _digest(hf_copy) == before, "installing llama-mini changed Hugging Face's kernels"
    assert not os.path.exists(os.path.join(purelib, "data")), "a top-level data was installed"

    app = json.loads(_run([python, "app.py"], cwd=staged["user"], env=env).stdout.strip().splitlines()[-1])
    assert app["user_data"] == str(staged["user"] / "data" / "__init__.py")
    prefix = os.path.realpath(expect_under) + os.sep
    for name in ("llama_mini", "kernels", "data"):
        assert os.path.realpath(app[name]).startswith(prefix), (name, app[name], expect_under)

    cli = _run(["llama-mini", "--help"], cwd=staged["user"], env=env)
    assert "train" in cli.stdout and "build-data" in cli.stdout
    counts = json.loads(_run(["llama-mini", "data", "--max-documents", "2", "--json"], cwd=staged["user"],
                             env=env).stdout)
    assert counts["policy"]["documents"] == 2 and counts["policy"]["tokens_kept"] > 0

    hf = json.loads(_run([python, "hf_check.py"], cwd=staged["neutral"], env=env).stdout.strip().splitlines()[-1])
    assert os.path.realpath(hf["hf_kernels"]) == os.path.realpath(os.path.join(hf_copy, "__init__.py"))
    assert hf["ours"] == ["llama_mini"] and hf["kernels_dists"] == ["kernels"] and hf["data_dists"] is None
    # Every file the distribution records is under llama_mini/ or its metadata, the console
    # script, or (editable) setuptools' import hook for llama_mini.
    for f in hf["files"]:
        top = f.split("/")[0]
        assert (top in ("llama_mini", "llama_mini-0.1.0.dist-info", "..")
                or "__editable__" in f and "llama_mini" in f), f

    _pip(python, env, staged["root"], "uninstall", "--yes", OURS)
    assert _digest(hf_copy) == before, "uninstalling llama-mini changed Hugging Face's kernels"
    assert not any(e.startswith(("llama_mini", "__editable__")) for e in os.listdir(purelib)), os.listdir(purelib)
    gone = subprocess.run([python, "-c", "import kernels, transformers.integrations.hub_kernels\n"
                                         "import llama_mini"], cwd=staged["neutral"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert "No module named 'llama_mini'" in gone.stderr, gone.stderr[-2000:]
