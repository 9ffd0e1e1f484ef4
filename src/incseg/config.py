"""Typed run configuration: frozen dataclasses, loaded from YAML, with dotted overrides.

A YAML file lists only what differs from the defaults (the paper's setting, docs/protocol.md "Training")::

    protocol: {setting: 15-5, mode: overlap}
    model: {backbone: tiny}
    method: {name: mib, kd_weight: 10}

``--set train.lr=0.05`` overrides one key; values are parsed as YAML scalars. Unknown keys, unknown
names and impossible values raise :class:`~incseg.errors.ConfigError` naming the key and listing
the valid choices, before any work starts.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from incseg.errors import ConfigError
from incseg.methods import (
    ADDON_PATHS,
    METHOD_NAMES,
    QUERY_METHOD_NAMES,
    addon_class,
    check_method_name,
    method_class,
    split_name,
)
from incseg.models.choices import Architecture, Backbone, Norm, OutputStride, Pretrained
from incseg.protocol.choices import Convention, Mode, SplitSource, TestSelection
from incseg.protocol.official import uses_official
from incseg.protocol.orders import ordered_setting
from incseg.protocol.settings import Setting, get_setting
from incseg.ranges import SEED, Range, check_range, ranged, ranges_of

log = logging.getLogger(__name__)
DATASETS = {"shapes": "voc", "voc": "voc", "ade": "ade"}  # dataset name -> class family
Dataset = Literal["shapes", "voc", "ade"]
# mib: MiB / PLOP's random resized crop, flip, test resize + centre crop (data/transforms.py);
# mask2former / comformer: the Mask2Former recipe's mapper, and Mask2Former's whole-image test
# (labels at their size) or CoMFormer's (labels resized with the image)
# (data/query_transforms.py, docs/protocol.md "The Mask2Former recipe")
Pipeline = Literal["mib", "mask2former", "comformer"]
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
MAX_SHAPES_BYTES = 8 * 2**30
SHAPES_ONLY = ("image_size", "num_train", "num_test", "seed")  # data keys of the shapes dataset

_EPOCHS = Range(1, 10_000, "epochs per step; every step trains at least one")
_ITERATIONS = Range(1, 100_000_000, "training iterations of a step; null: count epochs")
_LR = Range(0, 10, "SGD learning rate (0.01 / 0.001 in the paper)", low_open=True)
_SIZE = Range(
    16,
    4096,
    "pixels; a side under 16 leaves less than one feature cell at output stride 16, "
    "over 4096 is far past any published crop (512 in the paper)",
)
_SCALE = Range(
    0, 10, "area scale of the random resized crop (0.5..2.0 in the paper)", low_open=True
)
_SHAPES = Range(1, 100_000, "shapes images rendered in memory")


@dataclass(frozen=True)
class DataConfig:
    """Dataset and transforms. ``root``: voc / ade only. ``image_size``, ``num_train``,
    ``num_test``, ``seed``: shapes only."""

    dataset: Dataset = "shapes"
    root: str | None = None
    image_size: int = ranged(
        64, Range(16, 1024, "side of the rendered shapes images (64 in the demo)")
    )
    num_train: int = ranged(1500, _SHAPES)
    num_test: int = ranged(300, _SHAPES)
    seed: int = ranged(0, SEED)
    crop_size: int = ranged(512, _SIZE)
    scale_min: float = ranged(0.5, _SCALE)
    scale_max: float = ranged(2.0, _SCALE)
    test_crop: int | None = ranged(None, _SIZE)
    num_workers: int = ranged(
        0, Range(0, 256, "loader worker processes; 0 loads in the main process")
    )
    # folder of saliency maps, one <image id>.png each (SSUL's release), for methods that take the
    # unknown class from them (ssul); shapes has exact maps built in
    saliency: str | None = None
    pipeline: Pipeline = "mib"

    def __post_init__(self) -> None:
        if self.dataset == "shapes":
            size = (self.num_train + self.num_test) * self.image_size**2 * 4  # uint8 RGB + label
            if size > MAX_SHAPES_BYTES:
                raise ConfigError(
                    f"data.num_train/num_test/image_size: {self.num_train} + {self.num_test} shapes "
                    f"images of {self.image_size} px take {size / 2**30:.1f} GiB in memory; keep it "
                    f"under {MAX_SHAPES_BYTES // 2**30} GiB"
                )
        if self.dataset == "shapes" and self.saliency:
            raise ConfigError(
                "data.saliency: the shapes dataset has exact saliency maps built in; leave it unset"
            )
        if self.dataset != "shapes" and not self.root:
            raise ConfigError(
                f"data.root: required for dataset {self.dataset!r} (the folder holding it)"
            )
        if self.scale_min > self.scale_max:
            raise ConfigError(
                "data.scale_min/scale_max: need scale_min <= scale_max, got "
                f"{self.scale_min}, {self.scale_max}"
            )
        if self.pipeline != "mib":
            self._check_mask2former_pipeline()

    def _check_mask2former_pipeline(self) -> None:
        for key in ("scale_min", "scale_max"):
            value = getattr(self, key)
            if abs(value * 10 - round(value * 10)) > 1e-9:
                raise ConfigError(
                    f"data.{key}: {value}; data.pipeline {self.pipeline} draws short sides "
                    "int(x * 0.1 * crop_size) for x from 10 * scale_min to 10 * scale_max, so the "
                    "scales must be multiples of 0.1 (the recipe: 0.5 and 2.0)"
                )
        if self.test_crop is not None:
            raise ConfigError(
                f"data.test_crop: {self.test_crop}; data.pipeline {self.pipeline} tests whole images "
                "resized to short side data.crop_size (CoMFormer's MIN_SIZE_TEST): leave "
                "test_crop unset"
            )


@dataclass(frozen=True)
class ProtocolConfig:
    """Setting, image selection mode, label convention and how many steps to run.
    ``test_selection``: ``seen`` (test images with a seen class) or ``mode`` (also the step's
    disjoint rule, as cssegmentation). ``last_step`` is checked against the setting by
    :class:`Config`."""

    setting: str = "15-5"
    mode: Mode = "overlap"
    labels: Convention = "mib"
    split_source: SplitSource = "auto"
    test_selection: TestSelection = "seen"
    last_step: int | None = None
    # which classes each step introduces: default, an official order's letter (ADE20K: b, c),
    # random:K (a seeded permutation) or a list of every class but 0 (protocol/orders.py)
    order: str | tuple[int, ...] = "default"


@dataclass(frozen=True)
class Mask2FormerConfig:
    """The sizes of ``model.architecture: mask2former`` (docs/methods.md "Mask2Former"); the
    defaults are the official ADE20K semantic configs' (facebookresearch/Mask2Former
    ``configs/ade20k/semantic-segmentation/Base-ADE20K-SemanticSegmentation.yaml`` and
    ``maskformer2_R50_bs16_160k.yaml``). Read only by that architecture."""

    num_queries: int = ranged(100, Range(1, 1000, "object queries (100 in the paper)"))
    hidden_dim: int = ranged(
        256, Range(8, 4096, "transformer decoder width (256); a multiple of nheads")
    )
    nheads: int = ranged(8, Range(1, 64, "attention heads of encoder and decoder (8)"))
    dec_layers: int = ranged(9, Range(1, 100, "masked-attention decoder layers (9)"))
    dim_feedforward: int = ranged(2048, Range(1, 65536, "decoder FFN width (2048)"))
    conv_dim: int = ranged(
        256, Range(32, 4096, "pixel decoder width (256); a multiple of 32 (GroupNorm(32))")
    )
    mask_dim: int = ranged(256, Range(1, 4096, "mask feature channels (256)"))
    enc_layers: int = ranged(6, Range(0, 100, "deformable encoder layers (6)"))
    enc_dim_feedforward: int = ranged(1024, Range(1, 65536, "encoder FFN width (1024)"))
    # how the decoder's attention masks read the predicted masks: sigmoid < 0.5 (Mask2Former)
    # or a softmax over queries < 0.5 (CoMFormer's softmask)
    mask_activation: Literal["sigmoid", "softmax"] = "sigmoid"
    # whether channel 0 (background) is a class of the head; false: object classes only (ADE20K's
    # 0 is void, for which Mask2Former and CoMFormer train no class) and a pixel no query claims
    # is predicted 0
    background: bool = True
    # semantic: Mask2Former's (sum over queries of class probability x mask probability);
    # comformer: CoMFormer's (each pixel to the query of highest score x mask probability, kept
    # where that mask is >= 0.5, otherwise 0), fcdl94/CoMFormer maskformer_model.py:340-375;
    # eclipse: the same with sigmoid class scores and masks (clovaai/ECLIPSE
    # maskformer_model.py:372-420)
    # simcis: SimCIS's (sigmoid scores >= 0.4 rescored by softmax(p / 0.06), areas kept within
    # 0.8 of each other both ways, unpainted pixels left out of the evaluation), SooLab/SimCIS
    # maskformer_model.py:551-591
    inference: Literal["semantic", "comformer", "eclipse", "simcis"] = "semantic"
    # the class head: one Linear per step, ECLIPSE's 3-layer MLP per step (CONT.DEEP_CLS), or
    # static: SimCIS's one Linear over every class of the setting from step 0, no no-object
    class_head: Literal["linear", "mlp", "static"] = "linear"
    # masked: Mask2Former's decoder with learnable queries; selection: SimCIS's, the queries
    # chosen among the pixel decoder's tokens by the class head, with boxes (method simcis)
    decoder: Literal["masked", "selection"] = "masked"
    # ECLIPSE's visual prompts: queries added at each step after step 0, each group attending to
    # itself only (CONT.NUM_PROMPTS; 0: none)
    prompts: int = ranged(0, Range(0, 1000, "prompt queries per step after step 0 (ECLIPSE)"))
    # ECLIPSE's logit manipulation at inference, one delta per query group (the base queries,
    # then each step's prompts; a shorter list repeats its last value; empty: 0 for all;
    # CONT.LOGIT_MANI_DELTAS, docs/methods.md "eclipse")
    logit_deltas: tuple[float, ...] = ranged(
        (), Range(-10, 10, "logit manipulation delta of a query group (the scripts: -0.6 to 0.8)")
    )

    def __post_init__(self) -> None:
        if self.hidden_dim % self.nheads or self.conv_dim % self.nheads:
            raise ConfigError(
                f"model.mask2former.nheads: {self.nheads} must divide hidden_dim "
                f"({self.hidden_dim}) and conv_dim ({self.conv_dim})"
            )
        if self.conv_dim % 32:
            raise ConfigError(
                f"model.mask2former.conv_dim: {self.conv_dim} is not a multiple of 32 "
                "(the pixel decoder's GroupNorm has 32 groups)"
            )


@dataclass(frozen=True)
class ModelConfig:
    """DeepLabV3 (docs/protocol.md, "Model and training")."""

    backbone: Backbone = "resnet101"
    output_stride: OutputStride = 16
    norm: Norm = "iabn"
    head_channels: int = ranged(256, Range(1, 4096, "ASPP output channels (256 in the paper)"))
    pretrained: Pretrained = "none"
    # In-Place ABN's ImageNet checkpoint (resnet101_iabn_sync.pth.tar) at this path instead of
    # the cache path of ``pretrained: iabn`` (models/official.py)
    backbone_weights: str | None = None
    # deeplabv3 | rcil: RCIL's parallel branches (models/rcil.py), which method rcil needs
    architecture: Architecture = "deeplabv3"
    mask2former: Mask2FormerConfig = field(default_factory=Mask2FormerConfig)

    def __post_init__(self) -> None:
        if self.backbone_weights and (self.pretrained == "imagenet" or self.backbone == "tiny"):
            raise ConfigError(
                "model.backbone_weights: needs a ResNet backbone and model.pretrained: iabn "
                "or none (the file replaces torchvision's ImageNet weights)"
            )
        if self.norm == "frozen_bn" and (
            self.architecture != "mask2former" or self.backbone == "tiny"
        ):
            raise ConfigError(
                "model.norm: frozen_bn (detectron2's FrozenBN) is for the ResNet backbones of "
                f"model.architecture: mask2former (got architecture {self.architecture!r}, "
                f"backbone {self.backbone!r}); use bn or iabn"
            )
        if self.pretrained == "iabn" and self.backbone != "resnet101":
            raise ConfigError(
                f"model.pretrained: iabn is In-Place ABN's ResNet-101; model.backbone is "
                f"{self.backbone!r} (use resnet101, or pretrained: imagenet / none)"
            )


@dataclass(frozen=True)
class MethodConfig:
    """Method name and its hyperparameters (the fields of the method's class, already checked
    against their types and ranges). :meth:`build` makes the method."""

    name: str = "mib"
    params: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Any:
        """A fresh :class:`~incseg.methods.base.Method` with these hyperparameters; a name with
        add-ons (``mib+ewf``) gives the method wrapped with them (each add-on's hyperparameters
        are under its own key)."""
        base, addons = split_name(self.name)
        params = {k: v for k, v in self.params.items() if k not in addons}
        method = method_class(base)(**params)
        if not addons:
            return method
        from incseg.methods.base import WithAddOns

        return WithAddOns(method, [addon_class(a)(**self.params.get(a, {})) for a in addons])


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. ``*_incremental`` apply to steps > 0 (None: same as step 0)."""

    epochs: int = ranged(30, _EPOCHS)
    epochs_incremental: int | None = ranged(None, _EPOCHS)
    # a step's length in iterations instead (the query-based recipes count iterations: 160k for
    # Mask2Former's ADE20K base step); when set, epochs are ignored: the step runs over as many
    # epochs of its loader as the iterations need, the last one cut short. null: epochs
    iterations: int | None = ranged(None, _ITERATIONS)
    iterations_incremental: int | None = ranged(None, _ITERATIONS)
    lr: float = ranged(0.01, _LR)
    lr_incremental: float = ranged(0.001, _LR)
    batch_size: int = ranged(
        24,
        Range(
            2,
            4096,
            "global batch; batch norm in training needs 2 or more images "
            "(the ASPP pooling branch has one value per image)",
        ),
    )
    eval_batch_size: int = ranged(8, Range(1, 4096, "images per evaluation batch"))
    # sgd: SGD with (Nesterov) momentum, the DeepLab methods'; adamw: torch.optim.AdamW with its
    # default betas and eps, the Mask2Former recipe's (facebookresearch/Mask2Former train_net.py
    # build_optimizer, SOLVER.OPTIMIZER ADAMW); momentum and nesterov apply to sgd only
    optimizer: Literal["sgd", "adamw"] = "sgd"
    # the norm of all gradients together is clipped to this before each optimizer step (the
    # "full_model" clipping of Mask2Former's train_net.py, CLIP_VALUE 0.01); null = no clipping
    clip_grad_norm: float | None = ranged(
        None, Range(0, 1e6, "max L2 norm of all gradients together; null = off", low_open=True)
    )
    momentum: float = ranged(
        0.9,
        Range(
            0,
            1,
            "SGD momentum (0.9 in the paper); 1 or more never decays and diverges",
            high_open=True,
        ),
    )
    nesterov: bool = True
    weight_decay: float = ranged(
        1e-4, Range(0, 1, "L2 factor of SGD (1e-4 in the paper)", high_open=True)
    )
    lr_power: float = ranged(
        0.9,
        Range(0, 10, "exponent of the poly schedule (0.9 in the paper); 0 keeps the LR constant"),
    )
    # fraction of a step's iterations over which the LR warms up linearly from 0.001x (the
    # WarmupPolyLR of SSUL utils/scheduler.py:19-85 and DKD utils/lr_scheduler.py:18-86); 0 = none
    lr_warmup: float = ranged(
        0.0, Range(0, 1, "fraction of a step's iterations with a linear LR warmup; 0 = none")
    )
    # floor of every parameter group's LR (SSUL's PolyLR clamps at 1e-6, utils/scheduler.py:15)
    lr_min: float = ranged(0.0, Range(0, 1, "lowest LR of the poly schedule; 0 = no floor"))
    # fractions of a step's iterations from which the LR is multiplied by 0.1 once more each
    # (detectron2's WarmupMultiStepLR with gamma 0.1 and no warmup: SOLVER.STEPS over MAX_ITER;
    # with lr_power 0 it is that schedule alone); empty = none
    lr_decay_at: tuple[float, ...] = ranged(
        (), Range(0, 1, "fraction of a step's iterations where the LR drops 10x")
    )
    amp: Literal["off", "bf16", "fp16"] = "off"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = ranged(0, SEED)
    log_interval: int = ranged(10, Range(1, 1_000_000, "iterations between loss read-backs"))
    # epochs between validations on the current classes; 0 = off
    val_interval: int = ranged(
        0, Range(0, 10_000, "epochs between validations on the current classes; 0 = off")
    )
    # epochs between resumable checkpoints (last.pt); 0 = step ends only
    checkpoint_every: int = ranged(
        1, Range(0, 10_000, "epochs between resumable checkpoints; 0 = only at step ends")
    )
    sync_bn: bool = True  # with several processes (torchrun): BN statistics over the global batch
    channels_last: bool = False  # NHWC memory format for the model and its inputs (faster on GPU)
    compile: bool = False  # torch.compile the model being trained
    # auto: write TensorBoard logs if the package is installed; on | off
    tensorboard: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        if self.nesterov and self.momentum == 0 and self.optimizer == "sgd":
            raise ConfigError(
                "train.momentum: Nesterov momentum (train.nesterov: true) needs momentum > 0; "
                "set train.nesterov: false for plain SGD"
            )

    def epochs_at(self, step: int) -> int:
        if step == 0 or self.epochs_incremental is None:
            return self.epochs
        return self.epochs_incremental

    def schedule_at(self, step: int, batches_per_epoch: int) -> tuple[int, int]:
        """``(epochs, iterations)`` of step ``step`` with ``batches_per_epoch`` batches: the
        step's epochs of full passes or, with iterations set (``iterations_incremental`` for
        steps > 0, None there: ``iterations``), the epochs those iterations need."""
        iterations = self.iterations
        if step > 0 and self.iterations_incremental is not None:
            iterations = self.iterations_incremental
        if iterations is None:
            epochs = self.epochs_at(step)
            return epochs, epochs * batches_per_epoch
        return -(-iterations // max(batches_per_epoch, 1)), iterations

    def lr_at(self, step: int) -> float:
        return self.lr if step == 0 else self.lr_incremental


@dataclass(frozen=True)
class Config:
    """A whole run. The checks that involve several sections are here."""

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not self.name or self.name in (".", "..") or any(c in self.name for c in "/\\\0"):
            raise ConfigError(
                f"name: {self.name!r} must be one folder name (no '/', no '..'): the run goes to "
                "runs/NAME-DATE-TIME unless --out says where"
            )
        proto = self.protocol
        try:
            get_setting(self.family, proto.setting)
        except ConfigError as err:
            raise ConfigError(f"protocol.setting: {err}") from None
        setting = self.setting
        uses_official(self.data.dataset, setting.name, proto.mode, proto.split_source)
        if proto.last_step is not None and not 0 <= proto.last_step < setting.num_steps:
            raise ConfigError(
                f"protocol.last_step: step {proto.last_step} is out of range for setting "
                f"{setting.name!r}; valid steps are 0..{setting.num_steps - 1}"
            )
        cls = method_class(self.method.name)
        if "mode" in {f.name for f in dataclasses.fields(cls)}:  # set by config_from_dict
            given = self.method.params.get("mode", proto.mode)
            if given != proto.mode:
                raise ConfigError(
                    f"method.mode: {self.method.name!r} follows protocol.mode ({proto.mode!r}), "
                    f"got {given!r}; leave method.mode out or set it to {proto.mode!r}"
                )
        needs = getattr(cls, "architecture", None)
        if needs is not None and self.model.architecture != needs:
            raise ConfigError(
                f"model.architecture: method {self.method.name!r} trains the {needs!r} "
                f"architecture; set model.architecture: {needs}"
            )
        if self.train.val_interval and proto.labels != "mib":
            raise ConfigError(
                "train.val_interval: validation during training follows MiB's convention; "
                "it needs protocol.labels: mib"
            )

    @property
    def family(self) -> str:
        return DATASETS[self.data.dataset]

    @property
    def setting(self) -> Setting:
        """The run's setting in its class order (``protocol.order``,
        :func:`incseg.protocol.orders.ordered_setting`)."""
        base = get_setting(self.family, self.protocol.setting)
        return ordered_setting(base, self.protocol.order)

    @property
    def num_steps(self) -> int:
        """Steps this run trains: the setting's, or ``protocol.last_step + 1``."""
        if self.protocol.last_step is not None:
            return self.protocol.last_step + 1
        return self.setting.num_steps

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict; ``method`` is flattened to ``{name, **params}`` as in YAML.
        Keys that mean nothing for the dataset (``shapes``' ``image_size``, ``num_train``,
        ``num_test``, ``seed`` for VOC / ADE20K) are left out."""
        out = dataclasses.asdict(self)
        out["method"] = {"name": self.method.name, **self.method.params}
        if self.data.dataset != "shapes":
            for key in SHAPES_ONLY:
                out["data"].pop(key)
        return out

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_PlainDumper, sort_keys=False)


# Every numeric key of the config and its valid values, gathered from the fields (docs/guards.md).
RANGES: dict[str, Range] = {
    f"{section}.{key}": valid
    for section, cls in (
        ("data", DataConfig),
        ("model", ModelConfig),
        ("model.mask2former", Mask2FormerConfig),
        ("train", TrainConfig),
    )
    for key, valid in ranges_of(cls).items()
}
# Numeric keys checked otherwise: against the setting's steps, or against a list of choices.
RELATIVE_KEYS = ("protocol.last_step", "model.output_stride")


# ---------------------------------------------------------------------------------------------
# Building a typed config from plain data


def _options(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of a union annotation (``int | None`` -> ``(int, NoneType)``)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Return ``value`` as ``annotation`` (int widened to float), or raise naming ``key``.
    A ``Literal`` admits its values only; the error lists them."""
    options = _options(annotation)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key}: a value is required (null given)")
    for option in options:
        if typing.get_origin(option) is tuple and isinstance(value, list | tuple):
            return _check_items(value, typing.get_args(option)[0], key)
        if typing.get_origin(option) is Literal:
            return _check_literal(value, typing.get_args(option), key)
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if option is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot, no sign) as a string
    expected = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise ConfigError(f"{key}: expected {expected}, got {value!r} ({type(value).__name__})")


