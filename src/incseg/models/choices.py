"""Names a model config is checked against (no torch import here, so that reading a config stays
light). The builders in :mod:`incseg.models.backbones` and :mod:`incseg.models.norm` match them.
Each ``Literal`` is the type of its config field; the tuple beside it lists the same values."""

from typing import Literal, get_args

Backbone = Literal["resnet101", "resnet50", "tiny"]
OutputStride = Literal[8, 16]
# none: random init; imagenet: torchvision's ImageNet weights; iabn: In-Place ABN's ImageNet
# ResNet-101, the MiB paper's (loaded into the built model by the engine, models/official.py).
Pretrained = Literal["none", "imagenet", "iabn"]
# bn: BatchNorm + ReLU; iabn: BatchNorm + LeakyReLU(0.01), In-Place ABN's function
# frozen_bn: BatchNorm with frozen statistics and affine (detectron2's FrozenBN, SimCIS's
# RESNETS.NORM), for the mask2former architecture only
Norm = Literal["bn", "iabn", "frozen_bn"]

BACKBONE_NAMES: tuple[str, ...] = get_args(Backbone)
OUTPUT_STRIDES: tuple[int, ...] = get_args(OutputStride)
PRETRAINED: tuple[str, ...] = get_args(Pretrained)
NORMS: tuple[str, ...] = get_args(Norm)
# Intermediate maps a method can ask for (``Method.features``), by name:
# ``stage1``..``stage4``: each ResNet stage's last block before its final activation (PLOP's
#   "attentions"), at output strides 4, 8, 16, 16 (OS16) with 256..2048 channels;
# ``stage1_out``..``stage4_out``: each stage's activated output (RCIL's distilled "attentions",
#   zhangchbin/RCIL ``modules/residual.py:170-171``; ``stage4_out`` is ``body``);
# ``body``: the backbone's output (activated), what ILT distils;
# ``head``: the ASPP output after its last norm and activation, the classifiers' input (PLOP's
#   "pre_logits", arthurdouillard/CVPR2021_PLOP ``modules/deeplab.py:37, 69``);
# ``logits_small``: all classifiers' logits at feature resolution, before upsampling;
# ``logits_pos`` / ``logits_neg``: the dkd architecture's class logits at feature resolution from
#   the positive / negative parts of the weights, no bias (models/heads.py);
# ``maps`` / ``queries`` (the mask2former architecture only): res2-res5 and the pixel decoder's
#   mask features; the decoder's query states per prediction (models/mask2former/segmenter.py).
FEATURE_NAMES = (
    "stage1",
    "stage2",
    "stage3",
    "stage4",
    "stage1_out",
    "stage2_out",
    "stage3_out",
    "stage4_out",
    "body",
    "head",
    "logits_small",
    "logits_pos",
    "logits_neg",
)
QUERY_FEATURE_NAMES = ("maps", "queries")
# deeplabv3: DeepLabV3 as MiB builds it; rcil: RCIL's two parallel branches for every 3x3 conv +
# norm of the backbone's blocks and the ASPP convs (models/rcil.py), for method rcil; ssul / dkd:
# torchvision's DeepLabV3 head with SSUL's unknown + background + per-step heads, or DKD's
# auxiliary classifier, all sigmoid (models/heads.py), for methods ssul / dkd; star: dkd's without
# the auxiliary classifier (no background channel), for method star; mask2former: the
# query-based model (models/mask2former), for the query-based methods (comformer, m2f-ft).
Architecture = Literal["deeplabv3", "rcil", "ssul", "dkd", "star", "mask2former"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
