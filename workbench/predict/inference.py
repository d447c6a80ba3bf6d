"""Predict: a study's cached images in, a calibrated, explained, traceable prediction out.

Per image the network gives logits; the study's logit is their mean (the calibration was
fitted on the same study-level logits). Saliency is computed for the most probable finding
(the most probable class other than the negative one), mapped back from the network's input
grid to the image's own rows and columns by inverting the eval transforms, and cached as
``.npy`` keyed by bundle hash, pixel hash and method.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from sqlalchemy import select
from tqdm import tqdm

from workbench.catalog.cohorts import CohortItem, study_headers
from workbench.catalog.records import StudyHeader
from workbench.config import Settings
from workbench.db.store import Prediction, new_session
from workbench.errors import UsageError
from workbench.model.bundle import Bundle, code_version
from workbench.model.data import eval_transforms
from workbench.model.nets import embed
from workbench.model.problems import Problem
from workbench.model.runtime import autocast, resolve_precision, to_device
from workbench.posthoc.calibration import sigmoid, softmax
from workbench.predict.explain import saliency
from workbench.predict.results import (
    EXPLAIN_METHODS,
    saliency_path,
)
from workbench.predict.trust import load_trust


@dataclass(frozen=True)
class ImagePrediction:
    view: str
    pixel_hash: str
    cache_key: str
    probabilities: dict[str, float]
    saliency_file: str | None  # relative to the cache folder
    saliency_target: str | None


@dataclass(frozen=True)
class StudyPrediction:
    study_id: int
    study_key: str
    probabilities: dict[str, float]  # calibrated, study level
    raw_probabilities: dict[str, float]  # uncalibrated softmax (sigmoid) of the study logit
    predicted_label: str  # multi-label: the findings above their thresholds, joined with ';'
    top_k: list[tuple[str, float]]
    priority: float  # calibrated probability of the most probable finding
    images: tuple[ImagePrediction, ...]
    embedding: np.ndarray  # mean image embedding (F,)
    # what the bundle ships for trust (None when it ships none): "prediction_set", "ood" and
    # "similar", see workbench.predict.trust.LoadedTrust.assess
    trust: dict[str, Any] | None = None
    # the calibration map applied: "site:NAME" (the study's site's own) or "global"
    calibration_map: str | None = None


def _finding_index(bundle: Bundle, probs: np.ndarray) -> int:
    """Index of the most probable class that is not the negative one."""
    order = np.argsort(-probs)
    for k in order:
        if bundle.classes[int(k)] != bundle.negative_class:
            return int(k)
    return int(order[0])


def predict_study(
    settings: Settings,
    bundle: Bundle,
    item: CohortItem,
    explain: str = "gradcam",
    precision: str = "auto",
    header: StudyHeader | None = None,
) -> StudyPrediction:
    """Run the bundle on one study; saliency maps are written to the cache.

    ``header``: the study's header facts for the OOD check (read from the catalog if None).
    """
    if explain not in EXPLAIN_METHODS:
        raise UsageError(f"--explain must be one of {', '.join(EXPLAIN_METHODS)}")
    if item.spatial_dims != bundle.spec.spatial_dims:
        return _refused(bundle, item)
    model = bundle.network
    device = next(model.parameters()).device
    prec = resolve_precision(precision, device, bundle.spec.spatial_dims, training=False)
    transform = eval_transforms(bundle.spec)
    inputs = [
        transform({"image": str(path), "study_key": item.study_key})["image"]
        for path in item.images
    ]
    x = to_device(
        torch.stack([torch.as_tensor(t) for t in inputs]), device, bundle.spec.spatial_dims
    )
    with torch.no_grad(), autocast(device, prec):
        logits_t, emb_t = embed(model, x)
    logits = logits_t.float().cpu().numpy()
    study_logit = logits.mean(axis=0, keepdims=True)
    # Softmax models: rows that sum to one. One-vs-rest and multi-label models: one calibrated
    # sigmoid probability per label, (K,), each compared with its own threshold. The map is the
    # study's site's own when the bundle has one for it (--calibrate-per-site), else the global.
    calibration, calibration_map = bundle.calibration_for(item.site)
    calibrated = calibration.apply(study_logit)[0]
    problem = Problem(bundle.problem, bundle.classes, bundle.negative_class)
    raw = (sigmoid(study_logit) if problem.sigmoid else softmax(study_logit))[0]
    per_image_cal = calibration.apply(logits)
    target = _finding_index(bundle, calibrated)
    images = []
    for j, inp in enumerate(inputs):
        sal_file: str | None = None
        if explain != "none":
            path = saliency_path(settings, bundle.bundle_hash, item.pixel_hashes[j], explain)
            if not path.exists():
                heat = saliency(model, inp[None].to(device), target, method=explain)  # type: ignore[arg-type]
                native = _to_native(transform, inp, heat)
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, native.astype(np.float16))
            sal_file = str(path.relative_to(settings.cache_dir))
        images.append(
            ImagePrediction(
                view=item.views[j],
                pixel_hash=item.pixel_hashes[j],
                cache_key=item.cache_keys[j],
                probabilities=_as_dict(bundle.classes, per_image_cal[j]),
                saliency_file=sal_file,
                saliency_target=bundle.classes[target] if explain != "none" else None,
            )
        )
    embedding = emb_t.float().mean(dim=0).cpu().numpy()
    trust = load_trust(bundle.path, bundle.contract.trust)
    checks = None
    if trust is not None:
        if header is None:
            header = study_headers(settings, [item.study_id])[item.study_id]
        checks = trust.assess(bundle.classes, item.study_key, calibrated, embedding, header)
    order = np.argsort(-calibrated)[: min(5, len(bundle.classes))]
    finding = [k for k, c in enumerate(bundle.classes) if c != bundle.negative_class]
    priority = float(calibrated[finding].max()) if finding else float(calibrated.max())
    return StudyPrediction(
        study_id=item.study_id,
        study_key=item.study_key,
        probabilities=_as_dict(bundle.classes, calibrated),
        raw_probabilities=_as_dict(bundle.classes, raw),
        predicted_label=problem.decide(calibrated, bundle.thresholds),
        top_k=[(bundle.classes[int(k)], float(calibrated[k])) for k in order],
        priority=priority,
        images=tuple(images),
        embedding=embedding,
        trust=checks,
        calibration_map=calibration_map,
    )


def _refused(bundle: Bundle, item: CohortItem) -> StudyPrediction:
    """A study the network cannot take (a volume for a 2D model, or the reverse): stored as
    out of distribution with its reason and no scores, so that nothing shows a number for it."""
    model_dims, study_dims = bundle.spec.spatial_dims, item.spatial_dims
    reason = f"{study_dims}D {item.modality or 'study'} input for a {model_dims}D model: not scored"
    ood = {"flagged": True, "score": None, "threshold": None, "reasons": [reason]}
    return StudyPrediction(
        study_id=item.study_id,
        study_key=item.study_key,
        probabilities={},
        raw_probabilities={},
        predicted_label="",
        top_k=[],
        priority=0.0,
        images=(),
        embedding=np.zeros(0, dtype=np.float32),
        trust={"prediction_set": None, "ood": ood, "similar": []},
    )


def _to_native(transform: Any, model_input: torch.Tensor, heat: np.ndarray) -> np.ndarray:
    """Undo pad and resize: a map on the network's grid onto the image's own grid."""
    meta = MetaTensor(torch.from_numpy(heat[None].astype(np.float32)))
    meta.copy_meta_from(model_input)
    inverted = transform.inverse({"image": meta})["image"]
    return np.clip(np.asarray(inverted[0]), 0.0, 1.0)


def _as_dict(classes: Sequence[str], values: np.ndarray) -> dict[str, float]:
    return {c: float(v) for c, v in zip(classes, values, strict=True)}


def predict_items(
    settings: Settings,
    bundle: Bundle,
    items: Sequence[CohortItem],
    explain: str = "gradcam",
    precision: str = "auto",
    progress: bool = True,
    force: bool = False,
    limit: int | None = None,
) -> list[StudyPrediction]:
    """Predict and store each study; studies already predicted by this bundle are skipped
    (so an interrupted batch resumes) unless ``force``. Returns the new predictions.

    Each study's row is committed as soon as it is predicted: a run killed at any point
    leaves only whole predictions, and the next run starts after the last one. ``limit``
    stops after that many new predictions (a batch done in slices)."""
    done: set[int] = set()
    # read before the writing session opens: SQLite allows one writer, and it would be us
    headers = study_headers(settings, [i.study_id for i in items])
    with new_session(settings.database_url) as session:
        if not force:
            done = set(
                session.scalars(
                    select(Prediction.study_id).where(
                        Prediction.bundle_hash == bundle.bundle_hash,
                        Prediction.explain_method == explain,
                    )
                )
            )
        code = code_version()
        out: list[StudyPrediction] = []
        todo = [i for i in items if i.study_id not in done and i.images]
        if limit is not None:
            todo = todo[: max(0, limit)]
        # The bar counts what is left, so a resumed run shows its true remaining work.
        for item in tqdm(todo, desc="predict", unit="study", disable=not progress):
            pred = predict_study(
                settings, bundle, item, explain, precision, headers.get(item.study_id)
            )
            session.add(to_row(pred, bundle, code, explain))
            # One commit per study: a forward pass costs far more than a SQLite commit, and
            # a kill then loses at most the study in flight (never a duplicate row).
            session.commit()
            out.append(pred)
        session.commit()
    return out


def to_row(pred: StudyPrediction, bundle: Bundle, code: str, explain: str) -> Prediction:
    return Prediction(
        study_id=pred.study_id,
        model_name=bundle.name,
        model_version=bundle.version,
        bundle_hash=bundle.bundle_hash,
        code_version=code,
        transform_hash=bundle.spec.transform_hash(),
        pixel_hashes=[im.pixel_hash for im in pred.images],
        probabilities=pred.probabilities,
        raw_probabilities=pred.raw_probabilities,
        predicted_label=pred.predicted_label,
        top_k=[list(t) for t in pred.top_k],
        priority=pred.priority,
        per_image=[
            {
                "view": im.view,
                "pixel_hash": im.pixel_hash,
                "cache_key": im.cache_key,
                "probabilities": im.probabilities,
                "saliency_file": im.saliency_file,
                "saliency_target": im.saliency_target,
            }
            for im in pred.images
        ],
        explain_method=explain,
        prediction_set=(pred.trust or {}).get("prediction_set"),
        ood=(pred.trust or {}).get("ood"),
        ood_flag=None if pred.trust is None else bool(pred.trust["ood"]["flagged"]),
        similar=(pred.trust or {}).get("similar"),
        calibration_map=pred.calibration_map,
    )


def write_csv(path: Path, bundle: Bundle, preds: Sequence[Prediction]) -> None:
    """One row per study: pseudonymous study key, label, calibrated probabilities, top-k."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["study_key", "predicted_label", *[f"p_{c}" for c in bundle.classes], "top_k"]
            + ["prediction_set", "out_of_distribution", "priority", "calibration_map"]
            + ["model", "version", "bundle_hash"]
        )
        for p in preds:
            w.writerow(
                [p.study.study_key, p.predicted_label]
                + [
                    f"{p.probabilities[c]:.6f}" if c in p.probabilities else ""  # not scored
                    for c in bundle.classes
                ]
                + [";".join(f"{c}:{v:.4f}" for c, v in p.top_k)]
                + [_set_text(p.prediction_set), "" if p.ood_flag is None else str(p.ood_flag)]
                + [f"{p.priority:.6f}", p.calibration_map or ""]
                + [bundle.name, bundle.version, bundle.bundle_hash]
            )


def _set_text(pset: dict[str, Any] | None) -> str:
    """A prediction set as text: "nodule;effusion", a label's status for multi-label, "" when
    the bundle has none; an empty set is written as "{}" (more certain than the coverage)."""
    if not pset:
        return ""
    if "labels" in pset:
        return ";".join(f"{k}:{v}" for k, v in pset["labels"].items())
    return ";".join(pset["classes"]) or "{}"
