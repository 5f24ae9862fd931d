"""Batch inference: run a DPT or Depth Anything model over image files and folders, write its
predictions to a folder (metric Depth Anything models: depth in metres in PFM/npy).

    import dpt_fast
    from dpt_fast.inference import predict_images

    model = dpt_fast.load_model("dpt_hybrid-midas-501f0c75.pt").cuda()
    summary = predict_images(model, ["photos/"], "depth/", formats=("png16", "npy"))
    print(summary.written, summary.failures)

`dpt-fast predict` is a command-line layer over this module. The pieces, usable alone:

- `collect_images` / `plan_images` (over dpt_fast.input_files' `collect_inputs` / `plan_jobs`): inputs
  -> this process's jobs (an input file and its output paths); `run_planned`: jobs -> files written,
  recorded with `image_settings`;
- `Predictor`: decoded images -> predictions at each image's resolution (batching by processed size,
  halving a batch on out-of-memory, overlapping tiles for images too large for memory);
- `Writer`: background threads that encode and write the outputs atomically;
- `OutputManifest` (dpt_fast.output_manifest): the record of which outputs this tool wrote, and with
  which model and settings.

Pipeline: DataLoader workers decode images (Pillow) -> the main thread groups them by processed size
into batches, copies the uint8 pixels to the device and preprocesses there (dpt_fast.transforms) ->
model -> back to each input's resolution on the device -> asynchronous copy to the host -> writer
threads encode and write.

Guarantees: an unreadable input is named and skipped; outputs are written atomically; an existing
file in the output folder that this tool did not write is never replaced (its input is reported as a
conflict); an output is "done" only if the manifest records it as written from the same model and
settings, otherwise it is recomputed; a stop request (`stop` event) ends the run after the images in
flight, with everything computed written.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import fileio, image_io
from .input_files import (FORMAT_SUFFIX, Job, UsageError, check_outputs, collect_inputs, plan_jobs,  # noqa: F401
                          shard)
from .output_manifest import (MANIFEST_NAME, OutputConflict, OutputManifest, Plan, file_fingerprint,  # noqa: F401
                              model_digest, plan_work, settings_record)
from .specs import DPT_PREPROCESSING, Preprocessing
from .transforms import (DEPTH_SIZE, LABEL_OFFSET, SEGMENTATION_SIZE, depth_anything_preprocess,
                         depth_anything_target_size, nearest_multiple, normalize_depth, preprocess,
                         resize_prediction, segmentation_labels, target_size)

__all__ = ["predict_images", "Summary", "Predictor", "Writer", "Reporter", "UsageError", "DEPTH_FORMATS",
           "SEGMENTATION_FORMATS", "is_segmentation", "keep_head_float32", "collect_images", "plan_images",
           "image_settings", "run_planned", "InputProblems",
           # from dpt_fast.input_files and dpt_fast.output_manifest
           "Job", "collect_inputs", "plan_jobs", "check_outputs", "shard", "FORMAT_SUFFIX", "OutputManifest",
           "MANIFEST_NAME", "Plan", "model_digest", "file_fingerprint"]

SIZE_MULTIPLE = DPT_PREPROCESSING.multiple  # tiles and rescaled sizes of DPT inputs
FALLBACK_TILE = 1024  # tile size used when a single image does not fit in memory and no tile was given

DEPTH_FORMATS = ("png16", "pfm", "npy", "color")
SEGMENTATION_FORMATS = ("png", "npy", "color")


# --- messages and progress -----------------------------------------------------------------------

class Reporter:
    """Where a run's messages and progress go: one line per message on stderr, through the progress
    bar when one is shown (so that lines and bar do not mix)."""

    def __init__(self, prefix: str = "dpt_fast.inference: ", progress: bool = False, desc: str = "predict"):
        self.prefix = prefix
        self.show_progress = progress
        self.desc = desc
        self._bar = None
        self._lock = threading.Lock()
        self._images = self._pixels = 0
        self._started = time.perf_counter()

    def log(self, message: str) -> None:
        with self._lock:
            text = f"{self.prefix}{message}"
            if self._bar is not None and not self._bar.disable:
                self._bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def progress(self, total: int):
        from tqdm import tqdm
        self._bar = tqdm(total=total, unit="img", disable=not self.show_progress, dynamic_ncols=True,
                         desc=self.desc, mininterval=0.5)
        self._images = self._pixels = 0
        self._started = time.perf_counter()
        try:
            yield self
        finally:
            self._bar.close()
            self._bar = None

    def advance(self, images=(), skipped: int = 0) -> None:
        """Count finished images (uint8 [H, W, 3] tensors) and failed ones (`skipped`)."""
        if self._bar is None:
            return
        self._images += len(images)
        self._pixels += sum(im.shape[0] * im.shape[1] for im in images)
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        self._bar.set_postfix_str(f"{self._images / elapsed:.2f} img/s, {self._pixels / 1e6 / elapsed:.1f} MP/s",
                                  refresh=False)
        self._bar.update(len(images) + skipped)


# --- decoding (DataLoader workers) ---------------------------------------------------------------

class ImageFiles(torch.utils.data.Dataset):
    """Decodes one file per item: (index, uint8 [H, W, 3] tensor or None, error message or "")."""

    def __init__(self, paths, max_pixels: int | None = image_io.MAX_IMAGE_PIXELS):
        self.paths = [str(p) for p in paths]
        self.max_pixels = max_pixels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return index, torch.from_numpy(image_io.read_image(self.paths[index], self.max_pixels)), ""
        except image_io.ImageReadError as e:
            return index, None, str(e)
        except MemoryError:
            return index, None, "out of memory while decoding"
        except Exception as e:  # noqa: BLE001 -- any failure to decode is reported per file
            return index, None, f"{type(e).__name__}: {e}"


def _items(batch):
    return batch


def _ignore_interrupts(_worker_id: int) -> None:
    """Decoding workers leave Ctrl-C to the main process (a terminal sends SIGINT to the whole process
    group), which stops the run in order and then shuts them down."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- inference -----------------------------------------------------------------------------------

