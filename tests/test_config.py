"""Typed config: defaults, YAML, overrides, and errors that name the key and the valid choices."""

import pytest

from incseg.config import Config, apply_override, builtin_configs, config_from_dict, load_config
from incseg.errors import ConfigError


def test_defaults_are_the_paper_setting():
    config = config_from_dict({})
    assert config.model.backbone == "resnet101" and config.model.output_stride == 16
    assert config.model.norm == "iabn"
    assert config.train.lr == 0.01 and config.train.lr_incremental == 0.001
    assert config.train.batch_size == 24 and config.data.crop_size == 512
    assert config.method.name == "mib" and config.method.params["kd_weight"] == 10.0


def test_builtin_demo_configs_load():
    assert {"demo", "demo-ft", "demo-offline", "demo-plop"} <= set(builtin_configs())
    demo = load_config(None)
    assert demo.model.backbone == "tiny" and demo.method.name == "mib"
    assert load_config("demo-ft").method.name == "ft"
    assert load_config("demo-plop").method.name == "plop"


def test_a_folder_named_like_a_builtin_config_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # e.g. the run directory of `incseg run demo --out demo`
    assert load_config("demo").name == "demo-mib"


def test_overrides_are_typed_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("protocol: {setting: 15-5s}\nmethod: {name: mib, kd_weight: 100}\n")
    config = load_config(
        path,
        [
            "train.lr=0.05",
            "train.epochs=3",
            "protocol.mode=disjoint",
            "data.test_crop=null",
            "method.unkd=false",
        ],
    )
    assert config.train.lr == 0.05 and config.train.epochs == 3
    assert config.protocol.setting == "15-5s" and config.protocol.mode == "disjoint"
    assert config.method.params == {
        "kd_weight": 100.0,
        "alpha": 1.0,
        "unce": True,
        "unkd": False,
        "init": "balanced",
        "ce_reduction": "valid",
    }
    again = config_from_dict(config.to_dict())
    assert again == config


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"trian": {}}, "unknown key(s) ['trian']; valid keys: ['name', 'data'"),
        ({"train": {"epoch": 3}}, "train: unknown key(s) ['epoch']"),
        (
            {"train": {"epochs": -1}},
            "train.epochs: must be in [1, 10,000], got -1 (epochs per step",
        ),
        ({"train": {"epochs": "ten"}}, "train.epochs: expected int, got 'ten'"),
        ({"train": {"lr": 0}}, "train.lr: must be in (0, 10], got 0.0"),
        (
            {"protocol": {"setting": "15-6"}},
            "protocol.setting: unknown voc setting '15-6'; valid settings: offline, 19-1",
        ),
        (
            {"protocol": {"mode": "overlapped"}},
            "protocol.mode: unknown value 'overlapped'; valid choices: ['disjoint', 'overlap']",
        ),
        (
            {"protocol": {"last_step": 2}},
            "protocol.last_step: step 2 is out of range for setting '15-5'; valid steps are 0..1",
        ),
        (
            {"model": {"backbone": "resnet152"}},
            "model.backbone: unknown value 'resnet152'; valid choices: ['resnet101', 'resnet50', 'tiny']",
        ),
        ({"model": {"output_stride": 32}}, "model.output_stride: unknown value 32"),
        ({"method": {"name": "icarl"}}, "method.name: unknown value 'icarl'; valid choices: ["),
        ({"method": {"name": "ft", "kd_weight": 10}}, "method: unknown key(s) ['kd_weight']"),
        (
            {"method": {"name": "mib", "kd_weight": -1}},
            "method.kd_weight: must be in [0, 1,000,000], got -1.0",
        ),
        (
            {"data": {"dataset": "coco"}},
            "data.dataset: unknown value 'coco'; valid choices: ['shapes', 'voc', 'ade']",
        ),
        ({"train": {"nesterov": "yes"}}, "train.nesterov: expected bool"),
        (
            {"train": {"amp": "fp8"}},
            "train.amp: unknown value 'fp8'; valid choices: ['off', 'bf16', 'fp16']",
        ),
    ],
)
def test_bad_values_are_rejected_with_the_key_and_choices(raw, needle):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert needle in str(err.value)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "train.lr")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_config_is_frozen():
    config = Config()
    with pytest.raises(AttributeError):
        config.name = "x"  # type: ignore[misc]


