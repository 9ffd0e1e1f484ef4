"""Import of detectron2-style checkpoints of Mask2Former and the query-based continual methods
(``incseg import-checkpoint --layout detectron2``, ``incseg.models.m2f_imports``).

Each test restates, literally, how the other codebase names the weights of an incseg model filled
with random values: detectron2's ResNet names (facebookresearch/detectron2 02b5c4e
``modeling/backbone/resnet.py``, ``layers/wrappers.py``; FrozenBN keeps no
``num_batches_tracked``), MSRA's Caffe2 names (``checkpoint/c2_model_loading.py``),
``sem_seg_head.`` for the decoders, and the three class heads: Mask2Former's one layer with
no-object last, CoMFormer's ``class_embed.cls.i`` with no-object at 0, BalConpas's
``class_embeds.i`` with no-object the first layer's last row (file:line in the module). The
restated file is imported through the command line and the imported model must hold the same
weights and predict the same scores.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from incseg.cli import main
from incseg.config import load_config
from incseg.engine.checkpoint import load_checkpoint
from incseg.engine.model_io import build_model, restore_step
from incseg.errors import CheckpointError
from incseg.models.imports import convert_checkpoint, detect_layout, load_foreign_checkpoint
from incseg.models.m2f_imports import (
    caffe2_name,
    detectron2_backbone,
    detectron2_to_incseg,
    load_detectron2_pickle,
)
from incseg.models.mask2former.backbone import ResNetFeatures
from incseg.protocol import get_setting, step_info

SIZES = (
    "{num_queries: 6, hidden_dim: 16, nheads: 2, dec_layers: 2, dim_feedforward: 16, "
    "conv_dim: 32, mask_dim: 16, enc_layers: 1, enc_dim_feedforward: 16, background: %s}"
)
CONFIG = """\
data: {dataset: shapes}
protocol: {setting: 15-5, mode: overlap}
model: {backbone: tiny, norm: bn, architecture: mask2former, mask2former: %s}
method: {name: m2f_ft}
"""
P = "sem_seg_head.predictor."
FROZEN_BN = ("weight", "bias", "running_mean", "running_var")
BLOCKS = (3, 4, 6, 3)  # ResNet-50


def write_config(tmp_path, background=True):
    path = tmp_path / f"m2f-{background}.yaml"
    path.write_text(CONFIG % (SIZES % str(background).lower()))
    return path


def randomised(net, seed):
    """``net`` with every float parameter and buffer moved away from its init (running variances
    kept positive), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in net.state_dict().items():
            if value.is_floating_point():
                noise = torch.randn(value.shape, generator=generator)
                value.copy_(noise.abs() + 0.5 if name.endswith("running_var") else noise * 0.2)
    return net.eval()


def query_model(config_path, step, seed=0):
    config = load_config(config_path, [])
    info = step_info(get_setting(config.family, config.protocol.setting), step)
    return randomised(build_model(config, info, pretrained=False), seed)


