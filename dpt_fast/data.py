"""Training data: folder datasets, a procedural synthetic dataset, the paper's mixing and augmentation.

Folder layout (one folder per dataset; files are matched by name stem, e.g. images/0001.jpg with
depth/0001.png):

    ROOT/
      images/      RGB images: .jpg .jpeg .png .bmp .webp
      depth/       depth maps: 16-bit PNG, .pfm or .npy (float);       } one of the two, for depth
      disparity/   inverse depth / disparity: 16-bit PNG, .pfm or .npy } training
      masks/       optional valid masks (PNG, nonzero = valid), for depth
      labels/      segmentation labels (8- or 16-bit PNG; class index per pixel, 255 = ignore)
      dataset.json optional settings: {"depth_scale": 0.001, "invalid_value": 0, "reduce_zero_label": false}

- depth/: depth = stored value * depth_scale (default 1; e.g. 0.001 for millimetre PNGs, 1/256 for
  KITTI). Pixels equal to invalid_value (default 0 for depth), non-finite or <= 0 are invalid. The
  training target is inverse depth (1 / depth), the representation the paper's loss operates on.
- disparity/: used as it is (scale and shift do not matter to the scale-and-shift-invariant loss);
  non-finite pixels, and pixels equal to invalid_value if it is given, are invalid.
- labels/: reduce_zero_label=true maps 0 to the ignore index and every other class c to c - 1
  (ADE20K's files).

Every dataset yields raw samples (`load(i)`: numpy arrays at the stored size). Training goes through
`TrainStream`, a pure function of the global sample index: the dataset (drawn uniformly when several
are mixed, then a sample), the augmentation and so every batch follow from (seed, index) alone, so
resuming at a step, or sharding a batch over DDP ranks, gives exactly the same samples.

Augmentation (`augment`): resize so that the longer side is `size` (times a random factor from
`scale_range`, 1 for depth as the paper, (0.5, 2) for segmentation), a random `size` x `size` square
window (where the resized image is smaller than the square, the rest is padding: mask False, label
ignore, image 0 after normalisation), random horizontal flip. With `cover=True` the shorter side is
resized to `size` instead, so the window lies inside the image and nothing is padded (Depth Anything's
training: those models read padded borders as near). Images are bicubic-resized, targets
nearest-neighbour; images are normalised with the model's mean and std (`mean`, `std`: mean = std =
0.5 for the released DPT models, ImageNet's for Depth Anything; see dpt_fast.specs).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .image_io import IMAGE_EXTENSIONS, read_pfm, write_pfm  # one list of image suffixes, one PFM reader/writer
from .transforms import MEAN, STD

__all__ = ["FolderDataset", "SyntheticDataset", "TrainStream", "StreamSampler", "augment", "read_pfm",
           "write_pfm", "read_array", "build_datasets", "IGNORE_INDEX"]

IGNORE_INDEX = 255
TARGET_EXTENSIONS = (".png", ".pfm", ".npy")


# --- file formats ----------------------------------------------------------------------------------

def read_array(path) -> np.ndarray:
    """A single-channel map from .png (8/16-bit, as stored), .pfm or .npy, as float32 [H, W]."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".pfm":
        array = read_pfm(path)
    elif suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    else:
        with Image.open(path) as image:
            array = np.asarray(image)
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel map, got shape {array.shape}")
    return array.astype(np.float32)


# --- datasets ---------------------------------------------------------------------------------------

