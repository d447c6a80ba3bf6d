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
import hashlib
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
    file_cache_key,
    hu_volume_key,
    init_worker,
    write_cache,
)
from workbench.catalog.cache import cache_path as cached_array_path
from workbench.catalog.records import StudyHeader
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

SPLITS = ("train", "calibration", "test")
VOLUMETRIC = frozenset({"CT", "MR", "PT"})
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
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


@dataclass(frozen=True)
class CohortItem:
    """One study of a cohort as the model sees it: its images are cached arrays on disk."""

    study_id: int
    study_key: str
    patient: str
    label: str | None
    split: str | None
    site: str | None
    sex: str | None
    age_years: int | None
    modality: str | None
    # One cached array per model input: a 2D image, or a 3D series stacked along its normal.
    images: tuple[Path, ...]
    views: tuple[str, ...]
    pixel_hashes: tuple[str, ...]
    cache_keys: tuple[str, ...]
    # Slices of each input: 1 for an image, the series' instances for a stacked volume, the
    # frames of a multi-frame file cached whole.
    depths: tuple[int, ...] = ()

    @property
    def spatial_dims(self) -> int:
        """2 or 3 by what the study holds, not by its modality (see :data:`MIN_VOLUME_SLICES`)."""
        return shape_of(self.depths)


#: The rule of a study's shape: it is a 3D volume when one of its inputs has at least this many
#: slices; with fewer (a one-slice CT or MR, a key image, a short stack) it is a 2D image, and a
#: 2D model sees the middle slice of a short stack (:class:`workbench.model.data.LoadCachedd`).
MIN_VOLUME_SLICES = 8


def shape_of(depths: Sequence[int]) -> int:
    """2 or 3: the spatial dims of a study whose inputs have ``depths`` slices."""
    return 3 if depths and max(depths) >= MIN_VOLUME_SLICES else 2


# --- the decoded-pixel cache ------------------------------------------------------------------


def cache_path(settings: Settings, cache_key: str) -> Path:
    return cached_array_path(settings.cache_dir, cache_key)


def _write_cache(settings: Settings, pixels: np.ndarray) -> str:
    return write_cache(settings.cache_dir, pixels)


# --- ingest ---------------------------------------------------------------------------------


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


# --- cohorts and splits ---------------------------------------------------------------------


