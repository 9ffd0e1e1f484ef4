"""torchrun / DDP: sharding, synchronised batch norm, and two gloo processes against one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from incseg.engine import distributed
from incseg.engine.distributed import (
    DistributedBatchNorm2d,
    EpochBatchSampler,
    convert_sync_bn,
    local_batch_size,
    shard_indices,
)
from incseg.errors import ConfigError

HELPERS = Path(__file__).parent / "helpers"


def torchrun(
    args: list[str], cwd: Path, nproc: int = 2, kill_at: str | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    if kill_at:
        env["INCSEG_KILL_AT"] = kill_at
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]
    result = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if kill_at:
        assert result.returncode != 0, "the fault point was not reached"
    else:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("n", [10, 11, 3])
def test_rank_batches_are_slices_of_the_single_process_batches(n):
    single = EpochBatchSampler(n, 4, seed=7)
    ranks = [EpochBatchSampler(n, 4, seed=7, rank=r, world_size=2) for r in range(2)]
    for sampler in (single, *ranks):
        sampler.set_epoch(3)
    assert len(ranks[0]) == len(ranks[1]) == len(single) == (n // 4 if n >= 4 else 1)
    for whole, part0, part1 in zip(single, *ranks, strict=True):
        assert part0 + part1 == whole  # same images, same augmentation seeds, rank 0 first
        assert abs(len(part0) - len(part1)) <= 1


def test_order_depends_only_on_seed_and_epoch():
    def epoch(seed, e):
        sampler = EpochBatchSampler(50, 8, seed=seed)
        sampler.set_epoch(e)
        return list(sampler)

    assert epoch(1, 0) == epoch(1, 0)
    assert epoch(1, 0) != epoch(1, 1)
    assert epoch(1, 0) != epoch(2, 0)
    items = [i for batch in epoch(1, 0) for i, _ in batch]
    assert len(set(items)) == len(items) == 48  # a permutation, last incomplete batch dropped


def test_test_shards_count_every_image_once():
    for n in (7, 8, 1):
        shards = [list(shard_indices(n, r, 3)) for r in range(3)]
        assert sorted(i for shard in shards for i in shard) == list(range(n))


def test_global_batch_must_split_over_processes():
    assert local_batch_size(24, 4) == 6
    with pytest.raises(
        ConfigError,
        match=r"train.batch_size: 6 is the global batch and must be divisible by .*\(4\)",
    ):
        local_batch_size(6, 4)


def test_sync_bn_conversion_keeps_weights_and_state_dict_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    model[1].weight.data.uniform_(0.5, 1.5)
    weight, keys = model[1].weight, list(model.state_dict())
    convert_sync_bn(model, torch.device("cpu"))
    assert isinstance(model[1], DistributedBatchNorm2d) and isinstance(
        model[2][0], DistributedBatchNorm2d
    )
    assert list(model.state_dict()) == keys and model[1].weight is weight


def test_synchronised_statistics_path_equals_batchnorm_over_the_same_batch(monkeypatch):
    """The global-statistics code path itself (not plain BN's): with a process group of one faked
    (the all-reduce is the identity), outputs, gradients and running statistics must equal
    nn.BatchNorm2d's in training mode on the same batch."""
    monkeypatch.setattr(distributed, "_group_joined", lambda: True)
    monkeypatch.setattr(distributed._AllReduceSum, "apply", lambda x: x)
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4)
    plain.weight.data.uniform_(0.5, 1.5)
    plain.bias.data.normal_()
    synced = DistributedBatchNorm2d(4)
    synced.load_state_dict(plain.state_dict())
    x = (3 * torch.randn(3, 4, 5, 6) + 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = plain(x), synced(x2)
    torch.testing.assert_close(y2, y)
    (y * torch.arange(6.0)).sum().backward()
    (y2 * torch.arange(6.0)).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)
    torch.testing.assert_close(synced.weight.grad, plain.weight.grad)
    torch.testing.assert_close(synced.running_mean, plain.running_mean)
    torch.testing.assert_close(synced.running_var, plain.running_var)  # unbiased, as BatchNorm2d


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """The worker run by one process (in this one) and by two gloo processes, with and without sync BN."""
    sys.path.insert(0, str(HELPERS))
    try:
        import ddp_worker
    finally:
        sys.path.remove(str(HELPERS))
    out = {name: tmp_path_factory.mktemp(name) for name in ("single", "sync", "nosync")}
    ddp_worker.main(out["single"], sync_bn=True)
    torchrun([str(HELPERS / "ddp_worker.py"), str(out["sync"])], cwd=HELPERS)
    torchrun([str(HELPERS / "ddp_worker.py"), str(out["nosync"]), "0"], cwd=HELPERS)
    load = lambda path: torch.load(path, weights_only=False)
    return ddp_worker, {
        name: [load(p) for p in sorted(folder.glob("rank*.pt"))] for name, folder in out.items()
    }


def _max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_two_processes_train_like_one_with_the_global_batch(ddp_runs):
    _, runs = ddp_runs
    (single,), (rank0, rank1) = runs["single"], runs["sync"]
    assert rank0["world_size"] == 2 and single["world_size"] == 1
    assert (
        rank0["keys"] + rank1["keys"] != single["keys"]
    )  # interleaved per batch, not concatenated
    assert sorted(rank0["keys"] + rank1["keys"]) == sorted(single["keys"])
    # After two iterations both ranks hold the very same parameters and BN statistics ...
    for key in rank0["model"]:
        assert torch.equal(rank0["model"][key], rank1["model"][key]), key
    # ... equal (to float rounding) to one process that saw the global batches of 4.
    assert _max_difference(single["model"], rank0["model"]) < 1e-5
    # Without synchronised BN each rank normalises with its own 2 images: clearly different.
    assert _max_difference(single["model"], runs["nosync"][0]["model"]) > 1e-3


