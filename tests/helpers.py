"""Markers and helpers the test files share (not part of the package)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

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
