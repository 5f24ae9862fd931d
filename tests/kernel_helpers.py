"""Helpers the kernel tests share (not part of the package)."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def pinned_config(kernel, config):
    """Inside the block the @triton.autotune'd `kernel` runs `config` alone (launched directly, without tuning
    or benchmarking, its pre_hook included), whatever its config lists and DPT_FAST_AUTOTUNE say. Not
    thread-safe: for tests that enumerate configs."""
    saved = kernel.configs
    kernel.configs = [config]
    try:
        yield config
    finally:
        kernel.configs = saved
