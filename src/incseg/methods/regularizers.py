"""Parameter-importance baselines of the MiB paper's Table 1 (docs/methods.md, "Baselines"): EWC, PI and RW,
exactly as the official MiB code computes them (fcdl94/MiB ``utils/regularizer.py``, called from
``train.py:124-139``).

Each keeps, across steps, a raw importance estimate per parameter and the parameters ``theta*`` at
the end of the previous step (the old model). At steps > 0 the loss gets
``weight * sum_i F_i (theta_i - theta*_i)^2`` (``regularizer.py:101-109``) where ``F`` is the
previous step's importance, min-max normalised per parameter tensor with the official epsilon,
``norm(m) = (m - min m) / (max m - min m + 1e-8)`` (``regularizer.py:37-38``). Parameters added at
the current step (the new classifier) are not penalised.

Order within an iteration, as the official trainer (``train.py:127-139``): backward of the task
loss; the importance update reads *those* gradients (the penalty's are not in them); then the
penalty's gradient is added; then the optimizer step. incseg adds the penalty's gradient in closed
form, ``d/dtheta [w sum F (theta - theta*)^2] = 2 w F (theta - theta*)``, inside
:meth:`~_Importance.after_backward` instead of running a second backward: the same gradient, one
graph. The ``penalty`` loss term is reported (logged, summed into the total) but carries no
gradient itself.

- EWC (Kirkpatrick et al., PNAS 2017), ``regularizer.py:59-123``: running Fisher
  ``F <- alpha g^2 + (1 - alpha) F`` every iteration (alpha 0.9: the newest squared gradient
  weighs 0.9), continued across steps; entries for parameters new at a step start at 1.
  Importance at the next step: ``norm(F)``.
- PI, path integral / synaptic intelligence (Zenke et al., ICML 2017), ``regularizer.py:126-206``:
  from the second iteration of a step on, ``w += g_k (theta_{k-1} - theta_k)``, the gradient at
  the current weights times the last update that led to them (``:164-174``). At the end of the
  step ``s = max(w / ((theta_end - theta_start)^2 + 1e-20), 0)``, summed over steps
  (``:185-193``). Importance: ``norm(sum of s)``.
- RW, Riemannian Walk (Chaudhry et al., ECCV 2018), ``regularizer.py:209-313``: EWC's Fisher plus
  a score. Every ``interval`` iterations (iterations 0, 10, 20, ... of the step, counting from 0),
  from the second such iteration on, with ``d = theta_then - theta_now`` over the window,
  ``s += g d / (0.5 F d^2 + 1e-8)`` using the current gradient and the Fisher *before* this
  iteration's update (``:261-279``). At the end of the step ``s = max(s, 0)``, averaged 0.5/0.5
  with the previous step's score (``:281-287``). Importance: ``norm(F) + norm(s)``, not
  normalised again (``:231-245``).

Per iteration, all updates are ``torch._foreach_*`` calls over the parameter list: no host copies
and no per-parameter Python arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from incseg.losses import cross_entropy
from incseg.methods.base import Method
from incseg.protocol.steps import StepInfo
from incseg.ranges import LOSS_WEIGHT, Range, ranged

if TYPE_CHECKING:  # annotations only: the model modules import torchvision
    from incseg.models.segmenter import SegmenterOutput

Tensors = list[torch.Tensor]

EPS = 1e-8  # fcdl94/MiB utils/regularizer.py:4 (normalisation and RW's score denominator)


def minmax_normalise(tensors: Tensors) -> Tensors:
    """``(x - min) / (max - min + 1e-8)`` of each tensor separately (``regularizer.py:37-38``);
    a flat tensor becomes zeros. Called once per step."""
    return [(t - t.min()) / (t.max() - t.min() + EPS) for t in tensors]


def quadratic_penalty(params: Tensors, anchors: Tensors, importance: Tensors) -> torch.Tensor:
    """``sum_i F_i (theta_i - theta*_i)^2`` over lists of same-shaped tensors (a 0-dim tensor)."""
    diffs = torch._foreach_sub(params, anchors)
    weighted = torch._foreach_mul(torch._foreach_mul(diffs, diffs), importance)
    # The L1 norm of a non-negative tensor is its sum: one fused reduction per tensor.
    return torch.stack(torch._foreach_norm(weighted, 1)).sum()


def add_penalty_gradient(
    grads: Tensors, params: Tensors, anchors: Tensors, importance: Tensors, weight: float
) -> None:
    """In place ``g_i += 2 weight F_i (theta_i - theta*_i)``: the gradient of
    ``weight * quadratic_penalty`` (what the official second backward adds, ``train.py:131-137``)."""
    diffs = torch._foreach_sub(params, anchors)
    torch._foreach_mul_(diffs, importance)
    torch._foreach_add_(grads, diffs, alpha=2.0 * weight)


@dataclass
class _Importance(Method):
    """Shared machinery: anchors, importance, the penalty and its gradient; subclasses estimate
    the raw importance (:meth:`update` every iteration, :meth:`finish_estimate` per step)."""

    needs_gradients: ClassVar[bool] = True
    trained_state: ClassVar[bool] = True  # the importance is estimated along the iterations
    weight: float = ranged(500.0, LOSS_WEIGHT)
    _state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)
    _names: list[str] = field(default_factory=list, init=False, repr=False)
    _params: Tensors = field(default_factory=list, init=False, repr=False)
    # (indices into the parameter list, anchors, normalised importance) of the penalised ones
    _penalised: tuple[list[int], Tensors, Tensors] | None = field(
        default=None, init=False, repr=False
    )

    # -- state kept across steps: {"anchor": {...}, "importance": {...}, ...}, tensors by name --
    def state_dict(self) -> dict[str, Any]:
        return {key: dict(values) for key, values in self._state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = {key: dict(values) for key, values in state.items()}

    def _buffer(self, key: str, fill: float = 0.0) -> Tensors:
        """Per-parameter buffer ``key``; parameters it does not cover yet start at ``fill``."""
        stored = self._state.setdefault(key, {})
        for name, p in zip(self._names, self._params, strict=True):
            if name not in stored or stored[name].shape != p.shape:
                stored[name] = torch.full_like(p, fill).detach()
        return [stored[name] for name in self._names]

    def begin_step(self, info: StepInfo, model: nn.Module) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._names, self._params = [n for n, _ in named], [p for _, p in named]
        self._data = [p.detach() for p in self._params]  # views: they follow optimizer updates
        anchors, importance = self._state.get("anchor", {}), self._state.get("importance", {})
        shared = [i for i, n in enumerate(self._names) if n in anchors and n in importance]
        self._penalised = None
        if info.step > 0 and shared:
            self._penalised = (
                shared,
                [anchors[self._names[i]] for i in shared],
                [importance[self._names[i]] for i in shared],
            )
        self.start_estimate()

    def losses(
        self,
        output: SegmenterOutput,
        old_output: SegmenterOutput | None,
        targets: torch.Tensor,
        info: StepInfo,
    ) -> dict[str, torch.Tensor]:
        terms = {"ce": cross_entropy(output.logits, targets)}
        if self._penalised is not None and self.weight > 0:
            shared, anchors, importance = self._penalised
            with torch.no_grad():  # its gradient is added in after_backward (module docstring)
                params = [self._data[i] for i in shared]
                terms["penalty"] = self.weight * quadratic_penalty(params, anchors, importance)
        return terms

    def after_backward(self, model: nn.Module) -> None:
        """Update the importance from the task loss's gradients, then add the penalty's."""
        # A parameter without a gradient counts as gradient 0 (it is not given one: the optimizer
        # must still skip it); a penalised one gets one, as the official second backward gives it.
        self.update([p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params])
        if self._penalised is not None and self.weight > 0:
            shared, anchors, importance = self._penalised
            params = [self._params[i] for i in shared]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            data = [p.detach() for p in params]
            add_penalty_gradient([p.grad for p in params], data, anchors, importance, self.weight)

    def end_step(self, info: StepInfo, model: nn.Module) -> None:
        self._state["importance"] = dict(zip(self._names, self.finish_estimate(), strict=True))
        self._state["anchor"] = {
            n: p.detach().clone() for n, p in zip(self._names, self._params, strict=True)
        }

    def _copy(self, tensors: Tensors) -> Tensors:
        return torch._foreach_mul(tensors, 1.0)  # fused copies

    # -- importance estimation, implemented by subclasses --
    def start_estimate(self) -> None:
        raise NotImplementedError

    def update(self, grads: Tensors) -> None:
        """Every iteration, with the task loss's (unscaled) gradients, before the optimizer step."""
        raise NotImplementedError

    def finish_estimate(self) -> Tensors:
        """The importance the next step penalises with (normalised), per parameter."""
        raise NotImplementedError


