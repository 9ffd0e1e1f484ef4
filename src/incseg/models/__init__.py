"""Models: backbones, the DeepLabV3 head and the incremental segmenter.

Names are imported on first use (PEP 562): ``incseg.models.choices`` stays free of torch.
"""

from importlib import import_module

_WHERE = {
    "BACKBONES": "backbones",
    "build_backbone": "backbones",
    "IncrementalSegmenter": "segmenter",
    "SegmenterOutput": "segmenter",
    "build_segmenter": "build",
}
__all__ = [
    "BACKBONES",
    "IncrementalSegmenter",
    "SegmenterOutput",
    "build_backbone",
    "build_segmenter",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'incseg.models' has no attribute {name!r}")
    return getattr(import_module(f"incseg.models.{_WHERE[name]}"), name)