def as_detectron2(model, head):
    """The query model's state as detectron2 saves the official (``head="mask2former"``),
    CoMFormer's or BalConpas's model: a custom backbone keeps its module names,
    ``MaskFormerHead`` adds ``sem_seg_head.``, the criterion's ``empty_weight`` comes along."""
    state = model.state_dict()
    out = {}
    for key, value in state.items():
        if key.startswith("backbone."):
            out[key] = value
        elif ".class_embed." not in key:
            out["sem_seg_head." + key] = value
    steps = len(model.classifiers)
    classes = [
        (
            state[f"predictor.class_embed.classifiers.{s}.weight"],
            state[f"predictor.class_embed.classifiers.{s}.bias"],
        )
        for s in range(steps)
    ]
    no_object = (
        state["predictor.class_embed.no_object.weight"],
        state["predictor.class_embed.no_object.bias"],
    )
    if head == "mask2former":  # Linear(hidden, K + 1), no-object last
        out[P + "class_embed.weight"] = torch.cat([w for w, _ in classes] + [no_object[0]])
        out[P + "class_embed.bias"] = torch.cat([b for _, b in classes] + [no_object[1]])
    elif head == "comformer":  # IncrementalClassifier([1] + classes): cls.0 is no-object
        for i, (weight, bias) in enumerate([no_object, *classes]):
            out[P + f"class_embed.cls.{i}.weight"] = weight
            out[P + f"class_embed.cls.{i}.bias"] = bias
    else:  # BalConpas: class_embeds.0 = Linear(hidden, C_0 + 1), no-object its last row
        first = (torch.cat([classes[0][0], no_object[0]]), torch.cat([classes[0][1], no_object[1]]))
        for i, (weight, bias) in enumerate([first, *classes[1:]]):
            out[P + f"class_embeds.{i}.weight"] = weight
            out[P + f"class_embeds.{i}.bias"] = bias
    out["criterion.empty_weight"] = torch.ones(sum(w.shape[0] for w, _ in classes) + 1)
    return out


def resnet_as_detectron2(net):
    """A ResNetFeatures' state under detectron2's ResNet names, FrozenBN (no
    ``num_batches_tracked``), as in a full checkpoint (``backbone.`` prefix)."""
    state = net.state_dict()
    out = {"backbone.stem.conv1.weight": state["conv1.weight"]}
    out |= {f"backbone.stem.conv1.norm.{leaf}": state[f"bn1.{leaf}"] for leaf in FROZEN_BN}
    for stage, count in enumerate(BLOCKS, start=2):
        for block in range(count):
            d2, tv = f"backbone.res{stage}.{block}", f"layer{stage - 1}.{block}"
            for k in (1, 2, 3):
                out[f"{d2}.conv{k}.weight"] = state[f"{tv}.conv{k}.weight"]
                out |= {
                    f"{d2}.conv{k}.norm.{leaf}": state[f"{tv}.bn{k}.{leaf}"] for leaf in FROZEN_BN
                }
            if block == 0:
                out[f"{d2}.shortcut.weight"] = state[f"{tv}.downsample.0.weight"]
                out |= {
                    f"{d2}.shortcut.norm.{leaf}": state[f"{tv}.downsample.1.{leaf}"]
                    for leaf in FROZEN_BN
                }
    return out


def resnet_as_caffe2(net):
    """A ResNetFeatures' convolutions and norm scale/shift under MSRA's Caffe2 blob names (numpy
    arrays; no running statistics, as in the folded ImageNet files), with the ImageNet classifier
    and a momentum blob."""
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    out = {"conv1_w": state["conv1.weight"], "res_conv1_bn_s": state["bn1.weight"]}
    out["res_conv1_bn_b"] = state["bn1.bias"]
    for stage, count in enumerate(BLOCKS, start=2):
        for block in range(count):
            c2, tv = f"res{stage}_{block}", f"layer{stage - 1}.{block}"
            branches = {"branch2a": ("conv1", "bn1"), "branch2b": ("conv2", "bn2")}
            branches["branch2c"] = ("conv3", "bn3")
            if block == 0:
                branches["branch1"] = ("downsample.0", "downsample.1")
            for branch, (conv, norm) in branches.items():
                out[f"{c2}_{branch}_w"] = state[f"{tv}.{conv}.weight"]
                out[f"{c2}_{branch}_bn_s"] = state[f"{tv}.{norm}.weight"]
                out[f"{c2}_{branch}_bn_b"] = state[f"{tv}.{norm}.bias"]
    out["fc1000_w"] = np.zeros((1000, 2048), np.float32)
    out["fc1000_b"] = np.zeros(1000, np.float32)
    out["conv1_w_momentum"] = np.zeros(3, np.float32)
    return out


def import_cli(source, config, step, out, *extra):
    args = ["import-checkpoint", str(source), str(config), "--step", str(step), "--out", str(out)]
    return main([*args, *extra])


