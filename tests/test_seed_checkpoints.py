"""Import of cssegmentation's and PLOP's step checkpoints (issue 23), tested against each codebase's
architecture restated below: its key names, its In-Place ABN and its forward at test time, filled
with random weights, saved in its checkpoint wrapper, imported, and run beside incseg's model.

The restatements follow SegmentationBLWX/cssegmentation c125175 (``csseg/modules/models/``) and
arthurdouillard/CVPR2021_PLOP 4b4a060 (``models/resnet.py``, ``modules/residual.py``,
``modules/deeplab.py``, ``segmentation_module.py``); the file:line sources are in
``incseg/models/imports.py``. ResNet-50 (the same code path as ResNet-101, a third of the blocks),
a 32-channel head and a 129x97 input keep each forward well under a second.
"""

from collections import OrderedDict
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from incseg.errors import CheckpointError, ConfigError
from incseg.models import build_segmenter
from incseg.models.imports import (
    checkpoint_step,
    convert_checkpoint,
    convert_cssegmentation,
    convert_plop,
    cssegmentation_name,
    detect_layout,
    load_foreign_checkpoint,
)
from incseg.torchfile import load_torch_file

EPS = 1e-5
BLOCKS = (3, 4, 6, 3)  # ResNet-50
HEAD = 32
CLASSES = (16, 5)  # VOC 15-5, step 1
STAGES = ("stage1", "stage2", "stage3", "stage4")


class IABN(nn.Module):
    """In-Place ABN at test time: ``(x - mean) / sqrt(var + eps) * (|w| + eps) + b``, then leaky
    ReLU 0.01 or nothing (inplace_abn ``src/inplace_abn_cpu.cpp:121-140``). ``num_batches_tracked``
    exists from inplace_abn 1.1 on (``inplace_abn/abn.py:76-81``), not in the 1.0.7 PLOP pins."""

    def __init__(self, channels: int, activation: str = "leaky_relu", counts: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        if counts:
            self.register_buffer("num_batches_tracked", torch.tensor(0))
        self.activation = activation

    def forward(self, x):
        scale = (self.weight.abs() + EPS) / torch.sqrt(self.running_var + EPS)
        y = x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]
        return F.leaky_relu(y, 0.01) if self.activation == "leaky_relu" else y


