"""Mixed precision helpers: autocast factories and the fp16 dynamic loss scaler."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from llama_mini.training.precision import LossScaler, autocast_factory


def test_autocast_factory():
    assert autocast_factory("fp32", torch.device("cpu")) is contextlib.nullcontext
    with autocast_factory("bf16", torch.device("cpu"))():
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="run.precision: 'fp8' is not one of fp32, bf16, fp16"):
        autocast_factory("fp8", torch.device("cpu"))


def test_loss_scaler_halves_on_overflow_and_grows_after_good_steps():
    s = LossScaler(True, init_scale=8.0, growth_interval=3)
    assert s.overflowed(math.inf) and s.overflowed(math.nan) and not s.overflowed(1.0)
    s.update(False)
    assert s.scale == 4.0 and s.good_steps == 0
    for _ in range(2):
        s.update(True)
    assert s.scale == 4.0 and s.good_steps == 2
    s.update(True)
    assert s.scale == 8.0 and s.good_steps == 0
    for _ in range(10):  # never below 1: at S = 1 an overflow is a real fault, not the scaler's
        s.update(False)
    assert s.scale == 1.0 and not s.overflowed(math.inf)
    state = s.state_dict()
    t = LossScaler(True)
    t.load_state_dict(state)
    assert (t.scale, t.good_steps) == (1.0, 0)


def test_disabled_scaler_is_one_and_never_overflows():
    s = LossScaler(False)
    s.update(False)
    assert s.scale == 1.0 and not s.overflowed(math.inf)