def assert_same_model(restored, original):
    restored.eval()
    got, want = restored.state_dict(), original.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [
        k for k in want if not torch.equal(got[k], want[k])
    ]
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scores = restored.prediction_scores(restored(image))
        expected = original.prediction_scores(original(image))
    assert torch.equal(scores, expected)


# --- backbone -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return randomised(ResNetFeatures(50, "bn"), 3)


def test_detectron2_resnet_names_load_into_resnet_features(resnet50):
    """detectron2's stem/res2..res5/convK.norm/shortcut names land on torchvision's, FrozenBN's
    missing ``num_batches_tracked`` is filled, and the features are identical."""
    restated = resnet_as_detectron2(resnet50)
    assert len(restated) == len(resnet50.state_dict()) - 53  # 53 BatchNorms, no counters
    fresh = ResNetFeatures(50, "bn")
    fresh.load_state_dict(detectron2_backbone(restated, fresh.state_dict()), strict=True)
    fresh.eval()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in resnet50.state_dict().items())
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got, want = fresh(image), resnet50(image)
    assert all(torch.equal(got[name], want[name]) for name in want)
    # bare names (torchvision's R-50.pkl through convert-torchvision-to-d2.py) load the same
    bare = {k.removeprefix("backbone."): v for k, v in restated.items()}
    bare |= {"stem.fc.weight": torch.zeros(1000, 2048), "stem.fc.bias": torch.zeros(1000)}
    assert detectron2_backbone(bare, fresh.state_dict()).keys() == fresh.state_dict().keys()
    with pytest.raises(CheckpointError, match=r"1 missing \(res5.0.conv2.norm.weight\)$"):
        detectron2_backbone(
            {k: v for k, v in restated.items() if k != "backbone.res5.0.conv2.norm.weight"},
            fresh.state_dict(),
        )


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_caffe2_imagenet_pickle_is_read_without_code(resnet50, tmp_path, protocol):
    """MSRA's blob names become detectron2's (the classifier and momenta dropped); the folded
    norms get running statistics 0 and 1, as detectron2 fills them."""
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps(resnet_as_caffe2(resnet50), protocol=protocol))
    data = load_detectron2_pickle(path)
    assert data["__author__"] == "Caffe2" and "stem.conv1.norm.weight" in data["model"]
    fresh = ResNetFeatures(50, "bn")
    state = detectron2_backbone(data["model"], fresh.state_dict())
    original = resnet50.state_dict()
    for key, value in state.items():
        if key.endswith(("running_mean", "num_batches_tracked")):
            assert not value.any(), key
        elif key.endswith("running_var"):
            assert bool((value == 1).all()), key
        else:
            assert torch.equal(value, original[key]), key
    assert caffe2_name("res4_5_branch2b_bn_riv") == "res4.5.conv2.norm.running_var"
    assert caffe2_name("res_conv1_bn_rm") == "stem.conv1.norm.running_mean"
    assert caffe2_name("res2_0_branch1_w") == "res2.0.shortcut.weight"
    assert caffe2_name("fc1000_b") == "" and caffe2_name("res2_0_branch9_w") is None


def test_a_python2_pickle_loads(tmp_path):
    """MSRA's files are Python 2 pickles: strings (the array bytes among them) are 8-bit
    ``SHORT_BINSTRING``s, read as latin-1 text, and numpy takes them as the array's bytes."""
    raw = np.array([1.5, -2.25], "<f4").tobytes()
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85U\x01b"
        b"\x87Rq\x03(K\x01K\x02\x85cnumpy\ndtype\nq\x04U\x02f4K\x00K\x01\x87Rq\x05(K\x03U\x01<"
        b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x08" + raw + b"tb"
    )
    path = tmp_path / "R-101.pkl"
    path.write_bytes(b"\x80\x02}q\x00U\x07conv1_wq\x06" + array + b"s.")
    model = load_detectron2_pickle(path)["model"]
    assert list(model) == ["stem.conv1.weight"]
    assert torch.equal(model["stem.conv1.weight"], torch.tensor([1.5, -2.25]))


