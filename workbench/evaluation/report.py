"""The consistency report: how well, how consistently and for whom a model works.

It reads the store (catalog, predictions, reviews) and the model bundle and nothing else: no
DICOM, no pixels, no forward pass. Everything it says is first computed into one plain dict
(``report.json``); the HTML and the PDF are rendered from that same dict by one Jinja2 template,
so every number a reader sees can be found, under a stable key, in the JSON::

    store + bundle ──▶ compute_report() ──▶ dict ──┬─▶ report.json (sorted keys, 6 decimals)
                                                   ├─▶ report.html (template, 3 decimals)
                                                   ├─▶ report.pdf  (WeasyPrint, same HTML)
                                                   └─▶ cases.csv   (one row per study)

A number in the HTML is rendered as ``<span class="num" data-key="performance.auroc_macro">``
where ``data-key`` is its path in the JSON (``render.key_path`` / ``render.lookup``). The
computing is here; the rendering in :mod:`workbench.evaluation.render`; a study is a
:class:`~workbench.evaluation.cases.Case`.

Only pseudonyms appear: study keys and patient pseudonyms, never UIDs, names or file paths.
Free-text review comments are left out on purpose (they may hold identifying text).
"""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from workbench.catalog.cohorts import CohortItem, cohort_hash, cohort_items
from workbench.catalog.ingest import CatalogError
from workbench.catalog.subgroups import (
    AGE_BANDS,
    SUBGROUP_ATTRS,
    UNKNOWN,
    age_band,
    manufacturers,
    view_group,
)
from workbench.config import Settings
from workbench.db.store import Prediction, Review, new_session
from workbench.errors import WorkbenchError
from workbench.evaluation.cases import Case
from workbench.evaluation.jsonout import dump_json, normalise
from workbench.evaluation.render import (
    make_plots,
    render_html,
    write_cases_csv,
    write_pdf,
)
from workbench.metrics import (
    brier_score,
    classification_metrics,
    expected_calibration_error,
    kappa,
    macro_auroc,
    reliability_curve,
)
from workbench.model.bundle import code_version
from workbench.model.bundle_info import BundleError, BundleInfo, read_bundle_info
from workbench.predict.results import latest_predictions

MIN_GROUP_SIZE = 20


# A perturbation that flips more than this share of top-1 labels is worth a warning.
RETEST_FLIP_WARN = 0.10


# (lower bound inclusive, upper bound exclusive, label); None is open.
# Recomputed vs recorded-at-training metrics on the same test split may differ by this much
# (forward passes in bf16 are not bit-identical between batch and per-study inference).
CONSISTENCY_TOLERANCE = 0.01


LIBRARIES = ("torch", "monai", "scikit-learn", "pydicom", "captum", "numpy", "workbench")


class ReportError(WorkbenchError):
    """A report that cannot be built (unknown model or cohort, nothing predicted...)."""


def build_report(
    settings: Settings,
    model: str,
    cohort: str,
    out: Path,
    n_resamples: int = 1000,
    seed: int = 0,
) -> list[Path]:
    """Write ``report.html``, ``report.pdf``, ``report.json`` and ``cases.csv`` into ``out``.

    Args:
        model: a bundle folder, ``NAME/VERSION`` or ``NAME`` (its latest version).
        cohort: the evaluated cohort; the model's own training cohort is evaluated on its test
            split only, any other cohort on all its labelled studies.
        n_resamples: bootstrap resamples for the 95% confidence intervals.
        seed: seed of the bootstrap.

    Returns the four paths in that order. Raises :class:`ReportError` with a one-line message.
    """
    try:
        bundle = read_bundle_info(settings.models_dir, model)  # metadata: no network built
    except BundleError as err:
        raise ReportError(str(err).splitlines()[0]) from err
    data, cases = compute_report(settings, bundle, cohort, n_resamples, seed)
    out.mkdir(parents=True, exist_ok=True)
    html_path, pdf_path = out / "report.html", out / "report.pdf"
    json_path, csv_path = out / "report.json", out / "cases.csv"
    html = render_html(data, make_plots(data, cases))
    html_path.write_text(html, encoding="utf-8")
    write_pdf(html, pdf_path, base_url=out)
    # The JSON leaves out the build time, so the same inputs give the same bytes; the HTML and
    # the PDF show it (they differ between builds only there).
    stable = {k: v for k, v in data.items() if k != "generated_at"}
    json_path.write_text(dump_json(stable), encoding="utf-8")
    write_cases_csv(csv_path, bundle.classes, cases)
    return [html_path, pdf_path, json_path, csv_path]


