"""Packaging for llama-mini: one distribution, one top-level import name, ``llama_mini``.

    pip install torch==2.13.0          # first, so the requirement below does not pull a CUDA build
    pip install -e ".[dev,plot]"

The design card fixes three top-level folders; setuptools' ``package_dir`` maps them to import
names under ``llama_mini`` so that nothing else is installed at the top level of site-packages:

    llama_mini/  ->  llama_mini            (the model, training, commands)
    kernels/     ->  llama_mini.kernels    (Triton kernels and plain-PyTorch references)
    data/        ->  llama_mini.data       (the streaming Pile reader and sequence-length policies)

Bare ``kernels`` and ``data`` are taken: transformers >= 5.25 requires Hugging Face's ``kernels``
package (a top-level ``kernels``), PyPI has a ``data`` package, and users' projects often have a
``data/`` of their own. A wheel therefore lays the files out as ``site-packages/llama_mini/kernels/``
and ``site-packages/llama_mini/data/``; an editable install maps the same names to the folders
here. The console script ``llama-mini`` runs the training job and the tools without a checkout
(``llama-mini --help``).
"""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")

# Import name -> folder, for the folders whose name is not their import name.
PACKAGE_DIR = {"llama_mini.kernels": "kernels", "llama_mini.data": "data"}
PACKAGES = find_packages(where=HERE, include=["llama_mini", "llama_mini.*"])
for _name, _folder in PACKAGE_DIR.items():
    PACKAGES += [_name] + [f"{_name}.{sub}" for sub in find_packages(where=os.path.join(HERE, _folder))]

setup(
    name="llama-mini",
    version="0.1.0",
    description="A from-scratch LLaMA-style transformer library for training and studying small "
    "language models",
    long_description=open(README, encoding="utf-8").read() if os.path.exists(README) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    entry_points={"console_scripts": ["llama-mini = llama_mini.cli:main"]},
    install_requires=[
        "torch>=2.5",  # scaled_dot_product_attention(enable_gqa=...)
        "numpy",
        "sentencepiece",
        "fairscale",
        "zstandard",
        "tqdm",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        # kernels: Hugging Face's package (top-level ``kernels``, required by transformers 5.25);
        # listed so tests/test_install.py always checks that llama-mini installs beside it.
        "dev": ["pytest", "pytest-xdist", "hypothesis", "transformers>=5", "kernels"],
        "plot": ["matplotlib"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
