"""Step checkpoints of other codebases -> incseg state dicts: MiB, PLOP, cssegmentation and
detectron2's (Mask2Former, CoMFormer, ECLIPSE, BalConpas: :mod:`incseg.models.m2f_imports`).

One entry point, :func:`convert_checkpoint`, takes what ``torch.load`` returned for a foreign step
checkpoint and the incseg model of the same step, tells the layout apart (:func:`detect_layout`)
and returns the model's state dict. Every foreign key is accounted for: a key without a place or
a model parameter without a value is an error naming them. All three codebases build DeepLabV3 on
a ResNet with In-Place ABN (BatchNorm + leaky ReLU 0.01 scaled by ``|gamma| + eps``), which is
incseg's ``norm: iabn`` once the norm weights are converted (see :mod:`incseg.models.official`).

Sources (file:line): fcdl94/MiB at 1c58983, arthurdouillard/CVPR2021_PLOP at 4b4a060,
SegmentationBLWX/cssegmentation at c125175 (paths under ``csseg/``), mapillary/inplace_abn at
b50bfe9 and tag v1.0.7.

In-Place ABN, common to all three
---------------------------------
* ``InPlaceABN``/``InPlaceABNSync`` scale by ``|weight| + eps``: inplace_abn
  ``src/inplace_abn_cpu.cpp:121-126`` and ``src/inplace_abn_kernels.cuh:145`` (v1.0.7: cpu
  ``:91-95``). The plain ``ABN`` class uses ``weight`` as it is (``inplace_abn/abn.py:134-143``);
  none of the published recipes uses it (MiB and PLOP default to ``iabn_sync``, PLOP
  ``argparser.py:221-226``; cssegmentation's configs use ``InPlaceABNSync``).
* Buffers: ``running_mean``, ``running_var``; ``num_batches_tracked`` only from inplace_abn 1.1
  (``inplace_abn/abn.py:76-81``; v1.0.7 ``abn.py:45-46`` has none). MiB and PLOP pin 1.0.7 (MiB
  ``README.md:17``, PLOP ``README.md:38``); cssegmentation installs the current one
  (``requirements/bricks.txt``). ``num_batches_tracked`` is therefore optional and dropped
  (eval does not read it).

MiB (``layout="mib"``)
----------------------
Names and wrapper as :mod:`incseg.models.official`: ``{"model_state": ..., "epoch", ...}`` (MiB
``run.py:26-37``), keys ``module.body`` / ``module.head`` / ``module.cls.i``.

PLOP (``layout="plop"``)
------------------------
PLOP is a fork of MiB and its checkpoints have MiB's layout key for key:

* the same wrapper, ``trainer_state`` included (``run.py:25-36``; MiB ``run.py:26-37``), the
  model behind apex's DistributedDataParallel, hence ``module.`` (``run.py:299``); files
  ``{checkpoint}/{task}-{dataset}_{name}_{step}.pth`` (``run.py:173, 453, 485``);
* the same body: ``mod1.{conv1,bn1,pool1}`` and ``modN.blockK.{convs.{convI,bnI},proj_conv,proj_bn}``
  (``models/resnet.py:61-97``, ``modules/residual.py:84-115``). The one change, ``last=`` on each
  stage's last block (``models/resnet.py:82-89``, ``modules/residual.py:117, 127-138``), makes that
  block also return its sum before the activation (the "attentions" PLOP distils, incseg's
  ``stage1``..``stage4`` features); it adds no parameter;
* the same head (``modules/deeplab.py`` is identical to MiB's) and classifiers ``cls.i``.

What PLOP adds are options that change the classifier (``segmentation_module.py``): ``--cosine``
normalises features and weights, drops the biases and adds a ``scalar`` parameter
(``:104, 116, 129-133, 168-185``); ``--nb_background_modes M`` (M > 1) splits the background into
M channels of an extra first classifier fused at run time (``:106-108, 181-182, 198-210``). Neither
is a 1x1 conv per step, so both are refused with an error naming the option. Their defaults
(``argparser.py:464, 478``) and every published script leave them off. Without them a PLOP
checkpoint cannot be told from a MiB one, and :func:`detect_layout` names it ``mib``; both
convert the same way.

cssegmentation (``layout="cssegmentation"``)
--------------------------------------------
* Wrapper: the runner saves ``state()``: ``{"segmentor": segmentor.state_dict(), "task_id",
  "best_score", "cur_epoch", "cur_iter", "optimizer", "amp" or "grad_scaler"}``
  (``modules/runners/base.py:250-259``, ``modules/models/schedulers/base.py:60-65``) as
  ``work_dir/task_{task_id}/epoch_{N}.pth`` (``runners/base.py:38, 156-159``). The segmentor is
  always inside DistributedDataParallel (``runners/base.py:101-120``, ``modules/parallel/model.py:11-12``),
  hence ``module.``; ``test.py:45-48`` loads ``ckpts["segmentor"]``.
* Segmentor (``modules/models/segmentors/base.py:29-34``): ``encoder``, ``decoder`` and
  ``convs_cls.i``, one 1x1 conv with bias per task, sizes ``len(tasks[task][s])`` for
  ``s <= task_id`` (``modules/datasets/base.py:144-146``), logits concatenated (``base.py:44-45``).
  MiB and PLOP segmentors add no module (``segmentors/mib.py``, ``segmentors/plop.py``).
* Encoder: ``ResNetILT`` (MiB) or ``ResNetPLOP`` (PLOP), with ``deep_stem=False`` and
  ``contract_dilation=False`` (``encoders/resnetilt.py:32-34``, ``encoders/resnetplop.py:63-66``),
  so torchvision's names: ``conv1``, ``bn1`` (``encoders/resnet.py:142-145``),
  ``layerN.K.{conv1,bn1,conv2,bn2,conv3,bn3}`` (``resnet.py:68-75``), ``layerN.0.downsample.{0,1}``
  (``resnet.py:226-229``). Output stride 16: strides (1, 2, 2, 1), dilations (1, 1, 1, 2) for every
  block of a stage (``resnet.py:120-126, 216-217``), the stride on the 3x3 conv (``resnet.py:70``),
  as incseg's ResNet. Norms (``configs/mib/base_cfg.py:13-16``, ``configs/plop/base_cfg.py:13-16``):
  ``InPlaceABNSync`` with leaky ReLU 0.01, ``bn3`` and ``downsample.1`` with identity activation,
  a ``LeakyReLU(0.01)`` after the sum (``resnet.py:81-94``); ``act_cfg=None`` builds
  ``nn.Identity`` (``encoders/bricks/activation/builder.py:21-22``), no parameter.
  ``ResNetPLOP`` only changes the forward (also returns the sum before the last activation,
  ``resnetplop.py:43-58``).
* Decoder ``ASPPHead`` (``modules/models/decoders/aspphead.py:25-47``, configs ``base_cfg.py:20-29``:
  dilations (1, 6, 12, 18), 256 channels): ``parallel_convs.{0..3}`` (``0`` is 1x1),
  ``parallel_bn``, ``global_branch.{0: conv, 1: norm, 3: conv}``, ``out_project.{0: conv,
  1: norm}``; the pooled branch is added before ``out_project.1`` (``aspphead.py:49-64``), as
  MiB's head and incseg's.

Not a parameter, so not checked here: at test time the MiB, PLOP and cssegmentation heads average
32x32 feature windows (PLOP ``modules/deeplab.py:72-89``, ``aspphead.py:66-78``), incseg the whole
map; the two agree when the feature map is at most 32x32 (512 pixels at output stride 16).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from incseg.errors import CheckpointError, ConfigError
from incseg.models.m2f_imports import convert_detectron2, is_detectron2, load_detectron2_pickle
from incseg.models.official import IABN_EPS, official_name
from incseg.torchfile import load_torch_file

LAYOUTS = ("mib", "cssegmentation", "plop")  # DeepLab step checkpoints
QUERY_LAYOUTS = ("detectron2",)  # Mask2Former and the query-based methods (m2f_imports.py)

# incseg key -> cssegmentation key (without ``module.``); see the module docstring for sources.
_CSSEG_RULES = [  # (incseg pattern, cssegmentation template)
    (r"backbone\.((?:conv1|bn1)\.[a-z_]+)", "encoder.{0}"),
    (
        r"backbone\.(layer[1-4]\.\d+\.(?:conv[1-3]|bn[1-3]|downsample\.[01])\.[a-z_]+)",
        "encoder.{0}",
    ),
    (r"head\.branches\.(\d+)\.(.+)", "decoder.parallel_convs.{0}.{1}"),
    (r"head\.branch_norm\.0\.(.+)", "decoder.parallel_bn.{0}"),
    (r"head\.pool\.1\.(.+)", "decoder.global_branch.0.{0}"),
    (r"head\.pool\.2\.0\.(.+)", "decoder.global_branch.1.{0}"),
    (r"head\.pool\.3\.(.+)", "decoder.global_branch.3.{0}"),
    (r"head\.reduce\.(.+)", "decoder.out_project.0.{0}"),
    (r"head\.out_norm\.0\.(.+)", "decoder.out_project.1.{0}"),
    (r"classifiers\.(\d+)\.(.+)", "convs_cls.{0}.{1}"),
]
# First key component of each layout's model state dict (after ``module.``).
_ROOTS = {"mib": ("body", "head", "cls"), "cssegmentation": ("encoder", "decoder", "convs_cls")}
_WRAPPERS = {"segmentor": "cssegmentation", "model_state": "mib"}
_EXPECTED = (
    "a cssegmentation checkpoint (a dict with 'segmentor', runners/base.py:250-254), a MiB or "
    "PLOP checkpoint (a dict with 'model_state', run.py save_ckpt), or a bare state dict with "
    "body./head./cls. (MiB, PLOP) or encoder./decoder./convs_cls. (cssegmentation) keys, or a "
    "detectron2 checkpoint (Mask2Former and the query-based methods: sem_seg_head. keys, bare "
    "or under 'model')"
)


def cssegmentation_name(key: str) -> str | None:
    """The cssegmentation name of one incseg state-dict key (``None`` for ``num_batches_tracked``).

    Raises:
        CheckpointError: ``key`` has no cssegmentation counterpart (e.g. the tiny backbone).
    """
    if key.endswith("num_batches_tracked"):
        return None
    for pattern, template in _CSSEG_RULES:
        match = re.fullmatch(pattern, key)
        if match:
            return template.format(*match.groups())
    raise CheckpointError(f"no cssegmentation name for incseg parameter {key!r}")


def _strip(state: Mapping[str, Any]) -> dict[str, Any]:
    """Keys without the ``module.`` of (Distributed)DataParallel, and without the optional
    ``num_batches_tracked`` of In-Place ABN >= 1.1 (module docstring)."""
    out = {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        if not name.endswith(".num_batches_tracked"):
            out[name] = value
    return out


def _num_classifiers(names: Any, root: str) -> int:
    return len({n.split(".")[1] for n in names if n.startswith(f"{root}.")})


def _convert(
    state: Mapping[str, Any],
    model: nn.Module,
    name_of: Callable[[str], str | None],
    layout: str,
    classifier_root: str,
) -> dict[str, torch.Tensor]:
    """Foreign tensors -> ``model``'s state dict (without ``num_batches_tracked``), every key
    accounted for; norm weights become ``|gamma| + eps`` (In-Place ABN)."""
    wanted = {}
    for key, value in model.state_dict().items():
        name = name_of(key)
        if name is not None:
            wanted[name] = (key, value.shape)
    given = _strip(state)
    missing, unexpected = sorted(wanted.keys() - given.keys()), sorted(given.keys() - wanted.keys())
    if missing or unexpected:
        have = _num_classifiers(given, classifier_root)
        need = _num_classifiers(wanted, classifier_root)
        hint = ""
        if have != need:
            hint = (
                f"; the checkpoint has {have} classifiers (steps 0..{have - 1}), the model "
                f"{need}: build the model for step {have - 1}"
            )
        raise CheckpointError(
            f"{layout} weights do not match the model: {len(missing)} missing (e.g. {missing[:4]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:4]}){hint}"
        )
    norms = {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    out = {}
    for name, (key, shape) in wanted.items():
        value = given[name]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{layout} {name!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"{layout} {name!r} has shape {tuple(value.shape)}, incseg {key!r} expects {tuple(shape)}"
            )
        out[key] = value.abs() + IABN_EPS if key in norms else value
    return out


def convert_cssegmentation(
    state: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """A cssegmentation segmentor state dict (``ckpts["segmentor"]``, with or without
    ``module.``) -> a state dict for ``model`` (load it with ``strict=False``: no
    ``num_batches_tracked``).

    Raises:
        CheckpointError: keys without a place, model keys without a value (the message names
            them and, when the classifier count differs, the step the checkpoint is for), or
            shapes that differ.
    """
    return _convert(state, model, cssegmentation_name, "cssegmentation", "convs_cls")


def convert_plop(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A PLOP model state dict (``checkpoint["model_state"]``) -> a state dict for ``model``.

    PLOP's names are MiB's (module docstring); a checkpoint trained with ``--cosine`` or
    ``--nb_background_modes`` > 1 is refused, naming the option.

    Raises:
        CheckpointError: as :func:`convert_cssegmentation`, or one of those options.
    """
    given = _strip(state)
    if _has_cosine_classifier(given):
        raise CheckpointError(
            "PLOP checkpoint trained with --cosine (a 'scalar' parameter or classifiers without "
            "bias, segmentation_module.py:104-133): its cosine classifier normalises features "
            "per pixel, which incseg's 1x1 conv classifiers cannot compute"
        )
    have = _num_classifiers(given, "cls")
    need = len(getattr(model, "classifiers", ()))
    first = given.get("cls.0.weight")
    if (
        have == need + 1
        and first is not None
        and model.classifiers[0].out_channels != first.shape[0]
    ):
        raise CheckpointError(
            f"PLOP checkpoint trained with --nb_background_modes {first.shape[0]} (an extra first "
            "classifier of background modes fused at run time, segmentation_module.py:106-108, "
            "181-182): incseg has one background channel"
        )
    return _convert(given, model, official_name, "PLOP", "cls")


