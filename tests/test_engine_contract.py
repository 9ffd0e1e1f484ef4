"""The engine's contract with a method, checked by a recording method over a 3-step run: the hook
order, the old model of every step, the weights ``begin_step`` sees with and without a resume,
what the method gets as the old model's output, and the augmentation seeds of the images."""

from __future__ import annotations

import itertools

import pytest
import torch

from incseg.config import load_config
from incseg.engine import protocol, train
from incseg.engine.checkpoint import load_checkpoint
from incseg.engine.protocol import run_protocol
from incseg.methods.mib import MiB

SETS = ["protocol.setting=10-5-5", "train.epochs=2", "train.epochs_incremental=2", "data.num_train=60",
        "data.num_test=12", "train.tensorboard=off"]  # fmt: skip


class Recording(MiB):
    """MiB that records every hook call and what it is handed; it also scans the old model and
    relabels (marking the targets it hands on)."""

    scans_old_model = True

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int]] = []
        self.begin_weights: dict[int, torch.Tensor] = {}
        self.old_models: dict[int, dict[str, torch.Tensor]] = {}
        self.old_outputs_checked = 0
        self.seeds: dict[int, list[int]] = {}

    def _weights(self, model):
        return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()

    def init_new_classifier(self, model, info):
        self.events.append(("init_new_classifier", info.step))
        super().init_new_classifier(model, info)

    def begin_step(self, info, model, old_model, loader):
        self.events.append(("begin_step", info.step))
        self.begin_weights[info.step] = self._weights(model)
        self._produced = None
        if old_model is not None:
            self.old_models[info.step] = {k: v.clone() for k, v in old_model.state_dict().items()}

            def keep(_module, _args, output):
                self._produced = output.logits.detach().clone()

            old_model.register_forward_hook(keep)
        loader.batch_sampler.set_epoch(0)
        self.seeds[info.step] = [seed for batch in loader.batch_sampler for _, seed in batch]
        self._dataset = loader.dataset
        super().begin_step(info, model, old_model, loader)

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
        marker, targets = targets  # what relabel returned reaches losses
        assert marker == "relabelled"
        if old_output is not None:  # exactly what the old model computed on this batch
            assert old_output.logits.shape[1] == info.num_old_channels
            assert torch.equal(old_output.logits, self._produced)
            self.old_outputs_checked += 1
        return super().losses(output, old_output, targets, info)

    def end_step(self, info, model, loader):
        self.events.append(("end_step", info.step))
        super().end_step(info, model, loader)

    def load_step_state_dict(self, state):
        self.events.append(("load_step_state_dict", -1))
        super().load_step_state_dict(state)


def _run(tmp_path, tiny_config_path, monkeypatch, name, *, resume=False, stop_at=None):
    recorders = []

    def build(name, params):
        recorders.append(Recording())
        return recorders[-1]

    monkeypatch.setattr(protocol, "build_method", build)
    if stop_at is not None:

        def fault(point):
            if point == stop_at:
                raise KeyboardInterrupt(point)

        monkeypatch.setattr(train, "fault_point", fault)
    config = load_config(str(tiny_config_path), SETS)
    try:
        run_protocol(config, tmp_path / name, progress=False, resume=resume)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    return recorders[-1]


@pytest.fixture(scope="module")
def mp():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_config_path, mp):
    out = tmp_path_factory.mktemp("contract")
    return out, _run(out, tiny_config_path, mp, "run")


def _collapsed(events):
    return [key for key, _ in itertools.groupby(events)]


def test_hooks_run_in_the_documented_order(reference):
    _, rec = reference
    assert _collapsed(rec.events) == [
        ("begin_step", 0), ("losses", 0), ("end_step", 0),
        ("init_new_classifier", 1), ("begin_step", 1), ("scan", 1), ("end_scan", 1), ("losses", 1),
        ("end_step", 1),
        ("init_new_classifier", 2), ("begin_step", 2), ("scan", 2), ("end_scan", 2), ("losses", 2),
        ("end_step", 2),
    ]  # fmt: skip


def test_the_scan_sums_one_pass_over_the_steps_training_batches(reference):
    _, rec = reference
    for step in (1, 2):
        batches = rec.events.count(("scan", step))
        assert (
            rec.scanned[step]["batches"]
            == batches
            == len(rec.seeds[step]) // 8 + (len(rec.seeds[step]) % 8 > 0)
        )
        assert rec.scanned[step]["pixels"] == len(rec.seeds[step]) * 32 * 32


def test_old_model_of_each_step_is_the_final_model_of_the_previous_one(reference):
    out, rec = reference
    assert sorted(rec.old_models) == [1, 2]
    for step, old in rec.old_models.items():
        final = load_checkpoint(out / "run" / f"step_{step - 1}.pt")["model"]
        assert old.keys() == final.keys()
        for key, value in final.items():
            assert torch.equal(old[key], value), (step, key)


def test_the_method_gets_the_old_models_own_output(reference):
    _, rec = reference
    assert rec.old_outputs_checked > 0  # every batch of steps 1 and 2 was compared


def test_images_get_distinct_augmentation_seeds_that_change_the_crop(reference):
    _, rec = reference
    for seeds in rec.seeds.values():
        assert len(seeds) > 10 and len(set(seeds)) == len(seeds)
    data = rec._dataset
    first, again = data[(0, 11)], data[(0, 11)]
    assert torch.equal(first[0], again[0])  # a seed decides the augmentation
    assert any(not torch.equal(first[0], data[(0, s)][0]) for s in (12, 13, 14))  # and seeds differ


def test_begin_step_sees_the_same_weights_with_and_without_a_resume(
    reference, tmp_path, tiny_config_path, mp
):
    _, rec = reference
    # stopped during the second epoch of step 1 (its first epoch is checkpointed), then resumed
    _run(tmp_path, tiny_config_path, mp, "run", stop_at="iteration:1:1:2")
    resumed = _run(tmp_path, tiny_config_path, mp, "run", resume=True)
    assert ("load_step_state_dict", -1) in resumed.events
    assert ("scan", 1) not in resumed.events and (
        "scan",
        2,
    ) in resumed.events  # step 1's was restored
    assert _collapsed(resumed.events)[:2] == [("init_new_classifier", 1), ("begin_step", 1)]
    for step in (1, 2):
        assert torch.equal(resumed.begin_weights[step], rec.begin_weights[step]), step
    for step, old in resumed.old_models.items():
        for key, value in rec.old_models[step].items():
            assert torch.equal(old[key], value), (step, key)