def compute_report(
    settings: Settings, bundle: BundleInfo, cohort: str, n_resamples: int = 1000, seed: int = 0
) -> tuple[dict[str, Any], list[Case]]:
    """Every number of the report, normalised (floats rounded, NaN as None), and the cases."""
    wb = bundle.contract
    classes = bundle.classes
    try:
        items = cohort_items(settings, cohort)
    except CatalogError as err:
        raise ReportError(str(err).splitlines()[0]) from err
    if not items:
        raise ReportError(f"cohort {cohort!r} has no studies")

    training_cohort = wb.cohort
    is_training = cohort == training_cohort
    if is_training:
        scope = "test split of the training cohort"
        candidates = [i for i in items if i.split == "test"]
    else:
        scope = "all labelled studies"
        candidates = [i for i in items if i.label]
    unlabelled = sum(1 for i in candidates if not i.label)
    foreign = sorted({i.label for i in candidates if i.label and i.label not in classes})
    evaluable = [i for i in candidates if i.label in classes]
    excluded_foreign = sum(1 for i in candidates if i.label and i.label not in classes)
    if not evaluable:
        raise ReportError(
            f"cohort {cohort!r} has no labelled studies in the {scope} with one of the "
            f"model's classes"
        )

    preds = latest_predictions(settings, bundle.bundle_hash, [i.study_id for i in evaluable])
    if not preds:
        raise ReportError(
            f"model {bundle.name} {bundle.version} has no stored predictions for the "
            f"{len(evaluable)} evaluated studies of cohort {cohort!r} ({scope}); "
            f"run `workbench predict` first"
        )
    # a study the model refused (input it cannot take: no scores) is not evaluated; the OOD
    # section counts it
    evaluated = [i for i in evaluable if i.study_id in preds and preds[i.study_id].probabilities]
    reviews = _latest_reviews(settings, bundle.bundle_hash, [i.study_id for i in evaluated])
    makers = manufacturers(settings, [i.study_id for i in evaluated])
    cases = [
        _case(i, preds[i.study_id], classes, reviews.get(i.study_id, {}), makers) for i in evaluated
    ]

    probs = np.asarray([c.probabilities for c in cases], dtype=np.float64)
    raw = np.asarray([c.raw_probabilities for c in cases], dtype=np.float64)
    labels = np.asarray([c.label_index for c in cases], dtype=np.int64)

    with warnings.catch_warnings():
        # Bootstrap resamples and small subgroups miss classes; those values become None.
        warnings.simplefilter("ignore")
        performance = _performance(probs, labels, classes, n_resamples, seed)
        recorded = wb.test_metrics
        performance["bundle_recorded"] = {k: recorded.get(k) for k in ("accuracy", "auroc_macro")}
        subgroups = _subgroups(cases, probs, labels, performance, n_resamples, seed)
        conformal = _conformal(bundle, cases, probs, labels)
    missing = len(evaluable) - len(evaluated)
    data: dict[str, Any] = {
        "report_format": 1,
        "generated_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lineage": _lineage(settings, bundle, cohort, items, is_training, cases),
        "evaluation": {
            "cohort": cohort,
            "is_training_cohort": is_training,
            "scope": scope,
            "n_cohort_studies": len(items),
            "n_candidates": len(candidates),
            "n_unlabelled": unlabelled,
            "n_foreign_label": excluded_foreign,
            "foreign_labels": foreign,
            "n_evaluable": len(evaluable),
            "n_missing_prediction": missing,
            "n_studies": len(cases),
            "n_patients": len({c.patient for c in cases}),
            "n_resamples": n_resamples,
            "seed": seed,
        },
        "performance": performance,
        "calibration": _calibration(bundle, probs, raw, labels, cases),
        "subgroups": subgroups,
        "reader_agreement": _reader_agreement(cases),
        "conformal": conformal,
        "ood": _ood(bundle, cases),
        "test_retest": _test_retest(bundle, cohort),
    }
    data["consistency"] = _consistency(data) if is_training else {"checked": False}
    data["warnings"] = _warnings(data)
    return normalise(data), cases


