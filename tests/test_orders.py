"""Class orders (``protocol.order``): the generator, named / random / explicit orders, and that
steps, image selection, label remapping, the memory's old classes and the report's groups all
follow a hand-made permuted setting; malformed orders are refused before anything trains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from incseg.cli import main
from incseg.config import load_config
from incseg.errors import ConfigError
from incseg.metrics import StepReport
from incseg.protocol import get_setting, make_lut, select_train, step_info
from incseg.protocol.orders import _splitmix64, ordered_setting, random_order

VOC = get_setting("voc", "15-5")
REVERSED = tuple(range(20, 0, -1))


def test_the_generator_is_splitmix64_and_the_shuffle_is_pinned():
    # SplitMix64's first output from state 0 (the reference implementation's known value)
    assert _splitmix64(0)[1] == 0xE220A8397B1DCDAF
    # the permutation random:1 gives VOC's classes, pinned: any change of generator or shuffle
    # would change every random-order run
    assert random_order(range(1, 21), 1) == [
        2, 15, 11, 4, 20, 5, 7, 17, 16, 14, 3, 1, 12, 8, 19, 10, 18, 13, 9, 6,
    ]  # fmt: skip
    assert sorted(random_order(range(1, 151), 7)) == list(range(1, 151))
    assert random_order(range(1, 21), 1) != random_order(range(1, 21), 2)


def test_orders_give_the_settings_steps():
    assert ordered_setting(VOC, "default") is VOC
    flipped = ordered_setting(VOC, REVERSED)
    assert flipped.steps == ((0, *range(20, 5, -1)), (5, 4, 3, 2, 1))
    assert flipped.name == "15-5 (order given)" and flipped.class_names == VOC.class_names
    shuffled = ordered_setting(VOC, "random:1")
    assert shuffled.steps[1] == (10, 18, 13, 9, 6) and shuffled.steps[0][:3] == (0, 2, 15)
    ade = get_setting("ade", "100-50")
    assert ordered_setting(ade, "b") == get_setting("ade", "100-50b")
    ten = ordered_setting(get_setting("ade", "100-10"), "random:3")
    assert [len(s) for s in ten.steps] == [101, 10, 10, 10, 10, 10]


@pytest.mark.parametrize(
    ("order", "message"),
    [
        ((1, 1, *range(3, 21)), r"listed more than once: \[1\]; missing: \[2\]"),
        ((*range(1, 20), 25), r"not classes of the setting: \[25\]; missing: \[20\]"),
        ((*range(1, 20),), r"missing: \[20\]"),
        ("b", r"'b' names no official order of voc 15-5; valid: \['default', 'random:K'"),
        ("random:x", r"'random:x' names no official order"),
    ],
)
def test_malformed_orders_are_refused(order, message):
    with pytest.raises(ConfigError, match=message):
        ordered_setting(VOC, order)


def test_selection_remapping_memory_and_report_follow_the_order():
    flipped = ordered_setting(VOC, REVERSED)
    first, second = step_info(flipped, 0), step_info(flipped, 1)
    assert second.new_classes == (5, 4, 3, 2, 1) and 20 in second.old_classes
    assert second.order[:3] == (0, 20, 19) and second.order[-1] == 1
    # images holding {1}, {20}, {1, 20}, {7}: step 1 (classes 1-5) takes images 0 and 2 in
    # overlap; disjoint also takes them (20 is old, nothing future); step 0 (classes 6-20)
    # takes 1, 2, 3 in overlap and only 1 and 3 in disjoint (image 2 holds the future class 1)
    presence = np.zeros((4, 256), dtype=bool)
    for row, classes in enumerate([(1,), (20,), (1, 20), (7,)]):
        presence[row, list(classes)] = True
    assert select_train(presence, second, "overlap").tolist() == [0, 2]
    assert select_train(presence, second, "disjoint").tolist() == [0, 2]
    assert select_train(presence, first, "overlap").tolist() == [1, 2, 3]
    assert select_train(presence, first, "disjoint").tolist() == [1, 3]
    # labels: at step 1 class 5 is channel 16, class 1 channel 20; old class 20 is background
    lut = make_lut(second, "train", "mib")
    assert (lut[5].item(), lut[1].item(), lut[20].item()) == (16, 20, 0)
    test = make_lut(second, "test", "mib")
    assert (test[20].item(), test[6].item()) == (1, 15)
    # the memory's candidates hold old classes: step 0's
    assert sorted(second.old_classes) == list(range(6, 21))
    # the report's old group is step 0's classes (tvmonitor first, by channel)
    matrix = torch.eye(21, dtype=torch.int64)
    report = StepReport.from_confusion(matrix, second)
    assert report.class_names[1] == "tvmonitor" and report.class_names[-1] == "aeroplane"
    assert report.old_range == "1-15" and report.miou_old == 1.0


def test_a_run_in_a_random_order_keeps_it_in_its_directory(tiny_config_path, tmp_path):
    out = tmp_path / "run"
    args = ["run", str(tiny_config_path), "--out", str(out), "--no-progress"]
    args += ["--set", "protocol.order=random:1", "--set", "protocol.last_step=0"]
    assert main(args) == 0
    saved = load_config(out / "config.yaml")
    assert saved.protocol.order == "random:1"
    assert saved.setting.steps == ordered_setting(VOC, "random:1").steps
    step = json.loads((out / "metrics.json").read_text())["steps"][0]
    names = [VOC.class_names[c] for c in saved.setting.steps[0]]
    assert list(step["per_class"]) == names  # channels in the order's step 0
    path = tmp_path / "c.yaml"
    path.write_text("protocol: {order: [1, 2]}\n")
    with pytest.raises(ConfigError, match="protocol.order: not an order of the 20 classes"):
        load_config(path)