def test_every_builtin_config_loads_and_paper_configs_hold_the_paper_setting():
    from incseg.config import builtin_configs, load_config

    names = builtin_configs(with_folders=True)
    paper = [
        n
        for n in names
        if n.startswith(("voc/", "ade/"))
        and not n.endswith(
            (
                "-plop",
                "+ewf",
                "+nest",
                "+ucd",
                "-reminder",
                "-rcil",
                "-ssul",
                "-ssul-m",
                "-dkd",
                "-dkd-m",
                "-star",
                "-star-m",
                "-comformer",
                "-balconpas",
                "-balconpas-m",
                "-eclipse",
                "-simcis",
            )
        )
    ]
    assert len(paper) == 68 and "voc/15-1-overlap-mib" in paper and "ade/100-50-mib" in paper
    for name in names:
        config = load_config(name)
        if name not in paper:
            continue
        m, t, d, p = config.model, config.train, config.data, config.protocol
        assert (m.backbone, m.output_stride, m.norm, m.pretrained) == (
            "resnet101",
            16,
            "iabn",
            "iabn",
        )
        assert (t.batch_size, d.crop_size, d.test_crop, t.lr, t.lr_incremental) == (
            24,
            512,
            512,
            0.01,
            0.001,
        )
        assert (t.lr_power, t.amp, p.labels, p.test_selection) == (0.9, "off", "mib", "seen")
        assert t.epochs == (60 if name.startswith("ade/") else 30) and t.epochs_incremental is None
        assert config.data.dataset == name.split("/")[0]
        assert config.protocol.setting in name or (
            name.endswith("/joint") and config.protocol.setting == "offline"
        )
        if name.startswith("ade/") and not name.endswith("joint"):  # MiB's partition = disjoint
            listed = not name.startswith("ade/100-5-")
            assert (p.mode, p.split_source) == (
                ("disjoint", "official") if listed else ("overlap", "rule")
            )
        if config.method.name == "mib":
            high = name.startswith(("voc/15-1", "voc/10-1"))
            assert config.method.params["kd_weight"] == (100 if high else 10)
    assert load_config("voc/joint").protocol.setting == "offline"


CSSEG = ("plop", "rule", "mode")  # cssegmentation's labels, training and test selection

SEED_ROWS = [
    (family, setting, mode)
    for family, settings in (
        ("vocaug", ("15-5", "15-1", "10-1")),
        ("ade20k", ("100-50", "100-10", "100-5")),
    )
    for setting in settings
    for mode in ("disjoint", "overlap")
]


@pytest.mark.parametrize(("family", "setting", "mode"), SEED_ROWS)
def test_seed_configs_resolve_to_cssegmentations_recipe(family, setting, mode):
    """One config per seed row, named after cssegmentation's config file, holding its recipe:
    PLOP labels, rule selection of train and test images, constant LR, fp16, In-Place ABN
    weights, KD 100 for 15-1 / 10-1, 10 epochs per 10-1 incremental step, 60 epochs on ADE20K."""
    name = f"mib_r101iabnd16_aspp_512x512_{family}{setting}_{mode}"
    config = load_config(f"seed/{name}")
    p, t, m = config.protocol, config.train, config.model
    assert config.name == name and config.data.dataset == ("voc" if family == "vocaug" else "ade")
    assert (p.setting, p.mode, p.labels, p.split_source, p.test_selection) == (
        setting,
        mode,
        *CSSEG,
    )
    assert (m.backbone, m.output_stride, m.norm, m.pretrained, m.head_channels) == (
        "resnet101",
        16,
        "iabn",
        "iabn",
        256,
    )
    assert (t.lr, t.lr_incremental, t.lr_power, t.amp, t.batch_size) == (
        0.01,
        0.001,
        0.0,
        "fp16",
        24,
    )
    assert (t.momentum, t.nesterov, t.weight_decay) == (0.9, True, 1e-4)
    assert (
        config.data.crop_size,
        config.data.test_crop,
        config.data.scale_min,
        config.data.scale_max,
    ) == (512, 512, 0.5, 2.0)
    assert t.epochs == (60 if family == "ade20k" else 30)
    assert t.epochs_at(1) == {"10-1": 10, "100-50": 60, "100-10": 60, "100-5": 60}.get(setting, 30)
    assert config.method.name == "mib" and config.method.params["kd_weight"] == (
        100 if setting in ("15-1", "10-1") else 10
    )


def test_configs_lists_the_seed_rows_with_their_miou(capsys):
    from incseg.cli import main
    from incseg.configs import SEED_MIOU

    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    seeds = [line for line in lines if line.startswith("seed/mib_")]
    assert len(seeds) == len(SEED_MIOU) == 12
    assert any(
        line.startswith("seed/mib_r101iabnd16_aspp_512x512_vocaug15-5_disjoint ")
        and line.endswith("seed mIoU 66.1% (with background)")
        for line in seeds
    )
    assert "voc/15-5-overlap-mib" in lines and "ade/100-50-mib" in lines
    assert "docs/reproduction.md" in lines[-1]  # where the seed's own checkpoints are evaluated
    shown = {line.split()[0]: line for line in seeds}
    assert shown["seed/mib_r101iabnd16_aspp_512x512_vocaug15-1_disjoint"].endswith(
        "cssegmentation's zoo: 40.7% (with background)"
    )
    assert shown["seed/mib_r101iabnd16_aspp_512x512_vocaug15-1_overlap"].endswith(
        "zoo: 34.6% (with background)"
    )


def test_unquoted_on_off_in_yaml_are_the_strings_they_look_like(tmp_path):
    # YAML 1.1 reads unquoted on/off as booleans; string options accept them as "on"/"off".
    path = tmp_path / "c.yaml"
    path.write_text("train: {amp: off, tensorboard: on}\n")
    train = load_config(path).train
    assert (train.amp, train.tensorboard) == ("off", "on")
    with pytest.raises(
        ConfigError,
        match=r"train.amp: unknown value 'on'; valid choices: \['off', 'bf16', 'fp16'\]",
    ):
        load_config(path, ["train.amp=on"])
    with pytest.raises(ConfigError, match=r"train.sync_bn: expected bool, got 'sometimes'"):
        load_config(path, ["train.sync_bn=sometimes"])


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; float keys take it as the number it looks like.
    path = tmp_path / "c.yaml"
    path.write_text("train: {weight_decay: 1e-4, lr: 2E-2}\nmethod: {name: ewc, weight: +5e2}\n")
    config = load_config(path, ["train.lr_incremental=1e-3"])
    assert (config.train.weight_decay, config.train.lr, config.train.lr_incremental) == (
        1e-4,
        2e-2,
        1e-3,
    )
    assert config.method.params["weight"] == 500.0
    with pytest.raises(ConfigError, match=r"train.epochs: expected int, got '1e2' \(str\)"):
        load_config(path, ["train.epochs=1e2"])
    with pytest.raises(ConfigError, match=r"train.lr: expected float, got '1e-3x' \(str\)"):
        load_config(path, ["train.lr=1e-3x"])


