"""Packaging rules, read from the sources and the installed metadata:

- the import names are ``llama_mini``, ``llama_mini.kernels`` (folder ``kernels/``) and
  ``llama_mini.data`` (folder ``data/``); nothing in the repository (code, tests, benchmarks,
  docs) imports or runs a bare top-level ``kernels`` or ``data``;
- dependencies point one way: ``kernels`` and ``data`` never import the rest of ``llama_mini``
  (they import their own modules relatively), and ``kernels`` never imports ``data``;
- ``llama_mini`` imports and runs a model without triton installed;
- the distribution declares its requirements, its console script, and ``llama_mini`` as its only
  top-level name.

``tests/test_install.py`` builds and installs the distribution in fresh environments.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", "__pycache__", "build", "dist", "runs", "out", "results", ".pytest_cache", ".hypothesis"}
BARE = {"kernels", "data"}


def _files(ext: str, under: str = "") -> list[str]:
    found = []
    for dirpath, dirs, files in os.walk(os.path.join(ROOT, under)):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        found += [os.path.join(dirpath, f) for f in files if f.endswith(ext)]
    return sorted(found)


def _imports(path: str) -> list[tuple[int, str]]:
    """(level, dotted module) of every import in ``path``; level 0 is absolute. ``from . import x``
    gives (1, "x") and ``from .a import b`` gives (1, "a")."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(0, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                out.append((node.level, node.module))
            else:
                out += [(node.level, a.name) for a in node.names]
    return out


def test_import_without_triton(tmp_path):
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton blocked for this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from llama_mini import ModelArgs, Transformer, data, kernels\n"
        "m = Transformer(ModelArgs.preset('debug'))\n"
        "m(torch.zeros(1, 4, dtype=torch.long))\n"
        "assert 'triton' not in sys.modules\n"
        "print(kernels.triton_available(), kernels.triton_unavailable_reason())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False triton is not installed"


@pytest.mark.parametrize("package", ["kernels", "data"])
def test_dependencies_point_one_way(package):
    """A module of ``kernels/`` or ``data/`` imports its siblings relatively (level 1) and never
    ``llama_mini`` (which would include the other leaf) nor a level that climbs out of the folder."""
    bad = []
    for path in _files(".py", package):
        for level, module in _imports(path):
            if level > 1 or (level == 0 and module.split(".")[0] in BARE | {"llama_mini"}):
                bad.append((os.path.relpath(path, ROOT), "." * level + module))
    assert not bad, f"{package}/ must import only its own modules (relatively) and third-party ones: {bad}"


def test_the_folders_really_are_the_installed_subpackages():
    from llama_mini import data, kernels

    assert os.path.realpath(os.path.dirname(kernels.__file__)) == os.path.realpath(os.path.join(ROOT, "kernels"))
    assert os.path.realpath(os.path.dirname(data.__file__)) == os.path.realpath(os.path.join(ROOT, "data"))


def test_no_python_file_imports_a_bare_kernels_or_data():
    bad = []
    for path in _files(".py"):
        for level, module in _imports(path):
            if level == 0 and module.split(".")[0] in BARE:
                bad.append((os.path.relpath(path, ROOT), module))
    assert not bad, f"import llama_mini.kernels / llama_mini.data, not the bare names: {bad}"


# Commands and imports of the bare names as they would appear in docs, docstrings and strings
# (python -m with a bare name, a subprocess argument list, import_module, from/import lines).
# A line that means another package by that name says so with the marker below.
ON_PURPOSE = "bare name on purpose"
RUNS_BARE = re.compile(r"""(python3? -m |["']-m["'],\s*["']|import_module\(f?["'])(kernels|data)\b(?!-)""")
IMPORTS_BARE = re.compile(r"^\s*(>>>\s*)?(from (kernels|data)(\.\w+)* import|import (kernels|data)\b)", re.M)


def test_no_doc_or_string_runs_or_imports_a_bare_kernels_or_data():
    bad = []
    for path in [*_files(".py"), *_files(".md"), os.path.join(ROOT, ".ci", "run")]:
        text = open(path, encoding="utf-8").read()
        for pattern in (RUNS_BARE, IMPORTS_BARE):
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                if ON_PURPOSE in text.splitlines()[line - 1]:
                    continue
                bad.append(f"{os.path.relpath(path, ROOT)}:{line}: {m.group(0).strip()}")
    assert not bad, "use llama_mini.kernels / llama_mini.data and the llama-mini command:\n" + "\n".join(bad)


def test_installed_distribution_declares_the_requirements():
    from importlib.metadata import requires

    reqs = [r.replace(" ", "") for r in requires("llama-mini")]
    core = {r for r in reqs if "extra==" not in r}
    names = {re.split(r"[<>=;!~]", r)[0] for r in core}
    assert names == {"torch", "numpy", "sentencepiece", "fairscale", "zstandard", "tqdm", "triton"}
    assert any(r.startswith("triton;") and 'platform_system=="Linux"' in r for r in core)
    extras = {re.split(r"[<>=;!~]", r)[0]: r.split("extra==")[1].strip("'\"") for r in reqs if "extra==" in r}
    assert extras == {"pytest": "dev", "pytest-xdist": "dev", "hypothesis": "dev", "transformers": "dev",
                      "kernels": "dev", "matplotlib": "plot"}


def test_installed_distribution_has_one_top_level_name_and_the_command():
    from importlib.metadata import distribution, entry_points, packages_distributions

    ours = sorted(name for name, dists in packages_distributions().items() if "llama-mini" in dists)
    assert ours == ["llama_mini"]
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "llama-mini"]
    assert script.value == "llama_mini.cli:main" and script.dist.name == distribution("llama-mini").name


def test_readme_test_command_is_what_ci_runs():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    command = "TRITON_INTERPRET=1 python -m pytest tests -q -n auto --dist loadfile"
    assert command in readme and command in ci
