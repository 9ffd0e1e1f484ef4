"""Every bad input we know of gets a one-line error naming the file, key or value (exit 2, no
traceback). ``CASES`` is also what ``tools/guards_table.py`` runs to write docs/guards.md."""

from __future__ import annotations

import argparse
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
from test_ranges import LIST_KEYS

from incseg.cli import main
from incseg.config import RANGES
from incseg.methods import METHODS
from incseg.ranges import Range, ranges_of

FIXTURES = Path(__file__).parent / "fixtures"
TINY = [
    "--set",
    "data.image_size=32",
    "--set",
    "data.num_train=40",
    "--set",
    "data.num_test=12",
    "--set",
    "data.crop_size=32",
    "--set",
    "model.head_channels=8",
    "--set",
    "train.epochs=1",
    "--set",
    "train.batch_size=8",
    "--set",
    "protocol.last_step=0",
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _checkpoint(tmp: Path) -> Path:
    """A real step-0 checkpoint of a tiny run."""
    assert main(["run", *TINY, "--out", str(tmp / "run"), "--no-progress"]) == 0
    return tmp / "run" / "step_0.pt"


def _tampered(tmp: Path, change, *, keep_digest: bool = False) -> Path:
    """A real checkpoint changed by ``change``; without ``keep_digest`` it is saved as an older incseg
    wrote it (no content digest), so that the change reaches the checks after the digest's."""
    ckpt = torch.load(_checkpoint(tmp), weights_only=True)
    if not keep_digest:
        ckpt.pop("sha256")
    change(ckpt)
    torch.save(ckpt, tmp / "bad.pt")
    return tmp / "bad.pt"


def _truncated_step(tmp: Path) -> Path:
    """A run directory whose step_0.pt was cut short (a full disk while copying the run)."""
    run = _checkpoint(tmp).parent
    data = (run / "step_0.pt").read_bytes()
    (run / "step_0.pt").write_bytes(data[: len(data) // 2])
    return run


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _locked_dir(tmp: Path) -> Path:
    """A run directory whose lock another process holds (until the test's process group ends)."""
    import subprocess
    import sys

    out = tmp / "busy"
    out.mkdir()
    code = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
    code += "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(20)"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(out / ".incseg.lock")], stdout=subprocess.PIPE
    )
    holder.stdout.readline()
    return out


def _foreign_step(tmp: Path) -> Path:
    """A finished step-0 run whose step_0.pt was replaced by another run's (learning rate 0.02)."""
    run = _checkpoint(tmp).parent
    other = tmp / "other"
    assert main(["run", *TINY, "--set", "train.lr=0.02", "--out", str(other), "--no-progress"]) == 0
    (run / "step_0.pt").write_bytes((other / "step_0.pt").read_bytes())
    return run


def _photo(tmp: Path, name: str = "photo.png") -> Path:
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp / name)
    return tmp / name


def _foreign(tmp: Path) -> Path:
    """A valid torch file that is not an incseg checkpoint."""
    torch.save({"w": torch.zeros(1)}, tmp / "w.pt")
    return tmp / "w.pt"


