"""Which implementation the dpt_fast operators run: the plain-PyTorch reference or the fused kernels.

The choice is per thread (a context manager in one thread never changes another thread's model),
and every operator call records which implementation actually ran, so a benchmark can prove that
the fused path was not silently replaced by the reference.
"""
from __future__ import annotations

import collections
import contextlib
import os
import threading

BACKENDS = ("reference", "fused")

_default_backend = "fused"
_local = threading.local()


def get_backend() -> str:
    return getattr(_local, "backend", _default_backend)


def set_backend(name: str) -> None:
    """Set the default backend of every thread (and the backend of the calling thread)."""
    global _default_backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _local.backend = name
    _default_backend = name


class use_backend(contextlib.ContextDecorator):
    """Choose the backend of the calling thread: `with dpt_fast.use_backend("reference"): ...`, or
    `dpt_fast.use_backend("fused")` as a plain setter. Other threads are not affected (use
    `set_backend` to change the default of every thread)."""

    def __init__(self, name: str):
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
        self._previous = getattr(_local, "backend", None)
        _local.backend = name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._previous is None:
            del _local.backend
        else:
            _local.backend = self._previous
        return False


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --- record of what ran -------------------------------------------------------------------------

_record_lock = threading.Lock()
_ran: collections.Counter = collections.Counter()


def record(op: str, impl: str) -> None:
    """Count one call of `op` served by `impl` ("reference", "triton", "cuda", ...)."""
    with _record_lock:
        _ran[(op, impl)] += 1


def implementations_ran(reset: bool = False) -> dict[str, dict[str, int]]:
    """{op: {impl: calls}} since the last reset; benchmarks store this next to their timings."""
    with _record_lock:
        out: dict[str, dict[str, int]] = {}
        for (op, impl), n in _ran.items():
            out.setdefault(op, {})[impl] = n
        if reset:
            _ran.clear()
    return out
