"""Parameter-importance baselines of the MiB paper's Table 1 (SPEC section 6): EWC, PI and RW.

Each keeps, across steps, an importance ``F_i`` per parameter and the parameters ``theta*`` at the
end of the previous step, and adds ``weight * sum_i F_i (theta_i - theta*_i)^2`` to the
cross-entropy at steps > 0. Parameters added at the current step (the new classifier) are not
regularised. Importances are min-max normalised per parameter tensor before use, as in the
official MiB code.

- EWC (Kirkpatrick et al., PNAS 2017): ``F`` = running mean of squared gradients,
  ``F <- decay F + (1 - decay) g^2`` every iteration (decay 0.9), continued across steps.
- PI, path integral / synaptic intelligence (Zenke et al., ICML 2017): ``w += -g * delta`` every
  iteration; at the end of a step ``Omega += w / ((theta_end - theta_start)^2 + damping)``.
- RW, Riemannian Walk (Chaudhry et al., ECCV 2018): EWC's Fisher plus a path score; every
  ``interval`` iterations ``s += w / (0.5 F (theta - theta_prev)^2 + eps)`` where ``w`` is the
  path integral over those iterations; importance = norm(F) + norm(s).

The gradients seen are those of the whole loss, unscaled (the engine unscales fp16 gradients
before calling :meth:`after_backward`). Per iteration, all updates are ``torch._foreach_*`` calls
over the parameter list: no host copies and no per-parameter Python arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from incseg.losses import cross_entropy
from incseg.methods.base import Method
from incseg.models.segmenter import SegmenterOutput
from incseg.protocol.steps import StepInfo
from incseg.ranges import LOSS_WEIGHT, Range

Tensors = list[torch.Tensor]


def minmax_normalise(tensors: Tensors) -> Tensors:
    """``(x - min) / (max - min)`` of each tensor separately (zeros where a tensor is flat), as
    the official MiB code normalises each parameter's importance. Called once per step."""
    out = []
    for t in tensors:
        low, high = t.min(), t.max()
        out.append((t - low) / torch.where(high > low, high - low, torch.ones_like(high)))
    return out


def quadratic_penalty(params: Tensors, anchors: Tensors, importance: Tensors) -> torch.Tensor:
    """``sum_i F_i (theta_i - theta*_i)^2`` over lists of same-shaped tensors (differentiable)."""
    diffs = torch._foreach_sub(params, anchors)
    weighted = torch._foreach_mul(torch._foreach_mul(diffs, diffs), importance)
    # The L1 norm of a non-negative tensor is its sum: one fused reduction per tensor.
    return torch.stack(torch._foreach_norm(weighted, 1)).sum()


