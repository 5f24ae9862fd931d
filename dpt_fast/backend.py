"""Which implementation the dpt_fast operators run (the backend), per thread:

- "fused": the registered operators, running the fused kernels where they apply and the reference elsewhere;
- "reference": the registered operators, always running the plain-PyTorch reference;
- "inline": no registered operator at all: the public op functions compute the reference math directly
  as ordinary PyTorch, so torch.compile, torch.export, ONNX exporters and FLOP counters see plain aten ops.
  Its attention form is "matmul" (explicit softmax, the reference's math) or "sdpa"
  (F.scaled_dot_product_attention), chosen with `use_backend("inline", inline_attention=...)`.

The choice is per thread (a context manager in one thread never changes another thread's model),
and every call of a registered operator records which implementation actually ran, so a benchmark can
prove that the fused path was not silently replaced by the reference (inline calls record nothing: they
are not operator calls).
"""
from __future__ import annotations

import collections
import functools
import threading

BACKENDS = ("reference", "fused", "inline")
INLINE_ATTENTION = ("matmul", "sdpa")

_default_backend = "fused"
_local = threading.local()


def get_backend() -> str:
    return getattr(_local, "backend", _default_backend)


def inline_attention() -> str:
    """The attention form of the "inline" backend in the calling thread: "matmul" or "sdpa"."""
    return getattr(_local, "inline_attention", "matmul")


def set_backend(name: str) -> None:
    """Set the default backend of every thread (and the backend of the calling thread)."""
    global _default_backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _local.backend = name
    _default_backend = name


_THREAD_CHOICE = ("backend", "inline_attention")


def _thread_choice() -> tuple:
    return tuple(getattr(_local, attr, None) for attr in _THREAD_CHOICE)


def _put_thread_choice(values: tuple) -> None:
    for attr, value in zip(_THREAD_CHOICE, values):
        if value is None:
            if hasattr(_local, attr):
                delattr(_local, attr)
        else:
            setattr(_local, attr, value)


class use_backend:
    """Choose the backend of the calling thread: `with dpt_fast.use_backend("reference"): ...`,
    `@dpt_fast.use_backend("reference")` on a function (each call runs under it), or
    `dpt_fast.use_backend("fused")` as a plain setter. Other threads are not affected (use
    `set_backend` to change the default of every thread). `inline_attention` ("matmul" or "sdpa")
    picks the attention form of the "inline" backend."""

    def __init__(self, name: str, inline_attention: str = "matmul"):
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
        if inline_attention not in INLINE_ATTENTION:
            raise ValueError(f"inline_attention must be one of {INLINE_ATTENTION}, got {inline_attention!r}")
        self._choice = (name, inline_attention)
        # set at once, so that the plain-setter form works; the first `with` block adopts this setting
        self._restore = [_thread_choice()]
        self._set_by_init = True
        _put_thread_choice(self._choice)

    def __enter__(self):
        if self._set_by_init:
            self._set_by_init = False
        else:  # the same object entered again: set anew, restore what that block found
            self._restore.append(_thread_choice())
            _put_thread_choice(self._choice)
        return self

    def __exit__(self, *exc):
        _put_thread_choice(self._restore.pop())
        return False

    def __call__(self, func):
        if self._set_by_init:  # a decorator chooses for its calls, not for the code that defines them
            self._set_by_init = False
            _put_thread_choice(self._restore.pop())
        name, inline = self._choice

        @functools.wraps(func)
        def under_backend(*args, **kwargs):
            with use_backend(name, inline):
                return func(*args, **kwargs)
        return under_backend


def triton_interpreting() -> bool:
    """TRITON_INTERPRET=1, as dpt_fast.env read it."""
    from . import env
    return env.TRITON_INTERPRET


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
