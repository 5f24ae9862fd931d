"""Helpers the trainer's test files share: reading what a run left in its folder, and a loss that stops
the run at a chosen step."""
import json
import os
import signal

import torch

from dpt_fast import train as trainer


def run_metrics(out) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_state(out) -> dict:
    """A run's checkpoint.pt as saved (tensors on the CPU)."""
    return torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=True)


class SignalAt:
    """Wraps the trainer's loss (monkeypatch it over `trainer._loss_fn`) so that its n-th call sends this
    process `sig` (SIGINT: Ctrl-C mid-step), or raises `error` (standing for a SIGKILL: nothing of the
    trainer runs after it)."""

    def __init__(self, n, sig=signal.SIGINT, error=None):
        self.n, self.sig, self.error, self.calls, self.original = n, sig, error, 0, trainer._loss_fn

    def __call__(self, args, model):
        inner = self.original(args, model)

        def loss(*a):
            self.calls += 1
            if self.calls == self.n:
                if self.error is not None:
                    raise self.error
                os.kill(os.getpid(), self.sig)
            return inner(*a)
        return loss
