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


def test_aspp_pooling_branch_is_added():
    aspp = ASPP(8, 4, (1, 2, 3), "bn").eval()
    x = torch.randn(1, 8, 5, 5)
    main = aspp.reduce(aspp.branch_norm(torch.cat([b(x) for b in aspp.branches], 1)))
    expected = aspp.out_norm(main + aspp.pool(x))
    torch.testing.assert_close(aspp(x), expected)
    assert aspp.reduce.in_channels == 16  # four branches concatenated, not five


def test_resnet_backbone_dilation_and_iabn():
    model = build_segmenter("resnet50", (21,), output_stride=16, norm="iabn", head_channels=32).eval()
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
