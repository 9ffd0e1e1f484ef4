"""A run directory: the one place that knows its layout.

::

    RUN_DIR/
      config.yaml      the resolved config (written first; a resume must match it)
      metrics.json     per finished step: mIoU groups, per-class IoU, image counts, epoch losses
      step_K.pt        checkpoint of finished step K (model, method state, confusion matrix)
      last.pt          the latest epoch checkpoint of the unfinished step (removed when it ends)
      summary.md       written when the last step is done
      tensorboard/     scalars (train.tensorboard)

Files are written atomically (see :mod:`incseg.engine.checkpoint`); a killed write leaves a
``.NAME.*.tmp`` file that the next resume removes. A step counts as finished when both its
checkpoint and its metrics entry exist.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from incseg.config import Config, config_diff, config_from_dict
from incseg.engine.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from incseg.engine.faults import fault_point
from incseg.errors import ConfigError, IncsegError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.md"
LAST_FILE = "last.pt"
TENSORBOARD_DIR = "tensorboard"


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # -- reading --
    def step_file(self, step: int) -> Path:
        return self.path / f"step_{step}.pt"

    def step_files(self) -> dict[int, Path]:
        """Finished-step checkpoints by step."""
        found = {}
        for p in self.path.glob("step_*.pt"):
            suffix = p.stem.removeprefix("step_")
            if suffix.isdigit():
                found[int(suffix)] = p
        return dict(sorted(found.items()))

    def markers(self) -> list[str]:
        """The files present that show the directory holds a run (empty: a fresh directory)."""
        return [
            n
            for n in (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, "step_0.pt")
            if (self.path / n).exists()
        ]

    def read_metrics(self) -> dict[str, Any] | None:
        try:
            metrics = json.loads((self.path / METRICS_FILE).read_text())
        except (OSError, ValueError):
            return None
        return metrics if isinstance(metrics, dict) else None

    def is_finished(self, num_steps: int) -> bool:
        """True when the directory holds a completed run of ``num_steps`` steps."""
        metrics = self.read_metrics() or {}
        return (self.path / SUMMARY_FILE).is_file() and len(metrics.get("steps", [])) == num_steps

    def saved_config(self) -> dict[str, Any] | None:
        """The saved config with today's defaults filled in (None without a config file)."""
        path = self.path / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            saved = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read the saved config ({err})") from None
        saved = saved if isinstance(saved, dict) else {}
        try:  # keys added to incseg since the run was made take their defaults
            return config_from_dict(saved).to_dict()
        except ConfigError:
            return saved  # compared raw: the differences will show what no longer validates

    def check_config(self, config: Config, action: str) -> None:
        """Refuse to ``action`` (resume, reuse...) a run whose saved config differs from
        ``config``; the error lists the differing keys. A directory without one passes."""
        saved = self.saved_config()
        diffs = config_diff(saved, config.to_dict()) if saved is not None else []
        if diffs:
            raise ConfigError(
                f"cannot {action} {self.path}: it holds a run made with a different config "
                f"({'; '.join(diffs)})"
            )

    def finished(self, config: Config, last_step: int) -> list[dict[str, Any]]:
        """The metrics entries of the finished steps ``0..n-1`` (n <= last_step + 1), for a resume.

        Raises:
            ConfigError: the directory was made with another config (the differing keys are listed).
        """
        self.check_config(config, "resume")
        steps = (self.read_metrics() or {}).get("steps", [])
        done = 0
        while done < min(len(steps), last_step + 1) and self.step_file(done).is_file():
            done += 1
        return list(steps[:done])

    def interrupted_step(self, config: Config, step: int) -> dict[str, Any] | None:
        """The epoch checkpoint of ``step``, if the run was interrupted during it with ``config``."""
        path = self.path / LAST_FILE
        if not path.is_file():
            return None
        state = load_checkpoint(path)
        if (
            state.get("kind") != "epoch"
            or state.get("step") != step
            or state.get("config") != config.to_dict()
        ):
            return None
        return state

    # -- writing (rank 0 only) --
    def start(self, config: Config, *, resume: bool) -> None:
        """Create the directory and write the config; a resume first removes half-written files."""
        for stale in self.path.glob(".*.tmp") if resume else ():
            stale.unlink()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / CONFIG_FILE).write_text(config.to_yaml())
        except OSError as err:
            raise IncsegError(f"run directory {self.path}: cannot write ({err.strerror})") from None

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """``metrics.json``, written atomically (a reader never sees half a file)."""
        atomic_write(
            self.path / METRICS_FILE, lambda f: f.write(json.dumps(metrics, indent=2).encode())
        )

    def save_epoch(self, step: int, epochs_done: int, payload: dict[str, Any]) -> None:
        """The resumable state after an epoch of the unfinished step (``last.pt``)."""
        save_checkpoint(
            self.path / LAST_FILE,
            {**payload, "kind": "epoch", "step": step, "epochs_done": epochs_done},
        )
        fault_point(f"epoch:{step}:{epochs_done}")

    def save_step(self, step: int, payload: dict[str, Any], metrics: dict[str, Any]) -> None:
        """A finished step: its checkpoint, then the metrics naming it; ``last.pt`` is superseded."""
        save_checkpoint(self.step_file(step), {"step": step, **payload})
        self.write_metrics(metrics)
        (self.path / LAST_FILE).unlink(missing_ok=True)
        fault_point(f"step:{step}")

    def write_summary(self, text: str) -> None:
        (self.path / SUMMARY_FILE).write_text(text)

    def adopt_steps(self, source: RunDir, last: int, note: str) -> None:
        """Start this run with ``source``'s finished steps ``0..last``: their checkpoints are copied
        byte for byte and their metrics entries record ``started_from``."""
        metrics = source.read_metrics()
        if metrics is None or len(metrics.get("steps", [])) <= last:
            raise IncsegError(f"--start-from {source.path}: step {last} is not finished there")
        self.path.mkdir(parents=True, exist_ok=True)
        for step in range(last + 1):
            if not source.step_file(step).is_file():
                raise IncsegError(
                    f"--start-from {source.path}: {source.step_file(step).name} is missing"
                )
            shutil.copyfile(source.step_file(step), self.step_file(step))
        steps = [{**entry, "started_from": note} for entry in metrics["steps"][: last + 1]]
        self.write_metrics({**metrics, "steps": steps})
