"""The op layer's one switch: which implementation serves a call, and the record of what ran.

Every registered operator body calls `serve`, which runs the fused implementation when the operator
says it applies and the reference otherwise, and counts the choice in `dpt_fast.implementations_ran()`.
The public op functions call `inlined()` first: under the "inline" backend they skip the registered
operator altogether and compute the reference math as plain PyTorch (see dpt_fast.backend).
"""
from __future__ import annotations

from typing import Callable

from .. import backend


def inlined() -> bool:
    """True when the calling thread's backend is "inline": compute plain PyTorch, call no operator."""
    return backend.get_backend() == "inline"


def fused_chosen(backend_name: str | None = None) -> bool:
    """True when the backend (the calling thread's, or `backend_name` captured by a forward for its
    backward) asks for the fused kernels; whether they apply to a call is the operator's question."""
    return (backend_name or backend.get_backend()) == "fused"


def serve(op: str, use_fused: bool, fused: Callable, reference: Callable, *args, fused_name: str = "triton"):
    """Run `fused(*args)` if `use_fused`, else `reference(*args)`, and record which ran under `op`."""
    if use_fused:
        backend.record(op, fused_name)
        return fused(*args)
    backend.record(op, "reference")
    return reference(*args)
