"""The training steps: one epoch of optimiser steps (AMP, channels_last, sharded batches under
torchrun), the seeded batch order, sharded forward passes, and what a run shares across ranks."""

from __future__ import annotations

import os
import platform
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import monai
import numpy as np
import torch
from monai.utils import set_determinism
from torch import nn
from torch.utils.data import Subset
from tqdm import tqdm

from workbench.model.data import (
    augment_batch,
    study_error,
)
from workbench.model.distributed import (
    World,
    all_sum,
    broadcast,
    gather,
)
from workbench.model.nets import (
    keep_frozen_in_eval,
)
from workbench.model.problems import (
    Problem,
)
from workbench.model.runtime import (
    autocast,
    forward_dataset,
    to_device,
)
from workbench.posthoc.calibration import (
    softmax,
)
from workbench.train.recipe import TrainingError, unwrap

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    set_determinism(seed=seed)


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def on_main(world: World, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank.

    An exception on rank 0 is re-raised on every rank (as a TrainingError with its message),
    so the other ranks stop too instead of waiting in the next collective until the timeout.
    """
    if not world.distributed:
        return fn()
    value: Any = None
    error: str | None = None
    if world.main:
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below on every rank
            error = f"{type(err).__name__}: {err}"
            broadcast((None, error), world)
            raise
    value, error = broadcast((value, error), world)
    if error is not None:
        raise TrainingError(f"rank 0 failed: {error}")
    return value


def hardware(device: torch.device, world: World) -> dict[str, Any]:
    """Where a run computed: CPU model and cores, GPU name, processes, library versions."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            names = (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
            cpu = next(names, cpu)
    except OSError:
        pass
    return {
        "cpu": cpu or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "processes": world.size,
        "backend": torch.distributed.get_backend() if world.distributed else None,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
    }


def num_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def validation_auroc(problem: Problem, logits: np.ndarray, targets: np.ndarray) -> float | None:
    """Validation AUROC for the per-epoch record (macro over classes or labels)."""
    import warnings

    from sklearn.metrics import roc_auc_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if problem.sigmoid:
                vals = [
                    roc_auc_score(targets[:, j], logits[:, j])
                    for j in range(logits.shape[1])
                    if 0 < targets[:, j].sum() < len(targets)
                ]
                return float(np.mean(vals)) if vals else None
            p = softmax(logits)
            k = p.shape[1]
            if k == 2:
                return float(roc_auc_score(targets, p[:, 1]))
            return float(roc_auc_score(targets, p, multi_class="ovr", labels=range(k)))
        except ValueError:
            return None


def forward_sharded(
    model: nn.Module,
    dataset: Any,
    device: torch.device,
    precision: str,
    spatial_dims: int,
    world: World,
) -> np.ndarray:
    """(N, K) logits of ``dataset``, each rank computing every world.size-th record and all
    ranks receiving all of them (so every rank takes the same early-stopping decision)."""
    if not world.distributed:
        return forward_dataset(model, dataset, device, precision, spatial_dims)["logits"]
    idx = list(range(world.rank, len(dataset), world.size))
    part: Any = Subset(dataset, idx)  # a map-style dataset, as forward_dataset iterates
    out = forward_dataset(model, part, device, precision, spatial_dims)
    parts = gather((idx, out["logits"]), world)
    k = next(p[1].shape[1] for p in parts if len(p[0]))
    logits = np.zeros((len(dataset), k), dtype=np.float32)
    for ids, values in parts:
        if len(ids):
            logits[ids] = values
    return logits


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, draw: np.ndarray | None = None
) -> list[list[int]]:
    """The shuffled global batches of one epoch, from (seed, epoch) alone. A last batch smaller
    than ``batch_size`` is dropped when there is more than one batch: a batch of one image
    breaks BatchNorm, and a ragged batch is noise anyway.

    ``draw`` (N,) weights: class-balanced sampling instead of a permutation, n indices drawn
    with replacement from the same seeded generator, so a resumed epoch draws the same."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if draw is not None:
        order = torch.multinomial(torch.as_tensor(draw), n, replacement=True, generator=gen)
    else:
        order = torch.randperm(n, generator=gen)
    idx = order.tolist()
    batches = [idx[k : k + batch_size] for k in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def train_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    precision: str,
    spatial_dims: int,
    max_steps: int | None = None,
    desc: str = "train",
    progress: bool = False,
    on_step: Callable[[list[float]], bool | None] | None = None,
    world: World | None = None,
) -> list[float]:
    """One pass over ``loader`` under autocast; returns the loss of each step.

    ``on_step(losses_so_far)`` runs after each optimiser step (the fit loop checkpoints and
    sets the next step's learning rate there); when it returns True the epoch ends.
    ``model`` may be wrapped (DistributedDataParallel, torch.compile); under torchrun the
    losses returned are those of the global batch, the same on every rank.

    Raises TrainingError on a non-finite loss before the optimiser touches the weights (on
    every rank at once: the check reads the loss reduced over ranks).
    """
    world = world or World()
    model.train()
    keep_frozen_in_eval(unwrap(model))
    losses: list[float] = []
    bar = tqdm(loader, desc=desc, disable=not progress)
    for batch in bar:
        x = to_device(torch.as_tensor(batch["image"]), device, spatial_dims)
        if "aug" in batch:  # a training batch: its augmentation, applied where it is
            x = augment_batch(x, batch["aug"])
            if spatial_dims == 2:
                x = x.contiguous(memory_format=torch.channels_last)
        y = torch.as_tensor(batch["label"]).to(device)
        optimizer.zero_grad(set_to_none=True)
        try:
            with autocast(device, precision):
                logits = model(x)  # (B, K), in bf16/fp16 under autocast
        except RuntimeError as err:  # a shape or memory error inside the network
            keys = sorted(set(batch.get("study_key") or [])) or ["?"]
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise study_error(err, f"the network failed on studies {shown}") from err
        loss = loss_fn(logits.float(), y)
        # This rank's loss is its share of the global batch's loss (see Objective): the sum
        # over ranks / world size is the global batch's loss.
        reported = float(all_sum(loss.detach(), world)) / world.size
        if not np.isfinite(reported):
            raise TrainingError(
                f"the loss became {reported} after {len(losses)} steps of this epoch; "
                "the last good checkpoint is kept. Lower --lr or use --precision fp32"
            )
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(reported)
        if on_step is not None and on_step(losses):  # True: the run's budget is spent
            break
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", refresh=False)
        if max_steps is not None and len(losses) >= max_steps:
            break
    bar.close()
    return losses
