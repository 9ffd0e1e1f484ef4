"""Every numeric config key has a validated range: no value reachable from ``--set`` ends in a
traceback. Out-of-range values exit with code 2 and a message naming the key; the few in-range
edge values the walk meets (0 where 0 is valid) complete a real run."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from incseg.cli import main
from incseg.config import RANGES, RELATIVE_KEYS, Config, config_from_dict, load_config
from incseg.errors import ConfigError
from incseg.methods import ADDON_PATHS, METHODS, addon_class
from incseg.ranges import Range, check_range, ranges_of

TINY = [
    "--set",
    "data.image_size=32",
    "--set",
    "data.num_train=24",
    "--set",
    "data.num_test=6",
    "--set",
    "data.crop_size=32",
    "--set",
    "model.head_channels=8",
    "--set",
    "train.epochs=1",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.eval_batch_size=6",
]
WALK = (0, -1, 10**15)  # zero, negative, absurd


def _numeric(annotation) -> bool:
    if typing.get_origin(annotation) is tuple:  # a list of numbers: LIST_KEYS
        return False
    if typing.get_origin(annotation) is typing.Literal:  # a choice of numbers (output_stride)
        return all(isinstance(v, int) for v in typing.get_args(annotation))
    options = typing.get_args(annotation) or (annotation,)
    return any(o in (int, float) for o in options)


def config_numeric_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every numeric key of the config, nested sections (``model.mask2former``) included."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += config_numeric_keys(hints[f.name], f"{prefix}{f.name}.")
        elif prefix and _numeric(hints[f.name]):
            keys.append(f"{prefix}{f.name}")
    return keys


def method_numeric_keys() -> list[tuple[str, str]]:
    pairs = []
    for name, cls in sorted(METHODS.items()):
        hints = typing.get_type_hints(cls)
        pairs += [
            (name, f.name) for f in dataclasses.fields(cls) if f.init and _numeric(hints[f.name])
        ]
    return pairs


def addon_numeric_keys() -> list[tuple[str, str]]:
    pairs = []
    for name in sorted(ADDON_PATHS):
        cls = addon_class(name)
        hints = typing.get_type_hints(cls)
        pairs += [
            (name, f.name) for f in dataclasses.fields(cls) if f.init and _numeric(hints[f.name])
        ]
    return pairs


# Keys holding a list of numbers, each element checked against the key's range (negative values
# valid, so the walk's zero / negative / absurd values do not apply): tested below.
LIST_KEYS = {"model.mask2former.logit_deltas", "train.lr_decay_at"}


def test_every_numeric_key_has_a_range():
    assert set(config_numeric_keys()) | LIST_KEYS == set(RANGES) | set(RELATIVE_KEYS)
    for name, key in method_numeric_keys():
        assert key in ranges_of(METHODS[name]), f"{name}.{key} has no range"
    for name, key in addon_numeric_keys():
        assert key in ranges_of(addon_class(name)), f"{name}.{key} has no range"
    # Every upper bound is below the walk's absurd value, so the walk meets it.
    every = [r for k, r in RANGES.items() if k not in LIST_KEYS]
    every += [r for cls in METHODS.values() for r in ranges_of(cls).values()]
    assert all(r.high < WALK[-1] and r.low >= 0 for r in every)


def test_list_keys_check_each_element(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {mask2former: {logit_deltas: [0.1, -0.6]}}\n")
    assert load_config(path).model.mask2former.logit_deltas == (0.1, -0.6)
    with pytest.raises(ConfigError, match=r"logit_deltas\[1\]: must be in \[-10, 10\], got -11"):
        load_config(path, ["model.mask2former.logit_deltas=[0.1, -11]"])
    with pytest.raises(ConfigError, match="logit_deltas: expected tuple, got 0.5"):
        load_config(path, ["model.mask2former.logit_deltas=0.5"])
    assert load_config(path, ["train.lr_decay_at=[0.85, 0.95]"]).train.lr_decay_at == (0.85, 0.95)
    with pytest.raises(ConfigError, match=r"lr_decay_at\[0\]: must be in \[0, 1\], got -1"):
        load_config(path, ["train.lr_decay_at=[-1]"])


def test_range_ends_and_message():
    closed, half = Range(1, 4, "why"), Range(0, 1, "because", low_open=True, high_open=True)
    assert [closed.contains(v) for v in (0.999, 1, 4, 4.001)] == [False, True, True, False]
    assert [half.contains(v) for v in (0, 1e-9, 0.999, 1)] == [False, True, True, False]
    assert not closed.contains(float("nan")) and not closed.contains(float("inf"))
    assert closed.describe() == "[1, 4]" and half.describe() == "(0, 1)"
    assert (
        Range(0, 1e6, "").describe() == "[0, 1,000,000]"
        and Range(1e-8, 0.5, "").describe() == "[1e-08, 0.5]"
    )
    check_range(None, closed, "a.b")
    with pytest.raises(ConfigError, match=r"^a\.b: must be in \(0, 1\), got 1 \(because\)$"):
        check_range(1, half, "a.b")


def test_cross_key_ranges():
    with pytest.raises(ConfigError, match="train.momentum: Nesterov momentum"):
        config_from_dict({"train": {"momentum": 0}})
    assert config_from_dict({"train": {"momentum": 0, "nesterov": False}}).train.momentum == 0
    with pytest.raises(ConfigError, match="data.scale_min/scale_max: need scale_min <= scale_max"):
        config_from_dict({"data": {"scale_min": 1.5, "scale_max": 1.0}})
    with pytest.raises(ConfigError, match=r"data.num_train/num_test/image_size: .* take 12.0 GiB"):
        config_from_dict({"data": {"num_train": 12288, "num_test": 0 + 1, "image_size": 512}})


def _outcome(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def _walk(key: str, prefix: list[str], valid: Range | None, tmp_path, capsys) -> list[str]:
    """Run ``incseg run`` with every out-of-range walked value of ``key`` (each must exit 2 with
    a message naming the key); return the in-range ``key=value`` ones, which the run test runs."""
    accepted = []
    overrides = [a for flag, a in zip(prefix[2::2], prefix[3::2], strict=True) if flag == "--set"]
    for value in WALK:
        if valid is not None and valid.contains(value):
            try:  # in range, but maybe refused with another key (momentum 0 with Nesterov)
                load_config("demo", [*overrides, f"{key}={value}"])
                accepted.append(f"{key}={value}")
                continue
            except ConfigError:
                pass
        code, err = _outcome(
            [*prefix, "--set", f"{key}={value}", "--out", str(tmp_path / "never")], capsys
        )
        assert code == 2, (key, value, err)
        assert err.startswith("error: ") and key in err and "Traceback" not in err, (
            key,
            value,
            err,
        )
    assert not (tmp_path / "never").exists()
    return accepted


# The zeros every query-based method accepts (the set criterion's weights and sampling), and
# those of CoMFormer's criterion (its focal loss) on top.
QUERY_ZEROS = [
    "method.class_weight=0",
    "method.mask_weight=0",
    "method.dice_weight=0",
    "method.no_object_weight=0",
    "method.importance_ratio=0",
    "method.backbone_lr=0",
]
COMFORMER_FT_ZEROS = [*QUERY_ZEROS, "method.focal_alpha=0", "method.focal_gamma=0"]

ACCEPTED_RUNS = {  # the in-range values the walk meets, grouped into real runs
    "config": [
        "protocol.last_step=0",
        "data.seed=0",
        "data.num_workers=0",
        "train.weight_decay=0",
        "train.lr_power=0",
        "train.lr_warmup=0",
        "train.lr_min=0",
        "train.seed=0",
        "train.val_interval=0",
        "train.checkpoint_every=0",
        "model.mask2former.enc_layers=0",
        "model.mask2former.prompts=0",
    ],
    "mib": ["method.kd_weight=0"],
    "lwf": ["method.kd_weight=0"],
    "lwf_mc": ["method.kd_weight=0"],
    "ilt": ["method.kd_weight=0", "method.feature_weight=0"],
    "ewc": ["method.weight=0", "method.alpha=0"],
    "rw": ["method.weight=0", "method.alpha=0"],
    "pi": ["method.weight=0"],
    "plop": ["method.pod_factor=0", "method.pod_logits_factor=0", "method.threshold=0"],
    "reminder": [
        "method.pod_factor=0",
        "method.pod_logits_factor=0",
        "method.threshold=0",
        "method.csw_weight=0",
        "method.delta=0",
    ],
    "rcil": ["method.kd_weight=0", "method.pcd_factor=0", "method.pcd_last_factor=0"],
    "ssul": [
        "method.memory_size=0",
        "method.pseudo_threshold=0",
        "method.background_lr_scale=0",
        "method.classifier_lr_scale=0",
    ],
    "dkd": [
        "method.memory_size=0",
        "method.pos_weight_first=0",
        "method.pos_weight=0",
        "method.mbce=0",
        "method.kd=0",
        "method.dkd_pos=0",
        "method.dkd_neg=0",
        "method.ac=0",
        "method.classifier_lr_scale=0",
    ],
    "star": [
        "method.memory_size=0",
        "method.pos_weight=0",
        "method.mbce=0",
        "method.pkd=0",
        "method.cont=0",
        "method.classifier_lr_scale=0",
        "method.new_classifier_lr_scale=0",
    ],
    "m2f_ft": QUERY_ZEROS,
    "comformer_ft": COMFORMER_FT_ZEROS,
    "m2f_mib": [*COMFORMER_FT_ZEROS, "method.kd_weight=0", "method.kd_alpha=0"],
    "m2f_plop": [*COMFORMER_FT_ZEROS, "method.pod_weight=0", "method.pseudo_threshold=0"],
    "eclipse": [
        *QUERY_ZEROS,
        "method.class_weight_incremental=0",
        "method.focal_alpha=0",
        "method.focal_gamma=0",
    ],
    "balconpas": [
        *QUERY_ZEROS,
        "method.med_tokens_weight=0",
        "method.overlap_threshold=0",
        "method.memory_size=0",
    ],
    "comformer": [
        *COMFORMER_FT_ZEROS,
        "method.kd_weight=0",
        "method.kd_alpha=0",
        "method.kd_reweight_gamma=0",
        "method.pseudo_threshold=0",
    ],
    "simcis": [
        *QUERY_ZEROS,
        "method.kl_weight=0",
        "method.virtual_queries=0",
        "method.distribution_alpha=0",
        "method.overlap_threshold=0",
    ],
    "mib+nest": ["method.nest.epochs=0"],
    "mib+ucd": ["method.ucd.weight=0"],
}


# What a method needs besides its name (RCIL, SSUL, DKD and STAR train their own architectures,
# the query-based methods Mask2Former).
METHOD_SETS = {
    name: ["--set", f"model.architecture={name}"] for name in ("rcil", "ssul", "dkd", "star")
} | {
    name: [
        "--set",
        "model.architecture=mask2former",
        "--set",
        (
            "model.mask2former={num_queries: 4, hidden_dim: 16, nheads: 2, dec_layers: 1, "
            "dim_feedforward: 16, conv_dim: 32, mask_dim: 16, enc_layers: 1, enc_dim_feedforward: 16}"
        ),
        "--set",
        "method.num_points=16",
    ]
    for name in (
        "balconpas",
        "comformer",
        "comformer_ft",
        "eclipse",
        "m2f_ft",
        "m2f_mib",
        "m2f_plop",
        "simcis",
    )
}
# POD's finest grid needs res5 (stride 32) 4 wide
METHOD_SETS["m2f_plop"] += ["--set", "data.image_size=128", "--set", "data.crop_size=128"]
# pseudo-labels on old-class pixels need a head without a background class
for _name in ("balconpas", "comformer", "m2f_plop", "simcis"):
    METHOD_SETS[_name] += ["--set", "model.mask2former.background=false"]
METHOD_SETS["eclipse"] += ["--set", "model.mask2former.prompts=2"]
METHOD_SETS["simcis"] += [
    "--set",
    "model.mask2former.decoder=selection",
    "--set",
    "model.mask2former.class_head=static",
    "--set",
    "model.mask2former.inference=simcis",
]


def test_walk_every_numeric_key_with_zero_negative_and_absurd(tmp_path, capsys):
    met = set()
    for key in config_numeric_keys():
        # protocol.last_step's range depends on the setting (15-5: steps 0..1); output_stride is 8 or 16.
        valid = {"protocol.last_step": Range(0, 1, ""), "model.output_stride": None}.get(
            key, RANGES.get(key)
        )
        met |= {("config", a) for a in _walk(key, ["run", "demo"], valid, tmp_path, capsys)}
    for name, key in method_numeric_keys():
        prefix = ["run", "demo", "--set", f"method={{name: {name}}}", *METHOD_SETS.get(name, [])]
        met |= {
            (name, a)
            for a in _walk(f"method.{key}", prefix, ranges_of(METHODS[name])[key], tmp_path, capsys)
        }
    for addon, key in addon_numeric_keys():
        prefix = ["run", "demo", "--set", f"method={{name: mib+{addon}}}"]
        valid = ranges_of(addon_class(addon))[key]
        key = f"method.{addon}.{key}"
        met |= {(f"mib+{addon}", a) for a in _walk(key, prefix, valid, tmp_path, capsys)}
    assert met == {(group, a) for group, values in ACCEPTED_RUNS.items() for a in values}


@pytest.mark.parametrize("group", sorted(ACCEPTED_RUNS))
def test_accepted_edge_values_complete_a_run(group, tmp_path, capsys):
    method = [] if group == "config" else ["--set", f"method={{name: {group}}}"]
    method += METHOD_SETS.get(group, [])
    sets = [arg for value in ACCEPTED_RUNS[group] for arg in ("--set", value)]
    code, err = _outcome(
        ["run", "demo", *TINY, *method, *sets, "--out", str(tmp_path / "run"), "--no-progress"],
        capsys,
    )
    assert code == 0, err
    assert (tmp_path / "run" / "summary.md").is_file()


def test_lowest_valid_sizes_complete_a_run(tmp_path, capsys):
    lowest = [
        "data.image_size=16",
        "data.crop_size=16",
        "data.test_crop=16",
        "train.batch_size=2",
        "train.eval_batch_size=1",
        "model.head_channels=1",
        "model.output_stride=8",
        "data.num_train=2",
    ]
    sets = [arg for value in lowest for arg in ("--set", value)]
    code, err = _outcome(
        [
            "run",
            "demo",
            *TINY,
            *sets,
            "--set",
            "protocol.last_step=0",
            "--out",
            str(tmp_path / "r"),
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err


def test_too_few_images_for_batch_norm_is_a_clear_error(tmp_path, capsys):
    code, err = _outcome(
        [
            "run",
            "demo",
            *TINY,
            "--set",
            "data.num_train=1",
            "--out",
            str(tmp_path / "r"),
            "--no-progress",
        ],
        capsys,
    )
    assert code == 2 and "Traceback" not in err
    assert (
        "step 0: 1 training image(s) and train.batch_size 4 give batches of 1 image(s) per process"
        in err
    )
