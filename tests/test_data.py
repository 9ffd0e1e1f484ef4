"""Paired transforms keep label values; a step dataset remaps labels by its lookup table."""

import numpy as np
import torch

from incseg.data import ShapesSource, StepDataset
from incseg.data.transforms import apply_pair, train_transform
from incseg.data.transforms import test_transform as eval_transform  # not collected by pytest
from incseg.protocol import get_setting, make_lut, step_info


def test_train_transform_keeps_label_values_and_pairs_geometry():
    torch.manual_seed(0)
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    label = torch.zeros(40, 60, dtype=torch.uint8)
    image[:, :, 30:] = 200  # right half bright, labelled 7; a void stripe
    label[:, 30:] = 7
    label[:, 29] = 255
    for _ in range(10):
        out_image, out_label = apply_pair(train_transform(32, (0.5, 2.0)), image, label)
        assert out_image.shape == (3, 32, 32) and out_image.dtype == torch.float32
        assert out_label.shape == (32, 32) and out_label.dtype == torch.uint8
        assert set(out_label.unique().tolist()) <= {0, 7, 255}
        bright = out_image.mean(0) > 1.0  # normalised value of 200/255 is about 1.5
        # Label and image sample the same pixel centres (PIL NEAREST / BILINEAR), so the first
        # column labelled 7 blends dark and bright; every column inside the region is bright.
        seven = out_label == 7
        inside = seven.clone()
        inside[:, 1:] &= seven[:, :-1]
        inside[:, :-1] &= seven[:, 1:]
        assert inside.any() and bright[inside].all()


def test_test_transform_full_image_and_centre_crop():
    image = torch.randint(0, 255, (3, 30, 50), dtype=torch.uint8)
    label = torch.randint(0, 21, (30, 50), dtype=torch.uint8)
    full_image, full_label = apply_pair(eval_transform(None), image, label)
    assert full_image.shape == (3, 30, 50) and torch.equal(full_label, label)
    crop_image, crop_label = apply_pair(eval_transform(20), image, label)
    assert crop_image.shape == (3, 20, 20) and crop_label.shape == (20, 20)


def test_step_dataset_remaps_with_the_lut():
    source = ShapesSource(30, 32, seed=0, split="train")
    info = step_info(get_setting("voc", "15-5"), 1)
    lut = make_lut(info, "train")
    indices = np.arange(10)
    dataset = StepDataset(source, indices, lut, eval_transform(None))
    for k in range(10):
        _, label = dataset[k]
        raw = source.labels[k]
        expected = torch.where(raw >= 16, raw, torch.zeros_like(raw))  # old classes -> 0
        assert torch.equal(label, expected.to(torch.uint8))
