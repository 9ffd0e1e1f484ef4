"""Shared fixtures: a tiny config for end-to-end runs on 2 CPU cores."""

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
