"""Reviews: each reader's versions, blind second reads, disputes and their adjudication.

No Streamlit and no torch here, so any process (the app, the CLI, a test's worker processes)
can write reviews cheaply. A review is never updated: an edit is the next version. Every write
carries its audit event in the same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import distinct, func, select

from workbench.config import Settings
from workbench.db.store import (
    Prediction,
    Review,
    lock_for_append,
    new_session,
    record_audit,
    session_scope,
)
from workbench.errors import WorkbenchError

# "read_by_other": a colleague has read the study and this (blinded) reader has not yet.
ReviewStatus = Literal["unreviewed", "agreed", "disagreed", "disputed", "read_by_other"]
ReviewKind = Literal["read", "adjudication"]
REVIEW_ACTION = "review.create"
REVISE_ACTION = "review.revise"
ADJUDICATE_ACTION = "review.adjudicate"
# Who may write which kind of review (checked here too, not only by the pages).
REVIEW_ROLES = {"read": frozenset({"clinician", "admin"}), "adjudication": frozenset({"admin"})}


class ReviewError(WorkbenchError, ValueError):
    """A review that cannot be stored as given (unknown prediction, label not a class...)."""


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
    model_visible: bool | None = None


@dataclass(frozen=True)
class Dispute:
    """A prediction whose readers disagree with each other and no admin has settled yet."""

    prediction_id: int
    study_key: str
    model: str
    predicted_label: str
    classes: tuple[str, ...]
    reads: tuple[ReviewRecord, ...]  # each reader's current version


@dataclass
class _Reads:
    """One prediction's current reads (each reader's highest version) and latest adjudication."""

    reads: dict[str, Review]
    adjudication: Review | None = None


def review_status(r: _Reads | None, viewer: str | None = None) -> ReviewStatus:
    """The prediction's review status; as seen by ``viewer`` when the reader must stay blind.

    A blinded reader sees their own read's status, or "read_by_other", never a colleague's
    assessment, whether readers disagree or how an admin settled it (that would reveal the
    other reads).
    """
    if r is None or (not r.reads and r.adjudication is None):
        return "unreviewed"
    if viewer is not None:
        own = r.reads.get(viewer)
        if own is None:
            return "read_by_other"
        return "agreed" if own.agree else "disagreed"
    if r.adjudication is not None:
        return "agreed" if r.adjudication.agree else "disagreed"
    opinions = {(rev.agree, rev.label) for rev in r.reads.values()}
    if len(opinions) > 1:
        return "disputed"
    return "agreed" if next(iter(opinions))[0] else "disagreed"


def current_reads(session: Any, prediction_ids: list[int]) -> dict[int, _Reads]:
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
        model_visible=r.model_visible,
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


def read_versions(settings: Settings, reviewer: str, prediction_ids: list[int]) -> dict[int, int]:
    """Prediction id -> the version of ``reviewer``'s current read, for those they have read
    (one query for a whole worklist)."""
    if not prediction_ids:
        return {}
    with new_session(settings.database_url) as session:
        rows = session.execute(
            select(Review.prediction_id, func.max(Review.version))
            .where(
                Review.prediction_id.in_(prediction_ids),
                Review.reviewer == reviewer,
                Review.kind == "read",
            )
            .group_by(Review.prediction_id)
        ).all()
    return {int(pid): int(version) for pid, version in rows}


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
        ids = list(session.scalars(select(Review.prediction_id).distinct()))
        reads = current_reads(session, ids)
        out = []
        for pid in sorted(ids):
            if review_status(reads.get(pid)) != "disputed":
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
    model_visible: bool | None = None,
    negative_class: str | None = None,
) -> ReviewRecord:
    """Store a review and its audit event in one transaction; never overwrite one.

    A reader's first review of a prediction is version 1 ("review.create"); each later one is
    the next version, names the one it supersedes and needs a ``reason`` ("review.revise").
    ``kind="adjudication"`` is an admin settling a dispute ("review.adjudicate"). Either the
    review and its event are committed or neither is; database errors propagate to the caller.
    ``model_visible``: whether the reader saw the model's output before reading (the labelling
    page records it; None where the page always shows it).
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
        # a multi-label read of no finding names the model's negative class (not a label)
        if any(c not in pred.probabilities and c != negative_class for c in labels):
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
            model_visible=model_visible,
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
                "model_visible": model_visible,
            },
            reason=reason or comment,
        )
        return _record(review)
