"""A cohort's DICOM out of the catalog, de-identified (PS3.15 Basic Profile), with an audit event.

The copies are written by :func:`workbench.dicom.deid.export_deidentified`; this module finds the
cohort's files in the catalog and records who exported what.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from workbench.config import Settings
from workbench.db.store import (
    Cohort,
    CohortMember,
    Instance,
    Series,
    record_audit,
    session_scope,
)
from workbench.dicom.deid import DeidConfig, ExportSummary, export_deidentified
from workbench.errors import NotFoundError

__all__ = ["cohort_paths", "export_cohort"]


def cohort_paths(settings: Settings, cohort: str) -> list[Path]:
    """Every catalogued file of the cohort's studies, in path order; NotFoundError for an
    unknown cohort."""
    with session_scope(settings.database_url) as session:
        if session.get(Cohort, cohort) is None:
            raise NotFoundError(f"no cohort named {cohort!r}")
        return [
            Path(p)
            for p in session.scalars(
                select(Instance.path)
                .join(Series, Series.id == Instance.series_id)
                .join(CohortMember, CohortMember.study_id == Series.study_id)
                .where(CohortMember.cohort_name == cohort)
                .order_by(Instance.path)
            )
        ]


def export_cohort(
    settings: Settings, cohort: str, out: Path, config: DeidConfig, actor: str
) -> ExportSummary:
    """De-identified copies of the cohort's files under ``out`` (sources never modified), and
    an ``export.deidentified`` audit event with what was written, refused and kept."""
    summary = export_deidentified(cohort_paths(settings, cohort), out, config)
    with session_scope(settings.database_url) as session:
        record_audit(
            session,
            actor,
            "export.deidentified",
            "cohort",
            cohort,
            new_value={
                "written": summary.written,
                "refused": summary.refused,
                "keep_dates": config.keep_dates,
                "keep_device_identity": config.keep_device_identity,
                "allow_burned_in": config.allow_burned_in,
            },
        )
    return summary
