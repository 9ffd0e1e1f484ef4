"""EWC, PI and RW: the penalty, the importance estimates on toy problems, state across steps."""

import json

import pytest
import torch
from torch import nn

from incseg.cli import main
from incseg.engine.checkpoint import load_checkpoint
from incseg.methods import EWC, PI, RW
from incseg.methods.regularizers import add_penalty_gradient, minmax_normalise, quadratic_penalty
from incseg.protocol import get_setting, step_info

INFO0, INFO1 = (step_info(get_setting("voc", "15-5"), t) for t in (0, 1))


class Toy(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(values, dtype=torch.float64))


def test_quadratic_penalty_and_its_gradient_with_known_fisher():
    params = [
        torch.tensor([1.0, 2.0], requires_grad=True),
        torch.tensor([[3.0]], requires_grad=True),
    ]
    anchors = [torch.zeros(2), torch.tensor([[1.0]])]
    fisher = [torch.tensor([0.5, 2.0]), torch.tensor([[0.25]])]
    penalty = quadratic_penalty(params, anchors, fisher)
    assert penalty.item() == pytest.approx(0.5 * 1 + 2.0 * 4 + 0.25 * 4)
    (3.0 * penalty).backward()
    grads = [torch.ones(2), torch.ones(1, 1)]
    add_penalty_gradient(grads, [p.detach() for p in params], anchors, fisher, 3.0)
    # 1 + 2 * 3 * F (theta - anchor), equal to autograd's gradient of 3 * penalty plus 1
    assert grads[0].tolist() == [1.0 + 6 * 0.5 * 1, 1.0 + 6 * 2.0 * 2] and grads[1].tolist() == [
        [1.0 + 6 * 0.25 * 2]
    ]
    torch.testing.assert_close(grads[0], params[0].grad + 1)


def test_minmax_normalise_is_per_tensor_with_the_official_epsilon():
    out = minmax_normalise(
        [
            torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64),
            torch.tensor([5.0]),
            torch.tensor([[2e-8, 6e-8]], dtype=torch.float64),
        ]
    )
    assert out[0].tolist() == [0.0, 2 / (2 + 1e-8), 1 / (2 + 1e-8)] and out[1].tolist() == [0.0]
    # a Fisher of gradients near 1e-4 is near 1e-8, the epsilon's size: the maximum becomes 0.8
    assert out[2][0, 1].item() == pytest.approx(0.8, rel=1e-9)


# -- hand-computed single-step cases (official formulas, utils/regularizer.py) --
# A two-entry parameter: entry 0 moves 1.0 -> 0.8 -> 0.5 -> 0.4 with task gradients 2, 3, 1 at the
# first three weights; entry 1 stays at 0 with gradient 0.
WEIGHTS = [[1.0, 0.0], [0.8, 0.0], [0.5, 0.0], [0.4, 0.0]]
GRADS = [[2.0, 0.0], [3.0, 0.0], [1.0, 0.0]]


def _drive(method, model, weights, grads, info=INFO0):
    """The engine's calls for one step: set the task gradient, after_backward, move the weights."""
    with torch.no_grad():
        model.theta.copy_(torch.tensor(weights[0], dtype=torch.float64))
    method.begin_step(info, model)
    seen = []
    for k, g in enumerate(grads):
        with torch.no_grad():
            model.theta.copy_(torch.tensor(weights[k], dtype=torch.float64))
        model.theta.grad = torch.tensor(g, dtype=torch.float64)
        method.after_backward(model)
        seen.append(model.theta.grad.clone())
    with torch.no_grad():
        model.theta.copy_(torch.tensor(weights[len(grads)], dtype=torch.float64))
    method.end_step(info, model)
    return seen


def test_ewc_by_hand():
    ewc = EWC(weight=500.0)
    _drive(ewc, Toy([0.0, 0.0]), WEIGHTS, GRADS)
    # F starts at 1 (regularizer.py:94); F <- 0.9 g^2 + 0.1 F: 3.7, 8.47, 1.747 and 0.1, 0.01, 0.001
    fisher = ewc.state_dict()["fisher"]["theta"]
    assert fisher.tolist() == pytest.approx([1.747, 0.001], rel=1e-12)
    importance = ewc.state_dict()["importance"]["theta"]
    assert importance.tolist() == pytest.approx([1.746 / (1.746 + 1e-8), 0.0], rel=1e-12)


def test_pi_by_hand():
    pi = PI(weight=500.0)
    _drive(pi, Toy([0.0, 0.0]), WEIGHTS, GRADS)
    # iteration 0 only records the weights; then 3 (1.0 - 0.8) + 1 (0.8 - 0.5) = 0.9; the last
    # update (0.5 -> 0.4) is never paired with a gradient. Score 0.9 / ((0.4 - 1.0)^2 + 1e-20) = 2.5.
    assert pi.state_dict()["score"]["theta"].tolist() == pytest.approx([2.5, 0.0], rel=1e-12)
    assert pi.state_dict()["importance"]["theta"].tolist() == pytest.approx(
        [2.5 / (2.5 + 1e-8), 0.0], rel=1e-12
    )


