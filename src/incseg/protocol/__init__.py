"""The class-incremental protocol: settings, steps, image selection and label remapping.

Names are imported on first use (PEP 562), so that the light parts (settings, choices) do not
pull in torch.
"""

from importlib import import_module

_WHERE = {
    "CONVENTIONS": "choices",
    "IGNORE_INDEX": "choices",
    "MODES": "choices",
    "TEST_SELECTIONS": "choices",
    "make_lut": "labels",
    "remap": "labels",
    "build_presence": "selection",
    "label_presence": "selection",
    "pack_presence": "selection",
    "select_test": "selection",
    "select_train": "selection",
    "Setting": "settings",
    "get_setting": "settings",
    "setting_names": "settings",
    "StepInfo": "steps",
    "step_info": "steps",
}
__all__ = [
    "CONVENTIONS",
    "IGNORE_INDEX",
    "MODES",
    "TEST_SELECTIONS",
    "Setting",
    "StepInfo",
    "build_presence",
    "get_setting",
    "label_presence",
    "make_lut",
    "pack_presence",
    "remap",
    "select_test",
    "select_train",
    "setting_names",
    "step_info",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'incseg.protocol' has no attribute {name!r}")
    return getattr(import_module(f"incseg.protocol.{_WHERE[name]}"), name)