# --- the whole model through the command line ------------------------------------------------


@pytest.mark.parametrize(
    ("head", "step", "background"),
    [
        ("mask2former", 0, True),
        ("mask2former", 1, False),
        ("comformer", 1, True),
        ("comformer", 1, False),
        ("balconpas", 1, False),
    ],
)
def test_import_checkpoint_reads_a_detectron2_file(tmp_path, capsys, head, step, background):
    """``{"model": ..., "iteration": ...}`` of each class-head layout, imported with
    ``--layout auto``: the same weights and the same prediction scores."""
    config = write_config(tmp_path, background)
    original = query_model(config, step, seed=10 + step)
    source = tmp_path / "model_final.pth"
    torch.save({"model": as_detectron2(original, head), "iteration": 89999}, source)
    assert detect_layout(torch.load(source, weights_only=True)) == "detectron2"
    assert import_cli(source, config, step, tmp_path / "imported.pt") == 0
    assert "wrote" in capsys.readouterr().out
    _, info, restored = restore_step(load_checkpoint(tmp_path / "imported.pt"))
    assert info.step == step
    assert_same_model(restored, original)


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_model_zoo_pickle_imports_the_same(tmp_path, protocol):
    """A ``.pkl`` in detectron2's model-zoo format (numpy arrays, ``__author__``), named
    ``--layout detectron2``."""
    config = write_config(tmp_path)
    original = query_model(config, 0, seed=4)
    arrays = {k: v.numpy() for k, v in as_detectron2(original, "mask2former").items()}
    source = tmp_path / "model_final_abc123.pkl"
    source.write_bytes(pickle.dumps({"model": arrays, "__author__": "test"}, protocol=protocol))
    out = tmp_path / "imported.pt"
    assert import_cli(source, config, 0, out, "--layout", "detectron2") == 0
    assert_same_model(restore_step(load_checkpoint(out))[2], original)


class _Runs:
    """Pickled as a call to ``builtins.print``, which a numpy-only load must refuse."""

    def __reduce__(self):
        return (print, ("this ran",))


@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        (None, "os.system"),  # protocol 0 GLOBAL, written by hand
        ({"model": {"w": np.zeros(2)}, "__author__": _Runs()}, "builtins.print"),
    ],
)
def test_a_pickle_naming_another_global_is_refused_by_name(tmp_path, capsys, payload, refused):
    marker = tmp_path / "ran"
    source = tmp_path / "evil.pkl"
    if payload is None:
        source.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    else:
        source.write_bytes(pickle.dumps(payload, protocol=4))
    assert import_cli(source, write_config(tmp_path), 0, tmp_path / "x.pt") == 2
    captured = capsys.readouterr()
    assert refused in captured.err and str(source) in captured.err
    assert "Traceback" not in captured.err and "this ran" not in captured.out
    assert not marker.exists() and not (tmp_path / "x.pt").exists()


def test_missing_and_unexpected_keys_are_named(tmp_path, capsys):
    config = write_config(tmp_path)
    state = as_detectron2(query_model(config, 0), "mask2former")
    del state[P + "query_embed.weight"], state["sem_seg_head.pixel_decoder.mask_features.bias"]
    state[P + "extra_proj.weight"] = torch.zeros(2)
    source = tmp_path / "model_final.pth"
    torch.save({"model": state}, source)
    assert import_cli(source, config, 0, tmp_path / "x.pt") == 2
    err = capsys.readouterr().err
    assert "2 missing (sem_seg_head.pixel_decoder.mask_features.bias, " in err
    assert f"{P}query_embed.weight), 1 unexpected ({P}extra_proj.weight)" in err
    assert "Traceback" not in err


