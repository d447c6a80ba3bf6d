"""A labelled cohort from clinicians' reads (``workbench cohort from-reads``).

Each study of the source cohort (or of the whole catalog) gets its label, in this order of
precedence:

* ``adjudicated``: an admin's latest adjudication of any of the study's predictions;
* ``read``: the readers' current reads (each reader's highest version; a reader who read two
  predictions of the study counts with the later read) when they all give the same label (the
  corrected label, or for a multi-label model the set of findings, joined with ``;`` as a labels
  CSV writes them) and there are at least ``min_readers`` of them;
* ``csv``: the catalog's label (from a labels file), when the reads do not settle the study and
  ``reads_only`` is off.

A study whose readers disagree and that no one adjudicated is a conflict: left out and counted,
as are studies with too few readers or (``adjudicated_only``) no adjudication. Inter-reader
agreement over the studies read twice or more is reported with statsmodels: Fleiss' kappa (the
studies read by the most common number of readers) and Cohen's kappa with its 95% interval for
every pair of readers with studies in common.

The new cohort records its labels per member with their source (``cohort_member.label``,
``label_source``), and how it was made (``cohort.provenance``); its creation is an audit event.
Training records the label source of every study it used (``split.label_sources``).
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from statsmodels.stats.inter_rater import cohens_kappa, fleiss_kappa

from workbench.catalog.ingest import CatalogError
from workbench.config import Settings
from workbench.db.store import (
    Cohort,
    CohortMember,
    Review,
    Study,
    record_audit,
    session_scope,
)
from workbench.errors import UsageError

LABEL_SOURCES: tuple[str, ...] = ("csv", "read", "adjudicated")


@dataclass(frozen=True)
class StudyReads:
    """One study's current reads (reader -> label) and latest adjudication."""

    study_key: str
    reads: Mapping[str, str]
    adjudication: str | None = None
    csv_label: str | None = None


def _review_label(r: Review) -> str:
    """A read as a label: a multi-label read's findings sorted and joined with ';' (a labels
    CSV's form), else the one label."""
    labels = list(r.corrected_labels or [r.label])
    return ";".join(sorted(dict.fromkeys(labels))) if len(labels) > 1 else labels[0]


def study_reads(session: Any, study_ids: list[int]) -> dict[int, StudyReads]:
    """Each study's reads and adjudication, from every prediction of it."""
    current: dict[tuple[int, str], Review] = {}
    adjudicated: dict[int, Review] = {}
    rows = session.scalars(
        select(Review).where(Review.study_id.in_(study_ids)).order_by(Review.id)
    ).all()
    for r in rows:  # in id order: a later row of the same reader replaces an earlier one
        if r.kind == "adjudication":
            adjudicated[r.study_id] = r
            continue
        key = (r.study_id, r.reviewer)
        held = current.get(key)
        if (
            held is None
            or (r.prediction_id == held.prediction_id and r.version > held.version)
            or r.prediction_id != held.prediction_id
            and r.created_at >= held.created_at
        ):
            current[key] = r
    studies = {s.id: s for s in session.scalars(select(Study).where(Study.id.in_(study_ids)))}
    reads: dict[int, dict[str, str]] = defaultdict(dict)
    for (study_id, reader), r in current.items():
        reads[study_id][reader] = _review_label(r)
    return {
        sid: StudyReads(
            study_key=studies[sid].study_key,
            reads=dict(sorted(reads.get(sid, {}).items())),
            adjudication=_review_label(adjudicated[sid]) if sid in adjudicated else None,
            csv_label=studies[sid].label,
        )
        for sid in study_ids
    }


def resolve(
    s: StudyReads, min_readers: int = 1, adjudicated_only: bool = False, reads_only: bool = False
) -> tuple[str | None, str]:
    """(label, source) of one study, or (None, why it is left out)."""
    if s.adjudication is not None:
        return s.adjudication, "adjudicated"
    if not adjudicated_only:
        labels = set(s.reads.values())
        if len(labels) > 1:
            return None, "conflict"
        if labels and len(s.reads) >= min_readers:
            return labels.pop(), "read"
    if s.csv_label and not reads_only and not adjudicated_only:
        return s.csv_label, "csv"
    if adjudicated_only:
        return None, "not adjudicated"
    return None, "too few readers" if s.reads else "unread and unlabelled"


