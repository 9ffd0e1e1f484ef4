"""The built-in shapes dataset: deterministic, all classes, co-occurring objects."""

import numpy as np
import torch

from incseg.data import ShapesSource
from incseg.protocol import get_setting, select_train, step_info


def test_deterministic_from_seed_and_split():
    a = ShapesSource(20, 32, seed=3, split="train")
    b = ShapesSource(20, 32, seed=3, split="train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, ShapesSource(20, 32, seed=4, split="train").labels)
    assert not torch.equal(a.labels, ShapesSource(20, 32, seed=3, split="test").labels)
    image, label = a.load(0)
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert label.shape == (32, 32) and label.dtype == torch.uint8


def test_classes_present_and_background_shift_in_overlap():
    source = ShapesSource(300, 48, seed=0, split="train")
    presence = source.presence()
    assert set(np.flatnonzero(presence.any(0)).tolist()) == set(range(21))
    counts = presence[:, 1:21].sum(1)
    assert counts.min() >= 1 and counts.max() <= 4
    info = step_info(get_setting("voc", "15-5"), 1)
    step1 = select_train(presence, info, "overlap")
    with_old = presence[step1][:, 1:16].any(1)
    assert 0.2 < with_old.mean() < 1.0  # many step-1 images show old objects (labelled background)


def test_classes_differ_in_appearance():
    source = ShapesSource(200, 48, seed=1, split="train")
    means = []
    for cls in (1, 11):  # same shape, opposite hue
        pixels = source.images.permute(0, 2, 3, 1)[source.labels == cls].float()
        means.append(pixels.mean(0))
    assert (means[0] - means[1]).abs().max() > 60
