"""Packaging for llama-mini: one distribution with the packages llama_mini, kernels and data.

    pip install torch==2.13.0          # first, so the requirement below does not pull a CUDA build
    pip install -e ".[dev,plot]"
"""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")

setup(
    name="llama-mini",
    version="0.1.0",
    description="A from-scratch LLaMA-style transformer library for training and studying small "
    "language models",
    long_description=open(README, encoding="utf-8").read() if os.path.exists(README) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llama_mini", "llama_mini.*", "kernels", "kernels.*", "data", "data.*"]),
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
        "dev": ["pytest", "pytest-xdist", "hypothesis", "transformers>=5"],
        "plot": ["matplotlib"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
