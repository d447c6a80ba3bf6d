"""The fit loop: patient-level split, AMP, channels_last, checkpoints, early stopping, then
calibration on the calibration split and a bundle under ``models/NAME/vN/``.

Recipe (2 CPU cores, the demo cohort)::

    workbench train --cohort demo --name chest-xray --epochs 12 --image-size 96

Early stopping reads a validation split held out from the training patients
(``--validation-fraction``), so the calibrator is chosen on studies that did not choose the
weights (with ``--ema-decay`` an exponential moving average of them is scored and kept); the
test split is touched only once, after the model and its calibration are fixed. With
``--calibrate-per-site`` each site with enough calibration studies may get a map of its own
beside the global one
(:class:`~workbench.posthoc.site_calibration.SiteCalibrator`); the thresholds, conformal sets
and test metrics are then computed on the per-site calibrated probabilities, as ``predict``
gives them.

The problem (binary / multi-class softmax, one-vs-rest or multi-label sigmoids) comes from the
labels (see ``problems.py``). Under ``torchrun`` every rank runs this loop on its share of each
global batch (see ``distributed.py``); rank 0 alone writes. ``--folds K`` repeats the run on
patient-level folds.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, get_args

import monai
import numpy as np
import torch
from monai.data import DataLoader
from monai.utils import set_determinism
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm import tqdm

from workbench.catalog.ingest import (
    MIN_VOLUME_SLICES,
    CohortItem,
    cohort_hash,
    cohort_items,
    fold_assignment,
    holdout_patients,
    patient_folds,
    split_cohort,
    study_headers,
)
from workbench.catalog.records import StudyHeader
from workbench.config import Settings
from workbench.errors import WorkbenchError
from workbench.metrics import (
    brier_score,
    calibration_report,
    classification_metrics,
    expected_calibration_error,
    label_metrics,
)
from workbench.model.bundle import save_bundle
from workbench.model.bundle_info import hash_bundle, read_bundle_info
from workbench.model.data import (
    AffineRanges,
    InputSpec,
    augment_batch,
    make_dataset,
    study_error,
    to_records,
)
from workbench.model.distributed import (
    World,
    all_sum,
    broadcast,
    close_world,
    gather,
    init_world,
    shard,
    sync_batchnorm,
)
from workbench.model.nets import (
    NETWORKS,
    PRETRAINED_ARCHITECTURE,
    create_network,
    freeze_early_blocks,
    keep_frozen_in_eval,
    load_initial_weights,
    network_of,
)
from workbench.model.problems import (
    NEGATIVE_NAMES,
    Problem,
    ProblemError,
    make_objective,
    resolve_problem,
    sample_weights,
    validation_loss,
)
from workbench.model.runtime import (
    autocast,
    forward_dataset,
    mean_by_study,
    resolve_device,
    resolve_precision,
    to_device,
    training_precision,
)
from workbench.model.weights import WEIGHTS_PREFIX, input_normalization, load_weights
from workbench.posthoc.calibration import (
    ECE_TARGET,
    Calibration,
    Calibrator,
    LabelCalibration,
    LabelCalibrator,
    sigmoid,
    softmax,
)
from workbench.posthoc.site_calibration import (
    SiteCalibration,
    SiteCalibrator,
    apply_calibration,
    site_calibration_metrics,
)
from workbench.posthoc.thresholds import youden_thresholds
from workbench.predict.trust import (
    INDEX_FILE,
    SplitOutputs,
    fit_trust,
    index_bytes,
    saliency_checks,
)
from workbench.train.config import Balance, TrainConfig

T = TypeVar("T")
__all__ = ["NEGATIVE_NAMES", "TrainResult", "TrainingError", "train"]


BALANCE_MODES: tuple[str, ...] = get_args(Balance)


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


@dataclass(frozen=True)
class TrainResult:
    bundle: Path
    history: list[dict[str, float]]
    best_epoch: int
    metrics: dict[str, Any] = field(default_factory=dict)
    folds: dict[str, Any] | None = None  # cross-validation summary (--folds)


def make_optimizer(params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with its fused kernel (one kernel over every parameter instead of a loop over
    DenseNet121's 364 tensors: 6 instead of 20 ms a step on this CPU)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    set_determinism(seed=seed)


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _labelled(items: list[CohortItem]) -> list[CohortItem]:
    return [i for i in items if i.label]


def _on_main(world: World, fn: Callable[[], T]) -> T:
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


def affine_of(cfg: TrainConfig) -> AffineRanges:
    """The augmentation's rotation, scale and shift ranges that ``cfg`` asks for."""
    try:
        return AffineRanges.of(cfg.rotate, cfg.scale, cfg.translate)
    except ValueError as err:
        raise TrainingError(str(err)) from err


