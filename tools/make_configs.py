"""Write the built-in reproduction configs under src/incseg/configs/ (run by maintainers).

    python tools/make_configs.py

- ``voc/`` and ``ade/``: the MiB paper's rows. Each file lists only what differs from the
  defaults (which are already the paper's training setting, SPEC section 7): dataset and root,
  test crop 512, In-Place ABN's ImageNet weights, setting, mode, method (MiB's KD weight 100 for
  VOC 15-1 and 10-1; 60 epochs on ADE20K). ADE20K rows train on MiB's shipped partition, its
  disjoint mode (split_source: official); 100-5, which MiB does not ship, uses the overlap rule.
- ``seed/``: the seed table's rows (cssegmentation's MiB model zoo), with cssegmentation's
  recipe; every departure from the paper is a commented key.
"""

from __future__ import annotations

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
        cfg["protocol"] = {"setting": setting, "mode": "disjoint" if official else "overlap",
                           "split_source": "official" if official else "rule"}  # fmt: skip
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
        family="VOC" if dataset == "voc" else "ADE20K", setting=setting,
        mode_word="overlapped" if mode == "overlap" else mode, name=name, dataset=dataset, mode=mode,
        reported=f"mIoU {miou}%" if miou is not None else "no number reported",
        source=f"configs/mib/{name}.py" if dataset == "voc" else "its VOC configs (no ADE20K MiB config is shipped)",
        test_note="; under overlap that is the default selection" if mode == "overlap" else "",
        kd=kd, kd_note="; 100 in the 15-1 and 10-1 configs" if kd == 10 else "; set to 100 in this config",
        epochs=epochs,
    )  # fmt: skip


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
    print(f"wrote {len(jobs)} paper configs and {len(SEED_MIOU)} seed configs under {OUT}")


if __name__ == "__main__":
    main()
