"""Measurement tools shared by `dpt-fast bench` (dpt_fast.bench) and the kernel and training benchmarks
(benchmarks/): what a result records of its environment, the two measured ceilings (matmul peak, copy
bandwidth) that fractions are stated against, timing of calls (CUDA events on GPU, wall and CPU clock on
CPU), time limits for steps that may run long (torch.compile), the check that the fused path served every
call, and the atomic JSON write that keeps a run cut short readable.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path

import torch

from . import env as switches
from .fileio import atomic_write_bytes

__all__ = ["FUSED_OPS", "DeadlineExceeded", "deadline", "describe_error", "device_name", "environment",
           "measure_ceilings", "measure_copy_bandwidth", "measure_matmul_peak", "package_version", "record_deadline",
           "record_failure", "recover_after_deadline", "release_memory", "synchronize", "time_calls", "time_interleaved",
           "timing_method", "verify_fused", "warm_up_compiler", "write_json"]


def package_version(module: str) -> str | None:
    """The installed version of `module` ("unknown" when it states none), None when it cannot be imported."""
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "unknown")
    except Exception:  # noqa: BLE001 -- absent or broken: recorded as missing
        return None


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def describe_error(error: BaseException, limit: int = 500) -> str:
    """One line for a results table: the error's type and the first line of its message."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:limit]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _autotune_as_set() -> str:
    """DPT_FAST_AUTOTUNE's mode, or the value as given when it is not one (the kernels refuse it: the
    report still says what was set)."""
    try:
        return switches.autotune_mode()
    except ValueError:
        return switches.AUTOTUNE


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import dpt_fast
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "dpt_fast": dpt_fast.__version__, "torch": torch.__version__, "triton": package_version("triton"),
            "timm": package_version("timm"), "transformers": package_version("transformers"), "python": platform.python_version(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        },
        "git_commit": _git_commit(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        # as dpt_fast.env read them (or a test or benchmark set them there), which is what the kernels follow
        "triton_interpret": switches.TRITON_INTERPRET,
        "autotune": _autotune_as_set(),
        "kernel_switches": switches.kernel_switches(),  # those that change which kernels run, where set
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count}
    return env


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    """Measured dense matmul TFLOP/s of `dtype` on `device` (the ceiling MFU is stated against)."""
    n = 8192 if device.type == "cuda" else 512
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        times = time_calls(lambda: a @ b, device, warmup=3, runs=20 if device.type == "cuda" else 5, max_time=5.0)
        return 2 * n ** 3 / statistics.median(times) / 1e12
    except Exception:  # noqa: BLE001 -- a ceiling we cannot measure is reported as missing
        return None


def measure_copy_bandwidth(device: torch.device) -> float | None:
    """Measured device-to-device copy TB/s (bytes read + bytes written), 1 GiB on GPU, random data."""
    n = (1 << 28) if device.type == "cuda" else (1 << 22)  # float32 elements: 1 GiB / 16 MiB
    try:
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        times = time_calls(lambda: dst.copy_(src), device, warmup=3, runs=20 if device.type == "cuda" else 5,
                           max_time=5.0)
        return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e12
    except Exception:  # noqa: BLE001
        return None
    finally:
        src = dst = None  # noqa: F841
        if device.type == "cuda":
            torch.cuda.empty_cache()


