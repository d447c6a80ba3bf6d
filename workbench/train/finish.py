"""The finish of a run (rank 0): calibrate on the calibration split, test once, fit the trust
pieces and saliency checks, and write the bundle."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from torch import nn

from workbench.catalog.cohorts import CohortItem, cohort_hash, study_headers
from workbench.catalog.records import StudyHeader
from workbench.config import Settings
from workbench.metrics import (
    brier_score,
    calibration_report,
    classification_metrics,
    expected_calibration_error,
    label_metrics,
)
from workbench.model.bundle import save_bundle
from workbench.model.data import (
    InputSpec,
    make_dataset,
)
from workbench.model.distributed import (
    World,
)
from workbench.model.nets import (
    create_network,
)
from workbench.model.problems import (
    Problem,
    make_objective,
)
from workbench.model.runtime import (
    forward_dataset,
    mean_by_study,
    to_device,
)
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
from workbench.train.config import TrainConfig
from workbench.train.loop import epoch_batches, train_epoch
from workbench.train.recipe import affine_of, make_optimizer, unwrap


@dataclass(frozen=True)
class RunContext:
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


def calibrate_test_and_bundle(ctx: RunContext, model: nn.Module) -> tuple[Path, dict[str, Any]]:
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
            # where each split's labels came from: the labels file, or clinicians' reads
            "label_sources": {
                s: dict(sorted(Counter(i.label_source or "csv" for i in its).items()))
                for s, its in ctx.by_split.items()
            },
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
    ctx: RunContext, split: str, out: dict[str, Any], headers: dict[int, StudyHeader]
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
    ctx: RunContext,
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
    ctx: RunContext, model: nn.Module, test_probs: np.ndarray, test_ids: np.ndarray
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
        unwrap(model).eval(), images, targets, ctx.eval_precision, shuffled, epochs
    )


def _label_randomized_model(ctx: RunContext, epochs: int) -> nn.Module:
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
        batches = epoch_batches(len(dataset), cfg.batch_size, cfg.seed + 1, epoch)
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
