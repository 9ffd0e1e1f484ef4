"""A careless colleague's misuse of run directories and their files, through the command line:
an exemplar memory file edited or cut short, a run directory handed over by someone else (its
config naming outside code, a foreign step checkpoint), a config.yaml that is not text, and the
start-step options given wrong. Each ends in one ``error:`` line (exit 2) and leaves nothing
behind (docs/reliability.md)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from incseg.cli import main
from incseg.engine.checkpoint import load_checkpoint, save_checkpoint

FAST = ["--no-progress", "--set", "data.num_train=40", "--set", "data.num_test=12"]
SSUL_M = [
    "--set",
    "method.name=ssul",
    "--set",
    "model.architecture=ssul",
    "--set",
    "protocol.labels=ssul",
    "--set",
    "method.memory_size=4",
    "--set",
    "protocol.setting=15-1",
    "--set",
    "protocol.last_step=1",
]


@pytest.fixture(scope="module")
def memory_run(tiny_config_path, tmp_path_factory):
    """A finished two-step SSUL-M run (memory of 4 images at step 1)."""
    out = tmp_path_factory.mktemp("memory") / "run"
    assert main(["run", str(tiny_config_path), "--out", str(out), *FAST, *SSUL_M]) == 0
    return out


def _interrupted_in_step_1(memory_run, tmp_path):
    """The run as a kill during step 1 leaves it: memory chosen, step 1 unfinished."""
    run = tmp_path / "run"
    shutil.copytree(memory_run, run)
    (run / "step_1.pt").unlink()
    (run / "summary.md").unlink()
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "steps": metrics["steps"][:1]}))
    return run


def _swap_index(raw):
    raw["images"][0]["index"] = 99999


def _minus_one(raw):
    raw["images"][0]["index"] = -1


def _doubled(raw):
    raw["images"] = raw["images"] + raw["images"]


def _emptied(raw):
    raw["images"] = []


def _text_index(raw):
    raw["images"][0]["index"] = "3"


def _other_classes(raw):
    raw["images"][0]["classes"] = [1, 2, 3]


EDITS = {
    "index 99999": (_swap_index, True),
    "index -1": (_minus_one, True),
    "entries doubled": (_doubled, True),
    "images []": (_emptied, True),
    "a text index": (_text_index, True),
    "other classes": (_other_classes, True),
    # The same edits with the digest removed (a file of an older incseg has none): the entries'
    # own checks catch them.
    "index 99999, no digest": (_swap_index, False),
    "entries doubled, no digest": (_doubled, False),
    "images [], no digest": (_emptied, False),
    "a text index, no digest": (_text_index, False),
}


@pytest.mark.parametrize("what", list(EDITS))
def test_an_edited_memory_file_is_named_and_never_used(
    memory_run, tiny_config_path, tmp_path, capsys, what
):
    run = _interrupted_in_step_1(memory_run, tmp_path)
    path = run / "memory_step_1.json"
    raw = json.loads(path.read_text())
    edit, keep_digest = EDITS[what]
    edit(raw)
    if not keep_digest:
        raw.pop("sha256")
    path.write_text(json.dumps(raw))
    args = ["run", str(tiny_config_path), "--out", str(run), "--resume", *FAST, *SSUL_M]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert f"{path}: not the exemplar memory of step 1 of this run" in err
    assert "move it away and resume to choose the memory again" in err
    assert not (run / "step_1.pt").exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "Expecting value"),
        (b"[1, 2]", 'expected {"step": K, "images": [...]}'),
        (b'{"step": 2, "images": []}', "it is the memory of step 2"),
        (b"\xff\xfe", "can't decode byte"),
    ],
    ids=["empty", "a list", "another step's", "not text"],
)
def test_a_malformed_memory_file_is_named(
    memory_run, tiny_config_path, tmp_path, capsys, content, expected
):
    run = _interrupted_in_step_1(memory_run, tmp_path)
    (run / "memory_step_1.json").write_bytes(content)
    args = ["run", str(tiny_config_path), "--out", str(run), "--resume", *FAST, *SSUL_M]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "memory_step_1.json: not the exemplar memory of step 1" in err and expected in err


def test_a_memory_file_moved_away_is_chosen_again_identically(
    memory_run, tiny_config_path, tmp_path
):
    run = _interrupted_in_step_1(memory_run, tmp_path)
    (run / "memory_step_1.json").rename(tmp_path / "aside.json")
    args = ["run", str(tiny_config_path), "--out", str(run), "--resume", *FAST, *SSUL_M]
    assert main(args) == 0
    kept = json.loads((memory_run / "memory_step_1.json").read_text())
    assert json.loads((run / "memory_step_1.json").read_text()) == kept
    assert len(kept["images"]) == 4 and len(kept["sha256"]) == 64


@pytest.fixture(scope="module")
def plain_run(tiny_config_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    args = ["run", str(tiny_config_path), "--out", str(out), *FAST, "--set", "protocol.last_step=0"]
    assert main(args) == 0
    return out


def _with_outside_method(plain_run, tmp_path, monkeypatch):
    """A copy of a run whose config.yaml names ``given_method:MiB``; importing it leaves a file (its
    module name is one no other test imports: tests/helpers is a package)."""
    run = tmp_path / "given"
    shutil.copytree(plain_run, run)
    text = (run / "config.yaml").read_text()
    assert "name: mib\n" in text
    (run / "config.yaml").write_text(text.replace("name: mib\n", "name: given_method:MiB\n"))
    (tmp_path / "given_method.py").write_text(
        "open(__file__ + '.RAN', 'w').write('ran')\nfrom incseg.methods.mib import MiB\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return run


def test_a_run_directory_naming_outside_code_is_not_imported_on_resume(
    plain_run, tmp_path, capsys, monkeypatch
):
    run = _with_outside_method(plain_run, tmp_path, monkeypatch)
    assert main(["run", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (
        "'given_method:MiB' is a module:Class path named inside a checkpoint or a run directory"
        in err
    )
    assert "--set method.name=given_method:MiB" in err
    assert not (tmp_path / "given_method.py.RAN").exists() and "given_method" not in sys.modules


def test_a_run_directory_naming_outside_code_is_not_imported_by_start_from(
    plain_run, tiny_config_path, tmp_path, capsys, monkeypatch
):
    source = _with_outside_method(plain_run, tmp_path, monkeypatch)
    out = tmp_path / "new"
    args = ["run", str(tiny_config_path), "--out", str(out), "--start-from", str(source), *FAST]
    assert main([*args, "--set", "protocol.last_step=1"]) == 2
    err = capsys.readouterr().err
    assert f"--start-from {source}/config.yaml: method.name: 'given_method:MiB'" in err
    assert not (tmp_path / "given_method.py.RAN").exists() and "given_method" not in sys.modules
    assert not out.exists()


def test_an_outside_method_named_by_the_user_is_trusted_on_resume(
    plain_run, tmp_path, capsys, monkeypatch
):
    run = _with_outside_method(plain_run, tmp_path, monkeypatch)
    args = ["run", "--resume", str(run), "--no-progress", "--set", "method.name=given_method:MiB"]
    assert main(args) == 0  # its step 0 (plain cross-entropy, as MiB's) is the run's own
    assert (tmp_path / "given_method.py.RAN").exists()
    sys.modules.pop("given_method", None)


def test_a_config_yaml_that_is_not_text_is_named(plain_run, tiny_config_path, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    (run / "config.yaml").write_bytes(b"name: caf\xe9\n")
    resume = ["run", str(tiny_config_path), "--out", str(run), "--resume", *FAST]
    start = ["run", str(tiny_config_path), "--out", str(tmp_path / "new"), *FAST]
    for args in (resume, [*start, "--start-from", str(run), "--set", "protocol.last_step=1"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{run}/config.yaml: not a UTF-8 text file (byte 9 is 0xe9)" in err, err
    assert not (tmp_path / "new").exists()


def test_start_from_a_foreign_step_leaves_nothing_in_out(
    plain_run, tiny_config_path, tmp_path, capsys
):
    source = tmp_path / "source"
    shutil.copytree(plain_run, source)
    checkpoint = load_checkpoint(source / "step_0.pt")
    checkpoint["config"]["train"]["lr"] = 0.5  # another run's step 0 in this run's folder
    save_checkpoint(source / "step_0.pt", checkpoint)
    out = tmp_path / "new"
    args = ["run", str(tiny_config_path), "--out", str(out), "--start-from", str(source), *FAST]
    assert main([*args, "--set", "protocol.last_step=1"]) == 2
    err = capsys.readouterr().err
    assert f"{source}/step_0.pt: another run's step 0, trained with a different config" in err
    assert not out.exists()


def test_a_full_disk_at_the_first_save_says_to_run_again_and_leaves_nothing(
    tiny_config_path, tmp_path, capsys, monkeypatch
):
    from incseg.engine import rundir

    monkeypatch.setattr(rundir, "save_checkpoint", lambda path, payload: _raise_full(path))
    out = tmp_path / "run"
    args = ["run", str(tiny_config_path), "--out", str(out), *FAST, "--set", "protocol.last_step=0"]
    assert main([*args, "--set", "train.tensorboard=auto"]) == 2
    err = capsys.readouterr().err
    assert "the disk is full or a file-size limit was reached" in err
    assert "(free space; nothing was saved yet: run the same command again)" in err
    assert "--resume" not in err
    assert not out.exists()  # no config.yaml to resume, no TensorBoard file of the failed run
    monkeypatch.undo()
    assert main(args) == 0  # the same command again, into the same folder


def _raise_full(path):
    from incseg.engine.checkpoint import atomic_write

    def write(handle):
        raise OSError(28, "No space left on device")

    atomic_write(path, write)


def test_a_full_disk_after_a_saved_step_says_to_resume(
    tiny_config_path, tmp_path, capsys, monkeypatch
):
    from incseg.engine import rundir

    real = rundir.save_checkpoint
    monkeypatch.setattr(
        rundir,
        "save_checkpoint",
        lambda path, payload: _raise_full(path) if payload["step"] == 1 else real(path, payload),
    )
    out = tmp_path / "run"
    args = [
        "run",
        str(tiny_config_path),
        "--out",
        str(out),
        *FAST,
        "--set",
        "train.checkpoint_every=0",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"(free space; continue it with: incseg run --resume {out})" in err
    assert (out / "step_0.pt").is_file() and (out / "config.yaml").is_file()
    assert torch.load(out / "step_0.pt", weights_only=True)["step"] == 0
