"""What several command groups share: settings, DICOMweb credentials and pulls, the actor,
numbers in a line."""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path

from workbench.config import Settings, environment_values
from workbench.dicom.dicomweb import CREDENTIAL_ENV, Credentials, load_credentials
from workbench.pacs.pull import PullSummary, pull_dicomweb


def credentials() -> Credentials | None:
    """DICOMweb credentials from the environment or the file it names; None for none."""
    return load_credentials(environment_values(*CREDENTIAL_ENV))


def add_qido_filters(s: argparse.ArgumentParser) -> None:
    """The QIDO-RS filters of ``--dicomweb`` (ingest and predict; read by :func:`pull_studies`)."""
    s.add_argument("--patient", help="DICOMweb: PatientID to pull")
    s.add_argument("--study", help="DICOMweb: StudyInstanceUID to pull")
    s.add_argument("--modality", help="DICOMweb: modality, e.g. DX or CT")
    s.add_argument("--from", dest="date_from", metavar="YYYYMMDD", help="DICOMweb: first date")
    s.add_argument("--to", dest="date_to", metavar="YYYYMMDD", help="DICOMweb: last date")


def pull_studies(
    settings: Settings,
    a: argparse.Namespace,
    labels: Path | None = None,
    cohort: str | None = None,
) -> PullSummary:
    """``--dicomweb URL`` with its QIDO filters (ingest and predict): credentials from the
    environment or a file, never from the command line."""
    return pull_dicomweb(
        settings,
        a.dicomweb,
        credentials(),
        patient_id=a.patient,
        study_uid=a.study,
        modality=a.modality,
        date_from=a.date_from,
        date_to=a.date_to,
        labels=labels,
        cohort=cohort,
    )


def actor() -> str:
    """Who runs the command, for the audit log: the operating-system user."""
    return f"cli:{getpass.getuser()}"


def num(value: object, fmt: str = ".3f") -> str:
    """A number for a line of output; "n/a" for a missing one."""
    return format(value, fmt) if isinstance(value, int | float) else "n/a"
