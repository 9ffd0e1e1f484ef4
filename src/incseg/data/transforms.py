"""Paired image / label transforms (torchvision.transforms.v2), docs/protocol.md "Resampling".

Images are ``tv_tensors.Image`` uint8 ``(3, H, W)``; labels ``tv_tensors.Mask`` uint8 ``(H, W)``.
Resizing reproduces, pixel for pixel, what the official MiB and PLOP code do to PIL images (the two
repositories ship the same ``dataset/transform.py``; MiB at commit 1c58983, PLOP at 4b4a060):

- labels are resized with PIL's ``Image.NEAREST`` (``Resize`` line 78, ``CenterCrop`` line 111,
  ``RandomResizedCrop`` line 557: ``F.resized_crop``, i.e. ``lbl.crop(box).resize(size, NEAREST)``).
  :func:`resize_label` and :func:`resized_crop_label` compute PIL's source pixel for every output
  pixel (see :func:`pil_nearest_source`) and gather; torchvision's legacy ``nearest`` picks other
  pixels (about 1% of a 512 label differs) and even ``nearest-exact`` misses a few, since PIL
  accumulates the sample position in floating point instead of multiplying.
- images are resized with PIL's ``Image.BILINEAR`` (``RandomResizedCrop`` line 494 default, ``run.py``
  lines 44 and 53 keep it): uint8 images are handed to PIL itself, cropped first and then resized
  like ``F.resized_crop``. torchvision's uint8 antialiased bilinear kernel rounds its fixed-point
  weights differently and is off by 1 (0-255) on up to 6% of the values (docs/protocol.md).
- ``ToTensor`` divides by 255 (torchvision ``to_tensor``, MiB line 350); ``ToDtype(scale=True)``
  multiplies by ``1/255`` instead, one float32 ulp away for half of the 256 values, so
  :class:`ToFloat` divides.

Only the resampling differs from torchvision's: the random draws (crop box, flip) are torchvision's
own, in the same order, so a seeded image gets the same crop box and flip as before.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@lru_cache(maxsize=4096)
def pil_nearest_source(in_size: int, out_size: int) -> np.ndarray:
    """Source index of every output pixel along one axis of PIL's NEAREST resize, ``(out_size,)``.

    Pillow's ``_resize`` (``src/_imaging.c:1988-2001`` at commit 4e5f09f) sends NEAREST to an
    affine transform with step ``a[0] = (box[2] - box[0]) / xsize`` (a double) and offset
    ``box[0]``, 0 here; ``ImagingScaleAffine`` (``src/libImaging/Geometry.c:870-887``) starts at
    ``offset + step * 0.5`` and *adds* the step once per output pixel (``xo += a[0]``), truncating
    each position to an index. Pillow 6.1.0, which MiB's ``requirements.txt`` pins, has the same code
    (``_imaging.c:1813``, ``Geometry.c:825-840``). A sequential float64 ``np.add.accumulate``
    reproduces the running sum exactly (multiplying, as ``nearest-exact`` does, rounds differently on
    a few pixels). The sum stays below ``in_size`` (by half a step, far above its rounding error for
    any size below 10^7), so every index is valid; the tests compare with the installed Pillow.

    Returns a read-only (cached) int64 array.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    step = float(in_size) / out_size
    position = np.full(out_size, step, dtype=np.float64)
    position[0] = step * 0.5
    np.add.accumulate(position, out=position)
    index = position.astype(np.int64)  # positions are >= 0: truncation is the floor
    index.flags.writeable = False
    return index


def resized_crop_label(
    label: torch.Tensor, top: int, left: int, height: int, width: int, size: tuple[int, int]
) -> torch.Tensor:
    """``label[..., top:top+height, left:left+width]`` resized to ``size = (h, w)`` like PIL NEAREST.

    Equal to ``Image.fromarray(label).crop((left, top, left + width, top + height)).resize((w, h),
    Image.NEAREST)``, the label path of the references' ``RandomResizedCrop`` (MiB / PLOP
    ``dataset/transform.py`` line 557). The box must lie inside the label. The gather is two NumPy
    ``take`` calls on the CPU (about 15x faster than ``index_select`` on uint8).
    """
    rows = pil_nearest_source(height, size[0]) + top
    cols = pil_nearest_source(width, size[1]) + left
    if label.device.type == "cpu":
        return torch.from_numpy(label.numpy().take(rows, axis=-2).take(cols, axis=-1))
    rows_t, cols_t = (
        torch.from_numpy(rows).to(label.device),
        torch.from_numpy(cols).to(label.device),
    )
    return label.index_select(-2, rows_t).index_select(-1, cols_t)


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The whole label resized to ``size = (h, w)``, equal to PIL's ``resize((w, h), NEAREST)``."""
    return resized_crop_label(label, 0, 0, label.shape[-2], label.shape[-1], size)