def test_pi_score_is_clamped_at_zero_and_summed_over_steps():
    pi = PI(weight=500.0)
    model = Toy([0.0, 0.0])
    # entry 0 climbs against its gradient: a negative path integral, clamped to 0
    _drive(
        pi,
        model,
        [[0.0, 1.0], [0.5, 0.8], [1.0, 0.5], [1.0, 0.4]],
        [[1.0, 2.0], [1.0, 3.0], [1.0, 1.0]],
    )
    assert pi.state_dict()["score"]["theta"].tolist() == pytest.approx([0.0, 2.5], rel=1e-12)
    _drive(pi, model, WEIGHTS, GRADS, info=INFO1)
    assert pi.state_dict()["score"]["theta"].tolist() == pytest.approx([2.5, 2.5], rel=1e-12)


def test_rw_by_hand():
    rw = RW(weight=100.0, interval=2)
    _drive(rw, Toy([0.0, 0.0]), WEIGHTS, GRADS)
    # Score updates at iterations 0 (records 1.0) and 2: g = 1, d = 1.0 - 0.5 = 0.5, with the Fisher
    # before iteration 2's update (8.47): 1 * 0.5 / (0.5 * 8.47 * 0.25 + 1e-8).
    score = 0.5 / (0.5 * 8.47 * 0.25 + 1e-8)
    assert rw.state_dict()["score"]["theta"].tolist() == pytest.approx([score, 0.0], rel=1e-12)
    fisher_norm = 1.746 / (1.746 + 1e-8)
    assert rw.state_dict()["importance"]["theta"].tolist() == pytest.approx(
        [fisher_norm + score / (score + 1e-8), 0.0], rel=1e-12
    )


# -- a stream over two steps against a re-statement of the official classes --
class OfficialEWC:
    """fcdl94/MiB utils/regularizer.py:59-123, restated per parameter (dicts of tensors)."""

    def __init__(self, params, old, fisher, alpha=0.9):
        self.alpha, self.old = alpha, old
        self.fisher_old = {k: _official_norm(v) for k, v in fisher.items()} if fisher else None
        self.fisher = {k: v.clone() for k, v in (fisher or {}).items()}
        for n, p in params.items():
            self.fisher.setdefault(n, torch.ones_like(p))

    def update(self, params, grads):
        for n in params:
            self.fisher[n] = self.alpha * grads[n] ** 2 + (1 - self.alpha) * self.fisher[n]

    def importance(self):
        return self.fisher_old

    def state(self):
        return {"fisher": self.fisher}


class OfficialPI:
    """utils/regularizer.py:126-206."""

    def __init__(self, params, old, score):
        self.start = {n: (old[n] if old and n in old else p).clone() for n, p in params.items()}
        self.score_prev = score
        self.score_actual = {k: _official_norm(v) for k, v in score.items()} if score else None
        self.delta = {n: torch.zeros_like(p) for n, p in params.items()}
        self.temp = None

    def update(self, params, grads):
        if self.temp is not None:
            for n, p in params.items():
                self.delta[n] += grads[n] * (self.temp[n] - p)
        self.temp = {n: p.clone() for n, p in params.items()}

    def importance(self):
        return self.score_actual

    def state(self, params):
        score = {}
        for n, p in params.items():
            score[n] = self.delta[n] / ((p - self.start[n]) ** 2 + 1e-20)
            score[n] = torch.where(score[n] > 0, score[n], torch.zeros(()))
            if self.score_prev is not None and n in self.score_prev:
                score[n] = self.score_prev[n] + score[n]
        return {"score": score}