def _case(
    item: CohortItem,
    pred: Prediction,
    classes: Sequence[str],
    reviews: Mapping[str, str],
    makers: Mapping[int, str] | None = None,
) -> Case:
    assert item.label is not None
    try:
        probs = tuple(float(pred.probabilities[c]) for c in classes)
        raw = tuple(float(pred.raw_probabilities[c]) for c in classes)
    except KeyError as err:
        raise ReportError(
            f"prediction for study {item.study_key} lacks class {err.args[0]!r}"
        ) from err
    return Case(
        study_key=item.study_key,
        patient=item.patient,
        split=item.split,
        site=item.site or UNKNOWN,
        sex=item.sex or UNKNOWN,
        age_band=age_band(item.age_years),
        label=item.label,
        label_index=list(classes).index(item.label),
        predicted_label=pred.predicted_label,
        probabilities=probs,
        raw_probabilities=raw,
        pixel_hashes=tuple(pred.pixel_hashes),
        pixels_changed=tuple(pred.pixel_hashes) != tuple(item.pixel_hashes),
        transform_hash=pred.transform_hash,
        code_version=pred.code_version,
        reviews=tuple(sorted(reviews.items())),
        ood=ood_flag(pred),
        manufacturer=(makers or {}).get(item.study_id, UNKNOWN),
        view=view_group(item.views),
        calibration_map=pred.calibration_map,
    )


def ood_flag(pred: Prediction) -> bool | None:
    """Whether a stored prediction was flagged out-of-distribution; None when the bundle that
    made it ships no detector (see :mod:`workbench.predict.trust`)."""
    return pred.ood_flag


def _latest_reviews(
    settings: Settings, bundle_hash: str, study_ids: Sequence[int]
) -> dict[int, dict[str, str]]:
    """study id → reviewer → label of that reviewer's latest review (their current version) of
    this bundle's predictions of the study. Adjudications are not reads and are left out."""
    out: dict[int, dict[str, str]] = defaultdict(dict)
    if not study_ids:
        return out
    with new_session(settings.database_url) as session:
        q = (
            select(Review.study_id, Review.reviewer, Review.label)
            .join(Prediction, Prediction.id == Review.prediction_id)
            .where(
                Prediction.bundle_hash == bundle_hash,
                Review.study_id.in_(list(study_ids)),
                Review.kind == "read",
            )
            .order_by(Review.created_at, Review.id)
        )
        for study_id, reviewer, label in session.execute(q):
            out[study_id][reviewer] = label  # later rows overwrite earlier ones
    return out


