"""Reading images and writing predictions: 16-bit PNG, PFM, npy, colour PNG, palette PNG.

Every writer is atomic (dpt_fast.fileio): the bytes go to a hidden temporary file in the destination
folder, which is then renamed over the destination with `os.replace`, so an interrupted run never leaves
a half file under a final name (only, at worst, a `.<name>.<pid>-<random>.tmp` file, which
`stale_temporaries` finds once that process is gone).
"""
from __future__ import annotations

import io
import os
import re
import stat
import sys
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .fileio import atomic_write_bytes, stale_temporaries  # noqa: F401 (part of this module's API)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".gif")

# Camera panoramas and scans are legitimately larger than Pillow's decompression-bomb guard (89 Mpx);
# keep a guard, at 2**30 pixels (about 1.07 gigapixels), checked from the header before decoding.
MAX_IMAGE_PIXELS = 1 << 30


class ImageReadError(ValueError):
    """An input that cannot be read as an image; the message says why, in words."""


def is_image_name(path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


# --- reading -------------------------------------------------------------------------------------

def open_regular_file(path):
    """`path` opened for binary reading, or ImageReadError if it is not a regular file.

    Opened with O_NONBLOCK, so that a FIFO, socket or device named like an image never blocks the
    caller; the type is checked on the open descriptor (no race with a rename in between)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ImageReadError(f"cannot open: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageReadError("not a regular file (a FIFO, socket or device): skipped unread")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _open_checked(file, max_pixels: int | None) -> Image.Image:
    """Image.open (which reads only the header) plus the pixel-count guard, before any decoding."""
    if max_pixels is not None and (Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS < max_pixels):
        Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow refuses only above twice this; our check is exact
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(file)
    except UnidentifiedImageError:
        raise ImageReadError("not an image file (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"too large to decode ({e})") from None
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        img.close()
        raise ImageReadError(f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels} "
                             "pixels (checked before decoding; raise it with --max-pixels)")
    return img


def read_image(path, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An image file -> uint8 RGB array [H, W, 3], EXIF orientation applied (as cv2.imread does).

    16-bit greyscale/RGB files are scaled to 8 bits; alpha is dropped; palette, greyscale and CMYK
    images are converted. Only regular files are read. Images of more than `max_pixels` pixels
    are refused from their header, before decoding (None: only Pillow's own guard, which refuses
    above twice `PIL.Image.MAX_IMAGE_PIXELS`; this function raises that to `max_pixels` when lower,
    so that the limit given is the one that holds). Raises ImageReadError (a
    ValueError) or OSError, with the reason, for unreadable files.
    """
    with open_regular_file(path) as file, _open_checked(file, max_pixels) as img:
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
        raise ImageReadError(f"decoded to an unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr)


# --- atomic writes: dpt_fast.fileio (kept importable from here) ----------------------------------

def _pil_bytes(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **params)
    return buf.getvalue()


# --- writers -------------------------------------------------------------------------------------

def png16_bytes(values: np.ndarray, compress_level: int = 1) -> bytes:
    """uint16 [H, W] -> 16-bit greyscale PNG (the original's depth PNG)."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {values.shape}")
    return _pil_bytes(Image.fromarray(np.ascontiguousarray(values.astype(np.uint16))), compress_level=compress_level)


def write_png16(path, values: np.ndarray, compress_level: int = 1) -> None:
    atomic_write_bytes(path, png16_bytes(values, compress_level))


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
    """A PFM file -> float32 [H, W] (or [H, W, 3]), top row first. Comment lines before the dimensions
    are skipped; a file with fewer values than its header says is a ValueError, not a short array."""
    with open(path, "rb") as f:
        kind = f.readline().strip()
        if kind not in (b"Pf", b"PF"):
            raise ValueError(f"{path}: not a PFM file (header {kind[:8]!r})")
        dims = f.readline()
        while dims.startswith(b"#"):
            dims = f.readline()
        match = re.match(rb"^\s*(\d+)\s+(\d+)\s*$", dims)
        if not match:
            raise ValueError(f"{path}: malformed PFM dimensions {dims[:32]!r}")
        width, height = int(match.group(1)), int(match.group(2))
        try:
            scale = float(f.readline().decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{path}: malformed PFM scale line") from None
        channels = 3 if kind == b"PF" else 1
        count = width * height * channels
        data = np.fromfile(f, ("<" if scale < 0 else ">") + "f4", count=count)
    if data.size != count:
        raise ValueError(f"{path}: truncated PFM ({data.size} of {count} values)")
    shape = (height, width, 3) if channels == 3 else (height, width)
    return np.ascontiguousarray(np.flipud(data.reshape(shape))).astype(np.float32)


def npy_bytes(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(values))
    return buf.getvalue()


def write_npy(path, values: np.ndarray) -> None:
    atomic_write_bytes(path, npy_bytes(values))


def rgb_bytes(rgb: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 [H, W, 3] -> 8-bit RGB PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected [H, W, 3], got shape {rgb.shape}")
    return _pil_bytes(Image.fromarray(rgb), compress_level=compress_level)


def write_rgb(path, rgb: np.ndarray, compress_level: int = 1) -> None:
    atomic_write_bytes(path, rgb_bytes(rgb, compress_level))


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


# ADE20K's colours as the original release draws its segmentation pictures: entry 0 (black) is
# "unlabelled", entries 1..150 the classes (the original writes class index + 1).
ADE20K_PALETTE = np.array([
    (0, 0, 0), (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61),
    (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230),
    (220, 220, 220), (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71),
    (255, 41, 10), (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8),
    (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0),
    (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0),
    (194, 255, 0), (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255),
    (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0),
    (255, 0, 20), (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163),
    (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0),
    (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255),
    (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255),
    (71, 255, 0), (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255),
    (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255),
    (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
], dtype=np.uint8)


def segmentation_palette(num_colors: int = 256) -> np.ndarray:
    """[num_colors, 3] uint8: ADE20K's 151 colours (as the original), then the VOC-style palette."""
    palette = label_palette(max(num_colors, len(ADE20K_PALETTE)))
    palette[:len(ADE20K_PALETTE)] = ADE20K_PALETTE
    return palette[:num_colors]


def _label_image(labels: np.ndarray) -> Image.Image:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected a 2-D label array, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("palette PNG holds labels 0..255; use the npy format for more classes")
    img = Image.frombytes("P", (labels.shape[1], labels.shape[0]), np.ascontiguousarray(labels, np.uint8).tobytes())
    img.putpalette(segmentation_palette(256).reshape(-1).tolist())
    return img


def palette_png_bytes(labels: np.ndarray, compress_level: int = 1) -> bytes:
    """Integer labels [H, W] in [0, 255] -> palette ("P") PNG whose pixel values are the labels,
    coloured with `segmentation_palette`."""
    return _pil_bytes(_label_image(labels), compress_level=compress_level)


def write_palette_png(path, labels: np.ndarray, compress_level: int = 1) -> None:
    atomic_write_bytes(path, palette_png_bytes(labels, compress_level))


def overlay_labels(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The original's segmentation picture: the labels in ADE20K's colours blended with the image,
    (1 - alpha) * image + alpha * colour, by Pillow's Image.blend as the original does it.
    Labels above 255 wrap around the palette."""
    labels = np.asarray(labels).astype(np.int64) % 256
    colours = _label_image(labels).convert("RGB")
    photo = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    return np.asarray(Image.blend(photo, colours, alpha))
