"""Golden lookup tables of ``make_lut`` on a hand-made step, every split under both conventions."""

import pytest

from incseg.protocol import StepInfo, make_lut

# A hand-made step: classes 5 and 1 were learnt (channels 1, 2), 7 and 3 are new (channels 3, 4),
# 2 comes later; 9 is in no step. Golden values per (split, convention) for label values
# 0, 1, 2, 3, 5, 7, 9, 255, then the value of every other entry.
HAND_STEP = StepInfo(
    step=1,
    new_classes=(7, 3),
    old_classes=(5, 1),
    future_classes=(2,),
    order=(0, 5, 1, 7, 3),
    channels_per_step=(3, 2),
    class_names=("bg", "e", "a", "g", "c"),
)
HAND_VALUES = (0, 1, 2, 3, 5, 7, 9, 255)
GOLDEN_LUTS = {
    ("train", "mib"): ((0, 0, 0, 4, 0, 3, 0, 0), 0),
    ("test", "mib"): ((0, 2, 255, 4, 1, 3, 255, 255), 255),
    ("val", "mib"): ((0, 255, 255, 4, 255, 3, 255, 255), 255),
    ("train", "plop"): ((0, 0, 0, 4, 0, 3, 0, 255), 0),
    ("test", "plop"): ((0, 2, 0, 4, 1, 3, 0, 255), 0),
    # PLOP validates with data_masking "current": old classes are background (run.py:107-118)
    ("val", "plop"): ((0, 0, 0, 4, 0, 3, 0, 255), 0),
}


@pytest.mark.parametrize("split, convention", list(GOLDEN_LUTS))
def test_lut_golden_on_a_hand_made_step(split, convention):
    values, rest = GOLDEN_LUTS[split, convention]
    expected = [rest] * 256
    for value, target in zip(HAND_VALUES, values, strict=True):
        expected[value] = target
    assert make_lut(HAND_STEP, split, convention).tolist() == expected