def _check_literal(value: Any, choices: tuple, key: str) -> Any:
    """``value`` if it is one of ``choices`` (YAML 1.1's on / off booleans read as the strings),
    else an error listing them."""
    if isinstance(value, bool) and {"on", "off"} & set(choices):
        value = "on" if value else "off"
    if value in choices and type(value) is type(choices[choices.index(value)]):
        return value
    raise ConfigError(f"{key}: unknown value {value!r}; valid choices: {list(choices)}")


def _check_items(values: list | tuple, item: Any, key: str) -> tuple:
    """A list value of a ``tuple[item, ...]`` field, each element checked (``key[i]``)."""
    return tuple(_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(values))


def checked_fields(cls: type, data: Any, prefix: str) -> dict[str, Any]:
    """The keyword arguments of dataclass ``cls`` read from a mapping: each key known, each
    value of its field's type (``Literal`` choices included) and inside its :func:`ranged`
    range. Nested dataclass fields are built recursively. ``prefix`` is the dotted path used in
    errors."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names), key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {names}")
    ranges = ranges_of(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build_dataclass(hints[name], value, key)
            continue
        kwargs[name] = _check_type(value, hints[name], key)
        if name in ranges:
            check_range(kwargs[name], ranges[name], key)
    return kwargs


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from :func:`checked_fields`; its ``__post_init__`` checks
    what involves several of its fields."""
    return cls(**checked_fields(cls, data, prefix))


