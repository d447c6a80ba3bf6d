"""Compare two model bundles on the same locked test split: is NEW at least as good as OLD?

Both bundles run a plain forward pass (no saliency, nothing stored) over the test split of one
cohort, so the comparison does not depend on which predictions happen to be in the store. The
split is the cohort's stored patient-level split, the same for both models ("locked").

What it reports (one plain dict, written as JSON by the CLI)::

    auroc        macro AUROC of each model and NEW - OLD with a *paired* bootstrap CI: each
                 resample draws study indices once and scores both models on them, so the
                 interval reflects the models' difference, not the test set's luck
    flip_rate    share of studies whose top-1 label changes
    score_shift  per class and for the "finding" score (1 - p(negative class), or the top
                 probability without a negative class): means, mean shift, KS statistic
    threshold    per class: OLD's operating point (a stored threshold, else argmax) and its
                 sensitivity; the threshold on each model's probability that reaches that
                 sensitivity, and NEW's specificity there
    subgroups    per site, manufacturer, sex, age band and view: n, AUROC / accuracy of each
                 model, the difference and the flip rate (subgroups.py's grouping, as the report's)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workbench.catalog.cohorts import CohortItem, cohort_items
from workbench.catalog.ingest import CatalogError
from workbench.catalog.subgroups import (
    AGE_BANDS,
    UNKNOWN,
    age_band,
    manufacturers,
    view_group,
)
from workbench.config import Settings
from workbench.errors import WorkbenchError
from workbench.evaluation.jsonout import normalise
from workbench.metrics import bootstrap_ci, macro_auroc
from workbench.model.bundle import Bundle, load_bundle

DEFAULT_MARGIN = 0.02


class CompareError(WorkbenchError):
    """Two bundles that cannot be compared (different classes, no test split...)."""


@dataclass(frozen=True)
class Scored:
    """One model's calibrated probabilities on the compared studies, in a fixed order."""

    ref: str
    bundle_hash: str
    probs: np.ndarray  # (N, K) calibrated, rows sum to one


def locked_test_items(settings: Settings, cohort: str, classes: Sequence[str]) -> list[CohortItem]:
    """The labelled studies of the cohort's locked test split whose label the models know."""
    try:
        items = cohort_items(settings, cohort, "test")
    except CatalogError as err:
        raise CompareError(str(err).splitlines()[0]) from err
    usable = [i for i in items if i.label in classes and i.images]
    if not usable:
        raise CompareError(
            f"cohort {cohort!r} has no labelled test-split studies with the models' classes "
            f"(is the cohort split? `workbench train` splits it)"
        )
    return usable


def score(settings: Settings, bundle: Bundle, items: Sequence[CohortItem]) -> Scored:
    """Calibrated study-level probabilities of ``bundle`` on ``items`` (no saliency, not
    stored): the same forward pass and calibration that ``workbench predict`` uses."""
    from workbench.predict.inference import predict_study

    rows = []
    for item in items:
        pred = predict_study(settings, bundle, item, explain="none", precision=settings.precision)
        rows.append([pred.probabilities[c] for c in bundle.classes])
    return Scored(f"{bundle.name}/{bundle.version}", bundle.bundle_hash, np.asarray(rows))