def _lineage(
    settings: Settings,
    bundle: BundleInfo,
    cohort: str,
    items: Sequence[CohortItem],
    is_training: bool,
    cases: Sequence[Case],
) -> dict[str, Any]:
    wb = bundle.contract
    digest = hashlib.sha256()
    for c in sorted(cases, key=lambda c: c.study_key):
        digest.update(f"{c.study_key}|{','.join(c.pixel_hashes)}\n".encode())
    current_hash = cohort_hash(items)
    recorded_hash = wb.cohort_hash
    run = wb.run
    return {
        "model": {
            "name": bundle.name,
            "version": bundle.version,
            "bundle_hash": bundle.bundle_hash,
            "code_version": wb.code_version,
            "created": wb.created,
            "architecture": wb.architecture,
            "classes": list(bundle.classes),
            "image_size": wb.image_size,
            "spatial_dims": wb.spatial_dims,
            "transform_hash": wb.transform_hash,
            "calibration_method": wb.calibration_method,
            "best_epoch": run.best_epoch,
            "epochs": run.epochs,
        },
        "training_cohort": {
            "name": wb.cohort,
            "cohort_hash": recorded_hash,
            "split_seed": wb.split_seed,
            "split_studies": wb.split_studies,
            "label_sources": wb.label_sources,
        },
        "evaluated_cohort": {
            "name": cohort,
            "cohort_hash": current_hash,
            "matches_training_hash": (current_hash == recorded_hash) if is_training else None,
            "pixel_digest": digest.hexdigest(),
            "n_studies": len(cases),
            "n_patients": len({c.patient for c in cases}),
        },
        "predictions": {
            "code_versions": sorted({c.code_version for c in cases}),
            "transform_hashes": sorted({c.transform_hash for c in cases}),
            "n_transform_mismatch": sum(1 for c in cases if c.transform_hash != wb.transform_hash),
            "n_pixels_changed": sum(1 for c in cases if c.pixels_changed),
        },
        "report_code_version": code_version(),
        "libraries": library_versions(),
    }


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries behind the numbers (read from package metadata,
    so nothing heavy is imported)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _performance(
    probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], n_resamples: int, seed: int
) -> dict[str, Any]:
    from sklearn.metrics import top_k_accuracy_score

    m = classification_metrics(probs, labels, classes, n_resamples=n_resamples, seed=seed)
    # Top-k with k = number of classes is trivially 1; show the largest informative k (<= 5).
    k = len(classes)
    top_k = min(5, k - 1)
    top_k_acc = (
        float(top_k_accuracy_score(labels, probs, k=top_k, labels=range(k))) if top_k > 1 else None
    )
    return {
        "classes": list(classes),
        "n": m["n"],
        "accuracy": m["accuracy"],
        "accuracy_ci": list(m["accuracy_ci"]),
        "top1": m["top1"],
        "top_k": top_k,
        "top_k_accuracy": top_k_acc,
        "log_loss": m["log_loss"],
        "auroc_macro": m["auroc_macro"],
        "auroc_macro_ci": list(m["auroc_macro_ci"]),
        "per_class": {
            c: {
                "n": v["n"],
                "auroc": v["auroc"],
                "auroc_ci": list(v["auroc_ci"]),
                "sensitivity": v["sensitivity"],
                "sensitivity_ci": list(v["sensitivity_ci"]),
                "specificity": v["specificity"],
                "specificity_ci": list(v["specificity_ci"]),
            }
            for c, v in m["per_class"].items()
        },
        "confusion_matrix": m["confusion_matrix"],
        "operating_point": "argmax of the calibrated probabilities",
    }


def _calibration(
    bundle: BundleInfo,
    probs: np.ndarray,
    raw: np.ndarray,
    labels: np.ndarray,
    cases: Sequence[Case] = (),
) -> dict[str, Any]:
    before = reliability_curve(raw, labels)
    after = reliability_curve(probs, labels)
    recorded = bundle.contract.test_metrics
    # Which map calibrated the studies: "global", or a site's own (train --calibrate-per-site)
    maps = Counter(c.calibration_map or "not recorded" for c in cases)
    return {
        "method": bundle.contract.calibration_method,
        "per_site": bool(bundle.contract.site_calibration),
        "maps": dict(sorted(maps.items())),
        "ece_before": expected_calibration_error(raw, labels),
        "ece_after": expected_calibration_error(probs, labels),
        "brier_before": brier_score(raw, labels),
        "brier_after": brier_score(probs, labels),
        "reliability_before": before,
        "reliability_after": after,
        "bundle_recorded": {k: recorded.get(k) for k in ("ece_before", "ece_after")},
        # The training-time check of the shipped calibration (None: fine, or an old bundle).
        "warning": bundle.contract.calibration_warning,
    }


def _auroc_or_none(probs: np.ndarray, labels: np.ndarray) -> float | None:
    try:
        return macro_auroc(probs, labels)
    except ValueError:
        return None


