"""Model shapes, the growing classifier, norms and the ASPP pooling branch."""

import pytest
import torch
from torch import nn

from incseg.errors import ConfigError
from incseg.models import build_segmenter
from incseg.models.deeplab import ASPP


@pytest.mark.parametrize("output_stride", [8, 16])
def test_tiny_segmenter_shapes(output_stride):
    model = build_segmenter("tiny", (16, 5), output_stride=output_stride, head_channels=16)
    out = model(torch.randn(2, 3, 64, 48), return_features=True)
    assert out.logits.shape == (2, 21, 64, 48)
    assert out.features.shape == (2, 64, 64 // output_stride, 48 // output_stride)
    assert model.eval()(torch.randn(1, 3, 32, 32)).features is None


def test_classifier_grows_by_one_conv_per_step():
    model = build_segmenter("tiny", (16,), head_channels=8)
    model.add_classifier(1)
    model.add_classifier(2)
    assert model.channels_per_step == (16, 1, 2) and model.num_channels == 19
    assert all(c.kernel_size == (1, 1) and c.bias is not None for c in model.classifiers)


def test_aspp_pooling_branch_is_added_and_broadcast():
    """Stated with plain tensor ops, not the module's layers: the image-level branch (mean, 1x1,
    BN + ReLU, 1x1) is *added* to the reduced branches before the final BN + ReLU."""
    torch.manual_seed(0)
    aspp = ASPP(8, 4, (1, 2, 3), "bn").eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        for branch in aspp.branches:  # the four conv branches give 0: only the pooling remains
            branch.weight.zero_()
        pooled = x.mean((2, 3))  # (2, 8)
        eps = aspp.out_norm[0].eps  # BN in eval at init: x / sqrt(1 + eps)
        hidden = torch.relu(pooled @ aspp.pool[1].weight[:, :, 0, 0].T / (1 + eps) ** 0.5)
        pool = hidden @ aspp.pool[3].weight[:, :, 0, 0].T  # (2, 4)
        expected = torch.relu(pool / (1 + eps) ** 0.5)[:, :, None, None].expand(2, 4, 5, 5)
        torch.testing.assert_close(aspp(x), expected)
        aspp.pool[3].weight.zero_()  # and with the pooling branch silenced, nothing is left
        torch.testing.assert_close(aspp(x), torch.zeros(2, 4, 5, 5))
    assert aspp.reduce.in_channels == 16  # four branches concatenated, not five


def test_resnet_backbone_dilation_and_iabn():
    model = build_segmenter(
        "resnet50", (21,), output_stride=16, norm="iabn", head_channels=32
    ).eval()
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert any(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.01 for m in model.modules())
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), return_features=True)
    assert out.features.shape == (1, 2048, 4, 4)
    assert model.backbone.layer4[0].conv2.stride == (1, 1)  # OS16: last stage not strided
    assert model.backbone.layer4[1].conv2.dilation == (2, 2)


def test_unknown_backbone_and_tiny_pretrained():
    with pytest.raises(ConfigError, match="tiny"):
        build_segmenter("vgg16", (21,))
    with pytest.raises(ConfigError, match="pretrained"):
        build_segmenter("tiny", (21,), pretrained="imagenet")