def train(settings: Settings, cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train, calibrate and bundle a model on ``cfg.cohort``.

    Under ``torchrun`` every rank calls this; rank 0 writes checkpoints, bundles and rows and
    every rank returns rank 0's result. With ``cfg.folds >= 2``: K-fold cross-validation.
    """
    if str(cfg.spatial_dims) not in SHAPES:
        raise TrainingError(f"--spatial-dims must be one of {', '.join(SHAPES)}")
    if cfg.balance not in BALANCE_MODES:
        raise TrainingError(f"--balance must be one of {', '.join(BALANCE_MODES)}")
    if cfg.site_min_studies < 1:
        raise TrainingError("--site-min-studies must be at least 1")
    affine_of(cfg)  # a bad range is refused before any work
    world, device = init_world(resolve_device(cfg.device))
    try:
        if cfg.folds >= 2:
            return _cross_validate(settings, cfg, world, device, progress)
        return _fit(settings, cfg, world, device, progress and world.main)
    finally:
        close_world(world)


SHAPES = ("auto", "2", "3")


def select_shape(
    items: list[CohortItem], requested: str, cohort: str
) -> tuple[list[CohortItem], int, dict[str, Any]]:
    """The studies a run trains on, their spatial dims, and a record of the choice.

    A study is 2D or 3D by what it holds (:data:`workbench.catalog.ingest.MIN_VOLUME_SLICES`), not
    by its modality. ``auto`` takes the cohort's one shape and refuses a mixed cohort in one
    line with the counts; ``2`` or ``3`` trains on the studies of that shape and leaves the
    others out, counted by reason. Studies with no usable input (every series inconsistent)
    are left out too.
    """
    if str(requested) not in SHAPES:
        raise TrainingError(f"--spatial-dims must be one of {', '.join(SHAPES)}")
    usable = [i for i in items if i.images]
    counts = {d: sum(i.spatial_dims == d for i in usable) for d in (2, 3)}
    rule = f"3D when an input has at least {MIN_VOLUME_SLICES} slices, else 2D"
    if str(requested) == "auto":
        if counts[2] and counts[3]:
            raise TrainingError(
                f"cohort {cohort!r} mixes shapes: {counts[2]} 2D studies (fewer than "
                f"{MIN_VOLUME_SLICES} slices) and {counts[3]} 3D volumes; choose one with "
                "--spatial-dims 2 or 3 (the other studies are then left out)"
            )
        dims = 3 if counts[3] else 2
    else:
        dims = int(requested)
    kept = [i for i in usable if i.spatial_dims == dims]
    left_out: dict[str, int] = {}
    other = counts[5 - dims]
    if other:
        left_out["3D volumes" if dims == 2 else "2D images or short stacks"] = other
    if len(usable) < len(items):
        left_out["studies without a usable image (inconsistent series)"] = len(items) - len(usable)
    if not kept:
        raise TrainingError(
            f"cohort {cohort!r} has no {dims}D study ({counts[2]} 2D, {counts[3]} 3D; {rule})"
        )
    record = {"spatial_dims": dims, "requested": str(requested), "rule": rule}
    return kept, dims, {**record, "left_out": left_out}


def _cross_validate(
    settings: Settings, cfg: TrainConfig, world: World, device: torch.device, progress: bool
) -> TrainResult:
    """Patient-level K-fold cross-validation: fold k is the test split of run k, the other
    patients are divided into train and calibration. One bundle per fold
    (``NAME-foldK``); per-fold metrics with mean and sd go to ``HOME/crossval/NAME.json``
    and into the returned result."""
    items = _labelled(cohort_items(settings, cfg.cohort))
    if not items:
        raise TrainingError(f"cohort {cfg.cohort!r} has no labelled studies")
    if len({i.patient for i in items}) < cfg.folds:
        raise TrainingError(f"--folds {cfg.folds}: the cohort has fewer patients than folds")
    folds = patient_folds(items, cfg.folds, cfg.seed)
    cal_fraction = cfg.split_fractions[1] / (cfg.split_fractions[0] + cfg.split_fractions[1])
    runs: list[TrainResult] = []
    for k in range(cfg.folds):
        assignment = fold_assignment(items, folds, k, cfg.seed, cal_fraction)
        fold_cfg = replace(cfg, name=f"{cfg.name}-fold{k + 1}", folds=0)
        if progress and world.main:
            print(f"fold {k + 1}/{cfg.folds}")
        runs.append(_fit(settings, fold_cfg, world, device, progress and world.main, assignment))
    keys = ("accuracy", "auroc_macro", "ece_before", "ece_after")
    per_fold = [{"fold": k + 1, "bundle": str(r.bundle), **r.metrics} for k, r in enumerate(runs)]
    summary: dict[str, Any] = {
        "cohort": cfg.cohort,
        "folds": cfg.folds,
        "seed": cfg.seed,
        "per_fold": per_fold,
    }
    for key in keys:
        vals = [r.metrics[key] for r in runs if r.metrics.get(key) is not None]
        summary[key] = {
            "mean": float(np.mean(vals)) if vals else None,
            "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
        }
    if world.main:
        out = settings.home / "crossval" / f"{cfg.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2, default=float))
        summary["path"] = str(out)
    last = runs[-1]
    return TrainResult(last.bundle, last.history, last.best_epoch, last.metrics, summary)


def _fit(
    settings: Settings,
    cfg: TrainConfig,
    world: World,
    device: torch.device,
    progress: bool,
    assignment: dict[int, str] | None = None,
) -> TrainResult:
    """One training run on this rank; ``assignment`` (study id -> split) overrides the
    cohort's stored split (cross-validation)."""
    started = time.time()
    _seed_everything(cfg.seed)
    if assignment is None:
        # Rank 0 assigns and stores the split; the others read what it stored.
        _on_main(world, lambda: split_cohort(settings, cfg.cohort, cfg.seed, cfg.split_fractions))
    items = _labelled(cohort_items(settings, cfg.cohort))
    if not items:
        raise TrainingError(f"cohort {cfg.cohort!r} has no labelled studies")
    if assignment is not None:
        items = [replace(i, split=assignment[i.study_id]) for i in items]
    items, spatial_dims, shape = select_shape(items, cfg.spatial_dims, cfg.cohort)
    if progress and shape["left_out"]:
        left = ", ".join(f"{n} {why}" for why, n in shape["left_out"].items())
        print(f"training on {len(items)} {spatial_dims}D studies; left out: {left}")
    try:
        problem = resolve_problem(cfg.problem, [i.label for i in items])
    except ProblemError as err:
        raise TrainingError(f"cohort {cfg.cohort!r}: {err}") from err
    classes = problem.classes
    by_split = {s: [i for i in items if i.split == s] for s in ("train", "calibration", "test")}
    for s, its in by_split.items():
        if not its:
            raise TrainingError(f"the {s} split of {cfg.cohort!r} is empty; ingest more studies")
    # Early stopping's data: training patients held out (stratified), never the calibration
    # split, so the calibrator is chosen on studies that did not choose the weights.
    held = holdout_patients(by_split["train"], cfg.validation_fraction, cfg.seed)
    by_split["validation"] = [i for i in by_split["train"] if i.patient in held]
    by_split["train"] = [i for i in by_split["train"] if i.patient not in held]
    if not by_split["validation"] or not by_split["train"]:
        raise TrainingError(
            f"the train split of {cfg.cohort!r} is too small to hold out validation patients "
            f"(--validation-fraction {cfg.validation_fraction}); ingest more studies"
        )
    split_counts = {s: len(its) for s, its in by_split.items()}
    modality = items[0].modality or ""
    if cfg.batch_size < 2 * world.size:
        raise TrainingError(
            f"--batch-size {cfg.batch_size} is the global batch: it needs at least 2 images "
            f"per process ({world.size} processes)"
        )
    # Imported weights (or a bundle trained from them) bring the input normalization they need.
    norm = input_normalization(settings, cfg.init_from)
    spec = InputSpec(image_size=cfg.image_size, spatial_dims=spatial_dims, normalization=norm)
    # auto: a timed probe of the real step in each precision the hardware has units for,
    # cached per machine in the home; never a precision slower than fp32 (runtime.py).
    precision_choice = _on_main(
        world,
        lambda: training_precision(
            cfg.precision,
            device,
            spatial_dims,
            cfg.image_size,
            cfg.batch_size,
            settings.home,
            architecture=cfg.architecture,
        ),
    )
    precision = precision_choice.precision
    # Validation, calibration and test logits use the precision that `predict` will use, so
    # the calibration is fitted on the same numbers it will be applied to.
    eval_precision = resolve_precision(cfg.precision, device, spatial_dims, training=False)

    records = {s: to_records(its, classes, target=problem.target) for s, its in by_split.items()}
    train_ds = make_dataset(
        records["train"], spec, train=True, seed=cfg.seed, flip=cfg.flip, affine=affine_of(cfg)
    )
    val_ds = make_dataset(records["validation"], spec, train=False)
    val_targets = np.stack([np.asarray(r["label"]) for r in records["validation"]])
    train_targets = [r["label"] for r in records["train"]]
    draw = sample_weights(problem, train_targets) if cfg.balance == "sampler" else None

    model, init_report = prepare_network(settings, cfg, spatial_dims, len(classes))
    model = model.to(device)
    if spatial_dims == 2:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    # Imbalance: class weights / pos_weight in the loss, or a balanced sampler (--balance).
    loss_fn = make_objective(problem, train_targets, cfg.balance, world).to(device)
    # A lower learning rate for the (pretrained) backbone than for the head, when asked.
    parts = network_of(model)
    backbone = [p for p in parts.backbone(model).parameters() if p.requires_grad]
    head = [p for p in parts.head(model).parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [
        {"params": backbone, "lr": cfg.lr * cfg.backbone_lr_factor},
        {"params": head},
    ]
    optimizer = make_optimizer(groups, cfg.lr, cfg.weight_decay)
    base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    steps_per_epoch = len(_epoch_batches(len(train_ds), cfg.batch_size, cfg.seed, 0, draw))
    budget = Budget.plan(cfg, steps_per_epoch)
    train_seconds = 0.0  # optimiser steps and validation, summed over resumed sessions

    run_dir = settings.models_dir / cfg.name / ".training"
    ckpt_path = run_dir / "checkpoint.pt"
    history: list[dict[str, Any]] = []
    best_epoch, start_epoch, step = -1, 0, 0
    start_batch, epoch_losses = 0, []  # position inside a partly done epoch
    best_state: dict[str, torch.Tensor] | None = None
    resumed_ema: dict[str, Any] | None = None
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # our own file
        if ckpt["config"]["cohort"] != cfg.cohort or tuple(ckpt["classes"]) != classes:
            raise TrainingError("the checkpoint belongs to another cohort; train without --resume")
        if "budget" not in ckpt:
            raise TrainingError(
                "the checkpoint was written by an older workbench (epoch schedule); "
                "train without --resume"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        history, best_epoch = ckpt["history"], ckpt["best_epoch"]
        budget, train_seconds = Budget(**ckpt["budget"]), ckpt["train_seconds"]
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        start_batch, epoch_losses = ckpt["batch"], list(ckpt["epoch_losses"])
        best_state, resumed_ema = ckpt["best_state"], ckpt.get("ema")
        if progress:
            print(f"resuming at epoch {start_epoch + 1}, batch {start_batch + 1} (step {step})")

    # The network the optimiser steps through: BatchNorm over the global batch and gradient
    # averaging across ranks when distributed, compiled when asked. `model` stays the plain
    # module whose state dict is checkpointed and bundled (same keys in every case).
    net: nn.Module = model
    if world.distributed:
        net = sync_batchnorm(model, device)
        net = DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        net = torch.compile(net)  # type: ignore[assignment]
    step_seconds: list[float] = []
    ema = weight_average(model, cfg.ema_decay)
    if ema is not None and resumed_ema is not None:
        ema.load_state_dict(resumed_ema)
    scored = model if ema is None else ema.module  # the weights validated and kept

    def checkpoint(epoch: int, batch: int, losses: list[float]) -> None:
        """Everything needed to continue exactly here, written atomically by rank 0."""
        if not world.main:
            return
        _atomic_save(
            {
                "config": asdict(cfg),
                "classes": classes,
                "model": model.state_dict(),
                "ema": None if ema is None else ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "budget": asdict(budget),
                "train_seconds": train_seconds,
                "epoch": epoch,  # the epoch to run next, from `batch`
                "batch": batch,
                "epoch_losses": losses,
                "step": step,
                "history": history,
                "best_epoch": best_epoch,
                "best_state": best_state,
            },
            ckpt_path,
        )

    def set_lr(at_step: int) -> None:
        for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
            g["lr"] = base * budget.factor(at_step)

    set_lr(step)
    last_epoch = cfg.epochs or sys.maxsize
    for epoch in range(start_epoch, last_epoch):
        if budget.should_stop(step):
            break
        epoch_started = time.time()
        # The order of an epoch and each sample's augmentation depend only on (seed, epoch,
        # index), never on how far the run got: a resumed epoch replays exactly. Each rank
        # takes its share of every global batch.
        train_ds.epoch = epoch
        batches = _epoch_batches(len(train_ds), cfg.batch_size, cfg.seed, epoch, draw)
        mine = [shard(b, world) for b in batches[start_batch:]]
        loader = DataLoader(train_ds, batch_sampler=mine, num_workers=0)
        done_before = list(epoch_losses)
        last_tick = time.perf_counter()

        def on_step(
            step_losses: list[float],
            epoch: int = epoch,
            first: int = start_batch,
            before: list[float] = done_before,
            epoch_started: float = epoch_started,
            spent: float = train_seconds,
        ) -> bool:
            nonlocal step, last_tick
            step += 1
            if ema is not None:
                ema.update_parameters(model)
            now = time.perf_counter()
            step_seconds.append(now - last_tick)
            last_tick = now
            if not world.distributed:  # ranks must agree: there, only at epoch ends
                budget.fit_time(step, spent + time.time() - epoch_started, cfg.time_budget)
            set_lr(step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint(epoch, first + len(step_losses), before + step_losses)
            return step >= budget.horizon

        epoch_desc = f"epoch {epoch + 1}" + (f"/{cfg.epochs}" if cfg.epochs else "")
        lr_used = float(optimizer.param_groups[-1]["lr"])
        losses = done_before + train_epoch(
            net,
            loader,
            loss_fn,
            optimizer,
            scaler,
            device,
            precision,
            spatial_dims,
            desc=f"{epoch_desc} (step {step}/{budget.horizon})",
            progress=progress,
            on_step=on_step,
            world=world,
        )
        start_batch, epoch_losses = 0, []
        val_logits = _forward_sharded(scored, val_ds, device, eval_precision, spatial_dims, world)
        val_loss = validation_loss(problem, val_logits, val_targets)
        val_auroc = _auroc(problem, val_logits, val_targets)
        train_seconds = float(broadcast(train_seconds + time.time() - epoch_started, world))
        budget.fit_time(step, train_seconds, cfg.time_budget)
        history.append(
            {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                "val_loss": val_loss,
                "val_auroc": val_auroc,
                "lr": lr_used,
                "seconds": round(time.time() - epoch_started, 2),
            }
        )
        if progress:
            print(
                f"{epoch_desc}, step {step}: train loss {np.mean(losses):.4f}, "
                f"val loss {val_loss:.4f}, val AUROC {_num(val_auroc)}"
            )
        if budget.observe(step, val_auroc, val_loss):
            best_epoch = epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in scored.state_dict().items()}
        set_lr(step)  # a plateau may have lowered it
        checkpoint(epoch + 1, 0, [])

    if best_state is not None:
        model.load_state_dict(best_state)
    elif ema is not None:  # no validation ran (a budget spent inside the first epoch)
        model.load_state_dict(scored.state_dict())
    model.eval()
    training = {
        **asdict(cfg),
        "problem": problem.kind,
        "loss": loss_fn.describe(classes),
        "device": str(device),
        "precision": precision,
        "precision_choice": precision_choice.record(),
        "shape": shape,
        "eval_precision": eval_precision,
        "init": init_report,
        "best_epoch": best_epoch,
        "best_step": budget.best_step,
        "epochs_run": len(history),
        "history": history,
        "steps": step,
        "budget": asdict(budget),
        "stopped": _stop_reason(budget, step, cfg),
        "train_seconds": round(train_seconds, 1),
        "step_seconds_median": float(np.median(step_seconds)) if step_seconds else None,
        # The first step of a compiled network includes compiling it.
        "compile_seconds": (
            round(step_seconds[0] - float(np.median(step_seconds[1:] or [0.0])), 2)
            if cfg.compile and step_seconds
            else None
        ),
        "hardware": hardware(device, world),
        "torch_threads": torch.get_num_threads(),
    }
    context = _RunContext(
        settings, cfg, problem, spec, records, by_split, items, modality, device,
        eval_precision, split_counts, training, started,
    )  # fmt: skip
    result = _on_main(world, lambda: _calibrate_test_and_bundle(context, model))
    return TrainResult(bundle=result[0], history=history, best_epoch=best_epoch, metrics=result[1])


@dataclass(frozen=True)
class _RunContext:
    """What the last stage (calibrate, test, bundle) needs from the run."""

    settings: Settings
    cfg: TrainConfig
    problem: Problem
    spec: InputSpec
    records: dict[str, list[dict[str, Any]]]
    by_split: dict[str, list[CohortItem]]
    items: list[CohortItem]
    modality: str
    device: torch.device
    eval_precision: str
    split_counts: dict[str, int]
    training: dict[str, Any]
    started: float


def _calibrate_test_and_bundle(ctx: _RunContext, model: nn.Module) -> tuple[Path, dict[str, Any]]:
    """Calibrate on study-level logits of the calibration split, test once, write the bundle
    (rank 0 only). Returns the bundle folder and the summary metrics."""
    cfg, problem, classes, spec = ctx.cfg, ctx.problem, ctx.problem.classes, ctx.spec
    sd = ctx.spec.spatial_dims
    cal_ds = make_dataset(ctx.records["calibration"], spec, train=False)
    cal = forward_dataset(model, cal_ds, ctx.device, ctx.eval_precision, sd)
    cal_ids, cal_logits = mean_by_study(cal["study_ids"], cal["logits"])
    cal_labels = _study_labels(ctx.records["calibration"], cal_ids)
    test_out = forward_dataset(
        model,
        make_dataset(ctx.records["test"], spec, train=False),
        ctx.device,
        ctx.eval_precision,
        sd,
    )
    test_ids, test_logits = mean_by_study(test_out["study_ids"], test_out["logits"])
    test_labels = _study_labels(ctx.records["test"], test_ids)
    calibration: Calibration | LabelCalibration
    extra_problem: dict[str, Any] = {"problem": problem.kind}
    calibration_fit: dict[str, Any]
    if problem.sigmoid:
        per_label = LabelCalibrator(classes, seed=cfg.seed).fit(cal_logits, cal_labels)
        calibration = per_label.map_
        calibration_fit = {"per_label": per_label.report_}
    else:
        calibrator = Calibrator(classes, seed=cfg.seed).fit(cal_logits, cal_labels)
        calibration = calibrator.map_
        calibration_fit = {
            "held_out_log_loss": calibrator.held_out_log_loss_,
            "before": calibrator.before_,
            "after": calibrator.after_,
        }
    # --calibrate-per-site: a map per site beside the global one. `predict` applies the study's
    # site's map, so the thresholds, conformal sets and test metrics below are all computed on
    # the per-site calibrated probabilities.
    site_of = {i.study_id: i.site for i in ctx.items}
    cal_sites = [site_of[int(s)] for s in cal_ids]
    test_sites = [site_of[int(s)] for s in test_ids]
    site_cal: SiteCalibration | None = None
    if cfg.calibrate_per_site:
        per_site = SiteCalibrator(calibration, cfg.site_min_studies, cfg.seed).fit(
            cal_logits, cal_labels, cal_sites
        )
        site_cal = per_site.map_
        calibration_fit["per_site"] = {
            "min_studies": cfg.site_min_studies,
            "sites": per_site.report_,
        }

    applied = site_cal or calibration  # what predict will apply
    calibration_fit["check"] = _calibration_check(
        problem, apply_calibration(applied, cal_logits, cal_sites), cal_labels, cfg.seed
    )
    calibrated = apply_calibration(applied, test_logits, test_sites)
    if problem.sigmoid:
        # Per-label operating points, chosen on the calibration split (Youden's J) from the
        # calibrated probabilities, so `predict` applies them to the numbers it shows.
        thresholds = youden_thresholds(
            apply_calibration(applied, cal_logits, cal_sites), cal_labels
        )
        raw = sigmoid(test_logits)
        test_metrics = label_metrics(
            calibrated, test_labels, classes, thresholds, problem.kind == "ovr", n_resamples=200
        )
        for name, probs in (("before", raw), ("after", calibrated)):
            eces = _per_label(expected_calibration_error, probs, test_labels)
            briers = _per_label(brier_score, probs, test_labels)
            test_metrics[f"ece_{name}"] = float(np.mean(eces))
            test_metrics[f"brier_{name}"] = float(np.mean(briers))
            for c, e, b in zip(classes, eces, briers, strict=True):
                test_metrics["per_class"][c][f"ece_{name}"] = e
                test_metrics["per_class"][c][f"brier_{name}"] = b
        extra_problem["thresholds"] = dict(zip(classes, thresholds, strict=True))
        extra_problem["threshold_rule"] = "youden, calibration split, calibrated probabilities"
    else:
        raw = softmax(test_logits)
        test_metrics = classification_metrics(calibrated, test_labels, classes, n_resamples=200)
        test_metrics["ece_before"] = expected_calibration_error(raw, test_labels)
        test_metrics["ece_after"] = expected_calibration_error(calibrated, test_labels)
        test_metrics["brier_before"] = brier_score(raw, test_labels)
        test_metrics["brier_after"] = brier_score(calibrated, test_labels)
        test_metrics["calibration"] = {
            "before": calibration_report(raw, test_labels, n_resamples=200, seed=cfg.seed),
            "after": calibration_report(calibrated, test_labels, n_resamples=200, seed=cfg.seed),
        }
    summary = {
        "calibration_warning": calibration_fit["check"]["warning"],
        "accuracy": test_metrics["accuracy"],
        "auroc_macro": test_metrics["auroc_macro"],
        "ece_before": test_metrics["ece_before"],
        "ece_after": test_metrics["ece_after"],
    }
    if site_cal is not None:
        # raw / global / per-site ECE, Brier and log loss on test, overall and per site
        by_site = site_calibration_metrics(test_logits, test_labels, test_sites, site_cal)
        test_metrics["site_calibration"] = by_site
        summary["ece_after_global"] = by_site["overall"]["global"]["ece"]
    if problem.sigmoid:
        summary["auroc_per_label"] = {c: test_metrics["per_class"][c]["auroc"] for c in classes}
    trust, trust_files = _fit_trust(ctx, model, applied, cal, test_out, calibrated, test_ids)
    summary.update(_trust_summary(trust))
    training = {**ctx.training, "seconds": round(time.time() - ctx.started, 1)}
    extra = {
        **extra_problem,
        "modality": ctx.modality,
        "cohort": cfg.cohort,
        "cohort_hash": cohort_hash(ctx.items),
        "split": {
            "seed": cfg.seed,
            "fractions": list(cfg.split_fractions),
            "studies": ctx.split_counts,
            "patients": {s: len({i.patient for i in its}) for s, its in ctx.by_split.items()},
            # Which studies did what: validation chose the weights (early stopping),
            # calibration chose and fitted the calibrator; the two never share a patient.
            "validation_fraction": cfg.validation_fraction,
            "study_keys": {s: sorted(i.study_key for i in its) for s, its in ctx.by_split.items()},
        },
        "training": training,
        "calibration_fit": calibration_fit,
        "metrics": {"test": summary, "test_detail": test_metrics},
        "trust": trust,
    }
    if site_cal is not None:
        extra["site_calibration"] = site_cal.to_dict()
    bundle = save_bundle(
        ctx.settings.models_dir,
        cfg.name,
        model,
        classes,
        spec,
        calibration,
        extra,
        negative_class=problem.negative,
        figures={"training.png": _training_curves(training["history"], cfg.name)},
        data_files=trust_files,
    )
    (ctx.settings.models_dir / cfg.name / ".training" / "checkpoint.pt").unlink(missing_ok=True)
    return bundle, summary


def _study_split(
    ctx: _RunContext, split: str, out: dict[str, Any], headers: dict[int, StudyHeader]
) -> SplitOutputs:
    """A split's forward pass at study level, with each study's key, subgroups and header."""
    from workbench.catalog.subgroups import age_band  # the report's bands, so the subgroups match

    ids, logits = mean_by_study(out["study_ids"], out["logits"])
    _, emb = mean_by_study(out["study_ids"], out["embeddings"])
    by_id = {i.study_id: i for i in ctx.by_split[split]}
    studies = [by_id[int(s)] for s in ids]
    return SplitOutputs(
        study_ids=ids,
        study_keys=tuple(i.study_key for i in studies),
        logits=logits,
        embeddings=emb,
        labels=_study_labels(ctx.records[split], ids),
        headers=tuple(headers[int(s)] for s in ids),
        subgroups={
            "site": [i.site for i in studies],
            "sex": [i.sex for i in studies],
            "age_band": [age_band(i.age_years) for i in studies],
        },
    )


def _fit_trust(
    ctx: _RunContext,
    model: nn.Module,
    calibration: Any,
    cal: dict[str, Any],
    test: dict[str, Any],
    test_probs: np.ndarray,
    test_ids: np.ndarray,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Operating points, conformal sets, OOD detector, similar-case index and saliency checks
    (:mod:`workbench.predict.trust`): their metadata for the bundle, and the index file."""
    spec, sd = ctx.spec, ctx.spec.spatial_dims
    train_out = forward_dataset(
        model,
        make_dataset(ctx.records["train"], spec, train=False),
        ctx.device,
        ctx.eval_precision,
        sd,
    )
    headers = study_headers(ctx.settings, [i.study_id for i in ctx.items])
    splits = {
        name: _study_split(ctx, name, out, headers)
        for name, out in (("train", train_out), ("calibration", cal), ("test", test))
    }
    trust = fit_trust(
        ctx.problem.classes,
        calibration,
        splits["train"],
        splits["calibration"],
        splits["test"],
        coverage=ctx.cfg.coverage,
        negative=ctx.problem.negative,
    )
    meta = trust.metadata()
    meta["saliency_checks"] = _saliency_checks(ctx, model, test_probs, test_ids)
    return meta, {INDEX_FILE: index_bytes(trust.index)}


def _saliency_checks(
    ctx: _RunContext, model: nn.Module, test_probs: np.ndarray, test_ids: np.ndarray
) -> dict[str, Any]:
    """Sanity checks of the saliency methods on the test images the model is surest of a
    finding in (the maps a clinician would look at)."""
    n = ctx.cfg.sanity_images
    classes, negative = ctx.problem.classes, ctx.problem.negative
    findings = [k for k, c in enumerate(classes) if c != negative] or list(range(len(classes)))
    if n <= 0 or not len(test_ids):
        return {}
    best = test_probs[:, findings].max(axis=1)
    chosen = np.argsort(-best)[:n]
    target_of = {
        int(test_ids[i]): findings[int(np.argmax(test_probs[i, findings]))] for i in chosen
    }
    records = [r for r in ctx.records["test"] if int(r["study_id"]) in target_of]
    records = list({int(r["study_id"]): r for r in records}.values())  # one image per study
    dataset = make_dataset(records, ctx.spec, train=False)
    images = [
        to_device(torch.as_tensor(dataset[j]["image"])[None], ctx.device, ctx.spec.spatial_dims)
        for j in range(len(records))
    ]
    targets = [target_of[int(r["study_id"])] for r in records]
    epochs = ctx.cfg.label_randomization_epochs
    shuffled = _label_randomized_model(ctx, epochs) if epochs > 0 else None
    return saliency_checks(
        _unwrap(model).eval(), images, targets, ctx.eval_precision, shuffled, epochs
    )


def _label_randomized_model(ctx: _RunContext, epochs: int) -> nn.Module:
    """The same network and recipe trained for ``epochs`` on the training split with its
    study labels shuffled (Adebayo et al. 2018's data randomisation test): what a saliency
    method shows for a model that learnt no real relation between images and labels."""
    cfg, spec, sd = ctx.cfg, ctx.spec, ctx.spec.spatial_dims
    records = [dict(r) for r in ctx.records["train"]]
    studies = sorted({int(r["study_id"]) for r in records})
    label_of = {int(r["study_id"]): r["label"] for r in records}
    order = np.random.default_rng([cfg.seed, 1]).permutation(len(studies))
    shuffled = {s: label_of[studies[j]] for s, j in zip(studies, order, strict=True)}
    for r in records:
        r["label"] = shuffled[int(r["study_id"])]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        model = create_network(sd, len(ctx.problem.classes), architecture=cfg.architecture)
        model = model.to(ctx.device)
    if sd == 2:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    world = World()
    loss_fn = make_objective(ctx.problem, [r["label"] for r in records], cfg.balance, world)
    optimizer = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    precision = ctx.training["precision"]  # the run's own (probed) precision
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=precision == "fp16")
    dataset = make_dataset(
        records, spec, train=True, seed=cfg.seed + 1, flip=cfg.flip, affine=affine_of(cfg)
    )
    for epoch in range(epochs):
        dataset.epoch = epoch
        batches = _epoch_batches(len(dataset), cfg.batch_size, cfg.seed + 1, epoch)
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=0)
        train_epoch(
            model, loader, loss_fn.to(ctx.device), optimizer, scaler, ctx.device, precision, sd
        )
    return model.eval()


def _calibration_check(
    problem: Problem, probs: np.ndarray, labels: np.ndarray, seed: int
) -> dict[str, Any]:
    """The shipped calibration's ECE on the calibration split (in-sample, 95% bootstrap CI;
    sigmoid problems: the mean over labels, no CI) against :data:`ECE_TARGET`, with a
    warning in words when it is above the target."""
    if problem.sigmoid:
        ece = float(np.mean(_per_label(expected_calibration_error, probs, labels)))
        lo = hi = None
    else:
        rep = calibration_report(probs, labels, n_resamples=200, seed=seed)["ece"]
        ece, lo, hi = rep["value"], rep["ci_low"], rep["ci_high"]
    ok = ece <= ECE_TARGET
    ci = f" (95% CI {lo:.3f}-{hi:.3f})" if lo is not None and hi is not None else ""
    warning = (
        None
        if ok
        else f"calibration is weak: ECE {ece:.3f}{ci} on the calibration split, above the "
        f"{ECE_TARGET} target; probabilities may be over- or under-confident"
    )
    return {"ece": ece, "ci_low": lo, "ci_high": hi, "target": ECE_TARGET, "ok": ok,
            "warning": warning}  # fmt: skip


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _stop_reason(budget: Budget, step: int, cfg: TrainConfig) -> str:
    """Why training ended, in words for the experiment record."""
    if cfg.time_budget is not None and step >= budget.horizon and budget.horizon < budget.cap:
        return f"time budget ({cfg.time_budget:.0f} s)"
    if step >= budget.horizon:
        return f"step cap ({budget.horizon})"
    if step - budget.best_step >= budget.patience:
        return f"no better validation score for {step - budget.best_step} steps"
    return f"epochs ({cfg.epochs})"


def _trust_summary(trust: dict[str, Any]) -> dict[str, Any]:
    """The trust figures that `workbench models` and the model card show."""
    report = trust.get("trust_report", {})
    return {
        "conformal_coverage": report.get("conformal_test", {}).get("coverage"),
        "mean_set_size": report.get("conformal_test", {}).get("mean_set_size"),
        "ood_false_flag_rate": report.get("ood_test", {}).get("false_flag_rate"),
        "similar_precision_at_5": report.get("similar_test", {}).get("precision_at_k"),
    }


def _per_label(
    fn: Callable[[np.ndarray, np.ndarray], float], probs: np.ndarray, targets: np.ndarray
) -> list[float]:
    """A binary calibration metric of each sigmoid output: column j as [1 - p, p]."""
    return [
        fn(np.stack([1 - probs[:, j], probs[:, j]], axis=1), np.asarray(targets)[:, j].astype(int))
        for j in range(probs.shape[1])
    ]


def _auroc(problem: Problem, logits: np.ndarray, targets: np.ndarray) -> float | None:
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


def _forward_sharded(
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


def _epoch_batches(
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
    keep_frozen_in_eval(_unwrap(model))
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


def _unwrap(model: nn.Module) -> nn.Module:
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


def _training_curves(history: list[dict[str, float]], name: str) -> bytes:
    """Train and validation loss per epoch as a PNG, for the bundle's docs."""
    import io

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    ax.set(xlabel="epoch", ylabel="loss", title=f"{name}: training curves")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _study_labels(records: list[dict[str, Any]], study_ids: np.ndarray) -> np.ndarray:
    """(S,) class indices, or (S, K) 0/1 targets for sigmoid problems, in ``study_ids`` order."""
    by_study = {r["study_id"]: r["label"] for r in records}
    rows = [by_study[int(s)] for s in study_ids]
    if rows and isinstance(rows[0], np.ndarray):
        return np.stack(rows).astype(np.int64)
    return np.asarray(rows, dtype=np.int64)