def _group_metrics(
    probs: np.ndarray, labels: np.ndarray, n_resamples: int = 0, seed: int = 0
) -> dict[str, Any]:
    """n, accuracy, macro AUROC and (with ``n_resamples``) their bootstrap 95% CIs.

    The AUROC interval is left out (None) for small groups: a few hundred AUROCs of a
    handful of studies cost time and say nothing the "small" mark does not."""
    from workbench.metrics import bootstrap_ci

    n = len(labels)
    small = n < MIN_GROUP_SIZE
    out: dict[str, Any] = {
        "n": n,
        "accuracy": float((probs.argmax(axis=1) == labels).mean()) if n else None,
        "auroc_macro": _auroc_or_none(probs, labels),
        "small": small,
        "accuracy_ci": [None, None],
        "auroc_macro_ci": [None, None],
    }
    if n_resamples and n:
        hit = (probs.argmax(axis=1) == labels).astype(np.float64)

        def stats(idx: np.ndarray) -> dict[str, float | None]:
            row: dict[str, float | None] = {"accuracy": float(hit[idx].mean())}
            if not small:
                row["auroc_macro"] = _auroc_or_none(probs[idx], labels[idx])
            return row

        cis = bootstrap_ci(stats, n, n_resamples, seed)
        out["accuracy_ci"] = list(cis["accuracy"])
        if "auroc_macro" in cis:
            out["auroc_macro_ci"] = list(cis["auroc_macro"])
    return out


def _outside(ci: Sequence[float | None], value: float | None) -> str | None:
    """ "below" / "above" when the interval excludes ``value``, else None."""
    lo, hi = ci
    if value is None or lo is None or hi is None:
        return None
    if hi < value:
        return "below"
    if lo > value:
        return "above"
    return None


