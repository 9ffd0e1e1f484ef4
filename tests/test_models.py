"""Model shapes, the growing classifier, norms and the ASPP pooling branch."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import incseg.models
from incseg.errors import ConfigError
from incseg.models import build_segmenter
from incseg.models.deeplab import ASPP
from incseg.models.heads import LAYOUTS, UnknownSegmenter
from incseg.models.segmenter import FEATURE_NAMES, IncrementalSegmenter


@pytest.mark.parametrize("output_stride", [8, 16])
def test_tiny_segmenter_shapes(output_stride):
    model = build_segmenter("tiny", (16, 5), output_stride=output_stride, head_channels=16)
    out = model(torch.randn(2, 3, 64, 48), features=("body",))
    assert out.logits.shape == (2, 21, 64, 48)
    assert out.features["body"].shape == (2, 64, 64 // output_stride, 48 // output_stride)
    assert model.eval()(torch.randn(1, 3, 32, 32)).features == {}


@pytest.mark.parametrize(
    ("backbone", "norm", "widths"),
    [("tiny", "bn", (32, 64, 64, 64)), ("resnet50", "iabn", (256, 512, 1024, 2048))],
)
def test_named_features_are_the_stages_before_their_activation(backbone, norm, widths):
    torch.manual_seed(0)
    model = build_segmenter(backbone, (16, 5), output_stride=16, norm=norm, head_channels=8).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(images)
        out = model(images, features=FEATURE_NAMES[:-2])  # the last two: dkd's layout
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)  # same computation
    f = out.features
    assert [f[f"stage{i}"].shape[1] for i in range(1, 5)] == list(widths)
    assert [f[f"stage{i}"].shape[-1] for i in range(1, 5)] == [16, 8, 4, 4]
    # the last stage's map, activated, is the backbone's output; it has negative values (not ReLU'd)
    act = nn.functional.leaky_relu if norm == "iabn" else nn.functional.relu
    slope = {"negative_slope": 0.01} if norm == "iabn" else {}
    torch.testing.assert_close(act(f["stage4"], **slope), f["body"])
    assert (f["stage4"] < 0).any() and (f["body"] >= 0).all() == (norm == "bn")
    assert f["head"].shape == (2, 8, 4, 4) and f["logits_small"].shape == (2, 21, 4, 4)
    torch.testing.assert_close(model.classifiers[1](f["head"]), f["logits_small"][:, 16:])
    with pytest.raises(ValueError, match="unknown feature names"):
        model(images, features=("stage5",))


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
        out = model(torch.randn(1, 3, 64, 64), features=("body",))
    assert out.features["body"].shape == (1, 2048, 4, 4)
    assert model.backbone.layer4[0].conv2.stride == (1, 1)  # OS16: last stage not strided
    assert model.backbone.layer4[1].conv2.dilation == (2, 2)


def test_unknown_backbone_and_tiny_pretrained():
    with pytest.raises(ConfigError, match="tiny"):
        build_segmenter("vgg16", (21,))
    with pytest.raises(ConfigError, match="pretrained"):
        build_segmenter("tiny", (21,), pretrained="imagenet")


def _models_imports() -> dict[str, set[str]]:
    """For every module of ``incseg.models``, the modules of the package it imports anywhere in its
    source (top level, under ``TYPE_CHECKING`` or inside a function)."""
    folder = Path(incseg.models.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        graph[path.stem] = {n.rsplit(".", 1)[-1] for n in names if n.startswith("incseg.models.")}
    return graph


def test_no_two_models_modules_import_each_other():
    graph = _models_imports()
    assert "segmenter" in graph["heads"]  # the layouts subclass the plain segmenter ...
    mutual = sorted((a, b) for a in graph for b in graph[a] if a < b and a in graph.get(b, ()))
    assert mutual == []  # ... and nothing in segmenter.py points back


@pytest.mark.parametrize("architecture", ["deeplabv3", "rcil", "ssul", "dkd", "star"])
def test_build_segmenter_picks_the_layout(architecture):
    model = build_segmenter("tiny", (16,), head_channels=8, architecture=architecture)
    assert type(model) is LAYOUTS.get(architecture, IncrementalSegmenter)
    assert isinstance(model, IncrementalSegmenter)
    if architecture == "ssul":
        assert isinstance(model, UnknownSegmenter)