def test_the_scan_sums_every_process_into_the_single_process_result(ddp_runs):
    _, runs = ddp_runs
    (single,), ranks = runs["single"], runs["sync"]
    assert single["histogram"].shape == (21, 100) and single["histogram"].sum() > 0
    for rank in ranks:  # every rank holds the sum of both shards: the one-process histogram
        assert torch.equal(rank["histogram"], single["histogram"])
        assert torch.equal(rank["thresholds"], single["thresholds"])


def test_sharded_evaluation_counts_each_image_once(ddp_runs):
    worker, runs = ddp_runs
    rank0, rank1 = runs["sync"]
    assert sorted(rank0["test_items"] + rank1["test_items"]) == list(range(7))  # odd: 4 + 3 images
    assert torch.equal(rank0["matrix"], rank1["matrix"])
    # The same weights evaluated by one process over all 7 images give the same matrix.
    from incseg.config import config_from_dict
    from incseg.data import build_source
    from incseg.engine.evaluate import evaluate
    from incseg.engine.loaders import build_test_loader
    from incseg.engine.model_io import build_model
    from incseg.engine.runtime import Runtime
    from incseg.protocol import get_setting, step_info
    from incseg.protocol.selection import pack_presence

    config = config_from_dict(worker.CONFIG)
    info = step_info(get_setting("voc", "15-5"), 0)
    model = build_model(config, info)
    model.load_state_dict(rank0["model"])
    source = build_source(config.data, "test")
    loader = build_test_loader(config, source, pack_presence(source.presence()), info)
    assert len(loader.dataset) == 7
    matrix = evaluate(model, loader, info.num_channels, Runtime(torch.device("cpu")))
    assert torch.equal(matrix, rank0["matrix"])
    valid = sum(int((label != 255).sum()) for _, label in loader.dataset)
    assert int(matrix.sum()) == valid  # every labelled pixel of every image, once


def test_torchrun_runs_the_cli_and_rank_zero_writes_once(tmp_path, tiny_config_path):
    out = tmp_path / "ddp"
    result = torchrun(
        [
            "-m",
            "incseg",
            "run",
            str(tiny_config_path),
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "train.device=cpu",
            "--set",
            "data.num_train=40",
        ],
        cwd=tmp_path,
    )
    assert result.stdout.count("Run directory:") == 1  # rank 1 prints nothing
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["step"] for s in metrics["steps"]] == [0, 1]
    assert {p.name for p in out.glob("step_*.pt")} == {"step_0.pt", "step_1.pt"}
    assert not list(out.glob(".*.tmp")) and not (out / "last.pt").exists()
    # The same run in one process: same images per step, same metrics up to float rounding.
    from incseg.config import load_config
    from incseg.engine.run import run_protocol

    config = load_config(str(tiny_config_path), ["train.device=cpu", "data.num_train=40"])
    run_protocol(config, tmp_path / "one", progress=False)
    single = json.loads((tmp_path / "one" / "metrics.json").read_text())
    for a, b in zip(single["steps"], metrics["steps"], strict=True):
        assert (
            a["num_train_images"] == b["num_train_images"]
            and a["num_test_images"] == b["num_test_images"]
        )
        for term, value in a["losses"][0].items():
            assert b["losses"][0][term] == pytest.approx(value, rel=1e-3, abs=1e-4), term
    for key in ("step_0.pt", "step_1.pt"):
        ours = torch.load(out / key, weights_only=True)["model"]
        reference = torch.load(tmp_path / "one" / key, weights_only=True)["model"]
        assert _max_difference(reference, ours) < 1e-3


def test_compare_under_torchrun_writes_its_table_once(tmp_path, tiny_config_path):
    out = tmp_path / "cmp"
    result = torchrun(
        [
            "-m",
            "incseg",
            "compare",
            str(tiny_config_path),
            "--methods",
            "ft,mib",
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "train.device=cpu",
            "--set",
            "data.num_train=40",
        ],
        cwd=tmp_path,
    )
    assert result.stdout.count("Comparison written to") == 1
    assert (
        result.stdout.count("mib: step 0 is the one of ft") == 1
    )  # adopted by rank 0, logged once
    table = (out / "comparison.md").read_text()
    assert "| ft |" in table and "| mib |" in table
    for method in ("ft", "mib"):
        steps = json.loads((out / method / "metrics.json").read_text())["steps"]
        assert [s["step"] for s in steps] == [0, 1]
    assert json.loads((out / "mib" / "metrics.json").read_text())["steps"][0][
        "started_from"
    ] == str(out / "ft")


def test_torchrun_run_killed_mid_step_resumes_to_identical_results(tmp_path, tiny_config_path):
    args = [
        "-m",
        "incseg",
        "run",
        str(tiny_config_path),
        "--no-progress",
        "--set",
        "train.device=cpu",
        "--set",
        "data.num_train=40",
        "--set",
        "train.epochs_incremental=2",
        "--set",
        "train.tensorboard=off",
    ]
    torchrun([*args, "--out", str(tmp_path / "whole")], cwd=tmp_path)
    torchrun(
        [*args, "--out", str(tmp_path / "cut")], cwd=tmp_path, kill_at="epoch:1:1"
    )  # rank 0 dies
    assert (tmp_path / "cut" / "last.pt").is_file() and not (
        tmp_path / "cut" / "step_1.pt"
    ).exists()
    result = torchrun([*args, "--out", str(tmp_path / "cut"), "--resume"], cwd=tmp_path)
    assert "resuming step 1 after epoch 1" in result.stdout
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text()) == whole