PLOP_SCRIPTS = [("voc", s) for s in ("19-1", "15-5", "15-1", "10-1")] + [
    ("ade", s) for s in ("100-50", "100-10", "100-5")
]


@pytest.mark.parametrize(("dataset", "setting"), PLOP_SCRIPTS)
def test_plop_configs_resolve_to_plops_published_recipe(dataset, setting):
    """arthurdouillard/CVPR2021_PLOP scripts/: overlap, PLOP's labels and on-the-fly selection,
    In-Place ABN ResNet-101 OS16, batch 24 (12 x 2 GPUs), lr 0.01 / 0.001 with poly 0.9, apex O1;
    POD 0.01 / logits 0.0005 on VOC (argparser.py:49-57), 0.001 / 0.00001 on ADE20K (scripts'
    OPTIONS); threshold 0.001, adaptive factor, balanced init; 30 epochs on VOC (10 for the 10-1
    incremental steps), 60 on ADE20K."""
    name = f"voc/{setting}-overlap-plop" if dataset == "voc" else f"ade/{setting}-plop"
    config = load_config(name)
    p, t, m, d = config.protocol, config.train, config.model, config.data
    assert (d.dataset, p.setting, p.mode, p.labels, p.split_source, p.test_selection) == (
        dataset,
        setting,
        "overlap",
        "plop",
        "rule",
        "seen",
    )
    assert (m.backbone, m.output_stride, m.norm, m.pretrained) == ("resnet101", 16, "iabn", "iabn")
    assert (t.batch_size, t.lr, t.lr_incremental, t.lr_power, t.amp) == (
        24,
        0.01,
        0.001,
        0.9,
        "fp16",
    )
    assert (t.momentum, t.nesterov, t.weight_decay, d.crop_size, d.test_crop) == (
        0.9,
        True,
        1e-4,
        512,
        512,
    )
    voc = dataset == "voc"
    assert t.epochs_at(0) == (30 if voc else 60)
    assert t.epochs_at(1) == (10 if setting == "10-1" else 30 if voc else 60)
    assert config.method.name == "plop"
    assert config.method.params == {
        "pod_factor": 0.01 if voc else 0.001,
        "pod_logits_factor": 0.0005 if voc else 0.00001,
        "pod_schedule": True,
        "pseudo": True,
        "threshold": 0.001,
        "bins": 100,
        "median": "published",
        "adaptive_factor": True,
        "init": "balanced",
    }


@pytest.mark.parametrize(
    "name", [f"vocaug{s}_{m}" for s in ("15-5", "15-1", "10-1") for m in ("disjoint", "overlap")]
)
def test_cssegmentation_plop_configs(name):
    config = load_config(f"seed/plop_r101iabnd16_aspp_512x512_{name}")
    setting, mode = name.removeprefix("vocaug").split("_")
    p, t = config.protocol, config.train
    assert (p.setting, p.mode, p.labels, p.split_source, p.test_selection) == (
        setting,
        mode,
        *CSSEG,
    )
    assert (t.lr_power, t.amp, t.epochs_at(1)) == (0.0, "fp16", 10 if setting == "10-1" else 30)
    assert config.method.name == "plop" and config.method.params["pod_factor"] == 0.01
    assert config.method.params["pod_logits_factor"] == 0.0005


def assert_plop_data_code(config, dataset: str, setting: str) -> None:
    """The data side of the codes forked from PLOP's: its labels, the overlap rule applied on the
    fly, Resize + CenterCrop 512 at test."""
    d, p = config.data, config.protocol
    assert (d.dataset, p.setting, p.mode, p.labels, p.split_source, d.test_crop) == (
        dataset,
        setting,
        "overlap",
        "plop",
        "rule",
        512,
    )


EWF_SCRIPTS = [("voc", s, m) for s in ("19-1", "15-1", "10-1", "5-3") for m in ("mib", "plop")] + [
    ("ade", s, "mib") for s in ("100-50", "100-10", "100-5")
]


