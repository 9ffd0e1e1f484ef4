"""detectron2-style checkpoints of Mask2Former and the query-based continual methods -> incseg's
query model (``incseg import-checkpoint --layout detectron2``).

:func:`detectron2_to_incseg` maps a detectron2 model state dict onto the state dict of a
:class:`~incseg.models.mask2former.segmenter.QuerySegmenter`; :func:`detectron2_backbone` maps the
ResNet part alone onto a :class:`~incseg.models.mask2former.backbone.ResNetFeatures`;
:func:`load_detectron2_pickle` reads detectron2's ``.pkl`` files (numpy arrays in a pickle)
without running code. Every key is accounted for: a key without a place or a model entry without
a value is an error that names them.

Sources (file:line): facebookresearch/detectron2 at 02b5c4e, facebookresearch/Mask2Former at
9b0651c, fcdl94/CoMFormer at 640496b, clovaai/ECLIPSE at 9266720, jinpeng0528/BalConpas at
3b76142, SooLab/SimCIS at 28bc91e.

Files
-----
* ``.pth`` (detectron2's ``Checkpointer.save``): ``{"model": state_dict, "trainer": ...,
  "iteration": N}`` or, trimmed for release, the state dict alone; read with a weights-only
  ``torch.load``. ``DetectionCheckpointer`` saves the model unwrapped from DDP (no ``module.``;
  one is dropped if present).
* ``.pkl`` (``detectron2/checkpoint/detection_checkpoint.py:70-84``): a pickle (Python 2's,
  hence ``encoding="latin1"``) of ``{"model": {name: ndarray}, "__author__": ...}`` (model zoo,
  e.g. Mask2Former's ``model_final_*.pkl`` and ``R-50.pkl`` made by
  ``tools/convert-torchvision-to-d2.py:33-46``) or a Caffe2 dict of arrays (MSRA's ``R-101.pkl``,
  names ``res2_0_branch2a_w``; detection files put them under ``"blobs"``; ``*_momentum`` is
  dropped). Caffe2 names become detectron2's as ``checkpoint/c2_model_loading.py:9-62`` does
  for a ResNet. The pickle may name only the globals that rebuild numpy arrays (and an
  ``OrderedDict`` or a latin-1 ``bytes``): anything else is refused, naming the global.

ResNet names (detectron2 -> torchvision, as incseg's ResNetFeatures)
--------------------------------------------------------------------
``detectron2/modeling/backbone/resnet.py``: the stem's ``conv1`` (``:344-352``), stages
``res2``..``res5`` (``:403-406``), blocks ``conv1``..``conv3`` (``:149-176``) and ``shortcut`` on
a stage's first block (``:133-140``), each a ``Conv2d`` holding its norm as ``.norm``
(``layers/wrappers.py:117-121``). So ``stem.conv1`` -> ``conv1``, ``stem.conv1.norm`` -> ``bn1``,
``resJ.B.convK[.norm]`` -> ``layer{J-1}.B.convK`` / ``bnK``, ``shortcut[.norm]`` ->
``downsample.0`` / ``downsample.1``. The configs build ``STRIDE_IN_1X1: False`` (stride in the
3x3 conv, torchvision's v1.5; Mask2Former ``Base-ADE20K-SemanticSegmentation.yaml``, BalConpas
and SimCIS ``maskformer2_R101_*.yaml``), as ResNetFeatures. The norm is ``FrozenBN`` by default,
whose state has no ``num_batches_tracked`` (``layers/batch_norm.py:43``): it is filled with 0
for incseg's BatchNorm (eval reads only the running statistics, as FrozenBN). Caffe2 ImageNet
files hold only the folded scale and shift; their running statistics become 0 and 1, as
detectron2 fills them (``layers/batch_norm.py:80-86``). MSRA's files expect BGR input in
0..255; the weights are taken as they are (BalConpas loads MSRA's ``R-101.pkl`` into a network
fed RGB with torchvision's statistics the same way). A backbone other than ResNet-50/101 (a Swin,
``backbone.patch_embed``) has no counterpart; a custom backbone's keys (incseg's tiny one in the
tests) keep their names.

Decoders
--------
``sem_seg_head.pixel_decoder.*`` -> ``pixel_decoder.*`` and ``sem_seg_head.predictor.*`` ->
``predictor.*``: incseg's modules carry the official names (``MaskFormerHead`` holds exactly
these two). ``predictor.static_query`` (checkpoints before version 2) is ``query_feat``
(Mask2Former ``mask2former_transformer_decoder.py:210-224``). Not part of the network and dropped:
``criterion.*`` (the loss's ``empty_weight``, ``modeling/criterion.py:115``, a submodule of the
model since ``maskformer_model.py:74``) and ``pixel_mean`` / ``pixel_std`` (non-persistent from
``maskformer_model.py:84-85``, kept only in older files).

Class heads (incseg: ``classifiers.{s}`` per step, then ``no_object``; logits in that order)
--------------------------------------------------------------------------------------------
* Mask2Former: ``class_embed.{weight,bias}``, one ``Linear(hidden, K + 1)``, the last row
  no-object (``mask2former_transformer_decoder.py:333``). Its rows are split by the model's
  step sizes.
* CoMFormer: ``class_embed.cls.{i}`` (``continual/modeling/classifier.py:28-42``), built from
  ``[1] + classes`` (``mask2former_transformer_decoder.py:341-345``), ``classes =
  [BASE_CLS] + TASK * [INC_CLS]`` (``:359``), the first grown by one for a background class with
  ``MASK_BG`` (``:363-366``); ``forward`` puts ``cls.0`` last (``classifier.py:39-42``). So
  ``cls.0`` -> ``no_object`` and ``cls.{s+1}`` -> ``classifiers.{s}``. ``CONT.COSINE``
  (``CosineClassifier``, ``:45-59``) and ``CONT.USE_BIAS False`` leave the layers without bias:
  refused (a cosine head normalises, which incseg's head does not).
* ECLIPSE: CoMFormer's head (``continual/modeling/classifier.py:49-70``; decoder
  ``mask2former_transformer_decoder.py:399-410``), but with ``CONT.DEEP_CLS`` each ``cls.{i}`` is
  a 3-layer MLP (``classifier.py:53-55``, keys ``cls.{i}.layers.{0,1,2}``), which every released
  script sets (``script/ade_ss/100_5.sh:26``, also for step 0): read into incseg's MLP
  classifiers (``class_head: mlp``, the same ``layers.k`` names), ``cls.0`` -> ``no_object``.
  From step 1 its visual prompts (``prompt_feat``, ``prompt_embed``, ``prompt_mask_embed``,
  ``prompt_no_obj_embed``, ``:365-382, 416-424``) are refused: only its step-0 file imports.
* BalConpas: ``class_embeds.{i}`` (``mask2former_transformer_decoder.py:337-342``), one per
  step seen (``n_cls_in_tasks[:task]``, ``CONT.TASK`` counted from 1, ``:371-379``), the first
  ``Linear(hidden, C_0 + 1)`` whose last row is no-object, moved last in the logits
  (``:465-468``). So ``class_embeds.0`` rows ``[:-1]`` -> ``classifiers.0``, its last row ->
  ``no_object``, ``class_embeds.{s}`` -> ``classifiers.{s}``.
* SimCIS: a MaskDINO-style decoder (no ``query_feat`` / ``query_embed``, ``:347-349``; query
  selection by ``enc_output``, ``encoder_norm``, ``ref_point_head``, ``query_scale``,
  ``_bbox_embed`` shared as ``bbox_embed.{l}``, ``:400-410``) with a fixed ``class_embed =
  Linear(hidden, 150)`` and no no-object row (``:378``). incseg's selection decoder
  (``model.mask2former.decoder: selection``, ``class_head: static``) carries the same names;
  ``class_embed.{weight,bias}`` -> ``class_embed.full.*``, every class's row, seen or not, so
  the base step's file loads at any step's model. Into Mask2Former's decoder it is refused,
  naming those keys.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import nn

from incseg.errors import CheckpointError

HEAD = "sem_seg_head."
PREDICTOR = "sem_seg_head.predictor."
# dropped: not parameters of the network (module docstring, "Decoders")
_DROPPED = re.compile(r"(criterion\..+|pixel_mean|pixel_std)")
# an ImageNet classifier beside a backbone: torchvision's ``fc`` (``stem.fc`` once through
# convert-torchvision-to-d2.py:35-36) or detectron2's ``linear`` (resnet.py:424)
_CLASSIFIER = re.compile(r"(backbone\.)?(stem\.fc|fc|linear)\.(weight|bias)")
# incseg's class head
_STEP = "predictor.class_embed.classifiers.{}.{}"
_NO_OBJECT = "predictor.class_embed.no_object.{}"
_STATIC = "predictor.class_embed.full.{}"  # SimCIS's one layer over every class
_SHOWN = 6  # names listed per kind in an error message


# --- ResNet names -----------------------------------------------------------------------------

_D2_BLOCK = re.compile(r"res([2-5])\.(\d+)\.(conv[1-3]|shortcut)(\.norm)?\.(\w+)")
_TV_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.[01])\.(\w+)")


def torchvision_name(name: str) -> str | None:
    """The torchvision name of a detectron2 ResNet key without ``backbone.``
    (``res3.0.shortcut.norm.bias`` -> ``layer2.0.downsample.1.bias``); ``None`` for a key that
    is not one of a ResNet's."""
    if name == "stem.conv1.weight":
        return "conv1.weight"
    if name.startswith("stem.conv1.norm."):
        return "bn1." + name.removeprefix("stem.conv1.norm.")
    match = _D2_BLOCK.fullmatch(name)
    if match is None:
        return None
    stage, block, part, norm, leaf = match.groups()
    if part == "shortcut":
        part = "downsample.1" if norm else "downsample.0"
    elif norm:
        part = "bn" + part[-1]
    return f"layer{int(stage) - 1}.{block}.{part}.{leaf}"