def test_backbone_weights_alone_are_refused_with_the_reason(resnet50, tmp_path, capsys):
    source = tmp_path / "R-50.pkl"
    source.write_bytes(pickle.dumps(resnet_as_caffe2(resnet50)))
    assert import_cli(source, write_config(tmp_path), 0, tmp_path / "x.pt") == 2
    err = capsys.readouterr().err
    assert "backbone weights alone" in err and "set model.backbone: resnet50" in err


def test_class_heads_of_another_step_or_background_are_named(tmp_path):
    config = write_config(tmp_path)
    step0 = query_model(config, 0)
    step1 = query_model(config, 1)
    with pytest.raises(CheckpointError, match="has 2 steps .* build the model for --step 1"):
        detectron2_to_incseg(as_detectron2(step1, "comformer"), step0.state_dict())
    no_background = query_model(write_config(tmp_path, False), 0)
    with pytest.raises(CheckpointError, match="set model.mask2former.background: true"):
        detectron2_to_incseg(as_detectron2(step0, "mask2former"), no_background.state_dict())
    with pytest.raises(CheckpointError, match="set model.mask2former.background: false"):
        detectron2_to_incseg(as_detectron2(no_background, "balconpas"), step0.state_dict())
    wide = load_config(config, ["model.mask2former.num_queries=8"])
    model = build_model(wide, step_info(get_setting(wide.family, "15-5"), 0), pretrained=False)
    with pytest.raises(CheckpointError, match=r"'num_queries': 6, 'hidden_dim': 16"):
        detectron2_to_incseg(as_detectron2(step0, "mask2former"), model.state_dict())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({P + "class_embed.cls.1.layers.0.weight": torch.zeros(1)}, "CONT.DEEP_CLS True"),
        ({P + "prompt_feat.0.weight": torch.zeros(1)}, "ECLIPSE visual prompts"),
        ({P + "ref_point_head.layers.0.weight": torch.zeros(1)}, "a SimCIS decoder"),
        ({"backbone.patch_embed.proj.weight": torch.zeros(1)}, "a Swin backbone"),
    ],
)
def test_heads_incseg_cannot_compute_are_refused(tmp_path, extra, message):
    model = query_model(write_config(tmp_path), 1)
    with pytest.raises(CheckpointError, match=message):
        detectron2_to_incseg(as_detectron2(model, "comformer") | extra, model.state_dict())
    no_bias = as_detectron2(model, "comformer")
    del no_bias[P + "class_embed.cls.2.bias"]
    with pytest.raises(CheckpointError, match="CONT.COSINE"):
        detectron2_to_incseg(no_bias, model.state_dict())


def test_layouts_are_told_apart(tmp_path):
    model = query_model(write_config(tmp_path), 0)
    state = as_detectron2(model, "mask2former")
    assert detect_layout(state) == detect_layout({"model": state, "iteration": 1}) == "detectron2"
    assert detect_layout({"model_state": {"body.conv1.weight": torch.zeros(1)}}) == "mib"
    assert detect_layout({"module." + k: v for k, v in state.items()}) == "detectron2"
    converted = convert_checkpoint(state, model, layout="detectron2")
    assert converted.keys() == model.state_dict().keys()
    with pytest.raises(CheckpointError, match="not found"):
        load_foreign_checkpoint(tmp_path / "missing.pkl")


SIMCIS_SIZES = SIZES % "false"
SIMCIS_CONFIG = CONFIG.replace("m2f_ft", "simcis") % (
    SIMCIS_SIZES[:-1] + ", decoder: selection, class_head: static, inference: simcis}"
)


