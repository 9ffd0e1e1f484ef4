"""Write the built-in reproduction configs under src/incseg/configs/ (run by maintainers).

    python tools/make_configs.py

- ``voc/`` and ``ade/``: the MiB paper's rows. Each file lists only what differs from the
  defaults (the paper's training setting, docs/protocol.md "Training"): dataset and root,
  test crop 512, In-Place ABN's ImageNet weights, setting, mode, method (MiB's KD weight 100 for
  VOC 15-1 and 10-1; 60 epochs on ADE20K). ADE20K rows train on MiB's shipped partition, its
  disjoint mode (split_source: official); 100-5, which MiB does not ship, uses the overlap rule.
- ``seed/``: the seed table's rows (cssegmentation's MiB model zoo), with cssegmentation's
  recipe; every departure from the paper is a commented key. Also cssegmentation's PLOP configs
  (``seed/plop_*``; VOC only, no number reported), the same way.
- ``voc/*-overlap-plop`` and ``ade/*-plop``: PLOP as its scripts train it
  (arthurdouillard/CVPR2021_PLOP ``scripts/``), every key commented with its source.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "incseg" / "configs"
sys.path.insert(0, str(ROOT / "src"))
from incseg.configs import SEED_MIOU

TABLE1 = ["ft", "pi", "ewc", "rw", "lwf", "lwf_mc", "ilt", "mib"]  # MiB paper, Table 1 (VOC)
ADE_TABLE = ["ft", "lwf", "lwf_mc", "ilt", "mib"]  # MiB paper, ADE20K tables
VOC = {"19-1": TABLE1, "15-5": TABLE1, "15-1": TABLE1, "10-1": ["mib"]}
ADE = {"100-50": ADE_TABLE, "100-10": ADE_TABLE, "50-50": ADE_TABLE, "100-5": ["mib"]}
PAPER_HEADER = "# Paper reproduction config (written by tools/make_configs.py); only differences from the defaults.\n"


def _paper(dataset: str, setting: str, mode: str, method: str) -> dict:
    name = (
        f"{dataset}-{setting}-{mode}-{method}"
        if dataset == "voc"
        else f"{dataset}-{setting}-{method}"
    )
    cfg = {
        "name": name,
        "data": {"dataset": dataset, "root": f"data/{dataset}", "test_crop": 512},
        "protocol": {"setting": setting, "mode": mode},
        "model": {"pretrained": "iabn"},
        "method": {"name": method},
    }
    if dataset == "ade" and setting != "offline":
        official = setting != "100-5"
        cfg["protocol"] = {
            "setting": setting,
            "mode": "disjoint" if official else "overlap",
            "split_source": "official" if official else "rule",
        }
    if method == "mib" and dataset == "voc" and setting in ("15-1", "10-1"):
        cfg["method"]["kd_weight"] = 100
    if dataset == "ade":
        cfg["train"] = {"epochs": 60}
    if setting == "offline":
        cfg["name"] = f"{dataset}-joint"
        cfg["method"] = {"name": "ft"}
    return cfg


SEED_TEMPLATE = """\
# The seed table's row {family} {setting} {mode_word} (cssegmentation's MiB model zoo; {reported}),
# trained with cssegmentation's recipe. Source: {source}.
# Written by tools/make_configs.py; cited files are under csseg/ in
# github.com/SegmentationBLWX/cssegmentation (commit c125175).
# The seed reports the mean over every class with background: compare with incseg's miou_with_bg.
# Not reproduced: cssegmentation keeps the checkpoint with the best *test* mIoU of each step
# (modules/runners/base.py:160-167); incseg reports the last epoch, as the MiB paper does. The next
# step starts from the last epoch in both (runners/base.py:122-124 loads latest.pth).
name: {name}
data:
  dataset: {dataset}
  root: data/{dataset}
  test_crop: 512          # Resize(512) + CenterCrop(512) at test (configs/_base_/datasets/*_512x512.py)
protocol:
  setting: {setting}
  mode: {mode}
  labels: plop            # void ignored in training, unseen classes background at test, ADE20K class 0 counted (modules/datasets/base.py:128-133)
  split_source: rule      # images filtered on the fly by the {mode} rule (modules/datasets/base.py:147-167)
  test_selection: mode    # the test set filtered by the same rule{test_note} (modules/datasets/base.py:115-127)
model:
  pretrained: iabn        # In-Place ABN's ImageNet ResNet-101 (configs/mib/base_cfg.py:9-18)
method:
  name: mib
  kd_weight: {kd:<14}# distillation scale_factor (configs/mib/base_cfg.py:37{kd_note})
train:
  lr_power: 0             # constant LR: the poly scheduler is built but never stepped (modules/models/schedulers/base.py:26-35 never calls updatelr)
  amp: fp16               # apex O1 mixed precision (configs/mib/base_cfg.py:55)
{epochs}"""


def _seed(name: str, miou: float | None) -> str:
    stem = name.removeprefix("mib_r101iabnd16_aspp_512x512_")
    dataset = "voc" if stem.startswith("vocaug") else "ade"
    setting, mode = stem.removeprefix("vocaug").removeprefix("ade20k").split("_")
    epochs = ""
    if dataset == "ade":
        epochs = "  epochs: 60              # cssegmentation ships no ADE20K MiB config: the MiB paper's 60 epochs\n"
    elif setting == "10-1":
        epochs = "  epochs_incremental: 10  # 10 epochs per incremental step (the config's scheduler_cfg[1:] max_epochs)\n"
    kd = 100 if setting in ("15-1", "10-1") else 10
    return SEED_TEMPLATE.format(
        family="VOC" if dataset == "voc" else "ADE20K",
        setting=setting,
        mode_word="overlapped" if mode == "overlap" else mode,
        name=name,
        dataset=dataset,
        mode=mode,
        reported=f"mIoU {miou}%" if miou is not None else "no number reported",
        source=f"configs/mib/{name}.py"
        if dataset == "voc"
        else "its VOC configs (no ADE20K MiB config is shipped)",
        test_note="; under overlap that is the default selection" if mode == "overlap" else "",
        kd=kd,
        kd_note="; 100 in the 15-1 and 10-1 configs" if kd == 10 else "; set to 100 in this config",
        epochs=epochs,
    )


PLOP_COMMIT = "4b4a060"
PLOP_VOC = {
    "19-1": "plop_19-1.sh",
    "15-5": "plop_15-5.sh",
    "15-1": "plop_15-1.sh",
    "10-1": "plop_10-1.sh",
}
PLOP_ADE = {
    "100-50": "plop_ade_100-50.sh",
    "100-10": "plop_ade_100-10.sh",
    "100-5": "plop_ade_100-5.sh",
}
PLOP_TEMPLATE = """\
# PLOP (Douillard et al., CVPR 2021) on {family} {setting}, as scripts/{folder}/{script} trains it.
# Cited files are in github.com/arthurdouillard/CVPR2021_PLOP (commit {commit}); written by
# tools/make_configs.py. Keys left at incseg's defaults are PLOP's too: batch 24 (12 per GPU on 2
# GPUs), SGD lr 0.01 / 0.001 with Nesterov momentum 0.9 and weight decay 1e-4 (run.py:236-276),
# poly LR power 0.9 stepped every iteration (train.py:465-466), crop 512 with scale 0.5-2.0
# (run.py:42-48), test images with a seen class. PLOP reports the last epoch, as incseg does.
name: {name}
data:
  dataset: {dataset}
  root: data/{dataset}
  test_crop: 512          # Resize(512) + CenterCrop(512) at test (--crop_val, run.py:51-58)
protocol:
  setting: {setting}
  mode: overlap           # --overlap in every PLOP script
  labels: plop            # {labels_note}
  split_source: rule      # images filtered on the fly by the overlap rule (dataset/{dataset}.py, filter_images)
model:
  pretrained: iabn        # In-Place ABN's ImageNet ResNet-101 (segmentation_module.py:32-40)
method:
  name: plop
  pod_factor: {pod}  # {pod_note}
  pod_logits_factor: {logits}  # pod_options switch.after.factor ({pod_source})
