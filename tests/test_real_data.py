"""Real VOC / ADE20K fixtures (tests/fixtures, see PROVENANCE.md): layouts, decoding, class index,
official splits, selection and remapping of named images, data check, a VOC run end to end."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import ADE_ROOT, VOC_ROOT

from incseg.cli import main
from incseg.data import build_source, files
from incseg.data.layouts import ade_pairs, voc_pairs
from incseg.errors import ConfigError, DataError
from incseg.protocol import get_setting, make_lut, remap, select_train, step_info
from incseg.protocol.official import official_split, select_listed, uses_official

VOC2012 = VOC_ROOT / "VOCdevkit" / "VOC2012"
# Class sets (0 and 255 excluded) of named fixture images, from the shared sample's image_classes.tsv.
CLASSES = {
    "2007_000904": {10, 13, 15},  # cow, horse, person
    "2007_004166": {9, 11, 12, 18, 20},  # chair, diningtable, dog, sofa, tvmonitor
    "2007_003190": {17},  # sheep
    "2008_004006": {8, 20},  # cat, tvmonitor (SBD label: no 255 border)
    "2009_001778": {6, 12, 15},  # bus, dog, person
}


def _voc_source(split="train"):
    pairs = voc_pairs(VOC_ROOT, split)
    return files.FileSource(
        pairs.names, pairs.images, pairs.labels, tag=f"voc-{split}", progress=False
    )


def test_palette_labels_decode_to_class_ids():
    label = files.read_label(VOC2012 / "SegmentationClassAug" / "2007_000904.png")
    assert label.dtype == np.uint8 and label.shape == (375, 500)
    assert set(np.unique(label).tolist()) == {0, 10, 13, 15, 255}
    sbd = files.read_label(VOC2012 / "SegmentationClassAug" / "2008_004006.png")
    assert set(np.unique(sbd).tolist()) == {0, 8, 20}
    image, lab = _voc_source().load(0)
    assert image.dtype == torch.uint8 and image.shape[0] == 3 and image.shape[1:] == lab.shape


def test_class_index_matches_named_images_and_is_cached(monkeypatch):
    source = _voc_source()
    presence = source.presence()
    assert presence.shape == (12, 256)
    for name, classes in CLASSES.items():
        row = presence[source.names.index(name)]
        assert set(np.flatnonzero(row).tolist()) - {0, 255} == classes
    monkeypatch.setattr(files, "scan_labels", lambda *a, **k: pytest.fail("cache not used"))
    np.testing.assert_array_equal(_voc_source().presence(), presence)


def test_class_index_cache_follows_label_changes(tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(VOC_ROOT, root)
    pairs = voc_pairs(root, "train")
    key = files.index_key(pairs.labels)
    path = pairs.labels[0]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert files.index_key(pairs.labels) != key


def _mib_layout(tmp_path):
    """The official MiB code's layout, built from the fixture files."""
    root = tmp_path / "data" / "PascalVOC12"
    shutil.copytree(VOC2012 / "JPEGImages", root / "JPEGImages")
    shutil.copytree(VOC2012 / "SegmentationClassAug", root / "SegmentationClassAug")
    (root / "splits").mkdir()
    for name in ("train_aug", "val"):
        ids = (VOC2012 / "ImageSets" / "Segmentation" / f"{name}.txt").read_text().split()
        lines = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in reversed(ids)]
        (root / "splits" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "data"


def test_both_voc_layouts_give_the_same_pairs(tmp_path):
    mib_root = _mib_layout(tmp_path)
    for split in ("train", "test"):
        devkit, mib = voc_pairs(VOC_ROOT, split), voc_pairs(mib_root, split)
        assert (devkit.layout, mib.layout) == ("vocdevkit", "mib")
        assert devkit.names == mib.names == sorted(devkit.names)
        assert [p.name for p in devkit.labels] == [p.name for p in mib.labels]
    assert (
        len(voc_pairs(mib_root, "train").names) == 12
        and len(voc_pairs(mib_root, "test").names) == 6
    )
    (mib_root / "PascalVOC12" / "splits" / "val.txt").write_text("/JPEGImages/x.jpg\n")
    with pytest.raises(
        DataError, match=r"val.txt:1: expected '/JPEGImages/x.jpg /SegmentationClassAug/x.png'"
    ):
        voc_pairs(mib_root, "test")


def test_missing_root_and_files_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        voc_pairs(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="no Pascal VOC dataset found"):
        voc_pairs(tmp_path, "train")
    root = tmp_path / "voc"
    shutil.copytree(VOC_ROOT, root)
    (root / "VOCdevkit" / "VOC2012" / "SegmentationClassAug" / "2007_003190.png").unlink()
    pairs = voc_pairs(root, "train")
    with pytest.raises(
        DataError, match=r"1 file\(s\) of the voc-train list are missing, e.g. .*2007_003190.png"
    ):
        files.FileSource(pairs.names, pairs.images, pairs.labels, tag="voc-train")


@pytest.mark.parametrize(
    ("setting", "mode", "step", "selected"),
    [
        ("15-5", "disjoint", 0, {"2007_000904", "2009_001778"}),  # 2007_004166 has future sofa/tv
        ("15-5", "overlap", 0, {"2007_000904", "2007_004166", "2008_004006", "2009_001778"}),
        ("15-5", "overlap", 1, {"2007_004166", "2007_003190", "2008_004006"}),
        ("15-5", "disjoint", 1, {"2007_004166", "2007_003190", "2008_004006"}),
        ("15-1", "disjoint", 2, {"2007_003190"}),  # sheep, step 2
        ("15-1", "overlap", 3, {"2007_004166"}),  # sofa appears with the future tvmonitor
        ("15-1", "disjoint", 3, set()),
        ("19-1", "disjoint", 1, {"2007_004166", "2008_004006"}),
    ],
)
def test_selection_of_named_images(setting, mode, step, selected):
    source = _voc_source()
    info = step_info(get_setting("voc", setting), step)
    chosen = {source.names[i] for i in select_train(source.presence(), info, mode)}
    assert chosen & set(CLASSES) == selected


def test_remapping_of_a_named_image():
    label = files.read_label(VOC2012 / "SegmentationClassAug" / "2007_004166.png")
    values = lambda a: set(np.unique(a).tolist())
    info = step_info(get_setting("voc", "15-5"), 1)
    train = remap(torch.from_numpy(label), make_lut(info, "train"))
    assert values(train) == {
        0,
        18,
        20,
    }  # old chair/table/dog and void -> 0; sofa, tv keep their idx
    info0 = step_info(get_setting("voc", "15-5"), 0)
    test0 = remap(torch.from_numpy(label), make_lut(info0, "test"))
    assert values(test0) == {0, 9, 11, 12, 255}  # future sofa/tv -> 255 at test
    assert (test0[torch.from_numpy(label) == 18] == 255).all()
    info3 = step_info(get_setting("voc", "15-1"), 3)  # order 0..15, 16, 17, 18: sofa = channel 18
    plop = remap(torch.from_numpy(label), make_lut(info3, "train", "plop"))
    assert values(plop) == {0, 18, 255}  # PLOP keeps void, future tv -> 0


SPEC_COUNTS = {
    ("voc", "19-1", "disjoint"): [10034, 548],
    ("voc", "19-1", "overlap"): [10410, 548],
    ("voc", "15-5", "disjoint"): [8437, 2145],
    ("voc", "15-5", "overlap"): [9568, 2145],
    ("voc", "15-1", "disjoint"): [8437, 378, 299, 420, 500, 548],
    ("voc", "15-1", "overlap"): [9568, 487, 299, 491, 500, 548],
    ("ade", "100-50", "disjoint"): [13452, 6744],
    ("ade", "100-10", "disjoint"): [13452, 1130, 1200, 1366, 1550, 1498],
    ("ade", "50-50", "disjoint"): [8219, 6384, 5593],
    ("ade", "100-50b", "disjoint"): [10375, 9821],
    ("ade", "100-10b", "disjoint"): [10375, 1362, 1346, 2084, 2609, 2420],
    ("ade", "50-50b", "disjoint"): [6659, 7483, 6054],
}


@pytest.mark.parametrize("key", list(SPEC_COUNTS))
def test_shipped_official_lists_have_the_official_counts(key):
    family, setting, mode = key
    steps = official_split(family, setting, mode)
    assert [len(s) for s in steps] == SPEC_COUNTS[key]
    assert len(steps) == get_setting(family, setting).num_steps
    if family == "ade" or mode == "disjoint":  # a partition of the images
        assert len(set().union(*steps)) == sum(SPEC_COUNTS[key])


def test_official_lists_agree_with_rule_on_the_fixture_images():
    source = _voc_source()
    for setting in ("19-1", "15-5", "15-1"):
        for mode in ("disjoint", "overlap"):
            for step, listed in enumerate(official_split("voc", setting, mode)):
                info = step_info(get_setting("voc", setting), step)
                official, _ = select_listed(source.names, listed)
                np.testing.assert_array_equal(official, select_train(source.presence(), info, mode))
    assert "2007_004166" in official_split("voc", "15-5", "overlap")[1]
    assert "2007_004166" not in official_split("voc", "15-5", "disjoint")[0]
    assert "ADE_train_00000001" in set().union(*official_split("ade", "100-50", "disjoint"))


def test_split_source_choices():
    assert uses_official("voc", "15-5", "overlap", "auto")
    assert not uses_official("voc", "10-1", "overlap", "auto")
    assert not uses_official("voc", "15-5", "overlap", "rule")
    with pytest.raises(
        ConfigError, match=r"no official lists for voc 10-1 \(overlap\); shipped: 15-1/disjoint"
    ):
        uses_official("voc", "10-1", "overlap", "official")


def test_ade_official_lists_are_the_disjoint_mode_only():
    """MiB's ADE20K partition means disjoint; overlap and settings without lists never fall back
    to it silently, and official names the valid choices."""
    assert uses_official("ade", "100-50", "disjoint", "official") and uses_official(
        "ade", "100-50", "disjoint", "auto"
    )
    assert not uses_official("ade", "100-50", "overlap", "auto")  # auto: the overlap rule
    assert not uses_official("ade", "100-50", "disjoint", "rule")
    with pytest.raises(
        ConfigError,
        match=r"no official lists for ade 100-50 \(overlap\); shipped: 100-10/disjoint, "
        r".*valid choices here: \['auto', 'rule'\]",
    ):
        uses_official("ade", "100-50", "overlap", "official")
    with pytest.raises(ConfigError, match=r"no official lists for ade 100-5 \(disjoint\)"):
        uses_official("ade", "100-5", "disjoint", "official")
    assert official_split("ade", "100-50", "overlap") is None


def test_ade_fixture_pairs_and_test_remap():
    pairs = ade_pairs(ADE_ROOT, "test")
    assert pairs.names == ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]
    label = files.read_label(pairs.labels[0])
    assert label.max() <= 150 and (label == 0).any()
    info = step_info(get_setting("ade", "100-50"), 0)
    test = remap(torch.from_numpy(label), make_lut(info, "test", ignore_zero_at_test=True))
    assert ((test == 255) == torch.from_numpy((label == 0) | (label > 100))).all()


