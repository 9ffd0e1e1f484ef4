"""Which finished steps a run may continue from: its own (:func:`check_belongs`) and another run's
(``incseg run --start-from RUN_DIR``, and ``incseg compare``'s shared step 0): those are copied
unchanged and the new run resumes from them. A checkpoint file (``incseg run --start-from
FILE.pt``: a step 0 imported from another codebase by ``incseg import-checkpoint``, or a run's
``step_0.pt``) seeds step 0 instead (:func:`adopt_weights`)."""

from __future__ import annotations

import json
from pathlib import Path

from incseg.config import Config, config_diff, config_from_dict
from incseg.engine.checkpoint import content_digest, load_checkpoint, save_checkpoint
from incseg.engine.distributed import SINGLE, DistInfo, barrier
from incseg.engine.rundir import RunDir
from incseg.errors import CheckpointError, ConfigError, IncsegError
from incseg.methods import method_class


def shared_steps_key(config: Config, step: int) -> str:
    """Runs with equal keys train the very same steps ``0..step``: their configs agree on everything
    but the run name and ``protocol.last_step``; for step 0 also the incremental-step keys and the
    exemplar memory's keys (``memory_*``), and the method too when both methods train the same
    step 0 (equal ``Method.first_step_key``: plain cross-entropy, or CoMFormer's criterion)."""
    d = config.to_dict()
    d.pop("name")
    d["protocol"].pop("last_step")
    if step == 0:
        d["train"].pop("epochs_incremental")
        d["train"].pop("lr_incremental")
        for key in [k for k in d["method"] if k.startswith("memory_")]:
            d["method"].pop(key)  # the exemplar memory starts at step 1
        key = method_class(config.method.name).first_step_key(d["method"])
        if key is not None:  # the methods that train the same step 0 (Method.first_step_key)
            d["method"] = key
    return json.dumps(d, sort_keys=True)


def adopt_steps(
    run_dir: Path, config: Config, source_dir: Path, step: int, dist: DistInfo = SINGLE
) -> None:
    """Start the run in ``run_dir`` with the finished steps ``0..step`` of the run in
    ``source_dir`` (copied unchanged, by rank 0) when it has none yet; a run that has them
    already is left as it is. Either way the run then resumes (``run_protocol(...,
    resume=True)``).

    Raises:
        IncsegError: the source is not a run, its steps were trained otherwise, or step ``step``
            is not finished there.
    """
    run = RunDir(run_dir)
    started = run.step_file(0).exists()
    barrier(dist)  # every rank has looked before rank 0 copies
    if started:
        return
    source = RunDir(source_dir)
    trusted = (config.method.name,)
    saved = source.saved_config(trusted)
    if saved is None:
        raise IncsegError(
            f"--start-from {source.path}: no config.yaml there; is it a run directory?"
        )
    try:
        key = shared_steps_key(config_from_dict(saved, trusted=trusted), step)
    except ConfigError as err:
        raise IncsegError(f"--start-from {source.path}/config.yaml: {err}") from None
    if key != shared_steps_key(config, step):
        raise IncsegError(
            f"--start-from {source.path}: its steps 0..{step} were trained with another config "
            "(only the name, last_step and, for step 0, the incremental keys or a plain-first-step "
            "method may differ)"
        )
    for index in range(step + 1):  # a foreign checkpoint is refused before anything is copied
        path = source.step_file(index)
        if path.is_file():
            check_belongs(path, load_checkpoint(path), config, index)
    if dist.is_main:
        run.adopt_steps(source, step, note=str(source.path))
    barrier(dist)


