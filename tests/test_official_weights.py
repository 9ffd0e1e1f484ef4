"""Import of official MiB checkpoints and In-Place ABN ImageNet weights by an explicit key map,
tested on state dicts built with the official names and shapes (ResNet-101)."""

import pytest
import torch

from incseg.cli import main
from incseg.errors import CheckpointError
from incseg.models import build_segmenter
from incseg.models.official import IABN_EPS, convert_official, load_iabn_imagenet, official_name

EXPECTED = {
    "backbone.conv1.weight": "body.mod1.conv1.weight",
    "backbone.bn1.running_var": "body.mod1.bn1.running_var",
    "backbone.layer1.0.downsample.0.weight": "body.mod2.block1.proj_conv.weight",
    "backbone.layer3.22.conv2.weight": "body.mod4.block23.convs.conv2.weight",
    "backbone.layer4.2.bn3.bias": "body.mod5.block3.convs.bn3.bias",
    "head.branches.3.weight": "head.map_convs.3.weight",
    "head.branch_norm.0.running_mean": "head.map_bn.running_mean",
    "head.pool.3.weight": "head.pool_red_conv.weight",
    "head.pool.2.0.weight": "head.global_pooling_bn.weight",
    "head.out_norm.0.bias": "head.red_bn.bias",
    "classifiers.1.bias": "cls.1.bias",
}


@pytest.fixture(scope="module")
def r101():
    torch.manual_seed(0)
    model = build_segmenter("resnet101", (16, 5), output_stride=16, norm="iabn", head_channels=256).eval()
    with torch.no_grad():  # positive norm weights, so that |w - eps| + eps == w exactly
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _official(model):
    """The model's weights under official names, norm weights stored as In-Place ABN's gamma."""
    norms = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    return {f"module.{official_name(k)}": (v - IABN_EPS if k in norms else v).clone()
            for k, v in model.state_dict().items() if official_name(k) is not None}  # fmt: skip


def test_key_map_is_one_to_one_and_matches_the_official_names(r101):
    for ours, theirs in EXPECTED.items():
        assert official_name(ours) == theirs
    names = [official_name(k) for k in r101.state_dict() if not k.endswith("num_batches_tracked")]
    # body: 33 bottlenecks x (3 convs + 3 norms x 4) + 4 projections x 5 + stem 5 = 520;
    # head: 4 + 4 + 1 + 1 + 4 + 1 + 4 = 19; two classifiers x 2 = 4
    assert len(names) == len(set(names)) == 543
    assert sum(n.startswith("body.") for n in names) == 520


def test_official_checkpoint_round_trip_gives_identical_outputs(r101):
    twin = build_segmenter("resnet101", (16, 5), output_stride=16, norm="iabn", head_channels=256).eval()
    twin.load_state_dict(convert_official(_official(r101), twin), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x).logits, r101(x).logits, rtol=0, atol=0)


def test_mismatches_are_named(r101):
    state = _official(r101)
    state.pop("module.head.red_conv.weight")
    state["module.body.mod6.block1.convs.conv1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 missing \(e.g. \['head.red_conv.weight'\]\), 1 unexpected \(e.g. \['body.mod6"):
        convert_official(state, r101)
    state = _official(r101)
    state["module.cls.1.weight"] = torch.zeros(6, 256, 1, 1)
    with pytest.raises(CheckpointError, match=r"'cls.1.weight' has shape \(6, 256, 1, 1\), incseg 'classifiers.1.weight' expects \(5, 256, 1, 1\)"):
        convert_official(state, r101)


def test_iabn_imagenet_backbone_loads_into_the_backbone_only(r101, tmp_path):
    body = {k.replace("module.body.", "module."): v for k, v in _official(r101).items() if ".body." in k}
    body["module.classifier.fc.weight"] = torch.zeros(1000, 2048)
    torch.save({"state_dict": body, "epoch": 90}, tmp_path / "resnet101_iabn_sync.pth.tar")
    fresh = build_segmenter("resnet101", (16, 5), output_stride=16, norm="iabn", head_channels=256)
    head_before = fresh.head.reduce.weight.clone()
    load_iabn_imagenet(fresh, str(tmp_path / "resnet101_iabn_sync.pth.tar"))
    torch.testing.assert_close(fresh.backbone.layer3[5].conv2.weight, r101.backbone.layer3[5].conv2.weight)
    torch.testing.assert_close(fresh.backbone.bn1.weight, r101.backbone.bn1.weight)
    assert torch.equal(fresh.head.reduce.weight, head_before)
    with pytest.raises(CheckpointError, match="not found"):
        load_iabn_imagenet(fresh, str(tmp_path / "nope.pth.tar"))


def test_import_checkpoint_then_eval(r101, voc_config_path, tmp_path, capsys):
    source = tmp_path / "step1.pth"
    torch.save({"model_state": _official(r101), "epoch": 30, "best_score": 0.0}, source)
    args = ["import-checkpoint", str(source), str(voc_config_path), "--step", "1", "--out", str(tmp_path / "step_1.pt"),
            "--set", "model={backbone: resnet101, output_stride: 16, norm: iabn, head_channels: 256}"]  # fmt: skip
    assert main(args) == 0
    from incseg.engine.checkpoint import load_checkpoint

    imported = load_checkpoint(tmp_path / "step_1.pt")
    assert imported["channels_per_step"] == [16, 5]
    torch.testing.assert_close(imported["model"]["head.pool.3.weight"], r101.head.pool[3].weight)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "step_1.pt"), "--no-progress"]) == 0
    assert "Evaluation of" in capsys.readouterr().out
    assert main(args) == 2  # never overwritten
    assert "exists" in capsys.readouterr().err
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    args[1], args[6] = str(tmp_path / "other.pth"), str(tmp_path / "x.pt")
    assert main(args) == 2
    assert "no 'model_state' entry" in capsys.readouterr().err