train:
  amp: fp16               # --opt_level O1 (apex mixed precision) in every script
{epochs}"""


def _plop(dataset: str, setting: str) -> str:
    voc = dataset == "voc"
    epochs = "  epochs: 60              # --epochs 60 at every step\n" if not voc else ""
    if setting == "10-1":
        epochs = "  epochs_incremental: 10  # EPOCHS=10 for the incremental steps\n"
    return PLOP_TEMPLATE.format(
        family="Pascal VOC" if voc else "ADE20K",
        setting=setting,
        folder=dataset,
        script=(PLOP_VOC if voc else PLOP_ADE)[setting],
        commit=PLOP_COMMIT,
        name=f"voc-{setting}-overlap-plop" if voc else f"ade-{setting}-plop",
        dataset=dataset,
        labels_note=(
            "void stays 255 in training (dataset/voc.py:194), unseen classes background at test"
            if voc
            else "class 0 counted at test (dataset/ade.py:130-136, --ignore_test_bg off)"
        ),
        pod="0.01" if voc else "0.001",
        pod_note="--method PLOP sets pod_factor 0.01 (argparser.py:49-57)"
        if voc
        else "--pod_factor 0.001 in the script's OPTIONS",
        logits="0.0005" if voc else "0.00001",
        pod_source="argparser.py:53" if voc else "the script's --pod_options",
        epochs=epochs,
    )


EWF_COMMIT = "560382d"
EWF_VOC = ("19-1", "15-1", "10-1", "5-3")  # scripts/voc/{mib,plop}+ours_{19-1,15-1,5-3,10-1}.sh
EWF_ADE = {
    "100-50": ("mib+ours_100-50.sh", 48, 10),
    "100-10": ("mib_ade_100-10.sh", 24, 100),
    "100-5": ("mib_ade_100-5.sh", 24, 100),
}  # script, global batch, loss_kd (MiB only)
EWF_TEMPLATE = """\
# {title} + EWF (Xiao et al., CVPR 2023) on {family} {setting}, as scripts/{folder}/{script} trains it.
# Cited files are in github.com/schuy1er/EWF_official (commit {commit}), a fork of PLOP's code (its
# dataset/voc.py, ade.py and transform.py are PLOP's); written by tools/make_configs.py. Keys left at
# incseg's defaults are the scripts' too: SGD lr 0.01 at step 0{step0_note} and 0.001 after, poly 0.9,
# crop 512 with scale 0.5-2.0 (run.py:45-52); {epochs_note}.
name: {name}
data:
  dataset: {dataset}
  root: data/{dataset}
  test_crop: 512          # Resize(512) + CenterCrop(512) at test: --crop_val defaults to True (argparser.py:159-164)
protocol:
  setting: {setting}
  mode: overlap           # --overlap in every EWF script
  labels: plop            # PLOP's dataset code (dataset/{dataset}.py)
  split_source: rule      # the overlap filter of PLOP's dataset code
model:
  pretrained: iabn        # In-Place ABN's ImageNet ResNet-101
method:
  name: {method}+ewf
{method_keys}  ewf:
    freeze_old_classifiers: true  # --fix_pre_cls in every script (train.py:334-342)
train:
  amp: fp16               # --opt_level O1 in every script
{train_keys}"""


def _ewf(dataset: str, setting: str, method: str) -> str:
    voc = dataset == "voc"
    if voc:
        script = f"{method}+ours_{'15-1' if setting == '15-1' else setting}.sh"
        batch, kd = 24, 10
    else:
        script, batch, kd = EWF_ADE[setting]
    if method == "mib":
        keys = f"  kd_weight: {kd}  # {'--method MiB sets loss_kd 10 (argparser.py:44-48)' if voc else f'--loss_kd {kd} in the script OPTIONS'}\n"
    else:
        keys = "  pod_factor: 0.01  # --method PLOP (argparser.py:49-57)\n  pod_logits_factor: 0.0005  # argparser.py:53\n"
    train = (
        ""
        if batch == 24
        else f"  batch_size: {batch}  # --batch_size 12 per GPU on 4 GPUs (NB_GPU=4)\n"
    )
    if not voc:
        train += "  epochs: 60              # --epochs 60 at every step\n"
    return EWF_TEMPLATE.format(
        title="MiB" if method == "mib" else "PLOP",
        family="Pascal VOC" if voc else "ADE20K",
        setting=setting,
        folder=dataset,
        script=script,
        commit=EWF_COMMIT,
        epochs_note="batch 24 (6 per GPU on 4 GPUs), 30 epochs per step"
        if voc
        else "60 epochs per step",
        step0_note=" (the scripts' step-0 line, commented out there)" if voc else "",
        name=f"{dataset}-{setting}-overlap-{method}-ewf",
        dataset=dataset,
        method=method,
        method_keys=keys,
        train_keys=train,
    )


NEST_COMMIT = "f96185b"
NEST_SCRIPTS = {
    ("voc", "15-1"): 30,
    ("voc", "10-1"): 10,
    ("ade", "100-5"): 60,
}  # scripts/{voc,ade}/{mib,plop}+ours_resnet101_{setting}.sh: epochs of the incremental steps
NEST_TEMPLATE = """\
# {title} + NeST (Xie et al., ECCV 2024) on {family} {setting}, as
# scripts/{dataset}/{method}+ours_resnet101_{setting}.sh trains it (TASK={task}). Cited files are in
# github.com/zhengyuan-xie/ECCV24_NeST (commit {commit}), based on MiB's and PLOP's code (its dataset
# code and transforms are PLOP's); written by tools/make_configs.py. Keys left at incseg's defaults are
# the scripts' too: SGD lr 0.001 after step 0, Nesterov momentum 0.9, weight decay 1e-4, poly 0.9
# (run.py:382-394, argparser.py:165, 182), crop 512 with scale 0.5-2.0 (run.py:47-54), batch 24
# (6 per GPU on 4 GPUs).
name: {name}
data:
  dataset: {dataset}
  root: data/{dataset}
  test_crop: 512          # Resize(512) + CenterCrop(512) at test (--crop_val, run.py:56-62)
protocol:
  setting: {setting}
  mode: overlap           # --overlap in every NeST script
  labels: plop            # PLOP's dataset code (dataset/{dataset}.py)
  split_source: rule      # the overlap filter of PLOP's dataset code
model:
  pretrained: iabn        # In-Place ABN's ImageNet ResNet-101 (README: resnet101_iabn_sync.pth.tar)
method:
  name: {method}+nest
{method_keys}  nest:
    epochs: {warm_epochs}  # --warm_epochs {warm_epochs}
    lr_scale: {lr_scale}  # --warm_lr_scale {lr_scale}
{freeze}train:
  lr: 0.02                # --lr 0.02 on the step-0 line
  amp: fp16               # --opt_level O1 in every script
{epochs}"""


def _nest(dataset: str, setting: str, method: str) -> str:
    voc = dataset == "voc"
    incremental = NEST_SCRIPTS[(dataset, setting)]
    if method == "mib":
        keys = "  kd_weight: 10  # --loss_kd 10 --unce --unkd --init_balanced in OPTIONS\n"
    elif voc:
        keys = "  pod_factor: 0.01  # --pod local --pod_factor 0.01 --pod_logits in OPTIONS\n  pod_logits_factor: 0.0005  # --pod_options switch.after.factor\n"
    else:
        keys = "  pod_factor: 0.001  # --pod_factor 0.001 in OPTIONS\n  pod_logits_factor: 0.00001  # --pod_options switch.after.factor\n"
    freeze = ""
    if method == "plop" and voc:
        freeze = "    freeze_old_classifiers: true  # --fix_pre_cls in OPTIONS (train.py:422-430)\n"
    if voc:
        epochs = (
            ""
            if incremental == 30
            else f"  epochs_incremental: {incremental}  # EPOCHS={incremental}\n"
        )
    else:
        epochs = "  epochs: 60              # --epochs 60 at every step\n"
    return NEST_TEMPLATE.format(
        title="MiB" if method == "mib" else "PLOP",
        family="Pascal VOC" if voc else "ADE20K",
        setting=setting,
        dataset=dataset,
        method=method,
        task="15-5s" if setting == "15-1" else setting,
        commit=NEST_COMMIT,
        name=f"{dataset}-{setting}-overlap-{method}-nest"
        if voc
        else f"ade-{setting}-{method}-nest",
        method_keys=keys,
        warm_epochs=5 if voc else 15,
        lr_scale=1 if voc else 500,
        freeze=freeze,
        epochs=epochs,
    )


CSSEG_STEMS = [f"vocaug{s}_{m}" for s in ("15-5", "15-1", "10-1") for m in ("disjoint", "overlap")]
CSSEG_METHOD_TEMPLATE = """\
# {title} on VOC {setting} {mode_word}, trained with cssegmentation's recipe ({reported}).
# Source: configs/{folder}/{name}.py and configs/{folder}/base_cfg.py.
# Written by tools/make_configs.py; cited files are under csseg/ in
# github.com/SegmentationBLWX/cssegmentation (commit c125175).{extra}
# Not reproduced: cssegmentation keeps the checkpoint with the best *test* mIoU of each step
# (modules/runners/base.py:160-167); incseg reports the last epoch.
name: {name}
data:
  dataset: voc
  root: data/voc
  test_crop: 512          # Resize(512) + CenterCrop(512) at test (configs/_base_/datasets/vocaug_512x512.py)
