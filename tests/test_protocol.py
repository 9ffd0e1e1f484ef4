"""Settings, steps, image selection and label remapping on hand-made inputs (SPEC sections 2-4)."""

import numpy as np
import pytest
import torch

from incseg.errors import ConfigError
from incseg.protocol import (
    build_presence,
    get_setting,
    make_lut,
    remap,
    select_test,
    select_train,
    setting_names,
    step_info,
)


@pytest.mark.parametrize(
    ("family", "name", "sizes"),
    [
        ("voc", "offline", [21]),
        ("voc", "19-1", [20, 1]),
        ("voc", "19-1b", [20, 1]),
        ("voc", "15-5", [16, 5]),
        ("voc", "15-1", [16, 1, 1, 1, 1, 1]),
        ("voc", "15-5s", [16, 1, 1, 1, 1, 1]),
        ("voc", "10-1", [11] + [1] * 10),
        ("voc", "10-5-5", [11, 5, 5]),
        ("voc", "5-3", [6, 3, 3, 3, 3, 3]),
        ("ade", "100-50", [101, 50]),
        ("ade", "100-10", [101] + [10] * 5),
        ("ade", "100-5", [101] + [5] * 10),
        ("ade", "50-50", [51, 50, 50]),
        ("ade", "50", [51, 50, 50]),
        ("ade", "100-50b", [101, 50]),
        ("ade", "100-10c", [101] + [10] * 5),
        ("ade", "50b", [51, 50, 50]),
    ],
)
def test_setting_step_sizes_and_partition(family, name, sizes):
    setting = get_setting(family, name)
    assert [len(s) for s in setting.steps] == sizes
    flat = sorted(c for s in setting.steps for c in s)
    assert flat == list(range(setting.num_classes))
    assert 0 in setting.steps[0]


def test_exact_class_lists():
    assert get_setting("voc", "19-1b").steps[1] == (5,)
    assert get_setting("voc", "10-5-5").steps[1] == (11, 12, 13, 14, 15)
    assert get_setting("voc", "5-3").steps[-1] == (18, 19, 20)
    assert get_setting("ade", "100-10").steps[3] == tuple(range(121, 131))
    assert get_setting("ade", "100-5").steps[10] == tuple(range(146, 151))
    assert get_setting("ade", "100-10b").steps[1] == (11, 16, 50, 64, 66, 73, 89, 92, 145, 146)
    assert get_setting("voc", "15-5s").name == "15-1"
    assert get_setting("ade", "offline").class_names[:3] == ("other", "wall", "building")
    assert len(get_setting("ade", "offline").class_names) == 151


def test_unknown_setting_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        get_setting("voc", "15-6")
    for name in setting_names("voc"):
        assert name in str(err.value)
    assert "15-5s" in str(err.value)


def test_step_info_channels():
    info = step_info(get_setting("voc", "15-1"), 2)
    assert info.new_classes == (17,)
    assert info.old_classes == tuple(range(1, 17))
    assert info.future_classes == (18, 19, 20)
    assert info.order == tuple(range(18))
    assert info.channels_per_step == (16, 1, 1)
    assert info.num_old_channels == 17 and info.num_channels == 18
    assert info.class_names[-1] == "sheep"
    shuffled = step_info(get_setting("ade", "100-10b"), 1)
    assert shuffled.order[101:] == (11, 16, 50, 64, 66, 73, 89, 92, 145, 146)
    with pytest.raises(ConfigError, match=r"valid steps are 0\.\.5"):
        step_info(get_setting("voc", "15-1"), 6)


def _masks(class_sets):
    """One 4x4 mask per class set; a void border pixel in each, background elsewhere."""
    masks = []
    for classes in class_sets:
        mask = np.zeros((4, 4), np.uint8)
        mask[0, 0] = 255
        for k, c in enumerate(classes):
            mask.flat[k + 1] = c
        masks.append(mask)
    return build_presence(masks)


# images: 0 {1}, 1 {16}, 2 {1, 16}, 3 {16, 17}, 4 {17}, 5 {} (background only), 6 {15, 20}
PRESENCE = _masks([(1,), (16,), (1, 16), (16, 17), (17,), (), (15, 20)])


def test_selection_15_5():
    setting = get_setting("voc", "15-5")
    step0, step1 = step_info(setting, 0), step_info(setting, 1)
    assert select_train(PRESENCE, step0, "overlap").tolist() == [0, 2, 6]
    assert select_train(PRESENCE, step0, "disjoint").tolist() == [0]
    assert select_train(PRESENCE, step1, "overlap").tolist() == [1, 2, 3, 4, 6]
    assert select_train(PRESENCE, step1, "disjoint").tolist() == [1, 2, 3, 4, 6]
    assert select_test(PRESENCE, step0).tolist() == [0, 2, 6]
    assert select_test(PRESENCE, step1).tolist() == [0, 1, 2, 3, 4, 6]
    # cssegmentation's test filter (test_selection: mode): disjoint also drops unseen classes
    assert select_test(PRESENCE, step0, "disjoint").tolist() == [0]
    assert select_test(PRESENCE, step0, "overlap").tolist() == [0, 2, 6]
    assert select_test(PRESENCE, step1, "disjoint").tolist() == [0, 1, 2, 3, 4, 6]


