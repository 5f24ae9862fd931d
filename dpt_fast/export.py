"""Export a model for deployment: an ONNX file or a torch.export program (optionally AOTInductor), with
dynamic batch, height and width, checked against eager PyTorch at sizes it was not traced at.

    dpt-fast export dpt_hybrid-midas-501f0c75.pt -o dpt_hybrid.onnx --check
    dpt-fast export depth_anything_v2_vits.pth -o da2-small.pt2 --format pt2 --aoti --check

    import dpt_fast.export
    dpt_fast.export.export(model, "model.onnx", dtype=torch.float16, check=True)

How: the model is traced once with `torch.export` in eval mode, without autograd, under the op layer's
"inline" backend, so the three dpt_fast operators appear as the ordinary aten ops of their reference
math (no custom op, no training form). Batch, height and width are symbolic dimensions: height and width
are declared as multiples of the model's input multiple (`input_multiple`: 32 for DPT, the patch size
14 for Depth Anything), so the model's own padding branch is decided once (no padding) and nothing in
the graph depends on the traced size. ONNX files are converted from that program by
torch.onnx's exporter: standard ONNX operators only (domain ""), opset 18 or newer.

What the exported model expects: `image` [B, 3, H, W] in the export dtype, preprocessed as for the
eager model (dpt_fast.transforms), H and W multiples of `input_multiple(model)`; it returns `depth`
[B, H, W] (DPT: relative inverse depth; Depth Anything: relative disparity or metric depth) or, for
segmentation models, `logits` [B, classes, H, W]. Other sizes are refused by the pt2 program (its
input guard); ONNX Runtime does not check them and returns the prediction of the largest multiples below
the input's size (the last rows and columns dropped). Resize or pad to a multiple first, as
dpt_fast.transforms.preprocess does.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

FORMATS = ("onnx", "pt2")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
DEFAULT_OPSET = 18
# max |exported - eager| / max |eager| accepted by the check, per dtype
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}
_MAX_SIDE = 8192  # largest height/width the symbolic dimensions admit
_MAX_BATCH = 1024


class ExportError(RuntimeError):
    """The model (or a named part of it) cannot be exported as asked; the message says what to do."""


@dataclass
class CheckRow:
    batch: int
    height: int
    width: int
    max_abs_error: float
    max_abs_eager: float
    tolerance: float

    @property
    def relative_error(self) -> float:
        """The largest difference relative to the largest eager output."""
        return self.max_abs_error / max(self.max_abs_eager, 1e-30)

    @property
    def ok(self) -> bool:
        return self.relative_error <= self.tolerance

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (f"  batch {self.batch}, {self.height}x{self.width}: max |exported - eager| = {self.max_abs_error:.3g} "
                f"(relative {self.relative_error:.3g}, tolerance {self.tolerance:g}) {verdict}")


@dataclass
class ExportResult:
    path: Path
    format: str
    dtype: torch.dtype
    input_multiple: int
    output_name: str
    traced_shape: tuple[int, int, int, int]
    files: list[Path] = field(default_factory=list)
    check: list[CheckRow] = field(default_factory=list)

    @property
    def check_passed(self) -> bool:
        return all(row.ok for row in self.check)


# --- what is exported ----------------------------------------------------------------------------

def _family(model: nn.Module) -> str:
    from .models import DPTDepthModel, DPTSegmentationModel, DepthAnythingModel
    if isinstance(model, DepthAnythingModel):
        return "depth_anything"
    if isinstance(model, DPTSegmentationModel):
        return "segmentation"
    if isinstance(model, DPTDepthModel):
        return "depth"
    raise ExportError(f"cannot export a {type(model).__name__}: dpt_fast.export takes the models "
                      "dpt_fast.load_model returns (DPTDepthModel, DPTSegmentationModel, DepthAnythingModel)")


def input_multiple(model: nn.Module) -> int:
    """Height and width of the exported model's input must be multiples of this."""
    if _family(model) == "depth_anything":
        return int(model.patch_size)
    from .models.dpt import SIZE_MULTIPLE
    return SIZE_MULTIPLE


def output_name(model: nn.Module) -> str:
    return "logits" if _family(model) == "segmentation" else "depth"


