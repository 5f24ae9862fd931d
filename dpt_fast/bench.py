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
                     init from a DPTConfig matching the model; for Depth Anything its
                     DepthAnythingForDepthEstimation with the DINOv2 backbone on SDPA (when transformers is
                     installed). Depth Anything: every variant, this one included, runs the same weights
                     (transformers' seeded init, converted), so all compute the same function; DPT: its
                     own random init.

Models (--models): DPT ("large", "hybrid", "base", "tiny") and Depth Anything V2 ("da2-small", "da2-base",
"da2-large", "da2-tiny"), with their facts (widths, taps, patch size, input multiple) from dpt_fast.specs;
an input is padded up to the model's multiple (32 DPT, 14 Depth Anything).

Latency is the median of timed runs (CUDA events on GPU, perf_counter on CPU) after warm-up; the first
call's time (compilation included) is reported separately. Every dpt-fast variant of a configuration runs
with the same weights (seeded), so a fused variant that fell back to the reference computes exactly what
the reference variant does, and is labelled "fused (fell back to reference: ...)" in the table and plot.

On a CPU (a check that the code path works: the fused kernels need a CUDA GPU) the run uses --threads
intra-op threads (default 1: a parallel region waits for its slowest thread, so on a machine whose cores
other processes share, more threads stretch every call by a varying factor), times the eager variants of
a configuration in turns (time_interleaved: A B C, C B A, ...) so that a change of the machine's load
reaches all of them alike, and reports each call's process CPU time (cpu_ms) next to the wall clock, with
the load average at the start and the end of the run. FLOPs are counted once per configuration with
torch.utils.flop_counter on the meta device (attention counted as its two matmuls). The achieved
fraction of a dense matmul peak of the same dtype, measured in the same process (with the copy
bandwidth: measure_ceilings), is reported as MFU. Results go to --out as JSON (rewritten after every
row), a markdown table and a PNG plot; the JSON records the device, versions, date and, per variant,
which implementation of each dpt_fast operator ran (dpt_fast.implementations_ran()); a fused variant
where the reference served any call is marked (`fused_path`) in the JSON and the table.

Time limits (for a run that must fit a fixed slot of GPU time): --budget-s bounds the whole run (order: fused and
hf-sdpa of every configuration, then reference+compile, reference, fused+compile), --compile-timeout-s bounds one
compilation (torch.compile(mode="max-autotune") of a DPT can take many minutes), optionally retried with
--compile-fallback-mode; whatever did not fit is recorded as "skipped: ...", never silently dropped.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from .cli_args import BENCH_MODELS as MODELS
from .cli_args import BENCH_TINY_DEFAULTS as TINY_DEFAULTS
from .cli_args import BENCH_VARIANTS as VARIANTS
from .cli_args import add_bench_arguments as add_arguments  # noqa: F401 -- `dpt-fast bench`'s options
# the measurement tools (dpt_fast.measure); importable from here as well, as they always were
from .measure import (FUSED_OPS, DeadlineExceeded, deadline, describe_error, device_name, environment,  # noqa: F401
                      measure_ceilings, measure_copy_bandwidth, measure_matmul_peak, package_version,
                      record_deadline, record_failure, recover_after_deadline, release_memory, synchronize,
                      time_calls, time_interleaved, timing_method, verify_fused, warm_up_compiler, write_json)



def is_depth_anything(name: str) -> bool:
    """Whether the bench model `name` is a Depth Anything (DepthAnythingModel) rather than a DPT."""
    return "arch" in MODELS[name]


def model_spec(name: str):
    """The dpt_fast.specs entry of a bench model, its arguments applied (vit_kwargs, taps, widths, fusion
    width): every fact bench reports or gives transformers comes from here. The tiny DPT, a timm ViT
    with no entry of its own, is DPT-Base's entry with that ViT's dimensions."""
    from . import specs
    kwargs = MODELS[name]
    if is_depth_anything(name):
        spec = specs.get(kwargs["arch"])
        vit = kwargs.get("vit_kwargs", {})
        changes = {"embed_dim": vit.get("embed_dim"), "depth": vit.get("depth"), "num_heads": vit.get("num_heads"),
                   "mlp_ratio": vit.get("mlp_ratio"), "taps": kwargs.get("taps"),
                   "reassemble_widths": kwargs.get("out_channels"), "features": kwargs.get("features"),
                   "head_hidden": kwargs.get("head_hidden")}
    else:
        spec = specs.dpt_backbone(kwargs["backbone"])
        if spec is not None:
            return spec
        spec = specs.get("dpt-base")  # the tiny ViT (patch 16, 224): dimensions from timm's name
        features = kwargs.get("features", spec.features)
        changes = {"name": name, "encoder": kwargs["backbone"], "embed_dim": 192, "depth": 12, "num_heads": 3,
                   "encoder_image_size": 224, "taps": kwargs.get("hooks"), "features": features,
                   "reassemble_widths": (features,) * 4, "dpt_backbone": None}
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items() if v is not None}
    return specs.with_overrides(spec, **changes)