@dataclass
class EWC(_Importance):
    """Elastic weight consolidation with the official running Fisher (weight 500, alpha 0.9)."""

    weight: float = ranged(500.0, LOSS_WEIGHT)
    alpha: float = ranged(
        0.9, Range(0, 1, "weight of the newest squared gradient in the running Fisher")
    )

    def start_estimate(self) -> None:
        self._fisher = self._buffer("fisher", fill=1.0)  # regularizer.py:92-94: new entries are 1

    def update(self, grads: Tensors) -> None:
        torch._foreach_mul_(self._fisher, 1 - self.alpha)  # regularizer.py:99
        torch._foreach_addcmul_(self._fisher, grads, grads, value=self.alpha)

    def step_state_dict(self) -> dict[str, Any]:
        return {"fisher": list(self._fisher)}

    def load_step_state_dict(self, state: dict[str, Any]) -> None:
        torch._foreach_copy_(self._fisher, state["fisher"])  # in place: the state dict holds them

    def finish_estimate(self) -> Tensors:
        return minmax_normalise(self._fisher)


@dataclass
class PI(_Importance):
    """Path integral (synaptic intelligence), weight 500, damping 1e-20 (``regularizer.py:187``)."""

    weight: float = ranged(500.0, LOSS_WEIGHT)
    damping: float = ranged(
        1e-20,
        Range(0, 1, "added to the squared parameter change; 0 divides by zero", low_open=True),
    )

    def start_estimate(self) -> None:
        self._path = self._copy(self._data)
        torch._foreach_zero_(self._path)
        self._start = self._copy(self._data)
        self._last: Tensors | None = None  # the weights at the previous iteration's update

    def update(self, grads: Tensors) -> None:
        if self._last is not None:  # regularizer.py:166-171
            torch._foreach_addcmul_(self._path, grads, torch._foreach_sub(self._last, self._data))
        self._last = self._copy(self._data)

    def step_state_dict(self) -> dict[str, Any]:
        return {"path": list(self._path), "last": self._last}

    def load_step_state_dict(self, state: dict[str, Any]) -> None:
        torch._foreach_copy_(self._path, state["path"])
        self._last = None if state["last"] is None else self._copy(state["last"])

    def finish_estimate(self) -> Tensors:
        moved = torch._foreach_sub(self._data, self._start)
        denom = torch._foreach_add(torch._foreach_mul(moved, moved), self.damping)
        step_score = torch._foreach_clamp_min(torch._foreach_div(self._path, denom), 0.0)
        total = self._buffer("score")  # summed over steps (regularizer.py:191-192)
        torch._foreach_add_(total, step_score)
        return minmax_normalise(total)


