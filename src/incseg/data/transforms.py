"""Paired image / label transforms (torchvision.transforms.v2), SPEC section 7.

Images are ``tv_tensors.Image`` uint8 ``(3, H, W)``; labels ``tv_tensors.Mask`` uint8 ``(H, W)``.
torchvision resizes masks with nearest interpolation and leaves them out of ``ToDtype`` and
``Normalize``; padding of masks uses 255 (ignore).
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_float() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(crop_size: int, scale: tuple[float, float] = (0.5, 2.0)) -> v2.Compose:
    """Random resized crop (area scale ``scale``, aspect 3/4-4/3), horizontal flip, normalise."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(crop_size, scale=scale, ratio=(3 / 4, 4 / 3), antialias=True),
            v2.RandomHorizontalFlip(),
            *_to_float(),
        ]
    )


def test_transform(crop_size: int | None) -> v2.Compose:
    """Resize the shorter side to ``crop_size`` and centre-crop it; ``None`` keeps the full image."""
    geometry: list[v2.Transform] = []
    if crop_size is not None:
        geometry = [v2.Resize(crop_size, antialias=True), v2.CenterCrop(crop_size)]
    return v2.Compose([*geometry, *_to_float()])


def apply_pair(
    transform: v2.Transform, image: torch.Tensor, label: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transform an image and its label together; returns plain tensors (float image, uint8 label)."""
    image, label = transform(tv_tensors.Image(image), tv_tensors.Mask(label))
    return image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)
