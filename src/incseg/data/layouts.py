"""Where Pascal VOC 2012 and ADE20K files live under a dataset root, and which ids each split has.

VOC (train = ``train_aug``, 10,582 ids with SBD labels; test = ``val``, 1,449 ids), two layouts:

* MiB layout: ``ROOT[/PascalVOC12]/{JPEGImages, SegmentationClassAug, splits/{train_aug,val}.txt}``,
  list lines ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` (paths relative to that folder);
* VOCdevkit layout: ``ROOT[/VOCdevkit/VOC2012]/{JPEGImages, SegmentationClassAug or
  SegmentationClass, ImageSets/Segmentation/{train_aug,val}.txt}`` with one id per line. When a
  list file is absent, the standard list shipped with incseg is used.

ADE20K SceneParsing: ``ROOT[/ADEChallengeData2016]/{images,annotations}/{training,validation}``,
pairs ``x.jpg`` / ``x.png`` (train = ``training``, test = ``validation``).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from incseg.errors import DataError

VOC_SPLITS = {"train": "train_aug", "test": "val"}
ADE_SPLITS = {"train": "training", "test": "validation"}
NUM_CLASSES = {"voc": 21, "ade": 151}  # valid label values: 0..NUM-1, plus 255 for VOC


@dataclass(frozen=True)
class Pairs:
    """The files of one split: ids (sorted) with their image and label paths.

    ``unpaired`` lists files found without their partner (ADE) and ``list_file`` names the list
    the ids came from (VOC; ``None`` when the shipped list was used).
    """

    names: list[str]
    images: list[Path]
    labels: list[Path]
    unpaired: list[Path]
    list_file: Path | None
    layout: str


@cache
def standard_voc_list(name: str) -> tuple[str, ...]:
    """The shipped standard ``train_aug`` (10,582) or ``val`` (1,449) id list."""
    raw = resources.files("incseg.resources").joinpath("splits", "voc_lists.json.gz").read_bytes()
    return tuple(json.loads(gzip.decompress(raw))[name])


def _first_dir(candidates: list[Path], marker: str) -> Path | None:
    return next((c for c in candidates if (c / marker).exists()), None)


def _root_error(root: Path, family: str, expected: str) -> DataError:
    if not root.exists():
        return DataError(
            f"data.root {root}: does not exist (expected a {family} dataset: {expected})"
        )
    return DataError(f"data.root {root}: no {family} dataset found; expected {expected}")


def voc_pairs(root: str | Path, split: str) -> Pairs:
    """The ``train`` (train_aug) or ``test`` (val) pairs of a VOC root, either layout."""
    root = Path(root)
    list_name = VOC_SPLITS[split]
    mib = _first_dir([root, root / "PascalVOC12"], "splits")
    if mib is not None:
        list_file = mib / "splits" / f"{list_name}.txt"
        if not list_file.is_file():
            raise DataError(f"{list_file}: missing (MiB layout: splits/{{train_aug,val}}.txt)")
        images, labels = [], []
        for number, line in enumerate(list_file.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise DataError(
                    f"{list_file}:{number}: expected '/JPEGImages/x.jpg /SegmentationClassAug/x.png', got {line!r}"
                )
            images.append(mib / parts[0].lstrip("/"))
            labels.append(mib / parts[1].lstrip("/"))
        order = sorted(range(len(images)), key=lambda i: images[i].stem)
        return Pairs(
            [images[i].stem for i in order],
            [images[i] for i in order],
            [labels[i] for i in order],
            [],
            list_file,
            "mib",
        )
    devkit = _first_dir([root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"], "JPEGImages")
    if devkit is None:
        raise _root_error(
            root,
            "Pascal VOC",
            "PascalVOC12/{JPEGImages,SegmentationClassAug,splits} "
            "or VOCdevkit/VOC2012/{JPEGImages,SegmentationClassAug,ImageSets}",
        )
    label_dir = devkit / "SegmentationClassAug"
    if not label_dir.is_dir():
        label_dir = devkit / "SegmentationClass"
    list_file = next(
        (
            p
            for p in (
                devkit / "ImageSets" / "Segmentation" / f"{list_name}.txt",
                devkit / "ImageSets" / "SegmentationAug" / f"{list_name}.txt",
            )
            if p.is_file()
        ),
        None,
    )
    ids = list_file.read_text().split() if list_file else list(standard_voc_list(list_name))
    ids = sorted(ids)
    return Pairs(
        ids,
        [devkit / "JPEGImages" / f"{i}.jpg" for i in ids],
        [label_dir / f"{i}.png" for i in ids],
        [],
        list_file,
        "vocdevkit",
    )


def ade_pairs(root: str | Path, split: str) -> Pairs:
    """The ``train`` (training) or ``test`` (validation) pairs of an ADE20K SceneParsing root."""
    root = Path(root)
    base = _first_dir([root, root / "ADEChallengeData2016"], "annotations")
    if base is None:
        raise _root_error(
            root, "ADE20K", "ADEChallengeData2016/{images,annotations}/{training,validation}"
        )
    folder = ADE_SPLITS[split]
    image_dir, label_dir = base / "images" / folder, base / "annotations" / folder
    for d in (image_dir, label_dir):
        if not d.is_dir():
            raise DataError(
                f"{d}: missing (ADE20K layout: {{images,annotations}}/{{training,validation}})"
            )
    images = {p.stem: p for p in image_dir.glob("*.jpg")}
    labels = {p.stem: p for p in label_dir.glob("*.png")}
    names = sorted(images.keys() & labels.keys())
    unpaired = sorted(
        [images[n] for n in images.keys() - labels.keys()]
        + [labels[n] for n in labels.keys() - images.keys()]
    )
    return Pairs(
        names, [images[n] for n in names], [labels[n] for n in names], unpaired, None, "ade"
    )


def dataset_pairs(family: str, root: str | Path, split: str) -> Pairs:
    """:func:`voc_pairs` or :func:`ade_pairs`."""
    return voc_pairs(root, split) if family == "voc" else ade_pairs(root, split)
