"""`dpt-fast predict`: DPT over files, folders and globs, at a fixed size, at native resolution, or tiled.

Pipeline (one process per GPU; `torchrun` runs several, each on its own shard of the inputs):

  DataLoader workers decode images (PIL)  ->  main thread groups them by processed size into batches,
  copies the uint8 pixels to the device and preprocesses there (dpt_fast.transforms)  ->  model
  (bf16 on CUDA by default, optionally torch.compile'd)  ->  back to each input's resolution on the
  device  ->  asynchronous copy to the host  ->  writer threads encode and write atomically.

Robustness: an unreadable input is named and skipped (exit status 1 at the end); outputs are written
atomically; finished outputs are skipped on a re-run unless --overwrite; a CUDA out-of-memory error on
a batch retries with halves, and on a single image falls back to tiled inference.
"""
from __future__ import annotations

import argparse
import glob
import itertools
import math
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import image_io
from .transforms import DEPTH_SIZE, SEGMENTATION_SIZE, normalize_depth, preprocess, resize_prediction, target_size

SIZE_MULTIPLE = 32
FALLBACK_TILE = 1024  # tile size used when a single image does not fit in memory and --tile was not given

WEIGHTS_HELP = """\
--model is a checkpoint file or folder; any of these works:

  * an original release file (github.com/isl-org/DPT, "Releases"):
      dpt_large-midas-2f21e586.pt      depth, ViT-L/16
      dpt_hybrid-midas-501f0c75.pt     depth, ViT-Hybrid (ResNet-50 + ViT-B/16)
      dpt_hybrid_kitti-cb926ef4.pt     metric depth, KITTI
      dpt_hybrid_nyu-2ce69ec7.pt       metric depth, NYUv2
      dpt_large-ade20k-b12dca68.pt     segmentation, ADE20K (150 classes), ViT-L/16
      dpt_hybrid-ade20k-53898607.pt    segmentation, ADE20K, ViT-Hybrid
  * a Hugging Face DPT folder written by save_pretrained, e.g. of Intel/dpt-large,
    Intel/dpt-hybrid-midas or Intel/dpt-large-ade:
      python -c "from transformers import DPTForDepthEstimation as M; M.from_pretrained('Intel/dpt-large').save_pretrained('dpt-large')"
  * a folder written by dpt_fast.save_model.

Example: dpt-fast predict photos/ -o depth/ --model dpt_hybrid-midas-501f0c75.pt
"""

DEPTH_FORMATS = ("png16", "pfm", "npy", "color")
SEGMENTATION_FORMATS = ("png", "npy", "color")
FORMAT_SUFFIX = {"png16": ".png", "png": ".png", "pfm": ".pfm", "npy": ".npy", "color": "-color.png"}
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


class UsageError(Exception):
    """A problem with the command line: reported without a traceback, exit status 2."""


# --- inputs and outputs --------------------------------------------------------------------------

@dataclass
class Job:
    src: Path
    rel: str                                   # output name relative to OUT, without extension (posix)
    outputs: dict = field(default_factory=dict)  # format -> Path


def _glob_base(pattern: str) -> Path:
    """The leading folders of a glob pattern that contain no wildcard."""
    parts = Path(pattern).parts
    base = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        base.append(part)
    return Path(*base) if base else Path(".")


def _walk(folder: Path, exclude: Path | None):
    """Image files under `folder`, recursively; hidden entries and the output folder are left out."""
    for root, dirs, files in os.walk(folder, followlinks=True):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (exclude is None or (root_path / d).resolve() != exclude))
        for name in sorted(files):
            if not name.startswith(".") and image_io.is_image_name(name):
                yield root_path / name


