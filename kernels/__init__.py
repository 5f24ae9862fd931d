"""Triton kernels of dpt_fast (installed as dpt_fast.kernels): @triton.jit functions and their
launchers, plus what both kernel modules share: the autotune modes and `launch`. The environment switches
they follow (TRITON_INTERPRET, DPT_FAST_AUTOTUNE, ...) are read once by dpt_fast.env; set TRITON_INTERPRET=1
before importing to run the kernels on CPU tensors.

DPT_FAST_AUTOTUNE (applied when each kernel module is imported): "full" (the default) autotunes every
kernel over its whole config list; "quick" gives each autotuned kernel only the first config of its list
(the primary pick), so a kernel variant is compiled once and nothing is benchmarked: for correctness runs
(the GPU tests), never for timings. Any other value is an error at import."""
from __future__ import annotations

import contextlib

# Absolute, not `from .. import env`: this folder sits at the repository root, where `python -m pytest` (or a
# script run from there) puts it on sys.path as a top-level "kernels", and transformers imports that name
# while probing for an unrelated distribution; a relative import would make that probe raise.
from dpt_fast import env

AUTOTUNE_MODES = env.AUTOTUNE_MODES


def autotune_mode(value: str | None = None) -> str:
    """The autotune mode of `value` (default: DPT_FAST_AUTOTUNE as dpt_fast.env read it): "full" when empty,
    else "full" or "quick" (case and surrounding blanks ignored); any other value raises ValueError."""
    return env.autotune_mode(value)


def autotune_configs(configs, mode: str) -> list:
    """The configs an autotuned kernel gets in `mode`: all of them ("full") or the first ("quick")."""
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"autotune mode {mode!r}: expected one of {', '.join(AUTOTUNE_MODES)}")
    return list(configs) if mode == "full" else list(configs[:1])


def _capturing() -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph (torch.cuda.graph, or
    torch.compile's cudagraph modes)."""
    import torch  # here, so that importing this package stays free of torch
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tuning_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """The key under which the @triton.autotune'd `kernel` stores its tuning for a launch with these arguments:
    the values of its key arguments, then the dtype of every argument that has one (as triton's Autotuner
    forms it)."""
    named = {**dict(zip(kernel.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in kernel.arg_names}
    key = [named[k] for k in kernel.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def pinned_during_capture(capturing: bool, n_configs: int, tuned: bool) -> bool:
    """Whether a launch with several candidate configs runs the first one directly instead of through the
    autotuner: only inside CUDA-graph capture, for a key with no tuning yet (benchmarking the configs would
    synchronise and time kernels inside the capture). A key tuned before the capture (a warm-up run) keeps
    its tuned config."""
    return capturing and n_configs > 1 and not tuned


def candidate_configs(kernel, args: tuple, kwargs: dict) -> list:
    """The configs the autotuned `kernel` would choose from for this launch (its early_config_prune applied,
    e.g. the attention kernels' per-head-dim lists)."""
    prune = getattr(kernel, "early_config_prune", None)
    if prune is None or len(kernel.configs) == 1:
        return list(kernel.configs)
    return prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kwargs) or list(kernel.configs)


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs) for an @triton.autotune'd kernel, with two exceptions that run a config
    directly (its pre-hook included; it becomes kernel.best_config, nothing enters the tuning cache):
    - a single candidate config (DPT_FAST_AUTOTUNE=quick): no benchmarking on any triton version (3.6's
      autotuner times even a lone config);
    - inside CUDA-graph capture, a key not tuned yet: the first candidate, so that nothing is timed inside
      the capture; a later launch outside capture still tunes that key. Run once outside capture first (a
      warm-up) to capture the tuned config."""
    candidates = candidate_configs(kernel, args, kwargs)
    capturing = len(candidates) > 1 and _capturing()
    tuned = capturing and tuning_key(kernel, args, kwargs) in kernel.cache
    if len(candidates) == 1 or pinned_during_capture(capturing, len(candidates), tuned):
        config = candidates[0]
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(kernel.arg_names, args)), **kwargs, **config.all_kwargs()})
        kernel.best_config = config
        return kernel.fn[grid](*args, **kwargs, **config.all_kwargs())
    return kernel[grid](*args, **kwargs)


def on_device(t):
    """Context for launching on t's CUDA device: Triton launches on the *current* device and stream, so a
    tensor on cuda:1 while cuda:0 is current would otherwise be run on the wrong GPU. No-op for CPU
    tensors (the interpreter)."""
    import torch  # here, so that importing this package stays free of torch
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
