"""Command line: ``incseg run``, ``compare``, ``eval``, ``predict``, ``data`` and ``configs``
(also ``python -m incseg``).

User errors (bad config, data or checkpoint) print one ``error:`` line and exit with code 2,
without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from incseg import __version__, log
from incseg.config import RANGES, builtin_configs, load_config
from incseg.errors import ConfigError, DiskFullError, IncsegError
from incseg.ranges import check_range

logger = logging.getLogger("incseg.cli")

# What `incseg eval --set` may change: where the data is and how the test pass runs, and
# ECLIPSE's logit deltas (its scripts evaluate with other deltas than they train with,
# docs/methods.md "eclipse"); none changes the weights or the step's classes.
EVAL_KEYS = (
    "data.root",
    "data.num_workers",
    "data.test_crop",
    "train.eval_batch_size",
    "train.device",
    "train.amp",
    "model.mask2former.logit_deltas",
)


def _shared_options() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Parent parsers of the options several commands share: ``--set`` and ``--no-progress``."""
    overrides = argparse.ArgumentParser(add_help=False)
    overrides.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=2 (repeatable)",
    )
    progress = argparse.ArgumentParser(add_help=False)
    progress.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return overrides, progress


def _config_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    """CONFIG and --out, shared by the commands that train."""
    parser.add_argument(
        "config",
        nargs="?",
        default=None,
        help=f"YAML config file or built-in name {builtin_configs()} (default: demo)",
    )
    parser.add_argument("--out", type=_folder, default=None, help=out_help)


def _folder(text: str) -> Path | str:
    """``--out``: a path; an empty one is kept as ``""`` for the command to refuse by name
    (``Path("")`` is the current folder)."""
    return Path(text) if text.strip() else ""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="incseg", description="Class-incremental semantic segmentation (MiB and baselines)."
    )
    parser.add_argument("--version", action="version", version=f"incseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    overrides, progress = _shared_options()
    _add_run(sub, overrides, progress)
    _add_compare(sub, overrides, progress)
    _add_import_checkpoint(sub, overrides)
    _add_configs(sub)
    _add_methods(sub)
    _add_data(sub, progress)
    _add_eval(sub, progress)
    _add_predict(sub)
    return parser


def _add_run(
    sub: argparse._SubParsersAction,
    overrides: argparse.ArgumentParser,
    progress: argparse.ArgumentParser,
) -> None:
    """``incseg run``: every step of a setting (or its plan, ``--dry-run``)."""
    run = sub.add_parser(
        "run",
        parents=[overrides, progress],
        help="run every step of a class-incremental setting",
        description="Run every step of the configured setting in one process; print per-step "
        "tables and a summary; write config.yaml, step_K.pt, metrics.json and summary.md "
        "(and TensorBoard scalars). On N GPUs: torchrun --nproc_per_node=N -m incseg run ... "
        "(train.batch_size is the global batch; rank 0 writes).",
        epilog="Methods: `incseg methods` lists them (method.name: a name, or the module:Class path of "
        "your own Method subclass); `incseg methods NAME` shows the method.KEY hyperparameters, their "
        "defaults and valid ranges.",
    )
    _config_arguments(run, out_help="run directory (default: runs/NAME-TIME)")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run a directory holds (its run files are removed first)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (per step: classes, training and test images, epochs, iterations, checks; "
        "the image passes the cost is proportional to) and stop: nothing is trained or written",
    )
    run.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_DIR",
        help="continue an interrupted run from its last finished epoch: `--out DIR --resume`, or "
        "`--resume RUN_DIR` (config read from RUN_DIR/config.yaml unless CONFIG is given)",
    )
    run.add_argument(
        "--start-from",
        type=Path,
        default=None,
        metavar="RUN_DIR|FILE.pt",
        help="start with the finished steps 0..K of another run (copied unchanged; they must have been "
        "trained as this config trains them, e.g. step 0 by another plain-cross-entropy method), "
        "or with the step-0 weights of a checkpoint file (from `incseg import-checkpoint`, or a "
        "run's step_0.pt): step 0 is then evaluated on them, not trained",
    )
    run.add_argument(
        "--start-step",
        type=int,
        default=0,
        metavar="K",
        help="last step taken from --start-from (0)",
    )