def simcis_as_detectron2(model):
    """SimCIS's model as its repository saves it (SooLab/SimCIS
    ``mask2former_transformer_decoder.py:343-410``): incseg's selection decoder carries the
    official names (``enc_output``, ``encoder_norm``, ``ref_point_head``, ``query_scale``,
    ``_bbox_embed`` and the shared ``bbox_embed.i``), and the static head is one
    ``class_embed = Linear(hidden, C)`` over every class, with no no-object row."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            out[key] = value
        else:
            out["sem_seg_head." + key.replace("class_embed.full.", "class_embed.")] = value
    return out


@pytest.mark.parametrize("step", [0, 1])
def test_simcis_weights_import_into_its_decoder(tmp_path, step, capsys):
    config = tmp_path / "simcis.yaml"
    config.write_text(SIMCIS_CONFIG)
    original = query_model(config, step, seed=20 + step)
    state = simcis_as_detectron2(original)
    assert P + "class_embed.weight" in state and state[P + "class_embed.weight"].shape[0] == 20
    source = tmp_path / "model_final.pth"
    torch.save({"model": state, "iteration": 159999}, source)
    assert import_cli(source, config, step, tmp_path / "imported.pt") == 0
    assert_same_model(restore_step(load_checkpoint(tmp_path / "imported.pt"))[2], original)
    # into Mask2Former's decoder: refused with the keys that build SimCIS's
    plain = query_model(write_config(tmp_path, background=False), step)
    with pytest.raises(CheckpointError, match="decoder: selection, class_head: static"):
        detectron2_to_incseg(state, plain.state_dict())
    narrow = state | {P + "class_embed.weight": state[P + "class_embed.weight"][:15]}
    with pytest.raises(
        CheckpointError, match="class_embed has 15 rows, the model's static head 20"
    ):
        detectron2_to_incseg(narrow, original.state_dict())


ECLIPSE_CONFIG = CONFIG.replace("m2f_ft", "eclipse") % (
    (SIZES % "false")[:-1]
    + ", class_head: mlp, inference: eclipse, mask_activation: sigmoid, prompts: 5}"
)


def eclipse_as_detectron2(model):
    """ECLIPSE's step-0 model as its repository saves it with ``CONT.DEEP_CLS`` (clovaai/ECLIPSE
    ``continual/modeling/classifier.py:49-70``): CoMFormer's ``class_embed.cls.i`` with
    no-object at 0, each a 3-layer MLP (``layers.0..2``)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            out[key] = value
            continue
        key = key.replace("class_embed.no_object.", "class_embed.cls.0.")
        for step in range(len(model.classifiers)):
            key = key.replace(f"class_embed.classifiers.{step}.", f"class_embed.cls.{step + 1}.")
        out["sem_seg_head." + key] = value
    return out


def test_eclipse_step0_weights_with_mlp_classifiers_import(tmp_path):
    config = tmp_path / "eclipse.yaml"
    config.write_text(ECLIPSE_CONFIG)
    original = query_model(config, 0, seed=30)
    state = eclipse_as_detectron2(original)
    assert P + "class_embed.cls.0.layers.2.weight" in state
    assert P + "class_embed.cls.1.layers.2.weight" in state
    source = tmp_path / "ade_ss_100_step0.pth"
    torch.save({"model": state, "iteration": 159999}, source)
    assert import_cli(source, config, 0, tmp_path / "imported.pt") == 0
    assert_same_model(restore_step(load_checkpoint(tmp_path / "imported.pt"))[2], original)
    linear = query_model(write_config(tmp_path, background=False), 0)
    with pytest.raises(CheckpointError, match="CONT.DEEP_CLS True .*class_head: mlp"):
        detectron2_to_incseg(state, linear.state_dict())
    with pytest.raises(CheckpointError, match="linear classifiers, the model mlp ones"):
        detectron2_to_incseg(as_detectron2(linear, "comformer"), original.state_dict())
    broken = {k: v for k, v in state.items() if k != P + "class_embed.cls.1.layers.1.bias"}
    with pytest.raises(CheckpointError, match="not the 3-layer MLP of the others"):
        detectron2_to_incseg(broken, original.state_dict())