def window_pool(x, size=32):
    """The heads' test-time pooling: ``size`` x ``size`` windows at stride 1, padded back to the
    map's size by replication (PLOP ``modules/deeplab.py:72-89``, cssegmentation
    ``decoders/aspphead.py:66-78``); the whole map when it is smaller."""
    kh, kw = min(size, x.shape[2]), min(size, x.shape[3])
    pooled = F.avg_pool2d(x, (kh, kw), stride=1)
    pad = ((kw - 1) // 2, kw - 1 - (kw - 1) // 2, (kh - 1) // 2, kh - 1 - (kh - 1) // 2)
    return F.pad(pooled, pad, mode="replicate")


# -- cssegmentation: MIBSegmentor / PLOPSegmentor with ResNetILT / ResNetPLOP and ASPPHead --------
class CssegBottleneck(nn.Module):
    """encoders/resnet.py:62-94 with the configs' norms (configs/mib/base_cfg.py:13-16): conv3's
    and the projection's norm without activation, ``act_cfg=None`` -> Identity, LeakyReLU after
    the sum; the PLOP variant also returns the sum (encoders/resnetplop.py:43-58)."""

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, project: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = IABN(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = IABN(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = IABN(planes * 4, "identity")
        self.relu = nn.Identity()
        self.shortcut_relu = nn.LeakyReLU(0.01)
        self.downsample = None
        if project:
            conv = nn.Conv2d(cin, planes * 4, 1, stride, bias=False)
            self.downsample = nn.Sequential(conv, IABN(planes * 4, "identity"))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        pre = self.bn3(self.conv3(y)) + (x if self.downsample is None else self.downsample(x))
        return self.shortcut_relu(pre), pre


class CssegEncoder(nn.Module):
    """encoders/resnet.py:98-245 with deep_stem=False, contract_dilation=False, output stride 16:
    strides (1, 2, 2, 1), dilations (1, 1, 1, 2) for every block of a stage."""

    def __init__(self, blocks=BLOCKS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = IABN(64)
        self.relu = nn.Identity()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for index, (num, stride, dilation) in enumerate(zip(blocks, (1, 2, 2, 1), (1, 1, 1, 2))):
            planes = 64 * 2**index
            layer = [
                CssegBottleneck(
                    cin if k == 0 else planes * 4, planes, stride if k == 0 else 1, dilation, k == 0
                )
                for k in range(num)
            ]
            self.add_module(f"layer{index + 1}", nn.Sequential(*layer))
            cin = planes * 4

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        pres = []
        for index in range(1, 5):
            for block in getattr(self, f"layer{index}"):
                x, pre = block(x)
            pres.append(pre)
        return x, pres


class CssegASPP(nn.Module):
    """decoders/aspphead.py:14-78 at test time, dilations (1, 6, 12, 18), norms with leaky ReLU
    and ``act_cfg=None`` (configs/mib/base_cfg.py:20-29)."""

    def __init__(self, cin: int = 2048, channels: int = HEAD) -> None:
        super().__init__()
        self.parallel_convs = nn.ModuleList(
            nn.Conv2d(cin, channels, 1, bias=False)
            if d == 1
            else nn.Conv2d(cin, channels, 3, padding=d, dilation=d, bias=False)
            for d in (1, 6, 12, 18)
        )
        self.parallel_bn = IABN(channels * 4)
        self.parallel_act = nn.Identity()
        self.global_branch = nn.Sequential(
            nn.Conv2d(cin, channels, 1, bias=False),
            IABN(channels),
            nn.Identity(),
            nn.Conv2d(channels, channels, 1, bias=False),
        )
        self.out_project = nn.Sequential(
            nn.Conv2d(channels * 4, channels, 1, bias=False), IABN(channels), nn.Identity()
        )

    def forward(self, x):
        y = self.parallel_act(self.parallel_bn(torch.cat([c(x) for c in self.parallel_convs], 1)))
        y = self.out_project[0](y) + self.global_branch(window_pool(x))
        return self.out_project[1:](y)


class CssegSegmentor(nn.Module):
    """segmentors/base.py:29-45: encoder, decoder, one 1x1 conv with bias per task, concatenated;
    the runner upsamples bilinearly without corner alignment (runners/base.py:239-240)."""

    def __init__(self, classes=CLASSES) -> None:
        super().__init__()
        self.encoder = CssegEncoder()
        self.decoder = CssegASPP()
        self.convs_cls = nn.ModuleList(nn.Conv2d(HEAD, c, 1) for c in classes)

    def forward(self, x):
        body, pres = self.encoder(x)
        feats = self.decoder(body)
        logits = torch.cat([conv(feats) for conv in self.convs_cls], 1)
        return F.interpolate(logits, x.shape[-2:], mode="bilinear", align_corners=False), pres


# -- PLOP: IncrementalSegmentationModule(ResNet of ResidualBlocks, DeeplabV3, cls) ---------------
class PlopBlock(nn.Module):
    """modules/residual.py:84-138 (bottleneck): ``convs`` with bn3 without activation, an optional
    ``proj_conv``/``proj_bn``, leaky ReLU after the sum; the last block of a stage also returns the
    sum (its "attention")."""

    def __init__(self, cin: int, channels, stride: int, dilation: int, last: bool) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.convs = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(cin, c0, 1, bias=False),
                bn1=IABN(c0, counts=False),
                conv2=nn.Conv2d(c0, c1, 3, stride, dilation, dilation, bias=False),
                bn2=IABN(c1, counts=False),
                conv3=nn.Conv2d(c1, c2, 1, bias=False),
                bn3=IABN(c2, "identity", counts=False),
            )
        )
        if stride != 1 or cin != c2:
            self.proj_conv = nn.Conv2d(cin, c2, 1, stride, bias=False)
            self.proj_bn = IABN(c2, "identity", counts=False)
        self.last = last

    def forward(self, x):
        residual = self.proj_bn(self.proj_conv(x)) if hasattr(self, "proj_conv") else x
        pre = self.convs(x) + residual
        act = F.leaky_relu(pre, 0.01)
        return (act, pre) if self.last else act


class PlopBody(nn.Module):
    """models/resnet.py:32-148 at output stride 16: dilations (1, 1, 1, 2), stride 2 on the first
    block of mod3..mod5 unless dilated, the stem's max pool inside ``mod1``."""

    def __init__(self, structure=BLOCKS) -> None:
        super().__init__()
        self.mod1 = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, 64, 7, 2, 3, bias=False),
                bn1=IABN(64, counts=False),
                pool1=nn.MaxPool2d(3, 2, 1),
            )
        )
        cin, channels = 64, (64, 64, 256)
        for mod_id, num in enumerate(structure):
            d = (1, 1, 1, 2)[mod_id]
            blocks = OrderedDict()
            for k in range(num):
                stride = 2 if d == 1 and k == 0 and mod_id > 0 else 1
                blocks[f"block{k + 1}"] = PlopBlock(cin, channels, stride, d, last=k == num - 1)
                cin = channels[-1]
            self.add_module(f"mod{mod_id + 2}", nn.Sequential(blocks))
            channels = tuple(2 * c for c in channels)

    def forward(self, x):
        x, attentions = self.mod1(x), []
        for mod_id in range(2, 6):
            x, att = getattr(self, f"mod{mod_id}")(x)
            attentions.append(att)
        return x, attentions


