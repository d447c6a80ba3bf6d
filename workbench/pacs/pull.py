"""Pull studies from a DICOMweb server into the catalog, one whole study at a time.

For each study the server lists (QIDO-RS): when the catalog already holds as many of its
instances as the server reports, it is skipped. Otherwise the whole study is downloaded (WADO-RS)
into ``<home>/staging/<hash>.partial``, its instance count is checked, the folder is renamed to
``<home>/studies/dicomweb/<hash>`` and only then ingested. A pull that dies (server gone,
process killed) leaves at most a ``.partial`` folder, which the next pull throws away and starts
again, and no catalog rows for the study it was downloading; running the pull again completes it
without duplicates (the catalog skips instances it holds by SOPInstanceUID).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from tqdm import tqdm

from workbench.catalog.ingest import IngestSummary, ingest
from workbench.config import Settings
from workbench.db.store import Instance, Series, Study, session_scope
from workbench.dicom.dicomweb import (
    Credentials,
    DicomwebError,
    ServerUnreachableError,
    StudyRef,
    connect,
    count_instances,
    retrieve_study,
    search_studies,
    uid_hash,
)

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class PullSummary:
    found: int
    pulled: int
    already_present: int
    failed: int
    ingest: IngestSummary
    # one line per failed study: "<study folder hash>: <reason>" (no UIDs, no PHI)
    failures: tuple[str, ...] = ()

    def line(self) -> str:
        return (
            f"found {self.found} studies: pulled {self.pulled}, "
            f"already present {self.already_present}, failed {self.failed}; " + self.ingest.line()
        )


def staging_dir(settings: Settings) -> Path:
    return settings.home / "staging"


def pulled_dir(settings: Settings) -> Path:
    return settings.home / "studies" / "dicomweb"


def _catalogued_instances(settings: Settings, study_uid: str) -> tuple[int | None, int]:
    """(study id or None, number of its instances in the catalog)."""
    with session_scope(settings.database_url) as session:
        study_id = session.scalars(select(Study.id).where(Study.study_uid == study_uid)).first()
        if study_id is None:
            return None, 0
        n = session.scalar(
            select(func.count(Instance.id))
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == study_id)
        )
        return study_id, int(n or 0)


def _any_instance_path(settings: Settings, study_id: int) -> Path | None:
    with session_scope(settings.database_url) as session:
        path = session.scalars(
            select(Instance.path)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_id == study_id)
            .limit(1)
        ).first()
    return Path(path) if path else None


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an older ``dst`` (a study pulled before, now re-pulled) is
    set aside first and removed after, so ``dst`` is never half old, half new."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _add(a: IngestSummary, b: IngestSummary) -> IngestSummary:
    return IngestSummary(
        ingested=a.ingested + b.ingested,
        already_present=a.already_present + b.already_present,
        quarantined=a.quarantined + b.quarantined,
        skipped=a.skipped + b.skipped,
        labelled=a.labelled + b.labelled,
        study_ids=tuple(sorted(set(a.study_ids) | set(b.study_ids))),
    )


def pull_dicomweb(
    settings: Settings,
    url: str,
    credentials: Credentials | None,
    *,
    patient_id: str | None = None,
    study_uid: str | None = None,
    modality: str | None = None,
    date_from: str | None = None,
    date_to: str | None = None,
    labels: Path | None = None,
    cohort: str | None = None,
    progress: bool = True,
    timeout: float = 30,
    on_study_staged: Callable[[StudyRef, Path], None] | None = None,
) -> PullSummary:
    """Pull every study that matches the filters from the DICOMweb service at ``url``.

    Args:
        settings: the workbench home and catalog to pull into.
        url: the DICOMweb service root, e.g. ``http://pacs:8042/dicom-web``.
        credentials: basic-auth credentials (see ``load_credentials``), or None.
        patient_id, study_uid, modality, date_from, date_to: QIDO-RS filters; dates YYYYMMDD.
        labels, cohort: as for ``catalog.ingest``; also applied to studies already present.
        progress: show a progress bar over studies.
        timeout: seconds per HTTP request.
        on_study_staged: called with each study and its staging folder once the whole study
            is downloaded and counted, before it is moved into place and ingested.

    A study that the server cannot deliver (HTTP error, wrong instance count) is counted as
    failed and the pull goes on; a server that cannot be reached, or refuses the credentials,
    stops the pull with a :class:`DicomwebError`.
    """
    client = connect(url, credentials, timeout=timeout)
    refs = search_studies(
        client,
        patient_id=patient_id,
        study_uid=study_uid,
        modality=modality,
        date_from=date_from,
        date_to=date_to,
    )
    staging, final_root = staging_dir(settings), pulled_dir(settings)
    total = IngestSummary(0, 0, 0, 0, 0)
    pulled = present = 0
    failures: list[str] = []

    bar = tqdm(refs, desc="pull", unit="study", disable=not progress)
    for ref in bar:
        name = uid_hash(ref.study_uid)
        expected = ref.n_instances
        if expected is None:
            expected = count_instances(client, ref.study_uid)
        study_id, have = _catalogued_instances(settings, ref.study_uid)
        if study_id is not None and have >= expected > 0:
            present += 1
            total = _add(total, IngestSummary(0, 0, 0, 0, 0, (study_id,)))
            if labels or cohort:  # label it / add it to the cohort, through one of its files
                path = _any_instance_path(settings, study_id)
                if path is not None and path.exists():
                    attached = ingest(settings, path, labels, cohort, progress=False)
                    total = _add(total, IngestSummary(0, 0, 0, 0, attached.labelled))
            bar.set_postfix(pulled=pulled, present=present, failed=len(failures), refresh=False)
            continue

        partial = staging / f"{name}{PARTIAL_SUFFIX}"
        reason = None
        if expected == 0:
            reason = "the server lists the study without instances"
        else:
            if partial.exists():  # left by a pull that died: start this study again
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
            try:
                n = retrieve_study(client, ref.study_uid, partial)
            except ServerUnreachableError:
                raise  # the .partial folder stays; the next pull removes it and starts again
            except DicomwebError as err:
                if err.status in (401, 403):
                    raise
                reason = str(err)
            else:
                if n != expected:
                    reason = f"the server reports {expected} instances but sent {n}"
            if reason is not None:
                shutil.rmtree(partial, ignore_errors=True)
        if reason is not None:
            failures.append(f"{name}: {reason}")
            logger.warning("study %s not pulled: %s", name, reason)
            bar.set_postfix(pulled=pulled, present=present, failed=len(failures), refresh=False)
            continue
        if on_study_staged is not None:
            on_study_staged(ref, partial)

        folder = final_root / name
        _replace_dir(partial, folder)
        total = _add(total, ingest(settings, folder, labels, cohort, progress=False))
        pulled += 1
        bar.set_postfix(pulled=pulled, present=present, failed=len(failures), refresh=False)
    bar.close()
    return PullSummary(
        found=len(refs),
        pulled=pulled,
        already_present=present,
        failed=len(failures),
        ingest=total,
        failures=tuple(failures),
    )
