"""What ships with a model so that a clinician can judge its output: operating points,
conformal prediction sets, out-of-distribution flags, the similar-case index and the saliency
sanity checks, fitted after calibration and stored in the bundle as data.

The split roles follow the training recipe: the **train** split gives the embedding index (the
"prior cases") and the header profile; the **calibration** split, which the network never
trained on, sets every threshold (operating points, conformal quantile, OOD threshold); the
**test** split is used once, to measure what those thresholds deliver (sensitivity and
specificity, coverage and set size per subgroup, false-flag rate, precision at k).

Inputs are study-level arrays (logits and embeddings averaged over a study's images), so this
module runs no network itself except for the saliency checks, which take the model and a few
test images.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.catalog.records import StudyHeader
from workbench.posthoc.conformal import (
    ConformalSets,
    MultiLabelConformal,
    coverage_summary,
    study_uniform,
)
from workbench.posthoc.ood import HeaderProfile, OODDetector, false_flag_rate
from workbench.posthoc.similar import NEIGHBOURS, EmbeddingIndex, precision_at_k
from workbench.posthoc.site_calibration import apply_calibration
from workbench.predict.explain import gradcam_layer_for, sanity_checks

DEFAULT_TARGET_SENSITIVITY = 0.9
SIMILAR_K = NEIGHBOURS


@dataclass(frozen=True)
class SplitOutputs:
    """One split at study level: ids, keys, logits (S, K), embeddings (S, F), label indices
    (S,), and the subgroup values and header facts of each study."""

    study_ids: np.ndarray
    study_keys: tuple[str, ...]
    logits: np.ndarray
    embeddings: np.ndarray
    labels: np.ndarray
    headers: tuple[StudyHeader, ...]
    subgroups: Mapping[str, Sequence[str | None]]


@dataclass
class Trust:
    """The fitted pieces (see the module docstring) and what the test split measured."""

    operating_points: dict[str, Any]
    conformal: ConformalSets | MultiLabelConformal | None  # None: too few calibration studies
    index: EmbeddingIndex
    ood: OODDetector
    report: dict[str, Any]

    def metadata(self) -> dict[str, Any]:
        """The JSON that goes into the bundle's metadata (the index goes beside it)."""
        return {
            "operating_points": self.operating_points,
            "conformal": self.conformal.to_dict() if self.conformal is not None else None,
            "ood": self.ood.to_dict(),
            "similar": {"k": SIMILAR_K, "n_studies": len(self.index)},
            "trust_report": self.report,
        }


def operating_points(
    probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], target_sensitivity: float
) -> dict[str, Any]:
    """Per class (one-vs-rest), the highest threshold on its probability whose sensitivity on
    these studies reaches the target, with the sensitivity and specificity it gives."""
    out: dict[str, Any] = {"target_sensitivity": target_sensitivity, "classes": {}}
    for k, name in enumerate(classes):
        pos = probs[labels == k, k]
        neg = probs[labels != k, k]
        if len(pos) == 0:
            continue
        # thresholds at the positives' own scores, highest first: the first that keeps
        # enough positives above it is the most specific choice
        ordered = np.sort(pos)[::-1]
        need = int(np.ceil(target_sensitivity * len(pos)))
        threshold = float(ordered[need - 1])
        out["classes"][name] = {
            "threshold": threshold,
            "sensitivity": float(np.mean(pos >= threshold)),
            "specificity": float(np.mean(neg < threshold)) if len(neg) else None,
            "n_positive": len(pos),
        }
    return out


