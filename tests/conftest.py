"""Shared fixtures: a tiny config for end-to-end runs on 2 CPU cores."""

from pathlib import Path

import pytest

TINY_CONFIG = """\
name: tiny-test
data: {dataset: shapes, image_size: 32, num_train: 80, num_test: 24, crop_size: 32}
protocol: {setting: 15-5, mode: overlap}
model: {backbone: tiny, output_stride: 16, norm: bn, head_channels: 8}
method: {name: mib}
train: {epochs: 1, epochs_incremental: 1, lr: 0.02, lr_incremental: 0.01, batch_size: 8,
        eval_batch_size: 12, log_interval: 2}
"""


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / "tiny.yaml"
    path.write_text(TINY_CONFIG)
    return path


FIXTURES = Path(__file__).parent / "fixtures"
VOC_ROOT = FIXTURES / "voc"  # VOCdevkit/VOC2012 layout: 12 train_aug + 6 val real VOC pairs
ADE_ROOT = FIXTURES / "ade"  # ADEChallengeData2016 layout: 1 training + 3 validation pairs

VOC_CONFIG = """\
name: voc-fixture
data: {{dataset: voc, root: "{root}", crop_size: 48, test_crop: 48}}
protocol: {{setting: 15-5, mode: overlap}}
model: {{backbone: tiny, output_stride: 16, norm: bn, head_channels: 8}}
method: {{name: mib}}
train: {{epochs: 1, epochs_incremental: 1, lr: 0.02, lr_incremental: 0.01, batch_size: 4,
        eval_batch_size: 3, log_interval: 1}}
"""


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Class-index caches go to a per-session temporary folder, never the user's cache."""
    monkeypatch.setenv("INCSEG_CACHE", str(tmp_path_factory.getbasetemp() / "incseg-cache"))


@pytest.fixture
def voc_config_path(tmp_path):
    path = tmp_path / "voc.yaml"
    path.write_text(VOC_CONFIG.format(root=VOC_ROOT))
    return path
