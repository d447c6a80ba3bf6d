"""Data-parallel training: N processes on shares of each global batch take the step one process
takes on the whole batch (gloo on the CPU; the same code runs nccl on GPUs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from tests.conftest import make_settings, torch_threads
from workbench.catalog.ingest import ingest
from workbench.dicom.synth import synthesize_cohort
from workbench.model.distributed import World, all_sum, shard, sync_batchnorm
from workbench.model.nets import create_network
from workbench.model.problems import Objective, Problem

PROBLEM = Problem("multiclass", ("a", "b", "c"), None)
WEIGHT = torch.tensor([1.0, 2.0, 3.0])  # class weights: the global normalisation matters


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        x = torch.rand(6, 1, 32, 32, generator=g)
        y = torch.randint(0, 3, (6,), generator=g)
        x[y == 1, :, 8:16, 8:16] += 1.0
        out.append((x, y))
    return out


def _steps(model: torch.nn.Module, net: torch.nn.Module, world: World) -> dict[str, Any]:
    """Three SGD steps on this rank's share of each global batch (6 images: 3 + 3 on two
    ranks). Returns the global loss of each step and the gradients of the first."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = Objective(PROBLEM, class_weight=WEIGHT, world=world)
    model.train()
    losses, first = [], {}
    for x, y in _batches():
        mine = shard(list(range(len(y))), world)
        opt.zero_grad()
        loss = loss_fn(net(x[mine]), y[mine])
        loss.backward()
        losses.append(float(all_sum(loss.detach(), world)) / world.size)
        if not first:
            first = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return {"losses": losses, "grads": first, "state": model.state_dict()}


def _rank(rank: int, size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        torch.manual_seed(0)
        model = create_network(2, 3)
        net = DistributedDataParallel(sync_batchnorm(model, torch.device("cpu")))
        result = _steps(model, net, World(rank, size))
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_take_the_steps_of_one_on_the_whole_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_network(2, 3)
    with torch_threads(1):  # as in each rank; restored for the tests after this one
        one = _steps(model, model, World())
    out = tmp_path / "two.pt"
    mp.spawn(_rank, args=(2, _free_port(), str(out)), nprocs=2)
    two = torch.load(out, weights_only=True)
    # The averaged gradient of the shares is the whole batch's gradient, BatchNorm included,
    # up to float rounding (sums in another order).
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 300
    for k, a in one["grads"].items():
        assert (a - two["grads"][k]).abs().max() <= 1e-3 * a.abs().max() + 1e-6, k
    assert np.allclose(one["losses"][:2], two["losses"][:2], atol=1e-4)
    # An untrained DenseNet amplifies rounding (a 1e-6 nudge of the weights moves the next
    # gradients by a few percent), so later steps and weights are compared loosely.
    assert np.allclose(one["losses"], two["losses"], atol=1e-2)
    for k, a in one["state"].items():
        if a.is_floating_point() and "running" not in k:
            assert torch.allclose(a, two["state"][k], atol=1e-2), k


def test_shares_of_a_global_batch_cover_it_once() -> None:
    batch = list(range(7))
    parts = [shard(batch, World(r, 3)) for r in range(3)]
    assert sum(parts, []) == batch and [len(p) for p in parts] == [2, 2, 3]


def test_torchrun_with_two_processes_trains_like_one_and_only_rank_0_writes(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    synthesize_cohort(src, n_studies=20, seed=5, modality="DX", image_size=48)
    args = ["train", "--cohort", "c", "--name", "m", "--epochs", "1", "--image-size", "32"]
    args += ["--batch-size", "8", "--precision", "fp32", "--device", "cpu"]
    args += ["--sanity-images", "0"]  # rank 0's saliency checks: nothing here compares them
    homes = {}
    for run in ("one", "two"):
        s = make_settings(tmp_path / run)  # same key: the same pseudonyms and split
        ingest(s, src, src / "labels.csv", "c", progress=False, workers=1)
        homes[run] = s
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKBENCH_")}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    launch = {
        "one": [sys.executable, "-m", "workbench.cli", *args],
        "two": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={_free_port()}",
            "-m",
            "workbench.cli",
            *args,
        ],
    }
    meta = {}
    for run, cmd in launch.items():
        home = homes[run].home
        done = subprocess.run(
            cmd, env={**env, "WORKBENCH_HOME": str(home)}, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.count("bundle ") == 1  # rank 0 alone reports
        models = homes[run].models_dir / "m"
        assert sorted(p.name for p in models.iterdir()) == [".training", "v1"]  # one bundle
        assert not list((models / ".training").iterdir())  # checkpoint removed at the end
        meta[run] = json.loads((models / "v1" / "configs" / "metadata.json").read_text())
    one, two = (meta[r]["workbench"] for r in ("one", "two"))
    assert two["training"]["hardware"]["processes"] == 2
    assert two["training"]["hardware"]["backend"] == "gloo"
    assert one["split"] == two["split"]
    h1, h2 = one["training"]["history"][0], two["training"]["history"][0]
    # Same global batches, averaged gradients, BatchNorm over the global batch: the runs differ
    # by float rounding only, which Adam's first steps (g / |g| on near-zero gradients) amplify
    # a little; the losses stay close.
    assert abs(h1["train_loss"] - h2["train_loss"]) < 0.05
    assert abs(h1["val_loss"] - h2["val_loss"]) < 0.02
