"""Ingest DICOM into the catalog; cohorts and patient-level splits.

Ingest skips a file already catalogued (same path, size and modification time) without opening
it, reads each other file once, decodes the pixels through the display pipeline, writes the
result to the decoded-pixel cache (``.npy`` keyed by the source file's hash and the pipeline
version), pseudonymises the patient with a keyed hash and records patient / study / series /
instance. A file that cannot be read is quarantined
with its reason and the batch goes on. Source files are only ever opened for reading.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import sys
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any, cast

import numpy as np
from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session
from tqdm import tqdm

from workbench.catalog.cache import (
    Decoded,
    decode_file,
    hu_volume_key,
    init_worker,
    write_cache,
)
from workbench.catalog.cache import cache_path as cached_array_path
from workbench.config import Settings, pseudonym_key
from workbench.db.store import (
    Cohort,
    CohortMember,
    Instance,
    Patient,
    Quarantine,
    Series,
    Study,
    new_session,
    session_scope,
)

# One definition of the keyed hash and the patient pseudonym, shared with de-identification.
from workbench.dicom.deid import keyed_hash, patient_pseudonym
from workbench.dicom.read.geometry import check_series_geometry
from workbench.dicom.read.header import HeaderFacts, read_header
from workbench.dicom.read.io import UnreadableDicomError
from workbench.errors import WorkbenchError

VOLUMETRIC = frozenset({"CT", "MR", "PT"})


# Sidecar files that sit beside DICOM in a cohort folder and are not images.
SIDECAR_SUFFIXES = frozenset({".csv", ".json", ".md", ".txt.labels"})


COMMIT_EVERY = 64


class CatalogError(WorkbenchError):
    """A user-facing problem with the catalog (unknown cohort, bad labels file...)."""


@dataclass(frozen=True)
class IngestSummary:
    ingested: int
    already_present: int
    quarantined: int
    skipped: int
    labelled: int
    study_ids: tuple[int, ...] = ()

    def line(self) -> str:
        return (
            f"ingested {self.ingested}, already present {self.already_present}, "
            f"quarantined {self.quarantined}, skipped {self.skipped} sidecar files, "
            f"labelled {self.labelled} studies"
        )


def cache_path(settings: Settings, cache_key: str) -> Path:
    return cached_array_path(settings.cache_dir, cache_key)


def _write_cache(settings: Settings, pixels: np.ndarray) -> str:
    return write_cache(settings.cache_dir, pixels)


def iter_files(src: Path) -> Iterable[Path]:
    if src.is_file():
        yield src
        return
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def read_labels(path: Path) -> dict[str, str]:
    """``StudyInstanceUID,label`` rows into a dict."""
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        if "StudyInstanceUID" not in fields or "label" not in fields:
            raise CatalogError(f"{path.name}: labels need the columns StudyInstanceUID and label")
        return {row["StudyInstanceUID"]: row["label"] for row in reader if row["label"]}


def _slice_position(facts: HeaderFacts) -> float | None:
    ipp, iop = facts.image_position_patient, facts.image_orientation_patient
    if ipp is None:
        return None
    if iop is None or len(iop) != 6:
        return float(ipp[2])
    normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
    return float(np.dot(normal, np.asarray(ipp)))


def _quarantine(session: Session, path: Path, sha: str | None, reason: str, detail: str) -> None:
    path = path.resolve()
    row = session.scalars(select(Quarantine).where(Quarantine.path == str(path))).first()
    if row is None:
        session.add(
            Quarantine(path=str(path), file_sha256=sha, reason=reason, detail=detail[:1000])
        )
    else:
        row.reason, row.detail, row.file_sha256 = reason, detail[:1000], sha


def _windows_json(facts: HeaderFacts) -> list[dict[str, Any]] | None:
    """The file's own windows as the catalog records them, or None when it has none."""
    return [
        {"center": w.center, "width": w.width, "explanation": w.explanation} for w in facts.windows
    ] or None


