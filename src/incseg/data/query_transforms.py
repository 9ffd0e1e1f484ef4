"""The Mask2Former recipe's image / label transforms (``data.pipeline: mask2former``).

What the query-based methods' ADE20K training and test do to an image, after
facebookresearch/Mask2Former (commit 9b0651c) and detectron2 (commit 02b5c4e), the code every
continual Mask2Former vendors:

- training, ``MaskFormerSemanticDatasetMapper`` (``mask2former/data/dataset_mappers/
  mask_former_semantic_dataset_mapper.py:64-82, 125-145``) with ``Base-ADE20K-Semantic
  Segmentation.yaml``'s ``INPUT`` keys: :class:`ResizeShortestEdge` to a short side drawn from
  ``[int(x * 0.1 * 512) for x in range(5, 21)]`` (at most 2048 long), an absolute 512 x 512
  :class:`RandomCrop` (``SINGLE_CATEGORY_MAX_AREA: 1.0`` makes detectron2's
  ``RandomCrop_CategoryAreaConstraint`` the plain crop, ``augmentation_impl.py:462-463``),
  :class:`ColorAugSSD`, a horizontal flip with probability 0.5, then :class:`PadTo` 512 (image
  128, label 255: the mapper's ``F.pad``, lines 135-145);
- test (``data.pipeline: comformer``), detectron2's ``DatasetMapper(cfg, False)`` as
  CoMFormer's ``train_inc.py:398`` builds it (``detectron2/data/dataset_mapper.py:154-173``,
  ``detection_utils.py:644-648``): image and label resized to short side 512 (at most 2048
  long), whole image, scored at that size (``maskformer_model.py:215-216``: the output takes the
  label's shape);
- test (``data.pipeline: mask2former``), Mask2Former's own: the image resized as above, the
  label read at its original size by the evaluator, the scores upsampled bilinearly to it
  (``sem_seg_postprocess``, ``maskformer_model.py``), as BalConpas evaluates
  (``continual/evaluator.py:66-70``).

Resampling follows detectron2's ``ResizeTransform.apply_image`` (``transforms/transform.py:
112-147``): uint8 images through PIL BILINEAR; the training label is read as float64
(``mask_former_semantic_dataset_mapper.py:114``) and so resized by ``F.interpolate(mode=
"nearest")``; the test label is read as uint8 (``dataset_mapper.py:159``) and resized by PIL
NEAREST. Every random draw comes from torch's generator (the official draws from ``np.random``
and ``random``, so no seed reproduces its crops): the distributions are the official ones.

Labels keep their dataset ids here (remapping follows, :class:`incseg.data.datasets.StepDataset`),
as CoMFormer remaps after the mapper (``continual/data/semantic_wrapper.py:151-154``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from incseg.data.transforms import resize_label, resized_crop_image, to_float

PAD_IMAGE = 128  # mask_former_semantic_dataset_mapper.py:143, before normalisation
PAD_LABEL = 255  # the dataset's ignore_label (:145)


def short_sides(crop_size: int, scale_min: float, scale_max: float) -> list[int]:
    """The training short sides ``[int(x * 0.1 * crop_size) for x in 10*scale_min..10*scale_max]``
    (``Base-ADE20K-SemanticSegmentation.yaml`` ``MIN_SIZE_TRAIN`` at 512, 0.5, 2.0: 256, 307, ...,
    1024). Scales must be multiples of 0.1 (checked by the config)."""
    first, last = round(scale_min * 10), round(scale_max * 10)
    return [int(x * 0.1 * crop_size) for x in range(first, last + 1)]


def shortest_edge_shape(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2's ``ResizeShortestEdge.get_output_shape`` (``augmentation_impl.py:181-200``):
    the short side becomes ``short``, then both shrink so the long side is at most ``max_size``;
    each side rounded half up."""
    size = float(short)
    scale = size / min(height, width)
    new_h, new_w = (size, scale * width) if height < width else (scale * height, size)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def _label_nearest_torch(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(mode="nearest")`` of a ``(H, W)`` or ``(K, H, W)`` uint8 label, as detectron2
    resizes the float64 training label (the source index depends only on the sizes)."""
    batch = label.reshape(1, -1, *label.shape[-2:])
    return F.interpolate(batch, size=size, mode="nearest").reshape(*label.shape[:-2], *size)


class ResizeShortestEdge(v2.Transform):
    """Resize to a short side drawn uniformly from ``sides`` (long side at most ``max_size``).

    ``label_resize``: ``"torch"`` (training: ``F.interpolate`` nearest), ``"pil"`` (CoMFormer's
    test: PIL NEAREST) or ``"keep"`` (Mask2Former's test: the label stays at its size, the
    scores are upsampled to it). Images: PIL BILINEAR
    (:func:`incseg.data.transforms.resized_crop_image`).
    """

    def __init__(self, sides: list[int], max_size: int, label_resize: str = "torch") -> None:
        super().__init__()
        if label_resize not in ("torch", "pil", "keep"):
            raise ValueError(f"label_resize: 'torch', 'pil' or 'keep', got {label_resize!r}")
        self.sides, self.max_size, self.label_resize = list(sides), int(max_size), label_resize

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        # One side draws nothing: the test transform must leave the global RNG alone.
        pick = int(torch.randint(len(self.sides), ())) if len(self.sides) > 1 else 0
        short = self.sides[pick]
        return {"size": shortest_edge_shape(height, width, short, self.max_size)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        size = params["size"]
        if tuple(inpt.shape[-2:]) == size:
            return inpt
        plain = inpt.as_subclass(torch.Tensor)
        if isinstance(inpt, tv_tensors.Mask):
            if self.label_resize == "keep":
                return inpt
            if self.label_resize == "torch":
                out = _label_nearest_torch(plain, size)
            else:
                out = resize_label(plain, size)
        else:
            out = resized_crop_image(plain, 0, 0, plain.shape[-2], plain.shape[-1], size)
        return tv_tensors.wrap(out, like=inpt)


class RandomCrop(v2.Transform):
    """detectron2's ``RandomCrop("absolute", (size, size))`` (``augmentation_impl.py:400-428``):
    a ``min(size, H) x min(size, W)`` window, its top row then its left column drawn uniformly."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h, crop_w = min(self.size, height), min(self.size, width)
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        return {"box": (top, left, crop_h, crop_w)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        top, left, height, width = params["box"]
        plain = inpt.as_subclass(torch.Tensor)[..., top : top + height, left : left + width]
        return tv_tensors.wrap(plain, like=inpt)


def _coin() -> bool:
    return bool(torch.randint(2, ()))


def _randint(low: int, high: int) -> int:
    """``random.randint(low, high)``: both ends included."""
    return int(torch.randint(low, high + 1, ()))


def _uniform(low: float, high: float) -> float:
    """``random.uniform(low, high)``: ``low + (high - low) * U[0, 1)`` in float64."""
    return low + (high - low) * float(torch.rand((), dtype=torch.float64))


def _convert(img: np.ndarray, alpha: float = 1, beta: float = 0) -> np.ndarray:
    """``ColorAugSSDTransform.convert`` (``color_augmentation.py:65-68``): float32 affine map,
    clipped to 0-255, truncated to uint8 (NumPy casts the Python scalars to float32)."""
    out = img.astype(np.float32) * alpha + beta
    return np.clip(out, 0, 255).astype(np.uint8)


class ColorAugSSD(v2.Transform):
    """SSD's photometric distortion as detectron2's PointRend project implements it
    (``projects/PointRend/point_rend/color_augmentation.py:49-98``), on RGB images.

    In BGR: brightness (probability 1/2, ``+U(-32, 32)``), then with probability 1/2 contrast,
    saturation, hue, else saturation, hue, contrast; contrast multiplies by ``U(0.5, 1.5)``
    (probability 1/2), saturation multiplies OpenCV's 8-bit HSV S channel by ``U(0.5, 1.5)``
    (probability 1/2), hue adds an integer in ``[-18, 18]`` to H modulo 180 (probability 1/2).
    The HSV round trips are OpenCV's (``cv2.cvtColor``, 8-bit), as the official. Labels pass.
    """

    def __init__(self) -> None:
        super().__init__()
        import cv2  # noqa: F401  (fail at construction, not inside a loader worker)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        if inpt.dtype != torch.uint8 or inpt.shape[0] != 3:
            raise ValueError(f"ColorAugSSD needs a uint8 (3, H, W) image, got {inpt.dtype}")
        bgr = inpt.as_subclass(torch.Tensor).flip(0).permute(1, 2, 0).numpy()
        bgr = np.ascontiguousarray(bgr)
        out = distort(bgr)
        rgb = torch.from_numpy(np.ascontiguousarray(out[:, :, ::-1])).permute(2, 0, 1)
        return tv_tensors.wrap(rgb, like=inpt)


def distort(bgr: np.ndarray) -> np.ndarray:
    """One draw of :class:`ColorAugSSD` on an ``(H, W, 3)`` uint8 BGR array (``apply_image``,
    ``color_augmentation.py:52-60``; the draws in the official order)."""
    if _coin():
        bgr = _convert(bgr, beta=_uniform(-32, 32))
    if _coin():
        return _hue(_saturation(_contrast(bgr)))
    return _contrast(_hue(_saturation(bgr)))


def _contrast(bgr: np.ndarray) -> np.ndarray:
    return _convert(bgr, alpha=_uniform(0.5, 1.5)) if _coin() else bgr


def _saturation(bgr: np.ndarray) -> np.ndarray:
    import cv2

    if not _coin():
        return bgr
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=_uniform(0.5, 1.5))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def _hue(bgr: np.ndarray) -> np.ndarray:
    import cv2

    if not _coin():
        return bgr
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + _randint(-18, 18)) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


