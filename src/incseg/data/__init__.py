"""Datasets: sources of image/label pairs, step views, transforms."""

from pathlib import Path

from incseg.data.datasets import Source, StepDataset
from incseg.data.files import FileSource
from incseg.data.layouts import dataset_pairs
from incseg.data.synthetic import ShapesSource
from incseg.errors import DataError

__all__ = ["FileSource", "ShapesSource", "Source", "StepDataset", "build_source"]


def build_source(config, split: str, *, progress: bool = True) -> Source:
    """The ``"train"`` or ``"test"`` source of ``config.data`` (a :class:`incseg.config.DataConfig`).

    Raises:
        DataError: the dataset root, a list or a listed file is missing, or files are unpaired.
    """
    if config.dataset == "shapes":
        num = config.num_train if split == "train" else config.num_test
        return ShapesSource(num, config.image_size, config.seed, split)
    pairs = dataset_pairs(config.dataset, config.root, split)
    if pairs.unpaired:
        shown = ", ".join(str(p) for p in pairs.unpaired[:5])
        raise DataError(
            f"{len(pairs.unpaired)} {config.dataset} file(s) without their image or label, e.g. "
            f"{shown}; run `incseg data check` for a full report"
        )
    if not pairs.names:
        raise DataError(f"data.root {config.root}: the {split} split of {config.dataset} is empty")
    saliency = Path(config.saliency).expanduser() if config.saliency and split == "train" else None
    return FileSource(
        pairs.names,
        pairs.images,
        pairs.labels,
        tag=f"{config.dataset}-{split}",
        progress=progress,
        saliency_dir=saliency,
    )
