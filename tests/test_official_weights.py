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
    model = build_segmenter(
        "resnet101", (16, 5), output_stride=16, norm="iabn", head_channels=256
    ).eval()
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
    return {
        f"module.{official_name(k)}": (v - IABN_EPS if k in norms else v).clone()
        for k, v in model.state_dict().items()
        if official_name(k) is not None
    }


def test_key_map_is_one_to_one_and_matches_the_official_names(r101):
    for ours, theirs in EXPECTED.items():
        assert official_name(ours) == theirs
    names = [official_name(k) for k in r101.state_dict() if not k.endswith("num_batches_tracked")]
    # body: 33 bottlenecks x (3 convs + 3 norms x 4) + 4 projections x 5 + stem 5 = 520;
    # head: 4 + 4 + 1 + 1 + 4 + 1 + 4 = 19; two classifiers x 2 = 4
    assert len(names) == len(set(names)) == 543
    assert sum(n.startswith("body.") for n in names) == 520


def test_official_checkpoint_round_trip_gives_identical_outputs(r101):
    twin = build_segmenter(
        "resnet101", (16, 5), output_stride=16, norm="iabn", head_channels=256
    ).eval()
    twin.load_state_dict(convert_official(_official(r101), twin), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x).logits, r101(x).logits, rtol=0, atol=0)


def test_mismatches_are_named(r101):
    state = _official(r101)
    state.pop("module.head.red_conv.weight")
    state["module.body.mod6.block1.convs.conv1.weight"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError,
        match=r"1 missing \(e.g. \['head.red_conv.weight'\]\), 1 unexpected \(e.g. \['body.mod6",
    ):
        convert_official(state, r101)
    state = _official(r101)
    state["module.cls.1.weight"] = torch.zeros(6, 256, 1, 1)
    with pytest.raises(
        CheckpointError,
        match=r"'cls.1.weight' has shape \(6, 256, 1, 1\), incseg 'classifiers.1.weight' expects \(5, 256, 1, 1\)",
    ):
        convert_official(state, r101)


def test_iabn_imagenet_backbone_loads_into_the_backbone_only(r101, tmp_path):
    body = {
        k.replace("module.body.", "module."): v for k, v in _official(r101).items() if ".body." in k
    }
    body["module.classifier.fc.weight"] = torch.zeros(1000, 2048)
    torch.save({"state_dict": body, "epoch": 90}, tmp_path / "resnet101_iabn_sync.pth.tar")
    fresh = build_segmenter("resnet101", (16, 5), output_stride=16, norm="iabn", head_channels=256)
    head_before = fresh.head.reduce.weight.clone()
    load_iabn_imagenet(fresh, str(tmp_path / "resnet101_iabn_sync.pth.tar"))
    torch.testing.assert_close(
        fresh.backbone.layer3[5].conv2.weight, r101.backbone.layer3[5].conv2.weight
    )
    torch.testing.assert_close(fresh.backbone.bn1.weight, r101.backbone.bn1.weight)
    assert torch.equal(fresh.head.reduce.weight, head_before)
    with pytest.raises(CheckpointError, match="not found"):
        load_iabn_imagenet(fresh, str(tmp_path / "nope.pth.tar"))


def test_import_checkpoint_then_eval(r101, voc_config_path, tmp_path, capsys):
    source = tmp_path / "step1.pth"
    torch.save({"model_state": _official(r101), "epoch": 30, "best_score": 0.0}, source)
    args = [
        "import-checkpoint",
        str(source),
        str(voc_config_path),
        "--step",
        "1",
        "--out",
        str(tmp_path / "step_1.pt"),
        "--set",
        "model={backbone: resnet101, output_stride: 16, norm: iabn, head_channels: 256}",
    ]
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
    assert "unknown checkpoint layout" in capsys.readouterr().err


