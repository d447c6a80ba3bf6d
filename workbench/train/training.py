"""A training run: patient-level split, AMP, channels_last, checkpoints, early stopping, then
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
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from monai.data import DataLoader
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from workbench.catalog.cohorts import (
    MIN_VOLUME_SLICES,
    CohortItem,
    cohort_items,
    fold_assignment,
    holdout_patients,
    patient_folds,
    split_cohort,
)
from workbench.config import Settings
from workbench.model.data import (
    InputSpec,
    make_dataset,
    to_records,
)
from workbench.model.distributed import (
    World,
    broadcast,
    close_world,
    init_world,
    shard,
    sync_batchnorm,
)
from workbench.model.nets import (
    network_of,
)
from workbench.model.problems import (
    ProblemError,
    make_objective,
    resolve_problem,
    sample_weights,
    validation_loss,
)
from workbench.model.runtime import (
    resolve_device,
    resolve_precision,
    training_precision,
)
from workbench.model.weights import input_normalization
from workbench.train.config import Balance, TrainConfig
from workbench.train.finish import RunContext, calibrate_test_and_bundle
from workbench.train.loop import (
    atomic_save,
    epoch_batches,
    forward_sharded,
    hardware,
    num_text,
    on_main,
    seed_everything,
    train_epoch,
    validation_auroc,
)
from workbench.train.recipe import (
    Budget,
    TrainingError,
    affine_of,
    make_optimizer,
    prepare_network,
    stop_reason,
    weight_average,
)

BALANCE_MODES: tuple[str, ...] = get_args(Balance)


@dataclass(frozen=True)
class TrainResult:
    bundle: Path
    history: list[dict[str, float]]
    best_epoch: int
    metrics: dict[str, Any] = field(default_factory=dict)
    folds: dict[str, Any] | None = None  # cross-validation summary (--folds)


def _labelled(items: list[CohortItem]) -> list[CohortItem]:
    return [i for i in items if i.label]


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

    A study is 2D or 3D by what it holds (:data:`workbench.catalog.cohorts.MIN_VOLUME_SLICES`), not
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
    seed_everything(cfg.seed)
    if assignment is None:
        # Rank 0 assigns and stores the split; the others read what it stored.
        on_main(world, lambda: split_cohort(settings, cfg.cohort, cfg.seed, cfg.split_fractions))
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
    precision_choice = on_main(
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
    steps_per_epoch = len(epoch_batches(len(train_ds), cfg.batch_size, cfg.seed, 0, draw))
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
        atomic_save(
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
        batches = epoch_batches(len(train_ds), cfg.batch_size, cfg.seed, epoch, draw)
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
        val_logits = forward_sharded(scored, val_ds, device, eval_precision, spatial_dims, world)
        val_loss = validation_loss(problem, val_logits, val_targets)
        val_auroc = validation_auroc(problem, val_logits, val_targets)
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
                f"val loss {val_loss:.4f}, val AUROC {num_text(val_auroc)}"
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
        "stopped": stop_reason(budget, step, cfg),
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
    context = RunContext(
        settings, cfg, problem, spec, records, by_split, items, modality, device,
        eval_precision, split_counts, training, started,
    )  # fmt: skip
    result = on_main(world, lambda: calibrate_test_and_bundle(context, model))
    return TrainResult(bundle=result[0], history=history, best_epoch=best_epoch, metrics=result[1])
