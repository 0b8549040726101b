"""A run stopped by a SIGINT after its N-th training step, as a user's Ctrl-C would stop it."""

from __future__ import annotations

import os
import signal

import pytest

import vggkit.training.trainer as T
from vggkit.workflow import train


def interrupted_run(monkeypatch, config, steps: int) -> None:
    """Train ``config`` until a SIGINT after its ``steps``-th step (a checkpoint is written)."""
    calls = {"n": 0}
    real = T.TrainStep.__call__

    def stop(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == steps:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(T.TrainStep, "__call__", stop)
    try:
        with pytest.raises(T.TrainingInterrupted, match="Resume with"):
            train(config, progress=False)
    finally:
        monkeypatch.setattr(T.TrainStep, "__call__", real)
