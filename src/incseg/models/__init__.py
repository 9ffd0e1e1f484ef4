"""Models: backbones, the DeepLabV3 head and the incremental segmenter."""

from incseg.models.backbones import BACKBONES, build_backbone
from incseg.models.segmenter import IncrementalSegmenter, SegmenterOutput, build_segmenter

__all__ = ["BACKBONES", "IncrementalSegmenter", "SegmenterOutput", "build_backbone", "build_segmenter"]