protocol:
  setting: {setting}
  mode: {mode}
  labels: plop            # void ignored in training, unseen classes background at test (modules/datasets/base.py:128-133)
  split_source: rule      # images filtered on the fly by the {mode} rule (modules/datasets/base.py:147-167)
  test_selection: mode    # the test set filtered by the same rule{test_note} (modules/datasets/base.py:115-127)
model:
  pretrained: iabn        # In-Place ABN's ImageNet ResNet-101 (configs/{folder}/base_cfg.py)
{model_extra}method:
{method}train:
{lr}  lr_power: 0             # constant LR: the poly scheduler is built but never stepped (modules/models/schedulers/base.py:26-35 never calls updatelr)
  amp: fp16               # apex O1 mixed precision
{epochs}"""
ILT_METHOD = """\
  name: ilt
  kd_weight: 100          # distillation_logits scale_factor, alpha 1 (configs/ilt/base_cfg.py:37; runners/ilt.py:56-73)
  feature_weight: 100     # distillation_features MSELoss scale_factor on the encoder output (configs/ilt/base_cfg.py:38)
"""
RCIL_METHOD = """\
  name: rcil
  kd_weight: 100          # distillation_mib scale_factor 100, alpha 1 (configs/rcil/base_cfg.py:26-35)
"""
UCD_METHOD = """\
  name: mib+ucd
  kd_weight: 10           # distillation scale_factor 10, alpha 1 (configs/ucd/base_cfg.py:33)
  ce_reduction: valid     # CE and MiB's unbiased CE with reduction 'mean', ignore_index 255: mean over non-void pixels (configs/ucd/base_cfg.py:27-32; modules/models/losses/celoss.py:32-34, 58)
  ucd:
    weight: 0.01          # contrastive scale_factor 0.01, temperature 0.07 by default (configs/ucd/base_cfg.py:34; runners/ucd.py:91)
"""


CSSEG_TITLES = {"ilt": "ILT", "mib+ucd": "MiB + UCD", "rcil": "RCIL"}
CSSEG_EXTRA = {
    "mib+ucd": (
        "\n# cssegmentation's UCD builds its new-class masks from zeros (modules/runners/ucd.py:152-160),"
        "\n# so new-with-new pairs keep the old model's joint probability as weight; incseg gives them"
        "\n# weight 1, as the official code (docs/methods.md, ucd). Its UCD configs do not run at"
        "\n# c125175 (they import OPTIMIZER_CFG_SGD, which configs/_base_ no longer exports)."
    ),
    "rcil": (
        "\n# cssegmentation's RCIL does not run at that commit (RCILSegmentor is not registered,"
        "\n# modules/models/segmentors/builder.py:17-19); where its formulas differ from the official"
        "\n# code incseg follows the official (docs/methods.md, rcil)."
    ),
}


def _csseg_method(family: str, stem: str, zoo: float | None) -> str:
    """cssegmentation's ILT, MiB+UCD or RCIL recipe for one VOC setting and mode."""
    setting, mode = stem.removeprefix("vocaug").split("_")
    name = f"{family}_r101iabnd16_aspp_512x512_{stem}"
    epochs = ""
    if setting == "10-1":
        epochs = "  epochs_incremental: 10  # 10 epochs per incremental step (the config's scheduler_cfg[1:] max_epochs)\n"
    lr_02 = family in ("mib+ucd", "rcil")
    return CSSEG_METHOD_TEMPLATE.format(
        title=CSSEG_TITLES[family],
        setting=setting,
        mode=mode,
        mode_word="overlapped" if mode == "overlap" else mode,
        reported=f"its model zoo reports mIoU {zoo}%"
        if zoo is not None
        else "its model zoo reports no number",
        folder={"mib+ucd": "ucd"}.get(family, family),
        name=name,
        extra=CSSEG_EXTRA.get(family, ""),
        test_note="; under overlap that is the default selection" if mode == "overlap" else "",
        model_extra="  architecture: rcil\n" if family == "rcil" else "",
        method={"ilt": ILT_METHOD, "mib+ucd": UCD_METHOD, "rcil": RCIL_METHOD}[family],
        lr="  lr: 0.02                # step-0 learning rate 0.02 (scheduler_cfg[0])\n"
        if lr_02
        else "",
        epochs=epochs,
    )


UCD_PAPER = ("19-1", "15-5", "15-1")  # the paper's Table 1 (VOC, disjoint and overlapped)
UCD_TEMPLATE = """\
# MiB + UCD (Yang et al., TPAMI 2022) on Pascal VOC {setting} {mode}, the recipe of the official README
# (github.com/ygjwd12345/UCD at cc73546, README.md:50-53; the repository ships no script): lr 0.01 at
# step 0 and 0.001 after, global batch 24, 30 epochs; --method UCD sets MiB's terms, loss_kd 10
# (argparser.py:35-39); the contrastive term's weight 1/100 is fixed (train.py:116). The shipped
# splits are MiB's (data/voc/*/train-*.npy are fcdl94/MiB's files), but labels are masked and the
# cross-entropy averaged as in PLOP's code, not MiB's (docs/methods.md, ucd). Written by
# tools/make_configs.py.
name: voc-{setting}-{mode}-mib-ucd
data:
  dataset: voc
  root: data/voc
  test_crop: 512
protocol:
  setting: {setting}
  mode: {mode}
  labels: plop            # void stays 255 and classes outside the step are 0 in training and validation labels, unseen classes 0 at test (dataset/voc.py:131, 182-207: data_masking "current"; run.py:93-111)
model:
  pretrained: iabn        # In-Place ABN's ImageNet ResNet-101, as MiB
method:
  name: mib+ucd
  kd_weight: 10           # --method UCD: loss_kd 10 (argparser.py:35-39)
  ce_reduction: all       # per-pixel CE (reduction 'none') averaged over all pixels, void counting 0, at every step (train.py:30, 37-40, 112, 116)
  ucd:
    weight: 0.01          # /100 (train.py:116)
    temperature: 0.07     # --temperature default (argparser.py:138-139)
"""


REMINDER_COMMIT = "f8d225e"
REMINDER_SCRIPTS = {
    ("voc", "19-1"): ("reminder_19-1.sh", 32, 30, 0.001),
    ("voc", "15-5"): ("reminder_15-5.sh", 32, 30, 0.001),
    ("voc", "15-1"): ("reminder_15-1.sh", 16, 30, 0.001),
    ("ade", "100-50"): ("reminder_100-50.sh", 10, 70, 0.0008),
    ("ade", "100-10"): ("reminder_100-10.sh", 10, 70, 0.001),
    ("ade", "100-5"): ("reminder_100-5.sh", 10, 70, 0.001),
}  # script, global batch (GPUs x --batch_size), epochs and lr of the incremental steps
REMINDER_TEMPLATE = """\
# REMINDER (Phan et al., CVPR 2022) on {family} {setting}, as scripts/{dataset}/{script} trains it.
# Cited files are in github.com/HieuPhan33/REMINDER (commit {commit}), a fork of PLOP's code (its data
# code and transforms are PLOP's); written by tools/make_configs.py. Keys left at incseg's defaults
# are the scripts' too: SGD lr 0.01 at step 0, Nesterov momentum 0.9, weight decay 1e-4, poly 0.9
# stepped every iteration (run.py:274-279), crop 512 with scale 0.5-2.0 (run.py:42-49).
# The paper's numbers came from the code at 7872ac7, which pairs prototypes' labels with transposed
# positions: set method.prototypes: published to train that variant (docs/methods.md, reminder).
name: {name}
data:
  dataset: {dataset}
  root: data/{dataset}
  test_crop: 512          # Resize(512) + CenterCrop(512) at test (--crop_val)
protocol:
  setting: {setting}
  mode: overlap           # --overlap in every REMINDER script
  labels: plop            # PLOP's dataset code (dataset/{dataset}.py)
  split_source: rule      # the overlap filter of PLOP's dataset code
model:
  pretrained: iabn        # In-Place ABN's ImageNet ResNet-101
method:
  name: reminder
{method_keys}train:
  batch_size: {batch}  # {batch_note}
  lr_incremental: {lr}  # --lr {lr} for steps > 0
  amp: fp16               # --opt_level O1 in every script
{epochs}"""


