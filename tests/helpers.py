"""Markers and helpers the test files share (not part of the package)."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dpt_fast
from dpt_fast import backend

# conftest.py has decided TRITON_INTERPRET before any test module imports triton.
INTERPRETING = backend.triton_interpreting()

interpreter = pytest.mark.skipif(not INTERPRETING, reason="CPU interpreter tests: run with TRITON_INTERPRET=1")


def gpu(fn):
    """A test of the compiled Triton kernels: marker gpu, skipped without CUDA or when kernels are interpreted."""
    skip = pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available(), reason="needs CUDA, compiled Triton")
    return pytest.mark.gpu(skip(fn))


def extension_built() -> bool:
    return importlib.util.find_spec("dpt_fast._C") is not None


def _extension_skip_reason() -> str:
    if os.environ.get("DPT_FAST_BUILD_CUDA", "").strip() == "0":
        return "dpt_fast._C not built (DPT_FAST_BUILD_CUDA=0)"
    return "dpt_fast._C not built (pure-Python install: no CUDA toolchain, or DPT_FAST_BUILD_CUDA=0, at install time)"


needs_extension = pytest.mark.skipif(not extension_built(), reason=_extension_skip_reason())


def extension_gpu(fn):
    """A test of the CUDA extension's kernels: marker gpu (conftest skips it without CUDA), and skipped
    when dpt_fast._C was not built."""
    return pytest.mark.gpu(needs_extension(fn))


# --- fixtures ------------------------------------------------------------------------------------

@contextlib.contextmanager
def single_thread():
    """One intra-op thread inside the block: on 2 shared cores, OpenMP threads spinning against other
    processes make a training step several times slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_thread():
    """single_thread() for each test of a module that imports this fixture (it is autouse there)."""
    with single_thread():
        yield


@pytest.fixture(autouse=True)
def reference_backend():
    """Operators on their reference implementations for the tests of a module that imports this fixture
    (it is autouse there): such a module tests models or weights, not the kernels."""
    with dpt_fast.use_backend("reference"):
        yield


# --- comparisons ----------------------------------------------------------------------------------

def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in the L2 norm, computed in float64 so that the measure adds no rounding of its own."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --- README examples ------------------------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def run_readme_example(section: str, model, weights_literal: str, tmp_path, monkeypatch, photo_shape) -> None:
    """Run the Python block that opens README's `## <section>` on CPU in `tmp_path`: `model` saved in
    dpt_fast's format stands for the file the example names (`weights_literal`, quoted as in README), and
    a seeded random photo.jpg of `photo_shape` (H, W, 3) for the user's photo."""
    code = re.search(rf"## {re.escape(section)}\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    dpt_fast.save_model(model, tmp_path / "tiny")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, photo_shape, dtype=np.uint8)).save(tmp_path / "photo.jpg")
    assert weights_literal in code, f"README's {section} example no longer loads {weights_literal}"
    code = (code.replace(weights_literal, repr(str(tmp_path / "tiny")))
                .replace(".cuda()", "").replace('torch.autocast("cuda"', 'torch.autocast("cpu"'))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README {section} example", "exec"), {})
