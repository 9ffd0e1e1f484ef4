"""Safe loading of PyTorch files with errors a user can act on.

Every file incseg reads with ``torch.load`` (its own checkpoints, official MiB checkpoints,
In-Place ABN ImageNet weights) is loaded with ``weights_only=True``: tensors and plain Python
data only, never arbitrary pickled code. When that fails, PyTorch's own message describes its
internals and suggests ``weights_only=False``, which would run whatever code the file holds; incseg
replaces it with what is wrong with the file (empty, truncated, not a PyTorch file, or holding
objects a safe load refuses) and never suggests unsafe loading.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from incseg.errors import CheckpointError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
PICKLE_MAGIC = b"\x80"  # the legacy format (and plain pickles) start with the PROTO opcode


def diagnose(path: Path, error: BaseException) -> str:
    """Why ``path`` could not be loaded, from its bytes and the kind of ``error``."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if not head:
        return "is empty"
    refused = isinstance(error, pickle.UnpicklingError)
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return "is truncated or corrupt (an incomplete PyTorch zip archive)"
        if refused:
            return (
                "holds Python objects that a safe (weights-only) load refuses: it was written by "
                "another program, and incseg does not run code from checkpoint files"
            )
        return "is a corrupt PyTorch archive"
    if head.startswith(PICKLE_MAGIC):
        if isinstance(error, EOFError) or "EOF" in str(error):
            return "is truncated (a PyTorch or pickle file that ends early)"
        return (
            "is a pickle that a safe (weights-only) load refuses: a plain Python pickle or "
            "another program's file, and incseg does not run code from checkpoint files"
        )
    return "is not a PyTorch file (corrupt bytes or another format)"


def load_torch_file(
    path: str | Path, what: str, *, key: str | None = None, map_location: str | torch.device = "cpu"
) -> Any:
    """``torch.load(path, weights_only=True)``; failures become one :class:`CheckpointError`.

    Args:
        path: the file.
        what: what the file should be, e.g. ``"an incseg checkpoint"``; ends the message.
        key: the config key or option that named the file, to start the message with.

    Raises:
        CheckpointError: missing file, or a file that cannot be loaded safely (see :func:`diagnose`).
    """
    path = Path(path)
    where = f"{key} {path}" if key else str(path)
    if not path.is_file():
        raise CheckpointError(f"{where}: not found (expected {what})")
    try:
        with warnings.catch_warnings():
            # Printed for any file not written with pickle protocol 2 (old official checkpoints,
            # plain pickles); it says nothing the user can act on.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch raises many types for corrupt or foreign files
        raise CheckpointError(f"{where}: {diagnose(path, err)}; expected {what}") from None