def _truncated(tmp: Path) -> Path:
    """A real step-0 checkpoint cut to half its length (as a full disk or a killed copy leaves it)."""
    data = _checkpoint(tmp).read_bytes()
    (tmp / "cut.pt").write_bytes(data[: len(data) // 2])
    return tmp / "cut.pt"


def _random_bytes(tmp: Path) -> Path:
    (tmp / "noise.pt").write_bytes(random.Random(0).randbytes(4096))
    return tmp / "noise.pt"


def _refused(tmp: Path) -> Path:
    """A PyTorch file holding a Python object that a weights-only load refuses."""
    torch.save({"model": torch.zeros(1), "args": argparse.Namespace(lr=0.1)}, tmp / "other.pt")
    return tmp / "other.pt"


def _plain_pickle(tmp: Path) -> Path:
    (tmp / "plain.pkl").write_bytes(pickle.dumps({"model": [1.0, 2.0]}))
    return tmp / "plain.pkl"


def _broken_voc(tmp: Path) -> Path:
    root = tmp / "voc"
    shutil.copytree(FIXTURES / "voc", root)
    jpg = root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000904.jpg"
    jpg.write_bytes(jpg.read_bytes()[:3000])
    return root


def _yaml_bomb(tmp: Path) -> Path:
    """A "billion laughs" file: nine levels of nine aliases each, 9^9 strings once expanded."""
    rows = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        rows.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return _write(tmp / "bomb.yaml", "\n".join([*rows, "train: {lr: *i}"]) + "\n")


def _dangling_link(tmp: Path) -> Path:
    """A symbolic link to a file that does not exist (yet)."""
    (tmp / "i.pt").symlink_to(tmp / "later.pt")
    return tmp / "i.pt"


# (what, argv factory given a temporary folder, expected text in the error)
CASES = [
    (
        "config key typo",
        lambda t: ["run", "--set", "train.lr_incremetal=0.1", "--out", str(t / "o")],
        "train: unknown key(s) ['lr_incremetal']; valid keys:",
    ),
    (
        "YAML file with an unknown section",
        lambda t: ["run", str(_write(t / "c.yaml", "trian: {lr: 1}\n")), "--out", str(t / "o")],
        "unknown key(s) ['trian']",
    ),
    (
        "wrong type",
        lambda t: ["run", "--set", "train.epochs=ten", "--out", str(t / "o")],
        "train.epochs: expected int",
    ),
    (
        "unknown setting",
        lambda t: ["run", "--set", "protocol.setting=15-6", "--out", str(t / "o")],
        "protocol.setting: unknown voc setting '15-6'; valid settings:",
    ),
    (
        "unknown method",
        lambda t: ["run", "--set", "method.name=icarl", "--out", str(t / "o")],
        "method.name: unknown value 'icarl'; valid choices:",
    ),
    (
        "unknown add-on",
        lambda t: ["run", "--set", "method.name=mib+sdr", "--out", str(t / "o")],
        "method.name: unknown add-on 'sdr'; valid add-ons: ['ewf', 'nest', 'ucd']",
    ),
    (
        "add-on key out of range",
        lambda t: [
            "run",
            "--set",
            "method.name=mib+nest",
            "--set",
            "method.nest.epochs=-1",
            "--out",
            str(t / "o"),
        ],
        "method.nest.epochs: must be in [0, 1,000], got -1",
    ),
    (
        "RCIL without its architecture",
        lambda t: ["run", "--set", "method.name=rcil", "--out", str(t / "o")],
        "model.architecture: method 'rcil' trains the 'rcil' architecture",
    ),
    (
        "outside method: module missing",
        lambda t: ["run", "--set", "method.name=no_such_module:Foo", "--out", str(t / "o")],
        "method.name: 'no_such_module:Foo': cannot import module 'no_such_module'",
    ),
    (
        "outside method: not a Method",
        lambda t: ["run", "--set", "method.name=collections:OrderedDict", "--out", str(t / "o")],
        "method.name: 'collections:OrderedDict' is not a method: expected a @dataclass subclass",
    ),
    (
        "ADE20K official lists with overlap",
        lambda t: [
            "run",
            "ade/100-50-mib",
            "--set",
            "protocol.mode=overlap",
            "--out",
            str(t / "o"),
        ],
        "protocol.split_source: no official lists for ade 100-50 (overlap); shipped: 100-10/disjoint",
    ),
    (
        "unknown test selection",
        lambda t: ["run", "--set", "protocol.test_selection=disjoint", "--out", str(t / "o")],
        "protocol.test_selection: unknown value 'disjoint'; valid choices: ['seen', 'mode']",
    ),
    (
        "In-Place ABN weights on another backbone",
        lambda t: ["run", "--set", "model.pretrained=iabn", "--out", str(t / "o")],
        "model.pretrained: iabn is In-Place ABN's ResNet-101; model.backbone is 'tiny'",
    ),
    (
        "hyperparameter of another method",
        lambda t: ["run", "--set", "method={name: ft, kd_weight: 10}", "--out", str(t / "o")],
        "method: unknown key(s) ['kd_weight']",
    ),
    (
        "impossible value",
        lambda t: ["run", "--set", "train.lr=0", "--out", str(t / "o")],
        "train.lr: must be in (0, 10], got 0.0",
    ),
    (
        "malformed YAML",
        lambda t: ["run", str(_write(t / "c.yaml", "train: {lr: [\n")), "--out", str(t / "o")],
        "c.yaml: invalid YAML at line 2, column 1: expected the node content, but found '<stream end>'",
    ),
    ("config file missing", lambda t: ["run", str(t / "nope.yaml")], "nope.yaml"),
    (
        "dataset root missing",
        lambda t: [
            "run",
            "--set",
            "data.dataset=voc",
            "--set",
            f"data.root={t / 'none'}",
            "--out",
            str(t / "o"),
        ],
        "does not exist (expected a Pascal VOC dataset",
    ),
    (
        "dataset root not given",
        lambda t: [
            "run",
            "--set",
            "data.dataset=ade",
            "--set",
            "protocol.setting=100-50",
            "--out",
            str(t / "o"),
        ],
        "data.root: required for dataset 'ade'",
    ),
    (
        "truncated image met during a run",
        lambda t: [
            "run",
            *TINY,
            "--set",
            "data.dataset=voc",
            "--set",
            f"data.root={_broken_voc(t)}",
            "--set",
            "protocol.setting=19-1",
            "--set",
            "train.batch_size=4",
            "--out",
            str(t / "o"),
            "--no-progress",
        ],
        "2007_000904.jpg: cannot decode image",
    ),
    (
        "run directory holds a run",
        lambda t: ["run", *TINY, "--out", str(_checkpoint(t).parent)],
        "already holds a run (config.yaml, metrics.json, summary.md, step_0.pt)",
    ),
    (
        "unwritable output folder",
        lambda t: ["run", *TINY, "--out", str(_write(t / "file", "x") / "run"), "--no-progress"],
        "cannot create (Not a directory)",
    ),
    (
        "resume with another config",
        lambda t: [
            "run",
            *TINY,
            "--set",
            "train.lr=0.5",
            "--out",
            str(_checkpoint(t).parent),
            "--resume",
        ],
        "train.lr: 0.05 -> 0.5",
    ),
    (
        "eval of a text file",
        lambda t: ["eval", str(_write(t / "notes.pt", "hello"))],
        "notes.pt: is not a PyTorch file (corrupt bytes or another format); expected an incseg checkpoint",
    ),
    (
        "eval of random bytes",
        lambda t: ["eval", str(_random_bytes(t))],
        "noise.pt: is not a PyTorch file (corrupt bytes or another format)",
    ),
    (
        "eval of an empty file",
        lambda t: ["eval", str(_write(t / "empty.pt", ""))],
        "empty.pt: is empty",
    ),
    (
        "eval of a truncated checkpoint",
        lambda t: ["eval", str(_truncated(t))],
        "cut.pt: is truncated or corrupt (an incomplete PyTorch zip archive); expected an incseg checkpoint",
    ),
    (
        "eval of a PyTorch file holding other Python objects",
        lambda t: ["eval", str(_refused(t))],
        "other.pt: holds Python objects that a safe (weights-only) load refuses: it was written by another program",
    ),
    (
        "predict with a plain Python pickle",
        lambda t: [
            "predict",
            str(_plain_pickle(t)),
            str(FIXTURES / "voc" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000904.jpg"),
            "--out",
            str(t / "p"),
        ],
        "plain.pkl: is a pickle that a safe (weights-only) load refuses",
    ),
    (
        "resume of a run whose step checkpoint is truncated",
        lambda t: ["run", *TINY, "--out", str(_truncated_step(t)), "--resume", "--no-progress"],
        "step_0.pt: is truncated or corrupt (an incomplete PyTorch zip archive); expected an incseg checkpoint",
    ),
    (
        "import-checkpoint of random bytes",
        lambda t: [
            "import-checkpoint",
            str(_random_bytes(t)),
            "demo",
            "--step",
            "0",
            "--out",
            str(t / "i.pt"),
        ],
        "noise.pt: is not a PyTorch file (corrupt bytes or another format); expected a step checkpoint of MiB, PLOP or cssegmentation, or a detectron2 model_final.pth",
    ),
    (
        "backbone weights that are a truncated file",
        lambda t: [
            "run",
            *TINY,
            "--set",
            "model.backbone=resnet50",
            "--set",
            "model.pretrained=none",
            "--set",
            f"model.backbone_weights={_truncated(t)}",
            "--out",
            str(t / "o"),
        ],
        "cut.pt: is truncated or corrupt (an incomplete PyTorch zip archive); expected In-Place ABN's ImageNet ResNet",
    ),
    (
        "eval of a foreign torch file",
        lambda t: ["eval", str(_foreign(t))],
        "w.pt: not an incseg checkpoint",
    ),
    (
        "eval of a missing checkpoint",
        lambda t: ["eval", str(t / "step_9.pt")],
        "step_9.pt' not found",
    ),
    (
        "checkpoint with other classifier sizes",
        lambda t: ["eval", str(_tampered(t, lambda c: c.update(channels_per_step=[11])))],
        "checkpoint classifier sizes [11] do not match step 0 of 15-5 [16]",
    ),
    (
        "checkpoint weights of another model",
        lambda t: [
            "eval",
            str(
                _tampered(
                    t, lambda c: c["model"].update({"backbone.layer9.weight": torch.zeros(1)})
                )
            ),
        ],
        "checkpoint weights do not fit a tiny model: missing [], unexpected ['backbone.layer9.weight']",
    ),
    (
        "backbone weights file missing",
        lambda t: [
            "run",
            *TINY,
            "--set",
            "model.backbone=resnet50",
            "--set",
            "model.pretrained=none",
            "--set",
            f"model.backbone_weights={t / 'iabn.pth.tar'}",
            "--out",
            str(t / "o"),
        ],
        "iabn.pth.tar",
    ),
    (
        "TensorBoard option misspelt",
        lambda t: ["run", "--set", "train.tensorboard=always", "--out", str(t / "o")],
        "train.tensorboard: unknown value 'always'; valid choices: ['auto', 'on', 'off']",
    ),
    (
        "compare: Joint with 0 epochs",
        lambda t: [
            "compare",
            "--methods",
            "ft",
            "--joint",
            "--joint-epochs",
            "0",
            "--out",
            str(t / "o"),
        ],
        "--joint-epochs: must be in [1, 10,000], got 0",
    ),
    (
        "compare: unknown method",
        lambda t: ["compare", "--methods", "ft,icarl", "--out", str(t / "o")],
        "--methods: method.name: unknown value 'icarl'",
    ),
    (
        "data check of a missing root",
        lambda t: ["data", "check", "voc", "--root", str(t / "none")],
        "does not exist",
    ),
    (
        "an exemplar memory larger than step 0's training set",
        lambda t: [
            "run",
            *TINY,
            "--set",
            "method={name: dkd, memory_size: 500}",
            "--set",
            "model.architecture=dkd",
            "--set",
            "protocol.last_step=1",
            "--out",
            str(t / "o"),
        ],
        "method.memory_size 500: more than the",
    ),
    (
        "a -M variant named as a method",
        lambda t: ["run", "--set", "method.name=ssul-m", "--out", str(t / "o")],
        "the -M variant is 'ssul' with method.memory_size",
    ),
    (
        "a memory-following method set to the other mode",
        lambda t: [
            "run",
            "--set",
            "method={name: star, mode: disjoint}",
            "--set",
            "model.architecture=star",
            "--out",
            str(t / "o"),
        ],
        "method.mode: 'star' follows protocol.mode ('overlap')",
    ),
    (
        "momentum 0 with Nesterov",
        lambda t: ["run", "--set", "train.momentum=0", "--out", str(t / "o")],
        "train.momentum: Nesterov momentum (train.nesterov: true) needs momentum > 0",
    ),
    (
        "scale_min above scale_max",
        lambda t: [
            "run",
            "--set",
            "data.scale_min=1.5",
            "--set",
            "data.scale_max=1",
            "--out",
            str(t / "o"),
        ],
        "data.scale_min/scale_max: need scale_min <= scale_max, got 1.5, 1.0",
    ),
    (
        "shapes set too large for memory",
        lambda t: [
            "run",
            "--set",
            "data.image_size=1024",
            "--set",
            "data.num_train=5000",
            "--out",
            str(t / "o"),
        ],
        "data.num_train/num_test/image_size: 5000 + 300 shapes images of 1024 px take 20.7 GiB in memory",
    ),
    (
        "fewer training images than batch norm needs",
        lambda t: [
            "run",
            *TINY,
            "--set",
            "data.num_train=1",
            "--out",
            str(t / "o"),
            "--no-progress",
        ],
        "step 0: 1 training image(s) and train.batch_size 8 give batches of 1 image(s) per process; batch norm needs 2",
    ),
    # -- run directories, checkpoints and predict under misuse (docs/reliability.md) --
    (
        "an empty config file",
        lambda t: ["run", str(_write(t / "c.yaml", "# nothing here\n")), "--out", str(t / "o")],
        "lists no key; a config names at least what it changes from the defaults",
    ),
    (
        "a config file that is not UTF-8 text",
        lambda t: ["run", str(_bytes(t / "c.yaml", "name: caf\xe9\n".encode("latin-1")))],
        "not a UTF-8 text file (byte 9 is 0xe9)",
    ),
    (
        "a run name that leaves runs/",
        lambda t: ["run", *TINY, "--set", "name=../../x"],
        "name: '../../x' must be one folder name",
    ),
    (
        "an --out another incseg process is writing",
        lambda t: ["run", *TINY, "--out", str(_locked_dir(t)), "--no-progress"],
        "is writing it; wait for it to finish, or choose another --out",
    ),
    (
        "resume with another run's step_0.pt (other learning rate)",
        lambda t: ["run", "--resume", str(_foreign_step(t)), "--no-progress"],
        "step_0.pt: another run's step 0, trained with a different config (train.lr: 0.02 -> 0.05)",
    ),
    (
        "eval a checkpoint whose bytes changed",
        lambda t: [
            "eval",
            str(_tampered(t, lambda c: c["model"]["head.reduce.weight"].add_(1), keep_digest=True)),
            "--no-progress",
        ],
        "corrupt: its content does not match the checksum recorded when it was written",
    ),
    (
        "eval a checkpoint without its model",
        lambda t: ["eval", str(_tampered(t, lambda c: c.pop("model"))), "--no-progress"],
        "incomplete incseg checkpoint: no ['model'] entry",
    ),
    (
        "predict into the image's own folder",
        lambda t: ["predict", str(_checkpoint(t)), str(_photo(t)), "--out", str(t)],
        "would overwrite the image itself",
    ),
    (
        "predict two images with one output name",
        lambda t: [
            "predict",
            str(_checkpoint(t)),
            str(_photo(t, "a.png")),
            str(_photo(t, "a.jpg")),
            "--out",
            str(t / "p"),
        ],
        "would both be",
    ),
    (
        "predict --out naming a file",
        lambda t: [
            "predict",
            str(_checkpoint(t)),
            str(_photo(t)),
            "--out",
            str(_write(t / "f", "x")),
        ],
        "is a file, expected a folder",
    ),
    (
        "--start-step below 0",
        lambda t: ["run", "--start-step", "-1", "--out", str(t / "o")],
        "--start-step: a step is 0 or more, got -1",
    ),
    (
        "--start-step without --start-from",
        lambda t: ["run", *TINY, "--start-step", "1", "--out", str(t / "o")],
        "--start-step 1 names the last step taken from --start-from RUN_DIR, which is missing",
    ),
    (
        "--start-from a path that is not there",
        lambda t: ["run", *TINY, "--start-from", str(t / "base.pt"), "--out", str(t / "o")],
        "base.pt: no such run directory or checkpoint file",
    ),
    (
        "--start-from step-0 weights made with another config",
        lambda t: [
            "run",
            *TINY,
            "--set",
            "train.lr=0.5",
            "--start-from",
            str(_checkpoint(t)),
            "--out",
            str(t / "o"),
        ],
        "its step 0 was made with another config (train.lr: 0.05 -> 0.5)",
    ),
    (
        "--start-from step-0 weights for a method that needs step 0's training",
        lambda t: [
            "run",
            *TINY,
            "--set",
            "method.name=ewc",
            "--start-from",
            str(_checkpoint(t)),
            "--out",
            str(t / "o"),
        ],
        "ewc keeps what the training iterations of step 0 gather",
    ),
    (
        "an empty --out",
        lambda t: ["run", *TINY, "--out", ""],
        "--out: an empty path; name the run directory",
    ),
    (
        "an --out name longer than the file system allows",
        lambda t: ["run", *TINY, "--out", str(t / ("x" * 300))],
        "File name too long (a file or folder name holds at most 255 bytes)",
    ),
    # -- YAML the safe loader reads without a word, configs that change nothing (docs/guards.md) --
    (
        "a YAML config with a section given twice",
        lambda t: [
            "run",
            str(
                _write(
                    t / "c.yaml", "train: {lr: 0.5}\nmodel: {backbone: tiny}\ntrain: {epochs: 2}\n"
                )
            ),
            "--out",
            str(t / "o"),
        ],
        "c.yaml: key 'train' is given twice (lines 1 and 3); YAML would keep only the last",
    ),
    (
        "a --set value with a key given twice",
        lambda t: ["run", "--set", "method={name: mib, name: ft}", "--out", str(t / "o")],
        "--set 'method={name: mib, name: ft}': key 'method.name' is given twice (line 1, columns 2 and 13)",
    ),
    (
        "a YAML alias bomb (billion laughs)",
        lambda t: ["run", str(_yaml_bomb(t)), "--out", str(t / "o")],
        "bomb.yaml: alias *a at line 2, column 8: incseg reads no YAML anchors / aliases in a config",
    ),
    (
        "a YAML config nested hundreds of levels deep",
        lambda t: [
            "run",
            str(_write(t / "c.yaml", "train: " + "[" * 500 + "]" * 500)),
            "--out",
            str(t / "o"),
        ],
        "c.yaml: nested more than 64 levels deep at line 1",
    ),
    (
        "a config whose only section is null",
        lambda t: ["run", str(_write(t / "c.yaml", "train:\n")), "--out", str(t / "o")],
        "c.yaml: lists no key (only empty sections: train: null); a config names at least what it changes",
    ),
    (
        "a config whose sections are all empty",
        lambda t: [
            "run",
            str(_write(t / "c.yaml", "train: {}\nmodel: {}\n")),
            "--out",
            str(t / "o"),
        ],
        "c.yaml: lists no key (only empty sections: train: {}, model: {})",
    ),
    (
        "a DeepLab method on the query-based model",
        lambda t: ["run", "--set", "model.architecture=mask2former", "--out", str(t / "o")],
        "model.architecture: mask2former is query-based (class scores per query and masks, no per-pixel logits), and method 'mib' trains per-pixel logits; the methods that train it: ['balconpas', 'comformer', 'comformer_ft', 'eclipse', 'm2f_ft', 'm2f_mib', 'm2f_plop', 'simcis']",
    ),
    (
        "a query-based method on DeepLab",
        lambda t: ["run", "demo", "--set", "method.name=comformer", "--out", str(t / "o")],
        "model.architecture: method 'comformer' trains the 'mask2former' architecture; set model.architecture: mask2former",
    ),
    (
        "an add-on on a query-based method",
        lambda t: ["run", "demo-m2f", "--set", "method.name=m2f_ft+ucd", "--out", str(t / "o")],
        "method.name: 'm2f_ft+ucd': the add-ons ['ewf', 'nest', 'ucd'] work on DeepLab's per-pixel classifiers, not on the query-based model; name the method alone (m2f_ft)",
    ),
    (
        "an add-on named twice",
        lambda t: ["run", "--set", "method.name=mib+ewf+ewf", "--out", str(t / "o")],
        "method.name: 'mib+ewf+ewf' names the add-on(s) ['ewf'] more than once; each add-on applies once: name it once (mib+ewf)",
    ),
    (
        "saliency maps for a method that reads none",
        lambda t: [
            "run",
            "--set",
            "data.dataset=voc",
            "--set",
            f"data.root={t}",
            "--set",
            f"data.saliency={t}",
            "--out",
            str(t / "o"),
        ],
        "data.saliency: method 'mib' has no unknown class and reads no saliency map, so the folder would be ignored; the methods that read it: ['ssul']",
    ),
    (
        "import-checkpoint --out a dangling symbolic link",
        lambda t: [
            "import-checkpoint",
            str(_random_bytes(t)),
            "demo",
            "--step",
            "0",
            "--out",
            str(_dangling_link(t)),
        ],
        "i.pt: exists as a symbolic link to",
    ),
    (
        "compare --method-set of a key every row shares (the setting)",
        lambda t: [
            "compare",
            "--methods",
            "mib,ft",
            "--method-set",
            "mib.protocol.setting=10-1",
            "--out",
            str(t / "c"),
        ],
        "protocol.setting is the same for every row (the table's columns: the setting's classes",
    ),
    (
        "compare into an --out another incseg process is writing",
        lambda t: [
            "compare",
            *TINY,
            "--methods",
            "ft",
            "--out",
            str(_locked_dir(t)),
            "--no-progress",
        ],
        "is writing it; wait for it to finish, or choose another --out",
    ),
]

if not torch.cuda.is_available():
    CASES.append(
        (
            "train.device=cuda on a machine without CUDA",
            lambda t: ["run", *TINY, "--set", "train.device=cuda", "--out", str(t / "o")],
            "train.device: cuda, but PyTorch finds no CUDA device on this machine",
        )
    )


def _below_case(key: str, valid: Range, method: str | None = None) -> tuple:
    """The case of ``key`` set just below its range (``method``: a hyperparameter of it)."""
    value = valid.low if valid.low_open else valid.low - 1
    if method is None and key in LIST_KEYS:  # a list: its first element named
        return (
            f"{key} = [{value:g}]",
            lambda t: ["run", "--set", f"{key}=[{value}]", "--out", str(t / "o")],
            f"{key}[0]: must be in {valid.describe()}",
        )
    if method is None:
        return (
            f"{key} = {value:g}",
            lambda t: ["run", "--set", f"{key}={value}", "--out", str(t / "o")],
            f"{key}: must be in {valid.describe()}",
        )
    name = key.removeprefix("method.")
    return (
        f"{key} = {value:g} ({method})",
        lambda t: [
            "run",
            "--set",
            f"method={{name: {method}, {name}: {value}}}",
            "--out",
            str(t / "o"),
        ],
        f"{key}: must be in {valid.describe()}",
    )


def _range_cases() -> list:
    """One case per ranged key (a method hyperparameter once, with the first method that has it)."""
    cases = [_below_case(key, valid) for key, valid in RANGES.items()]
    seen = set()
    for name, cls in sorted(METHODS.items()):
        for key, valid in ranges_of(cls).items():
            if (key, valid) not in seen:
                seen.add((key, valid))
                cases.append(_below_case(f"method.{key}", valid, name))
    return cases


CASES += _range_cases()


@pytest.mark.parametrize(("what", "argv", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error(what, argv, expected, tmp_path, capsys):
    args = argv(tmp_path)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert expected in err
    assert "weights_only" not in err  # never suggest unsafe loading


def test_non_finite_loss_stops_with_terms_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "run",
        *TINY,
        "--set",
        "protocol.last_step=1",
        "--set",
        "method={name: ewc, weight: 1e6}",
        "--set",
        "train.lr_incremental=1.0",
        "--set",
        "train.log_interval=1",
        "--set",
        "train.epochs_incremental=3",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: non-finite loss at step 1, epoch " in err and ", iteration " in err
    assert "ce=" in err and "penalty=" in err and "Traceback" not in err
    from incseg.engine.checkpoint import load_checkpoint

    assert load_checkpoint(out / "step_0.pt")["step"] == 0 and not (out / "step_1.pt").exists()