def _add_compare(
    sub: argparse._SubParsersAction,
    overrides: argparse.ArgumentParser,
    progress: argparse.ArgumentParser,
) -> None:
    """``incseg compare``: several methods on one setting."""
    cmp = sub.add_parser(
        "compare",
        parents=[overrides, progress],
        help="run several methods (and Joint) on one setting and tabulate them",
        description="Run each method on the same setting, data and seed (a finished method is not "
        "re-run) and write comparison.md, comparison.csv and comparison.png.",
    )
    _config_arguments(cmp, out_help="output directory (default: runs/compare-NAME)")
    cmp.add_argument(
        "--methods",
        required=True,
        help="comma-separated method names, add-ons with +, e.g. ft,lwf,ilt,mib,mib+ucd,rcil "
        "(rcil, ssul, dkd, star get their model.architecture); NAME-m is a method with its "
        "exemplar memory (ssul-m, dkd-m: 100 images, star-m: 50)",
    )
    cmp.add_argument("--joint", action="store_true", help="also train Joint (the offline setting)")
    cmp.add_argument(
        "--joint-epochs", type=int, default=None, help="epochs of Joint (default: train.epochs)"
    )
    cmp.add_argument(
        "--retrain-first-step",
        action="store_true",
        help="train step 0 for every method (default: FT, LwF, ILT and MiB, whose step 0 is the same "
        "plain cross-entropy training, share the first one's)",
    )
    cmp.add_argument(
        "--method-set",
        dest="method_sets",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="override one method's hyperparameter, e.g. --method-set ewc.weight=50, or a key of "
        "its run only, e.g. --method-set dkd.train.lr=0.005 (repeatable); keys every row shares "
        "(protocol.*, data.*, model.* but model.architecture, train.seed) are refused: use --set",
    )
    cmp.add_argument(
        "--seeds",
        default=None,
        metavar="S,S,...",
        help="run every method once per seed (train.seed), e.g. 0,1,2; the tables give mean ± "
        "standard deviation and the number of runs (default: the config's seed, one run)",
    )
    cmp.add_argument(
        "--orders",
        default=None,
        metavar="ORDER,...",
        help="run every method once per class order (protocol.order: default, an official "
        "letter such as ADE20K's b, c, or random:K), e.g. default,random:1,random:2; with "
        "--seeds, every seed in every order (default: the config's order)",
    )
    cmp.add_argument(
        "--dry-run",
        action="store_true",
        help="print how many runs and image passes the comparison makes (finished runs are not "
        "re-run; shared step 0s are trained once) and exit; nothing is trained or written",
    )


def _add_import_checkpoint(
    sub: argparse._SubParsersAction, overrides: argparse.ArgumentParser
) -> None:
    """``incseg import-checkpoint``: another codebase's step checkpoint."""
    imp = sub.add_parser(
        "import-checkpoint",
        parents=[overrides],
        help="convert a MiB, PLOP, cssegmentation or detectron2 (Mask2Former) step checkpoint "
        "into an incseg checkpoint",
        description="Convert a step checkpoint of the official MiB code, PLOP, cssegmentation "
        "or a detectron2-based query model (Mask2Former, CoMFormer, BalConpas, ECLIPSE's step 0, "
        "SimCIS) into an incseg step checkpoint for the given config and step, so that "
        "`incseg eval` can evaluate it. Every key is accounted for (docs/reproduction.md).",
    )
    imp.add_argument(
        "source",
        type=Path,
        help="the other codebase's step checkpoint (.pth, or a detectron2 .pkl of numpy arrays)",
    )
    imp.add_argument(
        "--layout",
        choices=("auto", "mib", "cssegmentation", "plop", "detectron2"),
        default="auto",
        help="whose checkpoint it is (default: told from its keys; docs/reproduction.md)",
    )
    imp.add_argument("config", help="incseg config of the same setting, e.g. voc/15-5-overlap-mib")
    imp.add_argument("--step", type=int, required=True, help="step the checkpoint was saved at")
    imp.add_argument(
        "--out", type=Path, required=True, help="incseg checkpoint to write (not overwritten)"
    )


