"""Test-session setup. Without a GPU, Triton kernels run through the interpreter on CPU tensors:
TRITON_INTERPRET must be set before triton is first imported, so it is decided here, once."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


# --- fixtures any test may request by name (autouse ones live in helpers.py: a module opts in by importing)

@pytest.fixture
def meta_only_builds(monkeypatch):
    """Fails the test if load_model builds a model anywhere but on the meta device; the list of the
    devices models were built on."""
    import dpt_fast.models
    real = dpt_fast.models.build_model
    devices = []

    def build_model(config):
        devices.append(torch.empty(0).device.type)
        if devices[-1] != "meta":
            raise AssertionError("a model was built in memory before the weights were checked")
        return real(config)

    monkeypatch.setattr(dpt_fast.models, "build_model", build_model)
    return devices


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny DPT depth model with random weights (seed 0), saved once per test module by save_model:
    what `--model` takes in the command tests."""
    import dpt_fast
    from model_helpers import TINY, randomize_
    torch.manual_seed(0)
    model = randomize_(dpt_fast.DPTDepthModel(**TINY), matrix_std=0.05)
    return dpt_fast.save_model(model, tmp_path_factory.mktemp("m") / "tiny")