@dataclass
class RW(EWC):
    """Riemannian Walk: EWC's Fisher plus a score updated every ``interval`` iterations (weight 100)."""

    weight: float = ranged(100.0, LOSS_WEIGHT)
    interval: int = ranged(10, Range(1, 1_000_000, "iterations between score updates"))

    def start_estimate(self) -> None:
        super().start_estimate()
        self._score = self._copy(self._data)  # a fresh score each step (regularizer.py:252-253)
        torch._foreach_zero_(self._score)
        self._last: Tensors | None = None
        self._iteration = 0

    def update(self, grads: Tensors) -> None:
        if self._iteration % self.interval == 0:  # regularizer.py:263-273
            if self._last is not None:
                moved = torch._foreach_sub(self._last, self._data)
                denom = torch._foreach_mul(torch._foreach_mul(moved, moved), self._fisher)
                torch._foreach_mul_(denom, 0.5)
                torch._foreach_add_(denom, EPS)
                torch._foreach_add_(
                    self._score, torch._foreach_div(torch._foreach_mul(grads, moved), denom)
                )
            self._last = self._copy(self._data)
        self._iteration += 1
        super().update(grads)  # the Fisher after the score, as regularizer.py:276-279

    def step_state_dict(self) -> dict[str, Any]:
        return {
            **super().step_state_dict(),
            "score": list(self._score),
            "last": self._last,
            "iteration": self._iteration,
        }

    def load_step_state_dict(self, state: dict[str, Any]) -> None:
        super().load_step_state_dict(state)
        torch._foreach_copy_(self._score, state["score"])
        self._last = None if state["last"] is None else self._copy(state["last"])
        self._iteration = int(state["iteration"])

    def finish_estimate(self) -> Tensors:
        score = list(torch._foreach_clamp_min(self._score, 0.0))
        previous = self._state.get("score", {})
        for i, name in enumerate(self._names):  # regularizer.py:285-286
            if name in previous:
                score[i] = 0.5 * (score[i] + previous[name])
        self._state["score"] = dict(zip(self._names, score, strict=True))
        return torch._foreach_add(minmax_normalise(self._fisher), minmax_normalise(score))