class OfficialRW:
    """utils/regularizer.py:209-313."""

    def __init__(self, params, old, score, fisher, alpha=0.9, iterations=10):
        self.alpha, self.iterations, self.count, self.temp = alpha, iterations, 0, None
        self.fisher, self.score_plus_fisher, self.score_old = {}, None, None
        if fisher is not None and score is not None:
            self.score_plus_fisher = {k: _official_norm(v) for k, v in fisher.items()}
            self.fisher = {k: v.clone() for k, v in fisher.items()}
            self.score_old = score
            for n, s in score.items():
                self.score_plus_fisher[n] = self.score_plus_fisher[n] + _official_norm(s)
        self.score = {n: torch.zeros_like(p) for n, p in params.items()}
        for n, p in params.items():
            self.fisher.setdefault(n, torch.ones_like(p))

    def update(self, params, grads):
        if self.count % self.iterations == 0:
            if self.temp is not None:
                for n, p in params.items():
                    delta = grads[n] * (self.temp[n] - p)
                    den = 0.5 * self.fisher[n] * (p - self.temp[n]) ** 2 + 1e-8
                    self.score[n] += delta / den
            self.temp = {n: p.clone() for n, p in params.items()}
        self.count += 1
        for n in params:
            self.fisher[n] = self.alpha * grads[n] ** 2 + (1 - self.alpha) * self.fisher[n]

    def importance(self):
        return self.score_plus_fisher

    def state(self):
        score = {}
        for n, p in self.score.items():
            score[n] = torch.where(p >= 0, p, torch.zeros(()))
            if self.score_old is not None and n in self.score_old:
                score[n] = 0.5 * (score[n] + self.score_old[n])
        return {"score": score, "fisher": self.fisher}


def _official_norm(m):
    return (m - m.min()) / (m.max() - m.min() + 1e-8)


class Grown(nn.Module):
    """A 'model' whose second step adds a parameter, as a new classifier does."""

    def __init__(self, generator):
        super().__init__()
        self.a = nn.Parameter(torch.randn(3, generator=generator, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(2, 2, generator=generator, dtype=torch.float64))

    def grow(self, generator):
        self.c = nn.Parameter(torch.randn(4, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_two_step_stream_equals_the_official_formulas(name):
    """Random gradients near 1e-4 (where the normalisation epsilon matters) and random weight
    moves, 7 iterations per step, a parameter added at step 1: importance, penalty and the
    gradient handed to the optimizer all equal the official code's to 1e-6 relative."""
    gen = torch.Generator().manual_seed(3)
    model = Grown(gen)
    method = {"ewc": EWC(weight=500.0), "pi": PI(weight=500.0), "rw": RW(weight=100.0, interval=3)}[
        name
    ]
    official_state, old = None, None
    dummy = type("Out", (), {"logits": torch.zeros(1, 21, 1, 1)})()
    targets = torch.zeros(1, 1, 1, dtype=torch.long)
    for step, info in enumerate((INFO0, INFO1)):
        if step == 1:
            model.grow(gen)
        params = dict(model.named_parameters())
        values = {n: p.detach().clone() for n, p in params.items()}
        if name == "ewc":
            ref = OfficialEWC(values, old, official_state and official_state["fisher"])
        elif name == "pi":
            ref = OfficialPI(values, old, official_state and official_state["score"])
        else:
            st = official_state or {}
            ref = OfficialRW(values, old, st.get("score"), st.get("fisher"), iterations=3)
        method.begin_step(info, model)
        for _ in range(7):
            values = {n: p.detach().clone() for n, p in params.items()}
            grads = {
                n: 1e-4 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
                for n, p in params.items()
            }
            for n, p in params.items():
                p.grad = grads[n].clone()
            penalty = method.losses(dummy, None, targets, info).get("penalty")
            method.after_backward(model)
            ref.update(values, grads)
            expected_grads = dict(grads)
            if step == 1:
                importance = ref.importance()
                expected_penalty = sum(
                    (importance[n] * (values[n] - old[n]) ** 2).sum() for n in old
                )
                assert penalty.item() == pytest.approx(
                    method.weight * expected_penalty.item(), rel=1e-6
                )
                for n in old:
                    expected_grads[n] = grads[n] + 2 * method.weight * importance[n] * (
                        values[n] - old[n]
                    )
            else:
                assert penalty is None
            for n, p in params.items():
                torch.testing.assert_close(p.grad, expected_grads[n], rtol=1e-6, atol=0)
            with torch.no_grad():
                for p in params.values():
                    p.add_(1e-2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        method.end_step(info, model)
        final = {n: p.detach().clone() for n, p in params.items()}
        official_state = ref.state(final) if name == "pi" else ref.state()
        ours = method.state_dict()
        for key, tensors in official_state.items():
            for n, value in tensors.items():
                torch.testing.assert_close(ours[key][n], value, rtol=1e-6, atol=0)
        old = final


@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_regularizer_runs_end_to_end_and_saves_its_state(name, tiny_config_path, tmp_path):
    out = tmp_path / name
    assert (
        main(
            [
                "run",
                str(tiny_config_path),
                "--out",
                str(out),
                "--no-progress",
                "--set",
                f"method={{name: {name}}}",
            ]
        )
        == 0
    )
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert "penalty" not in steps[0]["losses"][0] and "penalty" in steps[1]["losses"][0]
    state = load_checkpoint(out / "step_1.pt")["method"]
    assert "head.reduce.weight" in state["importance"]
    assert "classifiers.1.weight" in state["anchor"]  # importance now covers the new classifier too