def _cache_volumes(
    settings: Settings, session: Session, new_facts: dict[str, list[HeaderFacts]]
) -> None:
    """Stack each volumetric series that gained slices into one cached array.

    A CT series whose every slice has its modality values cached is also stacked in HU
    (``Series.hu_volume_cache_key``), in the same order, for the viewer.

    Slices are ordered by their position along the slice normal (then instance number). A
    series whose geometry is inconsistent (:func:`check_series_geometry`) is not resampled: it
    gets no volume (so it is no model input) and its problems are recorded for
    ``workbench quarantine`` to list. The check uses the headers read in this run, or reads
    the headers of the series' files again when the series grew over several runs.
    """
    if not new_facts:
        return
    volumetric = [uid for uid, facts in new_facts.items() if facts[0].modality in VOLUMETRIC]
    for series in session.scalars(select(Series).where(Series.series_uid.in_(volumetric))):
        insts = list(series.instances)
        if len(insts) < 2:
            continue
        facts = new_facts[series.series_uid]
        if len(facts) != len(insts):
            try:
                facts = [read_header(Path(i.path)) for i in insts]
            except (UnreadableDicomError, OSError) as err:
                facts, series.problems = [], [f"a slice can no longer be read: {err}"]
        problems = check_series_geometry(facts) if facts else list(series.problems or [])
        series.problems = problems or None
        if problems:
            series.volume_cache_key = series.hu_volume_cache_key = None
            continue
        insts.sort(key=lambda i: (i.slice_position or 0.0, i.instance_number or 0))
        volume = np.stack([np.load(cache_path(settings, i.cache_key)) for i in insts])
        series.volume_cache_key = _write_cache(settings, volume)
        series.hu_volume_cache_key = _cache_hu_volume(settings, insts)


def _cache_hu_volume(settings: Settings, insts: Sequence[Instance]) -> str | None:
    """Stack the slices' HU arrays (already in volume order) unless one has none (not CT, or
    ingested before HU was cached); the key names the slices, so a volume already stacked is
    not stacked again."""
    keys = [i.hu_cache_key for i in insts]
    if not all(keys):
        return None
    key = hu_volume_key(cast(list[str], keys))
    if not cache_path(settings, key).is_file():
        volume = np.stack([np.load(cache_path(settings, k)) for k in cast(list[str], keys)])
        write_cache(settings.cache_dir, volume, key)
    return key


def _pool_context() -> BaseContext:
    """How decoding workers start: forked when that is safe, else spawned.

    A forked worker inherits pydicom and numpy from this process instead of importing them
    again (about 0.3 s of CPU per worker: a sixth of a 1,000-file ingest on two cores). Fork is
    only safe in a process with no other threads, so it is used when this one runs no other
    Python thread and has not loaded torch (whose native thread pools threading cannot see);
    otherwise (tests, the app, training) workers are spawned.
    """
    if (
        "fork" in multiprocessing.get_all_start_methods()
        and threading.active_count() == 1
        and "torch" not in sys.modules
    ):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


@contextmanager
def _decoder_pool(workers: int, n_files: int) -> Iterator[ProcessPoolExecutor | None]:
    """A started pool of decoding workers, or None to decode in this process (one worker, or
    too few files to pay for starting processes).

    The workers are started here, before the caller starts any thread (a progress bar has a
    monitor thread), so that they can be forked (see :func:`_pool_context`). A
    ProcessPoolExecutor fails loudly when a worker dies instead of respawning it
    (multiprocessing.Pool respawns forever, and a spawned worker that dies at start-up, e.g. in
    a script without a ``__main__`` guard that spawned workers re-run, would loop).
    """
    if workers <= 1 or n_files < 32:
        yield None
        return
    pool = ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=init_worker)
    try:
        pool.submit(int).result()  # starts every worker now (forked: all at once)
        yield pool
    except BrokenProcessPool as err:
        raise CatalogError(
            "a decoding worker process died; if ingest() runs from a script, guard the "
            "script's entry point with `if __name__ == '__main__':` (workers import it), "
            "or pass workers=1"
        ) from err
    finally:
        pool.shutdown(cancel_futures=True)


def _decoded_stream(
    pool: ProcessPoolExecutor | None,
    paths: Sequence[str],
    settings: Settings,
    allow_burned_in: bool,
) -> Iterator[Decoded]:
    """Decode files in the pool's workers (or here, without a pool), results in input order."""
    job = partial(
        decode_file,
        cache_dir=str(settings.cache_dir),
        allow_burned_in=allow_burned_in,
        max_pixel_bytes=settings.max_pixel_mb * 2**20,
        frames=settings.frames,
    )
    if pool is None:
        yield from map(job, paths)
    else:
        yield from pool.map(job, paths, chunksize=16)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