# -- the official architecture, restated from fcdl94/MiB (models/resnet.py, modules/residual.py,
# modules/deeplab.py, segmentation_module.py) as plain functions over an official state dict --
def _iabn(x, s, name, act=True):
    """In-Place ABN in eval mode: scale |gamma| + eps, then leaky ReLU 0.01 (or identity)."""
    w, b = s[f"{name}.weight"].abs() + IABN_EPS, s[f"{name}.bias"]
    x = (x - s[f"{name}.running_mean"][:, None, None]) / torch.sqrt(
        s[f"{name}.running_var"][:, None, None] + IABN_EPS
    )
    x = x * w[:, None, None] + b[:, None, None]
    return torch.nn.functional.leaky_relu(x, 0.01) if act else x


def _official_forward(s, x, structure, output_stride):
    conv = torch.nn.functional.conv2d
    dilation = [1, 1, 1, 2] if output_stride == 16 else [1, 1, 2, 4]  # resnet.py:47-51
    size = x.shape[-2:]
    x = _iabn(conv(x, s["body.mod1.conv1.weight"], stride=2, padding=3), s, "body.mod1.bn1")
    x = torch.nn.functional.max_pool2d(x, 3, stride=2, padding=1)
    for mod_id, num in enumerate(structure):
        for block_id in range(num):
            d = dilation[mod_id]
            stride = 2 if d == 1 and block_id == 0 and mod_id > 0 else 1  # resnet.py:104-108
            p = f"body.mod{mod_id + 2}.block{block_id + 1}"
            residual = x
            if f"{p}.proj_conv.weight" in s:
                residual = _iabn(
                    conv(x, s[f"{p}.proj_conv.weight"], stride=stride), s, f"{p}.proj_bn", act=False
                )
            y = _iabn(conv(x, s[f"{p}.convs.conv1.weight"]), s, f"{p}.convs.bn1")
            y = _iabn(
                conv(y, s[f"{p}.convs.conv2.weight"], stride=stride, padding=d, dilation=d),
                s,
                f"{p}.convs.bn2",
            )
            y = _iabn(conv(y, s[f"{p}.convs.conv3.weight"]), s, f"{p}.convs.bn3", act=False)
            x = torch.nn.functional.leaky_relu(y + residual, 0.01)  # residual.py:84-93
    rates = (6, 12, 18) if output_stride == 16 else (12, 24, 32)  # deeplab.py:19-22
    maps = [conv(x, s["head.map_convs.0.weight"])]
    maps += [
        conv(x, s[f"head.map_convs.{i + 1}.weight"], padding=r, dilation=r)
        for i, r in enumerate(rates)
    ]
    out = conv(_iabn(torch.cat(maps, 1), s, "head.map_bn"), s["head.red_conv.weight"])
    pool = _iabn(
        conv(x.mean((2, 3), keepdim=True), s["head.global_pooling_conv.weight"]),
        s,
        "head.global_pooling_bn",
    )
    out = _iabn(out + conv(pool, s["head.pool_red_conv.weight"]), s, "head.red_bn")
    logits = torch.cat([conv(out, s[f"cls.{i}.weight"], s[f"cls.{i}.bias"]) for i in range(2)], 1)
    return torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def test_official_resnet101_weights_compute_the_official_logits(r101):
    """Random weights under official names (In-Place ABN's gamma), imported into incseg: the
    logits equal the official architecture's, including the dilated first block of mod5 (which
    torchvision's replace_stride_with_dilation would run at dilation 1)."""
    gen = torch.Generator().manual_seed(1)
    state = {}
    for key, value in r101.state_dict().items():
        name = official_name(key)
        if name is None:
            continue
        if name.endswith("running_var"):
            state[name] = torch.rand(value.shape, generator=gen) + 0.5
        elif name.endswith(("running_mean", "bias")):
            state[name] = 0.1 * torch.randn(value.shape, generator=gen)
        elif value.dim() == 1:  # norm weights, negative ones included: In-Place ABN uses |gamma|
            state[name] = torch.randn(value.shape, generator=gen)
        else:  # He-scaled conv weights keep activations O(1) through 101 layers
            fan_in = value[0].numel()
            state[name] = torch.randn(value.shape, generator=gen) * (2 / fan_in) ** 0.5 * 0.5
    model = build_segmenter(
        "resnet101", (16, 5), output_stride=16, norm="iabn", head_channels=256
    ).eval()
    model.load_state_dict(convert_official(state, model), strict=False)
    x = torch.randn(1, 3, 65, 49, generator=gen)
    with torch.no_grad():
        expected = _official_forward(state, x, [3, 4, 23, 3], 16)
        got = model(x).logits
    assert expected.abs().mean() > 1e-3  # a signal survives the depth
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_head_initialisation_matches_the_official_distribution():
    """Xavier-normal with the leaky-ReLU(0.01) gain (modules/deeplab.py:38-51): the std of each
    conv's weights is gain * sqrt(2 / (fan_in + fan_out)); norm weights 1, biases 0."""
    torch.manual_seed(0)
    model = build_segmenter("tiny", (16, 5), output_stride=16, norm="iabn", head_channels=256)
    gain = (2 / (1 + 0.01**2)) ** 0.5
    convs = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 7
    for m in convs:
        out_c, in_c, kh, kw = m.weight.shape
        expected = gain * (2 / ((in_c + out_c) * kh * kw)) ** 0.5
        assert m.weight.std().item() == pytest.approx(expected, rel=0.03), m
        assert m.weight.mean().abs().item() < 0.1 * expected
    for m in model.head.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(
                m.bias, torch.zeros_like(m.bias)
            )


