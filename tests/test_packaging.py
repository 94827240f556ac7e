"""Packaging rules: the three packages import, llama_mini imports without triton, and
dependencies point one way (kernels and data never import llama_mini; kernels never data)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_without_triton():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton blocked for this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import llama_mini, kernels, data, torch\n"
        "from llama_mini import ModelArgs, Transformer\n"
        "m = Transformer(ModelArgs.preset('debug'))\n"
        "m(torch.zeros(1, 4, dtype=torch.long))\n"
        "assert 'triton' not in sys.modules\n"
        "print(kernels.triton_available(), kernels.triton_unavailable_reason())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False triton is not installed"


def _imports(package: str) -> set[tuple[str, str]]:
    found = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            tree = ast.parse(open(path, encoding="utf-8").read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found |= {(os.path.relpath(path, ROOT), a.name.split(".")[0]) for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add((os.path.relpath(path, ROOT), node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("package, forbidden", [("kernels", {"llama_mini", "data"}), ("data", {"llama_mini"})])
def test_dependencies_point_one_way(package, forbidden):
    bad = sorted((path, mod) for path, mod in _imports(package) if mod in forbidden)
    assert not bad, f"{package} must not import {forbidden}: {bad}"


def test_installed_distribution_declares_the_requirements():
    from importlib.metadata import requires

    reqs = [r.replace(" ", "") for r in requires("llama-mini")]
    core = {r for r in reqs if "extra==" not in r}
    names = {r.split(";")[0].split(">")[0].split("=")[0] for r in core}
    assert names == {"torch", "numpy", "sentencepiece", "fairscale", "zstandard", "tqdm", "triton"}
    assert any(r.startswith("triton;") and 'platform_system=="Linux"' in r for r in core)
    extras = {r.split(";")[0].split(">")[0]: r.split("extra==")[1].strip("'\"") for r in reqs if "extra==" in r}
    assert extras == {"pytest": "dev", "pytest-xdist": "dev", "hypothesis": "dev", "transformers": "dev",
                      "matplotlib": "plot"}


def test_readme_test_command_is_what_ci_runs():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    command = "TRITON_INTERPRET=1 python -m pytest tests -q -n auto --dist loadfile"
    assert command in readme and command in ci
