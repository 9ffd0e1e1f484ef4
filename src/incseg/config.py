"""Typed run configuration: frozen dataclasses, loaded from YAML, with dotted overrides.

A YAML file lists only what differs from the defaults (the paper's setting, SPEC section 7)::

    protocol: {setting: 15-5, mode: overlap}
    model: {backbone: tiny}
    method: {name: mib, kd_weight: 10}

``--set train.lr=0.05`` overrides one key; values are parsed as YAML scalars. Unknown keys, unknown
names and impossible values raise :class:`~incseg.errors.ConfigError` naming the key and listing
the valid choices, before any work starts.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from incseg.errors import ConfigError
from incseg.methods import check_method_name, method_class
from incseg.models.choices import BACKBONE_NAMES, NORMS, OUTPUT_STRIDES, PRETRAINED
from incseg.protocol.choices import CONVENTIONS, MODES, TEST_SELECTIONS
from incseg.protocol.official import SPLIT_SOURCES, uses_official
from incseg.protocol.settings import get_setting
from incseg.ranges import SEED, Range, check_range

DATASETS = {"shapes": "voc", "voc": "voc", "ade": "ade"}  # dataset name -> class family
AMP_MODES = ("off", "bf16", "fp16")
TENSORBOARD = ("auto", "on", "off")
DEVICES = ("auto", "cpu", "cuda")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass(frozen=True)
class DataConfig:
    """Dataset and transforms. ``root``: voc / ade only. ``image_size``, ``num_train``,
    ``num_test``, ``seed``: shapes only."""

    dataset: str = "shapes"
    root: str | None = None
    image_size: int = 64
    num_train: int = 1500
    num_test: int = 300
    seed: int = 0
    crop_size: int = 512
    scale_min: float = 0.5
    scale_max: float = 2.0
    test_crop: int | None = None
    num_workers: int = 0


@dataclass(frozen=True)
class ProtocolConfig:
    """Setting, image selection mode, label convention and how many steps to run.
    ``test_selection``: ``seen`` (test images with a seen class) or ``mode`` (also the step's
    disjoint rule, as cssegmentation)."""

    setting: str = "15-5"
    mode: str = "overlap"
    labels: str = "mib"
    split_source: str = "auto"
    test_selection: str = "seen"
    last_step: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """DeepLabV3 (SPEC section 7)."""

    backbone: str = "resnet101"
    output_stride: int = 16
    norm: str = "iabn"
    head_channels: int = 256
    pretrained: str = "none"
    # In-Place ABN's ImageNet checkpoint (resnet101_iabn_sync.pth.tar) at this path instead of
    # the cache path of ``pretrained: iabn`` (models/official.py)
    backbone_weights: str | None = None


@dataclass(frozen=True)
class MethodConfig:
    """Method name and its hyperparameters (the fields of the method's class)."""

    name: str = "mib"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. ``*_incremental`` apply to steps > 0 (None: same as step 0)."""

    epochs: int = 30
    epochs_incremental: int | None = None
    lr: float = 0.01
    lr_incremental: float = 0.001
    batch_size: int = 24
    eval_batch_size: int = 8
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    lr_power: float = 0.9
    amp: str = "off"
    device: str = "auto"
    seed: int = 0
    log_interval: int = 10
    val_interval: int = 0  # epochs between validations on the current classes; 0 = off
    checkpoint_every: int = 1  # epochs between resumable checkpoints (last.pt); 0 = step ends only
    sync_bn: bool = (
        True  # with several processes (torchrun), batch-norm statistics over the global batch
    )
    channels_last: bool = (
        False  # NHWC memory format for the model and its inputs (faster convs on GPU)
    )
    compile: bool = False  # torch.compile the model being trained
    tensorboard: str = "auto"  # auto: write TensorBoard logs if the package is installed; on | off

    def epochs_at(self, step: int) -> int:
        if step == 0 or self.epochs_incremental is None:
            return self.epochs
        return self.epochs_incremental

    def lr_at(self, step: int) -> float:
        return self.lr if step == 0 else self.lr_incremental


@dataclass(frozen=True)
class Config:
    """A whole run."""

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def family(self) -> str:
        return DATASETS[self.data.dataset]

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict; ``method`` is flattened to ``{name, **params}`` as in YAML."""
        out = dataclasses.asdict(self)
        out["method"] = {"name": self.method.name, **self.method.params}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Building a typed config from plain data


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Return ``value`` as ``annotation`` (int widened to float), or raise naming ``key``."""
    options = (
        typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    )
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key}: a value is required (null given)")
    for option in options:
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
        if option is str and isinstance(value, bool):  # YAML 1.1 reads unquoted on/off as booleans
            return "on" if value else "off"
    expected = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise ConfigError(f"{key}: expected {expected}, got {value!r} ({type(value).__name__})")


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking keys and scalar types.

    Nested dataclass fields are built recursively. ``prefix`` is the dotted path used in errors.
    """
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {names}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_dataclass(hint, value, key)
        else:
            kwargs[name] = _check_type(value, hint, key)
    return cls(**kwargs)


def _one_of(value: Any, choices: Any, key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: unknown value {value!r}; valid choices: {list(choices)}")


_EPOCHS = Range(1, 10_000, "epochs per step; every step trains at least one")
_LR = Range(0, 10, "SGD learning rate (0.01 / 0.001 in the paper)", low_open=True)
_SIZE = Range(16, 4096, "pixels; a side under 16 leaves less than one feature cell at output stride 16, "
              "over 4096 is far past any published crop (512 in the paper)")  # fmt: skip
_SCALE = Range(
    0, 10, "area scale of the random resized crop (0.5..2.0 in the paper)", low_open=True
)

# Every numeric key of the config and its valid values (docs/guards.md lists them with the reasons).
RANGES: dict[str, Range] = {
    "data.image_size": Range(16, 1024, "side of the rendered shapes images (64 in the demo)"),
    "data.num_train": Range(1, 100_000, "shapes images rendered in memory"),
    "data.num_test": Range(1, 100_000, "shapes images rendered in memory"),
    "data.seed": SEED,
    "data.crop_size": _SIZE,
    "data.scale_min": _SCALE,
    "data.scale_max": _SCALE,
    "data.test_crop": _SIZE,
    "data.num_workers": Range(0, 256, "loader worker processes; 0 loads in the main process"),
    "model.head_channels": Range(1, 4096, "ASPP output channels (256 in the paper)"),
    "train.epochs": _EPOCHS,
    "train.epochs_incremental": _EPOCHS,
    "train.lr": _LR,
    "train.lr_incremental": _LR,
    "train.batch_size": Range(
        2,
        4096,
        "global batch; batch norm in training needs 2 or more images "
        "(the ASPP pooling branch has one value per image)",
    ),
    "train.eval_batch_size": Range(1, 4096, "images per evaluation batch"),
    "train.momentum": Range(
        0, 1, "SGD momentum (0.9 in the paper); 1 or more never decays and diverges", high_open=True
    ),
    "train.weight_decay": Range(0, 1, "L2 factor of SGD (1e-4 in the paper)", high_open=True),
    "train.lr_power": Range(
        0, 10, "exponent of the poly schedule (0.9 in the paper); 0 keeps the LR constant"
    ),
    "train.seed": SEED,
    "train.log_interval": Range(1, 1_000_000, "iterations between loss read-backs"),
    "train.val_interval": Range(
        0, 10_000, "epochs between validations on the current classes; 0 = off"
    ),
    "train.checkpoint_every": Range(
        0, 10_000, "epochs between resumable checkpoints; 0 = only at step ends"
    ),
}
# Numeric keys checked otherwise: against the setting's steps, or against a list of choices.
RELATIVE_KEYS = ("protocol.last_step", "model.output_stride")
MAX_SHAPES_BYTES = 8 * 2**30


def validate(config: Config) -> None:
    """Check names and ranges that the types alone cannot."""
    data, proto, model, train = config.data, config.protocol, config.model, config.train
    _one_of(data.dataset, DATASETS, "data.dataset")
    for key, valid in RANGES.items():
        section, name = key.split(".")
        check_range(getattr(getattr(config, section), name), valid, key)
    if data.dataset == "shapes":
        size = (data.num_train + data.num_test) * data.image_size**2 * 4  # uint8 RGB + label
        if size > MAX_SHAPES_BYTES:
            raise ConfigError(
                f"data.num_train/num_test/image_size: {data.num_train} + {data.num_test} shapes images of "
                f"{data.image_size} px take {size / 2**30:.1f} GiB in memory; keep it under "
                f"{MAX_SHAPES_BYTES // 2**30} GiB"
            )
    if data.scale_min > data.scale_max:
        raise ConfigError(
            f"data.scale_min/scale_max: need scale_min <= scale_max, got {data.scale_min}, {data.scale_max}"
        )
    try:
        setting = get_setting(config.family, proto.setting)
    except ConfigError as err:
        raise ConfigError(f"protocol.setting: {err}") from None
    _one_of(proto.mode, MODES, "protocol.mode")
    _one_of(proto.labels, CONVENTIONS, "protocol.labels")
    _one_of(proto.split_source, SPLIT_SOURCES, "protocol.split_source")
    _one_of(proto.test_selection, TEST_SELECTIONS, "protocol.test_selection")
    uses_official(data.dataset, setting.name, proto.mode, proto.split_source)
    if data.dataset != "shapes" and not data.root:
        raise ConfigError(
            f"data.root: required for dataset {data.dataset!r} (the folder holding it)"
        )
    if proto.last_step is not None and not 0 <= proto.last_step < setting.num_steps:
        raise ConfigError(
            f"protocol.last_step: step {proto.last_step} is out of range for setting "
            f"{setting.name!r}; valid steps are 0..{setting.num_steps - 1}"
        )
    _one_of(model.backbone, sorted(BACKBONE_NAMES), "model.backbone")
    _one_of(model.output_stride, OUTPUT_STRIDES, "model.output_stride")
    _one_of(model.norm, NORMS, "model.norm")
    _one_of(model.pretrained, PRETRAINED, "model.pretrained")
    if model.backbone_weights and (model.pretrained == "imagenet" or model.backbone == "tiny"):
        raise ConfigError("model.backbone_weights: needs a ResNet backbone and model.pretrained: iabn "
                          "or none (the file replaces torchvision's ImageNet weights)")  # fmt: skip
    if model.pretrained == "iabn" and model.backbone != "resnet101":
        raise ConfigError(f"model.pretrained: iabn is In-Place ABN's ResNet-101; model.backbone is "
                          f"{model.backbone!r} (use resnet101, or pretrained: imagenet / none)")  # fmt: skip
    if train.val_interval and proto.labels != "mib":
        raise ConfigError("train.val_interval: validation during training follows MiB's convention; "
                          "it needs protocol.labels: mib")  # fmt: skip
    if train.nesterov and train.momentum == 0:
        raise ConfigError("train.momentum: Nesterov momentum (train.nesterov: true) needs momentum > 0; "
                          "set train.nesterov: false for plain SGD")  # fmt: skip
    _one_of(train.amp, AMP_MODES, "train.amp")
    _one_of(train.device, DEVICES, "train.device")
    _one_of(train.tensorboard, TENSORBOARD, "train.tensorboard")


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain data (as read from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {raw!r}")
    raw = dict(raw)
    method_raw = raw.pop("method", None) or {}
    if not isinstance(method_raw, dict):
        raise ConfigError(f"method: expected a mapping like {{name: mib}}, got {method_raw!r}")
    method_raw = dict(method_raw)
    name = method_raw.pop("name", MethodConfig.name)
    check_method_name(name)
    config = build_dataclass(Config, raw, "")
    validate(config)
    # The method's class (and torch) is imported only once the rest of the config is valid.
    cls = method_class(name)
    method = build_dataclass(cls, method_raw, "method")
    params = {f.name: getattr(method, f.name) for f in dataclasses.fields(method) if f.init}
    for key, valid in cls.ranges.items():
        check_range(params[key], valid, f"method.{key}")
    return dataclasses.replace(config, method=MethodConfig(name=name, params=params))


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
        value = yaml.safe_load(text) if text.strip() else None
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


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file; a name from :func:`builtin_configs` selects a shipped config."""
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
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    return raw or {}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (``None``: the demo config), apply ``--set`` overrides, validate."""
    raw = read_yaml(path if path is not None else "demo")
    for assignment in overrides:
        apply_override(raw, assignment)
    where = f"{path}: " if path is not None else ""
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None