def resnet_d2_name(name: str) -> str | None:
    """The inverse of :func:`torchvision_name` (``None`` for a key that is not a ResNet's)."""
    if name == "conv1.weight":
        return "stem.conv1.weight"
    if name.startswith("bn1."):
        return "stem.conv1.norm." + name.removeprefix("bn1.")
    match = _TV_BLOCK.fullmatch(name)
    if match is None:
        return None
    layer, block, part, leaf = match.groups()
    if part.startswith("bn"):
        part = f"conv{part[-1]}.norm"
    elif part.startswith("downsample"):
        part = "shortcut.norm" if part.endswith("1") else "shortcut"
    return f"res{int(layer) + 1}.{block}.{part}.{leaf}"


_C2_LEAVES = {"w": "weight", "b": "bias", "s": "weight", "rm": "running_mean", "riv": "running_var"}
_C2_BRANCHES = {
    "branch1": "shortcut",
    "branch2a": "conv1",
    "branch2b": "conv2",
    "branch2c": "conv3",
}
_C2_BLOCK = re.compile(r"res([2-5])_(\d+)_(branch1|branch2[abc])(_bn)?_(w|b|s|rm|riv)")
_C2_STEM = re.compile(r"(res_)?conv1(_bn)?_(w|b|s|rm|riv)")
_C2_CLASSIFIER = re.compile(r"(fc1000|pred)_[wb]")