@pytest.mark.parametrize(("dataset", "setting", "method"), EWF_SCRIPTS)
def test_ewf_configs_resolve_to_the_official_scripts(dataset, setting, method):
    """schuy1er/EWF_official scripts/: PLOP's data code (labels, on-the-fly overlap selection,
    validation crop), 4 GPUs x batch 6 (x 12 for ADE 100-50), lr 0.01 / 0.001, apex O1, 30 epochs
    on VOC and 60 on ADE20K, --weight_fusion --fix_pre_cls; MiB's loss_kd 10 (100 on ADE 100-10
    and 100-5), PLOP's POD 0.01 / 0.0005."""
    name = f"voc/{setting}-overlap-{method}+ewf" if dataset == "voc" else f"ade/{setting}-mib+ewf"
    config = load_config(name)
    t = config.train
    assert_plop_data_code(config, dataset, setting)
    assert (t.lr, t.lr_incremental, t.amp, config.model.pretrained) == (0.01, 0.001, "fp16", "iabn")
    assert t.batch_size == (48 if setting == "100-50" else 24)
    assert t.epochs_at(0) == t.epochs_at(1) == (30 if dataset == "voc" else 60)
    assert config.method.name == f"{method}+ewf"
    assert config.method.params["ewf"] == {"freeze_old_classifiers": True}
    if method == "mib":
        assert config.method.params["kd_weight"] == (100 if setting in ("100-10", "100-5") else 10)
    else:
        assert (config.method.params["pod_factor"], config.method.params["pod_logits_factor"]) == (
            0.01,
            0.0005,
        )


NEST_SCRIPTS = [("voc", s, m) for s in ("15-1", "10-1") for m in ("mib", "plop")] + [
    ("ade", "100-5", m) for m in ("mib", "plop")
]


@pytest.mark.parametrize(("dataset", "setting", "method"), NEST_SCRIPTS)
def test_nest_configs_resolve_to_the_official_scripts(dataset, setting, method):
    """zhengyuan-xie/ECCV24_NeST scripts/: PLOP's data code, 4 GPUs x batch 6, lr 0.02 / 0.001,
    apex O1; VOC 30 epochs (10 per incremental step on 10-1), --warm_epochs 5 --warm_lr_scale 1;
    ADE 60 epochs, --warm_epochs 15 --warm_lr_scale 500; MiB's loss_kd 10; PLOP's POD 0.01 /
    0.0005 (0.001 / 0.00001 on ADE) and --fix_pre_cls on VOC."""
    voc = dataset == "voc"
    name = f"voc/{setting}-overlap-{method}+nest" if voc else f"ade/{setting}-{method}+nest"
    config = load_config(name)
    t = config.train
    assert_plop_data_code(config, dataset, setting)
    assert (t.lr, t.lr_incremental, t.amp, t.batch_size) == (0.02, 0.001, "fp16", 24)
    assert t.epochs_at(0) == (30 if voc else 60)
    assert t.epochs_at(1) == {"15-1": 30, "10-1": 10, "100-5": 60}[setting]
    nest = config.method.build().addons[0]
    assert (nest.epochs, nest.lr_scale, nest.bias_init) == (
        (5, 1.0, "random") if voc else (15, 500.0, "random")
    )
    assert nest.freeze_old_classifiers == (method == "plop" and voc)
    params = config.method.params
    if method == "mib":
        assert params["kd_weight"] == 10
    else:
        assert (params["pod_factor"], params["pod_logits_factor"]) == (
            (0.01, 0.0005) if voc else (0.001, 0.00001)
        )


@pytest.mark.parametrize("family", ["ilt", "mib+ucd"])
@pytest.mark.parametrize("setting", ["15-5", "15-1", "10-1"])
@pytest.mark.parametrize("mode", ["disjoint", "overlap"])
def test_cssegmentation_ilt_and_ucd_configs(family, setting, mode):
    """csseg/configs/{ilt,ucd}/*: batch 24, crop 512, apex O1, the poly schedule never stepped;
    step 0 lr 0.01 (ILT) or 0.02 (UCD), then 0.001; 30 epochs, 10 per incremental step on 10-1;
    ILT: CE + 100 x KD + 100 x MSE(encoder); UCD: MiB's terms with KD 10, contrastive 0.01."""
    config = load_config(f"seed/{family}_r101iabnd16_aspp_512x512_vocaug{setting}_{mode}")
    p, t = config.protocol, config.train
    assert (p.setting, p.mode, *(p.labels, p.split_source, p.test_selection)) == (
        setting,
        mode,
        *CSSEG,
    )
    assert (t.lr, t.lr_incremental, t.lr_power, t.amp, t.batch_size) == (
        0.02 if family == "mib+ucd" else 0.01,
        0.001,
        0.0,
        "fp16",
        24,
    )
    assert (t.epochs_at(0), t.epochs_at(1)) == (30, 10 if setting == "10-1" else 30)
    method = config.method.build()
    if family == "ilt":
        assert (method.kd_weight, method.feature_weight, method.alpha) == (100, 100, 1)
    else:
        assert (method.method.kd_weight, method.method.unce, method.method.unkd) == (10, True, True)
        assert (method.addons[0].weight, method.addons[0].temperature) == (0.01, 0.07)


@pytest.mark.parametrize("setting", ["19-1", "15-5", "15-1"])
@pytest.mark.parametrize("mode", ["disjoint", "overlap"])
def test_ucd_paper_configs(setting, mode):
    """ygjwd12345/UCD README.md:50-53 and argparser.py:35-39: MiB's recipe (lr 0.01 / 0.001,
    batch 24, 30 epochs, poly 0.9) with loss_kd 10 and the contrastive term / 100."""
    config = load_config(f"voc/{setting}-{mode}-mib+ucd")
    t = config.train
    assert (config.protocol.setting, config.protocol.mode) == (setting, mode)
    assert (t.lr, t.lr_incremental, t.lr_power, t.batch_size, t.epochs_at(1)) == (
        0.01,
        0.001,
        0.9,
        24,
        30,
    )
    method = config.method.build()
    assert method.method.kd_weight == 10 and method.addons[0].weight == 0.01