def compare_bundles(
    settings: Settings,
    old: str,
    new: str,
    cohort: str,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Load both bundles, score the cohort's test split with each and compare (see module doc)."""
    from workbench.model.runtime import resolve_device

    device = resolve_device(settings.device)
    b_old = load_bundle(settings.models_dir, old, device)
    b_new = load_bundle(settings.models_dir, new, device)
    if b_old.classes != b_new.classes:
        raise CompareError(
            f"{old} and {new} have different classes ({', '.join(b_old.classes)} vs "
            f"{', '.join(b_new.classes)})"
        )
    items = locked_test_items(settings, cohort, b_old.classes)
    s_old, s_new = score(settings, b_old, items), score(settings, b_new, items)
    return compare_scores(
        settings,
        s_old,
        s_new,
        items,
        b_old.classes,
        b_old.negative_class,
        thresholds=_stored_thresholds(b_old.contract.thresholds, b_old.classes),
        cohort=cohort,
        n_resamples=n_resamples,
        seed=seed,
    )


def _stored_thresholds(
    raw: Mapping[str, float] | None, classes: Sequence[str]
) -> dict[str, float] | None:
    """Per-class operating thresholds if the bundle records them (class -> probability; the
    contract upgrades older bundles' ``operating_point``); None means argmax."""
    out = {c: float(raw[c]) for c in classes if raw and c in raw}
    return out or None


def compare_scores(
    settings: Settings,
    old: Scored,
    new: Scored,
    items: Sequence[CohortItem],
    classes: Sequence[str],
    negative_class: str | None,
    thresholds: dict[str, float] | None = None,
    cohort: str = "",
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The comparison dict from two models' probabilities on the same studies."""
    labels = np.asarray([list(classes).index(i.label or "") for i in items], dtype=np.int64)
    p_old, p_new = old.probs, new.probs
    n = len(items)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resamples and small groups miss classes: None
        auroc = _paired_auroc(p_old, p_new, labels, n_resamples, seed)
        subgroups = _subgroups(settings, items, p_old, p_new, labels)
    flips = p_old.argmax(axis=1) != p_new.argmax(axis=1)
    data: dict[str, Any] = {
        "compare_format": 1,
        "cohort": cohort,
        "split": "test",
        "n_studies": n,
        "n_patients": len({i.patient for i in items}),
        "classes": list(classes),
        "old": {"model": old.ref, "bundle_hash": old.bundle_hash},
        "new": {"model": new.ref, "bundle_hash": new.bundle_hash},
        "n_resamples": n_resamples,
        "seed": seed,
        "auroc": auroc,
        "accuracy": {
            "old": float((p_old.argmax(axis=1) == labels).mean()),
            "new": float((p_new.argmax(axis=1) == labels).mean()),
        },
        "flip_rate": float(flips.mean()),
        "n_flips": int(flips.sum()),
        "flipped_studies": sorted(i.study_key for i, f in zip(items, flips, strict=True) if f),
        "score_shift": _score_shift(p_old, p_new, classes, negative_class),
        "threshold": _threshold_shift(p_old, p_new, labels, classes, thresholds),
        "subgroups": subgroups,
    }
    return normalise(data)


def _auroc(p: np.ndarray, y: np.ndarray) -> float | None:
    try:
        v = macro_auroc(p, y)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _paired_auroc(
    p_old: np.ndarray, p_new: np.ndarray, labels: np.ndarray, n_resamples: int, seed: int
) -> dict[str, Any]:
    def stats(idx: np.ndarray) -> dict[str, float | None]:
        a, b = _auroc(p_old[idx], labels[idx]), _auroc(p_new[idx], labels[idx])
        return {"old": a, "new": b, "diff": None if a is None or b is None else b - a}

    point = stats(np.arange(len(labels)))
    cis = bootstrap_ci(stats, len(labels), n_resamples, seed)
    return {
        "old": point["old"],
        "new": point["new"],
        "diff": point["diff"],
        "old_ci": list(cis["old"]),
        "new_ci": list(cis["new"]),
        "diff_ci": list(cis["diff"]),
    }


def finding_score(probs: np.ndarray, classes: Sequence[str], negative: str | None) -> np.ndarray:
    """Probability of "something is there": 1 - p(negative class), or the top probability."""
    if negative is not None and negative in classes:
        k = list(classes).index(negative)
        return np.asarray(1.0 - probs[:, k])
    return probs.max(axis=1)


def _shift(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    from scipy.stats import ks_2samp

    ks = ks_2samp(a, b)
    return {
        "mean_old": float(a.mean()),
        "mean_new": float(b.mean()),
        "mean_shift": float(b.mean() - a.mean()),
        "mean_abs_change": float(np.abs(b - a).mean()),
        "ks_statistic": float(ks.statistic),
        "ks_pvalue": float(ks.pvalue),
    }


def _score_shift(
    p_old: np.ndarray, p_new: np.ndarray, classes: Sequence[str], negative: str | None
) -> dict[str, Any]:
    return {
        "finding": _shift(
            finding_score(p_old, classes, negative), finding_score(p_new, classes, negative)
        ),
        "finding_definition": f"1 - p({negative})" if negative in classes else "top probability",
        "per_class": {c: _shift(p_old[:, k], p_new[:, k]) for k, c in enumerate(classes)},
    }


def threshold_for_sensitivity(
    scores: np.ndarray, positive: np.ndarray, sens: float
) -> float | None:
    """The largest threshold t with mean(scores[positive] >= t) >= sens (None: no positives)."""
    pos = np.sort(scores[positive])[::-1]
    if not len(pos) or not math.isfinite(sens):
        return None
    m = max(1, math.ceil(sens * len(pos) - 1e-9))
    return float(pos[m - 1])


def _threshold_shift(
    p_old: np.ndarray,
    p_new: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    stored: dict[str, float] | None,
) -> dict[str, Any]:
    per_class: dict[str, Any] = {}
    for k, c in enumerate(classes):
        positive = labels == k
        if stored and c in stored:
            old_hit = p_old[:, k] >= stored[c]
            point = f"stored threshold {stored[c]:.4f}"
        else:
            old_hit = p_old.argmax(axis=1) == k
            point = "argmax"
        sens = float(old_hit[positive].mean()) if positive.any() else float("nan")
        t_old = threshold_for_sensitivity(p_old[:, k], positive, sens)
        t_new = threshold_for_sensitivity(p_new[:, k], positive, sens)
        spec_old = float((~old_hit[~positive]).mean()) if (~positive).any() else None
        spec_new = (
            float((p_new[~positive, k] < t_new).mean())
            if t_new is not None and (~positive).any()
            else None
        )
        per_class[c] = {
            "old_operating_point": point,
            "old_sensitivity": sens,
            "old_specificity": spec_old,
            "old_threshold": stored[c] if stored and c in stored else t_old,
            "new_threshold": t_new,
            "threshold_shift": None if t_new is None or t_old is None else t_new - t_old,
            "new_specificity_at_same_sensitivity": spec_new,
        }
    return {"stored_thresholds": stored is not None, "per_class": per_class}


def group_values(settings: Settings, items: Sequence[CohortItem]) -> dict[str, list[str]]:
    """Each subgroup attribute's value per item, in item order."""
    mans = manufacturers(settings, [i.study_id for i in items])
    return {
        "site": [i.site or UNKNOWN for i in items],
        "manufacturer": [mans.get(i.study_id, UNKNOWN) for i in items],
        "sex": [i.sex or UNKNOWN for i in items],
        "age_band": [age_band(i.age_years) for i in items],
        "view": [view_group(i.views) for i in items],
    }


def _subgroups(
    settings: Settings,
    items: Sequence[CohortItem],
    p_old: np.ndarray,
    p_new: np.ndarray,
    labels: np.ndarray,
) -> dict[str, Any]:
    order = [b[2] for b in AGE_BANDS] + [UNKNOWN]
    out: dict[str, Any] = {}
    for attr, values in group_values(settings, items).items():
        present = set(values)
        names = [g for g in order if g in present] if attr == "age_band" else sorted(present)
        rows = []
        for g in names:
            idx = np.asarray([v == g for v in values])
            y, a, b = labels[idx], p_old[idx], p_new[idx]
            au_a, au_b = _auroc(a, y), _auroc(b, y)
            rows.append(
                {
                    "group": g,
                    "n": int(idx.sum()),
                    "auroc_old": au_a,
                    "auroc_new": au_b,
                    "auroc_diff": None if au_a is None or au_b is None else au_b - au_a,
                    "accuracy_old": float((a.argmax(axis=1) == y).mean()),
                    "accuracy_new": float((b.argmax(axis=1) == y).mean()),
                    "flip_rate": float((a.argmax(axis=1) != b.argmax(axis=1)).mean()),
                }
            )
        out[attr] = rows
    return out


# --- printing ------------------------------------------------------------------------------


def _f(v: Any, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def format_table(data: dict[str, Any]) -> str:
    """A readable plain-text summary of a comparison dict."""
    a = data["auroc"]
    lo, hi = a["diff_ci"]
    lines = [
        f"{data['old']['model']} (OLD) vs {data['new']['model']} (NEW) on the test split of "
        f"{data['cohort']}: {data['n_studies']} studies of {data['n_patients']} patients",
        "",
        f"{'metric':34s} {'OLD':>8s} {'NEW':>8s} {'NEW-OLD':>8s}",
        f"{'macro AUROC':34s} {_f(a['old']):>8s} {_f(a['new']):>8s} {_f(a['diff'], True):>8s}"
        f"   paired 95% CI {_f(lo, True)} .. {_f(hi, True)}",
        f"{'accuracy':34s} {_f(data['accuracy']['old']):>8s} {_f(data['accuracy']['new']):>8s}"
        f" {_f(_sub(data['accuracy']['new'], data['accuracy']['old']), True):>8s}",
    ]
    fs = data["score_shift"]["finding"]
    lines.append(
        f"{'finding score mean (' + data['score_shift']['finding_definition'] + ')':34s} "
        f"{_f(fs['mean_old']):>8s} {_f(fs['mean_new']):>8s} {_f(fs['mean_shift'], True):>8s}"
        f"   KS {_f(fs['ks_statistic'])} (p {_f(fs['ks_pvalue'])})"
    )
    lines.append(f"top-1 flip rate: {_f(data['flip_rate'])} ({data['n_flips']} studies)")
    lines += ["", "operating threshold at OLD's sensitivity:"]
    for c, t in data["threshold"]["per_class"].items():
        lines.append(
            f"  {c:14s} sens {_f(t['old_sensitivity'])} ({t['old_operating_point']}): "
            f"threshold {_f(t['old_threshold'])} -> {_f(t['new_threshold'])} "
            f"(shift {_f(t['threshold_shift'], True)}); specificity "
            f"{_f(t['old_specificity'])} -> {_f(t['new_specificity_at_same_sensitivity'])}"
        )
    lines += ["", f"{'subgroup':28s} {'n':>4s} {'AUROC old':>9s} {'new':>7s} {'diff':>7s} "
              f"{'acc old':>7s} {'new':>6s} {'flips':>6s}"]  # fmt: skip
    for attr, rows in data["subgroups"].items():
        for r in rows:
            name = f"{attr}={r['group']}"[:28]
            lines.append(
                f"{name:28s} {r['n']:>4d} {_f(r['auroc_old']):>9s} {_f(r['auroc_new']):>7s} "
                f"{_f(r['auroc_diff'], True):>7s} {_f(r['accuracy_old']):>7s} "
                f"{_f(r['accuracy_new']):>6s} {_f(r['flip_rate']):>6s}"
            )
    return "\n".join(lines)


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b
