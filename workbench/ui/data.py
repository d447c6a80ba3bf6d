"""What the app reads from the store and the model bundles, and the one thing it writes (reviews).

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
from typing import Any, Literal

from sqlalchemy import distinct, func, select

from workbench.bundle import version_number
from workbench.config import Settings
from workbench.inference import latest_predictions
from workbench.store import (
    Cohort,
    CohortMember,
    Prediction,
    Review,
    Study,
    lock_for_append,
    new_session,
    record_audit,
    session_scope,
)

# "read_by_other": a colleague has read the study and this (blinded) reader has not yet.
ReviewStatus = Literal["unreviewed", "agreed", "disagreed", "disputed", "read_by_other"]
ReviewKind = Literal["read", "adjudication"]
REVIEW_ACTION = "review.create"
REVISE_ACTION = "review.revise"
ADJUDICATE_ACTION = "review.adjudicate"
# Who may write which kind of review (checked here too, not only by the pages).
REVIEW_ROLES = {"read": frozenset({"clinician", "admin"}), "adjudication": frozenset({"admin"})}
REPORT_ACTION = "report.build"
UNASSIGNED = "unassigned"


class ReviewError(ValueError):
    """A review that cannot be stored as given (unknown prediction, label not a class...)."""


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
class ReviewRecord:
    id: int
    prediction_id: int
    reviewer: str
    agree: bool
    label: str
    comment: str
    created_at: datetime
    kind: str = "read"
    version: int = 1
    supersedes_id: int | None = None
    confidence: int | None = None
    reason: str = ""
    seconds_spent: float | None = None
    corrected_labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dispute:
    """A prediction whose readers disagree with each other and no admin has settled yet."""

    prediction_id: int
    study_key: str
    model: str
    predicted_label: str
    classes: tuple[str, ...]
    reads: tuple[ReviewRecord, ...]  # each reader's current version


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


@dataclass
class _Reads:
    """One prediction's current reads (each reader's highest version) and latest adjudication."""

    reads: dict[str, Review]
    adjudication: Review | None = None


def _status(r: _Reads | None, viewer: str | None = None) -> ReviewStatus:
    """The prediction's review status; as seen by ``viewer`` when the reader must stay blind.

    A blinded reader sees their own read's status, or "read_by_other", never a colleague's
    assessment or whether readers disagree (that would reveal the first read).
    """
    if r is not None and r.adjudication is not None:
        return "agreed" if r.adjudication.agree else "disagreed"
    if r is None or not r.reads:
        return "unreviewed"
    if viewer is not None:
        own = r.reads.get(viewer)
        if own is None:
            return "read_by_other"
        return "agreed" if own.agree else "disagreed"
    opinions = {(rev.agree, rev.label) for rev in r.reads.values()}
    if len(opinions) > 1:
        return "disputed"
    return "agreed" if next(iter(opinions))[0] else "disagreed"


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


def _current_reads(session: Any, prediction_ids: list[int]) -> dict[int, _Reads]:
    out: dict[int, _Reads] = {}
    if not prediction_ids:
        return out
    q = select(Review).where(Review.prediction_id.in_(prediction_ids)).order_by(Review.id)
    for review in session.scalars(q):  # in id order, so a later version replaces an earlier
        r = out.setdefault(review.prediction_id, _Reads({}))
        if review.kind == "adjudication":
            r.adjudication = review
        else:
            r.reads[review.reviewer] = review
    return out


def worklist(settings: Settings, bundle_hash: str, viewer: str | None = None) -> list[WorklistRow]:
    """The newest prediction per study of one model, highest priority first.

    With ``viewer`` the statuses are as that (blinded) reader may see them.
    """
    preds = latest_predictions(settings, bundle_hash)
    with new_session(settings.database_url) as session:
        reviews = _current_reads(session, [p.id for p in preds.values()])
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
                status=_status(reviews.get(p.id), viewer),
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


def _record(r: Review) -> ReviewRecord:
    return ReviewRecord(
        id=r.id,
        prediction_id=r.prediction_id,
        reviewer=r.reviewer,
        agree=r.agree,
        label=r.label,
        comment=r.comment,
        created_at=r.created_at,
        kind=r.kind,
        version=r.version,
        supersedes_id=r.supersedes_id,
        confidence=r.confidence,
        reason=r.reason,
        seconds_spent=r.seconds_spent,
        corrected_labels=tuple(r.corrected_labels or ()),
    )


def reviews_for(
    settings: Settings, prediction_id: int, reviewer: str | None = None
) -> list[ReviewRecord]:
    """Every review (each version) of one prediction, newest first; only ``reviewer``'s own
    when given (a blinded reader)."""
    with new_session(settings.database_url) as session:
        q = select(Review).where(Review.prediction_id == prediction_id)
        if reviewer is not None:
            q = q.where(Review.reviewer == reviewer, Review.kind == "read")
        return [_record(r) for r in session.scalars(q.order_by(Review.id.desc()))]


def other_readers(settings: Settings, prediction_id: int, reviewer: str) -> int:
    """How many other clinicians have read this prediction (their reads stay hidden)."""
    with new_session(settings.database_url) as session:
        n = session.scalar(
            select(func.count(distinct(Review.reviewer))).where(
                Review.prediction_id == prediction_id,
                Review.kind == "read",
                Review.reviewer != reviewer,
            )
        )
    return int(n or 0)


def disputes(settings: Settings) -> list[Dispute]:
    """Predictions whose readers disagree (label or assessment) and that are not adjudicated."""
    with new_session(settings.database_url) as session:
        ids = list(session.scalars(select(distinct(Review.prediction_id))))
        reads = _current_reads(session, ids)
        out = []
        for pid in sorted(ids):
            if _status(reads.get(pid)) != "disputed":
                continue
            pred = session.get(Prediction, pid)
            assert pred is not None
            out.append(
                Dispute(
                    prediction_id=pid,
                    study_key=pred.study.study_key,
                    model=f"{pred.model_name} {pred.model_version}",
                    predicted_label=pred.predicted_label,
                    classes=tuple(pred.probabilities),
                    reads=tuple(_record(r) for _, r in sorted(reads[pid].reads.items())),
                )
            )
    return out


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


# --- the one write ---------------------------------------------------------------------------


def save_review(
    settings: Settings,
    reviewer: str,
    prediction_id: int,
    agree: bool,
    label: str,
    comment: str,
    *,
    role: str = "clinician",
    kind: ReviewKind = "read",
    confidence: int | None = None,
    reason: str = "",
    seconds_spent: float | None = None,
    corrected_labels: list[str] | None = None,
) -> ReviewRecord:
    """Store a review and its audit event in one transaction; never overwrite one.

    A reader's first review of a prediction is version 1 ("review.create"); each later one is
    the next version, names the one it supersedes and needs a ``reason`` ("review.revise").
    ``kind="adjudication"`` is an admin settling a dispute ("review.adjudicate"). Either the
    review and its event are committed or neither is; database errors propagate to the caller.
    """
    comment, reason = comment.strip(), reason.strip()
    if role not in REVIEW_ROLES[kind]:
        raise ReviewError(f"the {role} role cannot submit a{'n' if kind[0] == 'a' else ''} {kind}")
    if confidence is not None and not 1 <= confidence <= 5:
        raise ReviewError("confidence is from 1 (unsure) to 5 (certain)")
    labels = list(dict.fromkeys([label, *(corrected_labels or [])]))
    with session_scope(settings.database_url) as session:
        lock_for_append(session)  # the version number below is read, then written
        pred = session.get(Prediction, prediction_id)
        if pred is None:
            raise ReviewError(f"prediction {prediction_id} no longer exists")
        if any(c not in pred.probabilities for c in labels):
            raise ReviewError(f"{label!r} is not one of the model's classes")
        previous = session.scalars(
            select(Review)
            .where(
                Review.prediction_id == prediction_id,
                Review.reviewer == reviewer,
                Review.kind == kind,
            )
            .order_by(Review.version.desc())
            .limit(1)
        ).first()
        if previous is not None and not reason:
            raise ReviewError("say why you change your review (the earlier version is kept)")
        review = Review(
            prediction_id=pred.id,
            study_id=pred.study_id,
            reviewer=reviewer,
            agree=agree,
            label=label,
            comment=comment,
            kind=kind,
            version=previous.version + 1 if previous else 1,
            supersedes_id=previous.id if previous else None,
            confidence=confidence,
            reason=reason,
            seconds_spent=seconds_spent,
            corrected_labels=labels,
        )
        session.add(review)
        session.flush()
        fields = {
            "prediction_id": pred.id,
            "study_key": pred.study.study_key,
            "model": f"{pred.model_name}/{pred.model_version}",
            "bundle_hash": pred.bundle_hash,
            "predicted_label": pred.predicted_label,
        }
        old = None
        if previous is not None:
            old = {
                "review_id": previous.id,
                "version": previous.version,
                "reviewer": previous.reviewer,
                "agree": previous.agree,
                "label": previous.label,
                "comment": previous.comment,
            }
        action = (
            ADJUDICATE_ACTION
            if kind == "adjudication"
            else REVISE_ACTION
            if previous
            else REVIEW_ACTION
        )
        record_audit(
            session,
            actor=reviewer,
            action=action,
            object_type="review",
            object_id=review.id,
            old_value=old,
            new_value={
                **fields,
                "review_id": review.id,
                "reviewer": reviewer,
                "agree": agree,
                "label": label,
                "comment": comment,
                "kind": kind,
                "version": review.version,
                "supersedes_id": review.supersedes_id,
                "confidence": confidence,
                "seconds_spent": seconds_spent,
                "corrected_labels": labels,
            },
            reason=reason or comment,
        )
        return _record(review)


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
