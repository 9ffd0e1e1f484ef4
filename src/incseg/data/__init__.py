"""Datasets: sources of image/label pairs, step views, transforms."""

from incseg.data.datasets import Source, StepDataset
from incseg.data.synthetic import ShapesSource

__all__ = ["ShapesSource", "Source", "StepDataset"]


def build_source(config, split: str) -> Source:
    """The ``"train"`` or ``"test"`` source of ``config.data`` (a :class:`incseg.config.DataConfig`)."""
    if config.dataset == "shapes":
        num = config.num_train if split == "train" else config.num_test
        return ShapesSource(num, config.image_size, config.seed, split)
    raise ValueError(f"unknown dataset {config.dataset!r}")  # config validation prevents this