def agreement(reads: Mapping[int, StudyReads]) -> dict[str, Any]:
    """Inter-reader agreement over the studies read by two readers or more (statsmodels)."""
    multi = [s for s in reads.values() if len(s.reads) >= 2]
    out: dict[str, Any] = {"studies_read_twice_or_more": len(multi), "fleiss": None, "pairs": []}
    if not multi:
        return out
    categories = sorted({lab for s in multi for lab in s.reads.values()})
    index = {c: i for i, c in enumerate(categories)}
    raters = Counter(len(s.reads) for s in multi).most_common(1)[0][0]
    same_n = [s for s in multi if len(s.reads) == raters]
    table = np.zeros((len(same_n), len(categories)))
    for row, s in enumerate(same_n):
        for lab in s.reads.values():
            table[row, index[lab]] += 1
    if len(categories) > 1:
        out["fleiss"] = {
            "kappa": _finite(fleiss_kappa(table, method="fleiss")),
            "studies": len(same_n),
            "readers_per_study": raters,
        }
    readers = sorted({r for s in multi for r in s.reads})
    for a, b in itertools.combinations(readers, 2):
        both = [s for s in multi if a in s.reads and b in s.reads]
        if not both:
            continue
        square = np.zeros((len(categories), len(categories)))
        for s in both:
            square[index[s.reads[a]], index[s.reads[b]]] += 1
        entry: dict[str, Any] = {"readers": [a, b], "studies": len(both)}
        try:
            res = cohens_kappa(square)
            entry.update(
                kappa=_finite(res.kappa),
                ci_low=_finite(res.kappa_low),
                ci_high=_finite(res.kappa_upp),
            )
        except (ValueError, ZeroDivisionError, FloatingPointError):
            entry.update(kappa=None, ci_low=None, ci_high=None)
        out["pairs"].append(entry)
    return out


def _finite(value: Any) -> float | None:
    v = float(value)
    return v if np.isfinite(v) else None


@dataclass(frozen=True)
class FromReads:
    """What ``cohort from-reads`` made: the counts by label source and of the studies left out
    (by reason), and the readers' agreement."""

    cohort: str
    source: str | None
    labelled: Mapping[str, int]
    left_out: Mapping[str, int]
    agreement: Mapping[str, Any]
    options: Mapping[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        by = ", ".join(f"{n} {s}" for s, n in self.labelled.items() if n) or "none"
        out = ", ".join(f"{n} {why}" for why, n in sorted(self.left_out.items())) or "none"
        fleiss = (self.agreement.get("fleiss") or {}).get("kappa")
        kappa = f"; Fleiss' kappa {fleiss:.2f}" if isinstance(fleiss, float) else ""
        return (
            f"cohort {self.cohort!r}: {sum(self.labelled.values())} labelled studies ({by}); "
            f"left out: {out}{kappa}"
        )


def cohort_from_reads(
    settings: Settings,
    name: str,
    source: str | None = None,
    *,
    adjudicated_only: bool = False,
    min_readers: int = 1,
    reads_only: bool = False,
    actor: str = "cli",
) -> FromReads:
    """Make cohort ``name`` from reads (see the module docstring); ``source``: the cohort whose
    studies are labelled (None: every study with a read)."""
    if min_readers < 1:
        raise UsageError("--min-readers must be at least 1")
    with session_scope(settings.database_url) as session:
        if session.get(Cohort, name) is not None:
            raise CatalogError(f"a cohort named {name!r} exists; choose another name")
        if source is not None:
            if session.get(Cohort, source) is None:
                raise CatalogError(f"no cohort named {source!r}")
            study_ids = list(
                session.scalars(
                    select(CohortMember.study_id).where(CohortMember.cohort_name == source)
                )
            )
        else:
            study_ids = list(session.scalars(select(Review.study_id).distinct()))
        reads = study_reads(session, sorted(study_ids))
        labelled: Counter[str] = Counter({s: 0 for s in LABEL_SOURCES})
        left_out: Counter[str] = Counter()
        members = []
        for study_id, s in reads.items():
            label, how = resolve(s, min_readers, adjudicated_only, reads_only)
            if label is None:
                left_out[how] += 1
                continue
            labelled[how] += 1
            members.append(
                CohortMember(
                    cohort_name=name,
                    study_id=study_id,
                    label=None if how == "csv" else label,
                    label_source=None if how == "csv" else how,
                )
            )
        if not members:
            raise CatalogError(
                f"no study of {source or 'the catalog'} has a label from reads or a labels file "
                f"under these options (left out: {dict(left_out) or 'none'})"
            )
        agree = agreement(reads)
        options = {
            "source": source,
            "adjudicated_only": adjudicated_only,
            "min_readers": min_readers,
            "reads_only": reads_only,
        }
        result = FromReads(name, source, dict(labelled), dict(left_out), agree, options)
        provenance = {
            "from_reads": {
                **options,
                "labelled": dict(labelled),
                "left_out": dict(left_out),
                "agreement": agree,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        }
        session.add(Cohort(name=name, provenance=provenance))
        session.flush()
        session.add_all(members)
        record_audit(
            session, actor, "cohort.from_reads", "cohort", name, new_value=provenance["from_reads"]
        )
    return result
