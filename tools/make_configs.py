"""Write the paper-reproduction configs under src/incseg/configs/{voc,ade}/ (run by maintainers).

    python tools/make_configs.py

Each file lists only what differs from the defaults (which are already the paper's training
setting, SPEC section 7): dataset and root, test crop 512, ImageNet weights, setting, mode, method
(and MiB's KD weight 100 for VOC 15-1 and 10-1; 60 epochs on ADE20K).
"""

from __future__ import annotations

from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "src" / "incseg" / "configs"
TABLE1 = ["ft", "pi", "ewc", "rw", "lwf", "lwf_mc", "ilt", "mib"]  # MiB paper, Table 1 (VOC)
ADE_TABLE = ["ft", "lwf", "lwf_mc", "ilt", "mib"]  # MiB paper, ADE20K tables
VOC = {"19-1": TABLE1, "15-5": TABLE1, "15-1": TABLE1, "10-1": ["mib"]}
ADE = {"100-50": ADE_TABLE, "100-10": ADE_TABLE, "50-50": ADE_TABLE, "100-5": ["mib"]}


def _config(dataset: str, setting: str, mode: str, method: str) -> dict:
    name = f"{dataset}-{setting}-{mode}-{method}" if dataset == "voc" else f"{dataset}-{setting}-{method}"
    cfg = {
        "name": name,
        "data": {"dataset": dataset, "root": f"data/{dataset}", "test_crop": 512},
        "protocol": {"setting": setting, "mode": mode},
        "model": {"pretrained": "imagenet"},
        "method": {"name": method},
    }
    if method == "mib" and dataset == "voc" and setting in ("15-1", "10-1"):
        cfg["method"]["kd_weight"] = 100
    if dataset == "ade":
        cfg["train"] = {"epochs": 60}
    if setting == "offline":
        cfg["name"] = f"{dataset}-joint"
        cfg["method"] = {"name": "ft"}
    return cfg


def main() -> None:
    header = "# Paper reproduction config (written by tools/make_configs.py); only differences from the defaults.\n"
    jobs = [("voc", s, mode, m) for s, methods in VOC.items() for mode in ("disjoint", "overlap") for m in methods]
    jobs += [("ade", s, "overlap", m) for s, methods in ADE.items() for m in methods]
    jobs += [("voc", "offline", "overlap", "ft"), ("ade", "offline", "overlap", "ft")]
    for dataset, setting, mode, method in jobs:
        cfg = _config(dataset, setting, mode, method)
        folder = OUT / dataset
        folder.mkdir(exist_ok=True)
        stem = cfg["name"][len(dataset) + 1 :]
        (folder / f"{stem}.yaml").write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    print(f"wrote {len(jobs)} configs under {OUT}")


if __name__ == "__main__":
    main()
