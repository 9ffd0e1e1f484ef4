"""The Mask2Former recipe's transforms (``data.pipeline: mask2former``) against re-statements of
detectron2's ``ResizeShortestEdge`` / ``ResizeTransform`` / ``RandomCrop`` and PointRend's
``ColorAugSSDTransform`` (detectron2 02b5c4e), hand cases, the model's padding to 32, the config
checks and a run through the command line on real VOC images of different sizes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import VOC_ROOT
from helpers.method_runs import run_method
from PIL import Image
from test_query_model import M2F_SETS, model
from torchvision import tv_tensors

from incseg.config import load_config
from incseg.data import build_source
from incseg.data import query_transforms as qt
from incseg.data.transforms import apply_pair
from incseg.engine.loaders import build_test_loader
from incseg.errors import ConfigError
from incseg.protocol import get_setting, step_info


def official_output_shape(oldh, oldw, short_edge_length, max_size):
    """detectron2 ``augmentation_impl.py:181-200``, restated."""
    h, w = oldh, oldw
    size = short_edge_length * 1.0
    scale = size / min(h, w)
    if h < w:
        newh, neww = size, scale * w
    else:
        newh, neww = scale * h, size
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh = newh * scale
        neww = neww * scale
    neww = int(neww + 0.5)
    newh = int(newh + 0.5)
    return (newh, neww)


def official_resize(img, new_h, new_w, nearest):
    """detectron2 ``ResizeTransform.apply_image`` (``transform.py:112-147``), restated."""
    if img.dtype == np.uint8:
        pil = Image.fromarray(img)
        return np.asarray(pil.resize((new_w, new_h), Image.NEAREST if nearest else Image.BILINEAR))
    t = torch.from_numpy(img)
    shape = list(t.shape)
    shape_4d = shape[:2] + [1] * (4 - len(shape)) + shape[2:]
    t = t.view(shape_4d).permute(2, 3, 0, 1)
    t = F.interpolate(t, (new_h, new_w), mode="nearest", align_corners=None)
    shape[:2] = (new_h, new_w)
    return t.permute(2, 3, 0, 1).view(shape).numpy()


class ScriptedRandom:
    """Stands for Python's ``random`` in the official colour augmentation: answers from a list."""

    def __init__(self, answers):
        self.answers = list(answers)

    def _next(self):
        return self.answers.pop(0)

    def randrange(self, n):
        return self._next()

    def uniform(self, a, b):
        return self._next()

    def randint(self, a, b):
        return self._next()


def official_color_aug(img, rnd):
    """``ColorAugSSDTransform.apply_image`` (``color_augmentation.py:49-98``) on RGB, restated."""
    import cv2

    def convert(img, alpha=1, beta=0):
        img = img.astype(np.float32) * alpha + beta
        img = np.clip(img, 0, 255)
        return img.astype(np.uint8)

    def brightness(img):
        if rnd.randrange(2):
            return convert(img, beta=rnd.uniform(-32, 32))
        return img

    def contrast(img):
        if rnd.randrange(2):
            return convert(img, alpha=rnd.uniform(0.5, 1.5))
        return img

    def saturation(img):
        if rnd.randrange(2):
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            img[:, :, 1] = convert(img[:, :, 1], alpha=rnd.uniform(0.5, 1.5))
            return cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        return img

    def hue(img):
        if rnd.randrange(2):
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            img[:, :, 0] = (img[:, :, 0].astype(int) + rnd.randint(-18, 18)) % 180
            return cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        return img

    img = img[:, :, [2, 1, 0]]
    img = brightness(img)
    if rnd.randrange(2):
        img = hue(saturation(contrast(img)))
    else:
        img = contrast(hue(saturation(img)))
    return img[:, :, [2, 1, 0]]


def test_short_sides_are_the_ade20k_config_list():
    expected = [int(x * 0.1 * 512) for x in range(5, 21)]
    assert qt.short_sides(512, 0.5, 2.0) == expected
    assert expected[:3] == [256, 307, 358] and expected[-1] == 1024