def collect_inputs(inputs, exclude=None) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """INPUT arguments -> ([(file, relative name with extension)], [(argument, problem)]).

    A folder contributes its image files recursively, named relative to the folder; a file is named by
    its file name; a glob's matches are named relative to the pattern's leading non-wildcard folders.
    The same file given twice is kept once.
    """
    exclude = Path(exclude).resolve() if exclude is not None else None
    found: dict[Path, str] = {}
    problems = []

    def add(path: Path, rel: Path):
        key = path.resolve()
        if key not in found:
            found[key] = (path, rel.as_posix())

    for arg in inputs:
        arg = os.fspath(arg)
        path = Path(arg).expanduser()
        if path.is_dir():
            for f in _walk(path, exclude):
                add(f, f.relative_to(path))
        elif path.is_file():
            add(path, Path(path.name))
        elif glob.has_magic(arg):
            base = _glob_base(os.path.expanduser(arg))
            matches = sorted(glob.glob(os.path.expanduser(arg), recursive=True))
            n_images = 0
            for m in matches:
                m = Path(m)
                if m.is_dir():
                    for f in _walk(m, exclude):
                        add(f, f.relative_to(base))
                        n_images += 1
                elif m.is_file() and image_io.is_image_name(m) and not m.name.startswith("."):
                    if exclude is not None and exclude in m.resolve().parents:
                        continue
                    add(m, m.relative_to(base) if base != Path(".") else m)
                    n_images += 1
            if not n_images:
                problems.append((arg, "the pattern matches no image"))
        else:
            problems.append((arg, "no such file or directory"))
    return list(found.values()), problems


def _qualified(src, name: str, depth: int) -> str:
    """`name` prefixed with the `depth` folders above the part of `src` that `name` already names
    (a/x.jpg and b/x.jpg, both named x from the input folders a and b, become a/x and b/x)."""
    parts = Path(os.path.abspath(src)).parts[1:]  # without the root
    above = parts[:max(0, len(parts) - len(Path(name).parts))]
    return "/".join([*above[len(above) - depth:], name]) if depth <= len(above) else ""


def plan_jobs(items, out_dir, formats) -> list[Job]:
    """Output names: the input's relative name without its extension (subfolders kept). Inputs whose
    names would collide (photo.jpg and photo.png) keep their extension (photo.jpg.png, photo.png.png);
    inputs of one relative name from several input folders (`predict a b` with a/x.jpg and b/x.jpg)
    are prefixed with their folders' names (a/x.png, b/x.png). Names are compared case-insensitively,
    so that no two inputs share an output file on any file system."""
    out_dir = Path(out_dir)
    stems: dict[str, set] = {}
    for _, rel in items:
        stems.setdefault(os.path.splitext(rel)[0].casefold(), set()).add(rel.casefold())
    names = []
    for _, rel in items:
        stem = os.path.splitext(rel)[0]
        names.append(rel if len(stems[stem.casefold()]) > 1 else stem)

    def outputs(name):
        return {fmt: out_dir / (name + FORMAT_SUFFIX[fmt]) for fmt in formats}

    def claimed(name):
        return {str(p).casefold() for p in outputs(name).values()}

    # Names that still collide (one relative name from two folders; "x-color.jpg" against x.jpg's colour
    # output) are qualified by parent folders, else numbered; deterministic in the items, as sharding needs.
    counts: dict[str, int] = {}
    for name in names:
        for path in claimed(name):
            counts[path] = counts.get(path, 0) + 1
    taken: set[str] = set()
    for i in sorted(range(len(items)), key=lambda i: (names[i], str(items[i][0]))):
        if any(counts[p] > 1 for p in claimed(names[i])):
            src, name = items[i][0], names[i]
            depths = range(1, len(Path(os.path.abspath(src)).parts))
            candidates = itertools.chain((_qualified(src, name, d) for d in depths),
                                         (f"{name}~{n}" for n in itertools.count(2)))
            names[i] = next(c for c in candidates if c and not claimed(c) & taken
                            and not any(p in counts for p in claimed(c)))
            taken |= claimed(names[i])
    jobs = [Job(src, name, outputs(name)) for (src, _), name in zip(items, names)]
    jobs.sort(key=lambda j: (j.rel, str(j.src)))
    return jobs


