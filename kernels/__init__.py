"""Triton kernels of dpt_fast (installed as dpt_fast.kernels): @triton.jit functions and their
launchers, plus the autotuning switch both kernel modules share. Set TRITON_INTERPRET=1 before importing
to run them on CPU tensors.

DPT_FAST_AUTOTUNE (read once, when each kernel module is imported): "full" (the default) autotunes every
kernel over its whole config list; "quick" gives each autotuned kernel only the first config of its list
(the primary pick), so a kernel variant is compiled once and nothing is benchmarked: for correctness runs
(the GPU tests stage), never for timings. Any other value is an error at import."""
from __future__ import annotations

import contextlib
import os

AUTOTUNE_ENV = "DPT_FAST_AUTOTUNE"
AUTOTUNE_MODES = ("full", "quick")


def autotune_mode() -> str:
    """The DPT_FAST_AUTOTUNE mode of the environment now: "full" when unset or empty, else "full" or
    "quick" (case and surrounding blanks ignored); any other value raises ValueError."""
    mode = os.environ.get(AUTOTUNE_ENV, "").strip().lower() or "full"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"{AUTOTUNE_ENV}={os.environ[AUTOTUNE_ENV]!r}: expected one of "
                         f"{', '.join(AUTOTUNE_MODES)} (full autotunes over every config, quick runs the first)")
    return mode


def autotune_configs(configs, mode: str) -> list:
    """The configs an autotuned kernel gets in `mode`: all of them ("full") or the first ("quick")."""
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"autotune mode {mode!r}: expected one of {', '.join(AUTOTUNE_MODES)}")
    return list(configs) if mode == "full" else list(configs[:1])


@contextlib.contextmanager
def pinned_config(kernel, config):
    """Test hook: inside the block the @triton.autotune'd `kernel` runs `config` alone (the autotuner runs a
    single config without tuning or benchmarking, its pre_hook included), whatever its config list and
    DPT_FAST_AUTOTUNE say. Not thread-safe: for tests that enumerate configs."""
    saved = kernel.configs
    kernel.configs = [config]
    try:
        yield config
    finally:
        kernel.configs = saved


def on_device(t):
    """Context for launching on t's CUDA device: Triton launches on the *current* device and stream, so a
    tensor on cuda:1 while cuda:0 is current would otherwise be run on the wrong GPU. No-op for CPU
    tensors (the interpreter)."""
    import torch  # here, so that importing this package stays free of torch
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
