"""The class-incremental protocol: settings, steps, image selection and label remapping."""

from incseg.protocol.labels import CONVENTIONS, IGNORE_INDEX, make_lut, remap
from incseg.protocol.selection import (
    MODES,
    TEST_SELECTIONS,
    build_presence,
    label_presence,
    pack_presence,
    select_test,
    select_train,
)
from incseg.protocol.settings import Setting, get_setting, setting_names
from incseg.protocol.steps import StepInfo, step_info

__all__ = [
    "CONVENTIONS", "IGNORE_INDEX", "MODES", "TEST_SELECTIONS", "Setting", "StepInfo", "build_presence",
    "get_setting", "label_presence", "make_lut", "pack_presence", "remap", "select_test", "select_train", "setting_names",
    "step_info",
]  # fmt: skip
