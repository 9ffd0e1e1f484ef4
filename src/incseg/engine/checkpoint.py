"""Checkpoints: written atomically, loaded with ``weights_only=True``.

A checkpoint is a dict of tensors and plain Python data: ``format``, ``version``, ``step``,
``setting``, ``channels_per_step``, ``config`` (resolved, as a plain dict), ``model`` (state dict)
and ``method`` (the method's state across steps), plus library versions.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from incseg import __version__
from incseg.engine.faults import fault_point
from incseg.errors import CheckpointError
from incseg.torchfile import load_torch_file

FORMAT = "incseg-checkpoint"
VERSION = 1


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, then rename it over
    ``path``; an interrupted or failed write leaves any previous ``path`` intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        fault_point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Save ``payload`` (see module doc) atomically, adding format and version fields."""
    data = {
        "format": FORMAT,
        "version": VERSION,
        "incseg": __version__,
        "torch": str(torch.__version__),
        **payload,
    }
    atomic_write(Path(path), lambda handle: torch.save(data, handle))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an incseg checkpoint safely (``weights_only=True``).

    Raises:
        CheckpointError: missing file, a file a safe load cannot read (the message says why:
            empty, truncated, not a PyTorch file, or holding objects it refuses; see
            :func:`incseg.torchfile.diagnose`), or not an incseg checkpoint.
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
    return data
