"""What one step of a setting looks like: old, new and seen classes, and the model's channels."""

from __future__ import annotations

from dataclasses import dataclass

from incseg.errors import ConfigError
from incseg.protocol.settings import Setting


@dataclass(frozen=True)
class StepInfo:
    """Step ``step`` of a setting.

    Channels of the model are ordered ``order = [0] + classes of step 0..t`` (docs/protocol.md, "Model"), so
    channel ``k`` predicts dataset class ``order[k]``.

    Attributes:
        step: 0-based step index.
        new_classes: dataset ids introduced now (class 0 excluded).
        old_classes: dataset ids of earlier steps (class 0 excluded).
        future_classes: dataset ids of later steps.
        order: dataset id of every model channel, ``len(order) == num_channels``.
        channels_per_step: classifier outputs added at each step 0..t (step 0 includes 0).
        class_names: names of ``order``, for reports.
    """

    step: int
    new_classes: tuple[int, ...]
    old_classes: tuple[int, ...]
    future_classes: tuple[int, ...]
    order: tuple[int, ...]
    channels_per_step: tuple[int, ...]
    class_names: tuple[str, ...]

    @property
    def num_channels(self) -> int:
        """C_t: channels of the model at this step, background included."""
        return len(self.order)

    @property
    def num_old_channels(self) -> int:
        """O: channels before this step (background included); 0 at step 0."""
        return sum(self.channels_per_step[:-1])

    @property
    def num_base_channels(self) -> int:
        """Channels of step 0 (background included): the "old" group of the paper's reports."""
        return self.channels_per_step[0]

    @property
    def seen_classes(self) -> tuple[int, ...]:
        """Dataset ids of old and new classes (class 0 excluded)."""
        return self.old_classes + self.new_classes


def step_info(setting: Setting, step: int) -> StepInfo:
    """Build the :class:`StepInfo` of ``step`` in ``setting``.

    Raises:
        ConfigError: ``step`` outside ``0..num_steps-1``.
    """
    if not 0 <= step < setting.num_steps:
        raise ConfigError(
            f"step {step} is out of range for setting {setting.name!r}: "
            f"valid steps are 0..{setting.num_steps - 1}"
        )
    steps = [tuple(c for c in s if c != 0) for s in setting.steps]
    old = tuple(c for s in steps[:step] for c in s)
    order = (0, *old, *steps[step])
    channels = tuple(len(s) + (1 if i == 0 else 0) for i, s in enumerate(steps[: step + 1]))
    return StepInfo(
        step=step,
        new_classes=steps[step],
        old_classes=old,
        future_classes=tuple(c for s in steps[step + 1 :] for c in s),
        order=order,
        channels_per_step=channels,
        class_names=tuple(setting.class_names[c] for c in order),
    )
