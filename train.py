"""Train a LLaMA-style model: one process, or model x data parallel under torchrun.

    python train.py                                   # debug model on the built-in data, a few CPU minutes
    python train.py --preset homework --data.policy best-fit
    python train.py --config my.toml --model.dim 256 --schedule.steps 2000
    torchrun --nproc_per_node=4 train.py --parallel.model 2          # 2-way model x 2-way data parallel
    python train.py evaluate --checkpoint runs/debug/checkpoints --context 256 1024 --rope-scaling none linear:4
    python train.py --help                            # every option, its default and its meaning

The same job as ``llama-mini train`` (the installed command; a wheel carries no train.py): both run
``llama_mini.training.command``. Outputs go to ``runs/<run.name>/``; running the same command again
resumes from the latest checkpoint. See docs/training.md.
"""

from __future__ import annotations

import os
import sys

# Python puts this script's folder, the checkout root, first on sys.path. From there the folders
# kernels/ and data/ would be importable as bare ``kernels`` and ``data`` and would hide Hugging
# Face's ``kernels`` package from transformers. The project is imported by its installed names
# (``pip install -e .``), so the root comes off the path.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

try:
    from llama_mini.cli import run_command
except ModuleNotFoundError as e:  # a checkout that was never installed
    if e.name != "llama_mini":
        raise
    sys.exit(f"error: llama_mini is not installed: run pip install -e {_HERE} first (see README.md)")

if __name__ == "__main__":
    sys.exit(run_command("train", sys.argv[1:], prog="python train.py"))