def _reminder(dataset: str, setting: str) -> str:
    voc = dataset == "voc"
    script, batch, epochs, lr = REMINDER_SCRIPTS[(dataset, setting)]
    if voc:
        keys = (
            "  pod_factor: 0.01  # --method REMINDER = PLOP's settings (argparser.py:58-66)\n"
            "  pod_logits_factor: 0.0005  # pod_options switch.after.factor (argparser.py:61)\n"
            "  csw_weight: 0.5  # csw_kd (argparser.py:67)\n"
            "  delta: 0.0  # --delta_csw not set (default 0, argparser.py:297-302)\n"
        )
        train_epochs = ""
    else:
        keys = (
            "  pod_factor: 0.001  # --pod_factor 0.001 in the script\n"
            "  pod_logits_factor: 0.00001  # --pod_options switch.after.factor\n"
            "  csw_weight: 0.5  # --csw_kd 0.5\n"
            "  delta: 1.0  # --delta_csw 1.0\n"
        )
        train_epochs = f"  epochs: 60              # --epochs 60 at step 0\n  epochs_incremental: {epochs}  # --epochs {epochs} after\n"
    gpus = batch // (16 if voc else 10)
    return REMINDER_TEMPLATE.format(
        family="Pascal VOC" if voc else "ADE20K",
        setting=setting,
        dataset=dataset,
        script=script,
        commit=REMINDER_COMMIT,
        name=f"voc-{setting}-overlap-reminder" if voc else f"ade-{setting}-reminder",
        method_keys=keys,
        batch=batch,
        batch_note=f"--batch_size {16 if voc else 10} per GPU on {gpus} GPU{'s' if gpus > 1 else ''}",
        lr=lr,
        epochs=train_epochs,
    )


RCIL_COMMIT = "b9aad58"
RCIL_SCRIPTS = {
    ("voc", "15-1", "overlap"): "RCIL_15-1-overlap.sh",
    ("voc", "15-1", "disjoint"): "RCIL_15-1-disjoint.sh",
    ("voc", "10-1", "overlap"): "RCIL_10-1-overlap.sh",
    ("voc", "10-1", "disjoint"): "RCIL_10-1-disjoint.sh",
    ("ade", "100-50", "overlap"): "RCIL_ade_100-50.sh",
    ("ade", "100-10", "overlap"): "RCIL_ade_100-10.sh",
    ("ade", "100-5", "overlap"): "RCIL_ade_100-5.sh",
}
RCIL_TEMPLATE = """\
# RCIL (Zhang et al., CVPR 2022) on {family} {setting} {mode}, as scripts/{dataset}/{script} trains it{task}.
# Cited files are in github.com/zhangchbin/RCIL (commit {commit}), a fork of PLOP's code (its data code
# and transforms are PLOP's); written by tools/make_configs.py. Keys left at incseg's defaults are the
# scripts' too: SGD lr 0.001 after step 0, Nesterov momentum 0.9, weight decay 1e-4, poly 0.9 stepped
# every iteration (run.py:326-371), crop 512 with scale 0.5-2.0 (run.py:132-139), batch 24 ({gpus}).
name: {name}
data:
  dataset: {dataset}
  root: data/{dataset}
  test_crop: 512          # Resize(512) + CenterCrop(512) at test (run.py:141-149)
protocol:
  setting: {setting}
  mode: {mode}{mode_note}
  labels: plop            # PLOP's dataset code (dataset/{dataset}.py)
  split_source: rule      # the {mode} filter of PLOP's dataset code
model:
  pretrained: iabn        # In-Place ABN's ImageNet ResNet-101 (README, "Training")
  architecture: rcil      # the parallel branches, merged at each step (models/rcil.py)
method:
  name: rcil
  kd_weight: 100          # --loss_kd 100 (argparser.py:49-59{kd_note})
{pcd}train:
  lr: {lr}                # --lr {lr} on the step-0 line
  amp: fp16               # --opt_level O1 in every script
{epochs}"""


def _rcil(dataset: str, setting: str, mode: str) -> str:
    voc = dataset == "voc"
    pcd = ""
    if not voc:
        pcd = (
            "  pcd_factor: 0.000005  # hard-coded for ADE20K (train.py:57-58, 123-124)\n"
            "  pcd_last_factor: 0.0000005  # train.py:50-51, 116-117\n"
        )
    gpus = "2 GPUs x 12" if setting in ("100-10", "100-5") else "4 GPUs x 6"
    return RCIL_TEMPLATE.format(
        family="Pascal VOC" if voc else "ADE20K",
        setting=setting,
        mode=mode,
        dataset=dataset,
        script=RCIL_SCRIPTS[(dataset, setting, mode)],
        task=" (TASK=15-5s)" if setting == "15-1" else "",
        commit=RCIL_COMMIT,
        gpus=gpus,
        name=f"voc-{setting}-{mode}-rcil" if voc else f"ade-{setting}-rcil",
        mode_note="           # --overlap" if mode == "overlap" else "          # no --overlap",
        kd_note="" if voc else "; the ADE20K scripts' OPTIONS",
        pcd=pcd,
        lr=0.02 if voc else 0.01,
        epochs="" if voc else "  epochs: 60              # --epochs 60 at every step\n",
    )


CSSEG_PLOP = [
    f"plop_r101iabnd16_aspp_512x512_vocaug{s}_{m}"
    for s in ("15-5", "15-1", "10-1")
    for m in ("disjoint", "overlap")
]
CSSEG_PLOP_TEMPLATE = """\
# PLOP on VOC {setting} {mode_word}, trained with cssegmentation's recipe (its PLOP model zoo reports
# no number). Source: configs/plop/{name}.py and configs/plop/base_cfg.py.
# Written by tools/make_configs.py; cited files are under csseg/ in
# github.com/SegmentationBLWX/cssegmentation (commit c125175).
# Not reproduced: cssegmentation keeps the checkpoint with the best *test* mIoU of each step
# (modules/runners/base.py:160-167); incseg reports the last epoch.
name: {name}
data:
  dataset: voc
  root: data/voc
  test_crop: 512          # Resize(512) + CenterCrop(512) at test (configs/_base_/datasets/*_512x512.py)
protocol:
  setting: {setting}
  mode: {mode}
  labels: plop            # void ignored in training, unseen classes background at test (modules/datasets/base.py:128-133)
  split_source: rule      # images filtered on the fly by the {mode} rule (modules/datasets/base.py:147-167)
  test_selection: mode    # the test set filtered by the same rule{test_note} (modules/datasets/base.py:115-127)
model:
  pretrained: iabn        # In-Place ABN's ImageNet ResNet-101 (configs/plop/base_cfg.py:17)
method:
  name: plop
  pod_factor: 0.01        # distillation pod_factor (configs/plop/base_cfg.py:37)
  pod_logits_factor: 0.0005  # pod_factor_last_scale (configs/plop/base_cfg.py:37)
  threshold: 0.001        # pseudolabeling_minimal_threshold (configs/plop/base_cfg.py:55)
train:
  lr_power: 0             # constant LR: the poly scheduler is built but never stepped (modules/models/schedulers/base.py:26-35 never calls updatelr)
  amp: fp16               # apex O1 mixed precision (configs/plop/base_cfg.py:56)
{epochs}"""


def _csseg_plop(name: str) -> str:
    setting, mode = name.removeprefix("plop_r101iabnd16_aspp_512x512_vocaug").split("_")
    epochs = ""
    if setting == "10-1":
        epochs = "  epochs_incremental: 10  # 10 epochs per incremental step (the config's scheduler_cfg[1:] max_epochs)\n"
    return CSSEG_PLOP_TEMPLATE.format(
        setting=setting,
        mode=mode,
        mode_word="overlapped" if mode == "overlap" else mode,
        name=name,
        test_note="; under overlap that is the default selection" if mode == "overlap" else "",
        epochs=epochs,
    )