def _with_defaults(cls: type, data: Any, prefix: str) -> dict[str, Any]:
    """Every hyperparameter of method (or add-on) class ``cls``: its defaults, overridden by the
    checked values of ``data``."""
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if f.init and f.default is not dataclasses.MISSING
    }
    return {**defaults, **checked_fields(cls, data, prefix)}


def _check_addons_once(name: str) -> None:
    """Refuse a name that repeats an add-on (``mib+ewf+ewf`` would wrap the method twice)."""
    base, addons = split_name(name)
    twice = sorted({a for a in addons if addons.count(a) > 1})
    if twice:
        once = "+".join([base, *dict.fromkeys(addons)])
        raise ConfigError(
            f"method.name: {name!r} names the add-on(s) {twice} more than once; each add-on "
            f"applies once: name it once ({once})"
        )


def config_from_dict(raw: dict[str, Any], *, trusted: Collection[str] | None = None) -> Config:
    """Build and validate a :class:`Config` from nested plain data (as read from YAML).

    ``trusted``: for data read from a checkpoint, the ``module:Class`` method paths that may be
    imported (those the user named); a built-in or entry-point method name is always resolved.
    None (a config file the user gave) trusts every path.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {raw!r}")
    raw = dict(raw)
    method_raw = raw.pop("method", None) or {}
    if not isinstance(method_raw, dict):
        raise ConfigError(f"method: expected a mapping like {{name: mib}}, got {method_raw!r}")
    method_raw = dict(method_raw)
    name = method_raw.pop("name", MethodConfig.name)
    check_method_name(name)
    _check_addons_once(name)
    if trusted is not None and ":" in str(name) and name not in trusted:
        raise ConfigError(
            f"method.name: {name!r} is a module:Class path named inside a checkpoint or a run "
            "directory, and incseg does not import code named in files it reads; if you trust it, "
            f"name it yourself: --set method.name={name}"
        )
    config = build_dataclass(Config, raw, "")
    # The method's class (and torch) is imported only once the rest of the config is valid;
    # its hyperparameters are checked here and the method is built once, by the run.
    cls = method_class(name)
    params = {}
    for addon in split_name(name)[1]:  # each add-on's hyperparameters under its own key
        params[addon] = _with_defaults(
            addon_class(addon), method_raw.pop(addon, None), f"method.{addon}"
        )
    if "mode" in {f.name for f in dataclasses.fields(cls)} and "mode" not in method_raw:
        method_raw["mode"] = config.protocol.mode  # a method that follows the mode (STAR)
    params = {**_with_defaults(cls, method_raw, "method"), **params}
    config = dataclasses.replace(config, method=MethodConfig(name=name, params=params))
    check_query_model(config)
    return config


def check_query_model(config: Config) -> None:
    """The query-based model (``model.architecture: mask2former``) with the methods made for it
    only, and none of the add-ons, which work on DeepLab's per-pixel classifiers. Checked once the
    method is known (:func:`config_from_dict`), after its hyperparameters."""
    needs = getattr(method_class(config.method.name), "architecture", None)
    base, addons = split_name(config.method.name)
    if needs == "mask2former" and addons:
        raise ConfigError(
            f"method.name: {config.method.name!r}: the add-ons {sorted(ADDON_PATHS)} work on "
            f"DeepLab's per-pixel classifiers, not on the query-based model; name the method "
            f"alone ({base})"
        )
    if needs is None and config.model.architecture == "mask2former":
        raise ConfigError(
            "model.architecture: mask2former is query-based (class scores per query and masks, "
            f"no per-pixel logits), and method {config.method.name!r} trains per-pixel logits; "
            f"the methods that train it: {list(QUERY_METHOD_NAMES)}"
        )
    if config.model.architecture == "mask2former" and config.data.crop_size % 32:
        raise ConfigError(
            f"data.crop_size: {config.data.crop_size}; Mask2Former trains on images whose sides "
            "divide by 32 (MODEL.MASK_FORMER.SIZE_DIVISIBILITY), e.g. 512"
        )
    if getattr(method_class(config.method.name), "pseudo_labels_old_pixels", False) and (
        config.model.mask2former.background
    ):
        raise ConfigError(
            f"model.mask2former.background: true; method {config.method.name!r} gives old-class "
            "pixels pseudo-labels where the step's labels have no mask, and a background class "
            "gives every such pixel one (old classes are background in a step's labels): set "
            "it false, as the official (ADE20K's 0 is void, no class of the head)"
        )
    _check_prompts(config)
    _check_selection(config)
    least = getattr(method_class(config.method.name), "min_crop_size", 0)
    if config.data.crop_size < least:
        raise ConfigError(
            f"data.crop_size: {config.data.crop_size}; method {config.method.name!r} needs at "
            f"least {least} (its local POD's finest grid needs res5, at stride 32, 4 wide)"
        )


def _check_prompts(config: Config) -> None:
    """``model.mask2former.prompts`` (ECLIPSE's prompt queries) with the method that trains
    them, and that method with them."""
    prompts = config.model.mask2former.prompts
    uses = getattr(method_class(config.method.name), "uses_prompts", False)
    if uses and not prompts:
        raise ConfigError(
            f"model.mask2former.prompts: 0; method {config.method.name!r} trains a group of "
            "prompt queries at each step after step 0: set how many (ECLIPSE: as many as the "
            "step's new classes)"
        )
    if prompts and not uses and config.model.architecture == "mask2former":
        raise ConfigError(
            f"model.mask2former.prompts: {prompts}; only method 'eclipse' trains prompt queries "
            f"(method {config.method.name!r} trains the base queries): set it to 0"
        )


def _check_selection(config: Config) -> None:
    """SimCIS's model (``decoder: selection`` with its static head and inference) with the
    method that trains it, and that method with it."""
    if config.model.architecture != "mask2former":
        return
    m = config.model.mask2former
    mine = ("selection", "static", "simcis")
    given = (m.decoder, m.class_head, m.inference)
    uses = getattr(method_class(config.method.name), "decoder", "masked") == "selection"
    if uses and given != mine:
        raise ConfigError(
            f"model.mask2former: decoder {m.decoder}, class_head {m.class_head}, inference "
            f"{m.inference}; method {config.method.name!r} trains SimCIS's model: set decoder: "
            "selection, class_head: static, inference: simcis"
        )
    if not uses and any(g == v for g, v in zip(given, mine, strict=True)):
        raise ConfigError(
            f"model.mask2former: decoder {m.decoder}, class_head {m.class_head}, inference "
            f"{m.inference}; SimCIS's decoder, static head and inference are trained by method "
            f"'simcis' only (method {config.method.name!r}): set decoder: masked and the head "
            "and inference of that method"
        )


def saliency_readers() -> list[str]:
    """The built-in methods that, with their default hyperparameters, read ``data.saliency``
    (take their unknown class from saliency maps: ``unknown_from == "saliency"``)."""
    return [n for n in METHOD_NAMES if method_class(n)().unknown_from == "saliency"]


def check_saliency_is_read(config: Config) -> None:
    """Refuse ``data.saliency`` for a method that reads no saliency map, where the folder would
    be ignored without a word. Only a method whose ``unknown_from`` is ``"saliency"`` reads
    it (engine/run.py checks the maps, data/datasets.py reads them): SSUL, after the official
    clovaai/SSUL datasets/voc.py:122-123 (train images) and 140 (``sal_map > 0``).

    Not part of :func:`config_from_dict`: a checkpoint's config is rebuilt with method ``ft``
    in place of its own (engine/model_io.py ``restore_step``), keeping its data section.
    """
    if not config.data.saliency:
        return
    method = config.method.build()
    if method.unknown_from == "saliency":
        return
    name = config.method.name
    what = (
        f"takes its unknown class from {method.unknown_from!r} with these hyperparameters"
        if method.unknown_from
        else "has no unknown class"
    )
    raise ConfigError(
        f"data.saliency: method {name!r} {what} and reads no saliency map, so the folder would "
        f"be ignored; the methods that read it: {saliency_readers()} (method.unknown: saliency); "
        "remove data.saliency or set it to null"
    )


def config_diff(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts, as ``key: a -> b``."""
    diffs = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_diff(a, b, f"{name}.")
        elif a != b:
            diffs.append(f"{name}: {a!r} -> {b!r}")
    return diffs


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as a YAML scalar) to nested dict ``raw`` in place."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.lr=0.01")
    try:
        value = parse_yaml(text, prefix=key.strip()) if text.strip() else None
    except RefusedYAML as err:
        raise ConfigError(f"--set {assignment!r}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {assignment!r}: cannot parse value: {err}") from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def builtin_configs(*, with_folders: bool = False) -> list[str]:
    """Names of the configs shipped inside the package: ``demo``, ... and, with ``with_folders``,
    the paper-reproduction configs ``voc/15-5-overlap-mib``, ``ade/100-50-mib``, ..."""
    root = resources.files("incseg.configs")
    names = [p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml")]
    if with_folders:
        for folder in (p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
            names += [
                f"{folder.name}/{p.name[: -len('.yaml')]}"
                for p in folder.iterdir()
                if p.name.endswith(".yaml")
            ]
    return sorted(names)


def builtin_config_path(name: str) -> Path:
    return Path(str(resources.files("incseg.configs").joinpath(f"{name}.yaml")))


class RefusedYAML(yaml.YAMLError):
    """Well-formed YAML that incseg does not read as a config: a key given twice in one mapping,
    an alias (``*name``), or nesting too deep to build. The message names the key or alias and
    its line(s)."""


_MERGE_TAG = "tag:yaml.org,2002:merge"
# A config nests four levels deep (method.ewf.KEY); far past that is a malformed or hostile file.
MAX_YAML_DEPTH = 64


def _lines(first: yaml.Mark, second: yaml.Mark) -> str:
    """``lines 2 and 5``, or ``line 1, columns 2 and 14`` when both are on one line."""
    if first.line == second.line:
        return f"line {first.line + 1}, columns {first.column + 1} and {second.column + 1}"
    return f"lines {first.line + 1} and {second.line + 1}"


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses what the safe loader lets through unseen.

    Duplicate keys: PyYAML fills a dict key by key (yaml/pyyaml lib/yaml/constructor.py:138-144,
    ``mapping[key] = value``), so a second ``train:`` section silently replaces the first. They
    are found on the composed node tree, before anything is built.

    Aliases: the composer returns the anchored node itself for ``*name`` (lib/yaml/composer.py:
    63-70), so a few nested anchors ("billion laughs") make a value that expands to more than
    memory holds as soon as anything walks or prints it. A config has no use for them; the
    first alias is refused where the parser meets it, before the value exists.
    """

    key_prefix = ""  # dotted key the document sits under (a --set value), for the messages
    depth = 0  # nodes being composed, one inside the other

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise RefusedYAML(
                f"alias *{event.anchor} at line {event.start_mark.line + 1}, column "
                f"{event.start_mark.column + 1}: incseg reads no YAML anchors / aliases in a "
                "config (nested ones expand past any memory); write the value out"
            )
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise RefusedYAML(
                    f"nested more than {MAX_YAML_DEPTH} levels deep at line {mark.line + 1}; a "
                    "config nests at most a few levels (method.ewf.KEY)"
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_unique_keys(node, self.key_prefix)
        return node


def _check_unique_keys(root: yaml.Node, prefix: str) -> None:
    """Raise :class:`RefusedYAML` at the first mapping of the tree under ``root`` that gives a
    key twice (scalar keys, compared by their resolved tag and text; ``<<`` merge keys aside)."""
    todo = [(root, prefix)]
    while todo:
        node, path = todo.pop()
        if isinstance(node, yaml.SequenceNode):
            todo += [(child, f"{path}[{i}]") for i, child in enumerate(node.value)]
        if not isinstance(node, yaml.MappingNode):
            continue
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                todo.append((value_node, path))
                continue
            key = f"{path}.{key_node.value}" if path else key_node.value
            first = seen.setdefault((key_node.tag, key_node.value), key_node)
            if first is not key_node:
                raise RefusedYAML(
                    f"key {key!r} is given twice ({_lines(first.start_mark, key_node.start_mark)}); "
                    "YAML would keep only the last and silently drop the first: give it once"
                )
            todo.append((value_node, key))


def parse_yaml(text: str, prefix: str = "") -> Any:
    """The data of YAML ``text`` as the safe loader builds it, refusing duplicate keys, aliases
    and deep nesting (:class:`_ConfigLoader`). ``prefix``: the dotted key ``text`` is the value
    of (a ``--set`` value), used in messages.

    Raises:
        yaml.YAMLError: invalid YAML; :class:`RefusedYAML` (a subclass) for what is refused.
    """
    loader = _ConfigLoader(text)
    loader.key_prefix = prefix
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class _PlainDumper(yaml.SafeDumper):
    """Safe dumper that writes every value out: what incseg writes, :func:`parse_yaml` reads."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


# tuple fields (model.mask2former.logit_deltas) are written as YAML lists
_PlainDumper.add_representer(tuple, lambda dumper, value: dumper.represent_list(list(value)))


SECTIONS = ("data", "protocol", "model", "method", "train")


def _check_lists_a_key(path: Path, raw: Any) -> None:
    """Refuse a file that changes nothing: empty, or only sections that are null or ``{}``
    (``train:`` alone)."""
    defaults = (
        "a config names at least what it changes from the defaults, which are the paper's full "
        "run (ResNet-101, 30 epochs, crop 512; see incseg configs)"
    )
    if raw is None or raw == {}:
        raise ConfigError(f"{path}: lists no key; {defaults}")
    if isinstance(raw, dict) and all(k in SECTIONS and raw[k] in (None, {}) for k in raw):
        empty = ", ".join(f"{k}: {'{}' if raw[k] == {} else 'null'}" for k in raw)
        raise ConfigError(f"{path}: lists no key (only empty sections: {empty}); {defaults}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file; a name from :func:`builtin_configs` selects a shipped config.

    Raises:
        ConfigError: a missing file, one that is not UTF-8 text or not valid YAML, one that
            :func:`parse_yaml` refuses (a key given twice, an alias), or one that lists no key
            (an empty config would silently be the paper's full ResNet-101 run).
    """
    path = Path(path)
    # A folder named like a built-in config (e.g. the run directory `demo`) does not hide it.
    if not path.is_file() and str(path) in builtin_configs(with_folders=True):
        path = builtin_config_path(str(path))
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} not found; give a YAML path or a built-in config: "
            f"{builtin_configs()} or a paper config such as voc/15-5-overlap-mib (list: incseg configs)"
        )
    try:
        text = path.read_text(encoding="utf-8")
        raw = parse_yaml(text)
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {err.start} is {err.object[err.start]:#04x}); a "
            "config is a YAML text file"
        ) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    except RefusedYAML as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    _check_lists_a_key(path, raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {raw!r}")
    return raw


def _base_name(name: object) -> object:
    """The method of a ``METHOD+ADDON`` name (other values as they are)."""
    return split_name(name)[0] if isinstance(name, str) else name


def _drop_sections_of_removed_addons(method: dict, file_method: dict, given: set[str]) -> None:
    """``mib+ewf`` -> ``--set method.name=mib``: the file's ``ewf:`` section goes with the add-on."""
    kept = set(split_name(method["name"])[1])
    for key in list(method):
        named = f"method.{key}" in given or any(g.startswith(f"method.{key}.") for g in given)
        if key in ADDON_PATHS and key not in kept and key in file_method and not named:
            method.pop(key)


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), *, saved: bool = False
) -> Config:
    """Load a YAML config (``None``: the demo config), apply ``--set`` overrides, validate.

    ``saved``: the file is a run directory's ``config.yaml``, data that someone else may have
    made: a ``module:Class`` method it names is imported only when ``--set method.name=`` names
    it too (:func:`config_from_dict`'s ``trusted``).

    ``--set method.name=OTHER`` starts the other method from its own defaults: the file's
    hyperparameters of its own method are dropped (those also given with ``--set`` stay). Adding
    or removing add-ons keeps them (``mib`` -> ``mib+ucd``: MiB's keys stay, and so do the
    add-ons' sections).
    An error says whether the key came from the file or from ``--set``.
    """
    raw = read_yaml(path if path is not None else "demo")
    file_method = dict(raw["method"]) if isinstance(raw.get("method"), dict) else {}
    for assignment in overrides:
        apply_override(raw, assignment)
    given = {a.partition("=")[0].strip() for a in overrides}
    method = raw.get("method")
    if "method.name" in given and isinstance(method, dict) and isinstance(method.get("name"), str):
        _drop_sections_of_removed_addons(method, file_method, given)
    if (
        "method.name" in given
        and isinstance(method, dict)
        and _base_name(method.get("name")) != _base_name(file_method.get("name"))
    ):
        dropped = [k for k in file_method if k != "name" and f"method.{k}" not in given]
        for key in dropped:
            method.pop(key, None)
        if dropped:
            log.info(
                f"note: --set method.name={method.get('name')}: the config's {dropped} belong to "
                f"{file_method.get('name', MethodConfig.name)!r} and were dropped"
            )
    where = f"{path}: " if path is not None else ""
    named = [
        a.partition("=")[2].strip()
        for a in overrides
        if a.partition("=")[0].strip() == "method.name"
    ]
    try:
        config = config_from_dict(raw, trusted=named if saved else None)
        if not saved:  # a run made before the check was added still resumes
            check_saliency_is_read(config)
        return config
    except ConfigError as err:
        key = str(err).partition(":")[0]
        if any(g == key or g.startswith(f"{key}.") for g in given):
            origin = " (from --set)"
        elif "unknown key(s)" in str(err):  # say that the file, not the command line, has it
            origin = f" (from {path if path is not None else 'the demo config'})"
        else:
            origin = ""
        raise ConfigError(f"{where}{err}{origin}") from None
