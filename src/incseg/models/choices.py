"""Names a model config is checked against (no torch import here, so that reading a config stays
light). The builders in :mod:`incseg.models.backbones` and :mod:`incseg.models.norm` match them."""

BACKBONE_NAMES = ("tiny", "resnet50", "resnet101")
OUTPUT_STRIDES = (8, 16)
# none: random init; imagenet: torchvision's ImageNet weights; iabn: In-Place ABN's ImageNet
# ResNet-101, the MiB paper's (loaded into the built model by the engine, models/official.py).
PRETRAINED = ("none", "imagenet", "iabn")
NORMS = ("bn", "iabn")  # BatchNorm + ReLU; BatchNorm + LeakyReLU(0.01), In-Place ABN's function
