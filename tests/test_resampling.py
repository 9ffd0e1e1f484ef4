"""Resampling equals the references' PIL pipeline bit for bit on the real fixtures.

MiB and PLOP (the same ``dataset/transform.py``) call torchvision's functional ops on PIL images:
``F.resize`` + ``F.center_crop`` at test, ``F.resized_crop`` in training, with ``Image.NEAREST`` for
labels and ``Image.BILINEAR`` for images, then ``F.to_tensor`` and ``F.normalize``. The references
below make those same calls on the PIL files; the crop box and the flip are recomputed from the seed
with torchvision's stock ``v2.RandomResizedCrop.make_params`` and the flip's ``torch.rand(1)`` draw.
"""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from conftest import ADE_ROOT, VOC_ROOT
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from incseg.data.files import read_image, read_label
from incseg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ToFloat,
    apply_pair,
    pil_nearest_source,
    resize_label,
    train_transform,
)
from incseg.data.transforms import test_transform as eval_transform  # not collected by pytest

VOC2012 = VOC_ROOT / "VOCdevkit" / "VOC2012"
LABELS = sorted((VOC2012 / "SegmentationClassAug").glob("*.png")) + sorted(
    (ADE_ROOT / "ADEChallengeData2016" / "annotations").glob("*/*.png")
)
PAIRED = LABELS[::3]  # 6 VOC + 2 ADE images for the (slower) float image checks


def _image_of(label_path):
    if label_path.parent.name == "SegmentationClassAug":
        return VOC2012 / "JPEGImages" / f"{label_path.stem}.jpg"
    return (
        ADE_ROOT
        / "ADEChallengeData2016"
        / "images"
        / label_path.parent.name
        / f"{label_path.stem}.jpg"
    )


def _pil_array(img):
    return torch.from_numpy(np.array(img, dtype=np.uint8))


def _seeded_draws(shape, seed, size, scale):
    """Crop box and flip that a seeded ``train_transform`` draws, with stock torchvision."""
    stock = v2.RandomResizedCrop(size, scale=scale, ratio=(3 / 4, 4 / 3))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        box = stock.make_params([tv_tensors.Mask(torch.zeros(shape, dtype=torch.uint8))])
        flip = torch.rand(1).item() < 0.5  # v2.RandomHorizontalFlip flips when rand(1) < p
    return (box["top"], box["left"], box["height"], box["width"]), flip