class ExportedForward(nn.Module):
    """The forward that is exported: the model's own, for inputs that are multiples of its input multiple.

    DPT models run their forward (no padding is needed at those sizes; segmentation models in eval mode
    return their logits). Depth Anything runs `forward_raw`, the original's forward: its `forward`
    resizes other sizes, a choice made from the input's size that a graph with symbolic sizes cannot
    keep."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.family = _family(model)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.family == "depth_anything":
            self.model.check_input(image)
            return self.model.forward_raw(image)
        return self.model(image)


def traced_shape(model: nn.Module, batch: int = 2) -> tuple[int, int, int, int]:
    """The example input's shape: batch 2 (a traced batch of 1 would be specialised), a non-square
    size of a few multiples, so that no dimension is a special value the tracer could bake in."""
    m = input_multiple(model)
    return (batch, 3, 3 * m, 4 * m)


def check_shapes(model: nn.Module) -> list[tuple[int, int, int]]:
    """(batch, height, width) the check runs: square and non-square, batch 1 and 3, none the traced size."""
    m = input_multiple(model)
    return [(1, 4 * m, 4 * m), (3, 5 * m, 3 * m), (1, 4 * m, 6 * m)]


def min_blocks(model: nn.Module) -> int:
    """The smallest height and width the exported model takes, in input multiples. Depth Anything: 3 (its
    stride-2 stage and size-matched fusion upsampling are traced for grids of at least 3 patches)."""
    return 3 if _family(model) == "depth_anything" else 1


def _dynamic_shapes(model: nn.Module):
    m = input_multiple(model)
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    height = torch.export.Dim("height_blocks", min=min_blocks(model), max=_MAX_SIDE // m)
    width = torch.export.Dim("width_blocks", min=min_blocks(model), max=_MAX_SIDE // m)
    return ({0: batch, 2: m * height, 3: m * width},)


def _on_cpu(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model itself when it is on the CPU in `dtype`, else a copy there (the caller's model stays put)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" and (t.dtype == dtype or not t.is_floating_point()) for t in tensors):
        return model
    return copy.deepcopy(model).to(device="cpu", dtype=dtype)


# --- TF "same" padding made static ----------------------------------------------------------------

def _same_pads(module: nn.Module) -> tuple[int, int, int, int]:
    """F.pad's (left, right, top, bottom) of TF "same" padding for an input divisible by the stride: then
    (ceil(x / s) - 1) * s + (k - 1) * d + 1 - x is the constant (k - 1) * d + 1 - s, split with the
    smaller half first (timm's pad_same)."""
    def total(k, s, d):
        return max((k - 1) * d + 1 - s, 0)
    (kh, kw), (sh, sw), (dh, dw) = (nn.modules.utils._pair(v) for v in (module.kernel_size, module.stride,
                                                                        module.dilation))
    ph, pw = total(kh, sh, dh), total(kw, sw, dw)
    return (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)


class _StaticSamePad(nn.Module):
    """A timm 'same'-padded convolution or max pool whose padding is fixed (`_same_pads`) instead of
    computed from the input size. The dynamic form is exact but leaves ceil/max size expressions that
    the tracer simplifies through every later operator (a DPT-Hybrid trace did not finish in 20 minutes
    on 2 CPUs); at the exported sizes (multiples of the input multiple, so every ResNet stage's input
    is divisible by its stride) both forms are equal. The wrapped module keeps its own arithmetic (the
    weight standardisation of StdConv2dSame); only the padding changes."""

    def __init__(self, same: nn.Module, kind: str):
        super().__init__()
        self.same, self.kind, self.pads = same, kind, _same_pads(same)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F
        if self.kind == "maxpool":
            m = self.same
            x = F.pad(x, self.pads, value=-float("inf"))
            return F.max_pool2d(x, m.kernel_size, m.stride, 0, m.dilation, m.ceil_mode)
        x = F.pad(x, self.pads)
        if self.kind == "stdconv":  # its forward without the dynamic pad (same_pad is off while wrapped)
            return self.same(x)
        m = self.same
        return F.conv2d(x, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)


def _dynamic_same_kind(module: nn.Module) -> str | None:
    """Which timm dynamic-'same' layer `module` is (None for anything else, static 'same' included)."""
    try:
        from timm.layers.conv2d_same import Conv2dSame
        from timm.layers.pool2d_same import MaxPool2dSame
        from timm.layers.std_conv import StdConv2dSame
    except ImportError:
        return None
    if isinstance(module, StdConv2dSame):
        return "stdconv" if module.same_pad else None
    if isinstance(module, Conv2dSame):
        return "conv"
    if isinstance(module, MaxPool2dSame):
        return "maxpool"
    return None


@contextlib.contextmanager
def static_same_padding(model: nn.Module):
    """Within the block, every timm dynamic-'same' convolution and max pool of `model` is replaced in
    place by its statically padded form (`_StaticSamePad`); the originals are put back afterwards.
    Valid for inputs whose height and width are multiples of `input_multiple(model)`."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = _dynamic_same_kind(child)
            if kind is not None:
                swapped.append((parent, name, child, kind))
    try:
        for parent, name, child, kind in swapped:
            setattr(parent, name, _StaticSamePad(child, kind))
            if kind == "stdconv":
                child.same_pad = False
        yield len(swapped)
    finally:
        for parent, name, child, kind in swapped:
            setattr(parent, name, child)
            if kind == "stdconv":
                child.same_pad = True


@contextlib.contextmanager
def _export_mode(model: nn.Module):
    """eval mode, no autograd, inline operators; the model's training flag is restored afterwards."""
    from .backend import use_backend
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), use_backend("inline"):
            yield
    finally:
        model.train(was_training)


