"""The training iteration's order (what is alive when) and the prediction rule of evaluation."""

from __future__ import annotations

import copy

import torch

from incseg.engine.evaluate import evaluate, predict_channels
from incseg.engine.runtime import Runtime
from incseg.engine.train import Optimisation, Step, train_one_epoch
from incseg.methods import MiB
from incseg.models import build_segmenter
from incseg.protocol import get_setting, step_info


def test_prediction_is_the_first_highest_channel():
    logits = torch.tensor(
        [[[[1.0]], [[3.0]], [[3.0]]], [[[2.0]], [[-1.0]], [[2.0]]]]
    )  # ties: 1 and 2, 0 and 2
    assert predict_channels(logits).flatten().tolist() == [1, 0]
    wide = torch.randn(2, 21, 9, 7)
    wide[:, 5] = wide[:, 12]  # exact ties in every pixel
    assert torch.equal(predict_channels(wide), wide.argmax(1))
    assert predict_channels(wide).dtype == torch.int64 and predict_channels(wide).shape == (2, 9, 7)


def test_evaluate_counts_the_prediction_of_every_pixel():
    torch.manual_seed(0)
    model = build_segmenter("tiny", (3,), head_channels=8).eval()
    images, targets = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32), dtype=torch.uint8)
    targets[0, :4] = 255
    matrix = evaluate(model, [(images, targets)], 3, Runtime(torch.device("cpu")))
    with torch.no_grad():
        pred = model(images).logits.argmax(1)
    keep = targets != 255
    expected = torch.zeros(3, 3, dtype=torch.int64)
    for t, p in zip(targets[keep].tolist(), pred[keep].tolist(), strict=True):
        expected[t, p] += 1
    assert torch.equal(matrix, expected)


def test_iteration_frees_gradients_and_runs_the_old_model_before_the_student():
    """Peak memory: the previous gradients are freed before either forward, and the old model's
    transient activations never coexist with the student's graph (docs/benchmarks.md)."""
    torch.manual_seed(0)
    info = step_info(get_setting("voc", "15-5"), 1)
    model = build_segmenter("tiny", info.channels_per_step[:1], head_channels=8)
    old = copy.deepcopy(model).eval().requires_grad_(False)
    model.add_classifier(info.channels_per_step[-1])
    events = []

    def student_forward(module, args):
        events.append(("student", all(p.grad is None for p in module.parameters())))

    def old_forward(module, args):
        events.append(("old", torch.is_grad_enabled()))

    model.register_forward_pre_hook(student_forward)
    old.register_forward_pre_hook(old_forward)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = [
        (torch.randn(2, 3, 32, 32), torch.randint(0, 21, (2, 32, 32), dtype=torch.uint8))
        for _ in range(3)
    ]
    step = Step(info, batches, model, old, Optimisation(optimizer, scheduler, scaler))
    train_one_epoch(step, MiB(), Runtime(torch.device("cpu")), 0, log_interval=1)
    assert events == [("old", False), ("student", True)] * 3
    assert all(p.grad is not None for p in model.parameters())  # the last step's gradients stay
