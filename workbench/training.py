"""The fit loop: patient-level split, AMP, channels_last, checkpoints, early stopping, then
calibration on the calibration split and a bundle under ``models/NAME/vN/``.

Recipe (2 CPU cores, the demo cohort)::

    workbench train --cohort demo --name chest-xray --epochs 12 --image-size 96

The calibration split doubles as the validation split for early stopping (as in Guo et al.
2017, where the validation set also fits the temperature); the test split is touched only once,
after the model and its calibration are fixed.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from monai.utils import set_determinism
from torch import nn
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from workbench.bundle import hash_bundle, resolve_bundle_path, save_bundle
from workbench.calibration import (
    brier_score,
    expected_calibration_error,
    fit_calibration,
    softmax,
)
from workbench.catalog import CohortItem, cohort_hash, cohort_items, split_cohort
from workbench.config import Settings
from workbench.data import InputSpec, make_dataset, to_records
from workbench.metrics import classification_metrics
from workbench.nets import (
    create_network,
    freeze_early_blocks,
    keep_frozen_in_eval,
    load_initial_weights,
)
from workbench.runtime import (
    autocast,
    forward_dataset,
    mean_by_study,
    resolve_device,
    resolve_precision,
    to_device,
)

NEGATIVE_NAMES = ("normal", "no_lesion", "negative", "no_finding")


class TrainingError(Exception):
    """A user-facing training problem (empty cohort, one class only, diverged loss...)."""


@dataclass(frozen=True)
class TrainConfig:
    cohort: str
    name: str
    epochs: int = 12
    image_size: int = 96
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    patience: int = 5  # epochs without a better validation loss before stopping
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    max_steps: int | None = None  # stop early after this many optimiser steps (smoke tests)
    resume: bool = False
    checkpoint_every: int = 50  # optimiser steps between mid-epoch checkpoints (0: epochs only)
    init_from: str | None = None  # a bundle (NAME, NAME/vN, folder) or a weights file (.pt/.pth)
    freeze_blocks: int = 0  # freeze the stem and this many early dense blocks
    backbone_lr_factor: float = 1.0  # backbone learning rate = lr x this


@dataclass(frozen=True)
class TrainResult:
    bundle: Path
    history: list[dict[str, float]]
    best_epoch: int
    metrics: dict[str, Any] = field(default_factory=dict)


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


def train(settings: Settings, cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train, calibrate and bundle a model on ``cfg.cohort``."""
    started = time.time()
    _seed_everything(cfg.seed)
    split_counts = split_cohort(settings, cfg.cohort, cfg.seed, cfg.split_fractions)
    items = _labelled(cohort_items(settings, cfg.cohort))
    if not items:
        raise TrainingError(f"cohort {cfg.cohort!r} has no labelled studies")
    classes = tuple(sorted({i.label for i in items if i.label}))
    if len(classes) < 2:
        raise TrainingError(f"cohort {cfg.cohort!r} has only one class ({classes[0]})")
    by_split = {s: [i for i in items if i.split == s] for s in ("train", "calibration", "test")}
    for s, its in by_split.items():
        if not its:
            raise TrainingError(f"the {s} split of {cfg.cohort!r} is empty; ingest more studies")
    modality = items[0].modality or ""
    dims = {i.spatial_dims for i in items}
    if len(dims) > 1:
        raise TrainingError(f"cohort {cfg.cohort!r} mixes 2D images and 3D volumes")
    spatial_dims = dims.pop()
    spec = InputSpec(image_size=cfg.image_size, spatial_dims=spatial_dims)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, spatial_dims, training=True)
    # Validation, calibration and test logits use the precision that `predict` will use, so
    # the calibration is fitted on the same numbers it will be applied to.
    eval_precision = resolve_precision(cfg.precision, device, spatial_dims, training=False)
    negative = next((c for c in classes if c.lower() in NEGATIVE_NAMES), None)

    records = {s: to_records(its, classes) for s, its in by_split.items()}
    train_ds = _SeededAugmentation(make_dataset(records["train"], spec, train=True), cfg.seed)
    val_ds = make_dataset(records["calibration"], spec, train=False)

    model, init_report = prepare_network(settings, cfg, spatial_dims, len(classes))
    model = model.to(device)
    if spatial_dims == 2:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    # Class weights (inverse frequency) so a rare finding is not drowned by the negatives.
    counts = np.bincount([r["label"] for r in records["train"]], minlength=len(classes))
    weights = torch.tensor(counts.sum() / np.maximum(counts, 1) / len(classes), dtype=torch.float)
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device))
    # A lower learning rate for the (pretrained) backbone than for the head, when asked.
    backbone = [p for p in model.features.parameters() if p.requires_grad]  # type: ignore[union-attr]
    head = [p for p in model.class_layers.parameters() if p.requires_grad]  # type: ignore[union-attr]
    groups: list[dict[str, Any]] = [
        {"params": backbone, "lr": cfg.lr * cfg.backbone_lr_factor},
        {"params": head},
    ]
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    run_dir = settings.models_dir / cfg.name / ".training"
    ckpt_path = run_dir / "checkpoint.pt"
    history: list[dict[str, float]] = []
    best_loss, best_epoch, bad_epochs, start_epoch, step = float("inf"), -1, 0, 0, 0
    start_batch, epoch_losses = 0, []  # position inside a partly done epoch
    best_state: dict[str, torch.Tensor] | None = None
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # our own file
        if ckpt["config"]["cohort"] != cfg.cohort or tuple(ckpt["classes"]) != classes:
            raise TrainingError("the checkpoint belongs to another cohort; train without --resume")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        history, best_loss, best_epoch = ckpt["history"], ckpt["best_loss"], ckpt["best_epoch"]
        bad_epochs, start_epoch, step = ckpt["bad_epochs"], ckpt["epoch"], ckpt["step"]
        start_batch, epoch_losses = ckpt["batch"], list(ckpt["epoch_losses"])
        best_state = ckpt["best_state"]
        if progress:
            print(f"resuming at epoch {start_epoch + 1}, batch {start_batch + 1} (step {step})")

    def checkpoint(epoch: int, batch: int, losses: list[float]) -> None:
        """Everything needed to continue exactly here, written atomically."""
        _atomic_save(
            {
                "config": asdict(cfg),
                "classes": classes,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,  # the epoch to run next, from `batch`
                "batch": batch,
                "epoch_losses": losses,
                "step": step,
                "history": history,
                "best_loss": best_loss,
                "best_epoch": best_epoch,
                "best_state": best_state,
                "bad_epochs": bad_epochs,
            },
            ckpt_path,
        )

    for epoch in range(start_epoch, cfg.epochs):
        # The order of an epoch and each sample's augmentation depend only on (seed, epoch,
        # index), never on how far the run got: a resumed epoch replays exactly.
        train_ds.epoch = epoch
        batches = _epoch_batches(len(train_ds), cfg.batch_size, cfg.seed, epoch)
        loader = DataLoader(train_ds, batch_sampler=batches[start_batch:], num_workers=0)
        done_before = list(epoch_losses)

        def on_step(
            step_losses: list[float],
            epoch: int = epoch,
            first: int = start_batch,
            before: list[float] = done_before,
        ) -> None:
            nonlocal step
            step += 1
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint(epoch, first + len(step_losses), before + step_losses)

        losses = done_before + train_epoch(
            model,
            loader,
            loss_fn,
            optimizer,
            scaler,
            device,
            precision,
            spatial_dims,
            max_steps=cfg.max_steps - step if cfg.max_steps else None,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            progress=progress,
            on_step=on_step,
        )
        start_batch, epoch_losses = 0, []
        scheduler.step()
        val = forward_dataset(model, val_ds, device, eval_precision, spatial_dims)
        val_loss = float(
            nn.functional.cross_entropy(
                torch.from_numpy(val["logits"]),
                torch.as_tensor([r["label"] for r in records["calibration"]]),
            )
        )
        history.append(
            {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val_loss}
        )
        if progress:
            print(f"epoch {epoch + 1}: train loss {np.mean(losses):.4f}, val loss {val_loss:.4f}")
        if val_loss < best_loss:
            best_loss, best_epoch, bad_epochs = val_loss, epoch + 1, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        checkpoint(epoch + 1, 0, [])
        if bad_epochs >= cfg.patience or (cfg.max_steps and step >= cfg.max_steps):
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()

    # Calibrate on study-level logits of the calibration split, then test once.
    cal = forward_dataset(model, val_ds, device, eval_precision, spatial_dims)
    cal_ids, cal_logits = mean_by_study(cal["study_ids"], cal["logits"])
    cal_labels = _study_labels(records["calibration"], cal_ids)
    result = fit_calibration(cal_logits, cal_labels, classes, seed=cfg.seed)
    test_ids, test_logits = mean_by_study(
        *_logits(model, records["test"], spec, device, eval_precision)
    )
    test_labels = _study_labels(records["test"], test_ids)
    raw = softmax(test_logits)
    calibrated = result.calibration.apply(test_logits)
    test_metrics = classification_metrics(calibrated, test_labels, classes, n_resamples=200)
    test_metrics["ece_before"] = expected_calibration_error(raw, test_labels)
    test_metrics["ece_after"] = expected_calibration_error(calibrated, test_labels)
    test_metrics["brier_before"] = brier_score(raw, test_labels)
    test_metrics["brier_after"] = brier_score(calibrated, test_labels)
    summary = {
        "accuracy": test_metrics["accuracy"],
        "auroc_macro": test_metrics["auroc_macro"],
        "ece_before": test_metrics["ece_before"],
        "ece_after": test_metrics["ece_after"],
    }
    extra = {
        "modality": modality,
        "cohort": cfg.cohort,
        "cohort_hash": cohort_hash(items),
        "split": {
            "seed": cfg.seed,
            "fractions": list(cfg.split_fractions),
            "studies": split_counts,
            "patients": {s: len({i.patient for i in its}) for s, its in by_split.items()},
        },
        "training": {
            **asdict(cfg),
            "device": str(device),
            "precision": precision,
            "eval_precision": eval_precision,
            "init": init_report,
            "best_epoch": best_epoch,
            "history": history,
            "seconds": round(time.time() - started, 1),
            "torch_threads": torch.get_num_threads(),
        },
        "calibration_fit": {
            "held_out_log_loss": result.held_out_log_loss,
            "before": result.before,
            "after": result.after,
        },
        "metrics": {"test": summary, "test_detail": test_metrics},
    }
    bundle = save_bundle(
        settings.models_dir,
        cfg.name,
        model,
        classes,
        spec,
        result.calibration,
        extra,
        negative_class=negative,
        figures={"training.png": _training_curves(history, cfg.name)},
    )
    ckpt_path.unlink(missing_ok=True)
    return TrainResult(bundle=bundle, history=history, best_epoch=best_epoch, metrics=summary)