class PlopHead(nn.Module):
    """modules/deeplab.py:8-89 at test time with ``--pooling 32`` (argparser.py:236-241)."""

    def __init__(self, cin: int = 2048, channels: int = HEAD) -> None:
        super().__init__()
        self.map_convs = nn.ModuleList(
            [nn.Conv2d(cin, channels, 1, bias=False)]
            + [nn.Conv2d(cin, channels, 3, padding=d, dilation=d, bias=False) for d in (6, 12, 18)]
        )
        self.map_bn = IABN(channels * 4, counts=False)
        self.global_pooling_conv = nn.Conv2d(cin, channels, 1, bias=False)
        self.global_pooling_bn = IABN(channels, counts=False)
        self.red_conv = nn.Conv2d(channels * 4, channels, 1, bias=False)
        self.pool_red_conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.red_bn = IABN(channels, counts=False)

    def forward(self, x):
        out = self.red_conv(self.map_bn(torch.cat([m(x) for m in self.map_convs], 1)))
        pool = self.global_pooling_bn(self.global_pooling_conv(window_pool(x)))
        return self.red_bn(out + self.pool_red_conv(pool))


class PlopModel(nn.Module):
    """segmentation_module.py:80-196 with its defaults (no cosine, one background mode)."""

    def __init__(self, classes=CLASSES) -> None:
        super().__init__()
        self.body = PlopBody()
        self.head = PlopHead()
        self.cls = nn.ModuleList(nn.Conv2d(HEAD, c, 1) for c in classes)

    def forward(self, x):
        body, attentions = self.body(x)
        pre_logits = self.head(body)
        logits = torch.cat([conv(pre_logits) for conv in self.cls], 1)
        return F.interpolate(logits, x.shape[-2:], mode="bilinear", align_corners=False), attentions


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random weights that keep activations O(1) through the depth; norm weights of both signs
    (In-Place ABN uses ``|gamma|``)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("num_batches_tracked"):
                tensor.fill_(int(torch.randint(1, 1000, (), generator=gen)))
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            elif tensor.dim() == 1:
                tensor.copy_(torch.randn(tensor.shape, generator=gen))
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * (2 / fan_in) ** 0.5 * 0.5)
    return model.eval()