def export_program(model: nn.Module, dtype: torch.dtype = torch.float32, batch: int = 2):
    """The model as a torch.export.ExportedProgram with symbolic batch, height and width (see module doc)."""
    if dtype not in TOLERANCE:
        raise ExportError(f"dtype must be float32 or float16, got {dtype}")
    model = _on_cpu(model, dtype)
    wrapper = ExportedForward(model)
    example = torch.randn(traced_shape(model, batch), dtype=dtype)
    with _export_mode(model), static_same_padding(model):
        try:
            program = torch.export.export(wrapper, (example,), dynamic_shapes=_dynamic_shapes(model), strict=False)
        except Exception as exc:  # name the part that failed, keep the tracer's message
            raise ExportError(f"torch.export failed in {_failing_part(exc, model)}: {first_line(exc)}") from exc
        # core ATen inference ops: eval-mode forms only (e.g. no aten.dropout(train=False) left behind)
        return program.run_decompositions()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _failing_part(exc: BaseException, model: nn.Module) -> str:
    """The innermost frame of the traceback outside torch itself (file:line, function): the model code
    the tracer stopped in, named for the error message."""
    import traceback
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        name = frame.filename.replace(os.sep, "/")
        if "/torch/" in name or name.startswith("<") or name.endswith("/dpt_fast/export.py"):
            continue
        part = "timm (the encoder)" if "/timm/" in name else "dpt_fast" if "/dpt_fast/" in name else "the model"
        return f"{part} at {'/'.join(name.split('/')[-2:])}:{frame.lineno} ({frame.name})"
    return f"the {type(model).__name__} model"


def _opset_check(opset: int) -> int:
    if int(opset) < DEFAULT_OPSET:
        raise ExportError(f"opset must be {DEFAULT_OPSET} or newer, got {opset}")
    return int(opset)