class _SeededAugmentation(TorchDataset):
    """Re-seeds the random transforms before each sample from (seed, epoch, index).

    MONAI's random transforms draw from their own generators in call order, so a run resumed
    mid-epoch would see other augmentations than the uninterrupted run. Seeding per sample
    makes an image's augmentation a function of where it is, not of when it is drawn.
    """

    def __init__(self, base: Any, seed: int) -> None:
        self.base, self.seed, self.epoch = base, seed, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        entropy = np.random.SeedSequence([self.seed, self.epoch, index])
        self.base.transform.set_random_state(seed=int(entropy.generate_state(1)[0]))
        return self.base[index]


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of one epoch, from (seed, epoch) alone. A last batch smaller than
    ``batch_size`` is dropped when there is more than one batch: a batch of one image breaks
    BatchNorm, and a ragged batch is noise anyway."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
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
    on_step: Callable[[list[float]], None] | None = None,
) -> list[float]:
    """One pass over ``loader`` under autocast; returns the loss of each step.

    ``on_step(losses_so_far)`` runs after each optimiser step (the fit loop checkpoints there).

    Raises TrainingError on a non-finite loss before the optimiser touches the weights.
    """
    model.train()
    keep_frozen_in_eval(model)
    losses: list[float] = []
    bar = tqdm(loader, desc=desc, disable=not progress)
    for batch in bar:
        x = to_device(torch.as_tensor(batch["image"]), device, spatial_dims)
        y = torch.as_tensor(batch["label"]).to(device)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            logits = model(x)  # (B, K), in bf16/fp16 under autocast
        loss = loss_fn(logits.float(), y)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss.item()} after {len(losses)} steps of this epoch; "
                "the last good checkpoint is kept. Lower --lr or use --precision fp32"
            )
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
        if on_step is not None:
            on_step(losses)
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", refresh=False)
        if max_steps is not None and len(losses) >= max_steps:
            break
    bar.close()
    return losses


