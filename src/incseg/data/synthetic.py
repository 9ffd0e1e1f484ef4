"""``shapes``: a built-in, procedurally generated segmentation dataset with VOC's class layout.

Twenty object classes plus background, so every VOC setting (15-5, 15-1, 19-1, ...) applies.
Class ``k`` (1..20) has its own shape (10 kinds), fill pattern (solid or striped) and hue; the two
classes that share a shape have opposite hues. Each image holds 1-4 objects of distinct classes,
drawn in random order (later objects occlude earlier ones), rotated and scaled at random, over a
low-saturation textured clutter that is labelled background (0). Classes are drawn independently
per image, so they co-occur: in overlap mode, images of a new step really contain old objects
labelled background -- the background shift that MiB models.

Everything is a deterministic function of ``(seed, split, index)``; nothing is read from disk.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch

from incseg.protocol.selection import build_presence

NUM_OBJECT_CLASSES = 20
NUM_SHAPES = 10


def _shape_mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of shape ``kind`` in object coordinates ``u, v`` (unit radius)."""
    rad = np.hypot(u, v)
    box = np.maximum(np.abs(u), np.abs(v))
    if kind == 0:  # disk
        return rad <= 1.0
    if kind == 1:  # square
        return box <= 0.8
    if kind == 2:  # triangle
        return (v <= 0.65) & (v >= 1.8 * np.abs(u) - 0.95)
    if kind == 3:  # diamond
        return np.abs(u) + np.abs(v) <= 1.0
    if kind == 4:  # cross
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if kind == 5:  # ring
        return (rad <= 1.0) & (rad >= 0.55)
    if kind == 6:  # ellipse
        return u**2 + (v / 0.5) ** 2 <= 1.0
    if kind == 7:  # square frame
        return (box <= 0.9) & (box >= 0.55)
    if kind == 8:  # half disk
        return (rad <= 1.0) & (v >= -0.1)
    # five-pointed star
    return rad <= 0.55 + 0.4 * np.cos(5 * np.arctan2(v, u))


def class_color(cls: int) -> np.ndarray:
    """RGB (float, 0..1) of object class ``cls`` in 1..20."""
    hue = ((cls - 1) * 7 % NUM_OBJECT_CLASSES) / NUM_OBJECT_CLASSES
    return np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.9))


def render_shapes(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image.

    Args:
        rng: source of randomness (consumed).
        size: height and width in pixels.

    Returns:
        ``image`` ``(size, size, 3)`` uint8 and ``label`` ``(size, size)`` uint8 with values
        0 (background) and the classes drawn.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Clutter: smooth low-frequency shading plus a few faint grey strokes; no saturated colours.
    low = rng.normal(size=(4, 4)).astype(np.float32)
    shade = np.kron(low, np.ones((size // 4 + 1, size // 4 + 1), np.float32))[:size, :size]
    grey = 0.45 + 0.08 * shade + 0.05 * rng.normal(size=(size, size)).astype(np.float32)
    image = np.repeat(grey[..., None], 3, axis=2) * (0.9 + 0.2 * rng.random(3, dtype=np.float32))
    for _ in range(rng.integers(2, 6)):
        angle = rng.uniform(0, np.pi)
        offset = rng.uniform(-size / 2, size / 2)
        dist = np.abs((xx - size / 2) * np.sin(angle) - (yy - size / 2) * np.cos(angle) - offset)
        image[dist < 1.0] = rng.uniform(0.2, 0.8)
    label = np.zeros((size, size), np.uint8)

    num_objects = rng.integers(1, 5)
    classes = rng.choice(NUM_OBJECT_CLASSES, size=num_objects, replace=False) + 1
    for cls in classes:
        radius = rng.uniform(0.12, 0.26) * size
        cy, cx = rng.uniform(radius * 0.6, size - radius * 0.6, size=2)
        theta = rng.uniform(0, 2 * np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / radius
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / radius
        mask = _shape_mask((cls - 1) % NUM_SHAPES, u, v)
        color = class_color(cls) * rng.uniform(0.85, 1.1)
        if (cls - 1) // NUM_SHAPES == 1:  # striped classes: darker stripes across the object
            stripes = np.sin(u * 2.5 * np.pi) > 0
            fill = np.where(stripes[..., None], color * 0.55, color)
        else:
            fill = np.broadcast_to(color, (size, size, 3))
        image[mask] = fill[mask]
        label[mask] = cls
    image += 0.03 * rng.normal(size=image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), label


class ShapesSource:
    """All images of one split of ``shapes``, generated once and held in memory.

    Args:
        num_images: number of images.
        size: image height and width.
        seed: dataset seed; ``split`` selects an independent stream (train 0, test 1).
        split: ``"train"`` or ``"test"``.

    Attributes:
        images: ``(N, 3, size, size)`` uint8.
        labels: ``(N, size, size)`` uint8, values 0..20.
    """

    def __init__(self, num_images: int, size: int, seed: int, split: str) -> None:
        stream = {"train": 0, "test": 1}[split]
        pairs = [
            render_shapes(np.random.default_rng([seed, stream, i]), size) for i in range(num_images)
        ]
        self.images = (
            torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
        )
        self.labels = torch.from_numpy(np.stack([p[1] for p in pairs]))
        self.names = [f"shapes_{split}_{i:06d}" for i in range(num_images)]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(3, H, W)`` uint8 image and ``(H, W)`` uint8 label of image ``index``."""
        return self.images[index], self.labels[index]

    def saliency(self, index: int) -> torch.Tensor:
        """``(H, W)`` uint8 exact saliency map of image ``index``: 255 on every object pixel, 0 on
        the clutter (what a perfect saliency detector would give SSUL)."""
        return (self.labels[index] > 0).to(torch.uint8) * 255

    def check_saliency(self, indices) -> None:
        """Every shapes image has its exact saliency map (:meth:`saliency`)."""

    def presence(self) -> np.ndarray:
        """``(N, 256)`` bool class-presence index (see :mod:`incseg.protocol.selection`)."""
        return build_presence(self.labels)