def input_multiple(name: str) -> int:
    """What a bench model's input sides must be multiples of (32 for DPT, 14 for Depth Anything)."""
    return model_spec(name).input_multiple


def hf_config(name: str, image_size: int | None = None):
    """transformers' config of the same architecture as the bench model `name`, read from dpt_fast.specs:
    a DPTConfig (dpt_fast.hf_convert.hf_dpt_config), or a DepthAnythingConfig over a Dinov2Config
    (out_indices = taps + 1, hidden states not reshaped, Reassemble widths as neck_hidden_sizes)."""
    spec = model_spec(name)
    if spec.family == "dpt":
        from transformers import DPTConfig

        from .hf_convert import hf_dpt_config
        config = hf_dpt_config(spec)
        if image_size and spec.hybrid:  # HF's hybrid embeddings refuse any other size than their own
            config["image_size"] = image_size
        return DPTConfig(**config)
    from transformers import DepthAnythingConfig, Dinov2Config
    backbone = Dinov2Config(hidden_size=spec.embed_dim, num_hidden_layers=spec.depth, num_attention_heads=spec.num_heads,
                            mlp_ratio=int(spec.mlp_ratio) if float(spec.mlp_ratio).is_integer() else spec.mlp_ratio,
                            image_size=spec.encoder_image_size, patch_size=spec.patch_size,
                            out_indices=[t + 1 for t in spec.taps], reshape_hidden_states=False, layer_norm_eps=1e-6)
    extra = {"depth_estimation_type": "metric", "max_depth": spec.max_depth} if spec.head == "metric" else {}
    return DepthAnythingConfig(backbone_config=backbone, patch_size=spec.patch_size,
                               reassemble_hidden_size=spec.embed_dim, neck_hidden_sizes=list(spec.reassemble_widths),
                               fusion_hidden_size=spec.features, head_hidden_size=spec.head_hidden, **extra)


COMPILE_VARIANTS = ("reference+compile", "fused+compile")
BASELINES = ("reference", "reference+compile", "hf-sdpa")
NAMED_SIZES = {"4k": (2160, 3840), "uhd": (2160, 3840), "1080p": (1080, 1920), "720p": (720, 1280)}
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


# --- the variants --------------------------------------------------------------------------------

def inline_plain_ops(attention: str = "sdpa"):
    """The three dpt_fast operators as plain PyTorch (no custom op boundary), so torch.compile and
    FlopCounterMode see every aten op inside them: the op layer's "inline" backend, as a context manager.
    attention: "sdpa" or "matmul" (explicit softmax)."""
    from .backend import use_backend
    return use_backend("inline", inline_attention=attention)


def _seeded_hf_model(name: str):
    """transformers' model of `name` on the CPU in fp32, initialised from seed 0 (the same every call)."""
    config = hf_config(name)
    torch.manual_seed(0)
    if is_depth_anything(name):
        from transformers import DepthAnythingForDepthEstimation
        return DepthAnythingForDepthEstimation._from_config(
            config, attn_implementation={"": "eager", "backbone_config": "sdpa"})
    from transformers import DPTForDepthEstimation
    try:  # the hybrid's BiT backbone has no SDPA path: eager there, SDPA in the transformer
        return DPTForDepthEstimation._from_config(config, attn_implementation={"": "sdpa", "backbone_config": "eager"})
    except (ValueError, TypeError, KeyError):
        return DPTForDepthEstimation._from_config(config, attn_implementation="sdpa")


@functools.lru_cache(maxsize=1)
def shared_depth_anything_weights(name: str) -> dict | None:
    """The weights every variant of the Depth Anything `name` runs, hf-sdpa included: transformers' seeded
    init converted to dpt-fast's layout (dpt_fast.depth_anything_weights), on the CPU in fp32. None
    without transformers (dpt-fast's variants then share their own seeded init)."""
    if package_version("transformers") is None:
        return None
    from .depth_anything_weights import hf_state_dict_to_original, original_state_dict_to_model
    state, unknown = hf_state_dict_to_original(_seeded_hf_model(name).state_dict())
    if unknown:
        raise RuntimeError(f"transformers' keys without a dpt-fast name: {unknown[:3]}")
    return original_state_dict_to_model(state)


