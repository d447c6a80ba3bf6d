"""What the app reads from the store and the model bundles; reviews (the app's one write) come
from :mod:`workbench.reviews` and are re-exported here for the pages.

Pages get plain frozen records, never ORM objects: nothing lazy-loads after its session closed,
and nothing here carries a UID or a file path, only study keys and pseudonyms. No Streamlit in
this module, so every function is usable (and testable) without a running app.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import distinct, func, select

from workbench.bundle import version_number
from workbench.config import Settings
from workbench.inference import latest_predictions

# Reviews live in workbench.reviews; the pages reach them through this module.
from workbench.reviews import (  # noqa: F401
    ADJUDICATE_ACTION,
    REVIEW_ACTION,
    REVISE_ACTION,
    Dispute,
    ReviewError,
    ReviewRecord,
    ReviewStatus,
    current_reads,
    disputes,
    other_readers,
    review_status,
    reviews_for,
    save_review,
)
from workbench.store import (
    Cohort,
    CohortMember,
    Prediction,
    Study,
    new_session,
    record_audit,
    session_scope,
)

REPORT_ACTION = "report.build"
UNASSIGNED = "unassigned"


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A model (one bundle) that has stored predictions."""

    name: str
    version: str
    bundle_hash: str
    studies: int
    newest: datetime

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class WorklistRow:
    prediction_id: int
    study_key: str
    site: str | None
    modality: str | None
    predicted_label: str
    top_finding: str
    priority: float  # calibrated probability of the most probable finding
    top_k: tuple[tuple[str, float], ...]
    status: ReviewStatus


@dataclass(frozen=True)
class ImageRef:
    """One image of a prediction: where its cached display pixels and saliency map are."""

    view: str
    cache_key: str
    saliency_file: str | None  # relative to the cache folder
    saliency_target: str | None
    probabilities: dict[str, float]


@dataclass(frozen=True)
class PredictionDetail:
    prediction_id: int
    study_key: str
    patient_pseudonym: str
    site: str | None
    modality: str | None
    age_years: int | None
    model_name: str
    model_version: str
    bundle_hash: str
    classes: tuple[str, ...]
    probabilities: dict[str, float]  # calibrated, study level
    predicted_label: str
    top_finding: str
    priority: float
    top_k: tuple[tuple[str, float], ...]
    images: tuple[ImageRef, ...]
    explain_method: str | None
    created_at: datetime


@dataclass(frozen=True)
class CohortSummary:
    name: str
    created_at: datetime
    split_seed: int | None
    split_fractions: tuple[float, ...] | None
    studies: int
    patients: int
    # (split, label) -> number of studies; split "unassigned" before the cohort is split
    counts: dict[tuple[str, str], int]
    patients_per_split: dict[str, int]


# --- reads -----------------------------------------------------------------------------------


def _top_finding(probabilities: dict[str, float], priority: float, target: str | None) -> str:
    """The finding whose calibrated probability is the priority (the explained class if any)."""
    if target and target in probabilities:
        return target
    return min(probabilities, key=lambda c: abs(probabilities[c] - priority))


def list_models(settings: Settings) -> list[ModelRef]:
    """Models with stored predictions, the most recently used first."""
    with new_session(settings.database_url) as session:
        rows = session.execute(
            select(
                Prediction.model_name,
                Prediction.model_version,
                Prediction.bundle_hash,
                func.count(distinct(Prediction.study_id)),
                func.max(Prediction.created_at),
            ).group_by(Prediction.model_name, Prediction.model_version, Prediction.bundle_hash)
        ).all()
    models = [ModelRef(n, v, h, int(c), t) for n, v, h, c, t in rows]
    return sorted(models, key=lambda m: (m.newest, version_number(m.version)), reverse=True)


def worklist(settings: Settings, bundle_hash: str, viewer: str | None = None) -> list[WorklistRow]:
    """The newest prediction per study of one model, highest priority first.

    With ``viewer`` the statuses are as that (blinded) reader may see them.
    """
    preds = latest_predictions(settings, bundle_hash)
    with new_session(settings.database_url) as session:
        reviews = current_reads(session, [p.id for p in preds.values()])
    rows = []
    for p in preds.values():
        target = next((im.get("saliency_target") for im in p.per_image), None)
        rows.append(
            WorklistRow(
                prediction_id=p.id,
                study_key=p.study.study_key,
                site=p.study.site,
                modality=p.study.modality,
                predicted_label=p.predicted_label,
                top_finding=_top_finding(p.probabilities, p.priority, target),
                priority=float(p.priority),
                top_k=tuple((str(c), float(v)) for c, v in p.top_k),
                status=review_status(reviews.get(p.id), viewer),
            )
        )
    return sorted(rows, key=lambda r: (-r.priority, r.study_key))