def measure_ceilings(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The two measured ceilings every benchmark states its fractions against (ARCHITECTURE.md, section 5):
    dense matmul TFLOP/s of `dtype` (8192^3 on GPU) and device-to-device copy TB/s (read + write)."""
    matmul = measure_matmul_peak(device, dtype)
    copy = measure_copy_bandwidth(device)
    return {"matmul_tflops": None if matmul is None else float(f"{matmul:.4g}"),
            "copy_tbps": None if copy is None else float(f"{copy:.4g}"),
            "dtype": str(dtype).replace("torch.", ""),
            "method": (f"{timing_method(device)}, random normal data: torch.matmul "
                       f"{8192 if device.type == 'cuda' else 512}^3 (2*n^3 FLOPs); copy_ of "
                       f"{'1 GiB' if device.type == 'cuda' else '16 MiB'} counting bytes read + written")}


def timing_method(device: torch.device) -> str:
    """How time_calls measured on `device`, for the reports (the JSON and the table say it)."""
    if device.type == "cuda":
        return "median of CUDA-event timings after warm-up"
    return (f"median of time.perf_counter wall-clock timings after warm-up, {torch.get_num_threads()} "
            "intra-op thread(s); cpu_ms: the process's CPU time per call (time.process_time)")


class DeadlineExceeded(BaseException):
    """Raised inside a `deadline` block when its time is up. A BaseException, so that the `except
    Exception` of torch.compile's internals (autotuning, backend errors) cannot swallow it."""


@contextlib.contextmanager
def deadline(seconds: float | None, what: str = "this step"):
    """Raise DeadlineExceeded in the main thread after `seconds` (SIGALRM; a no-op for None/inf, outside
    the main thread, or where SIGALRM does not exist). Used to cap torch.compile(mode="max-autotune"),
    which can take many minutes, within a run's time budget."""
    if (seconds is None or not math.isfinite(seconds) or not hasattr(signal, "setitimer")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    if seconds <= 0:
        raise DeadlineExceeded(f"{what}: no time left")

    def _expire(signum, frame):
        raise DeadlineExceeded(f"{what}: over its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_COMPILER_WARM: set = set()


def warm_up_compiler(device: torch.device | str) -> float | None:
    """Compile and run a trivial function once on `device`, outside any deadline, so that torch.compile's
    lazy imports and one-time set-up are done before a `deadline` can interrupt a compile (an import cut
    in the middle can leave a module half-registered for the rest of the process). Returns the seconds it
    took (None when it failed or was already done)."""
    key = torch.device(device).type
    if key in _COMPILER_WARM:
        return None
    _COMPILER_WARM.add(key)
    t0 = time.perf_counter()
    try:
        import importlib
        importlib.import_module("torch._inductor.compile_fx")  # (an `import torch.x` here would shadow torch)
        fn = torch.compile(lambda t: torch.relu(t) * 2 + 1, dynamic=False)
        fn(torch.randn(16, device=device))
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 -- the compile rows then report their own errors
        return None
    return time.perf_counter() - t0


def recover_after_deadline() -> None:
    """Global state a DeadlineExceeded may have cut short of restoring: grad mode, dynamo's caches."""
    torch.set_grad_enabled(True)
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass


FUSED_OPS = ("dpt_fast::attention", "dpt_fast::reassemble", "dpt_fast::residual_conv_unit")


def verify_fused(ran: dict, required=()) -> dict:
    """Did the fused implementations serve every call? `ran` is dpt_fast.implementations_ran();
    `required` names operators that must have been called. Any call served by "reference" is a problem
    (a fused benchmark must never time the reference silently)."""
    problems = [f"{op} was never called" for op in required if not ran.get(op)]
    for op, impls in sorted(ran.items()):
        if impls.get("reference"):
            problems.append(f"{op}: the reference served {impls['reference']} of {sum(impls.values())} calls")
    return {"verified": not problems, "problems": problems}


def write_json(path, obj) -> None:
    """Write `obj` as JSON atomically (a run killed mid-write keeps the previous complete file)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, default=str) + "\n").encode())


def record_failure(result: dict, error: Exception) -> None:
    """A variant that raised: its row says why (out of memory, or the error's first line)."""
    result["error"] = "out of memory" if isinstance(error, torch.OutOfMemoryError) else describe_error(error)


def record_deadline(result: dict, phase: str, started: float, compile_mode: str | None = None) -> None:
    """A variant stopped by `deadline`: mark its row as skipped, saying whether compilation (compile_mode
    given: the cap on a compiled variant's first call) or the run's time budget stopped it."""
    recover_after_deadline()
    spent = time.perf_counter() - started
    if compile_mode is not None:
        result["timed_out"] = "compile"
        result["error"] = f"skipped: compile over budget ({compile_mode}, stopped after {spent:.0f} s)"
    else:
        result["timed_out"] = phase
        result["error"] = f"skipped: time budget spent during {phase} (stopped after {spent:.0f} s)"


# --- timing --------------------------------------------------------------------------------------

def time_calls(fn, device: torch.device, warmup: int, runs: int, max_time: float, min_runs: int = 3,
               cpu_times: list | None = None) -> list[float]:
    """Seconds per call: warm-up excluded; CUDA events on GPU, perf_counter on CPU. On CPU, `cpu_times`
    (a list, when given) receives each call's process CPU time: unlike the wall clock it does not count
    the time other processes held the cores."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max(runs, min_runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.append(time.process_time() - c0)
        if len(times) >= min_runs and time.perf_counter() - started > max_time:
            break
    return times


def release_memory(device: torch.device) -> None:
    """After a variant: drop torch.compile's caches and the variant's tensors, return cached GPU memory."""
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_interleaved(calls: list, device, warmup: int, runs: int, max_time: float, min_runs: int = 3):
    """Time several callables in turns (A B C, C B A, A B C, ...) rather than one after the other, so that a
    change of the machine's load during the run (other processes on a shared CPU) reaches all of them alike.
    Returns per callable (wall seconds, process CPU seconds) of each timed call."""
    for _ in range(warmup):
        for fn in calls:
            fn()
    synchronize(device)
    walls: list[list[float]] = [[] for _ in calls]
    cpus: list[list[float]] = [[] for _ in calls]
    started = time.perf_counter()
    for round_ in range(max(runs, min_runs)):
        order = range(len(calls)) if round_ % 2 == 0 else reversed(range(len(calls)))
        for i in order:
            c0, t0 = time.process_time(), time.perf_counter()
            calls[i]()
            synchronize(device)
            walls[i].append(time.perf_counter() - t0)
            cpus[i].append(time.process_time() - c0)
        if round_ + 1 >= min_runs and time.perf_counter() - started > max_time * len(calls):
            break
    return list(zip(walls, cpus))