def build_model(name: str, device, dtype, train: bool):
    """dpt-fast's model called `name` in MODELS (DPTDepthModel or DepthAnythingModel), random weights:
    DPT its seeded init; Depth Anything transformers' seeded init (shared_depth_anything_weights) with
    transformers' position-embedding resize, so that it and hf-sdpa compute the same function."""
    from .models import DPTDepthModel
    from .models.depth_anything import DepthAnythingModel
    shared = None if str(device) == "meta" or not is_depth_anything(name) else shared_depth_anything_weights(name)
    with torch.device(device):
        if is_depth_anything(name):
            model = DepthAnythingModel(**MODELS[name], **({"pos_embed_rule": "bicubic_size"} if shared else {}))
        else:
            model = DPTDepthModel(**MODELS[name])
    if shared is not None:
        model.load_state_dict(shared, strict=True)
    model.to(dtype)
    return model.train(train)


build_dpt = build_model  # the name the benchmark scripts import


def build_hf(name: str, device, dtype, train: bool, image_size: int | None = None):
    """transformers' model of the same architecture, random weights (its own initialisation, not dpt-fast's
    weights), SDPA attention in the ViT: DPTForDepthEstimation, or DepthAnythingForDepthEstimation whose
    DINOv2 backbone runs SDPA (the model class itself declines attn_implementation="sdpa"; its attention
    is all in the backbone). image_size: the run's (square) input size -- HF's hybrid embeddings refuse any
    other size, and its position embeddings are then made for that grid (the resize becomes an identity)."""
    if is_depth_anything(name):  # the weights dpt-fast's variants run (shared_depth_anything_weights)
        model = _seeded_hf_model(name)
    else:
        config = hf_config(name, image_size)
        from transformers import DPTForDepthEstimation
        try:  # the hybrid's BiT backbone has no SDPA path: eager there, SDPA in the transformer
            model = DPTForDepthEstimation._from_config(config, attn_implementation={"": "sdpa",
                                                                                    "backbone_config": "eager"})
        except (ValueError, TypeError, KeyError):
            model = DPTForDepthEstimation._from_config(config, attn_implementation="sdpa")
    model.to(device=device, dtype=dtype)
    return model.train(train)


def hf_attention(model) -> str:
    """Which attention transformers' model runs, for the row's `implementations`."""
    backbone = getattr(model, "backbone", None)
    if backbone is not None and type(model).__name__.startswith("DepthAnything"):
        return f"{type(model).__name__}(backbone attn_implementation={backbone.config._attn_implementation})"
    return f"{type(model).__name__}(attn_implementation={getattr(model.config, '_attn_implementation', None)})"


def count_flops(name: str, batch: int, size: tuple[int, int], train: bool) -> int:
    """FLOPs of one forward (or forward + backward) on the meta device: shapes only, no memory."""
    from torch.utils.flop_counter import FlopCounterMode
    model = build_model(name, "meta", torch.float32, train)
    x = torch.empty(batch, 3, *size, device="meta", requires_grad=False)
    counter = FlopCounterMode(display=False)
    with inline_plain_ops(attention="matmul"), counter:
        out = model(x)
        if train:
            out.float().mean().backward()
    return int(counter.get_total_flops())


def _step(model, x, train: bool, hf: bool, compiled: bool = False):
    if hf:
        def call_model():
            return model(pixel_values=x).predicted_depth
    else:
        def call_model():
            return model(x)
    if compiled:  # CUDA-graph trees (max-autotune) want a step marker per iteration
        def forward():
            torch.compiler.cudagraph_mark_step_begin()
            return call_model()
    else:
        forward = call_model
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


def _short_op(op: str) -> str:
    return op.replace("dpt_fast::", "").replace("residual_conv_unit", "rcu")


def _summarise_impls(impls: dict) -> str:
    return ", ".join(f"{_short_op(op)}:{'+'.join(sorted(counts))}" for op, counts in sorted(impls.items()))


@contextlib.contextmanager
def _variant_mode(backend_name: str, inline: bool):
    """The operator mode a variant runs in, entered around each of its calls (variants may interleave)."""
    from .backend import use_backend
    with use_backend(backend_name), (inline_plain_ops(attention="sdpa") if inline else contextlib.nullcontext()):
        yield


class PreparedVariant:
    """A variant built and past its first call: `call()` runs one timed step in the variant's mode;
    `result` is its row (with `error` set when building or the first call failed: `call` is then None)."""

    def __init__(self, result: dict, started: float):
        self.result, self.started = result, started
        self.call = self.model = None

    def finish(self, times: list[float], cpu_times: list[float], x: torch.Tensor, device, flops, peak) -> None:
        """Fill the row from the timed calls' seconds (wall clock, and process CPU time on CPU)."""
        latency = statistics.median(times)
        batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        self.result.update({
            "latency_ms": latency * 1e3,
            "latency_ms_min": min(times) * 1e3,
            "latency_ms_max": max(times) * 1e3,
            "runs": len(times),
            "images_per_s": batch / latency,
            "megapixels_per_s": batch * height * width / latency / 1e6,
            "tflops": flops / latency / 1e12 if flops else None,
            "mfu": flops / latency / 1e12 / peak if flops and peak else None,
        })
        if device.type == "cuda":
            self.result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if cpu_times:
            self.result["cpu_ms"] = statistics.median(cpu_times) * 1e3

    def close(self, device) -> None:
        self.call = self.model = None
        release_memory(device)
        self.result["wall_s"] = round(time.perf_counter() - self.started, 1)