def _subgroups(
    cases: Sequence[Case],
    probs: np.ndarray,
    labels: np.ndarray,
    overall: Mapping[str, Any] | None = None,
    n_resamples: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics per site, sex and age band; a group is flagged when it is small or when its
    95% CI of accuracy or macro AUROC excludes the overall value."""
    order = {"age_band": [b[2] for b in AGE_BANDS] + [UNKNOWN]}
    out: dict[str, Any] = {"min_group_size": MIN_GROUP_SIZE, "flagged": []}
    for attr, _ in SUBGROUP_ATTRS:
        values = [getattr(c, attr) for c in cases]
        present = set(values)
        names = [g for g in order[attr] if g in present] if attr in order else sorted(present)
        rows = []
        for g in names:
            idx = np.asarray([v == g for v in values])
            row = {"group": g, **_group_metrics(probs[idx], labels[idx], n_resamples, seed)}
            row["excludes_overall"] = {
                metric: _outside(row[f"{metric}_ci"], (overall or {}).get(metric))
                for metric in ("accuracy", "auroc_macro")
            }
            differs = [m for m, side in row["excludes_overall"].items() if side]
            if differs:
                out["flagged"].append(
                    {
                        "attribute": attr,
                        "group": g,
                        "metrics": differs,
                        "sides": [row["excludes_overall"][m] for m in differs],
                    }
                )
            rows.append(row)
        out[attr] = rows
    return out


def _conformal(
    bundle: BundleInfo, cases: Sequence[Case], probs: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    """Empirical coverage of the bundle's conformal prediction sets, overall and per
    subgroup, recomputed from the stored calibrated probabilities (the sets are a function
    of them, the threshold and the study key). Absent when the bundle has no conformal
    predictor, or one this report cannot read."""
    from workbench.posthoc.conformal import ConformalSets, coverage_summary, study_uniform

    raw = bundle.contract.conformal_record
    if not isinstance(raw, Mapping):
        return {"available": False}
    if "per_label" in raw:
        return {"available": False, "reason": "per-label sets: see the bundle's trust report"}
    try:
        predictor = ConformalSets.from_dict(raw)
    except (KeyError, TypeError, ValueError):
        return {"available": False, "reason": "the bundle's conformal entry is not readable"}
    u = np.asarray([study_uniform(c.study_key) for c in cases])
    sets = predictor.apply(probs, u if predictor.randomized else None)
    groups = {attr: [getattr(c, attr) for c in cases] for attr, _ in SUBGROUP_ATTRS}
    summary = coverage_summary(sets, labels.tolist(), groups)
    return {
        "available": True,
        "method": predictor.method,
        "target_coverage": predictor.coverage,
        "n": summary["n"],
        "coverage": summary["coverage"],
        "mean_set_size": summary["mean_set_size"],
        "subgroups": {
            attr: [{"group": g, **v} for g, v in rows.items()]
            for attr, rows in summary["subgroups"].items()
        },
    }


def _ood(bundle: BundleInfo, cases: Sequence[Case]) -> dict[str, Any]:
    """Share of evaluated studies flagged out-of-distribution, overall and per subgroup,
    where the stored predictions carry a flag."""
    has_detector = bundle.contract.has_ood_detector
    known = [c for c in cases if c.ood is not None]
    if not known:
        return {"available": False, "bundle_has_detector": has_detector}
    out: dict[str, Any] = {
        "available": True,
        "bundle_has_detector": has_detector,
        "n": len(known),
        "n_flagged": sum(1 for c in known if c.ood),
        "rate": sum(1 for c in known if c.ood) / len(known),
        "subgroups": {},
    }
    for attr, _ in SUBGROUP_ATTRS:
        by: dict[str, list[bool]] = defaultdict(list)
        for c in known:
            by[getattr(c, attr)].append(bool(c.ood))
        out["subgroups"][attr] = [
            {"group": g, "n": len(v), "n_flagged": sum(v), "rate": sum(v) / len(v)}
            for g, v in sorted(by.items())
        ]
    return out


def _test_retest(bundle: BundleInfo, cohort: str) -> dict[str, Any]:
    """The stored test-retest results (``workbench report --retest`` computes them), marked
    stale when they were computed for other weights or metadata than the bundle's now."""
    from workbench.evaluation.consistency import read_retest

    found = read_retest(bundle.path, cohort)
    if found is None:
        return {"available": False}
    out = {k: v for k, v in found.items() if k != "code_version"}
    out["available"] = True
    out["matches_bundle"] = found.get("bundle_hash") == bundle.bundle_hash
    out["retest_code_version"] = found.get("code_version")
    return out


def _reader_agreement(cases: Sequence[Case]) -> dict[str, Any]:
    by_reviewer: dict[str, list[Case]] = defaultdict(list)
    pairs_model: list[str] = []
    pairs_reader: list[str] = []
    disagreements = []
    for c in cases:
        for reviewer, label in c.reviews:
            by_reviewer[reviewer].append(c)
            pairs_model.append(c.predicted_label)
            pairs_reader.append(label)
            if label != c.predicted_label:
                disagreements.append(
                    {
                        "study_key": c.study_key,
                        "reviewer": reviewer,
                        "model_label": c.predicted_label,
                        "reviewer_label": label,
                        "reference_label": c.label,
                    }
                )
    readers = []
    for reviewer in sorted(by_reviewer):
        cs = by_reviewer[reviewer]
        rl = [dict(c.reviews)[reviewer] for c in cs]
        ml = [c.predicted_label for c in cs]
        readers.append(
            {
                "reviewer": reviewer,
                "n": len(cs),
                "agreement": sum(a == b for a, b in zip(ml, rl, strict=True)) / len(cs),
                "kappa": kappa(ml, rl),
                "reader_accuracy": sum(c.label == r for c, r in zip(cs, rl, strict=True)) / len(cs),
            }
        )
    n = len(pairs_model)
    return {
        "has_reviews": n > 0,
        "n_reviews": n,
        "n_reviewed_studies": sum(1 for c in cases if c.reviews),
        "n_reviewers": len(readers),
        "agreement": (sum(a == b for a, b in zip(pairs_model, pairs_reader, strict=True)) / n)
        if n
        else None,
        "kappa": kappa(pairs_model, pairs_reader) if n else None,
        "readers": readers,
        "disagreements": sorted(disagreements, key=lambda d: (d["study_key"], d["reviewer"])),
    }


def _consistency(data: Mapping[str, Any]) -> dict[str, Any]:
    """On the training cohort's test split the stored predictions should reproduce the
    metrics the bundle recorded at training time; list those that do not."""
    pairs = {
        "accuracy": (data["performance"]["accuracy"], data["performance"]["bundle_recorded"]),
        "auroc_macro": (data["performance"]["auroc_macro"], data["performance"]["bundle_recorded"]),
        "ece_before": (data["calibration"]["ece_before"], data["calibration"]["bundle_recorded"]),
        "ece_after": (data["calibration"]["ece_after"], data["calibration"]["bundle_recorded"]),
    }
    mismatches = [
        name
        for name, (value, recorded) in pairs.items()
        if value is not None
        and recorded.get(name) is not None
        and abs(value - recorded[name]) > CONSISTENCY_TOLERANCE
    ]
    return {"checked": True, "tolerance": CONSISTENCY_TOLERANCE, "mismatches": mismatches}


def _warnings(data: Mapping[str, Any]) -> list[str]:
    ev, lin = data["evaluation"], data["lineage"]
    out = []
    if ev["n_missing_prediction"]:
        out.append(
            f"{ev['n_missing_prediction']} of {ev['n_evaluable']} evaluable studies have no "
            f"stored prediction by this model and are not counted."
        )
    if ev["n_foreign_label"]:
        out.append(
            f"{ev['n_foreign_label']} studies carry labels the model does not know "
            f"({', '.join(ev['foreign_labels'])}) and are not counted."
        )
    if data.get("calibration", {}).get("warning"):
        out.append(f"Training found the {data['calibration']['warning']}.")
    if lin["evaluated_cohort"]["matches_training_hash"] is False:
        out.append("The training cohort has changed since the model was trained.")
    if lin["predictions"]["n_pixels_changed"]:
        out.append(
            f"{lin['predictions']['n_pixels_changed']} studies' pixels changed in the catalog "
            f"since they were predicted."
        )
    if lin["predictions"]["n_transform_mismatch"]:
        out.append(
            f"{lin['predictions']['n_transform_mismatch']} predictions used a transform other "
            f"than the bundle's."
        )
    if data["consistency"].get("mismatches"):
        out.append(
            "Recomputed from the stored predictions, "
            + ", ".join(data["consistency"]["mismatches"])
            + " differ from the values recorded in the bundle at training time on the same "
            "test split (both are shown below)."
        )
    if ev["n_studies"] < MIN_GROUP_SIZE:
        out.append(f"Only {ev['n_studies']} studies are evaluated: confidence intervals are wide.")
    sub = data["subgroups"]
    for f in sub.get("flagged", []):
        metrics = " and ".join(
            f"{'macro AUROC' if m == 'auroc_macro' else m} ({side})"
            for m, side in zip(f["metrics"], f["sides"], strict=True)
        )
        out.append(
            f"Subgroup {f['attribute']} = {f['group']}: the 95% interval of its {metrics} "
            f"excludes the overall value (see Subgroups)."
        )
    small = [
        f"{attr} = {r['group']}"
        for attr, _ in SUBGROUP_ATTRS
        for r in sub.get(attr, [])
        if r["small"]
    ]
    if small and ev["n_studies"] >= MIN_GROUP_SIZE:
        out.append(
            f"{len(small)} subgroups have fewer than {MIN_GROUP_SIZE} studies: "
            + ", ".join(small)
            + "."
        )
    rt = data.get("test_retest", {})
    if rt.get("available"):
        if not rt.get("matches_bundle"):
            out.append("The test-retest results were computed for another version of this bundle.")
        rep_ = rt.get("repeat", {})
        if rep_.get("n_flips") or rep_.get("max_abs_probability_change"):
            out.append(
                "Predicting the same study twice did not give the same probabilities: "
                "inference is not deterministic."
            )
        for r in rt.get("perturbations", []):
            if r["flip_rate"] > RETEST_FLIP_WARN:
                out.append(
                    f"A small acquisition change ({r['name']}) flips the top-1 label of "
                    f"{r['n_flips']} of {r['n']} studies."
                )
    return out
