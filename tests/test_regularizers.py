"""EWC, PI and RW: the penalty, the importance estimates on toy problems, state across steps."""

import json

import pytest
import torch
from torch import nn

from incseg.cli import main
from incseg.engine.checkpoint import load_checkpoint
from incseg.methods import EWC, PI, RW
from incseg.methods.regularizers import minmax_normalise, quadratic_penalty
from incseg.protocol import get_setting, step_info

INFO0, INFO1 = (step_info(get_setting("voc", "15-5"), t) for t in (0, 1))


class Toy(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(values, dtype=torch.float64))


def _train(method, model, steps, lr, loss_fn):
    """Plain SGD with the method's hooks, as the engine calls them."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model.theta).backward()
        method.after_backward(model)
        opt.step()
        method.after_update(model)


def test_quadratic_penalty_with_known_fisher():
    params = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[3.0]], requires_grad=True)]
    anchors = [torch.zeros(2), torch.tensor([[1.0]])]
    fisher = [torch.tensor([0.5, 2.0]), torch.tensor([[0.25]])]
    penalty = quadratic_penalty(params, anchors, fisher)
    assert penalty.item() == pytest.approx(0.5 * 1 + 2.0 * 4 + 0.25 * 4)
    penalty.backward()
    torch.testing.assert_close(params[0].grad, torch.tensor([1.0, 8.0]))  # 2 F (theta - anchor)


def test_penalty_gradient_is_zero_at_the_anchor():
    params = [torch.tensor([1.0, 2.0], requires_grad=True)]
    quadratic_penalty(params, [torch.tensor([1.0, 2.0])], [torch.ones(2)]).backward()
    assert torch.equal(params[0].grad, torch.zeros(2))


def test_minmax_normalise_is_per_tensor():
    out = minmax_normalise([torch.tensor([1.0, 3.0, 2.0]), torch.tensor([5.0]), torch.tensor([[2.0, 6.0]])])
    assert out[0].tolist() == [0.0, 1.0, 0.5] and out[1].tolist() == [0.0] and out[2].tolist() == [[0.0, 1.0]]


def test_ewc_fisher_running_mean_and_penalty_at_next_step():
    model = Toy([1.0, -2.0])
    ewc = EWC(weight=500.0)
    ewc.begin_step(INFO0, model, None, None)
    _train(ewc, model, 2, lr=0.0, loss_fn=lambda t: (t**2).sum())  # lr 0: gradients 2, -4 twice
    fisher = ewc.state_dict()["fisher"]["theta"]
    torch.testing.assert_close(fisher, torch.tensor([0.9 * 0.1 * 4 + 0.1 * 4, 0.9 * 0.1 * 16 + 0.1 * 16],
                                                    dtype=torch.float64))  # fmt: skip
    ewc.end_step(INFO0, model, None)
    state = ewc.state_dict()
    torch.testing.assert_close(state["importance"]["theta"], torch.tensor([0.0, 1.0], dtype=torch.float64))
    ewc.begin_step(INFO1, model, None, None)
    with torch.no_grad():
        model.theta.copy_(torch.tensor([2.0, 0.0]))
    out = type("Out", (), {"logits": torch.zeros(1, 21, 1, 1)})()
    terms = ewc.losses(out, None, torch.zeros(1, 1, 1, dtype=torch.long), INFO1)
    assert terms["penalty"].item() == pytest.approx(500.0 * (0.0 * 1 + 1.0 * 4))


def test_pi_path_integral_on_a_two_parameter_problem():
    # L = 0.5 (theta1^2 + 4 theta2^2), SGD lr 0.1 from (1, 1), two steps. By hand:
    # theta1: g = 1, 0.9; omega1 = 0.1 (1 + 0.81) = 0.181; moved -0.19
    # theta2: g = 4, 2.4; omega2 = 0.1 (16 + 5.76) = 2.176; moved -0.64
    model = Toy([1.0, 1.0])
    pi = PI(damping=1e-3)
    pi.begin_step(INFO0, model, None, None)
    _train(pi, model, 2, lr=0.1, loss_fn=lambda t: 0.5 * (t[0] ** 2 + 4 * t[1] ** 2))
    pi.end_step(INFO0, model, None)
    omega = pi.state_dict()["omega_total"]["theta"]
    expected = torch.tensor([0.181 / (0.19**2 + 1e-3), 2.176 / (0.64**2 + 1e-3)], dtype=torch.float64)
    torch.testing.assert_close(omega, expected)
    assert expected.tolist() == pytest.approx([4.87871, 5.29956], abs=1e-5)
    torch.testing.assert_close(pi.state_dict()["anchor"]["theta"], model.theta.detach())


def test_rw_path_score_only_every_interval_iterations():
    model = Toy([1.0, 1.0])
    rw = RW(interval=3)
    rw.begin_step(INFO0, model, None, None)
    _train(rw, model, 2, lr=0.1, loss_fn=lambda t: 0.5 * (t**2).sum())
    assert torch.equal(rw.state_dict()["score"]["theta"], torch.zeros(2, dtype=torch.float64))
    _train(rw, model, 1, lr=0.1, loss_fn=lambda t: 0.5 * (t**2).sum())
    assert torch.all(rw.state_dict()["score"]["theta"] > 0)


@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_regularizer_runs_end_to_end_and_saves_its_state(name, tiny_config_path, tmp_path):
    out = tmp_path / name
    assert main(["run", str(tiny_config_path), "--out", str(out), "--no-progress",
                 "--set", f"method={{name: {name}}}"]) == 0  # fmt: skip
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert "penalty" not in steps[0]["losses"][0] and "penalty" in steps[1]["losses"][0]
    state = load_checkpoint(out / "step_1.pt")["method"]
    assert "head.reduce.weight" in state["importance"]
    assert "classifiers.1.weight" in state["anchor"]  # importance now covers the new classifier too
