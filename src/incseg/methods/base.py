"""The method interface: a small class with named hooks that return values.

Per step the engine (:mod:`incseg.engine.run`) calls, in this order:

1. (steps > 0) the classifier grows, then :meth:`Method.init_new_classifier`;
2. :meth:`Method.begin_step`, which sees the step's starting weights; then
   :meth:`Method.param_groups` for the step's optimiser (with a memory, the step's memory was
   chosen before all this: :attr:`Method.memory_size`, :meth:`Method.memory_pseudo_labels`,
   :meth:`Method.memory_lut`);
3. only when resuming an interrupted step: the mid-step weights are loaded into the model (in
   place) and :meth:`Method.load_step_state_dict` restores what the method accumulated in the
   step so far, so everything before this point is exactly what a fresh run did;
4. otherwise, at steps > 0: with ``scans_old_model``, one pass of the frozen old model over the
   step's training batches (epoch 0's order and augmentation, no gradients): :meth:`Method.scan`
   returns additive statistics of each batch, the engine sums them over batches and processes
   and hands the totals to :meth:`Method.end_scan` (PLOP's entropy thresholds).
   What ``end_scan`` keeps belongs in :meth:`Method.step_state_dict`, so a resumed step skips
   the pass and gets the same values; then :meth:`Method.prepare_step` (NeST's pre-tuning),
   which sees the step's training batches (:class:`StepData`) and may change the model; a
   resumed step loads the weights it left instead;
5. every iteration: the old model's outputs (steps > 0, ``needs_old_model``), then
   :meth:`Method.relabel` (what it returns is what :meth:`Method.losses` gets as ``targets``),
   the student's forward, :meth:`Method.losses`, backward, :meth:`Method.after_backward` (only
   with ``needs_gradients``), the optimizer step;
6. :meth:`Method.end_step`, :meth:`Method.after_training`, then evaluation;
   :meth:`Method.state_dict` is saved with the step.

Every hook is implemented by at least one built-in method or add-on (docs/design.md lists which).
Both models return the intermediate maps named in ``features``
(:data:`incseg.models.choices.FEATURE_NAMES`) in ``output.features``; with none named the
forward pass is the plain one.

A resumed run restores the finished steps' method state with :meth:`Method.load_state_dict`
before step 1 above. A method never touches the optimizer, the grad scaler, distributed wrappers
or logging. Hyperparameters are dataclass fields, filled from the YAML ``method:`` section; a
numeric one declares its valid values with :func:`incseg.ranges.ranged`, a choice is a
``Literal``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from incseg.protocol.steps import StepInfo

if TYPE_CHECKING:  # annotations only: the model modules import torchvision
    from incseg.models.segmenter import SegmenterOutput
    from incseg.protocol.memory import Exemplar


class StepData(Protocol):
    """What :meth:`Method.prepare_step` sees of a step's training (the engine's
    :class:`incseg.engine.train.StepData`).

    Attributes:
        device: where the models are.
        batches_per_epoch: training batches per epoch (this process's).
        epochs: epochs the step trains.
        sgd_settings: the step's ``lr``, ``momentum``, ``nesterov``, ``weight_decay`` and
            ``lr_power`` (the poly exponent).
    """

    device: torch.device
    batches_per_epoch: int
    epochs: int
    sgd_settings: dict[str, Any]

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The training batches of ``epoch`` (its order and augmentation), on the device:
        ``(B, 3, H, W)`` images and ``(B, H, W)`` channel indices, 255 = ignore."""
        ...

    def autocast(self) -> AbstractContextManager:
        """The run's mixed precision context."""
        ...

    def sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place over every process (identity for one); returns it."""
        ...

    def mean_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place over every process (identity for one); returns it."""
        ...


@dataclass
class Method:
    """Base class of every method: the hooks, all optional except :meth:`losses`.

    Capabilities (class attributes) tell the engine what to compute:
    ``needs_old_model``: run the frozen previous-step model on every batch (steps > 0);
    ``features``: names of the intermediate maps both models return (``output.features``);
    ``scans_old_model``: before training a step > 0, run :meth:`scan` / :meth:`end_scan`;
    ``needs_gradients``: call :meth:`after_backward` (unscaled gradients in ``.grad``) every
    iteration;
    ``plain_first_step``: step 0 is plain cross-entropy and leaves no method state, so methods
    that declare it train the very same step-0 model (``incseg compare`` trains it once);
    ``trained_state``: :meth:`state_dict` holds what the training iterations gathered (EWC's
    Fisher, SimCIS's query bank), which the weights alone do not give, so such a method cannot
    start from a checkpoint file (``incseg run --start-from FILE.pt``).
    """

    needs_old_model: ClassVar[bool] = False
    features: ClassVar[tuple[str, ...]] = ()
    scans_old_model: ClassVar[bool] = False
    needs_gradients: ClassVar[bool] = False
    plain_first_step: ClassVar[bool] = False
    trained_state: ClassVar[bool] = False
    # Exemplar memory (the -M variants, docs/methods.md "Exemplar memory"): images kept in total
    # from step 1 on (0: none; a method with a memory makes it a hyperparameter), and how they
    # join a step's batches (engine/loaders.py Extras).
    memory_size: ClassVar[int] = 0
    memory_mixing: ClassVar[str] = "concat"
    # which images: "balanced" (SSUL's class turns) or "frequency" (BalConpas's histogram
    # matching), incseg.protocol.memory
    memory_rule: ClassVar[str] = "balanced"
    # Which background pixels of the training labels become 254, SSUL's unknown class:
    # "saliency" (the salient ones, data.saliency), "background" (all), None (none).
    unknown_from: ClassVar[str | None] = None

    @classmethod
    def first_step_key(cls, params: dict[str, Any]) -> object | None:
        """What step 0 depends on of the method (``params``: its hyperparameters as the config
        holds them), for methods that train the very same step 0: runs whose configs differ
        only in the method and whose keys are equal share step 0 (``incseg compare`` trains it
        once; ``--start-from`` accepts it). None: the method's step 0 is its own. A
        ``plain_first_step`` method's key is plain cross-entropy with MiB's ``ce_reduction``."""
        if cls.plain_first_step:
            return ("plain first step", params.get("ce_reduction", "valid"))
        return None

    def stores(self) -> str:
        """What the method keeps of earlier steps' data besides its model, for the tables:
        ``"images (N)"`` with an exemplar memory of ``N`` images, else ``"nothing"``."""
        return f"images ({self.memory_size})" if self.memory_size else "nothing"

    def memory_lut(self, info: StepInfo, exemplar: Exemplar) -> torch.Tensor | None:
        """The ``(256,)`` uint8 label lookup table of one of the step's memory images (dataset
        ids -> training labels); None (default): the step's training labels."""
        return None

    def memory_pseudo_labels(
        self, old_output: SegmenterOutput, targets: torch.Tensor, info: StepInfo
    ) -> torch.Tensor:
        """The labels from which the memory selection reads which classes a candidate of step
        ``info`` (>= 1) holds: ``targets`` (``(B, H, W)`` long channel indices of that step,
        255 = ignore) completed with the model of that step's ``old_output`` (by default left
        as they are)."""
        return targets

    def init_new_classifier(self, model: nn.Module, info: StepInfo) -> None:
        """Called once right after the step's classifier was added (steps > 0)."""

    def begin_step(self, info: StepInfo, model: nn.Module) -> None:
        """Called before training a step, with the step's starting weights (also on resume)."""

    def param_groups(self, model: nn.Module, info: StepInfo) -> list[dict[str, Any]] | None:
        """The step's SGD parameter groups, after :meth:`begin_step`: dicts with ``params`` and
        optionally ``lr_scale`` (times the step's LR) and ``weight_decay``; a parameter in no
        group is not trained. None (default): every parameter, at the step's LR."""
        return None

    def scan(
        self, old_output: SegmenterOutput, targets: torch.Tensor, info: StepInfo
    ) -> dict[str, torch.Tensor]:
        """Additive statistics of one training batch under the old model (``scans_old_model``).

        Args:
            old_output: the old model's outputs (eval mode, no gradients), logits ``(B, O, H, W)``
                and the maps named in ``features``.
            targets: ``(B, H, W)`` channel indices of the step's training labels, 255 = ignore.
            info: the step.

        Returns:
            Tensors of fixed shapes; the engine sums each over all batches and processes.
        """
        raise NotImplementedError(
            f"{type(self).__name__} scans the old model but defines no scan()"
        )

    def end_scan(self, totals: dict[str, torch.Tensor], info: StepInfo) -> None:
        """Receive the summed :meth:`scan` statistics (same keys) before the step's training."""

    def prepare_step(
        self, data: StepData, info: StepInfo, model: nn.Module, old_model: nn.Module
    ) -> None:
        """Before a step > 0 trains (after the scan; not when resuming it mid-step): may train
        parts of ``model`` on the step's batches (NeST's pre-tuning). ``old_model`` is frozen,
        in eval mode."""

    def prepare_passes(self) -> tuple[int, int]:
        """Epochs of (student, old-model) passes :meth:`prepare_step` runs per step > 0, for the
        cost ``incseg run --dry-run`` shows."""
        return (0, 0)

    def relabel(
        self, old_output: SegmenterOutput | None, targets: torch.Tensor, info: StepInfo
    ) -> Any:
        """What :meth:`losses` receives as ``targets`` for this batch: by default ``targets``
        itself; a method may return new labels (pseudo-labels) or any structure its own
        :meth:`losses` understands. ``targets``: ``(B, H, W)`` channel indices, 255 = ignore;
        ``old_output``: as in :meth:`losses`."""
        return targets

    def losses(
        self,
        output: SegmenterOutput,
        old_output: SegmenterOutput | None,
        targets: Any,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        """Named, already weighted loss terms of a batch; the engine sums them.

        Args:
            output: current model outputs, logits ``(B, C_t, H, W)`` and ``features``.
            old_output: old model outputs (``(B, O, H, W)``) or None at step 0 / if not needed.
            targets: what :meth:`relabel` returned: by default ``(B, H, W)`` uint8/long channel
                indices, 255 = ignore.
            info: the step.
        """
        raise NotImplementedError(f"{type(self).__name__} must define losses()")

    def after_backward(self, model: nn.Module) -> None:
        """Every iteration, after backward and before the optimizer step (``needs_gradients``)."""

    def end_step(self, info: StepInfo, model: nn.Module) -> None:
        """Called after a step's training, before evaluation."""

    def after_training(self, data: StepData, info: StepInfo, model: nn.Module) -> None:
        """After :meth:`end_step`, before evaluation: may pass ``model`` (the step's final one)
        over the step's training batches to keep statistics for later steps (REMINDER's class
        prototypes); what it keeps belongs in :meth:`state_dict`."""

    def state_dict(self) -> dict[str, Any]:
        """State that must survive across steps and in checkpoints (none here)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (resume, before the next step begins)."""

    def step_state_dict(self) -> dict[str, Any]:
        """Everything the method changed since :meth:`begin_step` (saved in epoch checkpoints so
        that an interrupted step resumes exactly; none here)."""
        return {}

    def load_step_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`step_state_dict`; called after :meth:`begin_step` on resume."""


@dataclass
class AddOn:
    """Base class of an add-on: a technique that applies on top of any method (EWF), named after
    it in the config (``method.name: mib+ewf``) with its hyperparameters under its own key
    (``method: {name: mib+ewf, ewf: {freeze_old_classifiers: true}}``). It has the step hooks of
    a method that such techniques need; the engine calls them through :class:`WithAddOns`:

    - :meth:`init_new_classifier`: right after the classifier grew, *before* the method's own,
      which is skipped for a step where an add-on's :meth:`replaces_classifier_init` says so
      (NeST when it pre-tunes);
    - :meth:`begin_step`, :meth:`prepare_step` and :meth:`end_step`: after the method's own;
    - :meth:`losses`: its terms are added to the method's (UCD), with the batch's labels as the
      loader gave them (before the method's ``relabel``).

    ``needs_old_model`` and ``features`` add to the method's capabilities.
    """

    needs_old_model: ClassVar[bool] = False
    features: ClassVar[tuple[str, ...]] = ()

    def replaces_classifier_init(self, info: StepInfo) -> bool:
        """Whether this add-on initialises step ``info``'s new classifier itself, so that the
        method's ``init_new_classifier`` does not run for that step (default: False)."""
        return False

    def init_new_classifier(self, model: nn.Module, info: StepInfo) -> None:
        """Called once right after the step's classifier was added (steps > 0)."""

    def begin_step(self, info: StepInfo, model: nn.Module) -> None:
        """Called before training a step, after the method's ``begin_step`` (also on resume)."""

    def prepare_step(
        self, data: StepData, info: StepInfo, model: nn.Module, old_model: nn.Module
    ) -> None:
        """As :meth:`Method.prepare_step`, after the method's own."""

    def prepare_passes(self) -> tuple[int, int]:
        """As :meth:`Method.prepare_passes`."""
        return (0, 0)

    def losses(
        self,
        output: SegmenterOutput,
        old_output: SegmenterOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        """Extra named, weighted loss terms (names distinct from the method's); ``targets`` are
        the batch's ``(B, H, W)`` channel indices before the method's ``relabel``."""
        return {}

    def end_step(self, info: StepInfo, model: nn.Module) -> None:
        """Called after a step's training and the method's ``end_step``, before evaluation."""


class WithAddOns(Method):
    """A method with add-ons: every hook is the method's, with the add-ons' step hooks around it
    (:class:`AddOn`). Capabilities are the method's; checkpoints keep the method's state."""

    def __init__(self, method: Method, addons: list[AddOn]) -> None:
        self.method, self.addons = method, list(addons)
        for capability in ("scans_old_model", "needs_gradients", "plain_first_step"):
            setattr(self, capability, getattr(method, capability))
        self.needs_old_model = method.needs_old_model or any(a.needs_old_model for a in addons)
        self.memory_size, self.memory_mixing = method.memory_size, method.memory_mixing
        self.memory_rule = method.memory_rule
        self.unknown_from = method.unknown_from
        self.memory_lut, self.memory_pseudo_labels = method.memory_lut, method.memory_pseudo_labels
        features = [*method.features, *(f for a in addons for f in a.features)]
        self.features = tuple(dict.fromkeys(features))

    def stores(self) -> str:
        return self.method.stores()

    def init_new_classifier(self, model: nn.Module, info: StepInfo) -> None:
        for addon in self.addons:
            addon.init_new_classifier(model, info)
        if not any(addon.replaces_classifier_init(info) for addon in self.addons):
            self.method.init_new_classifier(model, info)

    def begin_step(self, info: StepInfo, model: nn.Module) -> None:
        self.method.begin_step(info, model)
        for addon in self.addons:
            addon.begin_step(info, model)

    def prepare_step(
        self, data: StepData, info: StepInfo, model: nn.Module, old_model: nn.Module
    ) -> None:
        self.method.prepare_step(data, info, model, old_model)
        for addon in self.addons:
            addon.prepare_step(data, info, model, old_model)

    def prepare_passes(self) -> tuple[int, int]:
        passes = [self.method.prepare_passes(), *(a.prepare_passes() for a in self.addons)]
        return sum(p[0] for p in passes), sum(p[1] for p in passes)

    def end_step(self, info: StepInfo, model: nn.Module) -> None:
        self.method.end_step(info, model)
        for addon in self.addons:
            addon.end_step(info, model)

    def after_training(self, data: StepData, info: StepInfo, model: nn.Module) -> None:
        self.method.after_training(data, info, model)

    def param_groups(self, model: nn.Module, info: StepInfo) -> list[dict[str, Any]] | None:
        return self.method.param_groups(model, info)

    def scan(
        self, old_output: SegmenterOutput, targets: torch.Tensor, info: StepInfo
    ) -> dict[str, torch.Tensor]:
        return self.method.scan(old_output, targets, info)

    def end_scan(self, totals: dict[str, torch.Tensor], info: StepInfo) -> None:
        self.method.end_scan(totals, info)

    def relabel(
        self, old_output: SegmenterOutput | None, targets: torch.Tensor, info: StepInfo
    ) -> Any:
        return targets, self.method.relabel(old_output, targets, info)

    def losses(
        self,
        output: SegmenterOutput,
        old_output: SegmenterOutput | None,
        targets: Any,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        labels, relabelled = targets
        terms = self.method.losses(output, old_output, relabelled, info)
        for addon in self.addons:
            extra = addon.losses(output, old_output, labels, info)
            clash = sorted(set(extra) & set(terms))
            if clash:
                raise ValueError(f"{type(addon).__name__}: loss names {clash} are taken")
            terms |= extra
        return terms

    def after_backward(self, model: nn.Module) -> None:
        self.method.after_backward(model)

    def state_dict(self) -> dict[str, Any]:
        return self.method.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state)

    def step_state_dict(self) -> dict[str, Any]:
        return self.method.step_state_dict()

    def load_step_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_step_state_dict(state)