def check_outputs(jobs: list[Job], inputs, out_dir) -> None:
    """Refuse an output folder that is an input folder (a re-run would read the outputs as inputs)
    or whose outputs would overwrite an input image (`predict photos/a.png -o photos`)."""
    out = Path(out_dir).expanduser().resolve()
    for arg in inputs:
        path = Path(os.fspath(arg)).expanduser()
        if path.is_dir() and path.resolve() == out:
            raise UsageError(f"-o {out_dir} is the input folder {os.fspath(arg)}: the next run would read the "
                             "outputs as inputs; choose another output folder (a subfolder of the input is fine)")
    sources = {s for s in (Path(job.src).resolve() for job in jobs) if out in s.parents}
    for job in jobs if sources else ():  # only inputs inside the output folder can be overwritten
        for path in job.outputs.values():
            if path.resolve() in sources:
                raise UsageError(f"the output {path} would overwrite an input image of that name: choose "
                                 "another output folder with -o")


def shard(jobs: list, rank: int, world: int) -> list:
    """The rank's share of the sorted job list: job i goes to rank i % world."""
    return [job for i, job in enumerate(jobs) if i % world == rank]


def job_done(job: Job) -> bool:
    return all(p.is_file() for p in job.outputs.values())


# --- decoding (DataLoader workers) ---------------------------------------------------------------

class ImageFiles(torch.utils.data.Dataset):
    """Decodes one file per item: (index, uint8 [H, W, 3] tensor or None, error message or "")."""

    def __init__(self, paths):
        self.paths = [str(p) for p in paths]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return index, torch.from_numpy(image_io.read_image(self.paths[index])), ""
        except Exception as e:  # noqa: BLE001 -- any failure to decode is reported per file
            return index, None, f"{type(e).__name__}: {e}"


def _items(batch):
    return batch


# --- inference -----------------------------------------------------------------------------------

class _OutOfMemory(Exception):
    pass


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    if tile >= n:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, n - tile, stride)) + [n - tile]
    return sorted(set(starts))


def _ramp(n: int, overlap: int, device) -> torch.Tensor:
    i = torch.arange(n, device=device, dtype=torch.float32)
    if overlap <= 0:
        return torch.ones(n, device=device)
    return torch.minimum(torch.ones_like(i), torch.minimum((i + 1) / (overlap + 1), (n - i) / (overlap + 1)))