def _pil_exact(image: torch.Tensor) -> bool:
    """Whether PIL can resize ``image`` as the references do (uint8 CPU RGB or grey)."""
    return (
        image.dtype == torch.uint8
        and image.device.type == "cpu"
        and image.ndim == 3
        and image.shape[0] in (1, 3)
    )


def resized_crop_image(
    image: torch.Tensor, top: int, left: int, height: int, width: int, size: tuple[int, int]
) -> torch.Tensor:
    """Crop then resize a ``(C, H, W)`` image to ``size = (h, w)`` with PIL's BILINEAR.

    A uint8 RGB or grey CPU image goes through PIL: ``crop`` then ``resize((w, h), BILINEAR)``,
    the image path of the references' ``RandomResizedCrop`` (line 556) and, with the whole image
    as the box, of their ``Resize`` (line 78). The result is a ``(C, h, w)`` view of HWC memory,
    as :func:`incseg.data.files.read_image` returns. Other images (float, GPU) fall back to
    torchvision's antialiased bilinear, which is not bit-exact.
    """
    if not _pil_exact(image):
        return F.resized_crop(image, top, left, height, width, list(size), antialias=True)
    region = image[:, top : top + height, left : left + width].permute(1, 2, 0).numpy()
    if region.shape[2] == 1:
        region = region[:, :, 0]
    pil = Image.fromarray(np.ascontiguousarray(region))
    out = np.array(pil.resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.uint8)
    return torch.from_numpy(out.reshape(size[0], size[1], -1)).permute(2, 0, 1)


def _shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output ``(h, w)`` when the shorter side becomes ``size`` (torchvision ``F.resize`` rule)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _resample(inpt: Any, top: int, left: int, height: int, width: int, size: tuple[int, int]):
    if isinstance(inpt, tv_tensors.Mask):
        out = resized_crop_label(inpt.as_subclass(torch.Tensor), top, left, height, width, size)
    else:
        out = resized_crop_image(inpt.as_subclass(torch.Tensor), top, left, height, width, size)
    return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


class ResizeShorter(v2.Transform):
    """Resize the shorter side to ``size`` (labels: PIL NEAREST; images: PIL BILINEAR).

    The references' ``Resize(size=crop_size)`` (MiB / PLOP ``dataset/transform.py`` lines 51-84,
    ``run.py`` line 53): the longer side becomes ``int(size * long / short)``.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        height, width = inpt.shape[-2:]
        out_size = _shorter_side_size(height, width, self.size)
        if out_size == (height, width):
            return inpt
        return _resample(inpt, 0, 0, height, width, out_size)


class RandomResizedCrop(v2.RandomResizedCrop):
    """torchvision's crop-box draw, then the references' resampling of the crop.

    ``make_params`` is torchvision's, so the random draws are unchanged; the crop box is the one the
    references draw in the same way (MiB / PLOP ``dataset/transform.py`` lines 506-545). The crop is
    then resized like ``F.resized_crop`` on PIL images (lines 554-557): labels with NEAREST, images
    with BILINEAR.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return super().transform(inpt, params)
        box = params["top"], params["left"], params["height"], params["width"]
        return _resample(inpt, *box, tuple(self.size))


class ToFloat(v2.Transform):
    """uint8 image -> float32 in [0, 1] by dividing by 255, as torchvision's ``to_tensor`` does.

    MiB / PLOP ``ToTensor`` (``dataset/transform.py`` line 350) calls ``F.to_tensor``, which divides;
    ``v2.ToDtype(scale=True)`` multiplies by ``1/255`` and differs by one ulp on 126 of the 256
    values. Masks pass through; the float image is a contiguous ``(C, H, W)`` tensor.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask) or inpt.dtype != torch.uint8:
            return inpt
        out = inpt.as_subclass(torch.Tensor).to(
            torch.float32, memory_format=torch.contiguous_format
        )
        out = out.div_(255)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def to_float() -> list[v2.Transform]:
    """uint8 -> float32 in [0, 1] (:class:`ToFloat`), then ImageNet normalisation."""
    return [ToFloat(), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(crop_size: int, scale: tuple[float, float] = (0.5, 2.0)) -> v2.Compose:
    """Random resized crop (area scale ``scale``, aspect 3/4-4/3), horizontal flip, normalise."""
    return v2.Compose(
        [
            RandomResizedCrop(crop_size, scale=scale, ratio=(3 / 4, 4 / 3), antialias=True),
            v2.RandomHorizontalFlip(),
            *to_float(),
        ]
    )


def test_transform(crop_size: int | None) -> v2.Compose:
    """Resize the shorter side to ``crop_size`` and centre-crop it; ``None`` keeps the full image."""
    geometry: list[v2.Transform] = []
    if crop_size is not None:
        geometry = [ResizeShorter(crop_size), v2.CenterCrop(crop_size)]
    return v2.Compose([*geometry, *to_float()])


def apply_pair(
    transform: v2.Transform, image: torch.Tensor, label: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transform an image and its label together; returns plain tensors (float image, uint8 label)."""
    image, label = transform(tv_tensors.Image(image), tv_tensors.Mask(label))
    return image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)
