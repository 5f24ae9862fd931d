"""Training-step benchmark (GPU only): step time and peak memory of DPT-Hybrid and DPT-Large at 384^2.

One training step is what `dpt-fast train` does per batch: bf16 autocast, channels_last, forward, the
paper's loss (scale-and-shift-invariant trimmed loss + 0.5 x gradient matching, on inverse depth),
backward, Adam (fused) with the backbone/decoder parameter groups. Random weights, a fixed batch of
procedural synthetic scenes (dpt_fast.data.SyntheticDataset) resident on the GPU: only the step is timed.

Variants, every one from the same initial weights, in one process on one GPU:

  fused              dpt_fast's fused operators, eager (use_backend("fused"))
  reference          dpt_fast's reference operators, eager: the specification
  reference+compile  torch.compile (--compile-mode) of the reference model with the three operators inlined
                     as plain PyTorch (dpt_fast.bench.inline_plain_ops: attention as
                     F.scaled_dot_product_attention), so Inductor sees through them
  fused+compile      (optional) the fused model under torch.compile, the operators opaque

Batch: --batch (16, the paper's), halved until the reference eager step fits; every variant of a model
then runs at that batch. Order, so that a run cut short still answers the targets (both are against the
reference eager): fused and reference of every model first, then the compiled variants; a variant is
stopped at --budget-s, a compile at --compile-timeout-s, and recorded as skipped. Times: median of --steps steps timed with CUDA events after --warmup steps
(compilation happens in warm-up and is reported as first_step_s). Peak memory: torch.cuda.max_memory_allocated
over the timed steps (weights, gradients, Adam state and activations). The JSON records device, versions,
date, the batch, and per variant dpt_fast.implementations_ran() over the timed steps, so a run shows
which implementation of each operator was measured (a fused variant where the reference served any call
is marked `fused_path.verified = false`), the FLOPs of forward + backward (torch.utils.flop_counter on
the meta device), achieved TFLOP/s and the fraction of the bf16 matmul peak measured in the same
process. It is rewritten after every variant.

    python benchmarks/bench_train.py --out benchmarks/results/train-H100-2025-01-01.json
    python benchmarks/bench_train.py --models hybrid --variants fused,reference --steps 5

Training targets (H100, bf16): fused step time >= 1.4x faster than reference eager, peak memory <= 0.7x.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py beside this script, however it is run
import harness  # noqa: E402

MODELS = {"hybrid": "vitb_rn50_384", "large": "vitl16_384"}
LABELS = {"hybrid": "DPT-Hybrid", "large": "DPT-Large", "tiny": "tiny (smoke)"}
MODEL_KWARGS = {"hybrid": {"backbone": "vitb_rn50_384"}, "large": {"backbone": "vitl16_384"},
                "tiny": {"backbone": "vit_tiny_patch16_224", "hooks": [2, 5, 8, 11], "features": 32}}
VARIANTS = ("fused", "reference", "reference+compile", "fused+compile")
TARGET_SPEEDUP, TARGET_MEMORY = 1.4, 0.7


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", default="hybrid,large", help=f"comma-separated, of {sorted(MODELS)}")
    ap.add_argument("--variants", default="fused,reference,reference+compile", help=f"comma-separated, of {VARIANTS}")
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--batch", type=int, default=16, help="largest batch tried (halved while reference eager OOMs)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode of the +compile variants (max-autotune compiles for many minutes "
                         "per training graph; the GPU suite's time limit allows 'default')")
    ap.add_argument("--grad-checkpointing", action="store_true", help="checkpoint the transformer blocks")
    ap.add_argument("--budget-s", type=float, default=390.0,
                    help="skip variants that would start after this many seconds, stop one running past it")
    ap.add_argument("--compile-timeout-s", type=float, default=None,
                    help="cap on a compiled variant's first step (compilation); over it: skipped")
    ap.add_argument("--out", help="JSON results file (rewritten after every variant)")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run of the code path (a tiny model, 64x64, "
                    "batch 2, 2 steps, compile capped at 2 s); no measurement")
    args = ap.parse_args(argv)
    if args.smoke:
        args.models, args.size, args.batch, args.warmup, args.steps = "tiny", 64, 2, 1, 2
        args.compile_timeout_s = 2.0 if args.compile_timeout_s is None else args.compile_timeout_s
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    for m in args.models:
        if m not in MODELS and not (args.smoke and m == "tiny"):
            ap.error(f"unknown model {m!r}; choose from {sorted(MODELS)}")
    for v in args.variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {VARIANTS}")
    return args


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(batch: int, size: int, device) -> dict:
    from dpt_fast.data import SyntheticDataset, TrainStream
    stream = TrainStream([SyntheticDataset(batch, resolution=size + size // 4)], size)
    samples = torch.utils.data.default_collate([stream[i] for i in range(batch)])
    samples["image"] = samples["image"].contiguous(memory_format=torch.channels_last)
    return {k: v.to(device) for k, v in samples.items()}


class Step:
    """One training step of `model` on the fixed `batch`, as dpt_fast.train runs it."""

    def __init__(self, model, batch, compiled_model=None):
        from dpt_fast.losses import ScaleShiftInvariantLoss
        from dpt_fast.train import param_groups
        self.model, self.batch = model, batch
        self.run_model = compiled_model if compiled_model is not None else model  # (an OptimizedModule has no truth value)
        self.optimizer = torch.optim.Adam(param_groups(model, 1e-4, 1e-5), fused=True)
        self.loss_fn = ScaleShiftInvariantLoss()
        self.last_loss = None

    def __call__(self):
        with torch.autocast(self.batch["image"].device.type, dtype=torch.bfloat16):
            pred = self.run_model(self.batch["image"])
        loss = self.loss_fn(pred, self.batch["disparity"], self.batch["mask"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.last_loss = loss.detach()


def build_model(name: str, initial_state, args, device):
    import dpt_fast
    with torch.device(device):  # initialised on the GPU (fast), then overwritten with the shared weights
        model = dpt_fast.DPTDepthModel(**MODEL_KWARGS[name])
    model.load_state_dict(initial_state)
    model = model.to(memory_format=torch.channels_last).train()
    model.pretrained.grad_checkpointing = args.grad_checkpointing
    return model


def run_variant(name: str, variant: str, batch: dict, initial_state, args, device, time_limit_s=None,
                flops=None, peak=None) -> dict:
    import contextlib
    import dpt_fast
    from dpt_fast.bench import inline_plain_ops
    from dpt_fast.measure import (FUSED_OPS, DeadlineExceeded, deadline, record_deadline, record_failure,
                                  release_memory, time_calls, verify_fused)
    result = {"model": LABELS[name], "backbone": MODEL_KWARGS[name]["backbone"], "variant": variant, "batch": batch["image"].shape[0],
              "size": args.size, "error": None}
    if variant.endswith("+compile"):
        result["compile_mode"] = args.compile_mode
    stack = contextlib.ExitStack()
    model = step = None
    started = time.perf_counter()
    phase = "build"

    def left():
        return None if time_limit_s is None else time_limit_s - (time.perf_counter() - started)

    first_limit = left()
    if variant.endswith("+compile") and args.compile_timeout_s is not None:
        first_limit = args.compile_timeout_s if first_limit is None else min(first_limit, args.compile_timeout_s)
    try:
        with deadline(first_limit, f"{variant} (build and first step)"):
            stack.enter_context(dpt_fast.use_backend("reference" if variant.startswith("reference") else "fused"))
            if variant == "reference+compile":
                stack.enter_context(inline_plain_ops(attention="sdpa"))
            model = build_model(name, initial_state, args, device)
            compiled = torch.compile(model, mode=args.compile_mode) if variant.endswith("+compile") else None
            step = Step(model, batch, compiled)
            phase = "first step"
            dpt_fast.implementations_ran(reset=True)
            t0 = time.perf_counter()
            step()
            _sync(device)
            result["first_step_s"] = time.perf_counter() - t0
        phase = "timing"
        with deadline(left(), f"{variant} (timing)"):
            for _ in range(max(args.warmup - 1, 0)):
                step()
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = time_calls(step, device, warmup=0, runs=args.steps, max_time=float("inf"))
        ran = dpt_fast.implementations_ran(reset=True)
        if variant == "reference+compile":
            ran = {"inlined": {"plain PyTorch (attention via F.scaled_dot_product_attention)": 1}}
        elif variant.startswith("fused"):
            result["fused_path"] = verify_fused(ran, FUSED_OPS + tuple(op + "_backward" for op in FUSED_OPS))
        median = statistics.median(times)
        result.update({
            "step_ms": median * 1e3, "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
            "steps": len(times), "images_per_s": result["batch"] / median,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "loss": float(step.last_loss), "loss_finite": bool(torch.isfinite(step.last_loss)),
            "implementations": ran,
            "tflops": flops / median / 1e12 if flops else None,
            "mfu": flops / median / 1e12 / peak if flops and peak else None,
        })
    except DeadlineExceeded:
        record_deadline(result, phase, started,
                        args.compile_mode if variant.endswith("+compile") and phase != "timing" else None)
    except Exception as e:  # noqa: BLE001 -- one failing variant must not stop the others
        record_failure(result, e)
    finally:
        stack.close()
        del step, model
        release_memory(device)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def fitting_batch(name: str, initial_state, args, device) -> int:
    """The largest batch <= --batch (halving) at which the reference eager step runs."""
    import dpt_fast
    from dpt_fast.measure import release_memory
    batch = args.batch
    while batch >= 1:
        model = step = None
        try:
            with dpt_fast.use_backend("reference"):
                model = build_model(name, initial_state, args, device)
                step = Step(model, make_batch(batch, args.size, device))
                step()
                step()
                _sync(device)
            return batch
        except torch.OutOfMemoryError:
            batch //= 2
        finally:
            del step, model
            release_memory(device)
    raise RuntimeError("not even batch 1 fits")


def ratios(results: list[dict]) -> dict:
    out = {}
    for label in dict.fromkeys(r["model"] for r in results):
        rows = {r["variant"]: r for r in results if r["model"] == label and r.get("step_ms")}
        fused = rows.get("fused")
        entry = {}
        for base in ("reference", "reference+compile"):
            if fused and base in rows:
                entry[f"speedup_vs_{base}"] = rows[base]["step_ms"] / fused["step_ms"]
                if fused.get("peak_memory_gib") and rows[base].get("peak_memory_gib"):
                    entry[f"memory_vs_{base}"] = fused["peak_memory_gib"] / rows[base]["peak_memory_gib"]
        if "speedup_vs_reference" in entry:
            entry["meets_speed_target"] = entry["speedup_vs_reference"] >= TARGET_SPEEDUP
            entry["meets_memory_target"] = (entry["memory_vs_reference"] <= TARGET_MEMORY
                                            if "memory_vs_reference" in entry else None)
            entry["fused_path_verified"] = bool(fused.get("fused_path", {}).get("verified"))
        out[label] = entry
    return out


def markdown(report: dict) -> str:
    lines = [f"Training step, {report['environment']['device']}, {report['size']}x{report['size']}, bf16 autocast, "
             f"Adam, torch {report['environment']['versions']['torch']}, triton "
             f"{report['environment']['versions']['triton']}, {report['environment']['date']}",
             "", "| model | variant | batch | step ms | images/s | peak GiB | speed vs ref | memory vs ref |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        ref = next((x for x in report["results"] if x["model"] == r["model"] and x["variant"] == "reference"
                    and x.get("step_ms")), None)
        variant = r["variant"] + (f" ({r['compile_mode']})" if r.get("compile_mode") else "")
        if r.get("fused_path") and not r["fused_path"]["verified"]:
            variant += " (reference ran)"
        if r.get("step_ms") is None:
            lines.append(f"| {r['model']} | {variant} | {r['batch']} | {r['error']} | | | | |")
            continue
        speed = f"{ref['step_ms'] / r['step_ms']:.2f}x" if ref else "–"
        memory = (f"{r['peak_memory_gib'] / ref['peak_memory_gib']:.2f}x"
                  if ref and r.get("peak_memory_gib") and ref.get("peak_memory_gib") else "–")
        peak_gib = "–" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.2f}"
        lines.append(f"| {r['model']} | {variant} | {r['batch']} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | "
                     f"{peak_gib} | {speed} | {memory} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    refused = harness.refuse_without_gpu("bench_train.py", args.smoke)
    if refused is not None:
        return refused
    import dpt_fast
    from dpt_fast.bench import count_flops
    from dpt_fast.measure import environment, measure_ceilings, warm_up_compiler, write_json
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    started = time.perf_counter()
    ceilings = measure_ceilings(device, torch.bfloat16)
    report = {"benchmark": "train_step", "environment": environment(device, torch.bfloat16), "smoke": args.smoke,
              "size": args.size, "batch_requested": args.batch,
              "compile_mode": args.compile_mode, "grad_checkpointing": args.grad_checkpointing,
              "loss": "ScaleShiftInvariantLoss(trimmed, alpha=0.5)", "optimizer": "Adam(fused), lr 1e-4 / 1e-5",
              "ceilings": ceilings, "budget_s": args.budget_s, "results": [], "complete": False}

    def write():
        report["ratios"] = ratios(report["results"])
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        if args.out:
            write_json(args.out, report)

    # fused and reference of every model first (the targets), then the compiled variants
    plain = [v for v in args.variants if not v.endswith("+compile")]
    compiled = [v for v in args.variants if v.endswith("+compile")]
    tasks = [(m, v) for m in args.models for v in plain] + [(m, v) for v in compiled for m in args.models]
    prepared = {}  # model -> (initial_state, batch_size, batch, flops)
    for name, variant in tasks:
        remaining = args.budget_s - (time.perf_counter() - started)
        if remaining <= 1:
            report["results"].append({"model": LABELS[name], "variant": variant,
                                      "batch": prepared[name][1] if name in prepared else None,
                                      "error": f"skipped: time budget of {args.budget_s:.0f} s spent"})
        else:
            if name not in prepared:
                torch.manual_seed(0)
                with torch.device(device):
                    initial_state = {k: v.cpu() for k, v in
                                     dpt_fast.DPTDepthModel(**MODEL_KWARGS[name]).state_dict().items()}
                try:
                    batch_size = fitting_batch(name, initial_state, args, device)
                except RuntimeError as e:
                    prepared[name] = (None, None, None, None)
                    report["results"].append({"model": LABELS[name], "variant": variant, "batch": None,
                                              "error": str(e)})
                    write()
                    continue
                try:  # forward + backward FLOPs of one step (the loss and Adam are negligible)
                    flops = count_flops(name, batch_size, (args.size, args.size), train=True)
                except Exception:  # noqa: BLE001
                    flops = None
                prepared[name] = (initial_state, batch_size, make_batch(batch_size, args.size, device), flops)
            initial_state, batch_size, batch, flops = prepared[name]
            if batch is None:
                continue
            if variant.endswith("+compile"):
                warm_up_compiler(device)  # lazy imports done before any compile deadline
            report["results"].append(run_variant(name, variant, batch, initial_state, args, device,
                                                 time_limit_s=remaining, flops=flops,
                                                 peak=ceilings["matmul_tflops"]))
            report["results"][-1]["flops"] = flops
        r = report["results"][-1]
        print(f"{r['model']:10s} {variant:18s} batch {r['batch']}: " +
              (f"{r['step_ms']:8.1f} ms/step, peak {r.get('peak_memory_gib')} GiB" if r.get("step_ms") else r["error"]),
              flush=True)
        write()
    report["complete"] = True
    write()
    print()
    print(markdown(report))
    print(json.dumps(report["ratios"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
