"""TensorBoard scalars of a run (``train.tensorboard``), written by rank 0 next to metrics.json."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from incseg.errors import ConfigError, IncsegError

log = logging.getLogger(__name__)


class Scalars:
    """Scalar logger: a ``SummaryWriter`` under ``RUN_DIR/tensorboard``, or nothing at all.

    Tags: ``step_K/train/TERM`` (per logged iteration of step K, with ``lr`` and ``total``),
    ``step_K/epoch/TERM`` (epoch means, ``val_miou``), ``miou/{old,new,all,with_bg}`` (per step,
    in %; see ``metrics.GROUPING``).
    """

    def __init__(self, log_dir: Path | None) -> None:
        self._writer = None
        self._log_dir = log_dir
        self._before: set[Path] | None = None  # the log folder's paths before this writer
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._before = set(log_dir.rglob("*")) if log_dir.is_dir() else None
            self._writer = SummaryWriter(str(log_dir))

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def add(self, prefix: str, values: dict[str, float], x: int) -> None:
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(f"{prefix}/{name}", value, x)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def discard(self) -> None:
        """Close and remove what this writer wrote (its event files, and the log folder if it
        made it): the scalars of a run that failed before it saved anything."""
        self.close()
        if self._writer is None or not self._log_dir.is_dir():
            return
        if self._before is None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            return
        for path in sorted(self._log_dir.rglob("*"), reverse=True):  # files before their folders
            if path not in self._before:
                path.rmdir() if path.is_dir() else path.unlink(missing_ok=True)


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def check_tensorboard(mode: str) -> None:
    """``train.tensorboard: on`` without the package is a config error that says how to install it."""
    if mode == "on" and not tensorboard_available():
        raise ConfigError(
            "train.tensorboard: 'on' needs the tensorboard package "
            "(pip install tensorboard, or pip install 'incseg[tensorboard]')"
        )


def open_scalars(mode: str, log_dir: Path, is_main: bool) -> Scalars:
    """``mode`` is ``train.tensorboard``: ``auto`` logs when the package is installed, ``on``
    requires it (see :func:`check_tensorboard`), ``off`` never logs. Only rank 0 logs."""
    check_tensorboard(mode)
    enabled = is_main and mode != "off" and tensorboard_available()
    try:
        return Scalars(log_dir if enabled else None)
    except OSError as err:
        if mode == "on":
            raise IncsegError(
                f"train.tensorboard: on, but {log_dir} cannot be created ({err.strerror or err}); "
                "free that path or set train.tensorboard: off"
            ) from None
        log.warning(
            f"note: no TensorBoard scalars: {log_dir} cannot be created ({err.strerror or err})"
        )
        return Scalars(None)