@dataclass
class _Importance(Method):
    """Shared machinery: anchors, importance, the penalty; subclasses estimate importance."""

    needs_gradients: ClassVar[bool] = True
    ranges: ClassVar[dict[str, Range]] = {"weight": LOSS_WEIGHT}

    weight: float = 500.0
    _state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)
    _names: list[str] = field(default_factory=list, init=False, repr=False)
    _params: Tensors = field(default_factory=list, init=False, repr=False)
    _penalised: tuple[Tensors, Tensors, Tensors] | None = field(default=None, init=False, repr=False)

    # -- state kept across steps: {"anchor": {...}, "importance": {...}, ...}, tensors by name --
    def state_dict(self) -> dict[str, Any]:
        return {key: dict(values) for key, values in self._state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = {key: dict(values) for key, values in state.items()}

    def _buffer(self, key: str) -> Tensors:
        """Per-parameter buffer ``key`` (zeros for parameters it does not cover yet)."""
        stored = self._state.setdefault(key, {})
        for name, p in zip(self._names, self._params, strict=True):
            if name not in stored or stored[name].shape != p.shape:
                stored[name] = torch.zeros_like(p).detach()
        return [stored[name] for name in self._names]

    def begin_step(self, info: StepInfo, model: nn.Module, old_model: nn.Module | None, loader) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._names, self._params = [n for n, _ in named], [p for _, p in named]
        self._data = [p.detach() for p in self._params]  # views: they follow optimizer updates
        anchors, importance = self._state.get("anchor", {}), self._state.get("importance", {})
        shared = [i for i, n in enumerate(self._names) if n in anchors and n in importance]
        self._penalised = None
        if info.step > 0 and shared:
            self._penalised = (
                [self._params[i] for i in shared],
                [anchors[self._names[i]] for i in shared],
                [importance[self._names[i]] for i in shared],
            )
        self.start_estimate()

    def losses(
        self, output: SegmenterOutput, old_output: SegmenterOutput | None, targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        terms = {"ce": cross_entropy(output.logits, targets)}
        if self._penalised is not None and self.weight > 0:
            terms["penalty"] = self.weight * quadratic_penalty(*self._penalised)
        return terms

    def end_step(self, info: StepInfo, model: nn.Module, loader) -> None:
        importance = minmax_normalise(self.finish_estimate())
        self._state["importance"] = dict(zip(self._names, importance, strict=True))
        self._state["anchor"] = {n: p.detach().clone() for n, p in zip(self._names, self._params, strict=True)}

    def _grads(self) -> Tensors:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]

    # -- importance estimation, implemented by subclasses --
    def start_estimate(self) -> None:
        raise NotImplementedError

    def finish_estimate(self) -> Tensors:
        """Raw (unnormalised) importance per parameter at the end of the step."""
        raise NotImplementedError


@dataclass
class EWC(_Importance):
    """Elastic weight consolidation with a running-mean Fisher (weight 500, decay 0.9)."""

    ranges: ClassVar[dict[str, Range]] = {
        **_Importance.ranges,
        "decay": Range(0, 1, "share of the running Fisher kept at each update"),
    }

    weight: float = 500.0
    decay: float = 0.9

    def start_estimate(self) -> None:
        self._fisher = self._buffer("fisher")

    def after_backward(self, model: nn.Module) -> None:
        grads = self._grads()
        torch._foreach_mul_(self._fisher, self.decay)
        torch._foreach_addcmul_(self._fisher, grads, grads, value=1 - self.decay)

    def finish_estimate(self) -> Tensors:
        return self._fisher


@dataclass
class PI(_Importance):
    """Path integral (synaptic intelligence), weight 500, damping 1e-3."""

    ranges: ClassVar[dict[str, Range]] = {
        **_Importance.ranges,
        "damping": Range(0, 1, "added to the squared parameter change; 0 divides by zero", low_open=True),
    }

    weight: float = 500.0
    damping: float = 1e-3

    def start_estimate(self) -> None:
        self._omega = torch._foreach_mul(self._data, 0.0)
        self._start = torch._foreach_mul(self._data, 1.0)

    def after_backward(self, model: nn.Module) -> None:
        self._grad = torch._foreach_mul(self._grads(), 1.0)  # fused copies
        self._before = torch._foreach_mul(self._data, 1.0)

    def after_update(self, model: nn.Module) -> None:
        delta = torch._foreach_sub(self._data, self._before)
        torch._foreach_addcmul_(self._omega, self._grad, delta, value=-1.0)

    def step_state_dict(self) -> dict[str, Any]:
        return {"omega": list(self._omega), "start": list(self._start)}

    def load_step_state_dict(self, state: dict[str, Any]) -> None:
        torch._foreach_copy_(self._omega, state["omega"])
        torch._foreach_copy_(self._start, state["start"])

    def finish_estimate(self) -> Tensors:
        moved = torch._foreach_sub(self._data, self._start)
        denom = torch._foreach_add(torch._foreach_mul(moved, moved), self.damping)
        total = self._buffer("omega_total")
        torch._foreach_add_(total, torch._foreach_div(self._omega, denom))
        return total


@dataclass
class RW(EWC):
    """Riemannian Walk: EWC's Fisher plus a path score updated every ``interval`` iterations."""

    ranges: ClassVar[dict[str, Range]] = {
        **EWC.ranges,
        "interval": Range(1, 1_000_000, "iterations between path-score updates"),
        "eps": Range(0, 1, "added to the score's denominator; 0 divides by zero", low_open=True),
    }

    weight: float = 100.0
    interval: int = 10
    eps: float = 1e-8

    def start_estimate(self) -> None:
        super().start_estimate()
        self._score = self._buffer("score")
        self._window = torch._foreach_mul(self._data, 0.0)
        self._last = torch._foreach_mul(self._data, 1.0)
        self._iteration = 0

    def after_backward(self, model: nn.Module) -> None:
        super().after_backward(model)
        self._grad = torch._foreach_mul(self._grads(), 1.0)  # fused copies
        self._before = torch._foreach_mul(self._data, 1.0)

    def after_update(self, model: nn.Module) -> None:
        delta = torch._foreach_sub(self._data, self._before)
        torch._foreach_addcmul_(self._window, self._grad, delta, value=-1.0)
        self._iteration += 1
        if self._iteration % self.interval == 0:
            moved = torch._foreach_sub(self._data, self._last)
            denom = torch._foreach_mul(torch._foreach_mul(moved, moved), self._fisher)
            torch._foreach_mul_(denom, 0.5)
            torch._foreach_add_(denom, self.eps)
            torch._foreach_add_(self._score, torch._foreach_clamp_min(torch._foreach_div(self._window, denom), 0.0))
            torch._foreach_zero_(self._window)
            self._last = torch._foreach_mul(self._data, 1.0)

    def step_state_dict(self) -> dict[str, Any]:
        return {"window": list(self._window), "last": list(self._last), "iteration": self._iteration}

    def load_step_state_dict(self, state: dict[str, Any]) -> None:
        torch._foreach_copy_(self._window, state["window"])
        torch._foreach_copy_(self._last, state["last"])
        self._iteration = int(state["iteration"])

    def finish_estimate(self) -> Tensors:
        return torch._foreach_add(minmax_normalise(self._fisher), minmax_normalise(self._score))
