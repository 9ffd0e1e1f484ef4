"""``incseg data check``: validate a VOC or ADE20K root and report every problem with file names.

Checks, for the train and test splits: the layout and lists are found; every listed image and
label exists (and, for ADE20K, every file has its partner); every image decodes completely
(truncated JPEGs are caught); every label is a class-id PNG with values in the class range (VOC
0..20 and 255, ADE20K 0..150) and the size of its image. The class index of the intact pairs is
then stored in the cache, images per class are printed, and for VOC the shipped official lists
are compared with the selection rule on the images present.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from incseg.data.files import parallel_map, read_label, store_index
from incseg.data.layouts import NUM_CLASSES, dataset_pairs
from incseg.errors import DataError
from incseg.protocol import get_setting, select_train, step_info
from incseg.protocol.official import official_settings, official_split
from incseg.protocol.selection import NUM_LABEL_VALUES

log = logging.getLogger(__name__)


@dataclass
class CheckReport:
    """Problems found (``(path, what)``), and per split the names and presence of intact pairs."""

    problems: list[tuple[Path, str]] = field(default_factory=list)
    names: dict[str, list[str]] = field(default_factory=dict)
    presence: dict[str, np.ndarray] = field(default_factory=dict)
    split_mismatches: list[str] = field(default_factory=list)
    split_checks: int = 0


def _valid_values(family: str) -> np.ndarray:
    valid = np.zeros(NUM_LABEL_VALUES, dtype=bool)
    valid[: NUM_CLASSES[family]] = True
    valid[255] = family == "voc"
    return valid


def inspect_pair(job: tuple[str, str, str]) -> tuple[np.ndarray | None, list[tuple[str, str]]]:
    """Decode one image / label pair completely; return its presence row (``None`` if broken) and
    its problems as ``(path, what)``."""
    image_path, label_path, family = job
    problems: list[tuple[str, str]] = []
    size = None
    try:
        with Image.open(image_path) as img:
            img.load()  # decodes every byte: a truncated file raises here
            size = img.size[::-1]
    except (OSError, SyntaxError, ValueError) as err:
        problems.append((image_path, f"unreadable or truncated image ({err})"))
    try:
        label = read_label(Path(label_path))
    except DataError as err:
        return None, [*problems, (label_path, str(err).split(": ", 1)[-1])]
    except (OSError, SyntaxError, ValueError) as err:
        return None, [*problems, (label_path, f"unreadable or truncated label ({err})")]
    row = np.bincount(label.ravel(), minlength=NUM_LABEL_VALUES) > 0
    bad = np.flatnonzero(row & ~_valid_values(family))
    if len(bad):
        allowed = "0..20 and 255" if family == "voc" else "0..150"
        problems.append(
            (label_path, f"label values {bad.tolist()} outside the class range ({allowed})")
        )
    if size is not None and tuple(label.shape) != tuple(size):
        problems.append(
            (
                label_path,
                f"label size {tuple(label.shape)} differs from image {image_path} {tuple(size)} (H, W)",
            )
        )
    return (None if problems else row), problems


def check_dataset(family: str, root: str | Path, *, progress: bool = True) -> CheckReport:
    """Run every check of this module on ``root``; nothing is modified except the index cache."""
    report = CheckReport()
    for split in ("train", "test"):
        pairs = dataset_pairs(family, root, split)
        log.info(
            f"{split}: {len(pairs.names)} ids ({pairs.layout} layout, "
            f"list: {pairs.list_file or 'shipped standard list'})"
        )
        report.problems += [(p, "no matching image or label") for p in pairs.unpaired]
        jobs, kept = [], []
        for name, image, label in zip(pairs.names, pairs.images, pairs.labels, strict=True):
            missing = [
                (p, f"missing {kind} of {name}")
                for p, kind in ((image, "image"), (label, "label"))
                if not p.is_file()
            ]
            report.problems += missing
            if not missing:
                jobs.append((str(image), str(label), family))
                kept.append(name)
        rows, names = [], []
        results = parallel_map(
            inspect_pair,
            jobs,
            desc=f"checking {split}",
            unit="pair",
            progress=progress,
            chunksize=32,
        )
        for name, (row, problems) in zip(kept, results, strict=True):
            report.problems += [(Path(p), what) for p, what in problems]
            if row is not None:
                rows.append(row)
                names.append(name)
        presence = np.stack(rows) if rows else np.zeros((0, NUM_LABEL_VALUES), dtype=bool)
        report.names[split], report.presence[split] = names, presence
        if len(names) == len(pairs.names) and names:
            store_index(pairs.labels, f"{family}-{split}", presence)
    if family == "voc":
        _compare_official(report)
    return report


def _compare_official(report: CheckReport) -> None:
    """For every shipped VOC list, does the rule select exactly the listed images present?"""
    names, presence = report.names["train"], report.presence["train"]
    for key in official_settings("voc"):
        setting_name, mode = key.split("/")
        setting = get_setting("voc", setting_name)
        for step, listed in enumerate(official_split("voc", setting_name, mode)):
            ruled = {names[i] for i in select_train(presence, step_info(setting, step), mode)}
            listed_here = set(listed) & set(names)
            report.split_checks += len(names)
            for name in sorted(ruled ^ listed_here):
                where = "rule only" if name in ruled else "official list only"
                report.split_mismatches.append(f"{key} step {step}: {name} ({where})")


def class_table(family: str, report: CheckReport) -> str:
    """Images per class in each split, as a text table."""
    names = get_setting(family, "offline").class_names
    lines = [f"  {'id':>3}  {'class':<20} {'train':>6} {'test':>6}"]
    train, test = (report.presence[s].sum(axis=0) for s in ("train", "test"))
    for cid, name in enumerate(names):
        lines.append(f"  {cid:>3}  {name:<20} {int(train[cid]):>6} {int(test[cid]):>6}")
    return "\n".join(lines)