def _add_configs(sub: argparse._SubParsersAction) -> None:
    """``incseg configs``: the built-in configs."""
    sub.add_parser(
        "configs",
        help="list the built-in configs (demo, the MiB paper's rows, the seed table's rows)",
        description="List the built-in configs; pass a name to `incseg run`, e.g. voc/15-5-overlap-mib "
        "or seed/mib_r101iabnd16_aspp_512x512_vocaug15-5_disjoint. Seed configs show the seed "
        "table's mIoU (every class with background: compare with miou_with_bg).",
    )


def _add_methods(sub: argparse._SubParsersAction) -> None:
    """``incseg methods [NAME]``: the methods, or one's hyperparameters."""
    met = sub.add_parser(
        "methods",
        help="list the methods, or show one method's hyperparameters",
        description="List the methods (built-in and registered in the incseg.methods entry-point group); "
        "with NAME, print its docstring, what it asks of the engine and its hyperparameters (method.KEY) "
        "with type, default and valid range. NAME may be a module:Class path (docs/methods.md).",
    )
    met.add_argument("name", nargs="?", default=None, help="a method name or module:Class path")


def _add_data(sub: argparse._SubParsersAction, progress: argparse.ArgumentParser) -> None:
    """``incseg data prepare|check``: a VOC / ADE20K dataset."""
    data = sub.add_parser(
        "data",
        help="prepare or check a VOC / ADE20K dataset",
        description="Prepare (download and arrange) or check a Pascal VOC 2012 or ADE20K dataset.",
    )
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    for action, text in (
        ("prepare", "download (or reuse), verify, extract and arrange the public archives"),
        (
            "check",
            (
                "report every missing, unpaired, broken or out-of-range file; "
                "build the class index and print images per class"
            ),
        ),
    ):
        act = data_sub.add_parser(
            action, parents=[progress], help=text, description=text[0].upper() + text[1:] + "."
        )
        act.add_argument("family", choices=("voc", "ade"), help="dataset")
        act.add_argument("--root", type=Path, required=True, help="dataset folder")


def _add_eval(sub: argparse._SubParsersAction, progress: argparse.ArgumentParser) -> None:
    """``incseg eval``: a saved step re-evaluated."""
    ev = sub.add_parser(
        "eval",
        parents=[progress],
        help="re-evaluate a saved step",
        description="Re-evaluate a saved step on its test set and print the same table as training.",
    )
    ev.add_argument("path", type=Path, help="run directory or step_K.pt checkpoint")
    ev.add_argument(
        "--step", type=int, default=None, help="step of a run directory (default: last saved)"
    )
    ev.add_argument(
        "--full-image",
        action="store_true",
        help="evaluate full images (batch 1), not the config's test crop",
    )
    ev.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "change a key that acts at evaluation only (repeatable): "
            + ", ".join(EVAL_KEYS)
            + "; e.g. ECLIPSE's evaluation deltas: --set 'model.mask2former.logit_deltas=[0.0, -0.1]'"
        ),
    )


def _add_predict(sub: argparse._SubParsersAction) -> None:
    """``incseg predict``: masks and overlays of a saved step."""
    pr = sub.add_parser(
        "predict",
        help="segment images with a saved step",
        description="Segment images with a saved step; write palette PNG masks (dataset class ids) "
        "and side-by-side overlays.",
    )
    pr.add_argument(
        "checkpoint", type=Path, help="step_K.pt checkpoint or run directory (last step)"
    )
    pr.add_argument("images", type=Path, nargs="+", help="image files")
    pr.add_argument("--out", type=Path, required=True, help="output folder")


def _resume_arguments(args: argparse.Namespace) -> None:
    """``--resume DIR`` names the run directory (and, without CONFIG, its config.yaml)."""
    if isinstance(args.resume, str):
        if args.out is not None and args.out != Path(args.resume):
            raise IncsegError(
                f"--resume {args.resume} and --out {args.out} name different directories"
            )
        args.out = Path(args.resume)
        if args.config is None:
            if not (args.out / "config.yaml").is_file():
                raise IncsegError(
                    f"--resume {args.out}: no config.yaml there; is it a run directory?"
                )
            args.config = str(args.out / "config.yaml")
            args.saved_config = True
    if args.resume and args.overwrite:
        raise IncsegError("--resume and --overwrite contradict each other; pass one")


