"""Convert the official MiB per-step index files into id lists shipped in the package.

Run once by a maintainer (not at run or test time):

    python tools/convert_mib_splits.py SHARED_DATA_DIR

``SHARED_DATA_DIR`` holds ``mib_splits/`` (``.npy`` index arrays from fcdl94/MiB, folder
``data/``) and ``reference_lists/`` (the VOC ``train_aug`` list, sorted by image id). VOC indices
point into ``train_aug`` sorted by id; ADE indices ``i`` name ``ADE_train_{i+1:08d}`` (see the
shared ``PROVENANCE.md``). Output: ``src/incseg/resources/splits/{voc,ade}.json.gz`` and the
VOC ``train_aug`` / ``val`` id lists.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "src" / "incseg" / "resources" / "splits"
VOC = {"19-1": "19-1", "15-5": "15-5", "15-5s": "15-1"}  # official folder -> incseg setting
ADE = {
    "100-50": "100-50",
    "100-10": "100-10",
    "50": "50-50",
    "100-50b": "100-50b",
    "100-10b": "100-10b",
    "50b": "50-50b",
}
SOURCE = "fcdl94/MiB data/ at commit 1c589833ce5c1a7446469d4602ceab2cdeac1b0e (train-<step>.npy)"


def _steps(folder: Path, names: list[str]) -> list[list[str]]:
    files = sorted(folder.glob("train-*.npy"), key=lambda p: int(p.stem.split("-")[1]))
    return [sorted(names[i] for i in np.load(f).tolist()) for f in files]


def _write(path: Path, payload: dict) -> None:
    path.write_bytes(gzip.compress(json.dumps(payload, separators=(",", ":")).encode(), mtime=0))
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def main(shared: Path) -> None:
    ref = shared / "reference_lists" / "voc2012" / "ImageSets"
    train_aug = sorted((ref / "SegmentationAug" / "train_aug.txt").read_text().split())
    val = sorted((ref / "Segmentation" / "val.txt").read_text().split())
    assert len(train_aug) == 10582 and len(val) == 1449
    voc = {}
    for folder, setting in VOC.items():
        for suffix, mode in (("", "disjoint"), ("-ov", "overlap")):
            voc[f"{setting}/{mode}"] = _steps(
                shared / "mib_splits" / "voc" / f"{folder}{suffix}", train_aug
            )
    _write(
        OUT / "voc.json.gz",
        {"source": SOURCE, "index_into": "train_aug sorted by id", "splits": voc},
    )
    ade_names = [f"ADE_train_{i + 1:08d}" for i in range(20210)]
    ade = {
        setting: _steps(shared / "mib_splits" / "ade" / folder, ade_names)
        for folder, setting in ADE.items()
    }
    _write(
        OUT / "ade.json.gz",
        {"source": SOURCE, "index_into": "ADE training images sorted by name", "splits": ade},
    )
    _write(
        OUT / "voc_lists.json.gz",
        {"source": "standard VOC2012 / SBD split lists", "train_aug": train_aug, "val": val},
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