def prepare_variant(variant: str, model_name: str, x: torch.Tensor, args, device, dtype,
                    time_limit_s: float | None = None, compile_mode: str | None = None,
                    first_call_limit_s: float | None = None) -> PreparedVariant:
    """Build one variant and run its first call (where compilation and autotuning happen), recording which
    implementation of each operator served it, under min(time_limit_s, first_call_limit_s)."""
    from . import implementations_ran
    result = {"variant": variant, "error": None}
    prepared = PreparedVariant(result, time.perf_counter())
    hf = variant.startswith("hf")
    backend_name = "reference" if variant.startswith("reference") else "fused"
    compiled = variant.endswith("+compile")
    if compiled:
        compile_mode = compile_mode or args.compile_mode
        result["compile_mode"] = compile_mode
    mode = functools.partial(_variant_mode, backend_name, variant == "reference+compile")
    phase = "build"
    first_limit = min((t for t in (time_limit_s, first_call_limit_s) if t is not None), default=None)
    try:
        with deadline(first_limit, f"{variant} (build and first call)"), mode():
            if hf:
                if x.shape[-2] != x.shape[-1] and not is_depth_anything(model_name):
                    raise RuntimeError("transformers' DPT (ViT backbone) reshapes tokens to a square grid: "
                                       "non-square inputs are not supported")
                model = build_hf(model_name, device, dtype, args.train, image_size=x.shape[-1])
                result["implementations"] = {"transformers": {hf_attention(model): 1}}
            else:
                torch.manual_seed(0)  # every dpt-fast variant of a configuration computes with the same weights
                model = build_model(model_name, device, dtype, args.train)
            prepared.model = model
            step = _step(torch.compile(model, mode=compile_mode) if compiled else model, x, args.train, hf,
                         compiled=compiled)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            implementations_ran(reset=True)
            phase = "first call"
            t0 = time.perf_counter()
            out = step()
            synchronize(device)
            result["first_call_s"] = time.perf_counter() - t0
        if not hf:
            ran = implementations_ran(reset=True)
            if variant == "reference+compile":
                ran = {"inlined": {"plain PyTorch (attention via F.scaled_dot_product_attention)": 1}}
            result["implementations"] = ran
            if backend_name == "fused":
                required = FUSED_OPS + (tuple(op + "_backward" for op in FUSED_OPS) if args.train else ())
                result["fused_path"] = verify_fused(ran, required)
        result["output_shape"] = list(out.shape)
        result["output_finite"] = bool(torch.isfinite(out.float()).all())
        del out

        def call():
            with mode():
                return step()
        prepared.call = call
    except DeadlineExceeded:
        record_deadline(result, phase, prepared.started, compile_mode if compiled else None)
    except Exception as e:  # noqa: BLE001 -- one failing variant must not stop the others
        record_failure(result, e)
    return prepared


def run_variant(variant: str, model_name: str, x: torch.Tensor, args, device, dtype, flops, peak,
                time_limit_s: float | None = None, compile_mode: str | None = None,
                first_call_limit_s: float | None = None) -> dict:
    """One variant on one configuration, built, timed and released. time_limit_s caps the whole variant,
    first_call_limit_s the model's building and first call (where compilation and autotuning happen);
    over either the row's error says "skipped: ..." and `timed_out` is set ("compile" when a compiled
    variant's first call had not finished)."""
    prepared = prepare_variant(variant, model_name, x, args, device, dtype, time_limit_s, compile_mode,
                               first_call_limit_s)
    try:
        if prepared.call is not None:
            left = None if time_limit_s is None else time_limit_s - (time.perf_counter() - prepared.started)
            cpu_times: list[float] = []
            with deadline(left, f"{variant} (timing)"):
                times = time_calls(prepared.call, device, args.warmup, args.runs, args.max_time, cpu_times=cpu_times)
            prepared.finish(times, cpu_times, x, device, flops, peak)
    except DeadlineExceeded:
        record_deadline(prepared.result, "timing", prepared.started)
    except Exception as e:  # noqa: BLE001
        record_failure(prepared.result, e)
    finally:
        prepared.close(device)
    return prepared.result