def test_output_shape_matches_detectron2_and_hand_cases():
    assert qt.shortest_edge_shape(480, 640, 256, 2048) == (256, 341)  # 640 * 256 / 480 = 341.3
    assert qt.shortest_edge_shape(100, 1000, 512, 2048) == (205, 2048)  # long side capped: 204.8
    assert qt.shortest_edge_shape(333, 333, 307, 2048) == (307, 307)
    rng = random.Random(0)
    for _ in range(500):
        h, w, s = rng.randint(20, 3000), rng.randint(20, 3000), rng.choice([256, 307, 1024])
        assert qt.shortest_edge_shape(h, w, s, 2048) == official_output_shape(h, w, s, 2048)


def test_resizing_follows_detectron2_for_images_and_both_label_paths():
    gen = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=gen)
    label = torch.randint(0, 151, (37, 53), dtype=torch.uint8, generator=gen)
    size = qt.shortest_edge_shape(37, 53, 61, 2048)
    hwc = image.permute(1, 2, 0).numpy()
    for mode, official_label in (
        ("torch", official_resize(label.numpy().astype("double"), *size, nearest=True)),
        ("pil", official_resize(label.numpy(), *size, nearest=True)),
    ):
        resize = qt.ResizeShortestEdge([61], 2048, label_resize=mode)
        out_image, out_label = apply_pair(resize, image, label)
        np.testing.assert_array_equal(out_label.numpy(), official_label.astype(np.uint8))
        np.testing.assert_array_equal(
            out_image.permute(1, 2, 0).numpy(), official_resize(hwc, *size, nearest=False)
        )
    # the two label paths differ (why the test resize is PIL's: the official reads uint8 there)
    torch_path = official_resize(label.numpy().astype("double"), *size, nearest=True)
    assert (torch_path != official_resize(label.numpy(), *size, nearest=True)).any()