SSUL_COMMIT = "e08ee9c"
SSUL_SETTINGS = {"voc": ("15-5", "15-1", "10-1"), "ade": ("100-50", "100-10", "100-5")}
SSUL_TEMPLATE = """\
# {title} (Cha et al., NeurIPS 2021) on {family} {setting}{mode_title}, as the README's command trains it
# (README.md:{readme}). Cited files are in github.com/clovaai/SSUL (commit {commit}); written by
# tools/make_configs.py. Keys left at incseg's defaults are the official ones too: SGD Nesterov
# momentum 0.9, weight decay 1e-4 (main.py:78, 266-270), poly 0.9 stepped every iteration
# (main.py:383-389, 474), output stride 16 (main.py:50). Training images are augmented with
# incseg's random resized crop (area 0.5-2.0); SSUL scales by 0.5-2.0 and crops 513 px, padding
# with background (main.py:105-113): docs/methods.md, ssul.
name: {name}
data:
  dataset: {dataset}
  root: data/{dataset}
  crop_size: 513          # --crop_size 513 (main.py:69)
  test_crop: 513          # --crop_val: Resize(513) + CenterCrop(513) (main.py:114-121)
{saliency}protocol:
  setting: {setting}
  mode: overlap           # --overlap in the README's command
  labels: ssul            # void kept at training, future classes ignored at test (datasets/{dataset}.py)
  split_source: rule      # utils/tasks.py:261-289: images with a class of the step
model:
  backbone: resnet101     # deeplabv3_resnet101 (README.md:{model_line})
  pretrained: imagenet    # torchvision's ImageNet ResNet-101 (network/backbone/resnet.py:15)
  norm: bn                # nn.BatchNorm2d, backbone momentum 0.01 (main.py:224)
  architecture: ssul      # unknown + background + one head per step (network/_deeplab.py:84-103)
method:
  name: ssul
  memory_size: {memory}{memory_note}
  pseudo_threshold: 0.7   # --pseudo_thresh 0.7
  unknown: {unknown}{unknown_note}
train:
  epochs: {epochs}              # --train_epoch {epochs} at every step
  batch_size: {batch}          # --batch_size {batch}
  lr: 0.001               # step 0: backbone 0.001, head and classifiers x10 (main.py:262-264)
  lr_incremental: {lr}        # --lr {lr}: the new, unknown and background heads (main.py:241-260)
{schedule}  amp: fp16               # --amp
"""


def _ssul(dataset: str, setting: str, memory: bool) -> str:
    voc = dataset == "voc"
    size = (100 if voc else 300) if memory else 0
    title = "SSUL-M" if memory else "SSUL"
    if voc:
        schedule = "  lr_min: 0.000001        # --lr_policy poly: PolyLR floors each LR at 1e-6 (utils/scheduler.py:7-16)\n"
    else:
        schedule = "  lr_warmup: 0.1          # --lr_policy warm_poly: 10% of the iterations (main.py:387-389)\n"
    return SSUL_TEMPLATE.format(
        title=title,
        family="Pascal VOC" if voc else "ADE20K",
        setting=setting,
        mode_title=" overlap" if voc else "",
        readme="82-92" if voc else "98-108",
        commit=SSUL_COMMIT,
        name=f"voc-{setting}-overlap-{title.lower()}" if voc else f"ade-{setting}-{title.lower()}",
        dataset=dataset,
        saliency="  saliency: data/voc/saliency_map  # the release's saliency_map.zip (README.md:77)\n"
        if voc
        else "",
        model_line="92" if voc else "108",
        memory=size,
        memory_note=f"  # --mem_size {size}" + (" (SSUL-M)" if memory else ""),
        unknown="saliency" if voc else "background",
        unknown_note="  # salient background (datasets/voc.py:135-141)"
        if voc
        else "  # every background pixel (datasets/ade.py:291-298)",
        epochs=50 if voc else 100,
        batch=32 if voc else 24,
        lr=0.01 if voc else 0.05,
        schedule=schedule,
    )


DKD_COMMIT = "fb4693f"
DKD_SETTINGS = {
    ("voc", "15-5", "overlap"): "overlapped/train_voc_15-5.sh",
    ("voc", "15-1", "overlap"): "overlapped/train_voc_15-1.sh",
    ("voc", "10-1", "overlap"): "overlapped/train_voc_10-1.sh",
    ("voc", "15-5", "disjoint"): None,  # README.md:44-54: the overlapped scripts with 'disjoint'
    ("voc", "15-1", "disjoint"): None,
    ("ade", "100-50", "overlap"): "overlapped/train_ade_100-50.sh",
    ("ade", "100-10", "overlap"): "overlapped/train_ade_100-10.sh",
    ("ade", "100-5", "overlap"): None,  # no script: data_loader/task.py:158-170 defines the task
}
DKD_TEMPLATE = """\
# {title} (Baek et al., NeurIPS 2022) on {family} {setting}{mode_title}, as {source}.
# Cited files are in github.com/cvlab-yonsei/DKD (commit {commit}); written by tools/make_configs.py.
# Keys left at incseg's defaults are the official ones too: SGD Nesterov momentum 0.9, weight decay
# 1e-4 (configs/config_{dataset}.json:66-73), poly 0.9 stepped every iteration (utils/lr_scheduler.py),
# random resized crop 512 with area 0.5-2.0 (data_loader/dataset.py:140-152), output stride 16
# (models/modules/backbone.py:28).
name: {name}
data:
  dataset: {dataset}
  root: data/{dataset}
  test_crop: 512          # Resize(512) + CenterCrop(512) at test (dataset.py:154-163)
protocol:
  setting: {setting}
  mode: {mode}
  labels: {labels}{labels_note}
  split_source: rule      # the {mode} rule of data_loader/dataset.py:73-112
model:
  backbone: resnet101
  pretrained: imagenet    # torchvision's resnet101-63fe2227.pth (models/modules/backbone.py:32)
  norm: bn                # "norm_act": "bn_sync" (config_{dataset}.json:16), backbone momentum 0.01
  architecture: dkd       # auxiliary classifier, no background channel (models/model.py:41-75)
method:
  name: dkd
  memory_size: {memory}{memory_note}
  pos_weight_first: {pw_first}{pw_first_note}
  pos_weight: {pw}         # config_{dataset}.json:76
train:
  epochs: {epochs}             # config_{dataset}.json:95-97, at every step
  batch_size: {batch}          # {batch_note}
  lr: {lr}             # backbone; head and classifiers x10 (train_voc.py:127-143)
  lr_incremental: {lr_inc}
{schedule}  amp: fp16               # "use_amp": true (config_{dataset}.json:11)
"""


def _dkd(dataset: str, setting: str, mode: str, memory: bool) -> str:
    voc = dataset == "voc"
    size = (100 if voc else 300) if memory else 0
    title = "DKD-M" if memory else "DKD"
    script = DKD_SETTINGS[(dataset, setting, mode)]
    if script:
        source = f"scripts/{dataset}/{script} trains it"
    elif voc:
        source = "the README's disjoint setting trains it (README.md:44-54: the overlapped script, TASKSETTING='disjoint')"
    else:
        source = "the 100-10 script would train it (no script or number for 100-5; task.py:158-170 defines it)"
    return DKD_TEMPLATE.format(
        title=title,
        family="Pascal VOC" if voc else "ADE20K",
        setting=setting,
        mode_title=f" {mode}" if voc else "",
        source=source,
        commit=DKD_COMMIT,
        name=f"voc-{setting}-{mode}-{title.lower()}" if voc else f"ade-{setting}-{title.lower()}",
        dataset=dataset,
        mode=mode,
        labels="plop" if voc else "ssul",
        labels_note="            # future classes are background at test (config_voc.json:57)"
        if voc
        else "            # future classes ignored at test (config_ade.json:57), class 0 counted",
        memory=size,
        memory_note=f"  # MEMORY_SIZE={size}" + (" (DKD-M, README.md:54,79)" if memory else ""),
        pw_first=2 if voc else 35,
        pw_first_note="  # --pos_weight ${INIT_POSWEIGHT}=2 at step 0 (the scripts' line 13)"
        if voc
        else "  # config_ade.json:76 (the ADE20K scripts pass no --pos_weight)",
        pw=1 if voc else 35,
        epochs=60 if voc else 100,
        batch=32 if voc else 24,
        batch_note="BS=8 per GPU x 4 (scripts line 5)"
        if voc
        else "BS=6 per GPU x 4 (scripts line 4)",
        lr=0.001 if voc else 0.0025,
        lr_inc=0.0001 if voc else 0.00025,
        schedule=""
        if voc
        else "  lr_warmup: 0.2          # WarmupPolyLR, warmup_iters 0.2 of the step (config_ade.json:81-84)\n",
    )