REMINDER_SCRIPTS = {
    "voc/19-1-overlap-reminder": (32, 30, 30, 0.001, 0.01, 0.0),
    "voc/15-5-overlap-reminder": (32, 30, 30, 0.001, 0.01, 0.0),
    "voc/15-1-overlap-reminder": (16, 30, 30, 0.001, 0.01, 0.0),
    "ade/100-50-reminder": (10, 60, 70, 0.0008, 0.001, 1.0),
    "ade/100-10-reminder": (10, 60, 70, 0.001, 0.001, 1.0),
    "ade/100-5-reminder": (10, 60, 70, 0.001, 0.001, 1.0),
}


@pytest.mark.parametrize("name", sorted(REMINDER_SCRIPTS))
def test_reminder_configs_resolve_to_the_official_scripts(name):
    """HieuPhan33/REMINDER scripts/: batch = GPUs x --batch_size (VOC 16 per GPU; ADE 10 on one
    GPU), lr 0.01 at step 0, --method REMINDER = PLOP + csw_kd 0.5 on VOC; the ADE20K scripts'
    explicit POD 0.001 / 0.00001 and --delta_csw 1.0; 70 epochs after step 0 on ADE20K."""
    batch, e0, e1, lr, pod, delta = REMINDER_SCRIPTS[name]
    config = load_config(name)
    t, p = config.train, config.protocol
    assert (p.mode, p.labels, p.split_source) == ("overlap", "plop", "rule")
    assert (t.batch_size, t.epochs_at(0), t.epochs_at(1), t.lr, t.lr_incremental) == (
        batch,
        e0,
        e1,
        0.01,
        lr,
    )
    method = config.method.build()
    assert (method.pod_factor, method.csw_weight, method.delta, method.temperature) == (
        pod,
        0.5,
        delta,
        3.0,
    )
    assert method.pod_logits_factor == (0.0005 if pod == 0.01 else 0.00001)
    assert method.prototypes == "corrected"


RCIL_SCRIPTS = [("voc", s, m) for s in ("15-1", "10-1") for m in ("overlap", "disjoint")] + [
    ("ade", s, "overlap") for s in ("100-50", "100-10", "100-5")
]


@pytest.mark.parametrize(("dataset", "setting", "mode"), RCIL_SCRIPTS)
def test_rcil_configs_resolve_to_the_official_scripts(dataset, setting, mode):
    """zhangchbin/RCIL scripts/: batch 24, lr 0.02 (VOC) / 0.01 (ADE20K) then 0.001, 30 / 60
    epochs at every step, --loss_kd 100, PCD factors 0.01 / 0.0005 (ADE20K 5e-6 / 5e-7)."""
    voc = dataset == "voc"
    name = f"voc/{setting}-{mode}-rcil" if voc else f"ade/{setting}-rcil"
    config = load_config(name)
    t, p = config.train, config.protocol
    assert (p.setting, p.mode, p.labels, p.split_source) == (setting, mode, "plop", "rule")
    assert config.model.architecture == "rcil" and config.model.pretrained == "iabn"
    assert (t.batch_size, t.lr, t.lr_incremental, t.amp) == (
        24,
        0.02 if voc else 0.01,
        0.001,
        "fp16",
    )
    assert t.epochs_at(0) == t.epochs_at(1) == (30 if voc else 60)
    method = config.method.build()
    assert (method.kd_weight, method.alpha) == (100, 1)
    assert (method.pcd_factor, method.pcd_last_factor) == ((0.01, 0.0005) if voc else (5e-6, 5e-7))


@pytest.mark.parametrize("setting", ["15-5", "15-1", "10-1"])
@pytest.mark.parametrize("mode", ["disjoint", "overlap"])
def test_cssegmentation_rcil_configs(setting, mode):
    """csseg/configs/rcil/*: lr 0.02 then 0.001, constant; 30 epochs, 10 per incremental step
    on 10-1; batch 24; KD 100."""
    config = load_config(f"seed/rcil_r101iabnd16_aspp_512x512_vocaug{setting}_{mode}")
    t = config.train
    assert (config.protocol.setting, config.protocol.mode) == (setting, mode)
    assert (t.lr, t.lr_incremental, t.lr_power, t.batch_size) == (0.02, 0.001, 0.0, 24)
    assert t.epochs_at(1) == (10 if setting == "10-1" else 30)
    assert config.model.architecture == "rcil" and config.method.build().kd_weight == 100


def test_set_method_name_keeps_the_method_keys_when_only_add_ons_change():
    with_ucd = load_config("voc/15-1-overlap-mib", ["method.name=mib+ucd"])
    assert with_ucd.method.params["kd_weight"] == 100  # the file's MiB key stays
    plain = load_config("voc/15-1-overlap-mib+ewf", ["method.name=mib"])
    assert "ewf" not in plain.method.params and plain.method.params["kd_weight"] == 10
    other = load_config("voc/15-1-overlap-mib", ["method.name=plop"])
    assert "kd_weight" not in other.method.params