class _Registry:
    """Patient / study / series rows by UID for one ingest run.

    The UIDs already in the catalog are read once; new rows are created as objects and linked
    by relationship, so the unit of work inserts them in batches at commit (no query and no
    flush per file: that was most of the main process's time).
    """

    def __init__(self, session: Session, key: bytes) -> None:
        self.session, self.key = session, key
        self.known_studies = set(session.scalars(select(Study.study_uid)))
        self.known_series = set(session.scalars(select(Series.series_uid)))
        self.known_patients = set(session.scalars(select(Patient.pseudonym)))
        self.studies: dict[str, Study] = {}
        self.series: dict[str, Series] = {}

    def study(self, facts: HeaderFacts) -> Study:
        uid = facts.study_instance_uid
        if uid in self.studies:
            return self.studies[uid]
        if uid in self.known_studies:
            study = self.session.scalars(select(Study).where(Study.study_uid == uid)).one()
        else:
            pseudonym = patient_pseudonym(facts.patient_id, self.key)
            if pseudonym not in self.known_patients:
                self.session.add(Patient(pseudonym=pseudonym, sex=facts.patient_sex))
                self.known_patients.add(pseudonym)
            study = Study(
                study_uid=uid,
                study_key="S" + keyed_hash(self.key, "study:" + uid, 11),
                patient_pseudonym=pseudonym,
                study_date=facts.study_date,
                age_years=facts.patient_age_years,
                site=facts.institution_name,
                modality=facts.modality,
            )
            self.session.add(study)
        self.studies[uid] = study
        return study

    def series_of(self, study: Study, facts: HeaderFacts) -> Series:
        uid = facts.series_instance_uid
        if uid in self.series:
            return self.series[uid]
        if uid in self.known_series:
            series = self.session.scalars(select(Series).where(Series.series_uid == uid)).one()
        else:
            series = Series(
                series_uid=uid,
                study=study,
                modality=facts.modality,
                view_position=facts.view_position,
                body_part=facts.body_part_examined,
                manufacturer=facts.manufacturer,
                institution=facts.institution_name,
                station=facts.station_name,
            )
            self.session.add(series)
        self.series[uid] = series
        return series


def _insert_instances(session: Session, pending: list[tuple[Series, dict[str, Any]]]) -> None:
    """Insert a batch of instances in one executemany (the ORM's per-object bookkeeping was
    the ingest's main-process cost): flush first so new series have their ids."""
    if not pending:
        return
    session.flush()
    session.execute(insert(Instance), [{**row, "series_id": s.id} for s, row in pending])
    pending.clear()


def ingest(
    settings: Settings,
    src: Path,
    labels: Path | None = None,
    cohort: str | None = None,
    progress: bool = True,
    workers: int | None = None,
    allow_burned_in: bool = False,
) -> IngestSummary:
    """Walk ``src``, catalog every readable DICOM instance, quarantine the rest.

    Files are decoded once, in a pool of ``workers`` processes (default: every core), into the
    decoded-pixel cache; the catalog is written by this process in batches. Safe to interrupt
    and run again: a file already catalogued under the same path, size and modification time
    is skipped without being opened, and an instance already known by SOPInstanceUID (a copy
    elsewhere) is not added twice. Images that may carry burned-in PHI are quarantined unless
    ``allow_burned_in``.
    """
    if not src.exists():
        raise CatalogError(f"no such file or folder: {src}")
    return ingest_files(
        settings, iter_files(src), labels, cohort, progress, workers, allow_burned_in
    )


def retry_quarantine(
    settings: Settings, progress: bool = True, allow_burned_in: bool = False
) -> IngestSummary:
    """Try every quarantined file again (e.g. after installing a codec); those that read now
    leave the quarantine, the others keep it with a fresh reason."""
    with session_scope(settings.database_url) as session:
        paths = [Path(p) for p in session.scalars(select(Quarantine.path))]
        gone = [p for p in paths if not p.exists()]
        for p in gone:  # a file deleted since has nothing left to retry
            session.execute(delete(Quarantine).where(Quarantine.path == str(p)))
    return ingest_files(
        settings,
        [p for p in paths if p.exists()],
        progress=progress,
        allow_burned_in=allow_burned_in,
    )


