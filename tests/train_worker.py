"""Worker for test_train_distributed.py: the trainer under torchrun with one fault injected on
global rank 1, chosen by the first argument; the rest are train.py options.

    torchrun --standalone --nproc_per_node=2 tests/train_worker.py sigterm --run.out_dir ...
    torchrun --standalone --nproc_per_node=2 tests/train_worker.py no-targets --run.out_dir ...

sigterm     rank 1 sends itself SIGTERM during step 2: every rank must save after the same step
no-targets  rank 1's batch of step 2 has every target ignored: the step must still complete
"""

from __future__ import annotations

import os
import signal
import sys

from llama_mini.training.config import load_config
from llama_mini.training.trainer import Trainer

fault, options = sys.argv[1], sys.argv[2:]
trainer = Trainer(load_config(overrides=options))
rank = trainer.dist.rank
real_next = trainer.streams.next_batch


def next_batch(micro_step):
    batch = real_next(micro_step)
    if rank == 1 and trainer.step == 1:  # fetching step 2's data
        if fault == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif fault == "no-targets":
            batch["target_ids"].fill_(-100)
    return batch


trainer.streams.next_batch = next_batch
summary = trainer.run()
print(f"rank {rank}: done at step {summary['step']}", file=sys.stderr, flush=True)
from llama_mini.training.distributed import teardown  # noqa: E402

teardown()