def test_selection_15_1_disjoint_excludes_future_classes():
    setting = get_setting("voc", "15-1")
    step1 = step_info(setting, 1)  # new = {16}, future = {17..20}
    assert select_train(PRESENCE, step1, "disjoint").tolist() == [1, 2]
    assert select_train(PRESENCE, step1, "overlap").tolist() == [1, 2, 3]
    step2 = step_info(setting, 2)  # new = {17}
    assert select_train(PRESENCE, step2, "disjoint").tolist() == [3, 4]
    with pytest.raises(ConfigError, match="disjoint"):
        select_train(PRESENCE, step2, "overlapping")


def test_disjoint_steps_partition_the_images():
    rng = np.random.default_rng(0)
    masks = [rng.choice(21, size=(3, 3)).astype(np.uint8) for _ in range(300)]
    presence = build_presence(masks)
    setting = get_setting("voc", "15-1")
    chosen = np.concatenate(
        [
            select_train(presence, step_info(setting, t), "disjoint")
            for t in range(setting.num_steps)
        ]
    )
    has_object = presence[:, 1:21].any(axis=1)
    assert sorted(chosen.tolist()) == np.flatnonzero(has_object).tolist()


LABEL = torch.tensor([[0, 1, 16, 17], [255, 15, 20, 0]], dtype=torch.uint8)


def test_remap_mib_convention():
    info = step_info(get_setting("voc", "15-1"), 1)  # order 0..16; 17..20 are future
    train = remap(LABEL, make_lut(info, "train"))
    assert train.tolist() == [[0, 0, 16, 0], [0, 0, 0, 0]]
    test = remap(LABEL, make_lut(info, "test"))
    assert test.tolist() == [[0, 1, 16, 255], [255, 15, 255, 0]]
    val = remap(LABEL, make_lut(info, "val"))
    assert val.tolist() == [[0, 255, 16, 255], [255, 255, 255, 0]]
    assert train.dtype == torch.uint8 and LABEL[0, 1] == 1  # input untouched


def test_remap_plop_convention():
    info = step_info(get_setting("voc", "15-1"), 1)
    train = remap(LABEL, make_lut(info, "train", "plop"))
    assert train.tolist() == [[0, 0, 16, 0], [255, 0, 0, 0]]
    test = remap(LABEL, make_lut(info, "test", "plop"))
    assert test.tolist() == [[0, 1, 16, 0], [255, 15, 0, 0]]


def test_remap_shuffled_order_and_ade_zero():
    info = step_info(get_setting("ade", "100-10b"), 1)
    label = torch.tensor([[0, 11, 2, 1, 146, 255]], dtype=torch.uint8)
    # 2 is a future class at step 1 of order b; 1 is old (channel 1); 11 is the first new class.
    lut = make_lut(info, "test", ignore_zero_at_test=True)
    assert remap(label, lut).tolist() == [[255, 101, 255, 1, 110, 255]]
    assert remap(label, make_lut(info, "train", ignore_zero_at_test=True)).tolist() == [
        [0, 101, 0, 0, 110, 0]
    ]
    with pytest.raises(ConfigError, match="mib"):
        make_lut(info, "train", "cil")


def test_packed_selection_equals_a_python_scan_on_random_indexes():
    from incseg.protocol.selection import pack_presence

    rng = np.random.default_rng(3)
    presence = rng.random((300, 256)) < 0.03
    presence[:, 0] = True
    presence[:5, 255] = True
    words = pack_presence(presence)
    assert words.shape == (300, 4) and words.dtype == np.uint64
    assert bool(words[7, 1] >> np.uint64(3) & np.uint64(1)) == presence[7, 67]
    for setting, step in (("15-1", 3), ("19-1", 1), ("10-5-5", 1)):
        info = step_info(get_setting("voc", setting), step)
        sets = [set(np.flatnonzero(row).tolist()) - {0, 255} for row in presence]
        new, allowed, seen = (
            set(info.new_classes),
            set(info.old_classes) | set(info.new_classes),
            set(info.seen_classes) - {0},
        )
        want_ovl = [i for i, c in enumerate(sets) if c & new]
        want_dis = [i for i in want_ovl if sets[i] <= allowed]
        for index in (presence, words):
            assert select_train(index, info, "overlap").tolist() == want_ovl
            assert select_train(index, info, "disjoint").tolist() == want_dis
            assert select_test(index, info).tolist() == [i for i, c in enumerate(sets) if c & seen]