def incseg_model(classes=CLASSES) -> nn.Module:
    torch.manual_seed(0)
    return build_segmenter(
        "resnet50", classes, output_stride=16, norm="iabn", head_channels=HEAD
    ).eval()


def save_and_load(tmp_path, checkpoint):
    """Through a file, as the CLI reads it (weights only: tensors, plain data, numpy scalars)."""
    torch.save(checkpoint, tmp_path / "foreign.pth")
    return load_foreign_checkpoint(tmp_path / "foreign.pth")


def csseg_checkpoint(net: nn.Module, task_id: int = 1) -> dict:
    """runners/base.py:250-259: the DDP segmentor's state dict under 'segmentor', beside the
    scheduler's state and the apex state."""
    state = {f"module.{k}": v.clone() for k, v in net.state_dict().items()}
    return {
        "cur_epoch": 30,
        "cur_iter": 9000,
        "optimizer": {"state": {}, "param_groups": []},
        "best_score": np.float64(0.661),
        "segmentor": state,
        "task_id": task_id,
        "amp": {"loss_scaler0": {}},
    }


def plop_checkpoint(net: nn.Module) -> dict:
    """run.py:25-36: apex DDP's state dict under 'model_state', beside the training state."""
    state = {f"module.{k}": v.clone() for k, v in net.state_dict().items()}
    return {
        "epoch": 29,
        "model_state": state,
        "optimizer_state": {"state": {}, "param_groups": []},
        "scheduler_state": {"last_epoch": 9000},
        "best_score": np.float64(0.7),
        "trainer_state": {"regularizer": None},
    }


@pytest.fixture(scope="module")
def csseg():
    return randomise(CssegSegmentor(), seed=1)


@pytest.fixture(scope="module")
def plop():
    return randomise(PlopModel(), seed=2)


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 3, 129, 97, generator=torch.Generator().manual_seed(3))


def _max_difference(model, foreign, x):
    with torch.no_grad():
        expected, pres = foreign(x)
        got = model(x, features=STAGES)
    assert expected.abs().mean() > 0.05  # a signal survives the depth
    for name, pre in zip(STAGES, pres):  # PLOP's "attentions": each stage's sum before activation
        torch.testing.assert_close(got.features[name], pre, rtol=1e-4, atol=1e-5)
    return (got.logits - expected).abs().max().item(), expected


def _swap(checkpoint, wrapper, a, b):
    """The state dict under ``wrapper`` with the tensors of ``a`` and ``b`` exchanged."""
    state = dict(checkpoint[wrapper])
    state[a], state[b] = state[b], state[a]
    return state


def test_cssegmentation_names():
    assert cssegmentation_name("backbone.conv1.weight") == "encoder.conv1.weight"
    assert (
        cssegmentation_name("backbone.layer3.5.bn2.running_var")
        == "encoder.layer3.5.bn2.running_var"
    )
    assert (
        cssegmentation_name("backbone.layer1.0.downsample.1.bias")
        == "encoder.layer1.0.downsample.1.bias"
    )
    assert cssegmentation_name("head.branches.0.weight") == "decoder.parallel_convs.0.weight"
    assert cssegmentation_name("head.branch_norm.0.weight") == "decoder.parallel_bn.weight"
    assert cssegmentation_name("head.pool.1.weight") == "decoder.global_branch.0.weight"
    assert (
        cssegmentation_name("head.pool.2.0.running_mean") == "decoder.global_branch.1.running_mean"
    )
    assert cssegmentation_name("head.pool.3.weight") == "decoder.global_branch.3.weight"
    assert cssegmentation_name("head.reduce.weight") == "decoder.out_project.0.weight"
    assert cssegmentation_name("head.out_norm.0.bias") == "decoder.out_project.1.bias"
    assert cssegmentation_name("classifiers.1.bias") == "convs_cls.1.bias"
    assert cssegmentation_name("backbone.bn1.num_batches_tracked") is None
    with pytest.raises(
        CheckpointError,
        match="no cssegmentation name for incseg parameter 'backbone.layers.0.0.weight'",
    ):
        cssegmentation_name("backbone.layers.0.0.weight")  # the tiny backbone