def _start_arguments(args: argparse.Namespace) -> None:
    """``--start-step`` only with ``--start-from``, and a step that exists."""
    if args.start_step < 0:
        raise IncsegError(f"--start-step: a step is 0 or more, got {args.start_step}")
    if args.start_step and args.start_from is None:
        raise IncsegError(
            f"--start-step {args.start_step} names the last step taken from --start-from RUN_DIR, "
            "which is missing; give both, or neither"
        )
    if args.start_from is not None and not args.start_from.exists():
        raise IncsegError(
            f"--start-from {args.start_from}: no such run directory or checkpoint file"
        )
    if args.start_step and args.start_from.is_file():
        raise IncsegError(
            f"--start-step {args.start_step}: --start-from {args.start_from} is a checkpoint file, "
            "which seeds step 0 only; to take later steps, start from a run directory"
        )


def _run(args: argparse.Namespace) -> int:
    _resume_arguments(args)
    _start_arguments(args)
    saved = getattr(args, "saved_config", False)
    config = load_config(args.config, args.overrides, saved=saved)
    if args.start_step >= config.num_steps:
        raise IncsegError(
            f"--start-step {args.start_step}: {config.protocol.setting} has steps "
            f"0..{config.num_steps - 1}"
        )
    if args.dry_run:
        return _dry_run(args, config)
    if args.resume and args.out is None:
        raise IncsegError("--resume needs the run directory: --out DIR --resume, or --resume DIR")
    from incseg.engine.adopt import adopt_steps, adopt_weights  # heavy: once the config is valid
    from incseg.engine.run import run_protocol
    from incseg.engine.rundir import RunDir

    dist = _join(config)
    # Under torchrun every process must agree on a generated run name: rank 0's is used.
    out = _broadcast(
        args.out or Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}", dist
    )
    if out.exists() and not out.is_dir():
        raise IncsegError(f"--out {out}: exists and is not a directory")
    source = None if args.start_from is None else args.start_from.resolve()
    if source is not None and Path(out).resolve() in (source, source.parent):
        where = "the --out directory itself" if source.is_dir() else "in the --out directory"
        raise IncsegError(
            f"--start-from {args.start_from} is {where}; start from another run or a file "
            "elsewhere (to continue this one, pass --resume)"
        )
    args.out = out  # named by the message of an interrupted run
    run_dir = RunDir(out)
    with _locked(run_dir, dist):  # one writer per run directory, from here to the end
        existing = run_dir.markers()
        if existing and not (args.overwrite or args.resume):
            raise IncsegError(
                f"--out {out}: already holds a run ({', '.join(existing)}); choose another directory, "
                "pass --resume to continue it, or --overwrite to replace it"
            )
        if args.overwrite and existing and dist.is_main:
            logger.info(
                f"--overwrite: removed the previous run's {', '.join(run_dir.clear())} from {out}"
            )
        _notes(config)
        logger.info(
            f"incseg run: {config.method.name} on {config.data.dataset} {config.setting.name} "
            f"({config.protocol.mode}) -> {out}"
        )
        if args.start_from is not None and args.start_from.is_file():
            adopt_weights(out, config, args.start_from, dist)
        elif args.start_from is not None:
            adopt_steps(out, config, args.start_from, args.start_step, dist)
        resume = bool(args.resume) or args.start_from is not None
        run_protocol(config, out, dist=dist, progress=not args.no_progress, resume=resume)
    logger.info(f"Run directory: {out}")
    return 0


def _dry_run(args: argparse.Namespace, config) -> int:
    from incseg.engine.plan import PlanError, dry_run
    from incseg.engine.runtime import resolve_device

    if args.resume or args.start_from is not None:
        raise IncsegError(
            "--dry-run plans a whole run from its config; it takes no --resume or --start-from"
        )
    resolve_device(config.train.device)  # the run refuses a missing device first (`_join`)
    try:
        print(dry_run(config, progress=not args.no_progress))
    except PlanError as err:
        print(err.plan)
        raise
    return 0


