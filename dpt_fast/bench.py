"""`dpt-fast bench`: end-to-end DPT latency, throughput, memory and FLOP/s, dpt-fast against the baselines.

All variants run in one process on one device, on the same random input, with random weights (nothing
is downloaded):

  fused              dpt-fast, fused operators (use_backend("fused")), eager
  fused+compile      the same under torch.compile (--compile-mode, default max-autotune); the fused
                     operators stay opaque custom ops inside the compiled graph
  reference          dpt-fast's reference operators (use_backend("reference")), eager: the specification
  reference+compile  the reference model under torch.compile(mode=max-autotune), with the three operators
                     inlined as plain PyTorch so that Inductor sees through them (attention as
                     F.scaled_dot_product_attention on the split heads, as timm's ViT does): what a user
                     gets from compiling the original architecture
  hf-sdpa            Hugging Face transformers' DPTForDepthEstimation, attn_implementation="sdpa", random
                     init from a DPTConfig matching the model (when transformers is installed)

Latency is the median of timed runs (CUDA events on GPU, perf_counter on CPU) after warm-up; the first
call's time (compilation included) is reported separately. FLOPs are counted once per configuration with
torch.utils.flop_counter on the meta device (attention counted as its two matmuls). The achieved
fraction of a measured dense matmul peak of the same dtype is reported as MFU. Results go to --out as
JSON, a markdown table and a PNG plot; the JSON records the device, versions, date and, per variant,
which implementation of each dpt_fast operator ran (dpt_fast.implementations_ran()).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

MODELS = {
    "large": {"backbone": "vitl16_384"},
    "hybrid": {"backbone": "vitb_rn50_384"},
    "base": {"backbone": "vitb16_384"},
    "tiny": {"backbone": "vit_tiny_patch16_224", "hooks": [2, 5, 8, 11], "features": 32},
}

# transformers DPTConfig arguments of the same architectures (released models' configs).
HF_CONFIGS = {
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  backbone_out_indices=[5, 11, 17, 23], neck_hidden_sizes=[256, 512, 1024, 1024]),
    "hybrid": dict(is_hybrid=True, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, backbone_out_indices=[2, 5, 8, 11],
                   neck_hidden_sizes=[256, 512, 768, 768], backbone_featmap_shape=[1, 1024, 24, 24],
                   neck_ignore_stages=[0, 1]),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 backbone_out_indices=[2, 5, 8, 11], neck_hidden_sizes=[96, 192, 384, 768]),
    "tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                 image_size=224, backbone_out_indices=[2, 5, 8, 11], neck_hidden_sizes=[32, 32, 32, 32],
                 fusion_hidden_size=32),
}
HF_COMMON = dict(image_size=384, patch_size=16, readout_type="project", fusion_hidden_size=256, layer_norm_eps=1e-6)

VARIANTS = ("fused", "reference", "reference+compile", "fused+compile", "hf-sdpa")
COMPILE_VARIANTS = ("reference+compile", "fused+compile")
BASELINES = ("reference", "reference+compile", "hf-sdpa")
NAMED_SIZES = {"4k": (2160, 3840), "uhd": (2160, 3840), "1080p": (1080, 1920), "720p": (720, 1280)}
TINY_DEFAULTS = {"models": "tiny", "sizes": "64,96", "batch": "2", "warmup": 1, "runs": 3}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --- arguments -----------------------------------------------------------------------------------

def parse_size(text: str) -> tuple[int, int]:
    text = text.strip().lower()
    if text in NAMED_SIZES:
        return NAMED_SIZES[text]
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text)
    if not match:
        raise ValueError(f"size {text!r}: use N, HxW, or one of {', '.join(NAMED_SIZES)}")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


def default_batch(size: tuple[int, int]) -> int:
    return 16 if size[0] * size[1] <= 384 * 384 else 1


def parse_configs(sizes_text: str, batch_text: str | None) -> list[tuple[str, tuple[int, int], int]]:
    """--sizes and --batch -> [(size label, (H, W), batch)]. --batch: one value for all sizes, one per
    size, or absent (16 up to 384x384, else 1). A size may carry its batch: 384:16."""
    labels, sizes, batches = [], [], []
    for part in (p for p in sizes_text.split(",") if p.strip()):
        label, _, batch = part.strip().partition(":")
        labels.append(label)
        sizes.append(parse_size(label))
        batches.append(int(batch) if batch else None)
    if batch_text:
        given = [int(b) for b in batch_text.split(",") if b.strip()]
        if len(given) == 1:
            given = given * len(sizes)
        if len(given) != len(sizes):
            raise ValueError(f"--batch has {len(given)} values for {len(sizes)} sizes")
        batches = [b if b is not None else g for b, g in zip(batches, given)]
    return [(label, size, batch or default_batch(size)) for label, size, batch in zip(labels, sizes, batches)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=None, help=f"comma-separated, from {','.join(MODELS)} "
                        "(default large,hybrid; tiny with --tiny)")
    parser.add_argument("--sizes", default=None, help="comma-separated: N (square), HxW, 4k, 1080p; "
                        "optionally SIZE:BATCH (default 384,1024,1536,4k)")
    parser.add_argument("--batch", default=None, help="batch size for all sizes, or one per size "
                        "(default 16 up to 384x384, else 1)")
    parser.add_argument("--train", action="store_true", help="time a training step (forward + backward) "
                        "instead of inference")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON, table and plot")
    parser.add_argument("--tiny", action="store_true", help="small settings that run on a CPU in seconds: "
                        f"model tiny, sizes {TINY_DEFAULTS['sizes']}, batch {TINY_DEFAULTS['batch']}")
    parser.add_argument("--variants", default=None, help=f"comma-separated, from {','.join(VARIANTS)} "
                        "(default: all; the compile variants only on CUDA unless named here)")
    parser.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode of the compile "
                        "variants (default max-autotune)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 3)")
    parser.add_argument("--runs", type=int, default=None, help="timed calls at most (default 50)")
    parser.add_argument("--max-time", type=float, default=10.0, help="stop timing a variant after this many "
                        "seconds (at least 3 runs)")


# --- environment ---------------------------------------------------------------------------------

def _version(module: str) -> str | None:
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


def gpu_benchmark_blocker() -> str | None:
    """Why a GPU benchmark script would measure nothing meaningful here; None when it can run."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none is available here); nothing was measured"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 would time the Triton interpreter; unset it"
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import dpt_fast
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "dpt_fast": dpt_fast.__version__, "torch": torch.__version__, "triton": _version("triton"),
            "timm": _version("timm"), "transformers": _version("transformers"), "python": platform.python_version(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        },
        "git_commit": _git_commit(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count}
    return env


