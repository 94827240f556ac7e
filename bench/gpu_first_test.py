"""A pytest plugin for ``bench/gpu_report.py --dry-run``: keep the first collected test of each
file and deselect the rest, so one pytest process runs one test per kernel file.

Used as ``python -m pytest -p gpu_first_test ...`` with ``bench/`` on ``PYTHONPATH``.
"""

from __future__ import annotations


def pytest_collection_modifyitems(config, items):
    seen: set[str] = set()
    keep, drop = [], []
    for item in items:
        path = str(item.path)
        (drop if path in seen else keep).append(item)
        seen.add(path)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