def prepare_network(
    settings: Settings, cfg: TrainConfig, spatial_dims: int, n_classes: int
) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh network, optionally started from earlier weights, with early blocks frozen.

    ``cfg.init_from`` names a bundle (its head is rebuilt when the classes differ, the rest
    kept) or a weights file such as an ImageNet DenseNet121 in torchvision's key layout (given
    by path; nothing is downloaded). Returns the network and what was loaded and frozen.
    """
    model = create_network(spatial_dims, n_classes)
    report: dict[str, Any] = {"from": None, "loaded": 0, "skipped": [], "frozen": []}
    if cfg.init_from:
        source = Path(cfg.init_from)
        if source.is_file():
            state = torch.load(source, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            report["from"] = f"weights file {source.name}"
        else:
            path = resolve_bundle_path(settings.models_dir, cfg.init_from)
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


def _logits(
    model: nn.Module,
    records: list[dict[str, Any]],
    spec: InputSpec,
    device: torch.device,
    precision: str,
) -> tuple[np.ndarray, np.ndarray]:
    out = forward_dataset(
        model, make_dataset(records, spec, train=False), device, precision, spec.spatial_dims
    )
    return out["study_ids"], out["logits"]


def _study_labels(records: list[dict[str, Any]], study_ids: np.ndarray) -> np.ndarray:
    by_study = {r["study_id"]: r["label"] for r in records}
    return np.asarray([by_study[int(s)] for s in study_ids], dtype=np.int64)