def _sync(device: torch.device) -> None:
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


# --- the variants --------------------------------------------------------------------------------

def _plain_attention(qkv, num_heads, scale, matmul=False):
    batch, tokens, width = qkv.shape
    q, k, v = qkv.view(batch, tokens, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    if matmul:
        out = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(batch, tokens, width // 3), None


@contextlib.contextmanager
def inline_plain_ops(attention: str = "sdpa"):
    """Route the three dpt_fast operators to plain PyTorch (no custom op boundary), so torch.compile and
    FlopCounterMode see every aten op inside them. attention: "sdpa" or "matmul" (explicit softmax)."""
    import importlib
    from . import reference
    attention_mod = importlib.import_module("dpt_fast.ops.attention")
    reassemble_mod = importlib.import_module("dpt_fast.ops.reassemble")
    rcu_mod = importlib.import_module("dpt_fast.ops.rcu")
    patches = [
        (attention_mod, "attention_op",
         lambda qkv, num_heads, scale: _plain_attention(qkv, num_heads, scale, matmul=attention == "matmul")),
        (reassemble_mod, "reassemble_op", reference.reassemble),
        (rcu_mod, "residual_conv_unit_op", reference.residual_conv_unit),
    ]
    saved = []
    try:
        for module, name, fn in patches:
            if not hasattr(module, name):
                raise RuntimeError(f"dpt_fast.bench: {module.__name__}.{name} is gone; update inline_plain_ops")
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, fn)
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def build_dpt(name: str, device, dtype, train: bool):
    from .models import DPTDepthModel
    with torch.device(device):
        model = DPTDepthModel(**MODELS[name])
    model.to(dtype)
    return model.train(train)


def build_hf(name: str, device, dtype, train: bool):
    from transformers import DPTConfig, DPTForDepthEstimation
    config = DPTConfig(**{**HF_COMMON, **HF_CONFIGS[name]})
    model = DPTForDepthEstimation._from_config(config, attn_implementation="sdpa")
    model.to(device=device, dtype=dtype)
    return model.train(train)


def count_flops(name: str, batch: int, size: tuple[int, int], train: bool) -> int:
    """FLOPs of one forward (or forward + backward) on the meta device: shapes only, no memory."""
    from torch.utils.flop_counter import FlopCounterMode
    model = build_dpt(name, "meta", torch.float32, train)
    x = torch.empty(batch, 3, *size, device="meta", requires_grad=False)
    counter = FlopCounterMode(display=False)
    with inline_plain_ops(attention="matmul"), counter:
        out = model(x)
        if train:
            out.float().mean().backward()
    return int(counter.get_total_flops())


def _step(model, x, train: bool, hf: bool):
    if hf:
        def forward():
            return model(pixel_values=x).predicted_depth
    else:
        def forward():
            return model(x)
    if not train:
        def call():
            with torch.inference_mode():
                return forward()
    else:
        def call():
            model.zero_grad(set_to_none=True)
            out = forward()
            out.float().mean().backward()
            return out
    return call


def time_calls(fn, device: torch.device, warmup: int, runs: int, max_time: float, min_runs: int = 3) -> list[float]:
    """Seconds per call: warm-up excluded; CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
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
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if len(times) >= min_runs and time.perf_counter() - started > max_time:
            break
    return times


def _cleanup(device: torch.device) -> None:
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _summarise_impls(impls: dict) -> str:
    if not impls:
        return ""
    parts = []
    for op, counts in sorted(impls.items()):
        short = op.replace("dpt_fast::", "").replace("residual_conv_unit", "rcu")
        parts.append(f"{short}:{'+'.join(sorted(counts))}")
    return ", ".join(parts)


def run_variant(variant: str, model_name: str, x: torch.Tensor, args, device, dtype, flops, peak) -> dict:
    from . import implementations_ran, use_backend
    result = {"variant": variant, "error": None}
    hf = variant.startswith("hf")
    backend = "reference" if variant.startswith("reference") else "fused"
    compiled = variant.endswith("+compile")
    stack = contextlib.ExitStack()
    model = None
    try:
        stack.enter_context(use_backend(backend))
        if hf:
            model = build_hf(model_name, device, dtype, args.train)
            attn = getattr(model.config, "_attn_implementation", None)
            result["implementations"] = {"transformers": {f"DPTForDepthEstimation(attn_implementation={attn})": 1}}
            if x.shape[-2] != x.shape[-1]:
                raise RuntimeError("transformers' DPT (ViT backbone) reshapes tokens to a square grid: "
                                   "non-square inputs are not supported")
        else:
            model = build_dpt(model_name, device, dtype, args.train)
        if variant == "reference+compile":
            stack.enter_context(inline_plain_ops(attention="sdpa"))
        run_model = model
        if compiled:
            run_model = torch.compile(model, mode=args.compile_mode)
        call = _step(run_model, x, args.train, hf)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        implementations_ran(reset=True)
        t0 = time.perf_counter()
        out = call()
        _sync(device)
        result["first_call_s"] = time.perf_counter() - t0
        if not hf:
            ran = implementations_ran(reset=True)
            if variant == "reference+compile":
                ran = {"inlined": {"plain PyTorch (attention via F.scaled_dot_product_attention)": 1}}
            result["implementations"] = ran
        result["output_shape"] = list(out.shape)
        result["output_finite"] = bool(torch.isfinite(out.float()).all())
        del out
        times = time_calls(call, device, args.warmup, args.runs, args.max_time)
        latency = statistics.median(times)
        batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        result.update({
            "latency_ms": latency * 1e3,
            "latency_ms_min": min(times) * 1e3,
            "runs": len(times),
            "images_per_s": batch / latency,
            "megapixels_per_s": batch * height * width / latency / 1e6,
            "tflops": flops / latency / 1e12 if flops else None,
            "mfu": flops / latency / 1e12 / peak if flops and peak else None,
        })
        if device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except torch.OutOfMemoryError:
        result["error"] = "out of memory"
    except Exception as e:  # noqa: BLE001 -- one failing variant must not stop the others
        result["error"] = describe_error(e)
    finally:
        stack.close()
        del model
        _cleanup(device)
    return result


def add_ratios(results: list[dict]) -> None:
    """speedup[baseline] = baseline latency / this latency, within each configuration."""
    groups: dict[tuple, dict] = {}
    for r in results:
        groups.setdefault((r["model"], r["size_label"], r["batch"]), {})[r["variant"]] = r
    for group in groups.values():
        for r in group.values():
            r["speedup"] = {}
            if r.get("latency_ms") is None:
                continue
            for base in BASELINES:
                b = group.get(base)
                if b is not None and b.get("latency_ms") and b is not r:
                    r["speedup"][base] = b["latency_ms"] / r["latency_ms"]


# --- reports -------------------------------------------------------------------------------------

def _fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def markdown_table(report: dict) -> str:
    env = report["environment"]
    v = env["versions"]
    lines = [
        f"# dpt-fast bench ({'training step' if report['settings']['train'] else 'inference'})",
        "",
        f"- device: {env['device']} ({env['device_type']}), dtype {env['dtype']}, date {env['date']}",
        f"- torch {v['torch']}, triton {v['triton']}, timm {v['timm']}, transformers {v['transformers']}, "
        f"CUDA {v['cuda']}, dpt_fast {v['dpt_fast']}" + (f" ({env['git_commit']})" if env.get("git_commit") else ""),
        f"- measured dense matmul peak ({env['dtype']}): {_fmt(report.get('matmul_peak_tflops'), '.3g')} TFLOP/s; "
        "MFU = achieved model TFLOP/s / that peak",
        f"- latency: median of timed runs after warm-up; random weights and inputs; compile mode "
        f"{report['settings']['compile_mode']}",
        "",
        "| model | size | batch | variant | latency ms | img/s | MP/s | TFLOP/s | MFU | peak GiB | "
        "× reference | × ref+compile | × HF | operators ran |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        size = f"{r['size'][0]}x{r['size'][1]}"
        if r.get("error"):
            lines.append(f"| {r['model']} | {size} | {r['batch']} | {r['variant']} | {r['error']} "
                         "| | | | | | | | | |")
            continue
        s = r.get("speedup", {})
        lines.append(
            f"| {r['model']} | {size} | {r['batch']} | {r['variant']} | {r['latency_ms']:.2f} | "
            f"{r['images_per_s']:.2f} | {r['megapixels_per_s']:.1f} | {_fmt(r.get('tflops'), '.3g')} | "
            f"{_fmt(r.get('mfu'), '.0%')} | {_fmt(r.get('peak_memory_gib'), '.2f')} | "
            f"{_fmt(s.get('reference'), '.2f')} | {_fmt(s.get('reference+compile'), '.2f')} | "
            f"{_fmt(s.get('hf-sdpa'), '.2f')} | {_summarise_impls(r.get('implementations', {}))} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 -- the plot is optional without matplotlib
        return False
    results = [r for r in report["results"] if r.get("latency_ms")]
    configs = list(dict.fromkeys((r["model"], r["size_label"], r["batch"]) for r in report["results"]))
    variants = list(dict.fromkeys(r["variant"] for r in report["results"]))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(configs) + 4), 4.5))
    width = 0.8 / max(1, len(variants))
    for panel, (key, label) in zip(axes, (("images_per_s", "images / s"), ("tflops", "achieved TFLOP/s"))):
        for j, variant in enumerate(variants):
            values = []
            for cfg in configs:
                match = [r for r in results if (r["model"], r["size_label"], r["batch"]) == cfg
                         and r["variant"] == variant]
                values.append(match[0].get(key) or 0.0 if match else 0.0)
            xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(configs))]
            panel.bar(xs, values, width, label=variant)
        panel.set_xticks(range(len(configs)))
        panel.set_xticklabels([f"{m}\n{s} b{b}" for m, s, b in configs], fontsize=8)
        panel.set_ylabel(label)
        if key == "images_per_s" and any(r.get(key) for r in results):
            panel.set_yscale("log")
        panel.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    env = report["environment"]
    fig.suptitle(f"dpt-fast bench: {env['device']}, {env['dtype']}, "
                 f"{'training' if report['settings']['train'] else 'inference'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "device"


# --- the command ---------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    if args.tiny:
        args.models = args.models or TINY_DEFAULTS["models"]
        args.sizes = args.sizes or TINY_DEFAULTS["sizes"]
        args.batch = args.batch or TINY_DEFAULTS["batch"]
        args.warmup = TINY_DEFAULTS["warmup"] if args.warmup is None else args.warmup
        args.runs = TINY_DEFAULTS["runs"] if args.runs is None else args.runs
    args.models = args.models or "large,hybrid"
    args.sizes = args.sizes or "384,1024,1536,4k"
    args.warmup = 3 if args.warmup is None else args.warmup
    args.runs = 50 if args.runs is None else args.runs
    try:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in models if m not in MODELS]
        if unknown:
            raise ValueError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
        configs = parse_configs(args.sizes, args.batch)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if args.variants:
            variants = [v.strip() for v in args.variants.split(",") if v.strip()]
            bad = [v for v in variants if v not in VARIANTS]
            if bad:
                raise ValueError(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
        else:
            variants = [v for v in VARIANTS if device.type == "cuda" or v not in COMPILE_VARIANTS]
    except ValueError as e:
        print(f"dpt-fast bench: {e}", file=sys.stderr)
        return 2
    if "hf-sdpa" in variants and _version("transformers") is None:
        print("dpt-fast bench: transformers is not installed: skipping hf-sdpa", file=sys.stderr)
        variants.remove("hf-sdpa")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    torch.manual_seed(0)
    env = environment(device, dtype)
    peak = measure_matmul_peak(device, dtype)
    skipped = [v for v in VARIANTS if v not in variants]
    print(f"dpt-fast bench on {env['device']} ({dtype}); matmul peak {_fmt(peak, '.3g')} TFLOP/s; variants: "
          f"{', '.join(variants)}" + (f" (skipped: {', '.join(skipped)})" if skipped else ""), file=sys.stderr)
    results = []
    for model_name in models:
        for label, size, batch in configs:
            padded = (math.ceil(size[0] / 32) * 32, math.ceil(size[1] / 32) * 32)
            try:
                flops = count_flops(model_name, batch, padded, args.train)
            except Exception as e:  # noqa: BLE001
                print(f"dpt-fast bench: FLOP count failed for {model_name} {label}: {e}", file=sys.stderr)
                flops = None
            generator = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(batch, 3, *padded, generator=generator).to(device=device, dtype=dtype)
            for variant in variants:
                r = run_variant(variant, model_name, x, args, device, dtype, flops, peak)
                r.update({"model": model_name, "backbone": MODELS[model_name]["backbone"], "size_label": label,
                          "size": list(padded), "requested_size": list(size), "batch": batch, "flops": flops})
                results.append(r)
                status = r["error"] or (f"{r['latency_ms']:.2f} ms, {r['images_per_s']:.2f} img/s, "
                                        f"{_fmt(r.get('tflops'), '.3g')} TFLOP/s")
                print(f"  {model_name:7s} {padded[0]}x{padded[1]} b{batch} {variant:18s} {status}", file=sys.stderr)
            del x
            _cleanup(device)
    add_ratios(results)
    report = {
        "environment": env,
        "settings": {"models": models, "sizes": [c[0] for c in configs], "variants": variants,
                     "skipped_variants": skipped, "train": args.train, "compile_mode": args.compile_mode,
                     "warmup": args.warmup, "runs": args.runs, "max_time_s": args.max_time, "tiny": args.tiny},
        "matmul_peak_tflops": peak,
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{_slug(env['device'])}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}" + ("-train" if args.train else "")
    json_path, md_path, png_path = out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    md_path.write_text(table)
    plotted = plot(report, png_path)
    print(table)
    print(f"dpt-fast bench: wrote {json_path}, {md_path}" + (f", {png_path}" if plotted else " (no matplotlib: no plot)"),
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dpt-fast bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