class PadTo(v2.Transform):
    """Pad bottom and right to ``size x size``: images with 128 (before normalisation), labels
    with 255 (a stacked saliency channel, SSUL's, with 0: not salient)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        height, width = inpt.shape[-2:]
        pad = [0, self.size - width, 0, self.size - height]
        if pad[1] < 0 or pad[3] < 0:
            raise ValueError(f"PadTo({self.size}): input {height}x{width} is larger")
        if pad[1] == pad[3] == 0:
            return inpt
        plain = inpt.as_subclass(torch.Tensor)
        if not isinstance(inpt, tv_tensors.Mask):
            return tv_tensors.wrap(F.pad(plain, pad, value=PAD_IMAGE), like=inpt)
        if plain.ndim == 2:
            return tv_tensors.wrap(F.pad(plain, pad, value=PAD_LABEL), like=inpt)
        fills = [PAD_LABEL] + [0] * (plain.shape[0] - 1)
        out = torch.stack([F.pad(c, pad, value=f) for c, f in zip(plain, fills, strict=True)])
        return tv_tensors.wrap(out, like=inpt)


def query_train_transform(crop_size: int, scale: tuple[float, float]) -> v2.Compose:
    """The training mapper in the official order (resize, crop, colour, flip, pad), then
    ImageNet normalisation (the configs' ``PIXEL_MEAN`` / ``PIXEL_STD`` are its 0-255 values)."""
    return v2.Compose(
        [
            ResizeShortestEdge(short_sides(crop_size, *scale), 4 * crop_size),
            RandomCrop(crop_size),
            ColorAugSSD(),
            v2.RandomHorizontalFlip(),
            PadTo(crop_size),
            *to_float(),
        ]
    )


def query_test_transform(short: int, resize_labels: bool) -> v2.Compose:
    """The test: the image to short side ``short``, at most ``4 * short`` long (``MIN_SIZE_TEST``
    512, ``MAX_SIZE_TEST`` 2048), whole image, then normalisation. ``resize_labels``: the label
    too (CoMFormer's, ``label_resize="pil"``), else it keeps its size (Mask2Former's evaluator
    reads the label file, ``sem_seg_evaluation.py``, and the scores are upsampled to it)."""
    resize = ResizeShortestEdge([short], 4 * short, label_resize="pil" if resize_labels else "keep")
    return v2.Compose([resize, *to_float()])