def _break(root):
    voc = root / "VOCdevkit" / "VOC2012"
    jpg = voc / "JPEGImages" / "2007_000904.jpg"
    jpg.write_bytes(jpg.read_bytes()[:5000])  # truncated JPEG
    from PIL import Image

    lab = voc / "SegmentationClassAug" / "2007_003190.png"
    with Image.open(lab) as img:
        arr = np.asarray(img).copy()
        arr[0, 0] = 42
        out = Image.fromarray(arr, mode="P")
        out.putpalette(img.getpalette())
    out.save(lab)
    (voc / "SegmentationClassAug" / "2008_004006.png").unlink()  # missing label
    small = voc / "SegmentationClassAug" / "2007_002648.png"
    with Image.open(small) as img:
        img.crop((0, 0, 100, 100)).save(small)  # size mismatch (a val image)


def test_data_check_reports_every_problem(tmp_path, capsys):
    assert main(["data", "check", "voc", "--root", str(VOC_ROOT), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "240 image/step checks, 0 mismatches" in out and "OK: no problems" in out
    assert "   20  tvmonitor                 3      0" in out
    root = tmp_path / "broken"
    shutil.copytree(VOC_ROOT, root)
    _break(root)
    assert main(["data", "check", "voc", "--root", str(root), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "4 problem(s) found" in err
    assert "2007_000904.jpg: unreadable or truncated image" in err
    assert "2007_003190.png: label values [42] outside the class range (0..20 and 255)" in err
    assert "2008_004006.png: missing label of 2008_004006" in err
    assert "2007_002648.png: label size (100, 100) differs from image" in err


def test_data_check_ade_and_bad_root(tmp_path, capsys):
    assert main(["data", "check", "ade", "--root", str(ADE_ROOT), "--no-progress"]) == 0
    assert "  150  flag                      1      0" in capsys.readouterr().out
    root = tmp_path / "ade"
    shutil.copytree(ADE_ROOT, root)
    (root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000002.png").unlink()
    assert main(["data", "check", "ade", "--root", str(root), "--no-progress"]) == 1
    assert "ADE_val_00000002.jpg: no matching image or label" in capsys.readouterr().err
    assert main(["data", "check", "ade", "--root", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_voc_run_end_to_end_on_fixtures(voc_config_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(voc_config_path), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "note: step 1: 2140 of the 2145 images of the official list are not in" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["num_train_images"] for s in metrics["steps"]] == [11, 5]
    assert [s["num_test_images"] for s in metrics["steps"]] == [
        4,
        6,
    ]  # the two sheep-only val images are seen only at step 1
    assert main(["eval", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--full-image", "--no-progress"]) == 0
    assert "Evaluation of" in capsys.readouterr().out

    # predict: palette masks of dataset class ids, overlays side by side
    from PIL import Image

    images = [VOC2012 / "JPEGImages" / f"{i}.jpg" for i in ("2007_003169", "2009_000039")]
    assert main(["predict", str(out), *map(str, images), "--out", str(tmp_path / "pred")]) == 0
    for image in images:
        with Image.open(tmp_path / "pred" / f"{image.stem}.png") as mask, Image.open(image) as rgb:
            assert mask.mode == "P" and mask.size == rgb.size
            assert set(np.unique(np.array(mask)).tolist()) <= set(range(21))
            assert mask.getpalette()[3 * 8 : 3 * 9] == [64, 0, 0]  # VOC colour of class 8 (cat)
            with Image.open(tmp_path / "pred" / f"{image.stem}_overlay.png") as overlay:
                assert overlay.size == (2 * rgb.size[0], rgb.size[1])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    assert (
        main(["predict", str(out), str(images[0]), str(bad), "--out", str(tmp_path / "pred2")]) == 2
    )
    assert "bad.jpg: not an image file PIL can read" in capsys.readouterr().err
    assert not (tmp_path / "pred2").exists()


def test_full_image_evaluation_uses_batches_of_one(voc_config_path):
    from incseg.config import load_config
    from incseg.engine.loaders import build_test_loader

    config = load_config(voc_config_path, ["data.test_crop=null"])
    source = build_source(config.data, "test", progress=False)
    info = step_info(get_setting("voc", "15-5"), 0)
    loader = build_test_loader(config, source, source.presence(), info)
    assert loader.batch_size == 1
    sizes = {tuple(image.shape[-2:]) for image, _ in loader}
    assert len(sizes) > 1  # full images of different sizes


def test_real_dataset_config_errors(tmp_path, capsys):
    assert main(["run", "--set", "data.dataset=voc", "--out", str(tmp_path / "x")]) == 2
    assert "data.root: required for dataset 'voc'" in capsys.readouterr().err
    args = [
        "run",
        "--set",
        "data.dataset=voc",
        "--set",
        f"data.root={tmp_path / 'none'}",
        "--out",
        str(tmp_path / "y"),
    ]
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err
    voc = [
        "--set",
        "data.dataset=voc",
        "--set",
        f"data.root={VOC_ROOT}",
        "--set",
        "protocol.split_source=official",
    ]
    assert main(["run", *voc, "--set", "protocol.setting=10-1", "--out", str(tmp_path / "z")]) == 2
    assert "no official lists for voc 10-1 (overlap)" in capsys.readouterr().err
    assert (
        main(["run", "--set", "protocol.split_source=official", "--out", str(tmp_path / "w")]) == 2
    )
    assert "no official lists for shapes 15-5 (overlap); shipped: none" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "xyzw")


def test_plop_on_real_voc_images_with_void_kept_in_training(voc_config_path, tmp_path):
    """PLOP's convention (void stays 255 in training) on real VOC labels: the all-pixel cross-entropy,
    the scan and the pseudo-labels run on them; output stride 8 keeps the tiny maps 6 wide at crop 48."""
    out = tmp_path / "run"
    sets = ["method.name=plop", "protocol.labels=plop", "model.output_stride=8"]
    assert (
        main(
            [
                "run",
                str(voc_config_path),
                "--out",
                str(out),
                "--no-progress",
                *(a for s in sets for a in ("--set", s)),
            ]
        )
        == 0
    )
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert [sorted(epoch) for epoch in steps[1]["losses"]] == [["ce", "pod"]]
    assert all(math.isfinite(v) for epoch in steps[1]["losses"] for v in epoch.values())