@contextlib.contextmanager
def _locked(run_dir, dist):
    """Rank 0 holds the run directory's lock; every rank fails alike when it cannot."""
    from incseg.engine.distributed import barrier

    with contextlib.ExitStack() as stack:
        problem = None
        if dist.is_main:
            try:
                stack.enter_context(run_dir.locked())
            except IncsegError as err:
                problem = str(err)
        problem = _broadcast(problem, dist)
        if problem is not None:
            raise IncsegError(problem)
        try:
            yield
        finally:
            barrier(dist)  # rank 0 releases the lock only once every rank is done


def _notes(config) -> None:
    """Settings that are valid but probably not meant, said before the run starts."""
    data = config.data
    if data.test_crop is not None and data.test_crop > data.crop_size:
        logger.info(
            f"note: data.test_crop {data.test_crop} is larger than data.crop_size {data.crop_size}: test "
            "images are cropped larger than training ones (set data.test_crop to change it)"
        )


def _join(config):
    """This process's identity (joining torchrun's process group); only rank 0 logs."""
    from incseg.engine.distributed import init_distributed
    from incseg.engine.runtime import Runtime

    dist = init_distributed(Runtime.of(config).device)
    log.configure(dist.rank)
    return dist


def _broadcast(value, dist):
    from incseg.engine.distributed import broadcast_object

    return broadcast_object(value, dist)


def _compare(args: argparse.Namespace) -> int:
    base = load_config(args.config, args.overrides)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise IncsegError("--methods: give at least one method name")
    if args.joint_epochs is not None:
        check_range(args.joint_epochs, RANGES["train.epochs"], "--joint-epochs")
    out = args.out or Path("runs") / f"compare-{base.name}"
    if out.exists() and not out.is_dir():
        raise IncsegError(f"--out {out}: exists and is not a directory")
    from incseg.compare import (
        ComparisonOptions,
        parse_method_sets,
        parse_orders,
        parse_seeds,
        plan_comparison,
        run_comparison,
    )
    from incseg.engine.run import run_protocol
    from incseg.engine.rundir import RunDir

    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    options = ComparisonOptions(
        methods=tuple(methods),
        joint=args.joint,
        joint_epochs=args.joint_epochs,
        method_sets=parse_method_sets(args.method_sets, methods),
        share_first_step=not args.retrain_first_step,
        seeds=seeds,  # each checked against train.seed's range with its cell's config
        orders=parse_orders(args.orders) if args.orders is not None else None,
    )
    if args.dry_run:
        print(plan_comparison(base, options, out, progress=not args.no_progress))
        return 0
    dist = _join(base)

    def run(config, run_dir):
        run_protocol(config, run_dir, dist=dist, progress=not args.no_progress, resume=True)

    def lock(path):  # --out and each method's run directory, as `incseg run` locks its own
        return _locked(RunDir(path), dist)

    rows = run_comparison(base, options, out, run=run, dist=dist, lock=lock)
    logger.info(f"Comparison written to {out}/comparison.md, .csv and .png")
    failed = [r["method"] for r in rows if r.get("failed")]
    if failed:
        if dist.is_main:
            print(
                f"error: {len(failed)} method(s) failed: {', '.join(failed)} (see comparison.md)",
                file=sys.stderr,
            )
        return 1
    return 0


def _checkpoint_path(path: Path, step: int | None) -> Path:
    """``path`` itself, or ``step_K.pt`` of a run directory (default: the highest K)."""
    from incseg.engine.rundir import RunDir

    if not path.is_dir():
        if step is not None:
            raise IncsegError("--step is only for run directories, not checkpoint files")
        return path
    run = RunDir(path)
    if step is not None:
        return run.step_file(step)
    files = run.step_files()
    if not files:
        raise IncsegError(f"{path}: no step_K.pt checkpoints in this directory")
    return files[max(files)]


