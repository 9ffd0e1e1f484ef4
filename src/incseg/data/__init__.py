"""Datasets: sources of image/label pairs, step views, transforms."""

from incseg.data.datasets import Source, StepDataset
from incseg.data.synthetic import ShapesSource

__all__ = ["ShapesSource", "Source", "StepDataset"]


def build_sources(config) -> tuple[Source, Source]:
    """Train and test sources of ``config.data`` (a :class:`incseg.config.DataConfig`)."""
    if config.dataset == "shapes":
        train = ShapesSource(config.num_train, config.image_size, config.seed, "train")
        test = ShapesSource(config.num_test, config.image_size, config.seed, "test")
        return train, test
    raise ValueError(f"unknown dataset {config.dataset!r}")  # config validation prevents this