def convert_mib(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A MiB model state dict (``checkpoint["model_state"]``) -> a state dict for ``model``, by
    the names of :func:`incseg.models.official.official_name` (as
    :func:`~incseg.models.official.convert_official`, which also reads the ImageNet body), and
    accepting In-Place ABN 1.1's ``num_batches_tracked``.

    Raises:
        CheckpointError: as :func:`convert_cssegmentation`.
    """
    return _convert(state, model, official_name, "MiB", "cls")


def _bare_layout(state: Mapping[str, Any]) -> str | None:
    """The layout whose top-level names a bare state dict has (PLOP's ``scalar`` included)."""
    roots = {key.removeprefix("module.").split(".")[0] for key in state}
    for layout, names in _ROOTS.items():
        allowed = set(names) | ({"scalar"} if layout == "mib" else set())
        if names[0] in roots and roots <= allowed:
            return layout
    return None


def _has_cosine_classifier(state: Mapping[str, Any]) -> bool:
    """PLOP's ``--cosine``: a ``scalar`` parameter or classifiers without bias
    (``segmentation_module.py:104, 116, 129-133``), the only PLOP-only keys."""
    given = _strip(state)
    return "scalar" in given or any(
        re.fullmatch(r"cls\.\d+\.weight", k) and f"{k[:-6]}bias" not in given for k in given
    )


def _describe(data: Any) -> str:
    if isinstance(data, Mapping):
        return f"a dict with keys {sorted(map(str, data))[:8]}"
    return f"a {type(data).__name__}"


def detect_layout(data: Any) -> str:
    """``"mib"``, ``"cssegmentation"``, ``"plop"`` or ``"detectron2"`` for what ``torch.load``
    returned (``detectron2``: ``sem_seg_head.`` keys, :func:`~incseg.models.m2f_imports.is_detectron2`).

    A dict with ``segmentor`` is cssegmentation's; one with ``model_state`` is MiB's or PLOP's
    (identical layouts, module docstring): ``"plop"`` only where PLOP-only parameters show
    (``--cosine``), else ``"mib"``. A bare state dict is told by its top-level names.

    Raises:
        CheckpointError: none of these; the message lists what was expected and what was found.
    """
    if is_detectron2(data):
        return "detectron2"
    if isinstance(data, Mapping):
        for wrapper, layout in _WRAPPERS.items():
            if wrapper in data:
                state = data[wrapper]
                if not isinstance(state, Mapping):
                    raise CheckpointError(
                        f"checkpoint entry {wrapper!r} is a {type(state).__name__}, not a state dict"
                    )
                if layout == "mib" and _has_cosine_classifier(state):
                    return "plop"
                return layout
        if data and all(isinstance(v, torch.Tensor) for v in data.values()):
            layout = _bare_layout(data)
            if layout is not None:
                return "plop" if layout == "mib" and _has_cosine_classifier(data) else layout
    raise CheckpointError(f"unknown checkpoint layout: expected {_EXPECTED}; got {_describe(data)}")


def _state_of(data: Any, layout: str) -> Mapping[str, Any]:
    wrapper = "segmentor" if layout == "cssegmentation" else "model_state"
    if isinstance(data, Mapping) and wrapper in data:
        return data[wrapper]
    if (
        isinstance(data, Mapping)
        and data
        and all(isinstance(v, torch.Tensor) for v in data.values())
    ):
        return data  # a bare state dict
    raise CheckpointError(
        f"not a {layout} checkpoint: no {wrapper!r} entry and not a state dict; got {_describe(data)}"
    )


def _check_model(model: nn.Module) -> None:
    """The foreign models are ResNets with In-Place ABN: refuse a model that computes otherwise."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "layer4"):
        raise CheckpointError(
            "MiB, PLOP and cssegmentation checkpoints hold a ResNet: build the model with "
            "model.backbone: resnet101 (or resnet50)"
        )
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    if any(not isinstance(m, nn.LeakyReLU) or m.negative_slope != 0.01 for m in acts):
        raise CheckpointError(
            "MiB, PLOP and cssegmentation checkpoints were trained with In-Place ABN (leaky ReLU "
            "0.01): build the model with model.norm: iabn"
        )


_CONVERTERS = {"mib": convert_mib, "cssegmentation": convert_cssegmentation, "plop": convert_plop}


def convert_checkpoint(
    data: Any, model: nn.Module, layout: str = "auto"
) -> dict[str, torch.Tensor]:
    """A loaded foreign step checkpoint -> a state dict for ``model``, to load with
    ``model.load_state_dict(..., strict=False)`` (it has every parameter and running statistic,
    not ``num_batches_tracked``).

    Args:
        data: what ``torch.load`` returned: a MiB/PLOP checkpoint (``model_state``), a
            cssegmentation one (``segmentor``), a bare state dict of either, or a detectron2
            checkpoint (``model``, or what :func:`load_foreign_checkpoint` read from a ``.pkl``).
        model: the incseg model of the checkpoint's step (ResNet, ``norm: iabn``; for
            ``detectron2`` the query model, ``model.architecture: mask2former``).
        layout: ``"auto"`` (:func:`detect_layout`), ``"mib"``, ``"cssegmentation"``, ``"plop"``
            or ``"detectron2"``.

    Raises:
        ConfigError: an unknown ``layout``.
        CheckpointError: a layout that cannot be detected, a model that cannot compute the
            foreign function, or keys and shapes that do not match (messages name them).
    """
    if layout != "auto" and layout not in LAYOUTS + QUERY_LAYOUTS:
        raise ConfigError(
            f"unknown checkpoint layout {layout!r}; expected auto or one of {list(LAYOUTS)} "
            f"(DeepLab) or {list(QUERY_LAYOUTS)} (Mask2Former)"
        )
    if layout == "auto":
        layout = detect_layout(data)
    if layout == "detectron2":
        return convert_detectron2(data, model)
    state = _state_of(data, layout)
    _check_model(model)
    return _CONVERTERS[layout](state, model)


def checkpoint_step(data: Any) -> int | None:
    """The step a checkpoint says it belongs to: cssegmentation's ``task_id``
    (``runners/base.py:253``); ``None`` for MiB and PLOP, which do not store it."""
    if isinstance(data, Mapping) and isinstance(data.get("task_id"), int) and "segmentor" in data:
        return data["task_id"]
    return None


def _numpy_scalar_globals() -> list[Any]:
    """What unpickling a numpy scalar needs: the scalar constructor under numpy 1's and numpy 2's
    names (it builds a scalar from a dtype and raw bytes), and the dtypes of plain numbers."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    names = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
    dtypes = {type(np.dtype(code)) for code in "?bhilqBHILQefd"}
    return [*((scalar, name) for name in names), np.dtype, *dtypes]


def load_foreign_checkpoint(path: str | Path) -> Any:
    """A MiB, PLOP, cssegmentation or detectron2 checkpoint file, loaded safely (``weights_only``) with numpy
    scalars allowed besides tensors and plain data.

    Their ``best_score`` is a numpy float once the runner has evaluated: cssegmentation's
    ``results["mean_iou"]`` (``runners/base.py:164-165``, ``datasets/pipelines/evaluators.py:51``),
    so every checkpoint after the first evaluation; MiB's and PLOP's ``val_score["Mean IoU"]`` in
    the files saved after a validation (MiB ``run.py:302-305``, ``metrics/stream_metrics.py:91``;
    PLOP ``run.py:450-455``, ``metrics/stream_metrics.py:94``). A plain weights-only load refuses
    them.

    A ``.pkl`` is detectron2's pickle of numpy arrays, read by
    :func:`~incseg.models.m2f_imports.load_detectron2_pickle` (numpy arrays only, as detectron2
    tells the two formats apart by the suffix).

    Raises:
        CheckpointError: a missing file or one that cannot be loaded safely (the message says why).
    """
    if Path(path).suffix == ".pkl":
        return load_detectron2_pickle(path)
    what = "a step checkpoint of MiB, PLOP or cssegmentation, or a detectron2 model_final.pth"
    with torch.serialization.safe_globals(_numpy_scalar_globals()):
        return load_torch_file(path, what)
