"""Synthetic moving-camera sequences with exact depth, for temporal-consistency measurements.

One procedural scene (a checkered floor, a striped back wall, shaded spheres on the floor; the same
kind of scene as `dpt_fast.data.SyntheticDataset`, whose scenes are fixed per image) is ray-traced
from a camera that moves along a path, so every frame's true depth is known and so is its true change
from the previous frame. Textures are fixed to the world, so they move in the image as they would on
video.

motion:
  "static"  the camera stands still (any change in a prediction is flicker)
  "pan"     the camera translates sideways (truck), `amount` metres over the sequence
  "dolly"   the camera moves forward, `amount` metres over the sequence
  "zoom"    the focal length grows by the factor 1 + amount (depth does not change, the view does)
"""
from __future__ import annotations

import numpy as np

__all__ = ["MOTIONS", "camera_sequence"]

MOTIONS = ("static", "pan", "dolly", "zoom")


def _scene(rng: np.random.Generator, num_colors: int = 6) -> dict:
    cam_height, wall = rng.uniform(1.0, 1.8), rng.uniform(6.0, 10.0)
    spheres = []
    for _ in range(rng.integers(2, 5)):
        radius = rng.uniform(0.3, 0.8)
        z = rng.uniform(2.5, wall - radius - 0.5)
        x = rng.uniform(-0.35, 0.35) * z
        spheres.append((np.array([x, cam_height - radius, z]), radius, int(rng.integers(2, num_colors))))
    return {"cam_height": cam_height, "wall": wall, "spheres": spheres, "pitch": np.deg2rad(rng.uniform(8, 18)),
            "colors": rng.uniform(0.2, 0.95, size=(num_colors, 3))}


def _render(scene: dict, height: int, width: int, focal: float, position: np.ndarray):
    """(uint8 image [H, W, 3], z-depth [H, W]) from a camera at `position` (x right, y down, z forward)."""
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    ray_cam = np.stack([(u - width / 2) / focal, (v - height / 2) / focal, np.ones_like(u)], -1)
    cos, sin = np.cos(scene["pitch"]), np.sin(scene["pitch"])
    rotation = np.array([[1, 0, 0], [0, cos, sin], [0, -sin, cos]])
    ray = ray_cam @ rotation.T  # world direction; the ray parameter t is the camera z-depth

    t = (scene["wall"] - position[2]) / ray[..., 2]
    label = np.ones((height, width), np.int64)
    normal = np.zeros(ray.shape)
    normal[..., 2] = -1.0
    with np.errstate(divide="ignore"):
        floor_t = np.where(ray[..., 1] > 0, (scene["cam_height"] - position[1]) / ray[..., 1], np.inf)
    hit = floor_t < t
    t, label = np.where(hit, floor_t, t), np.where(hit, 0, label)
    normal[hit] = (0.0, -1.0, 0.0)
    for center, radius, color in scene["spheres"]:
        offset = center - position
        b = ray @ offset
        a = (ray * ray).sum(-1)
        disc = b * b - a * (offset @ offset - radius ** 2)
        t_sphere = np.where(disc > 0, (b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
        hit = (t_sphere > 0) & (t_sphere < t)
        t = np.where(hit, t_sphere, t)
        label = np.where(hit, color, label)
        normal[hit] = (position + ray[hit] * t_sphere[hit][:, None] - center) / radius

    point = position + ray * t[..., None]  # world coordinates: the textures are fixed to them
    light = np.array([0.4, -0.8, -0.45])
    light /= np.linalg.norm(light)
    shade = 0.35 + 0.65 * np.clip(normal @ light, 0, 1)
    checker = ((np.floor(point[..., 0] * 2) + np.floor(point[..., 2] * 2)) % 2) * (label == 0)
    stripes = (np.floor(point[..., 0] * 3 + point[..., 1] * 3) % 2) * (label == 1)
    image = scene["colors"][label] * (shade * (1.0 - 0.3 * checker - 0.2 * stripes))[..., None]
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), t.astype(np.float32)


def camera_sequence(motion: str = "pan", num_frames: int = 16, height: int = 64, width: int = 96,
                    amount: float = 0.5, seed: int = 0) -> dict[str, np.ndarray]:
    """Render one scene along a camera path.

    Returns {"images": uint8 [T, H, W, 3], "depth": float32 [T, H, W] (z-distance, metres),
    "disparity": float32 [T, H, W] (1 / depth), "motion": the name}. Deterministic in `seed`.
    """
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {', '.join(MOTIONS)}, got {motion!r}")
    if num_frames < 2:
        raise ValueError("a sequence needs at least 2 frames")
    rng = np.random.default_rng([seed, 15])
    scene = _scene(rng)
    focal0 = width * 0.9
    images, depths = [], []
    for i in range(num_frames):
        progress = i / (num_frames - 1)
        position, focal = np.zeros(3), focal0
        if motion == "pan":
            position[0] = amount * (progress - 0.5)
        elif motion == "dolly":
            position[2] = amount * progress
        elif motion == "zoom":
            focal = focal0 * (1.0 + amount * progress)
        image, depth = _render(scene, height, width, focal, position)
        images.append(image)
        depths.append(depth)
    depth = np.stack(depths)
    return {"images": np.stack(images), "depth": depth, "disparity": (1.0 / depth).astype(np.float32),
            "motion": motion}