def _run_interleaved(variants: list[str], model_name: str, x: torch.Tensor, args, device, dtype, flops, peak,
                     time_left) -> list[dict]:
    """Eager variants of one configuration, each built and past its first call, then timed in turns
    (time_interleaved) within the time budget that time_left() reports."""
    prepared = []
    try:
        for variant in variants:
            if time_left() is not None and time_left() <= 1:
                prepared.append(PreparedVariant({"variant": variant, "error": "skipped: time budget spent"},
                                                time.perf_counter()))
                continue
            prepared.append(prepare_variant(variant, model_name, x, args, device, dtype, time_limit_s=time_left()))
        live = [p for p in prepared if p.call is not None]
        try:
            with deadline(time_left(), "timing"):
                measured = time_interleaved([p.call for p in live], device, args.warmup, args.runs, args.max_time)
            for p, (walls, cpus) in zip(live, measured):
                p.finish(walls, cpus if device.type == "cpu" else [], x, device, flops, peak)
        except DeadlineExceeded:
            for p in live:
                record_deadline(p.result, "timing", p.started)
        except Exception as e:  # noqa: BLE001 -- recorded on every row of the group
            for p in live:
                record_failure(p.result, e)
    finally:
        for p in prepared:
            p.close(device)
    return [p.result for p in prepared]


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


def ordered_results(report: dict) -> list[dict]:
    """Rows grouped by model and size (in the order asked for), variants in VARIANTS order."""
    models = report["settings"]["models"]
    sizes = report["settings"]["sizes"]

    def key(r):
        return (models.index(r["model"]) if r["model"] in models else len(models),
                sizes.index(r["size_label"]) if r.get("size_label") in sizes else len(sizes),
                VARIANTS.index(r["variant"]) if r["variant"] in VARIANTS else len(VARIANTS))
    return sorted(report["results"], key=key)


def fell_back(r: dict) -> list[str]:
    """The operators (short names) that the reference served in a fused row; [] when the row ran fused."""
    if not r.get("fused_path") or r["fused_path"]["verified"]:
        return []
    served = [_short_op(op) for op, impls in sorted(r.get("implementations", {}).items()) if impls.get("reference")]
    missing = [p.split(" was never called")[0] for p in r["fused_path"]["problems"] if p.endswith("was never called")]
    return served + [f"{_short_op(op)} never called" for op in missing if _short_op(op) not in served]


def variant_label(r: dict) -> str:
    """The variant as the table and the plot name it: its compile mode, and whether its fused path fell back."""
    label = r["variant"] + (f" ({r['compile_mode']})" if r.get("compile_mode") else "")
    ops = fell_back(r)
    if ops:
        label += f" (fell back to reference: {', '.join(dict.fromkeys(o.replace('_backward', '') for o in ops))})"
    return label


def cpu_note(report: dict) -> list[str]:
    """What a CPU run's numbers mean (the table's header and the JSON's notes say it)."""
    timing = report.get("timing", {})
    load = timing.get("load_average") or {}
    lines = ["CPU run: dpt-fast's fused kernels need a CUDA GPU, so a fused row here runs the reference "
             "operators (marked 'fell back'); the numbers show that the code path works and what this CPU does "
             f"with {timing.get('threads', '?')} intra-op thread(s), not the speed of the fused kernels."]
    if load:
        lines.append(f"Load average {load.get('start')} at the start, {load.get('end')} at the end, on "
                     f"{report['environment']['host']['cpus']} cores: while other processes hold the cores, "
                     "wall-clock latencies stretch (compare 'CPU ms', the process's CPU time per call).")
    return lines