def test_cssegmentation_checkpoint_computes_the_same_logits(csseg, image, tmp_path):
    """A cssegmentation step-1 checkpoint (DDP prefix, In-Place ABN 1.1's num_batches_tracked,
    norm weights of both signs) imported into incseg: same logits and same pre-activation maps;
    two same-shaped tensors swapped in the checkpoint (a wrong key map) change the logits."""
    data = save_and_load(tmp_path, csseg_checkpoint(csseg))
    assert detect_layout(data) == "cssegmentation" and checkpoint_step(data) == 1
    model = incseg_model()
    result = model.load_state_dict(convert_checkpoint(data, model), strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    difference, expected = _max_difference(model, csseg, image)
    print(
        f"cssegmentation: max |logit difference| {difference:.2e}, logit scale {expected.abs().max():.2f}"
    )
    assert difference < 1e-5
    for a, b in [
        ("decoder.parallel_convs.1.weight", "decoder.parallel_convs.2.weight"),
        ("encoder.layer2.1.bn1.weight", "encoder.layer2.1.bn2.weight"),
        ("decoder.global_branch.1.running_var", "decoder.out_project.1.running_var"),
    ]:
        swapped = _swap(data, "segmentor", f"module.{a}", f"module.{b}")
        model.load_state_dict(convert_cssegmentation(swapped, model), strict=False)
        with torch.no_grad():
            assert (model(image).logits - expected).abs().max() > 1e-3, (a, b)


def test_plop_checkpoint_computes_the_same_logits(plop, image, tmp_path):
    """A PLOP step-1 checkpoint (model_state, apex DDP prefix, In-Place ABN 1.0.7: no
    num_batches_tracked) imported into incseg: same logits and the same "attentions" (each
    stage's last sum before its activation) as PLOP's forward; a swapped pair changes the logits."""
    data = save_and_load(tmp_path, plop_checkpoint(plop))
    assert detect_layout(data) == "mib"  # PLOP's default layout is MiB's, key for key
    assert checkpoint_step(data) is None
    model = incseg_model()
    state = convert_checkpoint(data, model, layout="plop")
    auto = convert_checkpoint(data, model)
    assert state.keys() == auto.keys() and all(torch.equal(state[k], auto[k]) for k in state)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys)
    difference, expected = _max_difference(model, plop, image)
    print(f"PLOP: max |logit difference| {difference:.2e}, logit scale {expected.abs().max():.2f}")
    assert difference < 1e-5
    for a, b in [
        ("head.map_convs.2.weight", "head.map_convs.3.weight"),
        ("body.mod3.block2.convs.bn1.weight", "body.mod3.block2.convs.bn2.weight"),
        ("head.global_pooling_bn.bias", "head.red_bn.bias"),
    ]:
        swapped = _swap(data, "model_state", f"module.{a}", f"module.{b}")
        model.load_state_dict(convert_plop(swapped, model), strict=False)
        with torch.no_grad():
            assert (model(image).logits - expected).abs().max() > 1e-3, (a, b)