def _eval_overrides(config: dict, assignments: list[str]) -> None:
    """Apply ``incseg eval --set`` to a checkpoint's config dict: only :data:`EVAL_KEYS`, which
    change neither the trained weights nor what the step's classes are."""
    import copy

    from incseg.config import apply_override, config_from_dict
    from incseg.engine.model_io import stand_in_method

    changed = copy.deepcopy(config)
    for assignment in assignments:
        key = assignment.partition("=")[0].strip()
        if key not in EVAL_KEYS:
            raise ConfigError(
                f"--set {assignment!r}: {key!r} is not a key that acts at evaluation only; "
                f"valid keys: {', '.join(EVAL_KEYS)} (to change anything else, train a run)"
            )
        apply_override(changed, assignment)
    if changed == config:
        return
    try:  # a bad value is the option's error, not the checkpoint's
        config_from_dict({**changed, "method": {"name": stand_in_method(changed.get("model"))}})
    except ConfigError as err:
        raise ConfigError(f"--set {' '.join(assignments)}: {err}") from None
    config.update(changed)


def _eval(args: argparse.Namespace) -> int:
    from incseg.engine.checkpoint import load_checkpoint
    from incseg.engine.evaluate import evaluate_checkpoint
    from incseg.report import format_step_table

    path = _checkpoint_path(args.path, args.step)
    checkpoint = load_checkpoint(path)
    if args.full_image:
        checkpoint["config"]["data"]["test_crop"] = None
    _eval_overrides(checkpoint["config"], args.set)
    report, num_images = evaluate_checkpoint(checkpoint, progress=not args.no_progress)
    cfg = checkpoint["config"]
    partial = (
        f", after epoch {checkpoint['epochs_done']} of the step"
        if checkpoint.get("kind") == "epoch"
        else ""
    )
    title = (
        f"Evaluation of {path}: step {report.step}{partial} of {cfg['data']['dataset']} "
        f"{cfg['protocol']['setting']} ({cfg['protocol']['mode']}, {cfg['method']['name']}): "
        f"{num_images} test images" + (f"; changed: {', '.join(args.set)}" if args.set else "")
    )
    print(format_step_table(report, title))
    return 0


def _data(args: argparse.Namespace) -> int:
    if args.data_command == "prepare":
        from incseg.data.prepare import prepare

        prepare(args.family, args.root, progress=not args.no_progress)
        return 0
    from incseg.data.check import check_dataset, class_table

    report = check_dataset(args.family, args.root, progress=not args.no_progress)
    print(
        f"\nImages per class (intact pairs; train = {len(report.names['train'])}, "
        f"test = {len(report.names['test'])}):"
    )
    print(class_table(args.family, report))
    if args.family == "voc":
        print(
            f"\nOfficial split lists vs the selection rule: {report.split_checks} image/step checks, "
            f"{len(report.split_mismatches)} mismatches"
        )
        for line in report.split_mismatches[:50]:
            print(f"  {line}")
    if report.problems:
        print(f"\n{len(report.problems)} problem(s) found:", file=sys.stderr)
        for path, what in report.problems:
            print(f"  {path}: {what}", file=sys.stderr)
        return 1
    if report.split_mismatches:
        return 1
    print(f"\nOK: no problems found in {args.root}")
    return 0


