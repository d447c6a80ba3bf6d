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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workbench.calibration import Calibration
from workbench.conformal import ConformalSets, coverage_summary, fit_conformal, study_uniform
from workbench.explain import sanity_checks
from workbench.ood import HeaderProfile, OODDetector, StudyHeader, false_flag_rate
from workbench.similar import EmbeddingIndex, precision_at_k

DEFAULT_TARGET_SENSITIVITY = 0.9
SIMILAR_K = 5


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
    conformal: ConformalSets
    index: EmbeddingIndex
    ood: OODDetector
    report: dict[str, Any]

    def metadata(self) -> dict[str, Any]:
        """The JSON that goes into the bundle's metadata (the index goes beside it)."""
        return {
            "operating_points": self.operating_points,
            "conformal": self.conformal.to_dict(),
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


def fit_trust(
    classes: Sequence[str],
    calibration: Calibration,
    train: SplitOutputs,
    cal: SplitOutputs,
    test: SplitOutputs,
    coverage: float = 0.9,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
) -> Trust:
    """Fit operating points, conformal sets, index and OOD detector; measure them on test."""
    label_names = [classes[int(y)] for y in train.labels]
    cal_probs = calibration.apply(cal.logits)
    test_probs = calibration.apply(test.logits)
    points = operating_points(cal_probs, cal.labels, classes, target_sensitivity)

    u_cal = np.array([study_uniform(k) for k in cal.study_keys])
    u_test = np.array([study_uniform(k) for k in test.study_keys])
    conformal = fit_conformal(cal_probs, cal.labels, coverage, "aps", u=u_cal)
    test_sets = conformal.predict(test_probs, u_test)

    index = EmbeddingIndex(train.embeddings, train.study_keys, label_names)
    detector = OODDetector(HeaderProfile.fit(train.headers))
    detector.fit(index, train.embeddings, cal.embeddings)
    test_flags = detector.assess(index, test.embeddings, test.headers)

    label_counts = np.bincount(train.labels, minlength=len(classes)) / max(len(train.labels), 1)
    report = {
        "operating_points_test": apply_operating_points(points, test_probs, test.labels, classes),
        "conformal_test": coverage_summary(test_sets, test.labels.tolist(), test.subgroups),
        "ood_test": {
            "n": len(test_flags),
            "false_flag_rate": false_flag_rate(test_flags),
            "threshold": detector.threshold_,
        },
        "similar_test": {
            "k": SIMILAR_K,
            "precision_at_k": precision_at_k(
                index, test.embeddings, [classes[int(y)] for y in test.labels], SIMILAR_K
            ),
            # what picking training studies at random would give
            "chance": float(np.sum(label_counts**2)),
        },
    }
    return Trust(points, conformal, index, detector, report)


def saliency_checks(
    model: torch.nn.Module,
    images: Sequence[torch.Tensor],
    targets: Sequence[int],
    precision: str = "fp32",
) -> dict[str, Any]:
    """The Adebayo / Petsiuk checks (:func:`workbench.explain.sanity_checks`) on a few test
    images, for the bundle and the app."""
    if not images:
        return {}
    return {
        "n_images": len(images),
        "methods": sanity_checks(model, images, targets, precision=precision, ig_steps=16),
    }
