"""Models in and out of files: built from a config (with its backbone weights), restored from a
step checkpoint, frozen as the old model. Placing them on the device and wrapping them for
training is the :class:`~incseg.engine.runtime.Runtime`'s."""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from incseg.config import Config, config_from_dict
from incseg.engine.distributed import DistInfo, barrier
from incseg.errors import CheckpointError, ConfigError
from incseg.models import IncrementalSegmenter, build_segmenter
from incseg.models.official import ensure_iabn_weights, load_iabn_imagenet
from incseg.models.rcil import to_rcil
from incseg.protocol import StepInfo, step_info


def fetch_backbone_weights(config: Config, dist: DistInfo) -> None:
    """Download ``pretrained: iabn``'s file into the cache on rank 0 (or stop with the URL and the
    path when offline) before any data work; the other ranks wait for it."""
    if config.model.pretrained == "iabn" and not config.model.backbone_weights:
        if dist.is_main:
            ensure_iabn_weights()
        barrier(dist)


def build_model(config: Config, info: StepInfo, *, pretrained: bool = True) -> IncrementalSegmenter:
    """A fresh segmenter with the classifiers of steps ``0..info.step``; ``pretrained=False``
    skips loading backbone weights (they are about to be overwritten by a checkpoint)."""
    m = config.model
    model = build_segmenter(
        m.backbone,
        info.channels_per_step,
        output_stride=m.output_stride,
        norm=m.norm,
        head_channels=m.head_channels,
        pretrained=m.pretrained if pretrained else "none",
        architecture=m.architecture,
        query_sizes=dataclasses.asdict(m.mask2former) | {"total_classes": _head_classes(config)},
    )
    if pretrained and (m.backbone_weights or m.pretrained == "iabn"):
        load_iabn_imagenet(model, m.backbone_weights or str(ensure_iabn_weights()))
    if m.architecture == "rcil":  # after the weights: both backbone branches start from them
        to_rcil(model, m.norm)
    return model


def _head_classes(config: Config) -> int:
    """The classes of a static class head (SimCIS's): every channel of the setting, less the
    background when the head has no background class."""
    setting = config.setting
    channels = step_info(setting, setting.num_steps - 1).num_channels
    return channels - (0 if config.model.mask2former.background else 1)


def stand_in_method(model: object) -> str:
    """The built-in method a checkpoint's config names in place of its own: fine-tuning of its
    architecture (ECLIPSE for a Mask2Former with prompt queries, SimCIS for its decoder)."""
    if not (isinstance(model, dict) and model.get("architecture") == "mask2former"):
        return "ft"
    sizes = model.get("mask2former")
    if not isinstance(sizes, dict):
        return "m2f_ft"
    if sizes.get("decoder") == "selection":
        return "simcis"
    return "eclipse" if sizes.get("prompts") else "m2f_ft"


def restore_step(checkpoint: dict) -> tuple[Config, StepInfo, IncrementalSegmenter]:
    """Rebuild the config, step and model saved in a loaded checkpoint (see ``load_checkpoint``):
    a step checkpoint ``step_K.pt``, an epoch checkpoint ``last.pt`` (the model part-way through
    its step) or an imported one.

    The model does not depend on the method, so the checkpoint's ``method`` section is not read:
    the returned config names fine-tuning in its place (``m2f_ft`` for the query-based model;
    ``eclipse``, the only method of its prompt queries, for a model with them). A method named
    inside a checkpoint (a ``module:Class`` path could run any module's code) is therefore never
    imported.
    """
    raw = checkpoint["config"]
    if not isinstance(raw, dict):
        raise CheckpointError(f"checkpoint config is not a mapping: {raw!r}")
    try:
        config = config_from_dict({**raw, "method": {"name": stand_in_method(raw.get("model"))}})
    except ConfigError as err:
        raise CheckpointError(f"checkpoint config does not load: {err}") from None
    setting = config.setting
    if not (isinstance(checkpoint["step"], int) and 0 <= checkpoint["step"] < setting.num_steps):
        raise CheckpointError(
            f"checkpoint step {checkpoint['step']!r} is not a step of {setting.name}"
        )
    info = step_info(setting, checkpoint["step"])
    channels = checkpoint.get("channels_per_step", info.channels_per_step)  # last.pt: from the step
    if tuple(channels) != info.channels_per_step:
        raise CheckpointError(
            f"checkpoint classifier sizes {channels} do not match step "
            f"{info.step} of {config.protocol.setting} {list(info.channels_per_step)}"
        )
    model = build_model(config, info, pretrained=False)
    state = checkpoint["model"]
    missing, unexpected = (
        model.state_dict().keys() - state.keys(),
        state.keys() - model.state_dict().keys(),
    )
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not fit a {config.model.backbone} model: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # same names, other shapes
        raise CheckpointError(
            f"checkpoint weights do not fit the model: {str(err).splitlines()[-1].strip()}"
        ) from None
    return config, info, model


def frozen_copy(model: nn.Module) -> nn.Module:
    """The old model: a deep copy in eval mode with gradients off (never wrapped in DDP)."""
    old = copy.deepcopy(model).eval()
    old.requires_grad_(False)
    return old
