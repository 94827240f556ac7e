"""Worker for test_train_distributed.py: rank 1 hangs (sleeps) before a collective that rank 0
enters, so rank 0 must fail after parallel.timeout_s instead of waiting forever.

    torchrun --standalone --nproc_per_node=2 tests/hang_worker.py TIMEOUT_S
"""

from __future__ import annotations

import sys
import time

import torch

from llama_mini.training.distributed import all_reduce, setup

info = setup(model_parallel=1, backend="gloo", device="cpu", timeout_s=float(sys.argv[1]))
if info.rank == 1:
    time.sleep(600)  # stuck, but alive: torchrun sees nothing wrong with this process
t0 = time.time()
try:
    all_reduce(torch.ones(1))
except Exception as e:  # the bounded wait: a clear error after the timeout
    print(f"rank 0: collective failed after {time.time() - t0:.1f}s: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    sys.exit(3)
sys.exit(0)
