"""The training recipe: the step budget and its schedule, early stopping, the optimiser, the
weight average, the augmentation ranges and the network it starts from."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.config import Settings
from workbench.errors import WorkbenchError
from workbench.model.bundle_info import hash_bundle, read_bundle_info
from workbench.model.data import (
    AffineRanges,
)
from workbench.model.nets import (
    NETWORKS,
    PRETRAINED_ARCHITECTURE,
    create_network,
    freeze_early_blocks,
    load_initial_weights,
)
from workbench.model.weights import WEIGHTS_PREFIX, load_weights
from workbench.train.config import TrainConfig


class TrainingError(WorkbenchError):
    """A user-facing training problem (empty cohort, one class only, diverged loss...)."""


#: The step budget's cap when neither --epochs nor --max-steps is given: this many steps or
#: DEFAULT_CAP_EPOCHS epochs, the larger. A fixed 2,000 was under 3 epochs on a cohort of
#: 11,000 training images, below the 3-epoch patience, so early stopping could never fire
#: there; 10 epochs leaves it room. Cohorts under 3,200 training images at batch 16 (every
#: figure in BENCHMARKS.md) keep 2,000. Not yet measured on a large cohort.
DEFAULT_MAX_STEPS = 2000


DEFAULT_CAP_EPOCHS = 10


#: The least early-stopping patience in steps (the default is this or 3 epochs, the larger).
PATIENCE_STEPS = 400


@dataclass
class Budget:
    """The recipe's schedule and early stopping, in optimiser steps; all of its state is
    plain numbers, so a checkpoint keeps it and a resumed run continues it exactly.

    Learning rate = lr x warm-up x cosine x plateau: a linear warm-up over ``warmup`` steps, a
    cosine from 1 to 0.05 over the ``horizon`` (the step cap, shrunk to what the time budget
    allows as step times become known), and x0.3 when the validation score has not improved
    for half the patience (twice at most). Training stops when it has not improved for
    ``patience`` steps and the last reduction had half the patience to help, or at the cap.
    Neither clock runs during the warm-up: while the rate rises, the validation loss of a model
    that is growing confident before it discriminates often climbs above the untrained
    model's 0.69 (the 400-study benchmark task: 0.69 at step 12, 0.93-1.56 at steps 48-96,
    0.38 at step 168), and counting that as a plateau cut the rate before learning began.
    The score is the validation loss (a proper scoring rule, continuous even on a small
    validation split, where AUROC moves in coarse steps and saturates; with AUROC as the
    criterion the 150-study model of tests/test_degraded_site.py reached accuracy 0.39).
    """

    horizon: int
    warmup: int
    patience: int
    best_step: int = 0
    best_auroc: float = -1.0
    best_loss: float = float("inf")
    reductions: int = 0
    reduced_at: int = 0
    cap: int = 0  # the step cap the horizon came from (0: the horizon itself)
    warmup_auto: bool = False  # the warm-up follows the horizon (no --warmup-steps given)

    def __post_init__(self) -> None:
        self.cap = self.cap or self.horizon

    @classmethod
    def plan(cls, cfg: TrainConfig, steps_per_epoch: int) -> Budget:
        cap = cfg.max_steps or (
            cfg.epochs * steps_per_epoch
            if cfg.epochs
            else max(DEFAULT_MAX_STEPS, DEFAULT_CAP_EPOCHS * steps_per_epoch)
        )
        if cfg.epochs:
            cap = min(cap, cfg.epochs * steps_per_epoch)
        horizon = max(1, cap)
        auto = cfg.warmup_steps is None
        warmup = _auto_warmup(horizon) if cfg.warmup_steps is None else cfg.warmup_steps
        # 400: on the recipe benchmark's 400-study multi-class task (36 validation studies,
        # whose loss swung 0.66-1.46 between epochs late in training) 150 stopped at step 516
        # with test AUROC 0.908; 400 ran to step 1284 and reached 0.951 (BENCHMARKS.md).
        patience = cfg.patience_steps or max(PATIENCE_STEPS, 3 * steps_per_epoch)
        return cls(horizon, max(0, warmup), patience, warmup_auto=auto)

    def factor(self, step: int) -> float:
        """The learning-rate multiplier for optimiser step ``step`` (0-based)."""
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        frac = min(1.0, step / self.horizon)
        cosine = 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * frac))
        return warm * cosine * 0.3**self.reductions

    def observe(self, step: int, auroc: float | None, loss: float) -> bool:
        """Record a validation score at ``step``; True when it is the best so far."""
        better = loss < self.best_loss
        if better:
            self.best_step, self.best_loss = step, loss
            self.best_auroc = -1.0 if auroc is None else auroc  # recorded, not the criterion
        elif (
            self.reductions < 2
            and step - max(self.best_step, self.reduced_at, self.warmup) >= self.patience / 2
        ):
            self.reductions, self.reduced_at = self.reductions + 1, step
        return better

    def should_stop(self, step: int) -> bool:
        return (
            step >= self.horizon
            or step - max(self.best_step, self.warmup) >= self.patience
            and step - self.reduced_at >= self.patience / 2
        )

    def fit_time(self, step: int, elapsed: float, budget: float | None) -> None:
        """Fit the horizon to the steps the time budget still allows at the pace so far.

        The horizon is re-estimated from the step cap each time, not ratcheted down, so that a
        slow first step (allocations, a cold cache) does not cut the whole run short. An
        automatic warm-up not yet finished shrinks with it: a 240-second demo that can take
        about 230 steps spent 100 of them warming up while the warm-up followed the cap of
        2,000.
        """
        if budget is None or step == 0:
            return
        allowed = step + int(max(0.0, budget - elapsed) / (elapsed / step))
        self.horizon = max(step, min(self.cap, allowed))
        if self.warmup_auto and 5 <= step < self.warmup:  # a pace from five steps at least
            self.warmup = max(step + 1, _auto_warmup(self.horizon))


def weight_average(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of ``model``'s weights and BatchNorm statistics (Polyak
    averaging, torch's ``AveragedModel``), or None when ``decay`` is 0.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after n updates (the warm-up of
    TensorFlow's and timm's EMA; written here because torch's ``get_ema_multi_avg_fn`` has a
    fixed decay), so the average spans about the last tenth of a short run and at most
    ``1 / (1 - decay)`` steps of a long one. On a small validation split the loss of the raw
    weights swings from one evaluation to the next (0.80-1.80 on the recipe benchmark's
    multi-class task), and early stopping then keeps whichever epoch happened to land low;
    the average was meant to steady it, but on that benchmark it did not raise AUROC (0.909
    against 0.908; multi-label 0.742 against 0.736), so it is off by default.
    """
    if not 0.0 <= decay < 1.0:
        raise TrainingError(f"--ema-decay must be in [0, 1), not {decay}")
    if decay == 0.0:
        return None

    @torch.no_grad()
    def update(
        averaged: Sequence[torch.Tensor], current: Sequence[torch.Tensor], n: torch.Tensor | int
    ) -> None:
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        for a, c in zip(averaged, current, strict=True):
            if a.is_floating_point():
                a.lerp_(c, 1.0 - d)
            else:  # BatchNorm's batch counter
                a.copy_(c)

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def _auto_warmup(horizon: int) -> int:
    """Steps of linear warm-up for a run of ``horizon`` steps: 5%, at most 100."""
    return min(100, horizon // 20)


def make_optimizer(params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with its fused kernel (one kernel over every parameter instead of a loop over
    DenseNet121's 364 tensors: 6 instead of 20 ms a step on this CPU)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def affine_of(cfg: TrainConfig) -> AffineRanges:
    """The augmentation's rotation, scale and shift ranges that ``cfg`` asks for."""
    try:
        return AffineRanges.of(cfg.rotate, cfg.scale, cfg.translate)
    except ValueError as err:
        raise TrainingError(str(err)) from err


def stop_reason(budget: Budget, step: int, cfg: TrainConfig) -> str:
    """Why training ended, in words for the experiment record."""
    if cfg.time_budget is not None and step >= budget.horizon and budget.horizon < budget.cap:
        return f"time budget ({cfg.time_budget:.0f} s)"
    if step >= budget.horizon:
        return f"step cap ({budget.horizon})"
    if step - budget.best_step >= budget.patience:
        return f"no better validation score for {step - budget.best_step} steps"
    return f"epochs ({cfg.epochs})"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def prepare_network(
    settings: Settings, cfg: TrainConfig, spatial_dims: int, n_classes: int
) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh network, optionally started from earlier weights, with early blocks frozen.

    ``cfg.init_from`` names a bundle (its head is rebuilt when the classes differ, the rest
    kept), a weights file such as an ImageNet DenseNet121 in torchvision's key layout (given
    by path; nothing is downloaded) or ``weights:NAME`` from the local store (see
    ``workbench weights import``; its head is never kept). Returns the network and what was
    loaded and frozen.
    """
    if cfg.architecture not in NETWORKS:
        raise TrainingError(
            f"--architecture {cfg.architecture}: unknown; known: {', '.join(NETWORKS)}"
        )
    model = create_network(spatial_dims, n_classes, architecture=cfg.architecture)
    report: dict[str, Any] = {"from": None, "loaded": 0, "skipped": [], "frozen": []}
    if cfg.init_from:
        source = Path(cfg.init_from)
        state: Any  # checked below: a dict of tensors
        from_bundle = not cfg.init_from.startswith(WEIGHTS_PREFIX) and not source.is_file()
        if not from_bundle and not NETWORKS[cfg.architecture].pretrained_layout:
            raise TrainingError(
                f"--init-from {cfg.init_from}: weights files and imported weights are "
                f"{PRETRAINED_ARCHITECTURE}'s; train with --architecture "
                f"{PRETRAINED_ARCHITECTURE} to start from them"
            )
        if cfg.init_from.startswith(WEIGHTS_PREFIX):  # the local store, hash-checked
            name = cfg.init_from.removeprefix(WEIGHTS_PREFIX)
            state, entry = load_weights(settings, name, head=False)
            report["from"] = f"weights {entry.name} ({entry.format}, {entry.sha256[:16]})"
            report["weights"] = entry.provenance()
        elif source.is_file():
            state = torch.load(source, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            report["from"] = f"weights file {source.name}"
        else:
            info = read_bundle_info(settings.models_dir, cfg.init_from)
            path, theirs = info.path, info.contract.architecture
            if theirs != cfg.architecture:
                raise TrainingError(
                    f"--init-from {cfg.init_from}: that bundle is a {theirs}; train with "
                    f"--architecture {theirs} to start from it"
                )
            state = torch.load(path / "models" / "model.pt", map_location="cpu", weights_only=True)
            report["from"] = f"bundle {path.parent.name}/{path.name} ({hash_bundle(path)[:16]})"
        if not isinstance(state, dict):
            raise TrainingError(f"{cfg.init_from}: not a state dict of tensors")
        result = load_initial_weights(model, state)
        if not result["loaded"]:
            raise TrainingError(f"{cfg.init_from}: no tensor fits this network")
        report["loaded"], report["skipped"] = len(result["loaded"]), result["skipped"]
    report["frozen"] = freeze_early_blocks(model, cfg.freeze_blocks)
    return model, report