def _import_checkpoint(args: argparse.Namespace) -> int:
    from incseg.engine.checkpoint import save_checkpoint
    from incseg.engine.model_io import build_model
    from incseg.models.imports import checkpoint_step, convert_checkpoint, load_foreign_checkpoint
    from incseg.protocol import step_info

    def refuse_existing_out() -> None:  # a link, even to nothing, is the user's: never replaced
        if args.out.is_symlink() and not args.out.exists():
            raise IncsegError(
                f"--out {args.out}: exists as a symbolic link to {str(args.out.readlink())!r}, "
                "which is missing; import-checkpoint never replaces a path: choose another file"
            )
        if args.out.exists():
            raise IncsegError(f"--out {args.out}: exists; choose another file")

    refuse_existing_out()
    config = load_config(args.config, args.overrides)
    setting = config.setting
    if not 0 <= args.step < setting.num_steps:
        raise IncsegError(
            f"--step {args.step}: setting {setting.name} has steps 0..{setting.num_steps - 1}"
        )
    data = load_foreign_checkpoint(args.source)
    saved_step = checkpoint_step(data)
    if saved_step is not None and saved_step != args.step:
        raise IncsegError(f"--step {args.step}: {args.source} says it is step {saved_step}")
    info = step_info(setting, args.step)
    model = build_model(config, info, pretrained=False)
    model.load_state_dict(convert_checkpoint(data, model, layout=args.layout), strict=False)
    refuse_existing_out()  # again: made while the checkpoint was converted
    save_checkpoint(
        args.out,
        {
            "step": args.step,
            "setting": setting.name,
            "channels_per_step": list(info.channels_per_step),
            "config": config.to_dict(),
            "model": model.state_dict(),
            "method": {},
            "imported_from": str(args.source),
        },
    )
    print(
        f"wrote {args.out} (step {args.step} of {setting.name}); evaluate it with `incseg eval {args.out}`"
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from incseg.engine.checkpoint import load_checkpoint
    from incseg.predict import predict_images

    checkpoint = load_checkpoint(_checkpoint_path(args.checkpoint, None))
    predict_images(checkpoint, args.images, args.out)
    return 0


def _published_note(name: str) -> str:
    from incseg.published import published_numbers

    p = published_numbers()[name]
    return f"{p.miou}% ({p.source}; read as incseg's {p.column})"


def _config_list() -> str:
    from incseg.configs import PUBLISHED, SEED_MIOU, ZOO_MIOU

    lines = []
    for name in builtin_configs(with_folders=True):
        if name.startswith("seed/"):
            row = name.removeprefix("seed/")
            miou, zoo = SEED_MIOU.get(row), ZOO_MIOU.get(row)
            if miou is not None:
                note = f"seed mIoU {miou}% (with background)"
            elif zoo is not None:
                note = f"not in the seed table; cssegmentation's zoo: {zoo}% (with background)"
            elif name in PUBLISHED:
                note = _published_note(name)
            elif name.startswith(("seed/plop_", "seed/mib+ucd_", "seed/ilt_", "seed/rcil_")):
                note = "cssegmentation's recipe, no number reported"
            else:
                note = "seed mIoU not reported"
            name = f"{name:<58} {note}"
        elif name in PUBLISHED:
            name = f"{name:<58} {_published_note(name)}"
        lines.append(name)
    seed_note = (
        "Seed rows: the seed's own checkpoints can be imported and evaluated (download, incseg "
        "import-checkpoint, incseg eval, the number to expect): docs/reproduction.md, "
        '"Evaluating other codebases\' checkpoints".'
    )
    lines += ["", seed_note]
    return "\n".join(lines)


def _stores(cls: type) -> str:
    """What a method keeps of earlier steps' data besides the model: images when it has a
    memory (``method.memory_size``), else what its defaults store (``Method.stores``)."""
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    if "memory_size" in fields:
        return "images if memory_size > 0"
    return cls().stores()


def _methods(name: str | None) -> str:
    from incseg.methods import (
        ADDON_PATHS,
        METHOD_PATHS,
        addon_class,
        method_class,
        plugin_paths,
        split_name,
    )

    if name is not None:
        if name in ADDON_PATHS:
            return _describe(name, addon_class(name), f"method.{name}.KEY", engine=False)
        base, addons = split_name(name)
        parts = [_describe(base, method_class(base), "method.KEY", engine=True)]
        parts += [_describe(a, addon_class(a), f"method.{a}.KEY", engine=False) for a in addons]
        return "\n\n".join(parts)
    methods = dict(sorted(METHOD_PATHS.items())) | plugin_paths()
    width = max(map(len, [*methods, *ADDON_PATHS]))
    rows = [f"{'method':<{width}}  {'stores':<30} class"]
    for key, path in methods.items():
        rows.append(f"{key:<{width}}  {_stores(method_class(key)):<30} {path}")
    rows += ["", "add-ons (method.name: METHOD+ADDON, e.g. mib+ewf):"]
    rows += [f"{key:<{width}}  {path}" for key, path in ADDON_PATHS.items()]
    return "\n".join(
        [*rows, "", "incseg methods NAME shows a method's or add-on's hyperparameters."]
    )


def _describe(name: str, cls: type, key: str, *, engine: bool) -> str:
    """What ``incseg methods NAME`` prints of a method or add-on class: its docstring, what it
    asks of the engine, and every hyperparameter (``key``) with its type, default and valid
    values."""
    import dataclasses
    import inspect
    import typing

    from incseg.ranges import ranges_of

    hints, ranges = typing.get_type_hints(cls), ranges_of(cls)
    lines = [f"{name}: {cls.__module__}:{cls.__qualname__}", ""]
    lines += [f"  {line}".rstrip() for line in inspect.cleandoc(cls.__doc__ or "").splitlines()]
    if engine:
        asks = (
            "needs_old_model",
            "features",
            "scans_old_model",
            "needs_gradients",
            "plain_first_step",
            "trained_state",
        )
        lines += ["", f"  engine: {', '.join(f'{a}={getattr(cls, a)!r}' for a in asks)}"]
        needs = getattr(cls, "architecture", None)
        if needs is not None:
            lines.append(f"  model: needs model.architecture: {needs}")
        variant = getattr(cls, "memory_variant", 0)
        if variant:
            mixing = {"concat": "join the step's images", "half_batch": "fill half of every batch"}
            lines.append(
                f"  memory: method.memory_size images (0: none; {variant} in the official VOC "
                f"-M variant, `incseg compare --methods {name}-m`) "
                f"{mixing.get(cls.memory_mixing, cls.memory_mixing)}"
            )
        if cls.unknown_from is not None:
            lines.append("  data: the unknown class from data.saliency (method.unknown)")
    lines += ["", f"  hyperparameters ({key}: type = default):"]
    fields = [f for f in dataclasses.fields(cls) if f.init]
    for f in fields:
        hint = hints[f.name]
        if typing.get_origin(hint) is typing.Literal:
            kind, where = "str", f"  one of {list(typing.get_args(hint))}"
        else:
            kind = getattr(hint, "__name__", str(hint))
            where = f"  in {ranges[f.name].describe()}" if f.name in ranges else ""
        lines.append(f"    {f.name}: {kind} = {f.default!r}{where}")
    if not fields:
        lines.append("    (none)")
    return "\n".join(lines)


def _print(text_of: Callable[[argparse.Namespace], str]) -> Callable[[argparse.Namespace], int]:
    """A handler that prints what ``text_of(args)`` returns."""

    def handler(args: argparse.Namespace) -> int:
        print(text_of(args))
        return 0

    return handler


COMMANDS = {  # one handler per command: args -> exit code
    "run": _run,
    "compare": _compare,
    "eval": _eval,
    "predict": _predict,
    "data": _data,
    "import-checkpoint": _import_checkpoint,
    "configs": _print(lambda args: _config_list()),
    "methods": _print(lambda args: _methods(args.name)),
}


def _how_to_continue(args: argparse.Namespace) -> str:
    """How to continue an interrupted command, for the message."""
    if args.command == "run" and args.out is not None:
        if (Path(args.out) / "config.yaml").is_file():
            return f"; continue it with: incseg run --resume {args.out}"
        return "; nothing was saved yet: run the same command again"
    if args.command == "compare":
        return "; run the same command again to continue (finished methods are kept)"
    return ""


def _check_paths(args: argparse.Namespace) -> None:
    """An empty ``--out`` or ``--resume`` would mean the current folder, and a path the file
    system cannot hold (a name over 255 bytes) fails at its first use: both refused by name."""
    for option in ("out", "resume", "start_from"):
        value = getattr(args, option, None)
        flag = "--" + option.replace("_", "-")
        if value == "":
            raise IncsegError(
                f"{flag}: an empty path; name the run directory (leave --out out to write "
                "runs/NAME-TIME)"
            )
        if isinstance(value, (str, Path)):
            try:
                Path(value).exists()
            except OSError as err:
                shown = str(value) if len(str(value)) <= 80 else f"{str(value)[:77]}..."
                raise IncsegError(
                    f"{flag} {shown}: {err.strerror or err} (a file or folder name holds at most "
                    "255 bytes)"
                ) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 2 user error)."""
    args = _parser().parse_args(argv)
    log.configure()
    try:
        _check_paths(args)
        return COMMANDS[args.command](args)
    except IncsegError as err:
        then = f" (free space{_how_to_continue(args)})" if isinstance(err, DiskFullError) else ""
        print(f"error: {err}{then}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted{_how_to_continue(args)}", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:
            from incseg.engine.distributed import shutdown_distributed

            shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
