"""Names and values of the protocol that a config is checked against (no torch import here, so
that reading a config stays light)."""

IGNORE_INDEX = 255  # label value the losses and the metric ignore ("void")
MODES = ("disjoint", "overlap")  # which training images belong to a step (SPEC section 3)
CONVENTIONS = ("mib", "plop")  # label conventions (incseg.protocol.labels)
TEST_SELECTIONS = ("seen", "mode")  # which test images belong to a step (select_test)
