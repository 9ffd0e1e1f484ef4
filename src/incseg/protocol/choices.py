"""Names and values of the protocol that a config is checked against (no torch import here, so
that reading a config stays light). Each ``Literal`` is the type of its config field; the tuple
beside it lists the same values for code that iterates over them."""

from typing import Literal, get_args

IGNORE_INDEX = 255  # label value the losses and the metric ignore ("void")
# training label value of a background pixel that the saliency map marks salient (SSUL's unknown
# class, clovaai/SSUL datasets/voc.py:135-141); only loaders of a method that asks for it
UNKNOWN_INDEX = 254
# which training images belong to a step (docs/protocol.md, "Image selection")
Mode = Literal["disjoint", "overlap"]
# label conventions (incseg.protocol.labels)
Convention = Literal["mib", "plop", "ssul"]
# which test images belong to a step (select_test)
TestSelection = Literal["seen", "mode"]
# where a step's training images come from (incseg.protocol.official)
SplitSource = Literal["auto", "official", "rule"]

MODES: tuple[str, ...] = get_args(Mode)
CONVENTIONS: tuple[str, ...] = get_args(Convention)
TEST_SELECTIONS: tuple[str, ...] = get_args(TestSelection)
SPLIT_SOURCES: tuple[str, ...] = get_args(SplitSource)