def load_prediction(settings: Settings, prediction_id: int) -> PredictionDetail | None:
    with new_session(settings.database_url) as session:
        p = session.get(Prediction, prediction_id)
        if p is None:
            return None
        study = p.study
        images = tuple(
            ImageRef(
                view=str(im.get("view") or f"image {n + 1}"),
                cache_key=str(im["cache_key"]),
                saliency_file=im.get("saliency_file"),
                saliency_target=im.get("saliency_target"),
                probabilities={str(k): float(v) for k, v in im.get("probabilities", {}).items()},
            )
            for n, im in enumerate(p.per_image)
        )
        probabilities = {str(k): float(v) for k, v in p.probabilities.items()}
        target = images[0].saliency_target if images else None
        return PredictionDetail(
            prediction_id=p.id,
            study_key=study.study_key,
            patient_pseudonym=study.patient_pseudonym,
            site=study.site,
            modality=study.modality,
            age_years=study.age_years,
            model_name=p.model_name,
            model_version=p.model_version,
            bundle_hash=p.bundle_hash,
            classes=tuple(probabilities),
            probabilities=probabilities,
            predicted_label=p.predicted_label,
            top_finding=_top_finding(probabilities, p.priority, target),
            priority=float(p.priority),
            top_k=tuple((str(c), float(v)) for c, v in p.top_k),
            images=images,
            explain_method=p.explain_method,
            created_at=p.created_at,
        )


def cohort_summaries(settings: Settings) -> list[CohortSummary]:
    """Every cohort with its study counts per split and label."""
    with new_session(settings.database_url) as session:
        cohorts = session.scalars(select(Cohort).order_by(Cohort.name)).all()
        counts = session.execute(
            select(CohortMember.cohort_name, CohortMember.split, Study.label, func.count())
            .join(Study, Study.id == CohortMember.study_id)
            .group_by(CohortMember.cohort_name, CohortMember.split, Study.label)
        ).all()
        patients = session.execute(
            select(
                CohortMember.cohort_name,
                CohortMember.split,
                func.count(distinct(Study.patient_pseudonym)),
            )
            .join(Study, Study.id == CohortMember.study_id)
            .group_by(CohortMember.cohort_name, CohortMember.split)
        ).all()
        all_patients = {
            name: int(n)
            for name, n in session.execute(
                select(CohortMember.cohort_name, func.count(distinct(Study.patient_pseudonym)))
                .join(Study, Study.id == CohortMember.study_id)
                .group_by(CohortMember.cohort_name)
            )
        }
    by_cohort: dict[str, dict[tuple[str, str], int]] = defaultdict(dict)
    for name, split, label, n in counts:
        by_cohort[name][(split or UNASSIGNED, label or "(no label)")] = int(n)
    per_split: dict[str, dict[str, int]] = defaultdict(dict)
    for name, split, n in patients:
        per_split[name][split or UNASSIGNED] = int(n)
    return [
        CohortSummary(
            name=c.name,
            created_at=c.created_at,
            split_seed=c.split_seed,
            split_fractions=tuple(c.split_fractions) if c.split_fractions else None,
            studies=sum(by_cohort[c.name].values()),
            patients=int(all_patients.get(c.name, 0)),
            counts=dict(by_cohort[c.name]),
            patients_per_split=dict(per_split[c.name]),
        )
        for c in cohorts
    ]


def record_report(
    settings: Settings, actor: str, model: str, cohort: str, files: list[Path]
) -> None:
    """Audit a report build ("report.build"): who, which model and cohort, each file's digest."""
    digests = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    with session_scope(settings.database_url) as session:
        record_audit(
            session,
            actor=actor,
            action=REPORT_ACTION,
            object_type="report",
            object_id=f"{model}|{cohort}"[:64],
            new_value={"model": model, "cohort": cohort, "files": digests},
        )