def onnx_program(program, model: nn.Module, opset: int = DEFAULT_OPSET):
    """torch.onnx's ONNXProgram for an exported program of `model` (standard ONNX domain only)."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's translation library)
    except ImportError as exc:
        raise ExportError("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript "
                          "(onnxruntime too, for --check)") from exc
    try:
        return torch.onnx.export(program, (), dynamo=True, opset_version=_opset_check(opset),
                                 input_names=["image"], output_names=[output_name(model)], verbose=False)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"ONNX conversion failed: {first_line(exc)}") from exc


def custom_domain_nodes(onnx_model) -> list[str]:
    """Nodes outside the standard ONNX domain (including inside functions): what a runtime may not know."""
    standard = ("", "ai.onnx")
    nodes = [f"{n.domain}::{n.op_type}" for n in onnx_model.graph.node if n.domain not in standard]
    for fn in onnx_model.functions:
        nodes += [f"{n.domain}::{n.op_type}" for n in fn.node if n.domain not in standard]
    return nodes


# --- writing -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _staged(path: Path):
    """A temporary folder beside `path`; what is written there under path's name (and any side files,
    e.g. ONNX external data) replaces the destination only when the block completes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.export-", dir=path.parent))
    moved = []
    try:
        yield stage / path.name, moved
        for item in sorted(stage.iterdir()):
            os.replace(item, path.parent / item.name)
            moved.append(path.parent / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _say(progress, message: str) -> None:
    if progress:
        print(f"[export] {message}", file=sys.stderr, flush=True)


def export(model: nn.Module, path, format: str | None = None, dtype: torch.dtype = torch.float32,
           opset: int = DEFAULT_OPSET, aoti: bool = False, check: bool = False,
           progress: bool = False) -> ExportResult:
    """Export `model` to `path` as ONNX (`format="onnx"`, the default for a .onnx suffix) or as a
    torch.export program (`"pt2"`, saved with torch.export.save; with `aoti=True` an AOTInductor package
    instead, loadable with torch._inductor.aoti_load_package in a process without dpt_fast).
    `check=True` runs the written artifact at `check_shapes(model)` and compares it with eager PyTorch;
    the rows land in `result.check` (see `result.check_passed`). The model is moved to the CPU in `dtype`."""
    path = Path(path)
    fmt = format or ("pt2" if path.suffix == ".pt2" else "onnx")
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    if aoti and fmt != "pt2":
        raise ExportError("--aoti builds an AOTInductor package: use it with --format pt2")
    if dtype not in TOLERANCE:
        raise ExportError(f"dtype must be float32 or float16, got {dtype}")
    if fmt == "onnx":
        _opset_check(opset)
    family = _family(model)  # refuse other modules before any work
    started = time.perf_counter()
    _say(progress, f"tracing {type(model).__name__} ({family}) with torch.export, {str(dtype)[6:]}, "
                   f"dynamic batch/height/width (multiples of {input_multiple(model)})")
    program = export_program(model, dtype)
    result = ExportResult(path, fmt, dtype, input_multiple(model), output_name(model), traced_shape(model))
    with _staged(path) as (target, moved):
        if fmt == "onnx":
            _say(progress, f"converting to ONNX (opset {opset}) [{time.perf_counter() - started:.0f} s]")
            onnx_program(program, model, opset).save(str(target))
            import onnx
            odd = custom_domain_nodes(onnx.load(str(target), load_external_data=False))
            if odd:
                raise ExportError(f"the ONNX graph holds non-standard operators {sorted(set(odd))}")
        elif aoti:
            _say(progress, f"compiling an AOTInductor package (minutes) [{time.perf_counter() - started:.0f} s]")
            try:
                torch._inductor.aoti_compile_and_package(program, package_path=str(target))
            except Exception as exc:
                raise ExportError(f"AOTInductor compilation failed: {first_line(exc)}") from exc
        else:
            torch.export.save(program, str(target))
    result.files = moved
    _say(progress, f"wrote {', '.join(str(f) for f in moved)} [{time.perf_counter() - started:.0f} s]")
    if check:
        _say(progress, "checking the exported model against eager PyTorch at sizes it was not traced at")
        result.check = check_artifact(path, model, fmt, dtype, aoti=aoti)
        for row in result.check:
            _say(progress, row.line())
    return result


# --- checking ------------------------------------------------------------------------------------

def _runner(path: Path, fmt: str, aoti: bool):
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError as exc:
            raise ExportError("checking an ONNX file needs onnxruntime: pip install onnxruntime") from exc
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    if aoti:
        compiled = torch._inductor.aoti_load_package(str(path))
        return lambda x: compiled(x)
    module = torch.export.load(str(path)).module()
    return lambda x: module(x)


def check_artifact(path, model: nn.Module, fmt: str, dtype: torch.dtype = torch.float32, aoti: bool = False,
                   shapes=None, seed: int = 0) -> list[CheckRow]:
    """Run the exported artifact at `shapes` ((batch, height, width); default `check_shapes(model)`) on
    random inputs and compare with the eager model (same dtype, CPU, reference operators)."""
    from .backend import use_backend
    run = _runner(Path(path), fmt, aoti)
    model = _on_cpu(model, dtype).eval()
    forward = ExportedForward(model)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for batch, height, width in shapes or check_shapes(model):
        x = torch.randn(batch, 3, height, width, generator=gen).to(dtype)
        with torch.no_grad(), use_backend("reference"):
            expected = forward(x).float()
        try:
            with torch.no_grad():
                got = run(x).float()
        except Exception as exc:
            raise ExportError(f"the exported model failed at batch {batch}, {height}x{width}: "
                              f"{first_line(exc)}") from exc
        if got.shape != expected.shape:
            raise ExportError(f"the exported model returned {tuple(got.shape)} for batch {batch}, "
                              f"{height}x{width}; eager returns {tuple(expected.shape)}")
        rows.append(CheckRow(batch, height, width, float((got - expected).abs().max()),
                             float(expected.abs().max()), TOLERANCE[dtype]))
    return rows


def aoti_runs_without_dpt_fast(package, shape=(1, 3, 64, 64), dtype: str = "float32") -> subprocess.CompletedProcess:
    """Load and run an AOTInductor package in a fresh Python process in which importing dpt_fast fails."""
    script = ("import sys; sys.modules['dpt_fast'] = None\n"
              "import torch\n"
              f"m = torch._inductor.aoti_load_package({str(package)!r})\n"
              f"out = m(torch.randn({tuple(shape)!r}, dtype=torch.{dtype}))\n"
              "print(tuple(out.shape), bool(torch.isfinite(out).all()))\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