def adopt_weights(run_dir: Path, config: Config, source: Path, dist: DistInfo = SINGLE) -> None:
    """Start the run in ``run_dir`` from the step-0 weights in the checkpoint file ``source``:
    rank 0 writes them to the run's ``seed_step_0.pt`` (with the source's path and content
    digest), and the run then evaluates step 0 on them instead of training it
    (:class:`incseg.engine.run.Run`); what the method keeps after step 0 is computed from the
    weights by its ``end_step`` / ``after_training``, as after a trained step 0. A run that was
    already started from the same weights is left as it is (a resume).

    Raises:
        IncsegError: the file is not step 0, its step 0 was trained otherwise than ``config``
            trains it, the method keeps state that only training gathers
            (``Method.trained_state``), or the run started otherwise (its own step 0, or other
            weights).
    """
    try:
        checkpoint = load_checkpoint(source)
    except CheckpointError as err:
        raise CheckpointError(
            f"--start-from {err}; a checkpoint of another codebase is converted first with "
            "`incseg import-checkpoint`"
        ) from None
    _check_seedable(source, checkpoint, config)
    digest = content_digest(checkpoint)
    run = RunDir(run_dir)
    seed = run.seed()
    barrier(dist)  # every rank has looked before rank 0 writes
    if seed is not None and seed.get("seed_digest") == digest:
        return
    if seed is not None or run.step_file(0).exists():
        started = seed.get("seeded_from") if seed is not None else "its own step 0"
        raise IncsegError(
            f"--start-from {source}: {run.path} was started from {started}, not from these "
            "weights; choose another --out"
        )
    if dist.is_main:
        seed = {**checkpoint, "seeded_from": str(source), "seed_digest": digest}
        save_checkpoint(run.seed_file, seed)
    barrier(dist)


def _check_seedable(source: Path, checkpoint: dict, config: Config) -> None:
    """The checkpoint holds step 0, ``config``'s method carries nothing gathered by training
    from it, and the checkpoint's config trains step 0 as ``config`` does
    (:func:`shared_steps_key`; the differing keys are named otherwise)."""
    step = checkpoint["step"]
    if step != 0:
        raise IncsegError(
            f"--start-from {source}: holds step {step}; a checkpoint file starts a run at step 0 "
            f"only (to continue after step {step}, start from its run directory)"
        )
    if method_class(config.method.name).trained_state:
        raise IncsegError(
            f"--start-from {source}: {config.method.name} keeps what the training iterations of "
            "step 0 gather (for the next steps), which weights alone do not give; train its "
            "step 0 here, or start from a run directory that trained it"
        )
    try:
        saved = config_from_dict(checkpoint["config"], trusted=(config.method.name,))
    except ConfigError as err:
        raise IncsegError(f"--start-from {source}: its config does not load ({err})") from None
    theirs, ours = shared_steps_key(saved, 0), shared_steps_key(config, 0)
    if theirs != ours:
        diffs = config_diff(json.loads(theirs), json.loads(ours))
        raise IncsegError(
            f"--start-from {source}: its step 0 was made with another config "
            f"({'; '.join(diffs[:4])}); run it with the config it was made (or imported) with"
        )


def check_belongs(path: Path, checkpoint: dict, config: Config, step: int) -> None:
    """A step checkpoint found in a run directory is that run's step ``step``: it says so, and its
    config trains steps ``0..step`` as ``config`` does (the same config, or the config of the run
    its steps were adopted from, :func:`shared_steps_key`). Its method is only resolved when it
    is the run's own or a built-in one (nothing named inside a checkpoint is imported).

    Raises:
        CheckpointError: naming the file, what differs, and what to do.
    """
    if checkpoint.get("step") != step:
        raise CheckpointError(
            f"{path}: holds step {checkpoint.get('step')}, not step {step}; move it away to retrain step {step}"
        )
    try:
        saved = config_from_dict(checkpoint["config"], trusted=(config.method.name,))
    except ConfigError as err:
        raise CheckpointError(
            f"{path}: not this run's step {step}: its config does not load ({err}); move it away to "
            f"retrain from step {step}"
        ) from None
    if saved.to_dict() == config.to_dict() or shared_steps_key(saved, step) == shared_steps_key(
        config, step
    ):
        return
    diffs = config_diff(saved.to_dict(), config.to_dict())
    raise CheckpointError(
        f"{path}: another run's step {step}, trained with a different config ({'; '.join(diffs[:4])}); "
        f"move it (and any later step) away to retrain from step {step}, or resume with the config it "
        "was trained with"
    )
