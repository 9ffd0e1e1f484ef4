"""Weights of the official MiB code and of In-Place ABN's ImageNet ResNet-101, mapped by name.

Official names (docs/protocol.md, "Model"; a ``module.`` prefix from DataParallel is accepted everywhere):

==========================================  =====================================
official                                    incseg
==========================================  =====================================
``body.mod1.{conv1,bn1}``                   ``backbone.{conv1,bn1}``
``body.modN.blockK.convs.{convI,bnI}``      ``backbone.layer{N-1}.{K-1}.{convI,bnI}``
``body.modN.block1.{proj_conv,proj_bn}``    ``backbone.layer{N-1}.0.downsample.{0,1}``
``head.map_convs.i`` / ``head.map_bn``      ``head.branches.i`` / ``head.branch_norm.0``
``head.red_conv`` / ``head.red_bn``         ``head.reduce`` / ``head.out_norm.0``
``head.global_pooling_conv`` / ``_bn``      ``head.pool.1`` / ``head.pool.2.0``
``head.pool_red_conv``                      ``head.pool.3``
``cls.i``                                   ``classifiers.i``
==========================================  =====================================

The ImageNet checkpoint (``resnet101_iabn_sync.pth.tar``, tensors under ``state_dict``) names the
body without ``body.``; its ``classifier.fc`` is ImageNet's and is dropped. In-Place ABN scales by
``|gamma| + eps`` (eps 1e-5) rather than ``gamma``, so norm weights are converted that way
(``abs_weight``) to make our BatchNorm compute the same function.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from incseg.errors import CheckpointError, ConfigError
from incseg.torchfile import load_torch_file

IABN_EPS = 1e-5
# In-Place ABN's ImageNet ResNet-101 (the MiB paper's backbone weights), as re-hosted by PLOP's
# authors: the In-Place ABN README's own link points to a file host without a stable direct URL.
IABN_FILE = "resnet101_iabn_sync.pth.tar"
IABN_URL = f"https://github.com/arthurdouillard/CVPR2021_PLOP/releases/download/v1.0/{IABN_FILE}"
_RULES = [  # (incseg pattern, official template)
    (r"backbone\.(conv1|bn1)\.(.+)", "body.mod1.{0}.{1}"),
    (r"backbone\.layer(\d)\.(\d+)\.downsample\.0\.(.+)", "body.mod{N}.block{K}.proj_conv.{2}"),
    (r"backbone\.layer(\d)\.(\d+)\.downsample\.1\.(.+)", "body.mod{N}.block{K}.proj_bn.{2}"),
    (r"backbone\.layer(\d)\.(\d+)\.((?:conv|bn)\d)\.(.+)", "body.mod{N}.block{K}.convs.{2}.{3}"),
    (r"head\.branches\.(\d+)\.(.+)", "head.map_convs.{0}.{1}"),
    (r"head\.branch_norm\.0\.(.+)", "head.map_bn.{0}"),
    (r"head\.reduce\.(.+)", "head.red_conv.{0}"),
    (r"head\.out_norm\.0\.(.+)", "head.red_bn.{0}"),
    (r"head\.pool\.1\.(.+)", "head.global_pooling_conv.{0}"),
    (r"head\.pool\.2\.0\.(.+)", "head.global_pooling_bn.{0}"),
    (r"head\.pool\.3\.(.+)", "head.pool_red_conv.{0}"),
    (r"classifiers\.(\d+)\.(.+)", "cls.{0}.{1}"),
]


def official_name(key: str) -> str | None:
    """The official name of one incseg state-dict key (``None`` for ``num_batches_tracked``)."""
    if key.endswith("num_batches_tracked"):
        return None
    for pattern, template in _RULES:
        match = re.fullmatch(pattern, key)
        if match:
            groups = match.groups()
            extra = {}
            if "{N}" in template:
                extra = {"N": int(groups[0]) + 1, "K": int(groups[1]) + 1}
            return template.format(*groups, **extra)
    raise CheckpointError(f"no official name for incseg parameter {key!r}")


def _norm_weights(model: nn.Module) -> set[str]:
    return {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def convert_official(
    state: Mapping[str, torch.Tensor],
    model: nn.Module,
    *,
    part: str = "all",
    abs_weight: bool = True,
) -> dict[str, torch.Tensor]:
    """Official tensors -> a state dict for ``model`` (every key accounted for).

    Args:
        state: official names, with or without ``module.`` (and, for ``part="body"``, ``body.``).
        model: the incseg model that will receive the weights (defines names and shapes).
        part: ``"all"`` (a MiB checkpoint: body, head, classifiers) or ``"body"`` (ImageNet).
        abs_weight: store In-Place ABN's ``|gamma| + eps`` as the BatchNorm weight.

    Raises:
        CheckpointError: official keys without a place, model keys without a value, or shapes
            that differ; the message names them.
    """
    wanted = {}
    for key, value in model.state_dict().items():
        name = official_name(key)
        if name is not None and (part == "all" or key.startswith("backbone.")):
            wanted[name] = (key, value.shape)
    given = {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        if part == "body":
            if name.startswith("classifier."):
                continue  # the ImageNet classifier
            name = name if name.startswith("body.") else f"body.{name}"
        given[name] = value
    missing, unexpected = sorted(wanted.keys() - given.keys()), sorted(given.keys() - wanted.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"official weights do not match the model: {len(missing)} missing (e.g. {missing[:4]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})"
        )
    norms = _norm_weights(model)
    out = {}
    for name, (key, shape) in wanted.items():
        value = given[name]
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"official {name!r} has shape {tuple(value.shape)}, incseg {key!r} expects {tuple(shape)}"
            )
        if abs_weight and key in norms:
            value = value.abs() + IABN_EPS
        out[key] = value
    return out


def load_iabn_imagenet(model: nn.Module, path: str) -> None:
    """Load In-Place ABN's ImageNet ResNet checkpoint into ``model``'s backbone."""
    data = load_torch_file(
        path,
        "In-Place ABN's ImageNet ResNet checkpoint (resnet101_iabn_sync.pth.tar)",
        key="model.backbone_weights",
    )
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"model.backbone_weights {path}: no state_dict inside")
    model.load_state_dict(convert_official(state, model, part="body"), strict=False)


def iabn_cache_path() -> Path:
    """Where ``model.pretrained: iabn`` looks for the file: torch's hub cache, beside torchvision's
    weights (``$TORCH_HOME/hub/checkpoints/``, by default ``~/.cache/torch/hub/checkpoints/``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / IABN_FILE


def ensure_iabn_weights(url: str | None = None) -> Path:
    """The cached In-Place ABN ImageNet ResNet-101, downloaded to :func:`iabn_cache_path` first
    if absent.

    Raises:
        ConfigError: not cached and the download failed (offline); the message names the URL to
            fetch by hand, the path to put the file at, and the alternative keys.
    """
    path, url = iabn_cache_path(), url or IABN_URL
    if path.is_file():
        return path
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(partial), progress=True)
        partial.replace(path)  # never leave a truncated file under the final name
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        partial.unlink(missing_ok=True)
        raise ConfigError(
            f"model.pretrained: iabn needs In-Place ABN's ImageNet ResNet-101, which is not at "
            f"{path} and could not be downloaded ({err}). Download {url} and put it at {path}, "
            "or set model.backbone_weights: FILE, or model.pretrained: imagenet (torchvision's "
            "weights) or none"
        ) from None
    return path
