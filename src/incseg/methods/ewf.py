"""EWF: Endpoints Weight Fusion (Xiao et al., "Endpoints Weight Fusion for Class Incremental
Semantic Segmentation", CVPR 2023), an add-on to any method (``method.name: mib+ewf``,
``plop+ewf``), as the official code computes it (schuy1er/EWF_official at 560382d):

- After a step t > 0 has trained, and before it is evaluated, every entry of the previous step's
  model (backbone, head, every old classifier, and the batch-norm running statistics) is fused
  with the trained one: ``theta = (1 - w) * theta_old + w * theta_new`` with
  ``w = sqrt(N_new / (N_new + N_old))``, N_old counting the background (``run.py:511-545``, the
  weight at ``:522``, the counts ``train.py:144-150``). The new classifier keeps its trained
  values (it has no old endpoint). The fused model is what is evaluated, saved, and carried to the
  next step as both its starting weights and its old model (``run.py:322-341``), so the fusion
  is recursive. Step 0 is never fused.
- ``freeze_old_classifiers`` (``--fix_pre_cls``, ``train.py:334-342``): during a step t > 0 the
  classifiers of steps 0..t-1, the background row included, receive no gradient (so SGD leaves
  them, weight decay and momentum included). The code's default is off; every official script
  turns it on, and so does incseg's default.

Not reproduced: ``--threshold_choice`` (``run.py:526-540``, "didn't mention in paper", used by
no script). Integer buffers (BatchNorm's ``num_batches_tracked``, absent from the official
In-Place ABN 1.0.7) keep the trained value. See docs/methods.md, ``ewf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from incseg.methods.base import AddOn
from incseg.protocol.steps import StepInfo


def fusion_weight(info: StepInfo) -> float:
    """EWF's weight of the trained model at step ``info.step``: ``sqrt(N_new / N_total)``, with
    N_total = every channel of the step, background included (``run.py:522``)."""
    return math.sqrt(info.channels_per_step[-1] / info.num_channels)


def set_old_classifiers_trainable(model: nn.Module, info: StepInfo, *, trainable: bool) -> None:
    """At a step > 0, let the classifiers of earlier steps (background row included) receive
    gradients or not; the newest classifier, and every classifier at step 0, stay trainable.
    Frozen parameters have no gradient, so SGD leaves them alone (weight decay and momentum
    included), as ``requires_grad = False`` does in the official codes."""
    for index, classifier in enumerate(model.classifiers):
        classifier.requires_grad_(trainable or info.step == 0 or index >= info.step)


def fuse_endpoints(old: dict[str, torch.Tensor], model: nn.Module, weight: float) -> None:
    """In place: every floating-point entry of ``model``'s state that ``old`` has becomes
    ``(1 - weight) * old + weight * current``; other entries keep their values.

    Args:
        old: the previous step's model state (names as in ``model.state_dict()``).
        model: the trained model of this step.
        weight: the weight of the trained model (:func:`fusion_weight`).
    """
    state = model.state_dict()
    with torch.no_grad():
        for name, before in old.items():
            current = state[name]
            if current.is_floating_point():
                current.mul_(weight).add_(before.to(current.device), alpha=1 - weight)


@dataclass
class EWF(AddOn):
    """Endpoints Weight Fusion: after each step > 0, fuse the trained model with the previous one
    (``sqrt(N_new / N_total)`` on the trained side); optionally freeze the old classifiers
    while a step trains.

    Attributes:
        freeze_old_classifiers: the old classifiers (background row included) get no gradient
            during steps > 0 (the official scripts' ``--fix_pre_cls``).
    """

    freeze_old_classifiers: bool = True
    _previous: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def init_new_classifier(self, model: nn.Module, info: StepInfo) -> None:
        # Called before the base method initialises the new classifier (MiB's init shifts the
        # background bias): the old endpoint is the previous step's model as it was saved.
        new = f"classifiers.{len(model.classifiers) - 1}."
        self._previous = {
            name: value.detach().clone()
            for name, value in model.state_dict().items()
            if not name.startswith(new)
        }

    def begin_step(self, info: StepInfo, model: nn.Module) -> None:
        set_old_classifiers_trainable(model, info, trainable=not self.freeze_old_classifiers)

    def end_step(self, info: StepInfo, model: nn.Module) -> None:
        if info.step > 0:
            fuse_endpoints(self._previous, model, fusion_weight(info))
        self._previous = {}