def markdown_table(report: dict) -> str:
    env = report["environment"]
    v = env["versions"]
    cpu = env["device_type"] == "cpu"
    method = (report.get("timing") or {}).get("method", "median of timed runs after warm-up")
    lines = [
        f"# dpt-fast bench ({'training step' if report['settings']['train'] else 'inference'})",
        "",
        f"- device: {env['device']} ({env['device_type']}), dtype {env['dtype']}, date {env['date']}",
        f"- torch {v['torch']}, triton {v['triton']}, timm {v['timm']}, transformers {v['transformers']}, "
        f"CUDA {v['cuda']}, dpt_fast {v['dpt_fast']}" + (f" ({env['git_commit']})" if env.get("git_commit") else ""),
        f"- measured dense matmul peak ({env['dtype']}): {_fmt(report.get('matmul_peak_tflops'), '.3g')} TFLOP/s; "
        f"copy {_fmt((report.get('ceilings') or {}).get('copy_tbps'), '.3g')} TB/s; "
        "MFU = achieved model TFLOP/s / that peak",
        f"- latency: {method}; random weights and inputs; compile mode {report['settings']['compile_mode']}",
    ]
    if cpu:
        lines += [f"- {line}" for line in cpu_note(report)]
    lines += [
        "",
        "| model | size | batch | variant | latency ms | " + ("CPU ms | " if cpu else "") + "img/s | MP/s | "
        "TFLOP/s | MFU | peak GiB | × reference | × ref+compile | × HF | operators ran |",
        "|---|---|---:|---|---:|" + ("---:|" if cpu else "") + "---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    any_fell_back = False
    for r in ordered_results(report):
        size = f"{r['size'][0]}x{r['size'][1]}"
        if r.get("error"):
            lines.append(f"| {r['model']} | {size} | {r['batch']} | {variant_label(r)} | {r['error']} "
                         + ("| " if cpu else "") + "| | | | | | | | | |")
            continue
        s = r.get("speedup", {})
        mark = "*" if fell_back(r) else ""  # ratios of a fallen-back row compare reference operators
        any_fell_back = any_fell_back or bool(mark)

        def ratio(base):
            return _fmt(s.get(base), ".2f") + (mark if s.get(base) is not None else "")
        lines.append(
            f"| {r['model']} | {size} | {r['batch']} | {variant_label(r)} | {r['latency_ms']:.2f} | "
            + (f"{_fmt(r.get('cpu_ms'), '.2f')} | " if cpu else "")
            + f"{r['images_per_s']:.3g} | {r['megapixels_per_s']:.3g} | {_fmt(r.get('tflops'), '.3g')} | "
            f"{_fmt(r.get('mfu'), '.0%')} | {_fmt(r.get('peak_memory_gib'), '.2f')} | "
            f"{ratio('reference')} | {ratio('reference+compile')} | {ratio('hf-sdpa')} | "
            f"{_summarise_impls(r.get('implementations', {}))} |")
    if any_fell_back:
        lines += ["", "\\* a fused row that fell back to the reference: its ratios compare dpt-fast's reference "
                  "operators, not the fused kernels (against `reference`, the same computation timed twice: "
                  "the run's noise)."]
    unverified = [r for r in report["results"] if r.get("fused_path") and not r["fused_path"]["verified"]]
    if unverified:
        lines += ["", "Fused rows where the reference served some operator calls (not a measurement of the "
                  "fused kernels):"]
        lines += [f"- {r['model']} {r['size'][0]}x{r['size'][1]} b{r['batch']} {r['variant']}: "
                  + "; ".join(r["fused_path"]["problems"]) for r in unverified]
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
    legend = {}  # a variant whose fused path fell back anywhere says so in the legend
    for variant in variants:
        ops = sorted({o.replace("_backward", "") for r in results if r["variant"] == variant for o in fell_back(r)})
        legend[variant] = variant + (f" (fell back to reference: {', '.join(ops)})" if ops else "")
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(configs) + 4), 5))
    width = 0.8 / max(1, len(variants))
    for panel, (key, label) in zip(axes, (("images_per_s", "images / s"), ("tflops", "achieved TFLOP/s"))):
        for j, variant in enumerate(variants):
            values = []
            for cfg in configs:
                match = [r for r in results if (r["model"], r["size_label"], r["batch"]) == cfg
                         and r["variant"] == variant]
                values.append(match[0].get(key) or 0.0 if match else 0.0)
            xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(configs))]
            panel.bar(xs, values, width, label=legend[variant], hatch="//" if legend[variant] != variant else None)
        panel.set_xticks(range(len(configs)))
        panel.set_xticklabels([f"{m}\n{s} b{b}" for m, s, b in configs], fontsize=8)
        panel.set_ylabel(label)
        positive = [r[key] for r in results if r.get(key)]
        if positive and max(positive) > 10 * min(positive):  # log only for spans that need it: it magnifies small gaps
            panel.set_yscale("log")
        panel.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=7)
    env = report["environment"]
    title = (f"dpt-fast bench: {env['device']}, {env['dtype']}, "
             f"{'training' if report['settings']['train'] else 'inference'}")
    if env["device_type"] == "cpu":
        title += (f"\nCPU run, {(report.get('timing') or {}).get('threads', '?')} thread(s): the fused kernels need "
                  "a CUDA GPU (hatched: fell back to the reference)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04 + 0.04 * math.ceil(len(variants) / 3), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "device"


# --- the command ---------------------------------------------------------------------------------

def _fill_defaults(args: argparse.Namespace) -> None:
    """--tiny's settings where the command line gives none, then the full run's defaults."""
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


def _selection(args: argparse.Namespace):
    """What the command line asks to measure: (models, configurations, skipped model@size pairs, device,
    variants). A ValueError says what is wrong; a CUDA device is made the current one."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    configs = parse_configs(args.sizes, args.batch)
    skip_pairs = {tuple(p.strip().split("@", 1)) for p in (getattr(args, "skip", None) or "").split(",")
                  if p.strip()}
    malformed = [p for p in skip_pairs if len(p) != 2 or p[0] not in MODELS
                 or p[1] not in {c[0] for c in configs}]
    if malformed:
        raise ValueError(f"--skip {', '.join('@'.join(p) for p in malformed)}: each entry is MODEL@SIZE "
                         f"with a model of --models and a size of --sizes")
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
    return models, configs, skip_pairs, device, variants


def run(args: argparse.Namespace) -> int:
    """`dpt-fast bench` on parsed arguments; returns the exit status (2: a usage error)."""
    _fill_defaults(args)
    started = time.perf_counter()
    try:
        models, configs, skip_pairs, device, variants = _selection(args)
    except ValueError as e:
        print(f"dpt-fast bench: {e}", file=sys.stderr)
        return 2
    if getattr(args, "threads", None) is not None and args.threads < 1:
        print("dpt-fast bench: --threads must be at least 1", file=sys.stderr)
        return 2
    if "hf-sdpa" in variants and package_version("transformers") is None:
        print("dpt-fast bench: transformers is not installed: skipping hf-sdpa", file=sys.stderr)
        variants.remove("hf-sdpa")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    threads_before = torch.get_num_threads()
    if device.type == "cpu":  # see --threads: one thread keeps timings comparable on a shared machine
        torch.set_num_threads(max(1, getattr(args, "threads", None) or 1))
    try:
        return _measure(args, models, configs, skip_pairs, variants, device, dtype, started)
    finally:
        torch.set_num_threads(threads_before)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def _new_report(args, device, env: dict, ceilings: dict, models, configs, skip_pairs, variants, skipped,
                load_start) -> dict:
    """The report before its first row: the machine, the command line's settings and the ceilings."""
    return {
        "benchmark": "e2e_train" if args.train else "e2e_inference",
        "environment": env,
        "settings": {"models": models, "sizes": [c[0] for c in configs],
                     "skipped_pairs": sorted("@".join(p) for p in skip_pairs), "variants": variants,
                     "skipped_variants": skipped, "train": args.train, "compile_mode": args.compile_mode,
                     "compile_timeout_s": getattr(args, "compile_timeout_s", None),
                     "compile_fallback_mode": getattr(args, "compile_fallback_mode", None),
                     "budget_s": getattr(args, "budget_s", None), "warmup": args.warmup, "runs": args.runs,
                     "max_time_s": args.max_time, "tiny": args.tiny},
        "timing": {"method": timing_method(device), "threads": torch.get_num_threads(),
                   "interop_threads": torch.get_num_interop_threads(),
                   "load_average": {"start": load_start, "end": None} if load_start is not None else None},
        "ceilings": ceilings,
        "matmul_peak_tflops": ceilings["matmul_tflops"],
        "results": [],
        "notes": [],
        "complete": False,
    }


def _task_groups(models, configs, skip_pairs, variants, device) -> list[list[tuple]]:
    """The (model, configuration, variant) tasks of a run in the order they run, grouped into what is timed
    together.

    The order, so that a run cut short by --budget-s still answers the targets: dpt-fast fused and HF of every
    configuration, then the reference under torch.compile (minutes each), then the reference eager, then fused
    under torch.compile. On a CPU the eager variants of a configuration form one group, timed in turns
    (time_interleaved): a shared machine's load changes over a run, and timing them one after the other would
    hand that change to whichever ran later. On a GPU each variant is a group of its own, in the order above
    (the budget's priorities)."""
    tasks = [(m, cfg, v) for cfg in configs for m in models for v in variants if v in ("fused", "hf-sdpa")]
    for later in ("reference+compile", "reference", "fused+compile"):
        tasks += [(m, cfg, later) for cfg in configs for m in models if later in variants]
    tasks = [t for t in tasks if (t[0], t[1][0]) not in skip_pairs]
    groups: dict = {}
    for t in tasks:
        interleave = device.type == "cpu" and t[2] not in COMPILE_VARIANTS
        groups.setdefault((t[0], t[1], "eager") if interleave else t, []).append(t)
    return list(groups.values())


def _skipped_by_budget(variants: list[str], budget: float, compile_mode: str) -> list[dict]:
    """The rows of variants that a spent --budget-s leaves no time for."""
    rows = []
    for variant in variants:
        r = {"variant": variant, "error": f"skipped: time budget (--budget-s {budget:.0f}) spent"}
        if variant in COMPILE_VARIANTS:
            r["compile_mode"] = compile_mode
        rows.append(r)
    return rows


def _flop_count(model_name: str, label: str, batch: int, padded: tuple[int, int], train: bool) -> int | None:
    """count_flops, or None (said on stderr) where counting fails: the configuration is timed all the same."""
    try:
        return count_flops(model_name, batch, padded, train)
    except Exception as e:  # noqa: BLE001
        print(f"dpt-fast bench: FLOP count failed for {model_name} {label}: {e}", file=sys.stderr)
        return None


def _run_alone(variant: str, model_name: str, x: torch.Tensor, args, device, dtype, flops, peak,
               time_left) -> dict:
    """One variant built, timed and released on its own (run_variant). A compiled variant's first call is
    capped by --compile-timeout-s; one over it is tried again under --compile-fallback-mode while the budget
    leaves more than 10 s, the first attempt kept in the row as `primary_compile`."""
    compile_timeout = getattr(args, "compile_timeout_s", None)
    fallback_mode = getattr(args, "compile_fallback_mode", None)
    is_compiled = variant in COMPILE_VARIANTS
    if is_compiled:
        warm_up_compiler(device)
    r = run_variant(variant, model_name, x, args, device, dtype, flops, peak, time_limit_s=time_left(),
                    compile_mode=args.compile_mode if is_compiled else None,
                    first_call_limit_s=compile_timeout if is_compiled else None)
    if r.get("timed_out") == "compile" and fallback_mode and fallback_mode != args.compile_mode:
        remaining = time_left()
        if remaining is None or remaining > 10:
            first = r
            r = run_variant(variant, model_name, x, args, device, dtype, flops, peak, time_limit_s=remaining,
                            compile_mode=fallback_mode)
            r["primary_compile"] = {"mode": args.compile_mode, "error": first["error"], "wall_s": first["wall_s"]}
    return r


def _measure_group(group: list[tuple], args, device, dtype, peak, time_left, flop_counts: dict) -> list[dict]:
    """The rows of one group of _task_groups, each with the fields of its configuration and its FLOP count
    (flop_counts: the counts so far, by model, padded size and batch). time_left() is the budget's rest."""
    model_name, (label, size, batch), _ = group[0]
    variants = [v for _, _, v in group]
    multiple = input_multiple(model_name)
    padded = (math.ceil(size[0] / multiple) * multiple, math.ceil(size[1] / multiple) * multiple)
    meta = {"model": model_name, "backbone": MODELS[model_name].get("backbone") or MODELS[model_name]["arch"],
            "size_label": label,
            "size": list(padded), "requested_size": list(size), "batch": batch}
    if time_left() is not None and time_left() <= 1:
        rows, flops = _skipped_by_budget(variants, getattr(args, "budget_s", None), args.compile_mode), None
    else:
        key = (model_name, padded, batch)
        if key not in flop_counts:
            flop_counts[key] = _flop_count(model_name, label, batch, padded, args.train)
        flops = flop_counts[key]
        generator = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, 3, *padded, generator=generator).to(device=device, dtype=dtype)
        if len(group) > 1:
            rows = _run_interleaved(variants, model_name, x, args, device, dtype, flops, peak, time_left)
        else:
            rows = [_run_alone(variants[0], model_name, x, args, device, dtype, flops, peak, time_left)]
        del x
    for r in rows:
        r.update(meta)
        r["flops"] = flops
    return rows


