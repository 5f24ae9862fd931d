"""Every environment switch of dpt_fast, read once, when this module is first imported (as timm's
layers/config.py keeps its switches), so that what a process runs with is decided in one place at one time.
The kernels and the backend read the values from here; tests and benchmarks that compare settings in one
process assign the attributes (e.g. `monkeypatch.setattr(dpt_fast.env, "ATTENTION_TMA", "0")`).

Run time:

  TRITON_INTERPRET=1            Triton kernels run through Triton's interpreter on CPU tensors (tests on
                                machines without a GPU). Triton itself reads it when it is first imported.
  DPT_FAST_AUTOTUNE=full|quick  full (default): every autotuned kernel tunes over its whole config list;
                                quick: only the first config of each list, compiled once and never
                                benchmarked (correctness runs, never timings). Another value is an error
                                when a kernel module is imported.
  DPT_FAST_ATTENTION_TMA=0      the attention takes its pointer kernels even on sm_90+ (default: the TMA
                                kernels there), to compare or to isolate a problem.
  DPT_FAST_REASSEMBLE_SPLIT_K=N force the split-K count of the Reassemble weight-gradient GEMM (1 or 0: no
                                split; default: a heuristic on the device's SM count). Not an integer, or
                                over 65535: an error at the first backward.

Build time (read by setup.py when the package is built, listed here so that every switch is in one place):

  DPT_FAST_BUILD_CUDA=0|1       0: never build the CUDA extension dpt_fast._C; 1: build it or fail; unset:
                                build it when nvcc, a CUDA torch, cmake and CUTLASS headers are found
  MAX_JOBS                      parallel compile jobs of the extension build (default min(CPUs, 4))
  DPT_FAST_CUDA_GENCODE         nvcc targets instead of sm_80 + PTX and sm_90a, e.g.
                                "-gencode=arch=compute_90a,code=sm_90a" for a quick Hopper-only build
  DPT_FAST_CUTLASS_INCLUDE      CUTLASS include folder instead of the nvidia-cutlass wheel's
"""
from __future__ import annotations

import os

AUTOTUNE_MODES = ("full", "quick")
SPLIT_K_MAX = 65535  # the split is a grid dimension 1, limited to 65535 by CUDA

# the values the switches that choose among the kernels take when they are not set
_KERNEL_DEFAULTS = {"DPT_FAST_ATTENTION_TMA": "1", "DPT_FAST_REASSEMBLE_SPLIT_K": ""}

TRITON_INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE: str = os.environ.get("DPT_FAST_AUTOTUNE", "")
ATTENTION_TMA: str = os.environ.get("DPT_FAST_ATTENTION_TMA", _KERNEL_DEFAULTS["DPT_FAST_ATTENTION_TMA"])
REASSEMBLE_SPLIT_K: str = os.environ.get("DPT_FAST_REASSEMBLE_SPLIT_K", _KERNEL_DEFAULTS["DPT_FAST_REASSEMBLE_SPLIT_K"])

BUILD_TIME = ("DPT_FAST_BUILD_CUDA", "MAX_JOBS", "DPT_FAST_CUDA_GENCODE", "DPT_FAST_CUTLASS_INCLUDE")


def autotune_mode(value: str | None = None) -> str:
    """The autotune mode of `value` (default: DPT_FAST_AUTOTUNE as read): "full" when empty, else "full" or
    "quick" (case and surrounding blanks ignored); any other value raises ValueError."""
    raw = AUTOTUNE if value is None else value
    mode = raw.strip().lower() or "full"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"DPT_FAST_AUTOTUNE={raw!r}: expected one of {', '.join(AUTOTUNE_MODES)} "
                         "(full autotunes over every config, quick runs the first)")
    return mode


def attention_tma() -> bool:
    """Whether the attention may take its TMA kernels (DPT_FAST_ATTENTION_TMA is not "0")."""
    return ATTENTION_TMA.strip() != "0"


def reassemble_split_k() -> int | None:
    """The forced split-K count (DPT_FAST_REASSEMBLE_SPLIT_K), or None for the heuristic."""
    raw = REASSEMBLE_SPLIT_K.strip()
    if not raw:
        return None
    try:
        count = max(1, int(raw))
    except ValueError:
        raise ValueError(f"DPT_FAST_REASSEMBLE_SPLIT_K={raw!r}: expected an integer split count") from None
    if count > SPLIT_K_MAX:
        raise ValueError(f"DPT_FAST_REASSEMBLE_SPLIT_K={count}: at most {SPLIT_K_MAX} splits")
    return count


def kernel_switches() -> dict:
    """The switches that choose among the kernels (DPT_FAST_ATTENTION_TMA, DPT_FAST_REASSEMBLE_SPLIT_K) that
    are set away from their defaults, as given (what a benchmark report records beside the autotune mode)."""
    given = {"DPT_FAST_ATTENTION_TMA": ATTENTION_TMA, "DPT_FAST_REASSEMBLE_SPLIT_K": REASSEMBLE_SPLIT_K}
    return {name: value for name, value in given.items() if value.strip() != _KERNEL_DEFAULTS[name]}


def switches() -> dict:
    """The run-time switches as read (what a benchmark report records)."""
    return {"TRITON_INTERPRET": TRITON_INTERPRET, "DPT_FAST_AUTOTUNE": autotune_mode(),
            "DPT_FAST_ATTENTION_TMA": ATTENTION_TMA, "DPT_FAST_REASSEMBLE_SPLIT_K": REASSEMBLE_SPLIT_K}
