"""A careless colleague's misuse, through the command line as a user meets it: nothing the user
made is lost, overwritten or mixed with another run, nothing named inside a file runs code, and
every mistake ends in one ``error:`` line (exit 2), not a traceback (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from incseg.cli import main
from incseg.engine.checkpoint import content_digest, load_checkpoint

HOLD_LOCK = (
    "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
    "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True); time.sleep(60)"
)
FAST = ["--no-progress", "--set", "data.num_train=40", "--set", "data.num_test=12"]


def _numbers(run_dir):
    steps = json.loads((run_dir / "metrics.json").read_text())["steps"]
    return [(s["miou_all"], s["per_class"], s["losses"]) for s in steps]


def _incseg(*args, cwd=None, env=None, preexec_fn=None):
    """``python -m incseg ARGS`` in a process of its own: (exit code, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "incseg", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        preexec_fn=preexec_fn,
        check=False,
    )
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def reference(tiny_config_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("misuse") / "ref"
    assert main(["run", str(tiny_config_path), "--out", str(out), *FAST]) == 0
    return out


def _copy_without_step_1(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "step_1.pt").unlink()
    (run / "summary.md").unlink()
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["steps"] = metrics["steps"][:1]
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


# -- data lost or mixed --


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_stale_lock(
    tiny_config_path, tmp_path, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out / ".incseg.lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["run", str(tiny_config_path), "--out", str(out), *FAST]) == 2
        err = capsys.readouterr().err
        assert "another incseg process (pid 4242) is writing it" in err
        assert not (out / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    args = ["run", str(tiny_config_path), "--out", str(out), *FAST, "--set", "protocol.last_step=0"]
    assert main(args) == 0  # the lock died with its process


def test_resume_with_a_corrupt_metrics_file_keeps_the_finished_step(
    reference, tiny_config_path, tmp_path
):
    run = _copy_without_step_1(reference, tmp_path)
    (run / "metrics.json").write_text("{not json")
    before = (run / "step_0.pt").stat().st_mtime_ns
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    assert (run / "step_0.pt").stat().st_mtime_ns == before  # not retrained, not rewritten
    assert _numbers(run) == _numbers(reference)
    kept = list(run.glob("metrics.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_text() == "{not json"


def test_resume_refuses_another_runs_step_checkpoint(reference, tiny_config_path, tmp_path, capsys):
    other = tmp_path / "other"
    last0 = ["--set", "protocol.last_step=0"]
    assert (
        main(
            [
                "run",
                str(tiny_config_path),
                "--out",
                str(other),
                *FAST,
                "--set",
                "train.lr=0.05",
                *last0,
            ]
        )
        == 0
    )
    ten = tmp_path / "ten"
    assert (
        main(
            [
                "run",
                str(tiny_config_path),
                "--out",
                str(ten),
                *FAST,
                "--set",
                "protocol.setting=10-5-5",
                *last0,
            ]
        )
        == 0
    )
    capsys.readouterr()
    for source, differs in (
        (other, "train.lr: 0.05 -> 0.02"),
        (ten, "protocol.setting: '10-5-5' -> '15-5'"),
    ):
        run = _copy_without_step_1(reference, tmp_path / source.name)
        shutil.copy(source / "step_0.pt", run / "step_0.pt")
        assert main(["run", "--resume", str(run), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert (
            "step_0.pt: another run's step 0" in err and differs in err and "Traceback" not in err
        )
        assert not (run / "step_1.pt").exists() and not (run / "last.pt").exists()


def test_an_empty_or_keyless_config_is_refused(reference, tmp_path, capsys):
    run = _copy_without_step_1(reference, tmp_path)
    (run / "config.yaml").write_text("")
    assert main(["run", "--resume", str(run), "--no-progress"]) == 2
    assert "config.yaml: lists no key" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == "" and not (run / "step_1.pt").exists()
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert main(["run", str(tmp_path / "empty.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "lists no key" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_overwrite_leaves_only_the_new_run(tiny_config_path, tmp_path, capsys):
    out = tmp_path / "run"
    three = [*FAST, "--set", "protocol.setting=10-5-5", "--set", "train.tensorboard=off"]
    assert main(["run", str(tiny_config_path), "--out", str(out), *three]) == 0
    (out / "notes.txt").write_text("mine")  # not a run's file: left alone
    assert main(["run", str(tiny_config_path), "--out", str(out), *FAST, "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("step_*.pt")) == ["step_0.pt", "step_1.pt"]
    assert (out / "notes.txt").read_text() == "mine"
    capsys.readouterr()
    assert main(["eval", str(out), "--no-progress"]) == 0
    assert "step 1 of shapes 15-5" in capsys.readouterr().out


def test_a_checkpoint_with_flipped_bytes_is_refused(reference, tmp_path, capsys):
    data = bytearray((reference / "step_1.pt").read_bytes())
    weights = data.find(b"data/") + 4096  # inside the tensor records of the zip archive
    data[weights : weights + 2000] = bytes(b ^ 0xFF for b in data[weights : weights + 2000])
    (tmp_path / "step_1.pt").write_bytes(bytes(data))
    assert main(["eval", str(tmp_path / "step_1.pt"), "--no-progress"]) == 2
    assert "corrupt: its content does not match the checksum" in capsys.readouterr().err


def test_the_digest_changes_with_one_weight():
    state = {"model": {"w": torch.zeros(3)}, "step": 1}
    before = content_digest(state)
    state["model"]["w"][1] = 1e-30
    assert content_digest(state) != before
    assert content_digest({"a": torch.ones(2, dtype=torch.bfloat16)}) != content_digest(
        {"a": torch.ones(2)}
    )


# -- code that runs --


def test_a_method_named_inside_a_checkpoint_is_never_imported(reference, tmp_path):
    (tmp_path / "helpers.py").write_text(
        "open('RAN', 'w').write('ran')\nfrom incseg.methods.mib import MiB\n"
    )
    checkpoint = load_checkpoint(reference / "step_1.pt")
    checkpoint["config"]["method"]["name"] = "helpers:MiB"
    from incseg.engine.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "model.pt", checkpoint)
    code, err = _incseg("eval", "model.pt", "--no-progress", cwd=tmp_path)
    assert code == 0, err[-2000:]
    assert not (tmp_path / "RAN").exists()


def test_a_run_name_stays_one_folder(tiny_config_path, tmp_path, capsys):
    assert main(["run", str(tiny_config_path), "--set", "name=../../escaped"]) == 2
    assert "name: '../../escaped' must be one folder name" in capsys.readouterr().err


# -- tracebacks where a message belongs --


def _file_size_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_full_disk_while_saving_is_a_message(tiny_config_path, tmp_path):
    out = tmp_path / "run"
    code, err = _incseg("run", tiny_config_path, "--out", out, *FAST, preexec_fn=_file_size_limit)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert "the disk is full or a file-size limit was reached" in err
    assert not list(out.glob(".*.tmp"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_anything_is_written(
    tiny_config_path, tmp_path, capsys
):
    out = tmp_path / "run"
    assert (
        main(["run", str(tiny_config_path), "--out", str(out), *FAST, "--set", "train.device=cuda"])
        == 2
    )
    assert "train.device: cuda, but PyTorch finds no CUDA device" in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_start_leaves_the_folder_reusable(tiny_config_path, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    out.mkdir()
    (out / "tensorboard").write_text("a file where the folder goes")
    args = ["run", str(tiny_config_path), "--out", str(out), *FAST, "--set", "protocol.last_step=0"]
    assert main([*args, "--set", "train.tensorboard=on"]) == 2
    assert "cannot be created" in capsys.readouterr().err
    assert not (out / "config.yaml").exists()
    assert main([*args, "--set", "train.tensorboard=off"]) == 0


def test_eval_and_resume_of_an_epoch_checkpoint(tiny_config_path, reference, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _incseg(
        "run", tiny_config_path, "--out", out, *FAST, env={"INCSEG_KILL_AT": "epoch:1:1"}
    )
    assert code == -signal.SIGKILL, err[-2000:]
    assert main(["eval", str(out / "last.pt"), "--no-progress"]) == 0
    assert "step 1, after epoch 1 of the step" in capsys.readouterr().out
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])  # truncated: the step restarts
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    assert _numbers(out) == _numbers(reference)
    assert len(list(out.glob("last.pt.unreadable-*"))) == 1


def test_checkpoints_and_config_files_are_checked(reference, tmp_path, capsys):
    checkpoint = torch.load(reference / "step_1.pt", weights_only=False)
    del checkpoint["model"]
    torch.save(checkpoint, tmp_path / "nomodel.pt")
    assert main(["eval", str(tmp_path / "nomodel.pt"), "--no-progress"]) == 2
    assert "incomplete incseg checkpoint: no ['model'] entry" in capsys.readouterr().err
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert main(["run", str(tmp_path / "latin1.yaml")]) == 2
    assert "not a UTF-8 text file" in capsys.readouterr().err


# -- silent surprises --


def test_set_method_name_starts_the_method_from_its_own_defaults(tmp_path, capsys):
    args = [
        "run",
        "demo",
        "--out",
        str(tmp_path / "ft"),
        *FAST,
        "--set",
        "method.name=ft",
        "--set",
        "train.epochs=1",
        "--set",
        "protocol.last_step=0",
        "--set",
        "data.image_size=32",
        "--set",
        "data.crop_size=32",
    ]
    assert main(args) == 0
    assert "the config's ['kd_weight'] belong to 'mib' and were dropped" in capsys.readouterr().out
    assert main(["run", "demo", "--set", "method.kdw=1"]) == 2
    assert "unknown key(s) ['kdw']" in capsys.readouterr().err


def test_files_follow_the_umask_and_an_interrupt_says_how_to_continue(tiny_config_path, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "incseg",
            "run",
            str(tiny_config_path),
            "--out",
            str(out),
            *FAST,
            "--set",
            "train.epochs=3",
        ],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.umask(0o027),  # noqa: PLW1509
    )
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate()[1]
    assert proc.returncode == 130, err[-2000:]
    assert f"continue it with: incseg run --resume {out}" in err
    modes = {
        p.name: p.stat().st_mode & 0o777
        for p in out.iterdir()
        if p.is_file() and not p.name.startswith(".")
    }
    assert modes and set(modes.values()) == {0o640}, modes


def test_start_from_the_out_directory_itself_is_refused(
    reference, tiny_config_path, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    args = [
        "run",
        str(tiny_config_path),
        "--out",
        str(run),
        "--start-from",
        str(run),
        "--overwrite",
    ]
    assert main([*args, *FAST]) == 2  # --overwrite would first remove the steps it is to start from
    assert "is the --out directory itself" in capsys.readouterr().err
    assert sorted(p.name for p in run.glob("step_*.pt")) == ["step_0.pt", "step_1.pt"]


def test_a_run_directory_config_with_a_section_twice_is_refused(reference, tmp_path, capsys):
    run = _copy_without_step_1(reference, tmp_path)
    text = (run / "config.yaml").read_text() + "train:\n  lr: 0.5\n"  # a hand-edit, appended
    (run / "config.yaml").write_text(text)
    assert main(["run", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml: key 'train' is given twice (lines " in err and "Traceback" not in err
    assert (run / "config.yaml").read_text() == text and not (run / "step_1.pt").exists()


def test_import_checkpoint_never_replaces_a_dangling_link(tmp_path, capsys):
    link = tmp_path / "imported.pt"
    link.symlink_to(tmp_path / "elsewhere" / "model.pt")
    source = tmp_path / "mib.pth"
    source.write_bytes(b"not read: --out is checked first")
    args = ["import-checkpoint", str(source), "demo", "--step", "0", "--out", str(link)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: --out {link}: exists as a symbolic link to "
        f"'{tmp_path / 'elsewhere' / 'model.pt'}', which is missing; import-checkpoint never "
        "replaces a path: choose another file\n"
    )
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / "elsewhere" / "model.pt")
    assert not (tmp_path / "elsewhere").exists()
