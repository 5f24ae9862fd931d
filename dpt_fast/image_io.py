"""Reading images and writing predictions: 16-bit PNG, PFM, npy, colour PNG, palette PNG.

Every writer is atomic: the bytes go to a hidden temporary file in the destination folder, which is
then renamed over the destination with `os.replace`, so an interrupted run never leaves a half file
under a final name (only, at worst, a `.<name>.<pid>-<random>.tmp` file).
"""
from __future__ import annotations

import io
import os
import re
import sys
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".gif")

# Camera panoramas and scans are legitimately larger than PIL's decompression-bomb guard (89 Mpx);
# keep a guard, at 1 gigapixel.
MAX_IMAGE_PIXELS = 1 << 30


def is_image_name(path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


# --- reading -------------------------------------------------------------------------------------

def read_image(path) -> np.ndarray:
    """An image file -> uint8 RGB array [H, W, 3], EXIF orientation applied (as cv2.imread does).

    16-bit greyscale/RGB files are scaled to 8 bits; alpha is dropped; palette, greyscale and CMYK
    images are converted. Raises OSError/ValueError (with the reason) for unreadable files.
    """
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I;16") or img.mode == "I":
            arr = np.asarray(img).astype(np.float32)
            scale = 257.0 if img.mode.startswith("I;16") or arr.max() > 255 else 1.0
            arr = np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8)
            return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
        if img.mode == "F":
            arr = np.asarray(img)
            arr = np.clip(np.rint(arr * (255.0 if arr.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
            return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
        if img.mode != "RGB":
            img = img.convert("RGB")
        arr = np.array(img, dtype=np.uint8)  # a writable copy (np.asarray would be read-only)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"decoded to an unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr)


# --- atomic writes -------------------------------------------------------------------------------

def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file in the same folder, fsync-free, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def _pil_bytes(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **params)
    return buf.getvalue()


# --- writers -------------------------------------------------------------------------------------

def write_png16(path, values: np.ndarray, compress_level: int = 1) -> None:
    """uint16 [H, W] -> 16-bit greyscale PNG (the original's depth PNG)."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {values.shape}")
    img = Image.fromarray(np.ascontiguousarray(values.astype(np.uint16)))
    atomic_write_bytes(path, _pil_bytes(img, compress_level=compress_level))


def read_png16(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img).astype(np.uint16)


def pfm_bytes(values: np.ndarray, scale: float = 1.0) -> bytes:
    """PFM as the original writes it: greyscale "Pf", rows bottom to top, little-endian (negative scale)."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[:, :, 0]
    color = values.ndim == 3 and values.shape[2] == 3
    if values.ndim != 2 and not color:
        raise ValueError(f"PFM needs [H, W] or [H, W, 3], got shape {values.shape}")
    header = b"PF\n" if color else b"Pf\n"
    header += b"%d %d\n" % (values.shape[1], values.shape[0])
    header += b"%f\n" % (-abs(scale))
    body = np.ascontiguousarray(np.flipud(values)).astype("<f4").tobytes()
    return header + body


def write_pfm(path, values: np.ndarray, scale: float = 1.0) -> None:
    atomic_write_bytes(path, pfm_bytes(values, scale))


def read_pfm(path) -> np.ndarray:
    """A PFM file -> float32 [H, W] (or [H, W, 3]), top row first."""
    with open(path, "rb") as f:
        kind = f.readline().rstrip()
        if kind not in (b"Pf", b"PF"):
            raise ValueError(f"{path}: not a PFM file")
        match = re.match(rb"^(\d+)\s+(\d+)\s*$", f.readline())
        if not match:
            raise ValueError(f"{path}: malformed PFM header")
        width, height = int(match.group(1)), int(match.group(2))
        scale = float(f.readline().decode("ascii").strip())
        data = np.fromfile(f, ("<" if scale < 0 else ">") + "f4")
    shape = (height, width, 3) if kind == b"PF" else (height, width)
    return np.ascontiguousarray(np.flipud(data.reshape(shape))).astype(np.float32)


def write_npy(path, values: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(values))
    atomic_write_bytes(path, buf.getvalue())


def write_rgb(path, rgb: np.ndarray, compress_level: int = 1) -> None:
    """uint8 [H, W, 3] -> 8-bit RGB PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected [H, W, 3], got shape {rgb.shape}")
    atomic_write_bytes(path, _pil_bytes(Image.fromarray(rgb), compress_level=compress_level))


# --- colour --------------------------------------------------------------------------------------

# matplotlib's "inferno" sampled at 9 points; used when matplotlib is not installed.
_INFERNO_POINTS = np.array([
    [0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85],
    [227, 89, 51], [249, 140, 10], [249, 201, 50], [252, 255, 164]], dtype=np.float64)

_LUTS: dict[str, np.ndarray] = {}


def colormap_lut(name: str = "inferno") -> np.ndarray:
    """[256, 3] uint8 lookup table of a matplotlib colormap (built-in inferno approximation without it)."""
    if name in _LUTS:
        return _LUTS[name]
    try:
        import matplotlib
        lut = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
        lut = np.clip(np.rint(lut * 255), 0, 255).astype(np.uint8)
    except Exception:
        if name != "inferno" and "matplotlib" in sys.modules:
            raise
        x = np.linspace(0, len(_INFERNO_POINTS) - 1, 256)
        lut = np.stack([np.interp(x, np.arange(len(_INFERNO_POINTS)), _INFERNO_POINTS[:, c]) for c in range(3)], 1)
        lut = np.clip(np.rint(lut), 0, 255).astype(np.uint8)
    _LUTS[name] = lut
    return lut


def colorize(values: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """Float [H, W] -> uint8 RGB [H, W, 3], min-max normalised per image (large values bright)."""
    values = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape + (3,), np.uint8)
    low, high = float(values[finite].min()), float(values[finite].max())
    span = high - low
    norm = (np.nan_to_num(values, nan=low) - low) / span if span > 0 else np.zeros_like(values)
    index = np.clip(np.rint(norm * 255), 0, 255).astype(np.uint8)
    return colormap_lut(cmap)[index]


def label_palette(num_colors: int = 256) -> np.ndarray:
    """[num_colors, 3] uint8: the PASCAL-VOC style bit-interleaved palette (0 is black, neighbours differ)."""
    palette = np.zeros((num_colors, 3), np.uint8)
    for label in range(num_colors):
        c, r, g, b = label, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[label] = (r, g, b)
    return palette


def write_palette_png(path, labels: np.ndarray, compress_level: int = 1) -> None:
    """Integer labels [H, W] in [0, 255] -> palette ("P") PNG whose pixel values are the labels."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected a 2-D label array, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("palette PNG holds labels 0..255; use the npy format for more classes")
    img = Image.frombytes("P", (labels.shape[1], labels.shape[0]), np.ascontiguousarray(labels, np.uint8).tobytes())
    img.putpalette(label_palette(256).reshape(-1).tolist())
    atomic_write_bytes(path, _pil_bytes(img, compress_level=compress_level))


def overlay_labels(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The original's segmentation picture: the label colours blended over the image."""
    colors = label_palette(256)[np.asarray(labels).astype(np.int64) % 256]
    out = (1 - alpha) * np.asarray(image, np.float32) + alpha * colors.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