def test_detect_layout_tells_the_layouts_apart():
    t = torch.zeros(1)
    assert (
        detect_layout({"segmentor": {"module.encoder.conv1.weight": t}, "task_id": 0})
        == "cssegmentation"
    )
    assert detect_layout({"model_state": {"module.body.mod1.conv1.weight": t}}) == "mib"
    assert (
        detect_layout({"model_state": {"module.body.mod1.conv1.weight": t, "module.scalar": t}})
        == "plop"
    )
    # a classifier without bias
    assert detect_layout({"model_state": {"cls.0.weight": t}}) == "plop"
    assert detect_layout({"encoder.conv1.weight": t, "convs_cls.0.bias": t}) == "cssegmentation"
    assert detect_layout({"module.body.mod1.conv1.weight": t, "module.cls.0.bias": t}) == "mib"
    expected = (
        r"unknown checkpoint layout: expected a cssegmentation checkpoint \(a dict with "
        r"'segmentor'.*'model_state'.*bare state dict"
    )
    with pytest.raises(
        CheckpointError, match=expected + r".*got a dict with keys \['epoch', 'state_dict'\]"
    ):
        detect_layout({"state_dict": {"conv1.weight": t}, "epoch": 90})  # an ImageNet checkpoint
    with pytest.raises(CheckpointError, match=expected + ".*got a list"):
        detect_layout([t])
    with pytest.raises(CheckpointError, match=expected):
        detect_layout({"backbone.conv1.weight": t})  # incseg's own names
    with pytest.raises(CheckpointError, match="'segmentor' is a list, not a state dict"):
        detect_layout({"segmentor": [t]})


def test_mismatches_and_unsupported_checkpoints_are_named(csseg, plop):
    model = incseg_model()
    data = csseg_checkpoint(csseg)
    state = dict(data["segmentor"])
    state.pop("module.decoder.out_project.0.weight")
    state["module.decoder.extra.weight"] = torch.zeros(1)
    message = (
        r"cssegmentation weights do not match the model: 1 missing \(e.g. "
        r"\['decoder.out_project.0.weight'\]\), 1 unexpected \(e.g. \['decoder.extra.weight'\]\)$"
    )
    with pytest.raises(CheckpointError, match=message):
        convert_checkpoint({**data, "segmentor": state}, model)
    state = {k: v for k, v in data["segmentor"].items() if "num_batches_tracked" not in k}
    assert (
        convert_checkpoint({"segmentor": state}, model).keys()
        == convert_checkpoint(data, model).keys()
    )
    with pytest.raises(
        CheckpointError,
        match=r"has 2 classifiers \(steps 0..1\), the model 1: build the model for step 1",
    ):
        convert_checkpoint(data, incseg_model((16,)))
    bad = {**data["segmentor"], "module.convs_cls.1.weight": torch.zeros(6, HEAD, 1, 1)}
    message = (
        r"'convs_cls.1.weight' has shape \(6, 32, 1, 1\), "
        r"incseg 'classifiers.1.weight' expects \(5, 32, 1, 1\)"
    )
    with pytest.raises(CheckpointError, match=message):
        convert_checkpoint({"segmentor": bad}, model)
    with pytest.raises(
        CheckpointError, match="not a cssegmentation checkpoint: no 'segmentor' entry"
    ):
        convert_checkpoint(plop_checkpoint(plop), model, layout="cssegmentation")
    message = r"layout 'official'; expected auto or one of \['mib', 'cssegmentation', 'plop'\]"
    with pytest.raises(ConfigError, match=message):
        convert_checkpoint(data, model, layout="official")

    plop_data = plop_checkpoint(plop)
    cosine = {
        k: v
        for k, v in plop_data["model_state"].items()
        if not k.endswith("bias") or ".cls." not in k
    }
    with pytest.raises(CheckpointError, match="PLOP checkpoint trained with --cosine"):
        convert_checkpoint({"model_state": {**cosine, "module.scalar": torch.tensor(1.0)}}, model)
    modes = {k: v for k, v in plop_data["model_state"].items() if ".cls." not in k}
    for index, channels in enumerate((3, 15, 5)):  # --nb_background_modes 3: [3, 16 - 1, 5]
        modes[f"module.cls.{index}.weight"] = torch.zeros(channels, HEAD, 1, 1)
        modes[f"module.cls.{index}.bias"] = torch.zeros(channels)
    with pytest.raises(
        CheckpointError, match="PLOP checkpoint trained with --nb_background_modes 3"
    ):
        convert_checkpoint({"model_state": modes}, model, layout="plop")
    message = (
        r"MiB weights do not match the model: 0 missing \(e.g. \[\]\), 2 unexpected "
        r"\(e.g. \['cls.2.bias', 'cls.2.weight'\]\); the checkpoint has 3 classifiers"
    )
    with pytest.raises(CheckpointError, match=message):
        convert_checkpoint({"model_state": modes}, model, layout="mib")

    torch.manual_seed(0)
    relu = build_segmenter("resnet50", CLASSES, output_stride=16, norm="bn", head_channels=HEAD)
    with pytest.raises(CheckpointError, match="trained with In-Place ABN .* model.norm: iabn"):
        convert_checkpoint(data, relu)
    tiny = build_segmenter("tiny", CLASSES, output_stride=16, norm="iabn", head_channels=HEAD)
    with pytest.raises(
        CheckpointError, match="hold a ResNet: build the model with model.backbone: resnet101"
    ):
        convert_checkpoint(data, tiny)