def split_cohort(
    settings: Settings,
    cohort: str,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> dict[str, int]:
    """Assign each patient of ``cohort`` to train / calibration / test and store it.

    Patients, not studies, are split, so no patient straddles two splits. The first split is
    stratified by each patient's most frequent label (every class reaches every split when it
    can); it is stored and reused. Studies added later join the split their patient already
    has, or one drawn from a keyed hash of (seed, patient), so earlier assignments never move.
    Returns the number of studies per split.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) <= 0:
        raise CatalogError("split fractions must be three positive numbers that sum to 1")
    with session_scope(settings.database_url) as session:
        row = session.get(Cohort, cohort)
        if row is None:
            raise CatalogError(f"no cohort named {cohort!r}; ingest with --cohort {cohort} first")
        members = session.scalars(
            select(CohortMember).where(CohortMember.cohort_name == cohort)
        ).all()
        if not members:
            raise CatalogError(f"cohort {cohort!r} has no studies")
        by_patient: dict[str, list[CohortMember]] = defaultdict(list)
        for m in members:
            by_patient[m.study.patient_pseudonym].append(m)
        fresh = row.split_seed is None
        if not fresh and row.split_seed != seed:
            raise CatalogError(
                f"cohort {cohort!r} is already split with seed {row.split_seed}; "
                "use that seed or a new cohort"
            )
        if fresh:
            groups: dict[str, list[str]] = defaultdict(list)
            for patient, ms in sorted(by_patient.items()):
                labels = [m.study.label or "" for m in ms]
                groups[max(sorted(set(labels)), key=labels.count)].append(patient)
            rng = np.random.default_rng(seed)
            cuts = np.cumsum(fractions)[:2]
            for patients in groups.values():
                order = rng.permutation(len(patients))
                n = len(patients)
                # Rounded cut points; with 3+ patients in a group each split gets at least one.
                a, b = (int(round(c * n)) for c in cuts)
                if n >= 3:
                    a = min(max(a, 1), n - 2)
                    b = min(max(b, a + 1), n - 1)
                for rank, idx in enumerate(order):
                    split = SPLITS[0] if rank < a else SPLITS[1] if rank < b else SPLITS[2]
                    for m in by_patient[patients[idx]]:
                        m.split = split
            row.split_seed = seed
            row.split_fractions = list(fractions)
        else:
            for patient, ms in by_patient.items():
                known = {m.split for m in ms if m.split}
                if len(known) == len(ms):
                    continue
                if known:
                    split = known.pop()
                else:
                    u = int(keyed_hash(str(seed).encode(), patient, 8), 16) / 16**8
                    cut = np.cumsum(row.split_fractions or fractions)
                    split = SPLITS[int(np.searchsorted(cut, u, side="right"))]
                for m in ms:
                    m.split = m.split or split
        counts = {s: 0 for s in SPLITS}
        for m in members:
            counts[m.split or ""] = counts.get(m.split or "", 0) + 1
        return counts


def cohort_items(settings: Settings, cohort: str, split: str | None = None) -> list[CohortItem]:
    """The studies of a cohort with their cached images, ordered by study key.

    2D studies give one model input per instance (e.g. PA and lateral views); a series whose
    instances carry slice positions (CT) gives one 3D input with slices sorted along the normal.
    """
    with session_scope(settings.database_url) as session:
        if session.get(Cohort, cohort) is None:
            raise CatalogError(f"no cohort named {cohort!r}")
        q = select(CohortMember).where(CohortMember.cohort_name == cohort)
        if split:
            q = q.where(CohortMember.split == split)
        items = []
        for m in session.scalars(q):
            items.append(_item(settings, m.study, m.split))
        return sorted(items, key=lambda i: i.study_key)


def items_for_studies(settings: Settings, study_ids: Sequence[int]) -> list[CohortItem]:
    """Model inputs for given studies (no cohort or split needed), ordered by study key."""
    with session_scope(settings.database_url) as session:
        studies = session.scalars(select(Study).where(Study.id.in_(list(study_ids)))).all()
        return sorted((_item(settings, s, None) for s in studies), key=lambda i: i.study_key)


def _item(settings: Settings, study: Study, split: str | None) -> CohortItem:
    images: list[Path] = []
    views: list[str] = []
    hashes: list[str] = []
    keys: list[str] = []
    depths: list[int] = []
    for series in sorted(study.series, key=lambda s: (s.view_position or "", s.series_uid)):
        insts = list(series.instances)
        if series.modality in VOLUMETRIC and len(insts) > 1:
            if series.volume_cache_key is None:
                continue  # inconsistent slices: no volume to show or to learn from
            insts.sort(key=lambda i: (i.slice_position or 0.0, i.instance_number or 0))
            images.append(cache_path(settings, series.volume_cache_key))
            views.append(series.view_position or series.modality or "")
            digest = hashlib.sha256("".join(i.pixel_hash for i in insts).encode()).hexdigest()
            hashes.append(digest)
            keys.append(series.volume_cache_key)
        else:
            for inst in sorted(insts, key=lambda i: (i.instance_number or 0, i.sop_uid)):
                images.append(cache_path(settings, inst.cache_key))
                views.append(series.view_position or "")
                hashes.append(inst.pixel_hash)
                keys.append(inst.cache_key)
        depths.extend(_series_depths(series))
    return CohortItem(
        study_id=study.id,
        study_key=study.study_key,
        patient=study.patient_pseudonym,
        label=study.label,
        split=split,
        site=study.site,
        sex=study.patient.sex,
        age_years=study.age_years,
        modality=study.modality,
        images=tuple(images),
        views=tuple(views),
        pixel_hashes=tuple(hashes),
        cache_keys=tuple(keys),
        depths=tuple(depths),
    )


def _series_depths(series: Series) -> list[int]:
    """The slices of each model input a series gives, in :func:`_item`'s order: one stacked
    volume, or one input per instance (its frames when all were cached, else 1)."""
    insts = list(series.instances)
    if series.modality in VOLUMETRIC and len(insts) > 1:
        return [len(insts)] if series.volume_cache_key is not None else []
    # A file's frames are all cached only under the "volume" key (cache.file_cache_key).
    return [
        i.frames if i.cache_key == file_cache_key(i.file_sha256, "volume") else 1 for i in insts
    ]


def cohort_hash(items: Sequence[CohortItem]) -> str:
    """Digest of a cohort's exact inputs: study keys, splits, labels and pixel hashes."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda i: i.study_key):
        h.update(f"{it.study_key}|{it.split}|{it.label}|{','.join(it.pixel_hashes)}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class CohortSummary:
    """What a cohort is made of: counts per value of the header facts that matter."""

    name: str
    studies: int
    patients: int
    instances: int
    counts: dict[str, dict[str, int]]  # facet -> value -> number of instances (studies for labels)
    series_with_problems: int

    def lines(self) -> list[str]:
        out = [
            f"cohort {self.name}: {self.studies} studies, {self.patients} patients, "
            f"{self.instances} instances"
            + (
                f", {self.series_with_problems} series with problems"
                if self.series_with_problems
                else ""
            )
        ]
        for facet, values in self.counts.items():
            shown = ", ".join(f"{v} {n}" for v, n in sorted(values.items(), key=lambda t: -t[1]))
            out.append(f"  {facet:18s} {shown}")
        return out


def cohort_summary(settings: Settings, cohort: str) -> CohortSummary:
    """Modalities, manufacturers, sites, views, sizes, transfer syntaxes, photometric
    interpretations (per instance), and labels and splits (per study) of a cohort."""
    from collections import Counter

    with session_scope(settings.database_url) as session:
        if session.get(Cohort, cohort) is None:
            raise CatalogError(f"no cohort named {cohort!r}")
        members = session.scalars(
            select(CohortMember).where(CohortMember.cohort_name == cohort)
        ).all()
        facets: dict[str, Counter[str]] = defaultdict(Counter)
        instances = problems = 0
        for m in members:
            st = m.study
            facets["label"][st.label or "(none)"] += 1
            facets["split"][m.split or "(not split)"] += 1
            for se in st.series:
                problems += bool(se.problems)
                for inst in se.instances:
                    instances += 1
                    facets["modality"][se.modality or "?"] += 1
                    facets["manufacturer"][se.manufacturer or "?"] += 1
                    facets["site"][se.institution or "?"] += 1
                    facets["view"][se.view_position or "-"] += 1
                    facets["size"][f"{inst.rows}x{inst.columns}"] += 1
                    facets["transfer syntax"][_syntax_name(inst.transfer_syntax)] += 1
                    facets["photometric"][inst.photometric] += 1
        return CohortSummary(
            name=cohort,
            studies=len(members),
            patients=len({m.study.patient_pseudonym for m in members}),
            instances=instances,
            counts={k: dict(v) for k, v in facets.items()},
            series_with_problems=problems,
        )


def _syntax_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid


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


def study_headers(settings: Settings, study_ids: Sequence[int]) -> dict[int, StudyHeader]:
    """The header facts each study's out-of-distribution check compares (see
    :class:`workbench.posthoc.ood.HeaderProfile`), read from the catalog."""
    out: dict[int, StudyHeader] = {}
    with session_scope(settings.database_url) as session:
        studies = session.scalars(select(Study).where(Study.id.in_(list(study_ids)))).all()
        for study in studies:
            series = list(study.series)
            insts = [i for s in series for i in s.instances]
            depths = [d for s in series for d in _series_depths(s)]
            out[study.id] = StudyHeader(
                modality=study.modality,
                body_parts=tuple(sorted({s.body_part for s in series if s.body_part})),
                photometrics=tuple(sorted({i.photometric for i in insts if i.photometric})),
                spatial_dims=shape_of(depths),
                sizes=tuple(sorted({(i.rows, i.columns) for i in insts})),
            )
    return out


# --- cross-validation folds -----------------------------------------------------------------


def _strata(items: Sequence[CohortItem]) -> dict[str, list[str]]:
    """Patients grouped by their most frequent label (ties: the first in sorted order), as
    :func:`split_cohort` stratifies them; patients sorted within each group."""
    labels: dict[str, list[str]] = defaultdict(list)
    for it in items:
        labels[it.patient].append(it.label or "")
    groups: dict[str, list[str]] = defaultdict(list)
    for patient, ls in sorted(labels.items()):
        groups[max(sorted(set(ls)), key=ls.count)].append(patient)
    return dict(sorted(groups.items()))


def patient_folds(items: Sequence[CohortItem], k: int, seed: int = 0) -> dict[str, int]:
    """Assign each patient to one of ``k`` folds (0..k-1), stratified by label like the
    train / calibration / test split: a patient's studies never straddle two folds."""
    if k < 2:
        raise CatalogError("cross-validation needs at least 2 folds")
    rng = np.random.default_rng(seed)
    folds: dict[str, int] = {}
    offset = 0  # continue the round-robin across groups so fold sizes stay balanced
    for patients in _strata(items).values():
        for rank, idx in enumerate(rng.permutation(len(patients))):
            folds[patients[idx]] = (offset + rank) % k
        offset += len(patients)
    return folds


def fold_assignment(
    items: Sequence[CohortItem],
    folds: dict[str, int],
    test_fold: int,
    seed: int = 0,
    calibration_fraction: float = 0.25,
) -> dict[int, str]:
    """Study id -> split for one cross-validation run: the patients of ``test_fold`` are the
    test split; the others are divided (by patient, stratified) into train and calibration."""
    rest = [it for it in items if folds[it.patient] != test_fold]
    rng = np.random.default_rng([seed, test_fold])
    split_of: dict[str, str] = {p: "test" for p, f in folds.items() if f == test_fold}
    held = holdout_patients(rest, calibration_fraction, rng)
    split_of.update({it.patient: "calibration" if it.patient in held else "train" for it in rest})
    return {it.study_id: split_of[it.patient] for it in items}


def holdout_patients(
    items: Sequence[CohortItem], fraction: float, seed: int | np.random.Generator = 0
) -> set[str]:
    """About ``fraction`` of the patients of ``items``, drawn within each label stratum (at
    least one and never all of a stratum of two or more): a patient-level hold-out, e.g. the
    training split's validation patients for early stopping."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng([seed, 7])
    held: set[str] = set()
    for patients in _strata(items).values():
        n = len(patients)
        k = int(round(fraction * n))
        if n >= 2:
            k = min(max(k, 1), n - 1)
        held.update(patients[idx] for rank, idx in enumerate(rng.permutation(n)) if rank < k)
    return held