STAR_COMMIT = "9e31f36"
STAR_SETTINGS = {
    ("voc", "15-5", "overlap"): "voc/overlapped/train_voc_15-5.sh",
    ("voc", "15-1", "overlap"): "voc/overlapped/train_voc_15-1.sh",
    ("voc", "10-1", "overlap"): "voc/overlapped/train_voc_10-1.sh",
    ("voc", "15-5", "disjoint"): "voc/disjoint/train_voc_15-5.sh",
    ("voc", "15-1", "disjoint"): "voc/disjoint/train_voc_15-1.sh",
    ("ade", "100-50", "overlap"): "ade/overlapped/train_ade_100-50.sh",
    ("ade", "100-10", "overlap"): "ade/overlapped/train_ade_100-10.sh",
    ("ade", "100-5", "overlap"): None,  # no script; trainer_ade.py:316 breaks at step 10
}
STAR_TEMPLATE = """\
# {title} (Chen et al., NeurIPS 2023) on {family} {setting}{mode_title}, as {source}.
# Cited files are in github.com/jinpeng0528/STAR (commit {commit}), built on DKD's code; written by
# tools/make_configs.py. Keys left at incseg's defaults are the official ones too: SGD Nesterov
# momentum 0.9, weight decay 1e-4 on every group (configs/config_{dataset}.json:66-74,
# train_voc.py:123-142), poly 0.9 stepped every iteration, random resized crop 512 with area
# 0.5-2.0 (data_loader/dataset.py:140-152), output stride 16.
name: {name}
data:
  dataset: {dataset}
  root: data/{dataset}
  test_crop: 512          # Resize(512) + CenterCrop(512) at test (dataset.py:154-170)
protocol:
  setting: {setting}
  mode: {mode}
  labels: {labels}{labels_note}
  split_source: rule
model:
  backbone: resnet101
  pretrained: imagenet    # torchvision's ImageNet ResNet-101 (models/modules/backbone.py:24-32)
  norm: bn                # "bn_sync", backbone momentum 0.01 (train_voc.py:101)
  architecture: star      # one sigmoid per class, no background channel (models/model.py:41)
method:
  name: star
  memory_size: {memory}{memory_note}
  pos_weight: {pw}           # config_{dataset}.json:76
train:
  epochs: {epochs}             # config_{dataset}.json:95, at every step
  batch_size: {batch}          # {batch_note}
  lr: {lr}             # INIT_LR: backbone; head and classifiers x10 (train_voc.py:136-142)
  lr_incremental: {lr_inc}   # LR: backbone; head, old classifiers x10, new x100 (train_voc.py:123-134)
{schedule}  amp: fp16               # "use_amp": true (config_{dataset}.json:11)
"""


def _star(dataset: str, setting: str, mode: str, memory: bool) -> str:
    voc = dataset == "voc"
    title = "STAR-M" if memory else "STAR"
    script = STAR_SETTINGS[(dataset, setting, mode)]
    source = (
        f"scripts/{script} trains it"
        if script
        else "the 100-10 script would train it (no script or number for 100-5)"
    )
    if memory and voc:
        size, note = 50, "  # MEMORY_SIZE=50 for STAR-M (the scripts' line 11)"
    elif memory:
        size, note = 300, "  # no official ADE20K STAR-M size: DKD-M's 300 (DKD README.md:79)"
    else:
        size, note = 0, "  # MEMORY_SIZE=0"
    return STAR_TEMPLATE.format(
        title=title,
        family="Pascal VOC" if voc else "ADE20K",
        setting=setting,
        mode_title=f" {mode}" if voc else "",
        source=source,
        commit=STAR_COMMIT,
        name=f"voc-{setting}-{mode}-{title.lower()}" if voc else f"ade-{setting}-{title.lower()}",
        dataset=dataset,
        mode=mode,
        labels="plop" if voc else "ssul",
        labels_note="            # future classes are background at test (config_voc.json:57)"
        if voc
        else "            # future classes ignored at test (config_ade.json:57), class 0 counted",
        memory=size,
        memory_note=note,
        pw=4 if voc else 30,
        epochs=60 if voc else 100,
        batch=24,
        batch_note="BS=24 on one GPU (scripts line 4)"
        if voc
        else "BS=12 per GPU x 2 (scripts line 4)",
        lr=0.001 if voc else 0.0025,
        lr_inc=0.0001 if voc else 0.00025,
        schedule=""
        if voc
        else "  lr_warmup: 0.2          # WarmupPolyLR, warmup_iters 0.2 (config_ade.json:81-84)\n",
    )


COMFORMER_COMMIT = "640496b"
# setting -> (script, iterations per step > 0, KD weight, where the values come from)
COMFORMER_SETTINGS = {
    "100-50": ("scripts/ade.sh:15-17", 20000, 0.5, "KD_WEIGHT 0.5 (also the maintainer, issue #1)"),
    "100-10": ("scripts/ade10.sh:16-23", 4000, 10.0, "KD_WEIGHT 10. (README.md:30 too)"),
    "100-5": ("scripts/ade5.sh:18-25", 2000, 10.0, "KD_WEIGHT 10. (README.md:30 too)"),
    "50-50": (
        (
            "no script at 640496b; ade50.sh before the cleanup (144d911^) trained steps 1-2 for "
            "20000 iterations at 5e-5"
        ),
        20000,
        10.0,
        "README.md:30's 10 (no 50-50 script sets it)",
    ),
}
COMFORMER_TEMPLATE = """\
# CoMFormer (Cermelli et al., CVPR 2023) on ADE20K {setting}, as {script} trains it.
# Cited files are in github.com/fcdl94/CoMFormer (commit {commit}) and its base config
# configs/ade20k/semantic-segmentation/maskformer2_R101_bs16_90k.yaml (Mask2Former's, with
# Base-ADE20K-SemanticSegmentation.yaml: MAX_ITER 160000 despite the name, AdamW, weight decay
# 0.05, BACKBONE_MULTIPLIER 0.1, full-model gradient clipping 0.01, poly 0.9, AMP); written by
# tools/make_configs.py. Step 0 has no script at {commit}: the maintainer's answer in issue #1
# trains it with the config's defaults (160k iterations, LR 1e-4). Its "mIoU" counts class 0
# (incseg's "w/ bg" column, docs/protocol.md "The query-based papers' two evaluations").
name: ade-{setting}-comformer
data:
  dataset: ade
  root: data/ade
  pipeline: comformer     # the semantic mapper (INPUT keys of the base yaml) and the test
  crop_size: 512          # at short side 512 (MIN_SIZE_TEST), whole image (docs/protocol.md)
protocol:
  setting: {setting}
  mode: overlap           # the scripts' "-ov" index files (datasets/mya_{setting}-ov.npy)
  labels: plop            # test: 0 kept, future 0 (continual/data/semantic_wrapper.py:119-129)
model:
  backbone: resnet101     # MODEL.WEIGHTS R-101.pkl, torchvision's weights converted
  pretrained: imagenet
  norm: bn                # NORM SyncBN (maskformer2_R101_bs16_90k.yaml)
  architecture: mask2former
  mask2former:
    mask_activation: softmax  # MODEL.MASK_FORMER.SOFTMASK True (every script)
    background: false     # MASK_BG False: class 0 is void, no class of the head
    inference: comformer  # maskformer_model.py:340-375, thresholds 0.0 (the yaml's TEST keys)
method:
  name: comformer
  kd_weight: {kd}           # {kd_note}
train:
  optimizer: adamw
  weight_decay: 0.05
  clip_grad_norm: 0.01
  iterations: 160000
  iterations_incremental: {iterations}  # SOLVER.MAX_ITER of steps > 0
  batch_size: 16          # IMS_PER_BATCH 16 over 4 GPUs
  lr: 0.0001              # BASE_LR
  lr_incremental: 0.00005  # SOLVER.BASE_LR 5e-5 of steps > 0
  amp: fp16               # SOLVER.AMP.ENABLED True
"""


def _comformer(setting: str) -> str:
    script, iterations, kd, note = COMFORMER_SETTINGS[setting]
    return COMFORMER_TEMPLATE.format(
        setting=setting,
        script=script,
        commit=COMFORMER_COMMIT,
        iterations=iterations,
        kd=kd,
        kd_note=note,
    )