class Predictor:
    """Runs a DPT model on lists of decoded images; returns predictions at each image's resolution.

    size: an int (the original's "minimal" resize to multiples of 32 around that size) or None
    (native resolution, padded to multiples of 32 as the model itself does, then cropped back).
    tile: None, or the tile side in processed pixels above which an image is run in overlapping
    tiles blended with linear ramps (depth tiles are first aligned, scale and shift by least squares,
    to a whole-image prediction at tile resolution, since DPT's depth is relative).
    """

    def __init__(self, model, device, size=DEPTH_SIZE, tile=None, tile_overlap=0.25, segmentation=False,
                 compiled=None, batch_size=1, dtype=None):
        self.model = model
        self.run_model = compiled if compiled is not None else model
        self.device = torch.device(device)
        self.size = size
        self.tile = self._round_tile(tile) if tile else None
        self.tile_overlap = tile_overlap
        self.segmentation = segmentation
        self.batch_size = max(1, int(batch_size))
        self.dtype = dtype
        self.batch_limit: dict[tuple, int] = {}  # processed size -> largest batch known to fit
        self.notes: list[str] = []

    @staticmethod
    def _round_tile(tile: int) -> int:
        return max(SIZE_MULTIPLE * 2, int(tile) // SIZE_MULTIPLE * SIZE_MULTIPLE)

    # sizes
    def processed_size(self, height: int, width: int) -> tuple[int, int]:
        if self.size is None:
            return (math.ceil(height / SIZE_MULTIPLE) * SIZE_MULTIPLE, math.ceil(width / SIZE_MULTIPLE) * SIZE_MULTIPLE)
        return target_size(height, width, self.size, SIZE_MULTIPLE)

    def batch_for(self, key) -> int:
        return min(self.batch_size, self.batch_limit.get(key, self.batch_size))

    def needs_tiles(self, key, tile=None) -> bool:
        tile = tile or self.tile
        return tile is not None and max(key) > tile

    # device-side preprocessing
    def prepare(self, image: torch.Tensor, key) -> torch.Tensor:
        """uint8 [H, W, 3] (host) -> normalised float [1, 3, *key] on the device."""
        x = image.to(self.device, non_blocking=True).permute(2, 0, 1)
        height, width = x.shape[-2:]
        if self.size is None:
            x = preprocess(x, size=(height, width))
            pad_h, pad_w = key[0] - height, key[1] - width
            if pad_h or pad_w:  # exactly the model's own padding, so batching changes nothing
                x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        else:
            x = preprocess(x, size=key)
        if self.dtype is not None and self.dtype != x.dtype:
            x = x.to(self.dtype)
        return x

    # model calls
    def forward_split(self, x: torch.Tensor, key=None) -> list[torch.Tensor]:
        """Model outputs for a batch, one [1, ...] tensor per image; on CUDA OOM, halves and retries."""
        oom = False
        try:
            out = self.run_model(x)
            return [out[i:i + 1] for i in range(out.shape[0])]
        except torch.OutOfMemoryError:
            oom = True
        if oom:  # outside the except block: the traceback no longer pins the failed batch's tensors
            if x.is_cuda:
                torch.cuda.empty_cache()
            batch = x.shape[0]
            if batch == 1:
                raise _OutOfMemory(f"out of memory at {x.shape[-2]}x{x.shape[-1]}")
            half = batch // 2
            if key is not None:
                self.batch_limit[key] = min(self.batch_limit.get(key, batch), half)
            note = f"out of memory with a batch of {batch} at {x.shape[-2]}x{x.shape[-1]}: retrying with {half}"
            self.notes.append(note)
            _log(note)
            return self.forward_split(x[:half], key) + self.forward_split(x[half:], key)

    def finish(self, out: torch.Tensor, height: int, width: int, log_probs: bool = False) -> torch.Tensor:
        """A model output [1, ...] at processed size -> the prediction at (height, width): float32
        depth [H, W], or int64 labels [H, W] for segmentation."""
        if not self.segmentation:
            if self.size is None:
                return out[0, :height, :width].float()
            return resize_prediction(out.float(), (height, width))[0]
        if self.size is None:
            return out[0, :, :height, :width].argmax(0)
        probs = out.float().exp() if log_probs else torch.softmax(out.float(), dim=1)
        probs = F.interpolate(probs, size=(height, width), mode="bicubic", align_corners=False)
        return probs[0].argmax(0)

    def predict_batch(self, images: list[torch.Tensor], key) -> list[torch.Tensor]:
        """Same processed size `key` for every image; returns predictions (on the device)."""
        x = torch.cat([self.prepare(im, key) for im in images])
        outs = self.forward_split(x, key)
        del x
        return [self.finish(out, im.shape[0], im.shape[1]) for out, im in zip(outs, images)]

    def predict_tiled(self, image: torch.Tensor, key, tile: int) -> torch.Tensor:
        tile = self._round_tile(tile)
        x = self.prepare(image, key)
        ph, pw = key
        th, tw = min(tile, ph), min(tile, pw)
        overlap = int(round(tile * self.tile_overlap))
        ys, xs = _tile_starts(ph, th, overlap), _tile_starts(pw, tw, overlap)
        window = _ramp(th, overlap, self.device)[:, None] * _ramp(tw, overlap, self.device)[None, :]
        acc_device = self.device if not self.segmentation else torch.device("cpu")
        weight = torch.zeros(ph, pw, device=acc_device)
        acc = None
        reference = self._global_depth(x, tile) if not self.segmentation else None
        boxes = [(y, x0) for y in ys for x0 in xs]
        for start in range(0, len(boxes), self.batch_size):
            chunk = boxes[start:start + self.batch_size]
            batch = torch.cat([x[:, :, y:y + th, x0:x0 + tw] for y, x0 in chunk])
            outs = self.forward_split(batch)
            del batch
            for (y, x0), out in zip(chunk, outs):
                if self.segmentation:
                    value = torch.softmax(out[0].float(), dim=0)
                else:
                    value = self._align(out[0].float(), reference[y:y + th, x0:x0 + tw])
                if acc is None:
                    acc = torch.zeros((value.shape[0], ph, pw) if value.dim() == 3 else (ph, pw), device=acc_device)
                acc[..., y:y + th, x0:x0 + tw] += (value * window).to(acc_device)
                weight[y:y + th, x0:x0 + tw] += window.to(acc_device)
        blended = (acc / weight).to(self.device)[None]
        if self.segmentation:
            return self.finish(blended.clamp_min(1e-12).log(), image.shape[0], image.shape[1], log_probs=True)
        return self.finish(blended, image.shape[0], image.shape[1])

    def _global_depth(self, x: torch.Tensor, tile: int) -> torch.Tensor:
        """The whole image at tile resolution, upsampled to x's size: the frame tiles are aligned to."""
        ph, pw = x.shape[-2:]
        scale = min(1.0, tile / max(ph, pw))
        gh = max(SIZE_MULTIPLE, int(round(ph * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
        gw = max(SIZE_MULTIPLE, int(round(pw * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
        small = F.interpolate(x.float(), size=(gh, gw), mode="bilinear", align_corners=False, antialias=True)
        out = self.forward_split(small.to(x.dtype))[0].float()
        return F.interpolate(out[:, None], size=(ph, pw), mode="bilinear", align_corners=False)[0, 0]

    @staticmethod
    def _align(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """scale * pred + shift closest (least squares) to ref; scale kept non-negative."""
        pm, rm = pred.mean(), ref.mean()
        dp = pred - pm
        scale = ((dp * (ref - rm)).mean() / (dp * dp).mean().clamp_min(1e-12)).clamp_min(0)
        return scale * dp + rm


# --- writing -------------------------------------------------------------------------------------

class Writer:
    """Background threads that wait for a prediction's host copy and write its files atomically."""

    def __init__(self, threads: int = 2, maxsize: int = 16, num_classes: int | None = None):
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.failures: list[tuple[str, str]] = []
        self.written = 0
        self._lock = threading.Lock()
        self.num_classes = num_classes
        self.threads = [threading.Thread(target=self._loop, daemon=True, name=f"dpt-fast-writer-{i}")
                        for i in range(max(1, threads))]
        for t in self.threads:
            t.start()

    def submit(self, job: Job, prediction: torch.Tensor, event=None, image: torch.Tensor | None = None):
        self.queue.put((job, prediction, event, image))

    def close(self):
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()

    def _loop(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            job, prediction, event, image = item
            try:
                if event is not None:
                    event.synchronize()
                write_outputs(job, prediction, image)
                with self._lock:
                    self.written += 1
            except Exception as e:  # noqa: BLE001 -- reported per file
                with self._lock:
                    self.failures.append((str(job.src), f"writing failed: {type(e).__name__}: {e}"))
                _log(f"failed: {job.src}: writing failed: {type(e).__name__}: {e}")


def write_outputs(job: Job, prediction: torch.Tensor, image: torch.Tensor | None = None) -> None:
    """Write every requested format of one prediction (float depth [H, W] or int labels [H, W])."""
    if prediction.is_floating_point():
        values = prediction.float()
        for fmt, path in job.outputs.items():
            if fmt in ("png16", "png"):
                image_io.write_png16(path, normalize_depth(values[None])[0].numpy().astype(np.uint16))
            elif fmt == "pfm":
                image_io.write_pfm(path, values.numpy())
            elif fmt == "npy":
                image_io.write_npy(path, values.numpy())
            elif fmt == "color":
                image_io.write_rgb(path, image_io.colorize(values.numpy()))
    else:
        labels = prediction.numpy()
        for fmt, path in job.outputs.items():
            if fmt == "png":
                image_io.write_palette_png(path, labels)
            elif fmt == "npy":
                image_io.write_npy(path, labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.int32))
            elif fmt == "color":
                if image is None:
                    raise ValueError("the colour overlay needs the input image")
                image_io.write_rgb(path, image_io.overlay_labels(image.numpy(), labels))


# --- helpers -------------------------------------------------------------------------------------

_log_lock = threading.Lock()
_progress = None


def _log(message: str) -> None:
    with _log_lock:
        text = f"dpt-fast predict: {message}"
        if _progress is not None and not _progress.disable:
            _progress.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (1 process when unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent")
    return rank, world, local


def _init_group(world: int) -> bool:
    """A gloo process group, only when there are several processes with a rendezvous address
    (torchrun sets it): used to agree on the exit status and to sum the counts at the end."""
    import torch.distributed as dist
    if world <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if "MASTER_ADDR" not in os.environ:
        return False
    # Ranks finish at different times; the final all_reduce must wait for the slowest shard.
    dist.init_process_group("gloo", timeout=timedelta(days=7))
    return True


def pick_device(requested: str | None, local_rank: int) -> torch.device:
    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {requested}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def _activate(device: torch.device) -> None:
    """Make `device` the current CUDA device: streams and events then live where the work runs."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def parse_formats(text: str | None, segmentation: bool) -> tuple[str, ...]:
    if not text:
        return ("png",) if segmentation else ("png16",)
    formats = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    if segmentation:
        formats = tuple("png" if f == "palette" else f for f in formats)
        allowed = SEGMENTATION_FORMATS
    else:
        formats = tuple("png16" if f == "png" else f for f in formats)
        allowed = DEPTH_FORMATS
    bad = [f for f in formats if f not in allowed]
    if bad:
        kind = "segmentation" if segmentation else "depth"
        raise UsageError(f"--format {','.join(bad)} is not a {kind} output; choose from {','.join(allowed)}")
    return formats


def parse_size(text: str | None, segmentation: bool):
    if text is None:
        return SEGMENTATION_SIZE if segmentation else DEPTH_SIZE
    if text.lower() == "native":
        return None
    try:
        size = int(text)
    except ValueError:
        raise UsageError(f"--size must be a number of pixels or 'native', got {text!r}") from None
    if size < SIZE_MULTIPLE:
        raise UsageError(f"--size must be at least {SIZE_MULTIPLE}, got {size}")
    return size


def _default_workers(device: torch.device, local_world: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type != "cuda":
        return 0  # decoding would compete with the model for the same cores
    return max(1, min(8, cpus // max(1, local_world) - 1))


def _keep_head_float32(model) -> None:
    """Run the depth head in float32 under a 16-bit model: a bf16 output has 8 significant bits,
    which would band the 16-bit PNG. The head is a small share of the FLOPs."""
    head = model.scratch.output_conv
    head.float()

    def cast(_module, args):
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    head.register_forward_pre_hook(cast)


# --- the command ---------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders (searched recursively) or glob patterns")
    parser.add_argument("-o", "--out", required=True, help="output folder (input subfolders are kept)")
    parser.add_argument("--model", "-m", help="checkpoint: original release .pt, Hugging Face DPT folder, "
                        "or a dpt_fast.save_model folder")
    parser.add_argument("--size", default=None,
                        help="processing size: N (resize like the original, default 384 for depth, 480 for "
                        "segmentation) or 'native' (each image at its own resolution)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: 16 on CUDA "
                        "at a fixed size, 1 at native size or on CPU)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--format", default=None, help="comma-separated outputs; depth: png16 (default), pfm, "
                        "npy, color; segmentation: png (palette, default), npy, color")
    parser.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available; "
                        "under torchrun, cuda:LOCAL_RANK)")
    parser.add_argument("--num-workers", type=int, default=None, help="decoding processes per GPU process")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="torch.compile mode with --compile (reduce-overhead and max-autotune use CUDA graphs)")
    parser.add_argument("--tile", type=int, default=None,
                        help="run images whose processed size exceeds N pixels in overlapping N x N tiles")
    parser.add_argument("--tile-overlap", type=float, default=0.25, help="tile overlap as a fraction of --tile")
    parser.add_argument("--backend", default="fused", choices=["fused", "reference"],
                        help="dpt_fast operator implementations (default: fused kernels where they apply)")
    parser.add_argument("--writers", type=int, default=2, help="writer threads (default 2)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default: on when stderr is a terminal)")


def run(args: argparse.Namespace) -> int:
    """The command; returns the exit status (0 all written, 1 some input failed, 2 usage)."""
    from . import use_backend
    with use_backend(args.backend):  # restored afterwards: run() may be called in a longer-lived process
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    global _progress
    from .models import DPTSegmentationModel

    if not args.model:
        print("dpt-fast predict: --model is missing.\n\n" + WEIGHTS_HELP, file=sys.stderr, end="")
        return 2
    rank, world, local_rank = distributed_env()
    device = pick_device(args.device, local_rank)
    _activate(device)
    if args.dtype is not None:
        dtype = DTYPES[args.dtype]
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tile is not None and args.tile < 2 * SIZE_MULTIPLE:
        raise UsageError(f"--tile must be at least {2 * SIZE_MULTIPLE}")
    if not 0 <= args.tile_overlap < 1:
        raise UsageError("--tile-overlap must be in [0, 1)")
    grouped = _init_group(world)

    from .weights import load_model
    try:
        model = load_model(args.model, device=device, dtype=dtype)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        print(f"dpt-fast predict: cannot read the model: {e}\n", file=sys.stderr)
        print(WEIGHTS_HELP, file=sys.stderr, end="")
        return 2
    except ValueError as e:  # weights.CheckpointError and friends: the message says what did not fit
        print(f"dpt-fast predict: cannot load the model {args.model}: {e}", file=sys.stderr)
        return 2
    model.eval()
    segmentation = isinstance(model, DPTSegmentationModel)
    if not segmentation and dtype != torch.float32:
        _keep_head_float32(model)
    size = parse_size(args.size, segmentation)
    formats = parse_formats(args.format, segmentation)
    batch_size = args.batch_size or (16 if device.type == "cuda" and size is not None else 1)
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")

    out_dir = Path(args.out).expanduser()
    items, problems = collect_inputs(args.inputs, exclude=out_dir)
    failures: list[tuple[str, str]] = [(arg, why) for arg, why in problems]
    if rank == 0:
        for arg, why in problems:
            _log(f"failed: {arg}: {why}")
    else:
        failures = []  # input problems are counted once, by rank 0
    planned = plan_jobs(items, out_dir, formats)
    check_outputs(planned, args.inputs, out_dir)
    jobs = shard(planned, rank, world)
    todo = jobs if args.overwrite else [j for j in jobs if not job_done(j)]
    skipped = len(jobs) - len(todo)
    if skipped and rank == 0:
        _log(f"{skipped} input(s) already have all outputs{' on this rank' if world > 1 else ''}: skipped "
             f"(--overwrite recomputes them)")

    compiled = None
    if args.compile:
        compiled = torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = size is not None
    predictor = Predictor(model, device, size=size, tile=args.tile, tile_overlap=args.tile_overlap,
                          segmentation=segmentation, compiled=compiled, batch_size=batch_size, dtype=dtype)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or 1)
    workers = args.num_workers if args.num_workers is not None else _default_workers(device, local_world)
    loader = torch.utils.data.DataLoader(
        ImageFiles([j.src for j in todo]), batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=_items, pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    writer = Writer(threads=args.writers, maxsize=max(8, 2 * batch_size),
                    num_classes=getattr(model, "num_classes", None))

    from tqdm import tqdm
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = tqdm(total=len(todo), unit="img", disable=not show or rank != 0, dynamic_ncols=True,
                    desc=f"predict (rank 0 of {world})" if world > 1 else "predict", mininterval=0.5)
    _progress = progress
    done_images, done_pixels, started = 0, 0, time.perf_counter()

    def account(images):
        nonlocal done_images, done_pixels
        done_images += len(images)
        done_pixels += sum(im.shape[0] * im.shape[1] for im in images)
        elapsed = max(time.perf_counter() - started, 1e-9)
        progress.set_postfix_str(f"{done_images / elapsed:.2f} img/s, {done_pixels / 1e6 / elapsed:.1f} MP/s",
                                 refresh=False)
        progress.update(len(images))

    def emit(job, prediction, image):
        if prediction.device.type == "cuda":
            host = prediction.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            writer.submit(job, host, event, image if segmentation else None)
        else:
            writer.submit(job, prediction, None, image if segmentation else None)

    def fail(job, why):
        failures.append((str(job.src), why))
        _log(f"failed: {job.src}: {why}")

    def run_tiled(job, image, key, tile):
        try:
            emit(job, predictor.predict_tiled(image, key, tile), image)
        except _OutOfMemory as e:
            fail(job, f"{e} even in {tile}x{tile} tiles: try a smaller --tile")

    fallback_tiles: dict[tuple, int] = {}  # processed size -> tile, once a single image of it ran out of memory

    def flush(key, entries):
        tile = predictor.tile if predictor.needs_tiles(key) else fallback_tiles.get(key)
        if tile:
            for job, image in entries:
                run_tiled(job, image, key, tile)
                account([image])
            return
        start = 0
        while start < len(entries):
            chunk = entries[start:start + predictor.batch_for(key)]
            start += len(chunk)
            try:
                predictions = predictor.predict_batch([im for _, im in chunk], key)
            except _OutOfMemory as e:
                fallback_tiles[key] = tile = predictor._round_tile(min(FALLBACK_TILE, max(key) // 2))
                _log(f"{chunk[0][0].src}: {e}: falling back to {tile}x{tile} tiles (set --tile to choose)")
                for job, image in chunk:  # the whole chunk: not one image of it has been written
                    run_tiled(job, image, key, tile)
                    account([image])
                continue
            for (job, image), prediction in zip(chunk, predictions):
                emit(job, prediction, image)
            account([im for _, im in chunk])

    buckets: dict[tuple, list] = {}
    max_pending = 4 * batch_size
    try:
        with torch.inference_mode():
            for index, image, error in loader:
                job = todo[index]
                if image is None:
                    fail(job, f"cannot read the image: {error}")
                    progress.update(1)
                    continue
                key = predictor.processed_size(image.shape[0], image.shape[1])
                buckets.setdefault(key, []).append((job, image))
                if len(buckets[key]) >= predictor.batch_for(key):
                    flush(key, buckets.pop(key))
                elif sum(len(v) for v in buckets.values()) > max_pending:
                    fullest = max(buckets, key=lambda k: len(buckets[k]))
                    flush(fullest, buckets.pop(fullest))
            for key in sorted(buckets):
                flush(key, buckets.pop(key))
    finally:
        writer.close()
        progress.close()
        _progress = None
    failures.extend(writer.failures)

    counts = torch.tensor([writer.written, skipped, len(failures)], dtype=torch.int64)
    mine = [int(c) for c in counts]
    if grouped:
        import torch.distributed as dist
        dist.all_reduce(counts)
    written, skipped_all, failed = (int(c) for c in counts)
    if failures:
        _log("failed inputs" + (f" on rank {rank}" if world > 1 else "") + ":\n" +
             "\n".join(f"  {src}: {why}" for src, why in failures))
    if world > 1:
        _log(f"rank {rank} of {world}: {mine[0]} written, {mine[1]} skipped, {mine[2]} failed")
    if rank == 0:
        elapsed = time.perf_counter() - started
        msg = f"{written} written, {skipped_all} skipped (already done), {failed} failed"
        if world > 1:
            msg += f" across {world} processes" + ("" if grouped else " (this process only: no process group)")
        _log(f"{msg} in {elapsed:.1f} s -> {out_dir}")
    if grouped:
        # Every rank has written and reported before any exits: torchrun stops the others as soon as
        # one process exits with a failure status.
        dist.barrier()
        dist.destroy_process_group()
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dpt-fast predict", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"dpt-fast predict: {e}", file=sys.stderr)
        return 2