def test_colour_augmentation_equals_the_official_draw_for_draw(monkeypatch):
    image = np.asarray(Image.open(next((VOC_ROOT / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg"))))
    image = np.ascontiguousarray(image[:60, :80])
    scripts = [
        # brightness, order, then contrast / saturation / hue coins with their values
        [1, 12.7, 1, 1, 1.31, 1, 0.62, 1, -7],  # every draw taken, contrast first
        [1, -25.3, 0, 1, 1.44, 1, 17, 1, 0.55],  # saturation, hue, contrast
        [0, 0, 0, 1, 0.5, 0],  # brightness and saturation skipped
        [1, 31.9, 1, 0, 0, 1, -18],
    ]
    for script in scripts:
        official = official_color_aug(image.copy(), ScriptedRandom(script))
        answers = list(script)
        pop = answers.pop
        monkeypatch.setattr(qt, "_coin", lambda pop=pop: bool(pop(0)))
        monkeypatch.setattr(qt, "_uniform", lambda a, b, pop=pop: pop(0))
        monkeypatch.setattr(qt, "_randint", lambda a, b, pop=pop: pop(0))
        mine = qt.ColorAugSSD()(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)))
        assert answers == []
        np.testing.assert_array_equal(mine.permute(1, 2, 0).numpy(), official)
        assert (official != image).any()


def test_colour_draws_have_the_official_ranges():
    torch.manual_seed(0)
    values = [qt._uniform(-32, 32) for _ in range(2000)]
    shifts = {qt._randint(-18, 18) for _ in range(2000)}
    assert -32 <= min(values) < -31 and 31 < max(values) < 32
    assert shifts == set(range(-18, 19))
    assert 900 < sum(qt._coin() for _ in range(2000)) < 1100


def test_random_crop_is_inside_and_at_most_the_crop_size():
    crop = qt.RandomCrop(64)
    torch.manual_seed(0)
    boxes = set()
    for _ in range(200):
        box = crop.make_params([tv_tensors.Image(torch.zeros(3, 50, 90, dtype=torch.uint8))])["box"]
        top, left, h, w = box
        assert (h, w) == (50, 64) and top == 0 and 0 <= left <= 26
        boxes.add(left)
    assert boxes == set(range(27))  # every window position drawn


def test_padding_fills_images_with_128_and_labels_with_255_saliency_with_0():
    pad = qt.PadTo(8)
    image = tv_tensors.Image(torch.full((3, 5, 6), 7, dtype=torch.uint8))
    label = tv_tensors.Mask(torch.full((2, 5, 6), 9, dtype=torch.uint8))
    out_image, out_label = pad(image, label)
    assert out_image.shape == (3, 8, 8) and (out_image[:, 5:] == 128).all()
    assert (out_image[:, :5, 6:] == 128).all() and (out_image[:, :5, :6] == 7).all()
    assert (out_label[0, 5:] == 255).all() and (out_label[1, 5:] == 0).all()
    with pytest.raises(ValueError, match="larger"):
        qt.PadTo(4)(image)


def test_the_training_pipeline_keeps_labels_and_pads_to_the_crop():
    root = VOC_ROOT / "VOCdevkit/VOC2012"
    name = min((root / "SegmentationClassAug").glob("*.png")).stem
    image = torch.from_numpy(np.array(Image.open(root / f"JPEGImages/{name}.jpg"))).permute(2, 0, 1)
    label = torch.from_numpy(np.array(Image.open(root / f"SegmentationClassAug/{name}.png")))
    transform = qt.query_train_transform(256, (0.5, 2.0))
    outs = []
    for seed in (0, 0, 1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            outs.append(apply_pair(transform, image.contiguous(), label))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    assert not torch.equal(outs[0][1], outs[2][1])
    for out_image, out_label in outs:
        assert out_image.shape == (3, 256, 256) and out_image.dtype == torch.float32
        assert set(out_label.unique().tolist()) <= set(label.unique().tolist()) | {255}


def test_the_model_scores_padded_images_and_crops_the_padding():
    net = model((16, 5))
    images = torch.randn(2, 3, 40, 70)
    with torch.no_grad():
        out = net(images)
        scores = net.prediction_scores(out)
        padded = net(F.pad(images, (0, 26, 0, 24)))
        full = net.prediction_scores(padded)
    assert out.size == (40, 70) and out.padded == (64, 96) and scores.shape[-2:] == (40, 70)
    torch.testing.assert_close(scores, full[..., :40, :70], rtol=0, atol=0)
    net.train()
    with pytest.raises(ValueError, match="divisible by 32"):
        net(images)


def test_the_pipeline_config_checks(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {pipeline: mask2former}\n")
    assert load_config(path).data.pipeline == "mask2former"
    with pytest.raises(
        ConfigError, match="data.test_crop: 512; data.pipeline mask2former .* leave"
    ):
        load_config(path, ["data.test_crop=512"])
    with pytest.raises(ConfigError, match="data.scale_min: 0.55; .* multiples of 0.1"):
        load_config(path, ["data.scale_min=0.55", "data.pipeline=comformer"])
    with pytest.raises(ConfigError, match="data.pipeline.*'mib', 'mask2former', 'comformer'"):
        load_config(path, ["data.pipeline=detectron2"])
    path.write_text("model: {architecture: mask2former}\nmethod: {name: m2f_ft}\n")
    with pytest.raises(ConfigError, match="data.crop_size: 48; .* divide by 32"):
        load_config(path, ["data.crop_size=48"])


@pytest.mark.parametrize("pipeline", ["comformer", "mask2former"])
def test_a_mask2former_run_on_real_images_of_different_sizes(tmp_path, pipeline):
    config = tmp_path / "voc.yaml"
    config.write_text(
        f'data: {{dataset: voc, root: "{VOC_ROOT}", crop_size: 64, pipeline: {pipeline}}}\n'
        "protocol: {setting: 15-5, mode: overlap, last_step: 0}\n"
        "model: {backbone: tiny, norm: bn}\n"
        "train: {epochs: 1, batch_size: 4, eval_batch_size: 3}\n"
    )
    out = tmp_path / "run"
    run_method(config, out, *M2F_SETS)
    step = json.loads((out / "metrics.json").read_text())["steps"][0]
    assert step["num_test_images"] == 4 and len(step["per_class"]) == 16
    saved = load_config(out / "config.yaml")
    assert saved.data.pipeline == pipeline and saved.data.test_crop is None
    source = build_source(saved.data, "test")
    loader = build_test_loader(
        saved, source, source.presence(), step_info(get_setting("voc", "15-5"), 0)
    )
    pairs = [(tuple(image.shape[-2:]), tuple(label.shape[-2:])) for image, label in loader]
    assert loader.batch_size == 1 and len(set(pairs)) > 1  # whole images, one per batch
    assert all(min(i) == 64 and max(i) % 32 for i, _ in pairs)  # short side 64, padded by the model
    if pipeline == "comformer":  # labels resized with the image
        assert all(i == lab for i, lab in pairs)
    else:  # labels at their size (VOC's ~500 px), the scores upsampled to them
        assert all(min(lab) > 64 for _, lab in pairs)