BALCONPAS_COMMIT = "3b76142"
# setting -> (script, iterations per step > 0)
BALCONPAS_SETTINGS = {
    "100-50": ("scripts/sem_100-50.sh:4-5", 50000),
    "100-10": ("scripts/sem_100-10.sh:4-6", 10000),
    "100-5": ("scripts/sem_100-5.sh:4-6", 5000),
    "50-50": ("scripts/sem_50-50.sh:4-6", 50000),
}
BALCONPAS_TEMPLATE = """\
# BalConpas{variant} (Chen et al., ECCV 2024) on ADE20K {setting},
# {how}.
# Cited files are in github.com/jinpeng0528/BalConpas (commit {commit}):
# configs/ade20k/semantic-segmentation/continual_maskformer2_R101_bs8_160k.yaml on
# maskformer2_R101_bs16_160k.yaml and Base-ADE20K-SemanticSegmentation.yaml (AdamW, weight decay
# 0.05, BACKBONE_MULTIPLIER 0.1, full-model gradient clipping 0.01, poly 0.9, AMP); written by
# tools/make_configs.py. Its backbone weights are detectron2's MSRA R-101.pkl (caffe, BGR)
# loaded with torchvision's mean and std; incseg has torchvision's R-101 (docs/methods.md,
# "balconpas"). Evaluation as its continual/evaluator.py: ADE20K's 0 and classes not yet seen
# ignored, labels at their size (the "all" column; docs/protocol.md).
name: ade-{setting}-balconpas{suffix}
data:
  dataset: ade
  root: data/ade
  pipeline: mask2former   # the semantic mapper; test at short side 512, labels at their size
  crop_size: 512
protocol:
  setting: {setting}
  mode: overlap           # CONT.SETTING overlapped
  labels: mib             # 0 void (datasets/prepare_ade20k_sem_seg.py:15), unseen ignored at test
model:
  backbone: resnet101
  pretrained: imagenet
  norm: bn                # RESNETS.NORM BN (maskformer2_R101_bs16_160k.yaml:10)
  architecture: mask2former
  mask2former:
    background: false     # 150 classes and no-object; 0 is void
method:
  name: balconpas
  med_tokens_weight: 5.0  # CONT.MED_TOKENS_WEIGHT (continual_maskformer2_R101_bs8_160k.yaml:13)
  memory_size: {memory}{memory_note}
train:
  optimizer: adamw
  weight_decay: 0.05
  clip_grad_norm: 0.01
  iterations: 160000      # step 1 of the script
  iterations_incremental: {iterations}
  batch_size: 8           # IMS_PER_BATCH 8
  lr: 0.0001              # BASE_LR
  lr_incremental: 0.00005  # SOLVER.BASE_LR of the later steps
  amp: fp16               # SOLVER.AMP.ENABLED True
"""


def _balconpas(setting: str, replay: bool) -> str:
    script, iterations = BALCONPAS_SETTINGS[setting]
    how = (
        f"as {script} trains it (CONT.MEMORY True: 300 replayed images)"
        if replay
        else f"without replay: {script}'s recipe with CONT.MEMORY False (no script runs it)"
    )
    return BALCONPAS_TEMPLATE.format(
        setting=setting,
        script=script,
        commit=BALCONPAS_COMMIT,
        iterations=iterations,
        variant="-R" if replay else "",
        how=how,
        suffix="-m" if replay else "",
        memory=300 if replay else 0,
        memory_note="  # memory_selection_sem.py:102" if replay else "",
    )


ECLIPSE_COMMIT = "9266720"
# setting -> (script, iterations per step > 0, prompts per step, training deltas, evaluation
# deltas), script/ade_ss/*.sh lines 43-86
ECLIPSE_SETTINGS = {
    "100-50": ("script/ade_ss/100_50.sh", 120000, 50, "[-0.3, -0.6]", "[0.0, -0.1]"),
    "100-10": ("script/ade_ss/100_10.sh", 24000, 10, "[0.1" + ", 0.7" * 5 + "]", "the same"),
    "100-5": ("script/ade_ss/100_5.sh", 12000, 5, "[0.1" + ", 0.8" * 10 + "]", "the same"),
}
ECLIPSE_TEMPLATE = """\
# ECLIPSE (Kim et al., CVPR 2024) on ADE20K {setting}, as {script} trains it (step 0 at lines
# 14-37, commented out there: the release's step-0 weights, ade_ss_100_step0.pth, start the later
# steps). Cited files are in github.com/clovaai/ECLIPSE (commit {commit}) and its base config
# configs/ade20k/semantic-segmentation/maskformer2_R101_bs16_90k.yaml (CoMFormer's: 160k
# iterations, AdamW 0.05, BACKBONE_MULTIPLIER 0.1, clipping 0.01, poly 0.9, AMP); written by
# tools/make_configs.py. Deltas of the logit manipulation: the script trains (and validates)
# with {train_deltas} and evaluates the final model with {eval_deltas} (lines 63 and 80-86);
# the config keeps the training ones (the deltas act at inference only: training is the same;
# setting the evaluation ones evaluates as the script's last lines). Evaluation as CoMFormer's
# (labels resized with the image, class 0 kept; docs/protocol.md). No published number: the
# README gives weights, not ADE20K semantic figures.
name: ade-{setting}-eclipse
data:
  dataset: ade
  root: data/ade
  pipeline: comformer     # DatasetMapper(cfg, False) at test (train_inc.py:440)
  crop_size: 512
protocol:
  setting: {setting}
  mode: overlap           # CONT.MODE overlap
  labels: plop            # CoMFormer's evaluator (continual/evaluation/continual_evaluation.py)
model:
  backbone: resnet101
  pretrained: imagenet
  norm: bn                # NORM SyncBN
  architecture: mask2former
  mask2former:
    background: false     # MASK_BG False
    inference: eclipse    # SOFTCLS False, SOFTMASK False (maskformer_model.py:372-420)
    class_head: mlp       # CONT.DEEP_CLS True
    prompts: {prompts}           # CONT.NUM_PROMPTS of steps > 0
    logit_deltas: {train_deltas}  # CONT.LOGIT_MANI_DELTAS of training
method:
  name: eclipse
  class_weight: 2.0       # MODEL.MASK_FORMER.CLASS_WEIGHT of step 0
  class_weight_incremental: 10.0  # of steps > 0
train:
  optimizer: adamw
  weight_decay: 0.05
  clip_grad_norm: 0.01
  iterations: 160000
  iterations_incremental: {iterations}
  batch_size: 16          # IMS_PER_BATCH 16
  lr: 0.0001              # base_lr of step 0
  lr_incremental: 0.001   # base_lr of steps > 0
  amp: fp16               # SOLVER.AMP.ENABLED True
"""


def _eclipse(setting: str) -> str:
    script, iterations, prompts, train_deltas, eval_deltas = ECLIPSE_SETTINGS[setting]
    return ECLIPSE_TEMPLATE.format(
        setting=setting,
        script=script,
        commit=ECLIPSE_COMMIT,
        iterations=iterations,
        prompts=prompts,
        train_deltas=train_deltas,
        eval_deltas=eval_deltas,
    )


