"""Run under ``torchrun`` by tests/test_distributed.py (or directly, as the one-process reference).

Trains step 0 of a tiny shapes run for one epoch of two global batches of 4 with the engine's own
pieces (sampler, sync BN, DDP), then evaluates the 7 test images sharded over the ranks, and runs
PLOP's scan (a fixed random old model over the training batches). Writes ``OUT/rank{R}.pt`` with
the trained state dict, the reduced confusion matrix, the keys this rank trained on and the
scan's summed histogram and thresholds.

Usage: ddp_worker.py OUT [sync_bn=1]
"""

import sys
from pathlib import Path

import torch

from incseg.config import config_from_dict
from incseg.data import build_source
from incseg.engine.distributed import init_distributed, shutdown_distributed
from incseg.engine.evaluate import evaluate
from incseg.engine.loaders import build_test_loader, build_train_loader
from incseg.engine.model_io import build_model, frozen_copy
from incseg.engine.runtime import Runtime
from incseg.engine.train import Optimisation, Step, scan_old_model, train_one_epoch
from incseg.methods import PLOP, FineTuning
from incseg.protocol import get_setting, step_info
from incseg.protocol.selection import pack_presence

CONFIG = {
    "data": {
        "dataset": "shapes",
        "image_size": 32,
        "num_train": 10,
        "num_test": 9,
        "crop_size": 32,
    },
    "protocol": {"setting": "15-5", "mode": "overlap"},
    "model": {"backbone": "tiny", "output_stride": 16, "norm": "bn", "head_channels": 8},
    "method": {"name": "ft"},
    "train": {
        "epochs": 1,
        "lr": 0.05,
        "batch_size": 4,
        "eval_batch_size": 1,
        "device": "cpu",
        "log_interval": 1,
        "tensorboard": "off",
    },
}


def main(out: Path, sync_bn: bool) -> None:
    config = config_from_dict({**CONFIG, "train": {**CONFIG["train"], "sync_bn": sync_bn}})
    dist = init_distributed(torch.device("cpu"))
    rt = Runtime(torch.device("cpu"), dist, sync_bn=sync_bn)
    info = step_info(get_setting("voc", "15-5"), 0)
    train_src, test_src = build_source(config.data, "train"), build_source(config.data, "test")
    torch.manual_seed(1)
    train = build_train_loader(
        config, train_src, pack_presence(train_src.presence()), info, dist=dist
    )
    test = build_test_loader(config, test_src, pack_presence(test_src.presence()), info, dist=dist)
    assert len(train) == 2, len(train)
    model = rt.place(build_model(config, info))
    method = FineTuning()
    method.begin_step(info, model)
    opt = Optimisation.for_step(model, config.train, info.step, len(train), rt)
    train.batch_sampler.set_epoch(0)
    train_one_epoch(Step(info, train, model, None, opt, net=rt.wrap(model)), method, rt, 0)
    keys = [key for batch in train.batch_sampler for key in batch]
    matrix = evaluate(model, test, info.num_channels, rt)
    torch.manual_seed(2)
    old, plop, totals = frozen_copy(build_model(config, info)), PLOP(), {}
    end_scan = plop.end_scan
    plop.end_scan = lambda t, i: (totals.update(t), end_scan(t, i))
    scan_old_model(Step(step_info(get_setting("voc", "15-5"), 1), train, None, old, opt), plop, rt)
    torch.save(
        {
            "model": model.state_dict(),
            "matrix": matrix,
            "keys": keys,
            "test_items": list(test.sampler),
            "world_size": dist.world_size,
            "histogram": totals["histogram"],
            "thresholds": plop.thresholds,
        },
        out / f"rank{dist.rank}.pt",
    )
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] != ["0"])