SSUL_ROWS = [("voc", s) for s in ("15-5", "15-1", "10-1")]
SSUL_ROWS += [("ade", s) for s in ("100-50", "100-10", "100-5")]


@pytest.mark.parametrize(("dataset", "setting"), SSUL_ROWS)
@pytest.mark.parametrize("memory", [False, True])
def test_ssul_configs_resolve_to_the_readme_command(dataset, setting, memory):
    """clovaai/SSUL README.md:82-108: VOC 50 epochs, batch 32, lr 0.01, poly (PolyLR floor 1e-6);
    ADE20K 100 epochs, batch 24, lr 0.05, warm_poly (10%); step 0 at 0.001 / 0.01 hard-coded;
    memory 100 / 300 for SSUL-M; crop 513, crop_val 513, threshold 0.7, ResNet-101 with BN."""
    voc = dataset == "voc"
    suffix = "ssul-m" if memory else "ssul"
    config = load_config(f"voc/{setting}-overlap-{suffix}" if voc else f"ade/{setting}-{suffix}")
    t, d, p, m = config.train, config.data, config.protocol, config.model
    assert (p.setting, p.mode, p.labels, p.split_source) == (setting, "overlap", "ssul", "rule")
    assert (m.backbone, m.pretrained, m.norm, m.output_stride, m.architecture) == (
        "resnet101",
        "imagenet",
        "bn",
        16,
        "ssul",
    )
    assert (d.crop_size, d.test_crop) == (513, 513)
    assert d.saliency == ("data/voc/saliency_map" if voc else None)
    assert (t.epochs_at(0), t.epochs_at(3), t.batch_size) == (
        (50, 50, 32) if voc else (100, 100, 24)
    )
    assert (t.lr, t.lr_incremental, t.amp) == (0.001, 0.01 if voc else 0.05, "fp16")
    assert (t.lr_min, t.lr_warmup) == ((1e-6, 0.0) if voc else (0.0, 0.1))
    assert (t.momentum, t.nesterov, t.weight_decay, t.lr_power) == (0.9, True, 1e-4, 0.9)
    method = config.method.build()
    assert method.memory_size == ((100 if voc else 300) if memory else 0)
    assert (method.pseudo_threshold, method.memory_labels) == (0.7, "unshifted")
    assert method.unknown == ("saliency" if voc else "background")
    assert (method.background_lr_scale, method.classifier_lr_scale) == (1e-4, 10)


DKD_ROWS = [("voc", s, "overlap") for s in ("15-5", "15-1", "10-1")]
DKD_ROWS += [("voc", s, "disjoint") for s in ("15-5", "15-1")]
DKD_ROWS += [("ade", s, "overlap") for s in ("100-50", "100-10", "100-5")]


@pytest.mark.parametrize(("dataset", "setting", "mode"), DKD_ROWS)
@pytest.mark.parametrize("memory", [False, True])
def test_dkd_configs_resolve_to_the_official_scripts(dataset, setting, mode, memory):
    """cvlab-yonsei/DKD scripts and configs: VOC 60 epochs, batch 32, lr 1e-3 then 1e-4, pos
    weight 2 then 1; ADE20K 100 epochs, batch 24, lr 2.5e-3 then 2.5e-4, pos weight 35, warmup
    20%; loss weights 1 / 5 / 5 / 5 / 1; memory 100 / 300 for DKD-M; crop 512 both ways."""
    voc = dataset == "voc"
    suffix = "dkd-m" if memory else "dkd"
    config = load_config(f"voc/{setting}-{mode}-{suffix}" if voc else f"ade/{setting}-{suffix}")
    t, d, p, m = config.train, config.data, config.protocol, config.model
    assert (p.setting, p.mode, p.split_source) == (setting, mode, "rule")
    assert p.labels == ("plop" if voc else "ssul")
    assert (m.backbone, m.pretrained, m.norm, m.output_stride, m.architecture) == (
        "resnet101",
        "imagenet",
        "bn",
        16,
        "dkd",
    )
    assert (d.crop_size, d.test_crop, d.scale_min, d.scale_max) == (512, 512, 0.5, 2.0)
    assert (t.epochs_at(0), t.epochs_at(2), t.batch_size) == (
        (60, 60, 32) if voc else (100, 100, 24)
    )
    assert (t.lr, t.lr_incremental) == ((0.001, 0.0001) if voc else (0.0025, 0.00025))
    assert (t.lr_warmup, t.lr_min, t.amp) == (0.0 if voc else 0.2, 0.0, "fp16")
    method = config.method.build()
    assert method.memory_size == ((100 if voc else 300) if memory else 0)
    assert (method.pos_weight_first, method.pos_weight) == ((2, 1) if voc else (35, 35))
    weights = (method.mbce, method.kd, method.dkd_pos, method.dkd_neg, method.ac)
    assert weights == (1, 5, 5, 5, 1) and method.classifier_lr_scale == 10


STAR_ROWS = [("voc", s, "overlap") for s in ("15-5", "15-1", "10-1")]
STAR_ROWS += [("voc", s, "disjoint") for s in ("15-5", "15-1")]
STAR_ROWS += [("ade", s, "overlap") for s in ("100-50", "100-10", "100-5")]


