"""The engine's contract with a method, checked by a recording method handed to ``run_protocol``
over a 3-step run: the hook order, the old model of every step, the weights ``begin_step`` sees
with and without a resume, what the method gets as the old model's output, and the augmentation
seeds of the images. The old model is observed with PyTorch's global forward hook, not by
patching the engine."""

from __future__ import annotations

import itertools

import pytest
import torch

from incseg.config import load_config
from incseg.engine.checkpoint import load_checkpoint
from incseg.engine.loaders import Sources
from incseg.engine.run import run_protocol
from incseg.methods.mib import MiB
from incseg.models import IncrementalSegmenter
from incseg.protocol import get_setting, step_info

SETS = [
    "protocol.setting=10-5-5",
    "train.epochs=2",
    "train.epochs_incremental=2",
    "data.num_train=60",
    "data.num_test=12",
    "train.tensorboard=off",
]


class Stop(Exception):
    """Raised by the recording method to interrupt a run at a chosen iteration."""


class Recording(MiB):
    """MiB that records every hook call and what it is handed; it also scans the old model and
    relabels (marking the targets it hands on). ``stop_at=(step, call)`` interrupts the run at
    that step's ``call``-th ``losses`` call."""

    scans_old_model = True

    def __init__(self, stop_at: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.stop_at = stop_at
        self.events: list[tuple[str, int]] = []
        self.begin_weights: dict[int, torch.Tensor] = {}
        self.old_models: dict[int, dict[str, torch.Tensor]] = {}
        self.old_outputs_checked = 0
        self.calls: dict[int, int] = {}
        self._produced = self._producer = None

    def observe(self, module, _args, output) -> None:
        """Global forward hook: the last eval-mode forward of a segmenter without gradients
        (during training, the old model's)."""
        frozen = not module.training and not torch.is_grad_enabled()
        if isinstance(module, IncrementalSegmenter) and frozen:
            self._produced, self._producer = output.logits.detach().clone(), module

    def _weights(self, model):
        return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()

    def init_new_classifier(self, model, info):
        self.events.append(("init_new_classifier", info.step))
        super().init_new_classifier(model, info)

    def begin_step(self, info, model):
        self.events.append(("begin_step", info.step))
        self.begin_weights[info.step] = self._weights(model)
        super().begin_step(info, model)

    def scan(self, old_output, targets, info):
        self.events.append(("scan", info.step))
        assert not torch.is_grad_enabled() and old_output.logits.shape[1] == info.num_old_channels
        assert torch.equal(old_output.logits, self._produced)
        return {"batches": torch.ones(()), "pixels": torch.tensor(float(targets.numel()))}

    def end_scan(self, totals, info):
        self.events.append(("end_scan", info.step))
        self.scanned = {
            **getattr(self, "scanned", {}),
            info.step: {k: float(v) for k, v in totals.items()},
        }

    def relabel(self, old_output, targets, info):
        assert (old_output is None) == (info.step == 0)
        return ("relabelled", targets)

    def losses(self, output, old_output, targets, info):
        self.events.append(("losses", info.step))
        self.calls[info.step] = self.calls.get(info.step, 0) + 1
        if self.stop_at == (info.step, self.calls[info.step]):
            raise Stop
        marker, targets = targets  # what relabel returned reaches losses
        assert marker == "relabelled"
        if old_output is not None:  # exactly what the old model computed on this batch
            assert old_output.logits.shape[1] == info.num_old_channels
            assert torch.equal(old_output.logits, self._produced)
            if info.step not in self.old_models:
                state = self._producer.state_dict()
                self.old_models[info.step] = {k: v.clone() for k, v in state.items()}
            self.old_outputs_checked += 1
        return super().losses(output, old_output, targets, info)

    def end_step(self, info, model):
        self.events.append(("end_step", info.step))
        super().end_step(info, model)

    def load_step_state_dict(self, state):
        self.events.append(("load_step_state_dict", -1))
        super().load_step_state_dict(state)


def _config(tiny_config_path):
    return load_config(str(tiny_config_path), SETS)


def _run(out, tiny_config_path, *, resume=False, stop_at=None) -> Recording:
    method = Recording(stop_at)
    hook = torch.nn.modules.module.register_module_forward_hook(method.observe)
    try:
        run_protocol(_config(tiny_config_path), out, method=method, progress=False, resume=resume)
    except Stop:
        pass
    finally:
        hook.remove()
    return method


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_config_path):
    out = tmp_path_factory.mktemp("contract")
    return out, _run(out / "run", tiny_config_path)