def _seeded(transform, image, label, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return apply_pair(transform, image, label)


def test_fixtures_are_present():
    assert len(LABELS) == 22 and all(_image_of(p).is_file() for p in LABELS)


def test_nearest_source_index_equals_pil():
    # A one-row int32 image holding its own column numbers: PIL's NEAREST output is the index.
    rng = np.random.default_rng(0)
    pairs = [
        (n, m) for n in (1, 2, 3, 7, 333, 375, 500, 683) for m in (1, 2, 33, 48, 321, 512, 1000)
    ]
    pairs += [tuple(int(v) for v in rng.integers(1, 2500, size=2)) for _ in range(300)]
    for n, m in pairs:
        row = Image.fromarray(np.arange(n, dtype=np.int32)[None, :], mode="I")
        expected = np.array(row.resize((m, 1), Image.Resampling.NEAREST))[0]
        np.testing.assert_array_equal(pil_nearest_source(n, m), expected, err_msg=f"{n}->{m}")


@pytest.mark.parametrize("size", [(512, 512), (321, 500), (33, 47), (700, 999), (375, 500)])
def test_whole_label_resize_equals_pil_nearest(size):
    for path in LABELS:
        label = torch.from_numpy(read_label(path))
        with Image.open(path) as pil:
            expected = _pil_array(pil.resize((size[1], size[0]), Image.Resampling.NEAREST))
        assert torch.equal(resize_label(label, size), expected), path.name


@pytest.mark.parametrize("size", [512, 321, 257, 33])
def test_test_transform_labels_equal_pil_nearest(size):
    geometry = v2.Compose(eval_transform(size).transforms[:2])  # resize + centre crop, no image
    for path in LABELS:
        out = geometry(tv_tensors.Mask(torch.from_numpy(read_label(path)))).as_subclass(
            torch.Tensor
        )
        with Image.open(path) as pil:
            resized = TF.resize(pil, size, Image.Resampling.NEAREST)
            expected = _pil_array(TF.center_crop(resized, size))
        assert torch.equal(out, expected), f"{path.name} at {size}"


def test_full_image_test_transform_keeps_every_label_pixel():
    for path in LABELS:
        label = torch.from_numpy(read_label(path))
        out = eval_transform(None)(tv_tensors.Mask(label)).as_subclass(torch.Tensor)
        assert torch.equal(out, label)


@pytest.mark.parametrize("size, scale", [(512, (0.5, 2.0)), (321, (0.5, 2.0)), (33, (0.05, 1.0))])
def test_train_crop_labels_equal_pil_crop_then_nearest(size, scale):
    geometry = v2.Compose(train_transform(size, scale).transforms[:2])  # crop + flip, no image
    for path in LABELS:
        label = torch.from_numpy(read_label(path))
        for seed in range(3):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out = geometry(tv_tensors.Mask(label)).as_subclass(torch.Tensor)
            (top, left, height, width), flip = _seeded_draws(label.shape, seed, size, scale)
            with Image.open(path) as pil:
                ref = TF.resized_crop(pil, top, left, height, width, [size, size], Image.NEAREST)
            expected = _pil_array(TF.hflip(ref) if flip else ref)
            assert torch.equal(out, expected), f"{path.name} size {size} seed {seed}"


def _reference_image(pil):
    return TF.normalize(TF.to_tensor(pil), IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("size", [512, 321])
def test_train_transform_pairs_equal_the_pil_pipeline(size):
    transform = train_transform(size)
    for path in PAIRED:
        image_path = _image_of(path)
        image, label = read_image(image_path), torch.from_numpy(read_label(path))
        for seed in (0, 1):
            out_image, out_label = _seeded(transform, image, label, seed)
            (top, left, height, width), flip = _seeded_draws(label.shape, seed, size, (0.5, 2.0))
            with Image.open(image_path) as pil_image, Image.open(path) as pil_label:
                ref_image = TF.resized_crop(
                    pil_image.convert("RGB"), top, left, height, width, [size, size], Image.BILINEAR
                )
                ref_label = TF.resized_crop(
                    pil_label, top, left, height, width, [size, size], Image.NEAREST
                )
            if flip:
                ref_image, ref_label = TF.hflip(ref_image), TF.hflip(ref_label)
            assert torch.equal(out_label, _pil_array(ref_label)), f"{path.name} seed {seed}"
            assert torch.equal(out_image, _reference_image(ref_image)), f"{path.name} seed {seed}"


@pytest.mark.parametrize("size", [512, 257])
def test_test_transform_images_equal_the_pil_pipeline(size):
    transform = eval_transform(size)
    for path in PAIRED:
        image_path = _image_of(path)
        image, label = read_image(image_path), torch.from_numpy(read_label(path))
        out_image, _ = apply_pair(transform, image, label)
        with Image.open(image_path) as pil:
            resized = TF.resize(pil.convert("RGB"), size, Image.BILINEAR)
            expected = _reference_image(TF.center_crop(resized, size))
        assert torch.equal(out_image, expected), path.name


def test_to_float_divides_by_255_like_to_tensor():
    values = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, 16, 16).contiguous()
    out = ToFloat()(tv_tensors.Image(values)).as_subclass(torch.Tensor)
    expected = TF.to_tensor(Image.fromarray(values.permute(1, 2, 0).numpy()))
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert torch.equal(ToFloat()(values), expected)  # a plain tensor is an image too (predict)
    mask = tv_tensors.Mask(values[0])
    assert ToFloat()(mask) is mask