SIMCIS_COMMIT = "28bc91e"
# setting -> (config, script, iterations per step > 0, CONT.VQ_NUMBER, CONT.DISTRIBUTION_ALPHA,
# CONT.KD_DECODER, CONT.KD_TEMPERATURE2): configs/ade20k/semantic-segmentation/{setting}.yaml
# and scripts/sem_{setting}.sh (SOLVER.STEPS at 0.85 and 0.95 of the iterations in all three)
SIMCIS_SETTINGS = {
    "100-50": ("100-50.yaml", "scripts/sem_100-50.sh:4-8", 50000, 1, 0.25, "false", 2.0),
    "100-10": ("100-10.yaml", "scripts/sem_100-10.sh:13-16", 10000, 1, 0.5, "true", 4.0),
    "100-5": ("100-5.yaml", "scripts/sem_100-5.sh:16-19", 5000, 3, 0.5, "true", 2.0),
}
SIMCIS_TEMPLATE = """\
# SimCIS (Zhu et al., CVPR 2025) on ADE20K {setting}, as {script} trains the steps after the
# first (a collection pass at LR 0, then the step; step 0's command is not in the scripts: the
# release's weights start the later steps). Cited files are in github.com/SooLab/SimCIS (commit
# {commit}): configs/ade20k/semantic-segmentation/{config} on
# continual_maskformer2_R101_bs8_160k.yaml, maskformer2_R101_bs16_160k.yaml and
# Base-ADE20K-SemanticSegmentation.yaml (AdamW, weight decay 0.05, BACKBONE_MULTIPLIER 0.1,
# full-model gradient clipping 0.01, WarmupMultiStepLR without warmup, AMP); written by
# tools/make_configs.py. The LR drops 10x at 0.85 and 0.95 of every step (SOLVER.STEPS of the
# setting's config; Base's 135k and 150k of 160k for step 0, about the same fractions).
# Evaluation as its continual/evaluator.py: ADE20K's 0 and classes not yet seen ignored, labels
# at their size, pixels the model leaves unpainted left out (docs/methods.md, "simcis").
name: ade-{setting}-simcis
data:
  dataset: ade
  root: data/ade
  pipeline: mask2former   # the continual semantic mapper; test at short side 512
  crop_size: 512
protocol:
  setting: {setting}
  mode: overlap           # CONT.SETTING overlapped
  labels: mib             # 0 void, unseen ignored at test (continual/evaluator.py:75-79)
model:
  backbone: resnet101
  pretrained: imagenet
  norm: frozen_bn         # RESNETS.NORM FrozenBN (maskformer2_R101_bs16_160k.yaml:11)
  architecture: mask2former
  mask2former:
    background: false     # 150 classes, 0 is void
    decoder: selection    # the query-selection decoder (mask2former_transformer_decoder.py)
    class_head: static    # nn.Linear(hidden_dim, 150) from step 0 on
    inference: simcis     # maskformer_model.py:551-591
method:
  name: simcis
  kl_weight: 2.0          # CONT.KL_WEIGHT
  kd_temperature: 1.0     # CONT.KD_TEMPERATURE
  kd_temperature_decoder: {t2}  # CONT.KD_TEMPERATURE2
  kd_decoder: {kd_decoder}       # CONT.KD_DECODER
  kl_all: true            # CONT.KL_ALL
  virtual_queries: {vq}      # CONT.VQ_NUMBER
  distribution_alpha: {alpha}  # CONT.DISTRIBUTION_ALPHA
  bank_size: 80           # CONT.LIB_SIZE
  overlap_threshold: 0.8  # CONT.PSD_OVERLAP_THRESHOLD
train:
  optimizer: adamw
  weight_decay: 0.05
  clip_grad_norm: 0.01
  iterations: 160000      # SOLVER.MAX_ITER of step 0
  iterations_incremental: {iterations}
  batch_size: 8           # IMS_PER_BATCH 8 (4 GPUs in the scripts)
  lr: 0.0001              # BASE_LR
  lr_incremental: 0.00005  # SOLVER.BASE_LR of the scripts' steps
  lr_power: 0.0
  lr_decay_at: [0.85, 0.95]
  amp: fp16               # SOLVER.AMP.ENABLED True
"""


def _simcis(setting: str) -> str:
    config, script, iterations, vq, alpha, kd_decoder, t2 = SIMCIS_SETTINGS[setting]
    return SIMCIS_TEMPLATE.format(
        setting=setting,
        config=config,
        script=script,
        commit=SIMCIS_COMMIT,
        iterations=iterations,
        vq=vq,
        alpha=alpha,
        kd_decoder=kd_decoder,
        t2=t2,
    )


def main() -> None:
    jobs = [
        ("voc", s, mode, m)
        for s, methods in VOC.items()
        for mode in ("disjoint", "overlap")
        for m in methods
    ]
    jobs += [("ade", s, "overlap", m) for s, methods in ADE.items() for m in methods]
    jobs += [("voc", "offline", "overlap", "ft"), ("ade", "offline", "overlap", "ft")]
    for dataset, setting, mode, method in jobs:
        cfg = _paper(dataset, setting, mode, method)
        folder = OUT / dataset
        folder.mkdir(exist_ok=True)
        stem = cfg["name"][len(dataset) + 1 :]
        (folder / f"{stem}.yaml").write_text(PAPER_HEADER + yaml.safe_dump(cfg, sort_keys=False))
    (OUT / "seed").mkdir(exist_ok=True)
    for name, miou in SEED_MIOU.items():
        (OUT / "seed" / f"{name}.yaml").write_text(_seed(name, miou))
    for setting in PLOP_VOC:
        (OUT / "voc" / f"{setting}-overlap-plop.yaml").write_text(_plop("voc", setting))
    for setting in PLOP_ADE:
        (OUT / "ade" / f"{setting}-plop.yaml").write_text(_plop("ade", setting))
    for name in CSSEG_PLOP:
        (OUT / "seed" / f"{name}.yaml").write_text(_csseg_plop(name))
    written = _write_successors()
    print(
        f"wrote {len(jobs)} paper configs, {len(SEED_MIOU)} seed configs, "
        f"{len(PLOP_VOC) + len(PLOP_ADE) + len(CSSEG_PLOP)} PLOP configs and {written} configs "
        f"of later methods under {OUT}"
    )


def _official_successors() -> dict[Path, str]:
    """Configs from the official scripts of EWF, NeST, UCD, REMINDER, RCIL, SSUL, DKD, STAR
    and CoMFormer."""
    files: dict[Path, str] = {}
    for setting in EWF_VOC:
        for method in ("mib", "plop"):
            text = _ewf("voc", setting, method)
            files[OUT / "voc" / f"{setting}-overlap-{method}+ewf.yaml"] = text
    for setting in EWF_ADE:
        files[OUT / "ade" / f"{setting}-mib+ewf.yaml"] = _ewf("ade", setting, "mib")
    for setting, mode in itertools.product(UCD_PAPER, ("disjoint", "overlap")):
        text = UCD_TEMPLATE.format(setting=setting, mode=mode)
        files[OUT / "voc" / f"{setting}-{mode}-mib+ucd.yaml"] = text
    for (dataset, setting), method in itertools.product(NEST_SCRIPTS, ("mib", "plop")):
        voc = dataset == "voc"
        stem = f"{setting}-overlap-{method}+nest" if voc else f"{setting}-{method}+nest"
        files[OUT / dataset / f"{stem}.yaml"] = _nest(dataset, setting, method)
    for dataset, setting in REMINDER_SCRIPTS:
        stem = f"{setting}-overlap-reminder" if dataset == "voc" else f"{setting}-reminder"
        files[OUT / dataset / f"{stem}.yaml"] = _reminder(dataset, setting)
    for dataset, setting, mode in RCIL_SCRIPTS:
        stem = f"{setting}-{mode}-rcil" if dataset == "voc" else f"{setting}-rcil"
        files[OUT / dataset / f"{stem}.yaml"] = _rcil(dataset, setting, mode)
    for (dataset, settings), memory in itertools.product(SSUL_SETTINGS.items(), (False, True)):
        for setting in settings:
            title = "ssul-m" if memory else "ssul"
            stem = f"{setting}-overlap-{title}" if dataset == "voc" else f"{setting}-{title}"
            files[OUT / dataset / f"{stem}.yaml"] = _ssul(dataset, setting, memory)
    for (dataset, setting, mode), memory in itertools.product(DKD_SETTINGS, (False, True)):
        title = "dkd-m" if memory else "dkd"
        stem = f"{setting}-{mode}-{title}" if dataset == "voc" else f"{setting}-{title}"
        files[OUT / dataset / f"{stem}.yaml"] = _dkd(dataset, setting, mode, memory)
    for (dataset, setting, mode), memory in itertools.product(STAR_SETTINGS, (False, True)):
        title = "star-m" if memory else "star"
        stem = f"{setting}-{mode}-{title}" if dataset == "voc" else f"{setting}-{title}"
        files[OUT / dataset / f"{stem}.yaml"] = _star(dataset, setting, mode, memory)
    return files | _query_based()


def _query_based() -> dict[Path, str]:
    """Configs of the query-based methods (Mask2Former), from their official scripts."""
    files = {
        OUT / "ade" / f"{setting}-comformer.yaml": _comformer(setting)
        for setting in COMFORMER_SETTINGS
    }
    for setting in ECLIPSE_SETTINGS:
        files[OUT / "ade" / f"{setting}-eclipse.yaml"] = _eclipse(setting)
    for setting in BALCONPAS_SETTINGS:
        files[OUT / "ade" / f"{setting}-balconpas.yaml"] = _balconpas(setting, replay=False)
        files[OUT / "ade" / f"{setting}-balconpas-m.yaml"] = _balconpas(setting, replay=True)
    for setting in SIMCIS_SETTINGS:
        files[OUT / "ade" / f"{setting}-simcis.yaml"] = _simcis(setting)
    return files


def _write_successors() -> int:
    """The configs of the methods after PLOP, and cssegmentation's ILT, MiB+UCD and RCIL
    recipes; returns how many."""
    from incseg.configs import PUBLISHED

    files = _official_successors()
    for stem, family in itertools.product(CSSEG_STEMS, CSSEG_TITLES):
        name = f"{family}_r101iabnd16_aspp_512x512_{stem}"
        zoo = PUBLISHED.get(f"seed/{name}", (None,))[0]
        files[OUT / "seed" / f"{name}.yaml"] = _csseg_method(family, stem, zoo)
    for path, text in files.items():
        path.write_text(text)
    return len(files)


if __name__ == "__main__":
    main()
