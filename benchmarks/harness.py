"""What the benchmark scripts beside this file share: the GPU precondition, the report every kernel benchmark
writes (environment, measured ceilings, what ran, notes, rewritten after every row), rows that fail or run
out of memory without stopping the run, the eager/fused rows within their share of the time budget, the
compiled baselines under a time budget and a compile cap, their markdown cells, and the closing verdict.
The end-to-end benchmark (`dpt-fast bench`, dpt_fast/bench.py) is the package's; the pieces both need
(environment record, ceilings, deadlines, the fused-path verdict, atomic JSON) are dpt_fast.measure's.

The scripts import this module by its path (`sys.path` gets this folder), so they run from anywhere:

    python benchmarks/bench_rcu.py --out rcu.json
"""
from __future__ import annotations

import sys
import time

# torch is imported inside the functions: a script's --help works where torch is slow or absent


def gpu_blocker() -> str | None:
    """Why a GPU benchmark would measure nothing meaningful here; None when it can run."""
    import torch
    from dpt_fast import env  # the switches as the kernels read them
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none is available here); nothing was measured"
    if env.TRITON_INTERPRET:
        return "TRITON_INTERPRET=1 would time the Triton interpreter; unset it"
    try:
        mode = env.autotune_mode()
    except ValueError as error:
        return str(error)
    if mode == "quick":
        return "DPT_FAST_AUTOTUNE=quick would time untuned kernels (first config only); unset it"
    return None


def refuse_without_gpu(script: str, smoke: bool) -> int | None:
    """Exit status 2 with one line on stderr when `script` cannot measure here (--smoke dry runs always
    can); None when it may go on."""
    blocker = None if smoke else gpu_blocker()
    if blocker:
        print(f"{script}: {blocker}", file=sys.stderr)
        return 2
    return None


def fraction(value: float | None, ceiling: float | None) -> float | None:
    """value / ceiling (4 significant digits); None when either is missing."""
    return None if value is None or not ceiling else float(f"{value / ceiling:.4g}")