@pytest.mark.parametrize(("dataset", "setting", "mode"), STAR_ROWS)
@pytest.mark.parametrize("memory", [False, True])
def test_star_configs_resolve_to_the_official_scripts(dataset, setting, mode, memory):
    """jinpeng0528/STAR scripts and configs: batch 24, VOC 60 epochs, lr 1e-3 then 1e-4, pos
    weight 4; ADE20K 100 epochs, lr 2.5e-3 then 2.5e-4, pos weight 30, warmup 20%; weights
    1 / 5 / 0.05; LR x10 head and old classifiers, x100 the new one; STAR-M 50 on VOC."""
    voc = dataset == "voc"
    suffix = "star-m" if memory else "star"
    config = load_config(f"voc/{setting}-{mode}-{suffix}" if voc else f"ade/{setting}-{suffix}")
    t, d, p, m = config.train, config.data, config.protocol, config.model
    assert (p.setting, p.mode, p.split_source, p.labels) == (
        setting,
        mode,
        "rule",
        "plop" if voc else "ssul",
    )
    assert (m.backbone, m.pretrained, m.norm, m.architecture) == (
        "resnet101",
        "imagenet",
        "bn",
        "star",
    )
    assert (d.crop_size, d.test_crop) == (512, 512)
    assert (t.epochs_at(0), t.epochs_at(1), t.batch_size) == (
        (60, 60, 24) if voc else (100, 100, 24)
    )
    assert (t.lr, t.lr_incremental) == ((0.001, 0.0001) if voc else (0.0025, 0.00025))
    assert (t.lr_warmup, t.weight_decay, t.amp) == (0.0 if voc else 0.2, 1e-4, "fp16")
    method = config.method.build()
    assert method.memory_size == ((50 if voc else 300) if memory else 0)
    assert method.pos_weight == (4 if voc else 30) and method.mode == mode
    assert (method.mbce, method.pkd, method.cont, method.noise) == (1, 5, 0.05, "official")
    assert (method.classifier_lr_scale, method.new_classifier_lr_scale) == (10, 100)


def test_a_method_that_follows_the_mode_gets_it_or_refuses_another():
    assert load_config("voc/15-1-disjoint-star").method.params["mode"] == "disjoint"
    with pytest.raises(ConfigError, match="method.mode: 'star' follows protocol.mode"):
        load_config("voc/15-1-disjoint-star", ["method.mode=overlap"])


# -- YAML that PyYAML's safe loader reads without a word (duplicate keys, aliases) ------------


def _yaml_file(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    path = _yaml_file(tmp_path, "train: {lr: 0.5}\nmodel: {backbone: tiny}\ntrain: {epochs: 2}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: key 'train' is given twice (lines 1 and 3); YAML would keep only the last and "
        "silently drop the first: give it once"
    )
    nested = _yaml_file(
        tmp_path, "model:\n  backbone: tiny\nmethod:\n  ewf: {}\n  name: mib\n  name: ft\n"
    )
    with pytest.raises(ConfigError, match=r"key 'method.name' is given twice \(lines 5 and 6\)"):
        load_config(nested)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["method={name: mib, name: ft}"])
    assert "key 'method.name' is given twice (line 1, columns 2 and 13)" in str(err.value)
    listed = _yaml_file(tmp_path, "model: {backbone: tiny}\nx: [{a: 1, a: 2}]\n")
    with pytest.raises(ConfigError, match=r"key 'x\[0\].a' is given twice"):
        load_config(listed)


def test_yaml_aliases_are_refused_before_anything_expands(tmp_path):
    rows = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        rows.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    path = _yaml_file(tmp_path, "\n".join([*rows, "train: {lr: *i}"]) + "\n")  # 9^9 strings
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(
        f"{path}: alias *a at line 2, column 8: incseg reads no YAML anchors / aliases in a config"
    )
    with pytest.raises(ConfigError, match=r"--set 'train.lr=\*x': alias \*x at line 1"):
        load_config(None, ["train.lr=*x"])
    deep = _yaml_file(tmp_path, "train: " + "[" * 500 + "]" * 500 + "\n")
    with pytest.raises(ConfigError, match="nested more than 64 levels deep at line 1"):
        load_config(deep)


def test_what_incseg_writes_reads_back_and_anchors_alone_still_read(tmp_path):
    from incseg.config import RefusedYAML, parse_yaml

    for name in ("demo", "voc/15-1-overlap-ssul", "voc/15-5-overlap-mib+ucd"):
        config = load_config(name)
        assert config_from_dict(parse_yaml(config.to_yaml())) == config
    assert parse_yaml("a: &x 1\nb: 2\n") == {"a": 1, "b": 2}  # an anchor no alias uses
    assert parse_yaml("<<: {a: 1}\na: 2\n") == {"a": 2}  # an explicit key over a merged one
    with pytest.raises(RefusedYAML, match="key 'a' is given twice"):
        parse_yaml("a: 1\nb: {}\na: 1\n")


