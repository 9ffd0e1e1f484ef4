"""Data-path benchmarks: label remapping, class-index build, step selection, metric update.

Each has its naive baseline in the same run (what reference code does), so the ratio holds on a
noisy machine.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import Figure, median_time
from incseg.data import files
from incseg.metrics import confusion_matrix
from incseg.protocol import (
    get_setting,
    make_lut,
    remap,
    select_test,
    select_train,
    setting_names,
    step_info,
)
from incseg.protocol.selection import pack_presence

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
VOC_LABEL = FIXTURES / "voc" / "VOCdevkit" / "VOC2012" / "SegmentationClassAug" / "2007_000904.png"


def bench_remap() -> list[Figure]:
    """VOC 15-1 step 1: a 500x375 label through the LUT vs a Python call per pixel
    (``Tensor.apply_``, as the official MiB code's target transform does)."""
    label = torch.from_numpy(files.read_label(VOC_LABEL))
    assert label.shape == (375, 500)
    info = step_info(get_setting("voc", "15-1"), 1)
    out = []
    for split in ("train", "test"):
        lut = make_lut(info, split)
        table = lut.tolist()

        def per_pixel(table=table):
            return label.clone().apply_(lambda v: table[v])

        fast = median_time(lambda lut=lut: remap(label, lut), repeats=50)
        slow = median_time(per_pixel, repeats=3)
        assert torch.equal(remap(label, lut), per_pixel())
        out += [
            Figure(f"remap_{split}_lut", fast * 1e6, "us", "1 label 500x375"),
            Figure(f"remap_{split}_per_pixel_python", slow * 1e6, "us", "1 label 500x375"),
            Figure(f"remap_{split}_speedup", slow / fast, "x", "ratio"),
        ]
    return out


def _label_files(folder: Path, count: int) -> list[Path]:
    """``count`` distinct label PNGs (copies of the real VOC fixture labels)."""
    sources = sorted(
        (FIXTURES / "voc" / "VOCdevkit" / "VOC2012" / "SegmentationClassAug").glob("*.png")
    )
    paths = []
    for i in range(count):
        path = folder / f"{i:06d}.png"
        path.write_bytes(sources[i % len(sources)].read_bytes())
        paths.append(path)
    return paths


def bench_class_index(count: int = 1000) -> list[Figure]:
    """Class index from label PNGs only (parallel) vs decoding image and label per sample."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = _label_files(Path(tmp), count)
        fast = median_time(lambda: files.scan_labels(paths, progress=False), repeats=3)
        images = sorted((FIXTURES / "voc" / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))

        def naive():
            for i, path in enumerate(paths[:200]):  # image + label decode, as a dataset item would
                files.read_image(images[i % len(images)])
                np.unique(np.array(Image.open(path)))

        slow = median_time(naive, repeats=3, warmup=0) * count / 200
    return [
        Figure("class_index_labels_only", fast * 1000 / count, "s", "1000 labels"),
        Figure("class_index_decode_image_and_label", slow * 1000 / count, "s", "1000 labels"),
        Figure("class_index_speedup", slow / fast, "x", "ratio"),
    ]


def _ade_like_index(num: int = 20210, seed: int = 0) -> np.ndarray:
    """A (N, 256) index shaped like ADE20K's: 0 in every image, ~9 of 150 classes per image."""
    rng = np.random.default_rng(seed)
    presence = np.zeros((num, 256), dtype=bool)
    presence[:, 0] = True
    popularity = 1.0 / np.arange(1, 151) ** 0.8
    popularity /= popularity.sum()
    for i in range(num):
        presence[i, 1 + rng.choice(150, size=rng.integers(2, 16), replace=False, p=popularity)] = (
            True
        )
    return presence


def bench_selection() -> list[Figure]:
    """Every ADE setting, mode and step (train + test) selected from the cached index vs a Python
    scan over image class sets per step."""
    presence = _ade_like_index()
    t_pack = median_time(lambda: pack_presence(presence), repeats=5)
    words = pack_presence(presence)
    jobs = [
        (step_info(get_setting("ade", name), t), mode)
        for name in setting_names("ade")
        if name != "offline"
        for t in range(get_setting("ade", name).num_steps)
        for mode in ("disjoint", "overlap")
    ]

    def fast():
        for info, mode in jobs:
            select_train(words, info, mode)
            select_test(words, info)

    class_sets = [set(np.flatnonzero(row).tolist()) - {0, 255} for row in presence]

    def naive(info, mode):
        new, allowed = set(info.new_classes), set(info.old_classes) | set(info.new_classes)
        return [
            i for i, c in enumerate(class_sets) if c & new and (mode == "overlap" or c <= allowed)
        ]

    info, mode = jobs[0]
    np.testing.assert_array_equal(select_train(presence, info, mode), naive(info, mode))
    t_fast = median_time(fast, repeats=3)
    t_scan = (
        median_time(lambda: [naive(i, m) for i, m in jobs[:6]], repeats=3, warmup=0) * len(jobs) / 6
    )
    # The reference code re-reads every label for every step: decode cost per label (real VOC
    # fixture labels, one process) times 20,210 labels, per step, plus the scan.
    labels = sorted(
        (FIXTURES / "voc" / "VOCdevkit" / "VOC2012" / "SegmentationClassAug").glob("*.png")
    )
    t_decode = median_time(
        lambda: [np.unique(files.read_label(p)) for p in labels], repeats=3
    ) / len(labels)
    t_rescan = t_decode * len(presence) * len(jobs) + t_scan
    return [
        Figure("selection_pack_index", t_pack * 1e3, "ms", "20210 images, once per run"),
        Figure(
            "selection_all_ade_steps",
            t_fast,
            "s",
            f"{len(jobs)} steps x (train+test), 20210 images",
        ),
        Figure("selection_per_step", t_fast / len(jobs) * 1e3, "ms", "1 step, 20210 images"),
        Figure(
            "selection_python_scan_all_steps",
            t_scan,
            "s",
            f"{len(jobs)} steps, class sets precomputed",
        ),
        Figure("selection_speedup_vs_python_scan", t_scan / t_fast, "x", "ratio"),
        Figure(
            "selection_rescan_labels_all_steps",
            t_rescan,
            "s",
            f"{len(jobs)} steps, labels re-decoded per step (projected)",
        ),
        Figure("selection_speedup_vs_rescan", t_rescan / t_fast, "x", "ratio"),
    ]


def bench_metric(device: str = "cpu") -> list[Figure]:
    """Confusion-matrix update, 4 x 512x512, 21 classes: torch bincount vs NumPy per image."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 21, (4, 512, 512), generator=gen)
    target[:, :20] = 255
    target = target.to(torch.uint8)  # as the loader delivers it; predictions are argmax's int64
    pred = torch.randint(0, 21, (4, 512, 512), generator=gen)
    fast = median_time(lambda: confusion_matrix(pred, target, 21), repeats=10)
    p_np, t_np = pred.numpy(), target.numpy()

    def naive():
        total = np.zeros((21, 21), dtype=np.int64)
        for p, t in zip(p_np, t_np, strict=True):
            keep = t != 255
            total += np.bincount(
                21 * t[keep].astype(np.int64) + p[keep], minlength=21 * 21
            ).reshape(21, 21)
        return total

    np.testing.assert_array_equal(confusion_matrix(pred, target, 21).numpy(), naive())
    slow = median_time(naive, repeats=10)
    return [
        Figure("metric_update_torch", fast * 1e3, "ms", "4 x 512x512, 21 classes"),
        Figure("metric_update_numpy_per_image", slow * 1e3, "ms", "4 x 512x512, 21 classes"),
        Figure("metric_update_speedup", slow / fast, "x", "ratio"),
    ]


BENCHMARKS = {
    "remap": bench_remap,
    "class_index": bench_class_index,
    "selection": bench_selection,
    "metric": bench_metric,
}


def bench_loader(epochs: int = 3) -> list[Figure]:
    """Training-loader throughput (images/s) on the real VOC fixture images: decode, random resized
    crop 512, flip, normalise, LUT remap; 0 and 2 worker processes."""
    from torch.utils.data import DataLoader

    from incseg.data import StepDataset
    from incseg.data.layouts import voc_pairs
    from incseg.data.transforms import train_transform

    pairs = voc_pairs(FIXTURES / "voc", "train")
    source = files.FileSource(pairs.names, pairs.images, pairs.labels, tag="bench", progress=False)
    lut = make_lut(step_info(get_setting("voc", "15-5"), 0), "train")
    dataset = StepDataset(source, np.arange(len(source)), lut, train_transform(512))
    out = []
    for workers in (0, 2):
        loader = DataLoader(
            dataset, batch_size=4, shuffle=True, num_workers=workers, persistent_workers=workers > 0
        )

        def run(loader=loader):
            for _ in range(epochs):
                for _batch in loader:
                    pass

        seconds = median_time(run, repeats=3)
        out.append(
            Figure(
                f"loader_images_per_s_{workers}_workers",
                epochs * len(dataset) / seconds,
                "images/s",
                "VOC fixture (500x375-ish JPEG), crop 512, batch 4",
            )
        )
    return out


BENCHMARKS["loader"] = bench_loader
