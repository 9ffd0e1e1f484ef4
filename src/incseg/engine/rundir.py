"""A run directory: the one place that knows its layout.

::

    RUN_DIR/
      config.yaml      the resolved config (written first; a resume must match it)
      metrics.json     per finished step: mIoU groups, per-class IoU, image counts, epoch losses
      step_K.pt        checkpoint of finished step K (model, method state, confusion matrix)
      last.pt          the latest epoch checkpoint of the unfinished step (removed when it ends)
      memory_step_K.json  the exemplar memory of step K (methods with one, engine/memory.py)
      seed_step_0.pt   the step-0 weights a run was started from (``incseg run --start-from
                       FILE.pt``, engine/adopt.py): step 0 is evaluated on them, not trained
      summary.md       written when the last step is done
      tensorboard/     scalars (train.tensorboard)
      .incseg.lock     held (``flock``) by the one process writing the run

Files are written atomically (see :mod:`incseg.engine.checkpoint`); a killed write leaves a
``.NAME.*.tmp`` file that the next resume removes. A step counts as finished when its checkpoint
exists; its metrics entry is kept in ``metrics.json`` and, as a copy, in the checkpoint itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from incseg.config import Config, config_diff, config_from_dict, parse_yaml
from incseg.engine.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from incseg.engine.faults import fault_point
from incseg.errors import CheckpointError, ConfigError, IncsegError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.md"
LAST_FILE = "last.pt"
SEED_FILE = "seed_step_0.pt"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".incseg.lock"
_HELD: dict[Path, list[int]] = {}  # run directories this process has locked: [fd, depth]


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # -- reading --
    def step_file(self, step: int) -> Path:
        return self.path / f"step_{step}.pt"

    def memory_file(self, step: int) -> Path:
        return self.path / f"memory_step_{step}.json"

    @property
    def seed_file(self) -> Path:
        return self.path / SEED_FILE

    def seed(self) -> dict[str, Any] | None:
        """The step-0 checkpoint the run was started from (loaded, checksum verified), or None
        for a run that trains its step 0."""
        return load_checkpoint(self.seed_file) if self.seed_file.is_file() else None

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
            for n in (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, "step_0.pt", SEED_FILE)
            if (self.path / n).exists()
        ]

    def read_metrics(self) -> dict[str, Any] | None:
        """``metrics.json`` when it is UTF-8 JSON of the shape incseg writes (an object whose
        ``steps`` is a list of objects); None when it is missing or anything else, so that a
        file edited or cut short never counts a step as finished."""
        try:
            metrics = json.loads((self.path / METRICS_FILE).read_bytes().decode("utf-8"))
        except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError too
            return None
        if not isinstance(metrics, dict):
            return None
        steps = metrics.get("steps", [])
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            return None
        return metrics

    def is_finished(self, num_steps: int) -> bool:
        """True when the directory holds a completed run of ``num_steps`` steps."""
        metrics = self.read_metrics() or {}
        return (self.path / SUMMARY_FILE).is_file() and len(metrics.get("steps", [])) == num_steps

    def saved_config(self, trusted: tuple[str, ...] = ()) -> dict[str, Any] | None:
        """The saved config with today's defaults filled in (None without a config file).

        A run directory is data, not code, whoever made it: a ``module:Class`` method named in
        its ``config.yaml`` is imported only when it is among ``trusted`` (the paths the user
        named on this command line); otherwise the config is returned as saved, unresolved, so
        that a comparison with the user's config shows the method as a difference.

        Raises:
            ConfigError: the file cannot be read, is not UTF-8 text, or is not YAML.
        """
        path = self.path / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            saved = parse_yaml(path.read_bytes().decode("utf-8"))  # no duplicate keys, aliases
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{path}: not a UTF-8 text file (byte {err.start} is 0x{err.object[err.start]:02x}); "
                "a run directory's config.yaml is the YAML text incseg wrote"
            ) from None
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read the saved config ({err})") from None
        saved = saved if isinstance(saved, dict) else {}
        try:  # keys added to incseg since the run was made take their defaults
            return config_from_dict(saved, trusted=trusted).to_dict()
        except ConfigError:
            return saved  # compared raw: the differences will show what no longer validates

    def check_config(self, config: Config, action: str) -> None:
        """Refuse to ``action`` (resume, reuse...) a run whose saved config differs from
        ``config``; the error lists the differing keys. A directory without one passes."""
        saved = self.saved_config(trusted=(config.method.name,))
        diffs = config_diff(saved, config.to_dict()) if saved is not None else []
        if diffs:
            raise ConfigError(
                f"cannot {action} {self.path}: it holds a run made with a different config "
                f"({'; '.join(diffs)})"
            )

    def finished(self, num_steps: int) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """The finished steps ``0..n-1`` (n <= ``num_steps``) as (metrics entry, checkpoint), one
        at a time (a checkpoint is loaded when it is asked for, so a long run's checkpoints are
        never all in memory), their checksums verified. An entry missing from ``metrics.json``
        (or an unreadable ``metrics.json``, which is kept aside) is taken from the checkpoint's
        own copy. The caller checks that each checkpoint belongs to the run.

        Raises:
            CheckpointError: a step checkpoint is corrupt or unreadable, or holds no entry where
                ``metrics.json`` has none (a run of an older incseg that lost its metrics).
        """
        entries = self._entries_for_resume()
        for step in range(num_steps):
            path = self.step_file(step)
            if not path.is_file():
                break
            checkpoint = load_checkpoint(path)
            entry = entries[step] if step < len(entries) else checkpoint.get("metrics_entry")
            if entry is None:
                raise CheckpointError(
                    f"{path}: step {step} is finished but {self.path / METRICS_FILE} has no entry for "
                    "it and the checkpoint (of an older incseg) holds no copy; restore metrics.json "
                    f"or move {path.name} and later steps away to retrain from step {step}"
                )
            yield entry, checkpoint

    def _entries_for_resume(self) -> list[dict[str, Any]]:
        """The steps of ``metrics.json``; an unreadable file is renamed aside (never lost) and the
        entries come from the checkpoints instead."""
        path = self.path / METRICS_FILE
        if not path.exists():
            return []
        metrics = self.read_metrics()
        if metrics is not None:
            return metrics.get("steps", [])
        aside = path.with_name(f"{METRICS_FILE}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        with contextlib.suppress(FileNotFoundError):
            path.rename(aside)
        log.warning(
            f"{path}: unreadable; kept as {aside.name}, the entries are rebuilt from the step checkpoints"
        )
        return []

    def interrupted_step(self, config: Config, step: int) -> dict[str, Any] | None:
        """The epoch checkpoint of ``step``, if the run was interrupted during it. A ``last.pt``
        of an earlier, finished step is stale and ignored; an unreadable or corrupt one is
        renamed aside (the step restarts from its beginning).

        Raises:
            CheckpointError: ``last.pt`` was written by a run with another config.
        """
        path = self.path / LAST_FILE
        if not path.is_file():
            return None
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            aside = path.with_name(f"{LAST_FILE}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
            with contextlib.suppress(FileNotFoundError):
                path.rename(aside)
            log.warning(f"{err}; kept as {aside.name}: step {step} restarts from its beginning")
            return None
        if state.get("kind") != "epoch" or state.get("step") != step:
            return None
        try:  # normalised: keys added or dropped by later incseg versions take today's form
            saved = config_from_dict(state["config"], trusted=(config.method.name,)).to_dict()
        except ConfigError as err:
            saved = {"config": f"does not load ({err})"}
        diffs = config_diff(saved, config.to_dict())
        if diffs:
            raise CheckpointError(
                f"{path}: written by a run with another config ({'; '.join(diffs[:5])}); move it away "
                f"to restart step {step} from its beginning"
            )
        return state

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run directory's lock: one writing process per run directory. The lock is the
        operating system's (``flock`` on ``.incseg.lock``), so it dies with the process: a killed
        run never leaves a stale lock. Re-entrant within a process. A directory this call created
        and the run left empty is removed again, so a failed start blocks nothing.

        Raises:
            IncsegError: another process holds the lock, or the directory cannot be created.
        """
        key = self.path.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
            try:
                yield
            finally:
                _HELD[key][1] -= 1
            return
        created = not self.path.exists()
        fd = self._acquire()
        _HELD[key] = [fd, 1]
        try:
            yield
        finally:
            del _HELD[key]
            if created and [p.name for p in self.path.iterdir()] == [LOCK_FILE]:
                (self.path / LOCK_FILE).unlink()
                self.path.rmdir()
            os.close(fd)  # releases the lock

    def _acquire(self) -> int:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise IncsegError(
                f"run directory {self.path}: cannot create ({err.strerror or err})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise IncsegError(
                f"run directory {self.path}: another incseg process (pid {holder}) is writing it; wait "
                "for it to finish, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def clear(self) -> list[str]:
        """Remove every file of a run from the directory (``--overwrite``), so that it holds only the
        new run; files that are not a run's are left alone. Returns the names removed."""
        fixed = {CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, LAST_FILE, TENSORBOARD_DIR, SEED_FILE}
        steps = {path.name for path in self.step_files().values()}
        removed = []
        for path in sorted(self.path.iterdir()) if self.path.is_dir() else []:
            half_written = path.name.startswith(".") and path.name.endswith(".tmp")
            memory = path.name.startswith("memory_step_") and path.suffix == ".json"
            if path.name in fixed or path.name in steps or half_written or memory:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed.append(path.name)
        return removed

    # -- writing (rank 0 only) --
    def start(self, config: Config, *, resume: bool) -> None:
        """Create the directory and write the config; a resume first removes half-written files."""
        for stale in self.path.glob(".*.tmp") if resume else ():
            stale.unlink()
        text = config.to_yaml().encode()
        atomic_write(self.path / CONFIG_FILE, lambda f: f.write(text))

    def undo_start(self) -> bool:
        """After a run failed before it saved anything (no checkpoint, no metrics): remove the
        ``config.yaml`` :meth:`start` wrote, so that the same directory can be used again without
        ``--overwrite``. Returns whether it did (the caller then discards its scalars)."""
        if self.step_files() or any((self.path / n).exists() for n in (METRICS_FILE, LAST_FILE)):
            return False
        (self.path / CONFIG_FILE).unlink(missing_ok=True)
        return True

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
        atomic_write(self.path / SUMMARY_FILE, lambda f: f.write(text.encode()))

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