def test_a_saved_config_with_a_key_twice_is_refused(tmp_path):
    from incseg.engine.rundir import RunDir

    (tmp_path / "config.yaml").write_text("name: r\ntrain: {lr: 0.5}\ntrain: {epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"cannot read the saved config \(key 'train' is given"):
        RunDir(tmp_path).saved_config()


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("train:\n", "train: null"),
        ("train: {}\n", "train: {}"),
        ("train: {}\nmethod:\nmodel: {}\n", "train: {}, method: null, model: {}"),
    ],
)
def test_a_config_of_empty_sections_is_refused_like_an_empty_file(tmp_path, text, shown):
    path = _yaml_file(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(
        f"{path}: lists no key (only empty sections: {shown}); a config names at least what it "
        "changes from the defaults"
    )


def test_a_name_with_a_key_or_a_non_section_is_not_an_empty_config(tmp_path):
    assert load_config(_yaml_file(tmp_path, "model: {backbone: tiny}\ntrain:\n")).train.lr == 0.01
    with pytest.raises(ConfigError, match="name: a value is required"):
        load_config(_yaml_file(tmp_path, "name:\ntrain:\n"))


def test_an_add_on_named_twice_is_refused():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["method.name=mib+ewf+nest+ewf"])
    assert str(err.value) == (
        "method.name: 'mib+ewf+nest+ewf' names the add-on(s) ['ewf'] more than once; each "
        "add-on applies once: name it once (mib+ewf+nest) (from --set)"
    )
    with pytest.raises(ConfigError, match=r"names the add-on\(s\) \['ewf'\] more than once"):
        config_from_dict({"method": {"name": "plop+ewf+ewf"}})


VOC = ["data.dataset=voc", "data.root=data/voc", "model.backbone=tiny"]


def test_saliency_maps_for_a_method_that_reads_none_are_refused():
    with pytest.raises(ConfigError) as err:
        load_config(None, [*VOC, "data.saliency=data/voc/saliency_map"])
    assert str(err.value) == (
        "data.saliency: method 'mib' has no unknown class and reads no saliency map, so the "
        "folder would be ignored; the methods that read it: ['ssul'] (method.unknown: saliency); "
        "remove data.saliency or set it to null (from --set)"
    )
    with pytest.raises(
        ConfigError, match="method 'ssul' takes its unknown class from 'background'"
    ):
        load_config("voc/15-1-overlap-ssul", ["method.unknown=background"])
    with pytest.raises(ConfigError, match="data.saliency: method 'mib\\+ewf' has no unknown class"):
        load_config("voc/15-1-overlap-ssul", ["method.name=mib+ewf"])
    assert load_config("voc/15-1-overlap-ssul", ["method.name=mib", "data.saliency=null"])
    ssul = load_config("voc/15-1-overlap-ssul")
    assert ssul.data.saliency == "data/voc/saliency_map"
    # a checkpoint's config is rebuilt with method ft and its data section (model_io.restore_step)
    assert config_from_dict({**ssul.to_dict(), "method": {"name": "ft"}}).data.saliency


@pytest.mark.parametrize(
    ("setting", "iterations", "kd"),
    [("100-50", 20000, 0.5), ("100-10", 4000, 10.0), ("100-5", 2000, 10.0), ("50-50", 20000, 10.0)],
)
def test_comformer_configs_resolve_to_the_official_scripts(setting, iterations, kd):
    """fcdl94/CoMFormer scripts/ade.sh:15-17, ade10.sh:16-23, ade5.sh:18-25 on the R-101 base
    config (160k iterations at 1e-4, then 5e-5; AdamW 0.05; clipping 0.01; batch 16; AMP)."""
    config = load_config(f"ade/{setting}-comformer", [])
    train, m2f = config.train, config.model.mask2former
    assert (train.iterations, train.iterations_incremental) == (160000, iterations)
    assert (train.lr, train.lr_incremental, train.batch_size) == (1e-4, 5e-5, 16)
    assert (train.optimizer, train.weight_decay, train.clip_grad_norm) == ("adamw", 0.05, 0.01)
    assert train.amp == "fp16" and config.method.params["kd_weight"] == kd
    assert (m2f.mask_activation, m2f.background, m2f.inference) == ("softmax", False, "comformer")
    assert (m2f.num_queries, m2f.dec_layers, m2f.enc_layers) == (100, 9, 6)
    assert config.model.backbone == "resnet101" and config.protocol.labels == "plop"
    assert config.data.pipeline == "comformer" and config.data.test_crop is None


@pytest.mark.parametrize(
    ("setting", "iterations"),
    [("100-50", 50000), ("100-10", 10000), ("100-5", 5000), ("50-50", 50000)],
)
def test_balconpas_configs_resolve_to_the_official_scripts(setting, iterations):
    """jinpeng0528/BalConpas scripts/sem_*.sh on continual_maskformer2_R101_bs8_160k.yaml (160k
    iterations at 1e-4, then 5e-5; batch 8; MED_TOKENS_WEIGHT 5)."""
    config = load_config(f"ade/{setting}-balconpas", [])
    train, m2f = config.train, config.model.mask2former
    assert (train.iterations, train.iterations_incremental) == (160000, iterations)
    assert (train.lr, train.lr_incremental, train.batch_size) == (1e-4, 5e-5, 8)
    assert config.method.name == "balconpas" and config.method.params["med_tokens_weight"] == 5.0
    assert (m2f.mask_activation, m2f.background, m2f.inference) == ("sigmoid", False, "semantic")
    assert config.data.pipeline == "mask2former" and config.protocol.labels == "mib"
    assert config.method.params["memory_size"] == 0
    replay = load_config(f"ade/{setting}-balconpas-m", [])
    assert replay.method.params["memory_size"] == 300 and replay.train == config.train