def test_pretrained_iabn_is_fetched_into_the_torch_cache(r101, tmp_path, monkeypatch):
    from incseg.models import official

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet101_iabn_sync.pth.tar"
    assert official.iabn_cache_path() == cached
    body = {
        k.replace("module.body.", "module."): v for k, v in _official(r101).items() if ".body." in k
    }
    torch.save({"state_dict": body}, tmp_path / "served.pth.tar")
    assert official.ensure_iabn_weights((tmp_path / "served.pth.tar").as_uri()) == cached
    assert cached.read_bytes() == (tmp_path / "served.pth.tar").read_bytes()
    (tmp_path / "served.pth.tar").unlink()  # a cached file is used as it is, never fetched again
    assert official.ensure_iabn_weights("http://127.0.0.1:9/unreachable") == cached
    from incseg.config import config_from_dict
    from incseg.engine.model_io import build_model
    from incseg.protocol import get_setting, step_info

    config = config_from_dict(
        {"data": {"dataset": "voc", "root": "x"}, "model": {"pretrained": "iabn"}}
    )
    model = build_model(config, step_info(get_setting("voc", "15-5"), 1))
    torch.testing.assert_close(
        model.backbone.layer4[0].conv2.weight, r101.backbone.layer4[0].conv2.weight
    )


def test_pretrained_iabn_offline_fails_before_any_work(tmp_path, monkeypatch, capsys):
    from incseg.models import official

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(official, "IABN_URL", "http://127.0.0.1:9/resnet101_iabn_sync.pth.tar")
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "demo",
            "--set",
            "model.backbone=resnet101",
            "--set",
            "model.pretrained=iabn",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet101_iabn_sync.pth.tar"
    assert "http://127.0.0.1:9/resnet101_iabn_sync.pth.tar" in err and str(cached) in err
    assert not out.exists() and list(cached.parent.iterdir()) == []  # no partial download left
    assert main(["run", "demo", "--set", "model.pretrained=iabn", "--out", str(out)]) == 2
    assert (
        "model.pretrained: iabn is In-Place ABN's ResNet-101; model.backbone is 'tiny'"
        in capsys.readouterr().err
    )