def apply_operating_points(
    points: Mapping[str, Any], probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Sensitivity and specificity that the stored thresholds give on other studies."""
    out = {}
    for k, name in enumerate(classes):
        point = points.get("classes", {}).get(name)
        if point is None:
            continue
        called = probs[:, k] >= point["threshold"]
        pos, neg = labels == k, labels != k
        out[name] = {
            "sensitivity": float(called[pos].mean()) if pos.any() else None,
            "specificity": float((~called[neg]).mean()) if neg.any() else None,
            "n_positive": int(pos.sum()),
        }
    return out


def label_names(labels: np.ndarray, classes: Sequence[str], none: str = "none") -> list[str]:
    """Text labels of studies: class indices (S,), or 0/1 targets (S, K) joined with ';'."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return [classes[int(y)] for y in labels]
    return [";".join(c for c, t in zip(classes, row, strict=True) if t) or none for row in labels]


def _multilabel_coverage(
    sets: Sequence[Mapping[str, str]], targets: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Per label: share of studies whose set holds the truth, and share left undecided."""
    out: dict[str, Any] = {"n": len(sets), "per_label": {}}
    for j, name in enumerate(classes):
        truth = np.where(np.asarray(targets)[:, j] == 1, "present", "absent")
        status = [s[name] for s in sets]
        out["per_label"][name] = {
            "coverage": float(
                np.mean([st in ("uncertain", t) for st, t in zip(status, truth, strict=True)])
            ),
            "uncertain_rate": float(np.mean([st == "uncertain" for st in status])),
        }
    cov = [v["coverage"] for v in out["per_label"].values()]
    out["coverage"] = float(np.mean(cov)) if cov else None
    return out


def fit_trust(
    classes: Sequence[str],
    calibration: Any,
    train: SplitOutputs,
    cal: SplitOutputs,
    test: SplitOutputs,
    coverage: float = 0.9,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    negative: str | None = None,
) -> Trust:
    """Fit operating points, conformal sets, index and OOD detector; measure them on test.

    ``calibration`` has ``apply(logits) -> probabilities``; a :class:`SiteCalibration` is
    applied with each study's site, so that the thresholds are set on the probabilities
    ``predict`` will show. Labels are class indices (S,) for single-label problems, or 0/1
    targets (S, K) for multi-label and one-vs-rest ones: those get per-label conformal sets and
    keep their own per-label thresholds (no operating points here).
    """
    multilabel = np.asarray(train.labels).ndim == 2
    cal_probs = apply_calibration(calibration, cal.logits, list(cal.subgroups["site"]))
    test_probs = apply_calibration(calibration, test.logits, list(test.subgroups["site"]))
    u_cal = np.array([study_uniform(k) for k in cal.study_keys])
    u_test = np.array([study_uniform(k) for k in test.study_keys])
    conformal: ConformalSets | MultiLabelConformal | None = None
    conformal_test: dict[str, Any] = {}
    points: dict[str, Any] = {}
    points_test: dict[str, Any] = {}
    try:
        if multilabel:
            conformal = MultiLabelConformal(tuple(classes), coverage).fit(
                cal_probs, cal.labels, u_cal
            )
            conformal_test = _multilabel_coverage(
                conformal.apply(test_probs, u_test), test.labels, classes
            )
        else:
            conformal = ConformalSets(coverage, "aps").fit(cal_probs, cal.labels, u_cal)
            test_sets = conformal.apply(test_probs, u_test)
            conformal_test = coverage_summary(test_sets, test.labels.tolist(), test.subgroups)
    except ValueError as err:  # a calibration split too small for this coverage
        conformal_test = {"skipped": str(err)}
    if not multilabel:
        points = operating_points(cal_probs, cal.labels, classes, target_sensitivity)
        points_test = apply_operating_points(points, test_probs, test.labels, classes)

    none = negative or "none"
    train_names = label_names(train.labels, classes, none)
    test_names = label_names(test.labels, classes, none)
    index = EmbeddingIndex(SIMILAR_K).fit(train.embeddings, train.study_keys, train_names)
    detector = OODDetector(HeaderProfile().fit(train.headers))
    detector.fit(index, train.embeddings, cal.embeddings)
    test_flags = detector.apply(index, test.embeddings, test.headers)

    shares = np.array([train_names.count(n) for n in set(train_names)]) / max(len(train_names), 1)
    report = {
        "operating_points_test": points_test,
        "conformal_test": conformal_test,
        "ood_test": {
            "n": len(test_flags),
            "false_flag_rate": false_flag_rate(test_flags),
            "threshold": detector.threshold_,
        },
        "similar_test": {
            "k": SIMILAR_K,
            "precision_at_k": precision_at_k(index, test.embeddings, test_names, SIMILAR_K),
            # what picking training studies at random would give
            "chance": float(np.sum(shares**2)),
        },
    }
    return Trust(points, conformal, index, detector, report)


def saliency_checks(
    model: torch.nn.Module,
    images: Sequence[torch.Tensor],
    targets: Sequence[int],
    precision: str = "fp32",
    label_randomized: torch.nn.Module | None = None,
    label_randomized_epochs: int = 0,
) -> dict[str, Any]:
    """The Adebayo / Petsiuk checks (:func:`workbench.predict.explain.sanity_checks`) on a few test
    images, for the bundle and the app."""
    if not images:
        return {}
    methods = sanity_checks(
        model, images, targets, precision=precision, ig_steps=16, label_randomized=label_randomized
    )
    out: dict[str, Any] = {
        "n_images": len(images),
        "label_randomized_epochs": label_randomized_epochs if label_randomized else 0,
        "methods": methods,
    }
    if "gradcam" in methods:
        # The Grad-CAM map's real resolution, for the app to say what it can and cannot outline.
        layer, grid = gradcam_layer_for(model, images[0])
        names = {id(mod): name for name, mod in model.named_modules()}
        out["gradcam"] = {
            "layer": names.get(id(layer), type(layer).__name__),
            "grid": [int(g) for g in grid],
            "input": [int(v) for v in images[0].shape[2:]],
        }
    return out


# --------------------------------------------------------------------------------------------
# In the bundle, and at prediction time
# --------------------------------------------------------------------------------------------

INDEX_FILE = "similar_index.npz"


def index_bytes(index: EmbeddingIndex) -> bytes:
    """The index as the bytes of an ``.npz`` file (for ``save_bundle(data_files=...)``)."""
    import io

    buf = io.BytesIO()
    index.save(buf)
    return buf.getvalue()


@dataclass(frozen=True)
class LoadedTrust:
    """What a bundle ships for trust, ready to apply to one study at a time."""

    conformal: ConformalSets | MultiLabelConformal | None
    index: EmbeddingIndex
    ood: OODDetector
    operating_points: dict[str, Any]
    saliency_checks: dict[str, Any]

    def assess(
        self,
        classes: Sequence[str],
        study_key: str,
        probs: np.ndarray,
        embedding: np.ndarray,
        header: StudyHeader,
    ) -> dict[str, Any]:
        """Prediction set, OOD result and similar cases for one study (JSON-ready).

        ``probs``: (K,) calibrated; ``embedding``: (F,) the study's mean embedding.
        """
        u = np.array([study_uniform(study_key)])
        cp = self.conformal
        pset: dict[str, Any] | None
        if cp is None:
            pset = None
        elif isinstance(cp, MultiLabelConformal):
            pset = {
                "coverage": cp.per_label_[0].coverage if cp.per_label_ else None,
                "labels": cp.apply(probs[None], u)[0],
            }
        else:
            members = cp.apply(probs[None], u)[0]
            pset = {"coverage": cp.coverage, "classes": [classes[k] for k in members]}
        ood = self.ood.apply(self.index, embedding[None], [header])[0]
        similar = [
            {
                "study_key": n.study_key,
                "label": n.label,
                "similarity": round(n.similarity, 4),
                "distance": round(n.distance, 6),
                # % of the index's own neighbour pairs farther apart (posthoc.similar); not
                # rounded, so that 99.996 is not stored as 100
                "closer_than": None if np.isnan(n.closer_than) else n.closer_than,
            }
            for n in self.index.apply(embedding[None], exclude=[study_key], k=SIMILAR_K)[0]
        ]
        return {"prediction_set": pset, "ood": ood.to_dict(), "similar": similar}


_LOADED: dict[tuple[str, str], LoadedTrust | None] = {}


def load_trust(bundle_path: Path, meta: Mapping[str, Any]) -> LoadedTrust | None:
    """The bundle's trust pieces (``meta``: its contract's ``trust`` section), or None for a
    bundle that ships none (older bundles).

    Cached per bundle folder and metadata (a bundle is immutable once written).
    """
    if not meta:
        return None
    key = (str(bundle_path), json.dumps(meta, sort_keys=True, default=str)[:4096])
    if key in _LOADED:
        return _LOADED[key]
    arrays: dict[str, np.ndarray] = {}
    index = EmbeddingIndex.load(bundle_path / "models" / INDEX_FILE)
    conformal_meta = meta.get("conformal")
    conformal: ConformalSets | MultiLabelConformal | None = None
    if conformal_meta:
        conformal = (
            MultiLabelConformal.from_dict(conformal_meta)
            if "per_label" in conformal_meta
            else ConformalSets.from_dict(conformal_meta)
        )
    loaded = LoadedTrust(
        conformal=conformal,
        index=index,
        ood=OODDetector.from_dict(meta["ood"], arrays),
        operating_points=dict(meta.get("operating_points") or {}),
        saliency_checks=dict(meta.get("saliency_checks") or {}),
    )
    _LOADED[key] = loaded
    return loaded