class FolderDataset:
    """A dataset folder in the layout of this module's docstring. `load(i)` gives numpy arrays:
    "image" uint8 [H, W, 3]; for depth "disparity" float32 [H, W] and "mask" bool [H, W]; for
    segmentation "label" int64 [H, W]."""

    def __init__(self, root, task: str = "depth", depth_scale: float | None = None,
                 invalid_value: float | None = None, reduce_zero_label: bool | None = None):
        self.root = Path(root)
        self.task = task
        settings = {}
        if (self.root / "dataset.json").is_file():
            settings = json.loads((self.root / "dataset.json").read_text())
        self.depth_scale = float(depth_scale if depth_scale is not None else settings.get("depth_scale", 1.0))
        self.reduce_zero_label = bool(reduce_zero_label if reduce_zero_label is not None
                                      else settings.get("reduce_zero_label", False))
        image_dir = self.root / "images"
        if not image_dir.is_dir():
            raise FileNotFoundError(f"{self.root}: no images/ folder (see dpt_fast.data for the layout)")
        images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
        if task == "depth":
            kinds = [k for k in ("depth", "disparity") if (self.root / k).is_dir()]
            if len(kinds) != 1:
                raise FileNotFoundError(f"{self.root}: depth training needs exactly one of depth/ or disparity/, "
                                        f"found {kinds or 'neither'}")
            self.target_kind = kinds[0]
            default_invalid = 0.0 if self.target_kind == "depth" else None
            self.invalid_value = invalid_value if invalid_value is not None else settings.get("invalid_value",
                                                                                           default_invalid)
            targets = self._index(self.root / self.target_kind, TARGET_EXTENSIONS)
            masks = self._index(self.root / "masks", (".png",)) if (self.root / "masks").is_dir() else {}
        elif task == "segmentation":
            if not (self.root / "labels").is_dir():
                raise FileNotFoundError(f"{self.root}: segmentation training needs a labels/ folder")
            self.target_kind = "labels"
            targets, masks = self._index(self.root / "labels", (".png",)), {}
        else:
            raise ValueError(f"task must be 'depth' or 'segmentation', got {task!r}")
        self.stems = [s for s in images if s in targets]
        if not self.stems:
            raise FileNotFoundError(f"{self.root}: no image has a matching file in {self.target_kind}/")
        self.images, self.targets, self.masks = images, targets, masks

    @staticmethod
    def _index(folder: Path, extensions) -> dict[str, Path]:
        return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in extensions}

    def __len__(self) -> int:
        return len(self.stems)

    def __repr__(self) -> str:
        return f"FolderDataset({str(self.root)!r}, task={self.task!r}, {len(self)} samples)"

    def load(self, index: int) -> dict[str, np.ndarray]:
        stem = self.stems[index]
        with Image.open(self.images[stem]) as image:
            sample = {"image": np.asarray(image.convert("RGB"))}
        if self.task == "segmentation":
            label = read_array(self.targets[stem]).astype(np.int64)
            if self.reduce_zero_label:
                label = np.where(label == 0, IGNORE_INDEX + 1, label) - 1
            sample["label"] = label
            return sample
        raw = read_array(self.targets[stem])
        valid = np.isfinite(raw)
        if self.invalid_value is not None:
            valid &= raw != self.invalid_value
        if self.target_kind == "depth":
            depth = raw * self.depth_scale
            valid &= depth > 0
            disparity = np.where(valid, 1.0 / np.where(valid, depth, 1.0), 0.0)
        else:
            disparity = np.where(valid, raw, 0.0)
        if stem in self.masks:
            valid &= read_array(self.masks[stem]) != 0
        sample["disparity"], sample["mask"] = disparity.astype(np.float32), valid
        if sample["disparity"].shape != sample["image"].shape[:2]:
            raise ValueError(f"{self.root}/{stem}: target {sample['disparity'].shape} and image "
                             f"{sample['image'].shape[:2]} differ in size")
        return sample