def test_numpy_scores_load_and_other_objects_do_not(tmp_path):
    """best_score is a numpy float in real checkpoints (numpy 1 wrote them, as
    ``numpy.core.multiarray.scalar``); a plain weights-only load refuses it, the foreign loader
    takes it, and still refuses any other object."""
    checkpoint = {
        "segmentor": {"module.convs_cls.0.bias": torch.ones(2)},
        "best_score": np.float64(0.661),
    }
    torch.save(checkpoint, tmp_path / "saved.pth", _use_new_zipfile_serialization=False)
    raw = (tmp_path / "saved.pth").read_bytes()  # a plain pickle: GLOBAL names the constructor
    names = {1: b"numpy.core.multiarray\nscalar", 2: b"numpy._core.multiarray\nscalar"}
    ours = next(name for name in names.values() if name in raw)
    for version, name in names.items():
        (tmp_path / f"numpy{version}.pth").write_bytes(raw.replace(ours, name))
    for name in ("numpy1.pth", "numpy2.pth"):
        with pytest.raises(CheckpointError, match="a safe .weights-only. load refuses"):
            load_torch_file(tmp_path / name, "a checkpoint")
        data = load_foreign_checkpoint(tmp_path / name)
        assert data["best_score"] == pytest.approx(0.661) and torch.equal(
            data["segmentor"]["module.convs_cls.0.bias"], torch.ones(2)
        )
    torch.save({"segmentor": {}, "best_score": Fraction(1, 3)}, tmp_path / "other.pth")
    message = (
        r"other.pth: holds Python objects that a safe \(weights-only\) load refuses.*"
        "expected a step checkpoint of MiB, PLOP or cssegmentation, or a detectron2 model_final.pth"
    )
    with pytest.raises(CheckpointError, match=message):
        load_foreign_checkpoint(tmp_path / "other.pth")


def test_import_checkpoint_command_reads_a_cssegmentation_file(csseg, image, tmp_path, capsys):
    """``incseg import-checkpoint`` on a cssegmentation step file: the written incseg checkpoint
    restores a model with the foreign logits; a --step that contradicts the file's task_id, and
    an existing --out, are refused."""
    from incseg.cli import main
    from incseg.engine.checkpoint import load_checkpoint
    from incseg.engine.model_io import restore_step

    torch.save(csseg_checkpoint(csseg), tmp_path / "epoch_30.pth")
    model = f"model={{backbone: resnet50, output_stride: 16, norm: iabn, head_channels: {HEAD}}}"
    args = [
        "import-checkpoint",
        str(tmp_path / "epoch_30.pth"),
        "voc/15-5-overlap-mib",
        "--step",
        "1",
        "--out",
        str(tmp_path / "step_1.pt"),
        "--set",
        model,
        "--set",
        "data={dataset: shapes}",
    ]
    assert main(args) == 0
    _, info, restored = restore_step(load_checkpoint(tmp_path / "step_1.pt"))
    assert info.channels_per_step == CLASSES
    difference, _ = _max_difference(restored.eval(), csseg, image)
    assert difference < 1e-5
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    args[4], args[6] = "0", str(tmp_path / "other.pt")
    assert main(args) == 2
    assert "says it is step 1" in capsys.readouterr().err
