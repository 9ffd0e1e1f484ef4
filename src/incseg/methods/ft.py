"""Fine-tuning (FT), the lower bound of the MiB paper's tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from incseg.losses import cross_entropy
from incseg.methods.base import Method
from incseg.protocol.steps import StepInfo

if TYPE_CHECKING:  # annotations only: the model modules import torchvision
    from incseg.models.segmenter import SegmenterOutput


@dataclass
class FineTuning(Method):
    """FT: cross-entropy on the current step's labels only; new classifiers start random."""

    plain_first_step: ClassVar[bool] = True

    def losses(
        self,
        output: SegmenterOutput,
        old_output: SegmenterOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        return {"ce": cross_entropy(output.logits, targets)}