def caffe2_name(name: str) -> str | None:
    """The detectron2 name of a Caffe2 ResNet blob (``res2_0_branch2a_bn_s`` ->
    ``res2.0.conv1.norm.weight``), as ``c2_model_loading.py:9-62`` renames a ResNet; ``""`` for
    the ImageNet classifier (``fc1000_*``), which a segmentation backbone drops; ``None`` for
    any other name."""
    if _C2_CLASSIFIER.fullmatch(name):
        return ""
    match = _C2_STEM.fullmatch(name)
    if match:
        prefix, norm, leaf = match.groups()
        if bool(prefix) != bool(norm) or (not norm and leaf != "w"):
            return None  # conv1_w and res_conv1_bn_*: nothing else
        return "stem.conv1." + ("norm." if norm else "") + _C2_LEAVES[leaf]
    match = _C2_BLOCK.fullmatch(name)
    if match is None:
        return None
    stage, block, branch, norm, leaf = match.groups()
    if not norm and leaf not in ("w", "b"):
        return None
    part = _C2_BRANCHES[branch] + (".norm" if norm else "")
    return f"res{stage}.{block}.{part}.{_C2_LEAVES[leaf]}"


# --- reading .pkl files without running code --------------------------------------------------


class RefusedGlobal(CheckpointError):
    """A pickle names a global that a numpy-only load does not allow."""