def median_ms(fn, device="cuda", warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA (CUDA events, L2 flushed between
    calls, warm-up excluded); on CPU (the --smoke dry runs only) a few perf_counter timings after one
    warm-up call."""
    import statistics

    import torch
    if torch.device(device).type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_ms(fn, backward_inputs=None, grad=None, compiled: bool = False, device="cuda",
            scale_to_call: bool = False) -> float:
    """Median ms of fn() (under no_grad), or of fn() and torch.autograd.grad over backward_inputs. One
    untimed call first (compilation, autotuning). scale_to_call: warm-up and repetition windows of at least
    2 and 8 times one call (slow calls still get several timed repetitions)."""
    import torch

    def mark():
        if compiled:  # CUDA-graph trees (max-autotune) want a step marker per iteration
            torch.compiler.cudagraph_mark_step_begin()

    if backward_inputs is None:
        def call():
            mark()
            with torch.no_grad():
                fn()
    else:
        def call():
            mark()
            torch.autograd.grad(fn(), backward_inputs, grad)
    cuda = torch.device(device).type == "cuda"
    call()
    if cuda:
        torch.cuda.synchronize()
    if not scale_to_call:
        return median_ms(call, device)
    t0 = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize()
    once_ms = (time.perf_counter() - t0) * 1e3
    return median_ms(call, device, warmup_ms=max(25, 2 * once_ms), rep_ms=max(100, 8 * once_ms))


def empty_cache(device) -> None:
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def allow_a_compile_per_shape() -> None:
    """Raise torch._dynamo's recompile limit (8 by default) to 256: the compiled baselines are compiled with
    dynamic=False, so every shape of a table is one more compilation of the same function."""
    import torch
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)


def fused_path_remark(row: dict) -> str:
    """The end of a row's progress line: empty when the fused path served every call, else what did not."""
    return "" if row["fused_path"]["verified"] else f"  NOT THE FUSED PATH: {row['fused_path']['problems']}"


def compiled_cells(row: dict) -> tuple[str, str]:
    """A row's compiled-baseline cells of a markdown table (the fields KernelBenchmark.time_compiled writes):
    its ms ("over budget" when the compile was cut short, "-" when it did not run) and fused's speed-up."""
    ms = f"{row['compiled_ms']:.3f}" if row.get("compiled_ms") is not None else (
        "over budget" if "over budget" in row.get("compiled_note", "") else "-")
    speedup = f"{row['speedup_vs_compiled']:.2f}x" if row.get("speedup_vs_compiled") else "-"
    return ms, speedup


def note_lines(report: dict) -> list[str]:
    """The markdown closing a table: the run's notes as a list (nothing when there are none)."""
    return [""] + [f"- {n}" for n in report["notes"]] if report["notes"] else []


class KernelBenchmark:
    """One run of a kernel benchmark script: its report (a dict written as JSON to --out after every row),
    its clock and time budget (args.budget_s), and the steps every such script takes."""

    METHOD = ("triton.testing.do_bench median (ms), CUDA events, L2 flushed, warm-up excluded; random normal "
              "data")
    SMOKE_METHOD = "--smoke dry run on the CPU: perf_counter medians of a few calls; not a measurement"

    def __init__(self, name: str, args, device: str, compute_dtype, **environment_extra):
        import torch

        from dpt_fast.measure import environment, measure_ceilings
        self.args, self.device, self.dtype, self.start = args, device, compute_dtype, time.time()
        torch.manual_seed(0)
        self.ceilings = measure_ceilings(torch.device(device), compute_dtype)  # matmul peak, copy bandwidth
        self.report = {**environment(torch.device(device), compute_dtype), "benchmark": name,
                       **environment_extra, "method": self.SMOKE_METHOD if args.smoke else self.METHOD,
                       "smoke": args.smoke,
                       "args": {k: v for k, v in vars(args).items() if not k.endswith("_list")},
                       "ceilings": self.ceilings, "matmul_peak_tflops": self.ceilings["matmul_tflops"],
                       "implementations_ran": {}, "notes": [], "complete": False}

    def elapsed(self) -> float:
        return time.time() - self.start

    def save(self) -> None:
        """Rewrite --out (atomically): a run cut short keeps every row it measured."""
        from dpt_fast.measure import write_json
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        if self.args.out:
            write_json(self.args.out, self.report)

    def account(self, row: dict, ran: dict, required) -> None:
        """Record on `row` which implementation served each operator (dpt_fast.implementations_ran()) and the
        verdict on the fused path, and add the calls to the run's total."""
        from dpt_fast.measure import verify_fused
        row["implementations_ran"] = ran
        row["fused_path"] = verify_fused(ran, required)
        for op, impls in ran.items():
            total = self.report["implementations_ran"].setdefault(op, {})
            for impl, n in impls.items():
                total[impl] = total.get(impl, 0) + n

    def attempt(self, label: str, measure):
        """measure() -> a row, or None when it ran out of memory or failed: the run's notes say so and the run
        goes on (one failing case must not lose the others)."""
        import torch

        from dpt_fast.measure import describe_error
        try:
            return measure()
        except torch.cuda.OutOfMemoryError:
            self.report["notes"].append(f"out of memory: {label}")
        except Exception as e:  # noqa: BLE001
            self.report["notes"].append(f"failed: {label}: {describe_error(e, 300)}")
            print(f"{label} FAILED: {e!r}", file=sys.stderr, flush=True)
        finally:
            empty_cache(self.device)
        self.save()
        return None

    def measure_rows(self, cases, label, measure, describe) -> list:
        """The eager and fused rows of the scripts with compiled baselines: for each case in order,
        row = measure(case) through attempt(), its compiled baseline marked pending (or "not run
        (--no-compile)"), appended to report["results"], printed (describe(row)) and saved. No row starts
        after the rows' share of --budget-s (all of it with --no-compile, else 1 - --compile-share); the
        cases left are noted as skipped. Returns [(case, row)] of the rows measured, in order."""
        args = self.args
        rows_deadline = args.budget_s * (1.0 if args.no_compile else 1.0 - args.compile_share)
        measured = []
        for case in cases:
            name = label(case)
            if self.elapsed() > rows_deadline:
                self.report["notes"].append(f"skipped: time budget for eager/fused rows spent: {name}")
                continue
            row = self.attempt(name, lambda: self._with_compiled_pending(measure(case)))
            if row is None:
                continue
            self.report["results"].append(row)
            print(describe(row) + fused_path_remark(row), flush=True)
            self.save()
            measured.append((case, row))
        return measured

    def _with_compiled_pending(self, row: dict) -> dict:
        row["compiled_ms"] = None
        row["compiled_note"] = "not run (--no-compile)" if self.args.no_compile else "pending"
        return row

    def time_compiled(self, row: dict, measure, label: str, forget=None) -> bool:
        """A compiled baseline for `row`: row["compiled_ms"] = measure() (first call = compilation), capped at
        --compile-timeout-s and at what is left of --budget-s; over either, row["compiled_note"] says
        "skipped: ..." and forget() drops the compiled callable (its compilation was cut short). Returns
        whether it was measured."""
        from dpt_fast.measure import DeadlineExceeded, deadline, describe_error, recover_after_deadline
        args = self.args
        left = args.budget_s - self.elapsed()
        if left < 5:
            row["compiled_note"] = f"skipped: time budget (--budget-s {args.budget_s:.0f}) spent"
            self.save()
            return False
        t0 = time.time()
        try:
            with deadline(min(args.compile_timeout_s, left), "compiled baseline"):
                row["compiled_ms"] = measure()
        except DeadlineExceeded:
            row["compiled_note"] = (f"skipped: compile over budget ({args.compile_mode}, stopped after "
                                    f"{time.time() - t0:.0f} s)")
            recover_after_deadline()
            if forget is not None:
                forget()
            empty_cache(self.device)
            self.save()
            print(f"{label} compiled: {row['compiled_note']}", flush=True)
            return False
        except Exception as e:  # noqa: BLE001 -- a failed compile is a result to record, not a crash of the run
            row["compiled_note"] = f"failed: {describe_error(e, 300)}"
            self.save()
            return False
        row["compiled_note"] = f"mode={args.compile_mode}, compile + timing {time.time() - t0:.0f} s"
        row["speedup_vs_compiled"] = row["compiled_ms"] / row["fused_ms"]
        print(f"{label} compiled {row['compiled_ms']:9.3f} ms  fused x{row['speedup_vs_compiled']:.2f}", flush=True)
        self.save()
        return True

    def finish(self, rows: list, markdown, path_name: str) -> int:
        """Close the run: the fused-path verdict over every row, the markdown table, the final save. Returns
        the script's exit status: 1 when a fused row was (partly) served by the reference."""
        report = self.report
        report["fused_path_verified"] = bool(rows) and all(r["fused_path"]["verified"] for r in rows)
        warning = None
        if rows and not report["fused_path_verified"]:
            warning = f"WARNING: the {path_name} path did not serve every call: {report['implementations_ran']}"
            report["notes"].append(warning)
        report["complete"] = True
        report["markdown"] = markdown(report)
        self.save()
        print(report["markdown"])
        if warning:
            print(warning, file=sys.stderr)
            return 1
        return 0