def ingest_files(
    settings: Settings,
    files: Iterable[Path],
    labels: Path | None = None,
    cohort: str | None = None,
    progress: bool = True,
    workers: int | None = None,
    allow_burned_in: bool = False,
) -> IngestSummary:
    """Catalog the given files (see :func:`ingest`)."""
    label_map = read_labels(labels) if labels else {}
    key = pseudonym_key(settings)
    labels_path = labels.resolve() if labels else None
    ingested = present = quarantined = skipped = 0
    study_uids: set[str] = set()
    new_facts: dict[str, list[HeaderFacts]] = defaultdict(list)  # series UID -> facts
    with session_scope(settings.database_url) as session:
        if cohort and session.get(Cohort, cohort) is None:
            session.add(Cohort(name=cohort))
        known = {
            path: (size, mtime, uid)
            for path, size, mtime, uid in session.execute(
                select(Instance.path, Instance.file_size, Instance.file_mtime_ns, Study.study_uid)
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Series.study_id)
            )
        }
        known_sops = set(session.scalars(select(Instance.sop_uid)))
        quarantined_paths = set(session.scalars(select(Quarantine.path)))
    todo: list[str] = []
    for path in files:
        resolved = path.resolve()
        if path.suffix.lower() in SIDECAR_SUFFIXES or resolved == labels_path:
            skipped += 1
            continue
        entry = known.get(str(resolved))
        if entry is not None:
            st = resolved.stat()
            if (entry[0], entry[1]) == (st.st_size, st.st_mtime_ns):
                present += 1
                study_uids.add(entry[2])
                continue
        todo.append(str(resolved))

    n_workers = workers or default_workers()
    pending: list[tuple[Series, dict[str, Any]]] = []  # instances waiting for their series id
    with (
        _decoder_pool(n_workers, len(todo)) as pool,
        new_session(settings.database_url) as session,
    ):
        bar = tqdm(total=len(todo), desc="ingest", unit="file", disable=not progress)
        registry = _Registry(session, key)
        for n, d in enumerate(_decoded_stream(pool, todo, settings, allow_burned_in), 1):
            bar.update()
            if d.reason is not None or d.facts is None:
                _quarantine(session, Path(d.path), d.file_sha256, d.reason or "", d.detail)
                quarantined += 1
                continue
            facts = d.facts
            study_uids.add(facts.study_instance_uid)
            if facts.sop_instance_uid in known_sops:
                present += 1  # the same instance under another path
                continue
            known_sops.add(facts.sop_instance_uid)
            study = registry.study(facts)
            series = registry.series_of(study, facts)
            pending.append(
                (
                    series,
                    dict(
                        sop_uid=facts.sop_instance_uid,
                        path=d.path,
                        file_size=d.size,
                        file_mtime_ns=d.mtime_ns,
                        file_sha256=d.file_sha256,
                        pixel_hash=d.pixel_hash,
                        cache_key=d.cache_key,
                        hu_cache_key=d.hu_cache_key,
                        windows=_windows_json(facts),
                        rows=facts.rows,
                        columns=facts.columns,
                        frames=facts.number_of_frames,
                        photometric=facts.photometric_interpretation,
                        transfer_syntax=facts.transfer_syntax_uid,
                        pixel_spacing=facts.pixel_spacing[0] if facts.pixel_spacing else None,
                        voi_source=d.voi_source,
                        slice_position=_slice_position(facts),
                        instance_number=facts.instance_number,
                    ),
                )
            )
            new_facts[series.series_uid].append(facts)
            if d.path in quarantined_paths:  # it reads now (e.g. a codec was installed)
                session.execute(delete(Quarantine).where(Quarantine.path == d.path))
            ingested += 1
            if n % COMMIT_EVERY == 0:  # an interrupted ingest keeps what it committed
                _insert_instances(session, pending)
                session.commit()
                bar.set_postfix(new=ingested, quarantined=quarantined, refresh=False)
        _insert_instances(session, pending)
        session.commit()
        session.expire_all()  # series.instances were filled behind the ORM's back
        _cache_volumes(settings, session, new_facts)
        session.commit()
    bar.close()

    labelled = 0
    with session_scope(settings.database_url) as session:
        studies = session.scalars(select(Study).where(Study.study_uid.in_(study_uids))).all()
        for study in studies:
            if study.study_uid in label_map:
                study.label = label_map[study.study_uid]
                labelled += 1
        if cohort:
            have = set(
                session.scalars(
                    select(CohortMember.study_id).where(CohortMember.cohort_name == cohort)
                )
            )
            for study in studies:
                if study.id not in have:
                    session.add(CohortMember(cohort_name=cohort, study_id=study.id))
        ids = tuple(sorted(s.id for s in studies))
    return IngestSummary(ingested, present, quarantined, skipped, labelled, ids)


@dataclass(frozen=True)
class QuarantineEntry:
    path: str
    reason: str
    detail: str


@dataclass(frozen=True)
class SeriesProblem:
    study_key: str
    modality: str | None
    problems: tuple[str, ...]


def quarantine_report(settings: Settings) -> tuple[list[QuarantineEntry], list[SeriesProblem]]:
    """Files that could not be ingested (by reason, then path) and series left out of the
    volumes because their geometry is inconsistent."""
    with session_scope(settings.database_url) as session:
        files = [
            QuarantineEntry(q.path, q.reason, q.detail)
            for q in session.scalars(
                select(Quarantine).order_by(Quarantine.reason, Quarantine.path)
            )
        ]
        series = [
            SeriesProblem(key, modality, tuple(problems or ()))
            for key, modality, problems in session.execute(
                select(Study.study_key, Series.modality, Series.problems)
                .join(Study, Study.id == Series.study_id)
                .where(Series.problems.is_not(None))
                .order_by(Study.study_key)
            )
        ]
    return files, series