class _OutOfMemory(Exception):
    pass


_ALLOCATION_FAILURES = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory",
                        "defaultcpuallocator")


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure on any device: MemoryError, CUDA's OutOfMemoryError, or a RuntimeError
    from an allocator ("not enough memory", "DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError, _OutOfMemory)):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error).lower() for s in _ALLOCATION_FAILURES)


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
    (native resolution: the model pads to multiples of 32 itself and crops back).
    tile: None, or the tile side in processed pixels above which an image is run in overlapping
    tiles blended with linear ramps (depth tiles are first aligned, scale and shift by least squares,
    to a whole-image prediction at tile resolution, since DPT's depth is relative).
    Segmentation predictions are labels: class index + `label_offset` (1, as the original).
    preprocessing: the model family's input rule (dpt_fast.specs.Preprocessing; default the model's
    `preprocessing` attribute, else DPT's): DPT resizes to multiples of 32 around `size` with mean = std
    = 0.5 and its output is resized back bicubically; Depth Anything keeps the aspect ratio with the
    shorter side at least `size`, multiples of 14, ImageNet mean and std, resized back bilinearly.
    """

    def __init__(self, model, device, size=DEPTH_SIZE, tile=None, tile_overlap=0.25, segmentation=False,
                 compiled=None, batch_size=1, dtype=None, label_offset: int = LABEL_OFFSET, log=None,
                 preprocessing: Preprocessing | None = None):
        self.model = model
        self.run_model = compiled if compiled is not None else model
        self.device = torch.device(device)
        self.size = size
        self.tile = self._round_tile(tile) if tile else None
        self.tile_overlap = tile_overlap
        self.segmentation = segmentation
        self.batch_size = max(1, int(batch_size))
        self.dtype = dtype
        self.label_offset = label_offset
        self.batch_limit: dict[tuple, int] = {}  # processed size -> largest batch known to fit
        self.notes: list[str] = []
        self.log = log or (lambda message: None)
        self.preprocessing = preprocessing or model_preprocessing(model)
        self.depth_anything = self.preprocessing.resize_rule != DPT_PREPROCESSING.resize_rule

    @staticmethod
    def _round_tile(tile: int) -> int:
        return max(SIZE_MULTIPLE * 2, int(tile) // SIZE_MULTIPLE * SIZE_MULTIPLE)

    def processed_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the network sees (at native size, the image's own: a DPT model pads it; for Depth
        Anything each side is resized, bicubically, to the nearest multiple of 14, as its preprocessing does)."""
        rule = self.preprocessing
        if self.size is None and self.depth_anything:
            return (nearest_multiple(height, rule.multiple), nearest_multiple(width, rule.multiple))
        if self.size is None:
            return (height, width)
        if self.depth_anything:
            return depth_anything_target_size(height, width, self.size, rule.multiple, rule.resize_rule)
        return target_size(height, width, self.size, rule.multiple)

    def batch_for(self, key) -> int:
        return min(self.batch_size, self.batch_limit.get(key, self.batch_size))

    def needs_tiles(self, key, tile=None) -> bool:
        tile = tile or self.tile
        return tile is not None and max(key) > tile

    def prepare(self, image: torch.Tensor, key) -> torch.Tensor:
        """uint8 [H, W, 3] (host) -> normalised float [1, 3, *key] on the device."""
        x = image.to(self.device, non_blocking=True).permute(2, 0, 1)
        x = (depth_anything_preprocess if self.depth_anything else preprocess)(x, size=tuple(key))
        if self.dtype is not None and self.dtype != x.dtype:
            x = x.to(self.dtype)
        return x

    def forward_split(self, x: torch.Tensor, key=None) -> list[torch.Tensor]:
        """Model outputs for a batch, one [1, ...] tensor per image; when memory runs out, halves the
        batch and retries (remembering the size that fit); raises _OutOfMemory at batch 1."""
        try:
            out = self.run_model(x)
            return [out[i:i + 1] for i in range(out.shape[0])]
        except Exception as e:  # noqa: BLE001 -- only allocation failures are handled
            if not is_out_of_memory(e):
                raise
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        # outside the except block: the traceback no longer pins the failed batch's tensors
        if x.is_cuda:
            torch.cuda.empty_cache()
        batch = x.shape[0]
        if batch == 1:
            raise _OutOfMemory(f"out of memory at {x.shape[-2]}x{x.shape[-1]} ({reason[:120]})")
        half = batch // 2
        if key is not None:
            self.batch_limit[key] = min(self.batch_limit.get(key, batch), half)
        note = f"out of memory with a batch of {batch} at {x.shape[-2]}x{x.shape[-1]}: retrying with {half}"
        self.notes.append(note)
        self.log(note)
        return self.forward_split(x[:half], key) + self.forward_split(x[half:], key)

    def finish(self, out: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """A model output [1, ...] at processed size -> the prediction at (height, width): float32
        depth [H, W], or int64 labels [H, W] for segmentation (the original's post-processing)."""
        if self.segmentation:
            return segmentation_labels(out.float(), (height, width), self.label_offset)[0]
        if tuple(out.shape[-2:]) == (height, width):
            return out[0].float()
        return resize_prediction(out.float(), (height, width), mode="bilinear" if self.depth_anything else "bicubic")[0]

    def predict_batch(self, images: list[torch.Tensor], key) -> list[torch.Tensor]:
        """Same processed size `key` for every image; returns predictions (on the device)."""
        try:
            x = torch.cat([self.prepare(im, key) for im in images])
        except Exception as e:  # noqa: BLE001
            if not is_out_of_memory(e):
                raise
            x = None
        if x is None:
            raise _OutOfMemory(f"out of memory preparing {len(images)} image(s) at {key[0]}x{key[1]}")
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
                # segmentation: logits are blended, as the original resizes logits (not probabilities)
                value = out[0].float() if self.segmentation else self._align(out[0].float(),
                                                                              reference[y:y + th, x0:x0 + tw])
                if acc is None:
                    acc = torch.zeros((value.shape[0], ph, pw) if value.dim() == 3 else (ph, pw), device=acc_device)
                acc[..., y:y + th, x0:x0 + tw] += (value * window).to(acc_device)
                weight[y:y + th, x0:x0 + tw] += window.to(acc_device)
        blended = (acc / weight).to(self.device)[None]
        return self.finish(blended, image.shape[0], image.shape[1])

    def _global_depth(self, x: torch.Tensor, tile: int) -> torch.Tensor:
        """The whole image at tile resolution, upsampled to x's size: the frame tiles are aligned to."""
        ph, pw = x.shape[-2:]
        if max(ph, pw) <= tile:  # the image fits in one tile: its own prediction is the frame
            return self.forward_split(x)[0].float()[0]
        scale = tile / max(ph, pw)
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

def encode_outputs(job: Job, prediction: torch.Tensor, image: torch.Tensor | None = None) -> dict:
    """format -> file bytes for one prediction (float depth [H, W] or int labels [H, W])."""
    encoded = {}
    if prediction.is_floating_point():
        values = prediction.float().numpy()
        for fmt in job.outputs:
            if fmt in ("png16", "png"):
                encoded[fmt] = image_io.png16_bytes(normalize_depth(torch.from_numpy(values)[None])[0].numpy())
            elif fmt == "pfm":
                encoded[fmt] = image_io.pfm_bytes(values)
            elif fmt == "npy":
                encoded[fmt] = image_io.npy_bytes(values)
            elif fmt == "color":
                encoded[fmt] = image_io.rgb_bytes(image_io.colorize(values))
    else:
        labels = prediction.numpy()
        for fmt in job.outputs:
            if fmt == "png":
                encoded[fmt] = image_io.palette_png_bytes(labels)
            elif fmt == "npy":
                encoded[fmt] = image_io.npy_bytes(labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.int32))
            elif fmt == "color":
                if image is None:
                    raise ValueError("the colour picture needs the input image")
                encoded[fmt] = image_io.rgb_bytes(image_io.overlay_labels(image.numpy(), labels))
    return encoded


def write_outputs(job: Job, prediction: torch.Tensor, image: torch.Tensor | None = None,
                  manifest: OutputManifest | None = None, settings: dict | None = None) -> None:
    """Write every requested format of one prediction atomically. With a manifest, each file is
    recorded (with `settings` and its format) before it takes its final name, and a file at that
    name which this tool did not write is never replaced (OutputConflict)."""
    for fmt, data in encode_outputs(job, prediction, image).items():
        path = job.outputs[fmt]
        if manifest is None:
            image_io.atomic_write_bytes(path, data)
            continue

        def claim(tmp, path=path, fmt=fmt, data=data):
            if os.path.lexists(path) and manifest.record_for(path) is None:
                raise OutputConflict(f"{path} appeared meanwhile and was not written by dpt-fast: left as it is")
            manifest.add(path, os.stat(tmp), dict(settings or {}, format=fmt), hashlib.sha256(data).hexdigest())
        image_io.atomic_write_bytes(path, data, before_replace=claim)


def _is_constant(prediction: torch.Tensor) -> bool:
    flat = prediction.reshape(-1)
    return flat.numel() > 1 and bool((flat == flat[0]).all())


class Writer:
    """Background threads that wait for a prediction's host copy and write its files atomically."""

    def __init__(self, threads: int = 2, maxsize: int = 16, num_classes: int | None = None,
                 manifest: OutputManifest | None = None, settings: dict | None = None, log=None):
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.failures: list[tuple[str, str]] = []
        self.conflicts: list[tuple[str, str]] = []
        self.constant: list[str] = []   # inputs whose prediction is one value everywhere
        self.written = 0
        self.num_classes = num_classes
        self.manifest, self.settings = manifest, settings
        self.log = log or (lambda message: None)
        self._lock = threading.Lock()
        self._abort = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True, name=f"dpt-fast-writer-{i}")
                        for i in range(max(1, threads))]
        for t in self.threads:
            t.start()

    def submit(self, job: Job, prediction: torch.Tensor, event=None, image: torch.Tensor | None = None):
        self.queue.put((job, prediction, event, image))

    def close(self, abort: bool = False):
        """Write what is queued (or, with abort, drop it) and stop the threads."""
        if abort:
            self._abort.set()
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()

    def _loop(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self._abort.is_set():
                continue
            job, prediction, event, image = item
            try:
                if event is not None:
                    event.synchronize()
                if _is_constant(prediction):
                    with self._lock:
                        self.constant.append(str(job.src))
                write_outputs(job, prediction, image, self.manifest, self.settings)
                with self._lock:
                    self.written += 1
            except OutputConflict as e:
                with self._lock:
                    self.conflicts.append((str(job.src), str(e)))
                self.log(f"conflict: {job.src}: {e}")
            except Exception as e:  # noqa: BLE001 -- reported per file
                with self._lock:
                    self.failures.append((str(job.src), f"writing failed: {type(e).__name__}: {e}"))
                self.log(f"failed: {job.src}: writing failed: {type(e).__name__}: {e}")


# --- a run ---------------------------------------------------------------------------------------

@dataclass
class Summary:
    """What a run did. `remaining`: inputs neither written nor failed (a stopped run)."""
    written: int = 0
    skipped: int = 0                                    # already done, from the same model and settings
    failures: list = field(default_factory=list)        # (input, why)
    conflicts: list = field(default_factory=list)       # (input, why): an output name held a foreign file
    constant: list = field(default_factory=list)        # inputs whose prediction is one value everywhere
    remaining: int = 0
    stopped: bool = False
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures and not self.conflicts and not self.stopped


class _Batches:
    """Groups decoded images by processed size, runs full batches, and sends predictions to the writer;
    falls back to tiles (then to skipping the image) when memory runs out."""

    def __init__(self, predictor: Predictor, writer: Writer, reporter: Reporter, summary: Summary):
        self.predictor, self.writer, self.reporter, self.summary = predictor, writer, reporter, summary
        self.buckets: dict[tuple, list] = {}
        self.fallback_tiles: dict[tuple, int] = {}  # processed size -> tile, once one image of it ran out of memory
        self.max_pending = 4 * predictor.batch_size

    def pending(self) -> int:
        return sum(len(v) for v in self.buckets.values())

    def add(self, job: Job, image: torch.Tensor) -> None:
        key = self.predictor.processed_size(image.shape[0], image.shape[1])
        self.buckets.setdefault(key, []).append((job, image))
        if len(self.buckets[key]) >= self.predictor.batch_for(key):
            self.run(key, self.buckets.pop(key))
        elif self.pending() > self.max_pending:
            fullest = max(self.buckets, key=lambda k: len(self.buckets[k]))
            self.run(fullest, self.buckets.pop(fullest))

    def drain(self) -> None:
        for key in sorted(self.buckets):
            self.run(key, self.buckets.pop(key))

    def fail(self, job: Job, why: str) -> None:
        self.summary.failures.append((str(job.src), why))
        self.reporter.log(f"failed: {job.src}: {why}")

    def emit(self, job: Job, prediction: torch.Tensor, image: torch.Tensor) -> None:
        keep_image = image if self.predictor.segmentation else None
        if prediction.device.type == "cuda":
            host = prediction.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.writer.submit(job, host, event, keep_image)
        else:
            self.writer.submit(job, prediction, None, keep_image)

    def run_tiled(self, job: Job, image: torch.Tensor, key, tile: int) -> None:
        try:
            prediction = self.predictor.predict_tiled(image, key, tile)
        except Exception as e:  # noqa: BLE001 -- allocation failures skip this image only
            if not is_out_of_memory(e):
                raise
            prediction, why = None, str(e).splitlines()[0] if str(e) else "out of memory"
        if prediction is None:
            self.fail(job, f"{why} even in {tile}x{tile} tiles: skipped (try a smaller --tile)")
            self.reporter.advance(skipped=1)
        else:
            self.emit(job, prediction, image)
            self.reporter.advance([image])

    def run(self, key, entries: list) -> None:
        tile = self.predictor.tile if self.predictor.needs_tiles(key) else self.fallback_tiles.get(key)
        if tile:
            for job, image in entries:
                self.run_tiled(job, image, key, tile)
            return
        start = 0
        while start < len(entries):
            chunk = entries[start:start + self.predictor.batch_for(key)]
            start += len(chunk)
            try:
                predictions = self.predictor.predict_batch([im for _, im in chunk], key)
            except Exception as e:  # noqa: BLE001 -- allocation failures go to tiles
                if not is_out_of_memory(e):
                    raise
                predictions, why = None, str(e).splitlines()[0] if str(e) else "out of memory"
            if predictions is None:
                tile = self.predictor._round_tile(min(FALLBACK_TILE, max(key) // 2))
                self.fallback_tiles[key] = tile
                self.reporter.log(f"{chunk[0][0].src}: {why}: falling back to {tile}x{tile} tiles "
                                  "(set --tile to choose)")
                for job, image in chunk:  # the whole chunk: not one image of it has been written
                    self.run_tiled(job, image, key, tile)
                continue
            for (job, image), prediction in zip(chunk, predictions):
                self.emit(job, prediction, image)
            self.reporter.advance([im for _, im in chunk])


@contextlib.contextmanager
def _cudnn_autotune(device: torch.device, enabled: bool):
    """cuDNN's algorithm search for this run only (it pays off when every batch has the same shape)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def clean_stale_temporaries(out_dir, reporter: Reporter | None = None, min_age_s: float = 0.0) -> int:
    """Delete this tool's temporary files left in `out_dir` by killed runs; returns how many.
    `min_age_s` spares recent ones: with several processes on several machines sharing `out_dir`, a
    process ID unknown here may be another machine's live writer."""
    removed = len(fileio.remove_stale_temporaries(out_dir, recursive=True, min_age_s=min_age_s))
    if removed and reporter is not None:
        reporter.log(f"removed {removed} temporary file(s) left by an interrupted run in {out_dir}")
    return removed


def run_jobs(predictor: Predictor, jobs: list[Job], *, writer: Writer, reporter: Reporter,
             num_workers: int = 0, max_pixels: int | None = image_io.MAX_IMAGE_PIXELS,
             stop: threading.Event | None = None, summary: Summary | None = None) -> Summary:
    """Decode, predict and write `jobs` (the writer is closed at the end: what was computed is written
    even when `stop` is set or the run is interrupted)."""
    summary = summary if summary is not None else Summary()
    loader = torch.utils.data.DataLoader(
        ImageFiles([j.src for j in jobs], max_pixels), batch_size=None, shuffle=False, num_workers=num_workers,
        collate_fn=_items, pin_memory=predictor.device.type == "cuda", prefetch_factor=4 if num_workers else None,
        worker_init_fn=_ignore_interrupts if num_workers else None)
    batches = _Batches(predictor, writer, reporter, summary)
    finished = False
    try:
        with torch.inference_mode():
            for index, image, error in loader:
                if stop is not None and stop.is_set():
                    break
                if image is None:
                    batches.fail(jobs[index], f"cannot read the image: {error}")
                    reporter.advance(skipped=1)
                    continue
                batches.add(jobs[index], image)
            else:
                batches.drain()
        finished = True
    finally:
        writer.close(abort=not finished)  # a second interrupt: drop what is queued, keep the files whole
        summary.written += writer.written
        summary.failures.extend(writer.failures)
        summary.conflicts.extend(writer.conflicts)
        summary.constant.extend(writer.constant)
    return summary


def is_segmentation(model) -> bool:
    """Whether `model` predicts class labels (a DPTSegmentationModel) rather than depth."""
    return hasattr(model, "num_classes") or "Segmentation" in type(model).__name__


def model_preprocessing(model) -> Preprocessing:
    """The input rule a model was trained with: its `preprocessing` (Depth Anything models carry
    one, from dpt_fast.specs), else DPT's."""
    rule = getattr(model, "preprocessing", None)
    return rule if isinstance(rule, Preprocessing) else DPT_PREPROCESSING


def _depth_head(model):
    """The last convolutions of a depth model (after the upsampling), or None for other models."""
    if hasattr(model, "depth_head"):  # Depth Anything
        return model.depth_head.scratch.output_conv2
    scratch = getattr(model, "scratch", None)
    return None if is_segmentation(model) or scratch is None else getattr(scratch, "output_conv", None)


def keep_head_float32(model) -> bool:
    """Run a 16-bit depth model's head in float32: a bfloat16 output has 8 significant bits, which would
    band a 16-bit PNG; the head is a small share of the FLOPs. Changes `model` in place (the head's
    weights become float32, a hook casts its inputs to the head's dtype, so a later `model.to(dtype)`
    still runs, the head then in that dtype); returns whether it did. Segmentation and float32 models
    are left as they are, and so is a head already kept in float32."""
    head = _depth_head(model)
    weight = next(head.parameters(), None) if head is not None else None
    if weight is None or weight.dtype not in (torch.float16, torch.bfloat16):
        return False
    head.float()
    if getattr(head, "_float32_inputs", None) is None:  # one hook, however often the head is kept
        head._float32_inputs = head.register_forward_pre_hook(_inputs_to_head_dtype)
    return True


def _inputs_to_head_dtype(module, args):
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def model_output(model) -> dict:
    """What a depth model's values mean, for the manifest: {"output": "metric_depth", "unit": "m",
    "max_depth": ...} for metric Depth Anything models, {"output": "relative_disparity"} for relative
    ones, {} for DPT models (their record is unchanged)."""
    kind = getattr(model, "output_kind", None)
    if not isinstance(kind, str):
        return {}
    if kind == "metric_depth":
        return {"output": kind, "unit": "m", "max_depth": float(getattr(model, "max_depth", 0.0))}
    return {"output": kind}


class InputProblems(UsageError):
    """Inputs that give no image (missing, empty, not images): `problems` lists (argument, why)."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("; ".join(f"{arg}: {why}" for arg, why in self.problems))


def collect_images(inputs, out_dir, *, reporter: Reporter | None = None, rank: int = 0) -> list[tuple]:
    """The image files that `inputs` name (files, folders searched recursively, globs), `out_dir` left
    out, as `collect_inputs` gives them; InputProblems when an input gives none. Files passed over on
    the way (a FIFO named like an image, a folder that cannot be listed) are reported by rank 0."""
    items, problems = collect_inputs(inputs, exclude=Path(out_dir).expanduser(), skipped=(skipped := []))
    if problems:
        raise InputProblems(problems)
    for path, why in skipped if rank == 0 and reporter is not None else ():
        reporter.log(f"skipped: {path}: {why}")
    return items


def plan_images(inputs, out_dir, formats, *, items=None, reporter: Reporter | None = None, rank: int = 0,
                world: int = 1) -> list[Job]:
    """This process's jobs over the images of `inputs` (`items`: what collect_images gave, when the
    inputs were collected already): their outputs in `formats` under `out_dir`, checked (UsageError
    when `out_dir` is one of the inputs or two inputs would write one output), input i for rank i % world."""
    out_dir = Path(out_dir).expanduser()
    if items is None:
        items = collect_images(inputs, out_dir, reporter=reporter, rank=rank)
    planned = plan_jobs(items, out_dir, formats)
    check_outputs(planned, inputs, out_dir)
    return shard(planned, rank, world)


def image_settings(model, model_id: str | None = None, *, size, segmentation: bool, dtype=None, tile=None,
                   tile_overlap: float = 0.25, label_offset: int = LABEL_OFFSET) -> dict:
    """What the manifest records with each output of `model`: its identity (`model_id`, default
    `model_digest(model)`), the settings that change the outputs (dtype: default the model's) and
    what the values mean (`model_output`)."""
    dtype = dtype or next(model.parameters()).dtype
    return settings_record(model_id or model_digest(model), size, segmentation, dtype, tile, tile_overlap,
                           label_offset, extra=model_output(model))


def predict_images(model, inputs, out_dir, *, size=None, formats=None, device=None, dtype=None,
                   batch_size: int = 1, tile=None, tile_overlap: float = 0.25, overwrite: bool = False,
                   num_workers: int = 0, writers: int = 2, compiled=None, model_id: str | None = None,
                   label_offset: int = LABEL_OFFSET, max_pixels: int | None = image_io.MAX_IMAGE_PIXELS,
                   reporter: Reporter | None = None, stop: threading.Event | None = None,
                   rank: int = 0, world: int = 1, float32_head: bool = True) -> Summary:
    """Run `model` (a DPTDepthModel, DepthAnythingModel or DPTSegmentationModel, in eval mode) over image
    files, folders (recursive) and globs in `inputs`, writing its predictions under `out_dir` (names
    mirror the inputs, see `plan_jobs`).

    size: the processing size (default the model's: 384 for DPT depth, 518 for Depth Anything, 480 for
    segmentation) or "native". Each family gets its own preprocessing (see `Predictor`).
    formats: depth "png16" (default), "pfm", "npy", "color"; segmentation "png" (default), "npy", "color".
    device/dtype: where and in which dtype the input goes (default: the model's).
    model_id: the model's identity recorded with each output (default: `model_digest(model)`);
    outputs recorded from another model or other settings are recomputed, and files in `out_dir` this
    function did not write are never replaced (their inputs are listed in `Summary.conflicts`).
    max_pixels: images with more pixels are refused from their header (None: no limit).
    stop: set it (e.g. from a signal handler) to end after the images in flight.
    rank/world: this process's share of the inputs (input i goes to rank i % world).
    float32_head: a depth model in float16 or bfloat16 gets its head in float32 first (`keep_head_float32`,
    in place), so that 16-bit PNGs are not banded; False leaves the model as it is.
    Raises UsageError for inputs that do not exist or hold no images (InputProblems), and for bad options.
    """
    reporter = reporter or Reporter()
    segmentation = is_segmentation(model)
    if float32_head:
        keep_head_float32(model)  # before model_digest: the same model gets the same identity every run
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    if size is None:
        size = SEGMENTATION_SIZE if segmentation else model_preprocessing(model).size
    elif size == "native":
        size = None
    formats = tuple(formats or (("png",) if segmentation else ("png16",)))
    allowed = SEGMENTATION_FORMATS if segmentation else DEPTH_FORMATS
    if any(f not in allowed for f in formats):
        raise UsageError(f"formats {','.join(formats)}: choose from {','.join(allowed)}")
    out_dir = Path(out_dir).expanduser()
    jobs = plan_images(inputs, out_dir, formats, reporter=reporter, rank=rank, world=world)
    return run_planned(model, jobs, out_dir, model_id=model_id, device=device, dtype=dtype, size=size,
                       segmentation=segmentation, batch_size=batch_size, tile=tile, tile_overlap=tile_overlap,
                       overwrite=overwrite, num_workers=num_workers, writers=writers, compiled=compiled,
                       label_offset=label_offset, max_pixels=max_pixels, reporter=reporter, stop=stop,
                       single_process=world == 1)


def run_planned(model, jobs: list[Job], out_dir, *, settings: dict | None = None, model_id: str | None = None,
                device, dtype, size, segmentation: bool, batch_size: int, tile, tile_overlap: float,
                overwrite: bool, num_workers: int, writers: int, compiled, label_offset: int, max_pixels,
                reporter: Reporter, stop, single_process: bool) -> Summary:
    """The run after planning (`plan_images`): clean leftovers, sort jobs into done / to do / conflicts,
    predict and write. `settings`: the manifest's record (default `image_settings` of the model, with
    `model_id`). `single_process`: this is the only process writing to `out_dir` (not one rank of several)."""
    if settings is None:
        settings = image_settings(model, model_id, size=size, segmentation=segmentation, dtype=dtype, tile=tile,
                                  tile_overlap=tile_overlap, label_offset=label_offset)
    started = time.perf_counter()
    clean_stale_temporaries(out_dir, reporter, min_age_s=0.0 if single_process else 3600.0)
    manifest = OutputManifest(out_dir)
    plan = plan_work(jobs, manifest, settings, overwrite)
    summary = Summary(skipped=len(plan.done))
    for job, why in plan.conflicts:
        summary.conflicts.append((str(job.src), why))
        reporter.log(f"conflict: {job.src}: {why}")
    if plan.done:
        reporter.log(f"{len(plan.done)} input(s) already have all outputs from this model and these settings: "
                     "skipped (--overwrite recomputes them)")
    predictor = Predictor(model, device, size=size, tile=tile, tile_overlap=tile_overlap, segmentation=segmentation,
                          compiled=compiled, batch_size=batch_size, dtype=dtype, label_offset=label_offset,
                          log=reporter.log)
    writer = Writer(threads=writers, maxsize=max(8, 2 * batch_size), num_classes=getattr(model, "num_classes", None),
                    manifest=manifest, settings=settings, log=reporter.log)
    summary.remaining = len(plan.todo)
    try:
        with _cudnn_autotune(predictor.device, size is not None), reporter.progress(len(plan.todo)):
            run_jobs(predictor, plan.todo, writer=writer, reporter=reporter, num_workers=num_workers,
                     max_pixels=max_pixels, stop=stop, summary=summary)
    except BaseException:
        summary.stopped = True
        raise
    finally:
        summary.elapsed = time.perf_counter() - started
        summary.stopped = summary.stopped or (stop is not None and stop.is_set())
        summary.remaining = max(0, len(plan.todo) - summary.written - len(summary.failures)
                                - (len(summary.conflicts) - len(plan.conflicts)))
        if single_process and not summary.stopped:
            with contextlib.suppress(OSError):
                manifest.compact()
    return summary