def _latin1_bytes(text: str = "", encoding: str = "latin1", *rest: Any) -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol < 3, for latin-1 only."""
    if rest or encoding.replace("-", "").lower() != "latin1" or not isinstance(text, str):
        raise RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()``, as Python 3 pickles an empty bytes at protocol < 3; nothing else."""
    if args:
        raise RefusedGlobal("builtins.bytes with arguments")
    return b""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickle of numpy arrays names, under numpy 1's and numpy 2's module names:
    the array and scalar constructors (taken from what numpy's own pickles call), ``ndarray``,
    ``dtype``, plus a dict and a latin-1 ``bytes``."""
    import numpy as np

    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.float32(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], Any] = {}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("collections", "OrderedDict")] = OrderedDict
    allowed[("_codecs", "encode")] = _latin1_bytes
    for builtins in ("builtins", "__builtin__"):
        allowed[(builtins, "bytes")] = _empty_bytes
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :func:`_allowed_globals` and never imports a module."""

    def __init__(self, handle: Any) -> None:
        super().__init__(handle, encoding="latin1")
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise RefusedGlobal(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedGlobal("a persistent id (a PyTorch file is a .pth, not a .pkl)")


def _as_tensor(value: Any, where: str) -> torch.Tensor:
    import numpy as np

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return torch.from_numpy(value.astype(value.dtype.newbyteorder("="), copy=True))
    raise CheckpointError(f"{where} is a {type(value).__name__}, not a numeric array")


def load_detectron2_pickle(path: str | Path) -> dict[str, Any]:
    """A detectron2 ``.pkl`` as ``{"model": {detectron2 name: tensor}, "__author__": ...}``,
    read without running code (module docstring, "Files"); Caffe2 names are renamed to
    detectron2's.

    Raises:
        CheckpointError: a missing or unreadable file, a pickle naming any global but those
            that rebuild numpy arrays (the message names the file and the global), or entries
            that are not numeric arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (expected a detectron2 .pkl checkpoint)")
    try:
        with open(path, "rb") as handle:
            data = _ArrayUnpickler(handle).load()
    except RefusedGlobal as err:
        torch_hint = (
            " (PyTorch objects: a torch.save file, name it .pth)"
            if str(err).startswith("torch")
            else ""
        )
        raise CheckpointError(
            f"{path}: refused: the pickle names {err}{torch_hint}, and a detectron2 .pkl may hold "
            "only numpy arrays; incseg does not run code from checkpoint files"
        ) from None
    except Exception as err:  # noqa: BLE001 -- a corrupt pickle raises many types
        raise CheckpointError(
            f"{path}: not a readable pickle ({type(err).__name__}: {err}); expected a detectron2 "
            ".pkl checkpoint"
        ) from None
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not a dict of arrays")
    if isinstance(data.get("model"), Mapping) and "__author__" in data:
        weights, author = data["model"], str(data["__author__"])
    else:  # Caffe2 / Detectron1 (detection_checkpoint.py:78-84)
        weights, author = data.get("blobs", data), "Caffe2"
        if not isinstance(weights, Mapping):
            raise CheckpointError(f"{path}: 'blobs' is a {type(weights).__name__}, not a dict")
        renamed = {}
        for key, value in weights.items():
            if str(key).endswith("_momentum"):
                continue
            name = caffe2_name(str(key))
            if name != "":  # "" is the ImageNet classifier
                renamed[key if name is None else name] = value
        weights = renamed
    model = {str(k): _as_tensor(v, f"{path}: entry {k!r}") for k, v in weights.items()}
    return {"model": model, "__author__": author}


# --- telling the layout -----------------------------------------------------------------------


def _unwrap(data: Any) -> Mapping[str, Any] | None:
    """The model state dict of a detectron2 checkpoint (``data["model"]`` or ``data`` itself),
    without ``module.``; ``None`` if there is none."""
    if not isinstance(data, Mapping):
        return None
    state = data.get("model", data)
    if not isinstance(state, Mapping) or not state:
        return None
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def is_detectron2(data: Any) -> bool:
    """Whether ``data`` (a loaded checkpoint) is detectron2's: a state dict with
    ``sem_seg_head.`` keys, bare or under ``"model"``, or anything read from a ``.pkl``."""
    if isinstance(data, Mapping) and "__author__" in data and "model" in data:
        return True
    state = _unwrap(data)
    return state is not None and any(k.startswith(HEAD) for k in state)


# --- mapping ----------------------------------------------------------------------------------


def _refuse_variants(state: Mapping[str, Any], selection: bool, mlp: bool) -> None:
    """Heads and decoders that the model built cannot compute, refused with the option that made
    them (module docstring, "Class heads"); ``selection``: the model has SimCIS's decoder,
    ``mlp``: MLP classifiers (``class_head: mlp``)."""
    keys = list(state)

    def having(pattern: str) -> list[str]:
        return [k for k in keys if re.match(pattern, k)]

    simcis = having(rf"{re.escape(PREDICTOR)}(ref_point_head|enc_output|query_scale|bbox_embed)\.")
    if simcis and not selection:
        raise CheckpointError(
            f"a SimCIS decoder ({simcis[0]}, ...; query selection and a static class head, "
            "SimCIS mask2former_transformer_decoder.py:378, 400-410): build the model with "
            "model.mask2former.decoder: selection, class_head: static, background: false "
            "(the ade/*-simcis configs)"
        )
    prompts = having(rf"{re.escape(PREDICTOR)}prompt_(feat|embed|mask_embed|no_obj_embed)\.")
    if prompts:
        raise CheckpointError(
            f"ECLIPSE visual prompts ({prompts[0]}, ...; CONT.NUM_PROMPTS > 0, steps >= 1): "
            "incseg imports ECLIPSE's step-0 weights (no prompts) only"
        )
    deep = having(rf"{re.escape(PREDICTOR)}class_embed\.cls\.\d+\.layers\.")
    if deep and not mlp:
        raise CheckpointError(
            f"an ECLIPSE class head with CONT.DEEP_CLS True ({deep[0]}: a 3-layer MLP per step, "
            "ECLIPSE continual/modeling/classifier.py:53-55): build the model with "
            "model.mask2former.class_head: mlp (the ade/*-eclipse configs)"
        )
    for key in having(rf"{re.escape(PREDICTOR)}class_embeds?\.(cls\.)?\d+\.weight$"):
        if key.removesuffix("weight") + "bias" not in state:
            raise CheckpointError(
                f"{key} has no bias: a CoMFormer head trained with CONT.COSINE (a cosine "
                "classifier, CoMFormer continual/modeling/classifier.py:45-59) or CONT.USE_BIAS "
                "False, which incseg's head (linear layers with bias) does not compute"
            )
    swin = having(r"backbone\.(patch_embed|layers)\.")
    if swin:
        raise CheckpointError(
            f"a Swin backbone ({swin[0]}, ...): incseg's query model takes ResNet-50/101 "
            "(model.backbone: resnet50 or resnet101)"
        )


_MLP_LEAVES = {f"layers.{k}.{leaf}" for k in range(3) for leaf in ("weight", "bias")}


def _rows(group: Mapping[str, Any]) -> int:
    """Outputs of a classifier given as ``{leaf: tensor}``: a linear layer's ``weight`` rows or
    an MLP's last layer's (``layers.2.weight``)."""
    return group["weight" if "weight" in group else "layers.2.weight"].shape[0]


def _model_sizes(model_state: Mapping[str, torch.Tensor]) -> list[int]:
    """Rows of each step's classifier in the model (step 0's without background when the head
    has none), linear layers or MLPs."""
    sizes = []
    while True:
        step = len(sizes)
        key = _STEP.format(step, "weight")
        key = key if key in model_state else _STEP.format(step, "layers.2.weight")
        if key not in model_state:
            return sizes
        sizes.append(model_state[key].shape[0])


def _indexed(state: Mapping[str, Any], prefix: str) -> dict[int, dict[str, Any]]:
    """``prefix{i}.{leaf}`` entries grouped by ``i`` (``leaf``: ``weight``, ``bias``, or an
    MLP's ``layers.k.weight`` / ``layers.k.bias``)."""
    groups: dict[int, dict[str, Any]] = {}
    for key, value in state.items():
        match = re.fullmatch(re.escape(prefix) + r"(\d+)\.((?:layers\.\d+\.)?(?:weight|bias))", key)
        if match:
            groups.setdefault(int(match[1]), {})[match[2]] = value
    return groups


def _head_parts(
    state: Mapping[str, Any],
) -> tuple[str, set[str], list[dict[str, Any]], dict[str, Any]] | None:
    """The checkpoint's class head as (its kind, the keys it uses, ``{leaf: tensor}`` per step,
    no-object's ``{leaf: tensor}``), Mask2Former's single layer as one step; ``None`` if there is
    no class head (module docstring, "Class heads")."""

    def last_row(group: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return {k: v[:-1] for k, v in group.items()}, {k: v[-1:] for k, v in group.items()}

    single = {
        leaf: state[key]
        for leaf in ("weight", "bias")
        if (key := f"{PREDICTOR}class_embed.{leaf}") in state
    }
    if single:
        classes, no_object = last_row(single)
        used = {f"{PREDICTOR}class_embed.{leaf}" for leaf in single}
        return "Mask2Former class_embed", used, [classes], no_object
    for prefix, kind in (
        (f"{PREDICTOR}class_embed.cls.", "CoMFormer/ECLIPSE class_embed.cls"),
        (f"{PREDICTOR}class_embeds.", "BalConpas class_embeds"),
    ):
        groups = _indexed(state, prefix)
        if not groups:
            continue
        used = {f"{prefix}{i}.{leaf}" for i, group in groups.items() for leaf in group}
        if sorted(groups) != list(range(len(groups))):
            raise CheckpointError(f"{kind}: layers {sorted(groups)} are not numbered 0..n")
        ordered = [groups[i] for i in range(len(groups))]
        if kind.startswith("CoMFormer"):  # cls.0 is no-object
            return kind, used, ordered[1:], ordered[0]
        classes, no_object = last_row(ordered[0])  # no-object is the first layer's last row
        return kind, used, [classes, *ordered[1:]], no_object
    return None


def _class_head(
    state: Mapping[str, Any], sizes: list[int]
) -> tuple[dict[str, torch.Tensor], set[str], str]:
    """The class head's tensors in incseg names, the checkpoint keys they used, and the head's
    kind (``""`` without one). A step count or a step size that differs is an error."""
    parts = _head_parts(state)
    if parts is None:
        return {}, set(), ""
    kind, used, steps, no_object = parts
    leaves = set(no_object)
    if leaves not in ({"weight", "bias"}, _MLP_LEAVES) or any(set(g) != leaves for g in steps):
        raise CheckpointError(
            f"{kind}: a classifier without weight or bias, or not the 3-layer MLP of the others"
        )
    if kind.startswith("Mask2Former"):  # one layer for every class: split by the model's steps
        total = steps[0]["weight"].shape[0]
        if total != sum(sizes):
            raise CheckpointError(
                f"{PREDICTOR}class_embed has {total} classes and no-object; the model's steps "
                f"have {sum(sizes)} ({sizes}){_background_hint(total - sum(sizes))}"
            )
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        steps = [
            {leaf: value[a:b] for leaf, value in steps[0].items()} for a, b in pairwise(bounds)
        ]
    elif len(steps) != len(sizes):
        raise CheckpointError(
            f"the checkpoint's class head ({kind}) has {len(steps)} steps (0..{len(steps) - 1}), "
            f"the model {len(sizes)}: build the model for --step {len(steps) - 1}"
        )
    out = {}
    for step, (group, size) in enumerate(zip(steps, sizes)):
        have = _rows(group)
        if have != size:
            hint = _background_hint(have - size) if step == 0 else ""
            raise CheckpointError(
                f"{kind}: step {step} has {have} classes, the model's step {step} {size}{hint}"
            )
        out |= {_STEP.format(step, leaf): value.clone() for leaf, value in group.items()}
    out |= {_NO_OBJECT.format(leaf): value.clone() for leaf, value in no_object.items()}
    return out, used, kind


def _static_head(
    state: Mapping[str, Any], model_state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], set[str], str]:
    """SimCIS's ``class_embed = Linear(hidden, 150)`` (module docstring, "Class heads") as
    incseg's static head ``class_embed.full``: every class's row, seen or not, no no-object."""
    used = {f"{PREDICTOR}class_embed.{leaf}" for leaf in ("weight", "bias")}
    if not used <= set(state):
        return {}, set(), ""
    rows = state[f"{PREDICTOR}class_embed.weight"].shape[0]
    want = model_state[_STATIC.format("weight")].shape[0]
    if rows != want:
        raise CheckpointError(
            f"{PREDICTOR}class_embed has {rows} rows, the model's static head {want} (every "
            "class of the setting, no background, no no-object: SimCIS's is 150 on ADE20K)"
        )
    out = {
        _STATIC.format(leaf): state[f"{PREDICTOR}class_embed.{leaf}"].clone()
        for leaf in ("weight", "bias")
    }
    return out, used, "SimCIS class_embed (static)"


def _head_of_model(
    state: Mapping[str, Any], model_state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], set[str], str]:
    """The class head read as the model's kind of head wants it (SimCIS's static head or a head
    per step), after refusing what the model cannot compute."""
    static = _STATIC.format("weight") in model_state
    mlp = _NO_OBJECT.format("layers.0.weight") in model_state
    _refuse_variants(state, selection=static, mlp=mlp)
    if static:
        return _static_head(state, model_state)
    out, used, kind = _class_head(state, _model_sizes(model_state))
    if any(key not in model_state for key in out):
        have, want = ("mlp", "linear") if mlp else ("linear", "mlp")
        raise CheckpointError(
            f"the checkpoint's class head ({kind}) has {want} classifiers, the model {have} "
            f"ones: set model.mask2former.class_head: {want}"
        )
    return out, used, kind


def _background_hint(extra: int) -> str:
    if extra == 1:
        return " (the checkpoint has a background class: set model.mask2former.background: true)"
    if extra == -1:
        return " (the checkpoint has no background class: set model.mask2former.background: false)"
    return ""


def incseg_name(key: str) -> str | None:
    """The incseg name of a detectron2 key outside the class head (``None``: no place)."""
    if key.startswith("backbone."):
        rest = key.removeprefix("backbone.")
        return "backbone." + (torchvision_name(rest) or rest)
    if key.startswith((HEAD + "pixel_decoder.", PREDICTOR)):
        name = key.removeprefix(HEAD)
        return name.replace("predictor.static_query.", "predictor.query_feat.")
    return None


def detectron2_name(key: str) -> str:
    """The detectron2 name of an incseg key (for messages; the class head by Mask2Former's)."""
    if key.startswith("backbone."):
        rest = key.removeprefix("backbone.")
        return "backbone." + (resnet_d2_name(rest) or rest)
    if key.startswith("predictor.class_embed."):
        return PREDICTOR + "class_embed.*"
    return HEAD + key


def _fill(key: str, given: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor | None:
    """What a norm entry the checkpoint lacks becomes: ``num_batches_tracked`` 0 (FrozenBN has
    none), and running statistics 0 and 1 for a norm whose weight is given (Caffe2's folded
    ImageNet norms, ``layers/batch_norm.py:80-86``); ``None`` for anything else."""
    owner, _, leaf = key.rpartition(".")
    if leaf == "num_batches_tracked":
        return torch.zeros_like(like)
    if leaf in ("running_mean", "running_var") and f"{owner}.weight" in given:
        return torch.zeros_like(like) if leaf == "running_mean" else torch.ones_like(like)
    return None


def _listed(missing: Iterable[str], unexpected: Iterable[str]) -> str:
    """``N missing (a, b, ...), M unexpected (c, ...)``, leaving out an empty kind."""
    parts = []
    for kind, names in (("missing", missing), ("unexpected", unexpected)):
        names = sorted(set(names))
        if names:
            more = ", ..." if len(names) > _SHOWN else ""
            parts.append(f"{len(names)} {kind} ({', '.join(names[:_SHOWN])}{more})")
    return ", ".join(parts)


def _resnet_depth(keys: Iterable[str], stage: str) -> int | None:
    """50 or 101 from the block count of the third stage (``stage``: its key pattern)."""
    blocks = {m[1] for k in keys if (m := re.match(stage, k))}
    return {6: 50, 23: 101}.get(len(blocks))


def implied_sizes(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The ``model.mask2former`` sizes a detectron2 state dict was trained with (those its
    shapes tell), for messages."""
    sizes = {}

    def rows(key: str, index: int = 0) -> int | None:
        value = state.get(key)
        return None if value is None else int(value.shape[index])

    def count(pattern: str) -> int:
        return len({m[1] for k in state if (m := re.match(pattern, k))})

    found = {
        "num_queries": rows(PREDICTOR + "query_feat.weight"),
        "hidden_dim": rows(PREDICTOR + "query_feat.weight", 1),
        "dec_layers": count(rf"{re.escape(PREDICTOR)}transformer_ffn_layers\.(\d+)\."),
        "dim_feedforward": rows(PREDICTOR + "transformer_ffn_layers.0.linear1.weight"),
        "mask_dim": rows(PREDICTOR + "mask_embed.layers.2.weight"),
        "conv_dim": rows(HEAD + "pixel_decoder.mask_features.weight", 1),
        "enc_layers": count(
            rf"{re.escape(HEAD)}pixel_decoder\.transformer\.encoder\.layers\.(\d+)\."
        ),
        "enc_dim_feedforward": rows(
            HEAD + "pixel_decoder.transformer.encoder.layers.0.linear1.weight"
        ),
    }
    offsets = rows(
        HEAD + "pixel_decoder.transformer.encoder.layers.0.self_attn.sampling_offsets.weight"
    )
    if offsets:  # heads x 3 levels x 4 points x 2 (msdeformattn.py)
        found["nheads"] = offsets // 24
    for name, value in found.items():
        if value:
            sizes[name] = value
    return sizes


def detectron2_to_incseg(
    state: Mapping[str, Any], model_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A detectron2 model state dict (Mask2Former, CoMFormer, ECLIPSE at step 0, BalConpas,
    SimCIS) -> the state dict of the incseg query model whose state is
    ``model_state`` (its keys and shapes), complete: it loads with ``strict=True``.

    Args:
        state: ``checkpoint["model"]`` (or a bare state dict), detectron2 names, with or without
            ``module.``; tensors.
        model_state: ``model.state_dict()`` of the QuerySegmenter of the checkpoint's step.

    Raises:
        CheckpointError: a head or decoder incseg cannot compute (named with the option that made
            it), keys without a place or model entries without a value (both listed, in the
            checkpoint's names), a class head of another step count or size, or shapes that differ
            (with the sizes the checkpoint implies).
    """
    given = {str(k).removeprefix("module."): v for k, v in state.items()}
    for key, value in given.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"detectron2 entry {key!r} is a {type(value).__name__}, not a tensor"
            )
    given = {k: v for k, v in given.items() if not _DROPPED.fullmatch(k)}
    out, used, head_kind = _head_of_model(given, model_state)
    unexpected = []
    for key, value in given.items():
        if key in used:
            continue
        name = incseg_name(key)
        if name is None or name not in model_state or name.startswith("predictor.class_embed."):
            unexpected.append(key)
        else:
            out[name] = value
    missing = []
    for key, like in model_state.items():
        if key not in out:
            filled = _fill(key, out, like)
            if filled is None:
                missing.append(detectron2_name(key))
            else:
                out[key] = filled
    if missing or unexpected:
        raise CheckpointError(
            f"detectron2 weights do not match the model: {_listed(missing, unexpected)}"
            f"{_mismatch_hint(given, model_state, head_kind)}"
        )
    for key, like in model_state.items():
        if tuple(out[key].shape) != tuple(like.shape):
            raise CheckpointError(
                f"detectron2 {detectron2_name(key)} has shape {tuple(out[key].shape)}, incseg "
                f"{key!r} expects {tuple(like.shape)}; the checkpoint's sizes: "
                f"{implied_sizes(given)} (set model.mask2former to them)"
            )
    return out


def _mismatch_hint(
    given: Mapping[str, Any], model_state: Mapping[str, torch.Tensor], head_kind: str
) -> str:
    hints = []
    if not any(k.startswith(HEAD) for k in given):
        hints.append(
            "the file holds no sem_seg_head.* (pixel decoder and predictor): backbone weights "
            "alone, such as detectron2's ImageNet R-50.pkl / R-101.pkl, make no step checkpoint"
        )
    elif not head_kind:
        hints.append(
            f"no class head found ({PREDICTOR}class_embed.weight/bias, class_embed.cls.N.* or "
            "class_embeds.N.*)"
        )
    depth = _resnet_depth(given, r"(?:backbone\.)?res4\.(\d+)\.")
    if depth and depth != _resnet_depth(model_state, r"backbone\.layer3\.(\d+)\."):
        hints.append(
            f"the checkpoint's backbone is a ResNet-{depth}: set model.backbone: resnet{depth}"
        )
    return "".join(f"; {hint}" for hint in hints)


def convert_detectron2(data: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """A loaded detectron2 checkpoint (``{"model": ...}``, a bare state dict, or what
    :func:`load_detectron2_pickle` returned) -> a complete state dict for ``model``.

    Raises:
        CheckpointError: ``model`` is not the query-based model, no state dict in ``data``, or
            what :func:`detectron2_to_incseg` refuses.
    """
    head = getattr(getattr(model, "predictor", None), "class_embed", None)
    if not (hasattr(head, "no_object") or hasattr(head, "full")):
        raise CheckpointError(
            "detectron2 checkpoints hold Mask2Former: build the model with "
            "model.architecture: mask2former"
        )
    state = _unwrap(data)
    if state is None:
        raise CheckpointError(
            "not a detectron2 checkpoint: expected a dict with 'model' (a state dict of tensors) "
            "or a bare state dict"
        )
    return detectron2_to_incseg(state, model.state_dict())


def detectron2_backbone(
    state: Mapping[str, Any], backbone_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The ResNet weights of a detectron2 state dict (``backbone.``-prefixed, as in a full
    checkpoint, or bare, as in ``R-50.pkl`` and renamed Caffe2 files) -> a complete state dict
    for a :class:`~incseg.models.mask2former.backbone.ResNetFeatures` whose state is
    ``backbone_state``. Keys outside the backbone (``sem_seg_head.*``, ...) are ignored.

    Raises:
        CheckpointError: backbone keys without a place or backbone entries without a value (both
            listed), or shapes that differ.
    """
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        key = str(key).removeprefix("module.")
        if key.startswith(HEAD) or _DROPPED.fullmatch(key) or _CLASSIFIER.fullmatch(key):
            continue
        rest = key.removeprefix("backbone.")
        name = torchvision_name(rest)
        if name is None or name not in backbone_state:
            unexpected.append(key)
        else:
            out[name] = _as_tensor(value, f"detectron2 entry {key!r}")
    missing = []
    for key, like in backbone_state.items():
        if key not in out:
            filled = _fill(key, out, like)
            if filled is None:
                missing.append(resnet_d2_name(key) or key)
            else:
                out[key] = filled
    if missing or unexpected:
        raise CheckpointError(
            f"detectron2 backbone weights do not match the ResNet: {_listed(missing, unexpected)}"
        )
    for key, like in backbone_state.items():
        if tuple(out[key].shape) != tuple(like.shape):
            raise CheckpointError(
                f"detectron2 {resnet_d2_name(key)} has shape {tuple(out[key].shape)}, the ResNet's "
                f"{key!r} {tuple(like.shape)} (ResNet-50 or -101?)"
            )
    return out
