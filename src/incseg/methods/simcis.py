"""SimCIS (Zhu et al., "SimCIS: Simple Class-Incremental Semantic Segmentation with Strong
Baseline", CVPR 2025; SooLab/SimCIS 28bc91e) on incseg's Mask2Former with SimCIS's decoder.

The model (``model.mask2former.decoder: selection``, ``class_head: static``, ``inference:
simcis``): queries are the pixel decoder's tokens the class head scores highest, refined with
boxes (:mod:`incseg.models.mask2former.selection`); the class head is one linear layer over every
class of the setting. The criterion (:func:`incseg.simcis_losses.simcis_criterion`): sigmoid
focal class loss, point-sampled mask BCE and dice, box L1 and GIoU, at every layer and at the
selected tokens' own prediction.

At steps > 0 the frozen old model

* gives pseudo targets for the old classes outside the step's masks, joined per class
  (:func:`incseg.simcis_losses.pseudo_targets`), placed before the ground truth;
* gives its selected positions: the new model's tokens there are decoded a second time and
  their intermediate and last class logits pulled to the old model's by a KL term
  (``kl_weight``, the consistent selection of the paper);
* before the step, one pass over the step's images counts how many images' pseudo targets hold
  each old class (the official's collection run at learning rate 0,
  ``scripts/sem_100-10.sh:13-14``, ``maskformer_model.py:300-307``, ``trainer.py:467-483``).

And a bank of query features, ``bank_size`` per class (``CONT.LIB_SIZE`` 80), filled at every
iteration of every step with the selected tokens matched to each class (ground truth and pseudo
targets; ``maskformer_model.py:312-338``), kept from step to step: at steps > 0
``virtual_queries`` (``CONT.VQ_NUMBER``) of them per image, their classes drawn with weights
``((sum(n + 1)) / (n + 1)) ** distribution_alpha`` of the counts ``n``, are appended as virtual
queries and trained with their class only. The bank is part of the method's state, in every step
and epoch checkpoint (checksummed with it).

docs/methods.md ("simcis") lists what differs from the official code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from incseg.methods.query import QueryMethod, targets_of
from incseg.models.mask2former.selection import SelectionInputs
from incseg.protocol.steps import StepInfo
from incseg.ranges import Range, ranged
from incseg.simcis_losses import (
    OVERLAP_THRESHOLD,
    Distillation,
    SimCISWeights,
    class_counts,
    old_predictions,
    pseudo_targets,
    sampling_weights,
    simcis_criterion,
    simcis_match,
    target_boxes,
)

if TYPE_CHECKING:
    from incseg.models.mask2former.segmenter import QueryOutput

_WEIGHT = Range(0, 1000, "loss weight")
_TEMPERATURE = Range(1e-3, 1000, "distillation temperature")


@dataclass
class SimCIS(QueryMethod):
    """Hyperparameters (``CONT.*`` of ``configs/ade20k/semantic-segmentation/*.yaml``):
    ``kl_weight`` (2.0), ``kd_temperature`` (``KD_TEMPERATURE`` 1.0, the intermediate term),
    ``kd_temperature_decoder`` (``KD_TEMPERATURE2``: 2.0 for 100-50 and 100-5, 4.0 for 100-10),
    ``kd_decoder`` (the last-layer term: off for 100-50), ``kl_all`` (every class column, or
    the old classes' only), ``virtual_queries`` (1 for 100-50 and 100-10, 3 for 100-5),
    ``distribution_alpha`` (0.25 for 100-50, 0.5 otherwise), ``bank_size`` (80),
    ``overlap_threshold`` (0.8), besides Mask2Former's criterion's (its ``no_object_weight``
    is not used: the focal loss has no no-object class). The box weights are the mask weight
    (L1) and 2.0 (GIoU), fixed in the official code."""

    decoder: ClassVar[str] = "selection"
    needs_old_model: ClassVar[bool] = True
    trained_state: ClassVar[bool] = True  # the bank holds the training iterations' queries
    scans_old_model: ClassVar[bool] = True
    # pseudo targets go where the labels have no mask: a background class would cover them all
    pseudo_labels_old_pixels: ClassVar[bool] = True

    kl_weight: float = ranged(2.0, _WEIGHT)
    kd_temperature: float = ranged(1.0, _TEMPERATURE)
    kd_temperature_decoder: float = ranged(2.0, _TEMPERATURE)
    kd_decoder: bool = True
    kl_all: bool = True
    virtual_queries: int = ranged(3, Range(0, 100, "virtual queries per image (0: none)"))
    distribution_alpha: float = ranged(0.5, Range(0, 10, "exponent of the class weights"))
    bank_size: int = ranged(80, Range(1, 100_000, "stored query features per class"))
    overlap_threshold: float = ranged(
        OVERLAP_THRESHOLD, Range(0, 1, "share of its area an old query's target must keep")
    )
    bank: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    counts: torch.Tensor | None = field(default=None, init=False, repr=False)
    _model: nn.Module | None = field(default=None, init=False, repr=False)

    @property
    def weights(self) -> SimCISWeights:
        return SimCISWeights(
            set=self.criterion_weights, box_weight=self.mask_weight, kl_weight=self.kl_weight
        )

    def stores(self) -> str:
        return f"query features ({self.bank_size} per class)"

    def begin_step(self, info: StepInfo, model: nn.Module) -> None:
        """Keep the model: its next forward takes the virtual queries and the old positions."""
        self._model = model

    def scan(
        self, old_output: QueryOutput, targets: torch.Tensor, info: StepInfo
    ) -> dict[str, torch.Tensor]:
        """The collection pass: per old class, the images whose pseudo targets hold it."""
        found = targets_of(targets, old_output.first_channel)
        pseudo = self._pseudo(old_output, found, info)
        old = info.num_old_channels - old_output.first_channel
        return {"counts": class_counts(pseudo, old).to(targets.device)}

    def end_scan(self, totals: dict[str, torch.Tensor], info: StepInfo) -> None:
        self.counts = totals["counts"].cpu()

    def relabel(
        self, old_output: QueryOutput | None, targets: torch.Tensor, info: StepInfo
    ) -> dict[str, Any]:
        """The batch's targets (pseudo targets first, boxes added) and virtual queries; the
        model's next forward gets the virtual queries and the old model's positions."""
        first = 0 if self._model is None else self._model.first_channel
        found = targets_of(targets, first)
        if old_output is not None:
            pseudo = self._pseudo(old_output, found, info)
            found = [_join(p, t) for p, t in zip(pseudo, found, strict=True)]
        for t in found:
            t["boxes"] = target_boxes(t["masks"])
        virtual, labels = self._virtual(len(found), info, targets.device)
        positions = old_output.extras["topk"] if old_output is not None else None
        if self._model is not None:
            self._model.selection_inputs = SelectionInputs(virtual, positions)
        return {"targets": found, "virtual_labels": labels}

    def _pseudo(self, old_output: QueryOutput, found: list[dict], info: StepInfo) -> list[dict]:
        """Per image the old model's pseudo targets, its masks upsampled bilinearly to the
        labels' size (``maskformer_model.py:352-357``)."""
        size = found[0]["masks"].shape[-2:] if found else old_output.size
        masks = F.interpolate(
            old_output.pred_masks.float(), size=tuple(size), mode="bilinear", align_corners=False
        )
        old = info.num_old_channels - old_output.first_channel
        out = []
        for b, target in enumerate(found):
            labels, probs, scores = old_predictions(old_output.pred_logits[b], masks[b], old)
            out.append(
                pseudo_targets(labels, probs, scores, target["masks"], self.overlap_threshold)
            )
        return out

    def _virtual(
        self, batch: int, info: StepInfo, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(B, V, hidden)`` stored features and their ``(B, V)`` classes
        (``simcis_decoder.py:518-531``), or (None, None) at step 0, without virtual queries or
        with an empty bank. Classes without stored features are not drawn (the official would
        fail on them)."""
        if info.step == 0 or not self.virtual_queries or not self.bank:
            return None, None
        old = info.num_old_channels - (0 if self._model is None else self._model.first_channel)
        counts = self.counts if self.counts is not None else torch.zeros(old, dtype=torch.int64)
        weights = sampling_weights(counts[:old], self.distribution_alpha)
        present = torch.tensor([c in self.bank for c in range(old)])
        weights = torch.where(present, weights, 0.0)
        if not present.any():
            return None, None
        classes = torch.multinomial(weights, self.virtual_queries * batch, replacement=True)
        picked = [self.bank[int(c)][torch.randint(len(self.bank[int(c)]), ())] for c in classes]
        virtual = torch.stack(picked).reshape(batch, self.virtual_queries, -1).to(device)
        return virtual, classes.reshape(batch, -1).to(device)

    def losses(
        self,
        output: QueryOutput,
        old_output: QueryOutput | None,
        targets: dict[str, Any],
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        """Terms ``ce``, ``mask``, ``dice``, ``bbox``, ``giou`` and, at steps > 0, ``kl``; then
        the bank takes this batch's matched tokens."""
        outputs = {"pred_logits": output.pred_logits, "pred_masks": output.pred_masks}
        outputs |= output.extras | {"aux_outputs": output.aux_outputs}
        distill = None
        if old_output is not None and "distill" in outputs:
            old = info.num_old_channels - output.first_channel
            distill = Distillation(
                old_output.extras["interm"]["pred_logits"],
                old_output.pred_logits,
                self.kd_temperature,
                self.kd_temperature_decoder,
                self.kd_decoder,
                None if self.kl_all else old,
            )
        found, virtual = targets["targets"], targets["virtual_labels"]
        raw = simcis_criterion(outputs, found, self.weights, virtual, distill)
        self._store(outputs, found)
        factors = {"ce": self.class_weight, "mask": self.mask_weight, "dice": self.dice_weight}
        factors |= {"bbox": self.mask_weight, "giou": self.weights.giou_weight}
        return _grouped(raw, factors | {"kl": self.kl_weight})

    @torch.no_grad()
    def _store(self, outputs: dict[str, Any], found: list[dict[str, torch.Tensor]]) -> None:
        """The bank takes, per matched pair of the last prediction (all queries, the virtual
        ones too, as the official matches them), the selected token of that query under its
        target's class, oldest first out past ``bank_size``."""
        last = {k: outputs[k] for k in ("pred_logits", "pred_masks", "pred_boxes")}
        indices = simcis_match(last, found, self.weights)
        selected = outputs["selected"].detach().float().cpu()
        for b, (queries, rows) in enumerate(indices):
            labels = found[b]["labels"].cpu()
            for q, row in zip(queries.tolist(), rows.tolist(), strict=True):
                c = int(labels[row])
                kept = self.bank.get(c)
                token = selected[b, q][None]
                kept = token if kept is None else torch.cat([kept, token])
                self.bank[c] = kept[-self.bank_size :]

    def end_step(self, info: StepInfo, model: nn.Module) -> None:
        if self._model is not None:
            self._model.selection_inputs = None

    def state_dict(self) -> dict[str, Any]:
        """The bank (class -> ``(n, hidden)`` float32, n <= ``bank_size``) and the collection
        pass's counts."""
        state: dict[str, Any] = {"bank": {c: t.clone() for c, t in self.bank.items()}}
        if self.counts is not None:
            state["counts"] = self.counts.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank = {int(c): t.float() for c, t in state.get("bank", {}).items()}
        self.counts = state.get("counts")

    def step_state_dict(self) -> dict[str, Any]:
        return self.state_dict()

    def load_step_state_dict(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state)


def _join(pseudo: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict:
    """Pseudo targets first, then the ground truth (``criterion.py:476-489``)."""
    masks = pseudo["masks"].to(target["masks"].dtype)
    return {
        "labels": torch.cat([pseudo["labels"].to(target["labels"]), target["labels"]]),
        "masks": torch.cat([masks, target["masks"]]),
    }


def _grouped(raw: dict[str, torch.Tensor], factors: dict[str, float]) -> dict[str, torch.Tensor]:
    """SimCIS's unweighted losses (``loss_ce``, ``loss_ce_0``, ``interm_loss_ce``, ``kl_loss``,
    ...) -> one weighted term per kind, the weights of ``maskformer_model.py:158-168``."""
    terms: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        kind = key.removeprefix("interm_").removeprefix("loss_").split("_")[0]
        terms[kind] = terms.get(kind, 0) + factors[kind] * value
    return terms
