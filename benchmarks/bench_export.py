"""Exported-model benchmark (CPU): ONNX Runtime latency of dpt-fast's exported ONNX model against eager
PyTorch and against transformers' DPT exported the same way, in one process on one machine.

Variants, every one on the same random input (random weights: latency does not depend on them):

  dpt_fast eager   DPTDepthModel in eager PyTorch (on a CPU the operators run their reference)
  dpt_fast onnx    dpt_fast.export's ONNX file (dynamic batch/height/width, opset 18) in ONNX Runtime
  hf eager         transformers' DPTForDepthEstimation of the same architecture (SDPA attention)
  hf onnx          the same model through the same exporter (torch.onnx.export, dynamo, opset 18), with
                   dynamic batch/height/width if it exports that way, else at the benchmark's fixed shape
                   (recorded as `dynamic: false` with the error)

Latency: median of --runs calls after --warmup calls, wall clock, the variants interleaved call by call
(so load from other processes falls on all of them alike; the load average is recorded), batch --batch at --size x --size. ONNX
Runtime uses its CPU execution provider; both libraries use their default thread counts, or --threads N each. The
JSON records the machine, versions, date, export times, each file's size and the ONNX-vs-eager error.

    python benchmarks/bench_export.py --model hybrid --size 384 --out benchmarks/results/export-cpu.json
    python benchmarks/bench_export.py --model tiny --size 256 --runs 5   # a quick look
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _time_interleaved(variants: dict, warmup: int, runs: int) -> dict:
    """{name: timings}: every round calls each variant once, in turn, so that load from other processes
    falls on all variants alike."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in variants}
    for _ in range(runs):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "runs": runs}
            for name, t in times.items()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _onnx_session(path: Path, threads: int | None = None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _export_hf(model, x: torch.Tensor, path: Path) -> dict:
    """transformers' DPT through torch.onnx.export (dynamo), dynamic shapes first, else fixed."""

    class Depth(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, image):
            return self.inner(pixel_values=image).predicted_depth

    wrapper = Depth(model).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    side = torch.export.Dim("side_blocks", min=1, max=256)
    attempts = [("dynamic", {"image": {0: batch, 2: 32 * side, 3: 32 * side}}), ("fixed", None)]
    errors = {}
    for kind, shapes in attempts:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                program = torch.onnx.export(wrapper, (x,), dynamo=True, opset_version=18, dynamic_shapes=shapes,
                                            input_names=["image"], output_names=["depth"], verbose=False)
            program.save(str(path))
            return {"dynamic": kind == "dynamic", "export_s": time.perf_counter() - t0, "errors": errors}
        except Exception as exc:  # record why, then try the fixed shape
            errors[kind] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    return {"dynamic": None, "errors": errors}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="hybrid", choices=("hybrid", "large", "base", "tiny"))
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for PyTorch and ONNX Runtime alike (default: each library's own default)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' DPT")
    parser.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = parser.parse_args(argv)
    if args.size % 32:
        parser.error("--size must be a multiple of 32")

    import onnxruntime
    import dpt_fast
    from dpt_fast import bench, export as E

    if args.threads:
        torch.set_num_threads(args.threads)
    report = {
        "benchmark": "export-cpu", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__, "dpt_fast": dpt_fast.__version__},
        "model": args.model, "size": args.size, "batch": args.batch, "threads": args.threads, "rows": [],
    }
    for name in ("onnx", "transformers"):
        try:
            report["versions"][name] = __import__(name).__version__
        except ImportError:
            pass
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    folder = Path(tempfile.mkdtemp(prefix="bench-export-"))

    variants, extras = {}, {}
    model = bench.build_dpt(args.model, "cpu", torch.float32, train=False)
    with torch.no_grad():
        expected = model(x)
    variants["dpt_fast eager"] = lambda: _no_grad(model, x)
    t0 = time.perf_counter()
    result = E.export(model, folder / "dpt_fast.onnx", progress=True)
    export_s = time.perf_counter() - t0
    run = _onnx_session(result.path, args.threads)
    err = float((torch.from_numpy(run(x.numpy())) - expected).abs().max() / expected.abs().max())
    variants["dpt_fast onnx"] = lambda: run(x.numpy())
    extras["dpt_fast onnx"] = dict(export_s=export_s, dynamic=True, file_mb=result.path.stat().st_size / 2**20,
                                   relative_error_vs_eager=err)

    if not args.no_hf:
        try:
            hf = bench.build_hf(args.model, "cpu", torch.float32, train=False, image_size=args.size).eval()
        except Exception as exc:  # transformers missing or refusing the configuration: recorded, not fatal
            report["hf_error"] = f"{type(exc).__name__}: {exc}"
        else:
            variants["hf eager"] = lambda: _no_grad(lambda t: hf(pixel_values=t).predicted_depth, x)
            print("[bench_export] exporting transformers' DPT", file=sys.stderr, flush=True)
            info = _export_hf(hf, x, folder / "hf.onnx")
            if info.get("dynamic") is None:
                report["rows"].append({"variant": "hf onnx", "error": info["errors"]})
            else:
                hf_run = _onnx_session(folder / "hf.onnx", args.threads)
                variants["hf onnx"] = lambda: hf_run(x.numpy())
                extras["hf onnx"] = dict(export_s=info["export_s"], dynamic=info["dynamic"],
                                         export_errors=info["errors"],
                                         file_mb=(folder / "hf.onnx").stat().st_size / 2**20)

    print(f"[bench_export] timing {', '.join(variants)} ({args.runs} interleaved rounds)", file=sys.stderr, flush=True)
    for name, timing in _time_interleaved(variants, args.warmup, args.runs).items():
        report["rows"].append({"variant": name, **timing, **extras.get(name, {})})
        print(f"  {name}: {timing['median_ms']:.1f} ms", file=sys.stderr, flush=True)
    report["load_average_at_end"] = os.getloadavg()

    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def _no_grad(fn, x):
    with torch.no_grad():
        return fn(x)


if __name__ == "__main__":
    sys.exit(main())
