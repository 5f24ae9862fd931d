"""Helpers the trainer's test files share: reading what a run left in its folder, a loss that stops
the run at a chosen step, and the check that a resumed run is the uninterrupted one."""
import json
import os
import signal

import pytest
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


def assert_same_run(whole: dict, resumed: dict, whole_out, parts_out, steps: int) -> None:
    """A run stopped and resumed (`resumed`, logged in `parts_out`) equals the uninterrupted run (`whole`,
    in `whole_out`): the same final weights, and the same per-step losses and learning rates, each of the
    `steps` steps logged once."""
    expected, actual = whole["model"].state_dict(), resumed["model"].state_dict()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
    whole_losses = [(r["step"], r["loss"], r["lr"]) for r in run_metrics(whole_out)]
    parts_losses = [(r["step"], r["loss"], r["lr"]) for r in run_metrics(parts_out)]
    assert [s for s, _, _ in parts_losses] == list(range(1, steps + 1))
    for (step, a, lr_a), (_, b, lr_b) in zip(whole_losses, parts_losses):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), step
        assert lr_a == pytest.approx(lr_b)
