"""Checkpoints: written atomically, fingerprinted, loaded with ``weights_only=True``.

A checkpoint is a dict of tensors and plain Python data: ``format``, ``version``, ``step``,
``setting``, ``channels_per_step``, ``config`` (resolved, as a plain dict), ``model`` (state dict)
and ``method`` (the method's state across steps), plus library versions and ``sha256``, a digest
of everything else in it (:func:`content_digest`), checked whenever the file is read: a file
whose bytes changed on disk or in transfer is refused instead of evaluated with a corrupted
weight.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from incseg import __version__
from incseg.engine.faults import fault_point
from incseg.errors import CheckpointError, DiskFullError, IncsegError
from incseg.torchfile import load_torch_file

FORMAT = "incseg-checkpoint"
VERSION = 1
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, then rename it over
    ``path`` with the user's umask applied (as a plain ``open`` would); an interrupted or failed
    write leaves any previous ``path`` intact.

    Raises:
        IncsegError: the file cannot be written: the disk is full, a file-size limit was reached,
            or the folder is not writable (the message names the file and keeps the old one).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise IncsegError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        fault_point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(err):
            raise DiskFullError(
                f"cannot write {path}: the disk is full or a file-size limit was reached in "
                f"{path.parent}; the previous {path.name}, if any, is kept"
            ) from None
        if isinstance(err, OSError):
            raise IncsegError(f"cannot write {path}: {err.strerror or err}") from None
        raise


def _disk_full(err: BaseException) -> bool:
    """An out-of-space or file-size error, from the OS or from torch's zip writer (which reports
    it as a RuntimeError from ``inline_container.cc``)."""
    if isinstance(err, OSError):
        return err.errno in _FULL
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "inline_container" in text or "file write failed" in text
    )


def content_digest(data: Any) -> str:
    """SHA-256 over a checkpoint's content: every tensor's dtype, shape and bytes and every other
    value's ``repr``, dict entries in key order. The same content gives the same digest whatever
    its pickling; one changed weight changes it."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
            if flat.numel():  # the tensor's own buffer, not a copy of it
                digest.update(flat.view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(f"D{len(value)}".encode())
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                feed(value[key])
        elif isinstance(value, list | tuple):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                feed(item)
        else:
            digest.update(repr(value).encode())

    feed(data)
    return digest.hexdigest()


REQUIRED = ("step", "config", "model")  # what every incseg checkpoint holds (step_K.pt, last.pt)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Save ``payload`` (see module doc) atomically, adding format and version fields and the
    content digest."""
    data = {
        "format": FORMAT,
        "version": VERSION,
        "incseg": __version__,
        "torch": str(torch.__version__),
        **payload,
    }
    data["sha256"] = content_digest(data)
    atomic_write(Path(path), lambda handle: torch.save(data, handle))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an incseg checkpoint safely (``weights_only=True``).

    Raises:
        CheckpointError: missing file, a file a safe load cannot read (the message says why:
            empty, truncated, not a PyTorch file, or holding objects it refuses; see
            :func:`incseg.torchfile.diagnose`), not an incseg checkpoint, one without the
            entries every checkpoint has, or one whose content no longer matches its digest.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    data = load_torch_file(
        path, "an incseg checkpoint (step_K.pt or last.pt of a run)", map_location=map_location
    )
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an incseg checkpoint (no 'format: {FORMAT}' entry)")
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {data.get('version')} unsupported (expected {VERSION})"
        )
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise CheckpointError(f"{path}: incomplete incseg checkpoint: no {missing} entry")
    recorded = data.pop("sha256", None)  # absent in checkpoints of incseg before 2026-12
    if recorded is not None and content_digest(data) != recorded:
        raise CheckpointError(
            f"{path}: corrupt: its content does not match the checksum recorded when it was written "
            "(bytes changed on disk or in transfer); use another copy of the file"
        )
    return data