def _measure(args, models, configs, skip_pairs, variants, device, dtype, started) -> int:
    """Every (model, size, variant) task of a validated command line: the JSON, table and plot."""
    budget = getattr(args, "budget_s", None)
    torch.manual_seed(0)
    load_start = _load_average()
    env = environment(device, dtype)
    ceilings = measure_ceilings(device, dtype)
    peak = ceilings["matmul_tflops"]
    skipped = [v for v in VARIANTS if v not in variants]
    print(f"dpt-fast bench on {env['device']} ({dtype}); matmul peak {_fmt(peak, '.3g')} TFLOP/s, copy "
          f"{_fmt(ceilings['copy_tbps'], '.3g')} TB/s; variants: {', '.join(variants)}"
          + (f" (skipped: {', '.join(skipped)})" if skipped else ""), file=sys.stderr)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{_slug(env['device'])}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}" + ("-train" if args.train else "")
    json_path, md_path, png_path = out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"
    report = _new_report(args, device, env, ceilings, models, configs, skip_pairs, variants, skipped, load_start)
    results = report["results"]

    def save() -> None:  # after every row: a run cut short keeps what it measured
        add_ratios(results)
        if report["timing"]["load_average"]:
            report["timing"]["load_average"]["end"] = _load_average()
        if device.type == "cpu":
            report["notes"] = cpu_note(report)
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        write_json(json_path, report)
        md_path.write_text(markdown_table(report))

    def time_left():
        return None if budget is None else budget - (time.perf_counter() - started)

    flop_counts: dict = {}
    for group in _task_groups(models, configs, skip_pairs, variants, device):
        for r in _measure_group(group, args, device, dtype, peak, time_left, flop_counts):
            results.append(r)
            save()
            status = r["error"] or (f"{r['latency_ms']:.2f} ms, {r['images_per_s']:.3g} img/s, "
                                    f"{_fmt(r.get('tflops'), '.3g')} TFLOP/s")
            print(f"  {r['model']:7s} {r['size'][0]}x{r['size'][1]} b{r['batch']} {r['variant']:18s} {status}",
                  file=sys.stderr)
    report["complete"] = True
    save()
    table = markdown_table(report)
    plotted = plot(report, png_path)
    print(table)
    print(f"dpt-fast bench: wrote {json_path}, {md_path}" + (f", {png_path}" if plotted else " (no matplotlib: no plot)"),
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dpt-fast bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