class SyntheticDataset:
    """Procedural scenes with exact depth and labels, deterministic per index (seed, index).

    A pinhole camera looks at a textured floor plane and a back wall, with spheres standing on the
    floor. Depth is the ray-traced z-distance; labels: 0 floor, 1 wall, 2.. spheres (class of each
    sphere drawn from 2..num_classes-1). Some images carry an invalid rectangle in their mask, so the
    masked code paths are exercised. `resolution` is the longer side; aspect ratios vary in [3/4, 4/3].
    """

    def __init__(self, length: int = 10000, resolution: int = 128, num_classes: int = 8, seed: int = 0):
        if num_classes < 3:
            raise ValueError("num_classes must be at least 3 (floor, wall, one sphere class)")
        self.length, self.resolution, self.num_classes, self.seed = length, resolution, num_classes, seed
        self.task = None  # has depth and labels

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"SyntheticDataset(length={self.length}, resolution={self.resolution}, num_classes={self.num_classes})"

    def load(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index, 7])
        aspect = rng.uniform(0.75, 4 / 3)
        if aspect >= 1:
            width, height = self.resolution, max(8, round(self.resolution / aspect))
        else:
            width, height = max(8, round(self.resolution * aspect)), self.resolution
        focal = width * rng.uniform(0.8, 1.3)
        v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
        pitch = np.deg2rad(rng.uniform(5.0, 25.0))  # camera looks down a little: floor, wall, spheres
        ray_cam = np.stack([(u - width / 2) / focal, (v - height / 2) / focal, np.ones_like(u)], -1)  # y down
        cos, sin = np.cos(pitch), np.sin(pitch)
        ray = ray_cam @ np.array([[1, 0, 0], [0, cos, sin], [0, -sin, cos]]).T  # world ray; t = camera z-depth

        cam_height, wall = rng.uniform(0.8, 2.0), rng.uniform(4.0, 12.0)
        depth = wall / ray[..., 2]
        label = np.ones((height, width), np.int64)
        with np.errstate(divide="ignore"):
            floor_t = np.where(ray[..., 1] > 0, cam_height / ray[..., 1], np.inf)
        hit = floor_t < depth
        depth, label = np.where(hit, floor_t, depth), np.where(hit, 0, label)
        normal = np.zeros_like(ray)
        normal[..., 2] = -1.0
        normal[hit] = (0.0, -1.0, 0.0)

        colors = rng.uniform(0.15, 0.95, size=(self.num_classes, 3))
        for _ in range(rng.integers(1, 6)):
            radius = rng.uniform(0.2, 0.8)
            nearest = min(max(1.5, cam_height / np.tan(pitch + 0.4 * height / focal)), wall - 2 * radius)
            z = rng.uniform(nearest, wall - radius)
            x = rng.uniform(-0.4, 0.4) * z * width / focal
            center = np.array([x, cam_height - radius, z])
            b = ray @ center
            c = center @ center - radius ** 2
            a = (ray * ray).sum(-1)
            disc = b * b - a * c
            t = np.where(disc > 0, (b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
            hit = (t > 0) & (t < depth)
            depth = np.where(hit, t, depth)
            label = np.where(hit, rng.integers(2, self.num_classes), label)
            point = ray[hit] * t[hit][:, None]
            normal[hit] = (point - center) / radius

        point = ray * depth[..., None]
        light = np.array([0.4, -0.8, -0.45])
        light /= np.linalg.norm(light)
        shade = 0.35 + 0.65 * np.clip(normal @ light, 0, 1)
        checker = ((np.floor(point[..., 0] * 2) + np.floor(point[..., 2] * 2)) % 2) * (label == 0)
        stripes = (np.floor(point[..., 0] * 3 + point[..., 1] * 3) % 2) * (label == 1)
        texture = 1.0 - 0.3 * checker - 0.2 * stripes
        image = colors[label] * (shade * texture)[..., None] + rng.normal(0, 0.02, (height, width, 3))
        mask = np.ones((height, width), bool)
        if rng.uniform() < 0.3:  # an invalid patch, as real ground truth has
            h0, w0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
            mask[h0:h0 + height // 4, w0:w0 + width // 4] = False
        return {"image": (np.clip(image, 0, 1) * 255).round().astype(np.uint8),
                "disparity": (1.0 / depth).astype(np.float32), "mask": mask, "label": label}


# --- augmentation -----------------------------------------------------------------------------------

def _resize(array: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    """Resize a 2-D array (float32, int or bool) or an RGB uint8 image to (height, width) with PIL."""
    height, width = size
    if array.dtype == np.uint8 and array.ndim == 3:
        return np.asarray(Image.fromarray(array).resize((width, height), resample))
    if array.dtype == bool:
        return np.asarray(Image.fromarray(array.astype(np.uint8)).resize((width, height), resample)) != 0
    if np.issubdtype(array.dtype, np.integer):
        return np.asarray(Image.fromarray(array.astype(np.int32)).resize((width, height), resample)).astype(array.dtype)
    return np.asarray(Image.fromarray(array.astype(np.float32)).resize((width, height), resample))


def _window(array: np.ndarray, top: int, left: int, size: int, fill) -> np.ndarray:
    """array[top:top+size, left:left+size] where the window may reach outside (filled with `fill`)."""
    out = np.full((size, size) + array.shape[2:], fill, dtype=array.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, array.shape[0]), min(left + size, array.shape[1])
    out[y0 - top:y1 - top, x0 - left:x1 - left] = array[y0:y1, x0:x1]
    return out


def augment(sample: dict[str, np.ndarray], size: int, rng: np.random.Generator,
            scale_range: tuple[float, float] = (1.0, 1.0), flip: bool = True,
            ignore_index: int = IGNORE_INDEX, mean=MEAN, std=STD, cover: bool = False) -> dict[str, torch.Tensor]:
    """Resize (longer side, or with `cover` the shorter side, = size x a random factor), random square
    window, random flip, normalise with per-channel (or scalar) `mean` and `std`.

    Returns tensors: "image" float32 [3, size, size]; and those of "disparity" float32 [size, size],
    "mask" bool [size, size], "label" int64 [size, size] that the sample has.
    """
    height, width = sample["image"].shape[:2]
    factor = rng.uniform(*scale_range)
    scale = size * factor / (min(height, width) if cover else max(height, width))
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    top = int(rng.integers(min(0, new_h - size), max(0, new_h - size) + 1))
    left = int(rng.integers(min(0, new_w - size), max(0, new_w - size) + 1))
    mirror = flip and rng.uniform() < 0.5

    image = _resize(sample["image"], (new_h, new_w), Image.BICUBIC).astype(np.float32)
    image = (image / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    out = {"image": _window(image, top, left, size, 0.0)}
    if "disparity" in sample:
        mask = sample.get("mask", np.ones(sample["disparity"].shape, bool))
        out["disparity"] = _window(_resize(sample["disparity"], (new_h, new_w), Image.NEAREST), top, left, size, 0.0)
        out["mask"] = _window(_resize(mask, (new_h, new_w), Image.NEAREST), top, left, size, False)
    if "label" in sample:
        out["label"] = _window(_resize(sample["label"], (new_h, new_w), Image.NEAREST), top, left, size, ignore_index)
    tensors = {}
    for key, value in out.items():
        if mirror:
            value = value[:, ::-1]
        value = torch.from_numpy(np.ascontiguousarray(value))
        tensors[key] = value.permute(2, 0, 1).contiguous() if key == "image" else value
    return tensors


# --- the training stream ----------------------------------------------------------------------------

class TrainStream(torch.utils.data.Dataset):
    """Global sample index -> augmented sample, a pure function of (seed, index).

    One dataset: epochs of a seeded permutation. Several: a dataset drawn uniformly at random, then a
    sample of it uniformly at random (the paper's mixing, so every dataset is seen equally often
    whatever its size). `keys` selects the targets the task needs; `mean`, `std` and `cover` are
    `augment`'s (the model's normalisation, and whether crops lie inside the resized image).
    """

    def __init__(self, datasets, size: int, seed: int = 0, keys=("image", "disparity", "mask"),
                 scale_range=(1.0, 1.0), flip: bool = True, ignore_index: int = IGNORE_INDEX,
                 mean=MEAN, std=STD, cover: bool = False):
        self.datasets = list(datasets)
        if not self.datasets or any(len(d) == 0 for d in self.datasets):
            raise ValueError("TrainStream needs at least one non-empty dataset")
        self.size, self.seed, self.keys = size, seed, tuple(keys)
        self.scale_range, self.flip, self.ignore_index = tuple(scale_range), flip, ignore_index
        self.mean, self.std, self.cover = mean, std, cover
        self._permutation = (None, None)

    def __len__(self) -> int:  # nominal: the stream is unbounded; samplers give indices directly
        return sum(len(d) for d in self.datasets)

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset number, sample number) of global sample `index`."""
        if len(self.datasets) == 1:
            n = len(self.datasets[0])
            epoch = index // n
            if self._permutation[0] != epoch:
                self._permutation = (epoch, np.random.default_rng([self.seed, epoch, 1]).permutation(n))
            return 0, int(self._permutation[1][index % n])
        rng = np.random.default_rng([self.seed, index, 2])
        which = int(rng.integers(len(self.datasets)))
        return which, int(rng.integers(len(self.datasets[which])))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        which, sample_index = self.locate(int(index))
        sample = self.datasets[which].load(sample_index)
        missing = [k for k in self.keys if k not in sample]
        if missing:
            raise KeyError(f"{self.datasets[which]!r} has no {missing} for this task")
        sample = {k: sample[k] for k in self.keys if k in sample}
        rng = np.random.default_rng([self.seed, int(index), 3])
        return augment(sample, self.size, rng, self.scale_range, self.flip, self.ignore_index, self.mean,
                       self.std, self.cover)


class StreamSampler(torch.utils.data.Sampler):
    """Endless global sample indices for one rank, from global sample `start_sample` on: each global
    batch of G consecutive indices is split into `world` contiguous slices, rank r taking the r-th."""

    def __init__(self, global_batch: int, start_sample: int = 0, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by the {world} processes")
        self.global_batch, self.start_sample, self.rank, self.world = global_batch, start_sample, rank, world

    def __iter__(self):
        local = self.global_batch // self.world
        first = self.start_sample + self.rank * local
        while True:
            yield from range(first, first + local)
            first += self.global_batch


def build_datasets(specs, task: str, synthetic_resolution: int = 128, num_classes: int = 8, seed: int = 0):
    """Datasets from `--data` values: "synthetic" (optionally "synthetic:LENGTH") or a folder path."""
    datasets = []
    for spec in specs:
        name, _, arg = str(spec).partition(":")
        if name == "synthetic" and not os.path.exists(spec):
            length = int(arg) if arg else 10000
            datasets.append(SyntheticDataset(length, synthetic_resolution, num_classes, seed=seed + len(datasets)))
        else:
            datasets.append(FolderDataset(spec, task=task))
    return datasets

