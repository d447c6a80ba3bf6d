"""Classification metrics with bootstrap confidence intervals (scikit-learn underneath)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    log_loss,
    roc_auc_score,
    top_k_accuracy_score,
)


def _safe(fn: Callable[..., float], *args: Any, **kwargs: Any) -> float | None:
    """The metric, or None where it is undefined (e.g. one class only in a subgroup)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            value = float(fn(*args, **kwargs))
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def auroc_per_class(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict:
    """One-vs-rest AUROC per class; None where a class is absent or alone."""
    return {c: _safe(roc_auc_score, labels == k, probs[:, k]) for k, c in enumerate(classes)}


def macro_auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    k = probs.shape[1]
    if k == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=range(k)))


def bootstrap_ci(
    statistics: Callable[[np.ndarray], dict[str, float | None]],
    n: int,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float | None, float | None]]:
    """Percentile bootstrap CIs of several statistics over ``n`` paired cases, one resampling.

    ``statistics(indices)`` returns named values for a resample. Hand-written rather than
    ``scipy.stats.bootstrap`` because AUROC is undefined on resamples that miss a class: such a
    value is skipped instead of failing the interval (an interval needs half the resamples).
    """
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        for key, v in statistics(idx).items():
            if v is not None and np.isfinite(v):
                values.setdefault(key, []).append(float(v))
    alpha = (1 - level) / 2
    out: dict[str, tuple[float | None, float | None]] = {}
    for key in statistics(np.arange(n)):
        vals = values.get(key, [])
        if len(vals) < n_resamples // 2:
            out[key] = (None, None)
        else:
            lo, hi = np.quantile(vals, [alpha, 1 - alpha])
            out[key] = (float(lo), float(hi))
    return out


def sensitivity_specificity(pred: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, float]:
    """One-vs-rest sensitivity and specificity of class k at the operating point ``pred``."""
    pos, hit = labels == k, pred == k
    sens = float(hit[pos].mean()) if pos.any() else float("nan")
    spec = float((~hit[~pos]).mean()) if (~pos).any() else float("nan")
    return sens, spec


def classification_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy, top-1 / top-k, AUROC (macro and per class) with 95% CIs, sensitivity and
    specificity at the argmax operating point, log loss and the confusion matrix.

    probs: (N, K) rows summing to one; labels: (N,) class indices.
    """
    labels = np.asarray(labels)
    k = len(classes)
    pred = probs.argmax(axis=1)
    n = len(labels)
    top_k = min(5, k)
    out: dict[str, Any] = {
        "n": int(n),
        "accuracy": float(accuracy_score(labels, pred)),
        "top1": float(accuracy_score(labels, pred)),
        "top_k": top_k,
        f"top{top_k}": _safe(lambda: top_k_accuracy_score(labels, probs, k=top_k, labels=range(k))),
        "log_loss": _safe(lambda: log_loss(labels, probs, labels=range(k))),
        "auroc_macro": _safe(lambda: macro_auroc(probs, labels)),
        "confusion_matrix": confusion_matrix(labels, pred, labels=range(k)).tolist(),
        "per_class": {},
    }

    def stats(i: np.ndarray) -> dict[str, float | None]:
        p, y, yhat = probs[i], labels[i], pred[i]
        row: dict[str, float | None] = {
            "auroc_macro": _safe(macro_auroc, p, y),
            "accuracy": float((yhat == y).mean()),
        }
        for j, c in enumerate(classes):
            sens, spec = sensitivity_specificity(yhat, y, j)
            row[f"{c}.auroc"] = _safe(roc_auc_score, y == j, p[:, j])
            row[f"{c}.sensitivity"], row[f"{c}.specificity"] = sens, spec
        return row

    cis = bootstrap_ci(stats, n, n_resamples, seed)
    out["auroc_macro_ci"] = cis["auroc_macro"]
    out["accuracy_ci"] = cis["accuracy"]
    aurocs = auroc_per_class(probs, labels, classes)
    for j, c in enumerate(classes):
        sens, spec = sensitivity_specificity(pred, labels, j)
        out["per_class"][c] = {
            "n": int((labels == j).sum()),
            "auroc": aurocs[c],
            "auroc_ci": cis[f"{c}.auroc"],
            "sensitivity": sens,
            "sensitivity_ci": cis[f"{c}.sensitivity"],
            "specificity": spec,
            "specificity_ci": cis[f"{c}.specificity"],
        }
    return out


def kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa between two raters; None with fewer than two cases."""
    if len(a) < 2:
        return None
    return _safe(cohen_kappa_score, list(a), list(b))


def label_metrics(
    probs: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    thresholds: Sequence[float],
    exclusive: bool,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of K sigmoid outputs (one-vs-rest or multi-label), per label and macro.

    probs: (N, K) independent probabilities; targets: (N, K) 0/1. Per label: AUROC with a 95%
    CI, sensitivity and specificity at its threshold, prevalence. ``accuracy`` is the argmax
    accuracy for mutually ``exclusive`` classes (one-vs-rest), else the exact-match ratio (every
    label of a study right at its threshold); ``auroc_macro`` is the mean of defined AUROCs.
    """
    y = np.asarray(targets).astype(np.int64)
    n = len(y)
    t = np.asarray(thresholds, dtype=np.float64)
    hit = probs >= t[None, :]  # (N, K) decisions

    def accuracy(i: np.ndarray) -> float:
        if exclusive:
            return float((probs[i].argmax(axis=1) == y[i].argmax(axis=1)).mean())
        return float((hit[i] == (y[i] == 1)).all(axis=1).mean())

    def macro(i: np.ndarray) -> float | None:
        vals = [_safe(roc_auc_score, y[i, j], probs[i, j]) for j in range(len(classes))]
        defined = [v for v in vals if v is not None]
        return float(np.mean(defined)) if defined else None

    def stats(i: np.ndarray) -> dict[str, float | None]:
        row: dict[str, float | None] = {"auroc_macro": macro(i), "accuracy": accuracy(i)}
        for j, c in enumerate(classes):
            row[f"{c}.auroc"] = _safe(roc_auc_score, y[i, j], probs[i, j])
        return row

    cis = bootstrap_ci(stats, n, n_resamples, seed)
    out: dict[str, Any] = {
        "n": int(n),
        "accuracy": accuracy(np.arange(n)),
        "accuracy_ci": cis["accuracy"],
        "auroc_macro": macro(np.arange(n)),
        "auroc_macro_ci": cis["auroc_macro"],
        "hamming_loss": float((hit != (y == 1)).mean()) if n else None,
        "per_class": {},
    }
    for j, c in enumerate(classes):
        pos = y[:, j] == 1
        out["per_class"][c] = {
            "n": int(pos.sum()),
            "prevalence": float(pos.mean()) if n else None,
            "auroc": _safe(roc_auc_score, y[:, j], probs[:, j]),
            "auroc_ci": cis[f"{c}.auroc"],
            "threshold": float(t[j]),
            "sensitivity": float(hit[pos, j].mean()) if pos.any() else None,
            "specificity": float((~hit[~pos, j]).mean()) if (~pos).any() else None,
        }
    return out