@pytest.fixture(scope="module")
def seeds(tiny_config_path):
    """Per step, the augmentation seeds of epoch 0's batches, from the engine's own loaders."""
    config = _config(tiny_config_path)
    data, setting = Sources.load(config), get_setting("voc", "10-5-5")
    out = {}
    for step in range(3):
        loader = data.train_loader(step_info(setting, step))
        loader.batch_sampler.set_epoch(0)
        out[step] = (loader, [seed for batch in loader.batch_sampler for _, seed in batch])
    return out


def _collapsed(events):
    return [key for key, _ in itertools.groupby(events)]


def test_hooks_run_in_the_documented_order(reference):
    _, rec = reference
    assert _collapsed(rec.events) == [
        ("begin_step", 0),
        ("losses", 0),
        ("end_step", 0),
        ("init_new_classifier", 1),
        ("begin_step", 1),
        ("scan", 1),
        ("end_scan", 1),
        ("losses", 1),
        ("end_step", 1),
        ("init_new_classifier", 2),
        ("begin_step", 2),
        ("scan", 2),
        ("end_scan", 2),
        ("losses", 2),
        ("end_step", 2),
    ]


def test_the_scan_sums_one_pass_over_the_steps_training_batches(reference, seeds):
    _, rec = reference
    for step in (1, 2):
        loader, step_seeds = seeds[step]
        assert rec.scanned[step]["batches"] == rec.events.count(("scan", step)) == len(loader)
        assert rec.scanned[step]["pixels"] == len(step_seeds) * 32 * 32


def test_old_model_of_each_step_is_the_final_model_of_the_previous_one(reference):
    out, rec = reference
    assert sorted(rec.old_models) == [1, 2]
    for step, old in rec.old_models.items():
        final = load_checkpoint(out / "run" / f"step_{step - 1}.pt")["model"]
        assert old.keys() == final.keys()
        for key, value in final.items():
            assert torch.equal(old[key], value), (step, key)


def test_the_method_gets_the_old_models_own_output(reference, seeds):
    _, rec = reference
    # every batch of steps 1 and 2 was compared
    assert rec.old_outputs_checked == 2 * (len(seeds[1][0]) + len(seeds[2][0]))


def test_images_get_distinct_augmentation_seeds_that_change_the_crop(seeds):
    for _, step_seeds in seeds.values():
        assert len(step_seeds) > 10 and len(set(step_seeds)) == len(step_seeds)
    data = seeds[0][0].dataset
    first, again = data[(0, 11)], data[(0, 11)]
    assert torch.equal(first[0], again[0])  # a seed decides the augmentation
    assert any(not torch.equal(first[0], data[(0, s)][0]) for s in (12, 13, 14))  # and seeds differ


def test_begin_step_sees_the_same_weights_with_and_without_a_resume(
    reference, seeds, tmp_path, tiny_config_path
):
    _, rec = reference
    # stopped during the second epoch of step 1 (its first epoch is checkpointed), then resumed
    interrupted = _run(tmp_path / "run", tiny_config_path, stop_at=(1, len(seeds[1][0]) + 2))
    assert ("end_step", 1) not in interrupted.events
    resumed = _run(tmp_path / "run", tiny_config_path, resume=True)
    assert ("load_step_state_dict", -1) in resumed.events
    assert ("scan", 1) not in resumed.events  # step 1's was restored
    assert ("scan", 2) in resumed.events
    assert _collapsed(resumed.events)[:2] == [("init_new_classifier", 1), ("begin_step", 1)]
    for step in (1, 2):
        assert torch.equal(resumed.begin_weights[step], rec.begin_weights[step]), step
    assert sorted(resumed.old_models) == [1, 2]
    for step, old in resumed.old_models.items():
        for key, value in rec.old_models[step].items():
            assert torch.equal(old[key], value), (step, key)
