"""Ingest DICOM into the catalog; cohorts and patient-level splits.

Ingest reads each header with ``stop_before_pixels`` (cheap: an instance already in the catalog
is skipped there), decodes the pixels once through the display pipeline, writes the result to
the decoded-pixel cache (content-addressed ``.npy``), pseudonymises the patient with a keyed
hash and records patient / study / series / instance. A file that cannot be read is quarantined
with its reason and the batch goes on. Source files are only ever opened for reading.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from tqdm import tqdm

from workbench.config import Settings, pseudonym_key
from workbench.dicom.read import HeaderFacts, UnreadableDicomError, read_header, read_image
from workbench.store import (
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

SPLITS = ("train", "calibration", "test")
VOLUMETRIC = frozenset({"CT", "MR", "PT"})
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
# Sidecar files that sit beside DICOM in a cohort folder and are not images.
SIDECAR_SUFFIXES = frozenset({".csv", ".json", ".md", ".txt.labels"})
COMMIT_EVERY = 64


class CatalogError(Exception):
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

    @property
    def spatial_dims(self) -> int:
        return 3 if self.modality in VOLUMETRIC else 2


# --- pseudonyms and hashes ------------------------------------------------------------------


def keyed_hash(key: bytes, value: str, length: int = 16) -> str:
    """A keyed hash (HMAC-SHA256) of an identifier: stable per installation, not reversible."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:length]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha_or_none(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None


def cache_path(settings: Settings, cache_key: str) -> Path:
    return settings.cache_dir / "pixels" / cache_key[:2] / f"{cache_key}.npy"


def _write_cache(settings: Settings, pixels: np.ndarray) -> str:
    """Store display-pipeline pixels (float16 in [0, 1]) content-addressed; return the key."""
    arr = np.ascontiguousarray(pixels, dtype=np.float16)
    key = hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest()
    path = cache_path(settings, key)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("wb") as fh:
            np.save(fh, arr)
        os.replace(tmp, path)
    return key


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
    row = session.scalars(select(Quarantine).where(Quarantine.path == str(path))).first()
    if row is None:
        session.add(
            Quarantine(path=str(path), file_sha256=sha, reason=reason, detail=detail[:1000])
        )
    else:
        row.reason, row.detail, row.file_sha256 = reason, detail[:1000], sha


def _get_or_create_study(session: Session, key: bytes, facts: HeaderFacts) -> Study:
    study = session.scalars(
        select(Study).where(Study.study_uid == facts.study_instance_uid)
    ).first()
    if study is not None:
        return study
    pseudonym = "P" + keyed_hash(key, "patient:" + facts.patient_id, 15)
    if session.get(Patient, pseudonym) is None:
        session.add(Patient(pseudonym=pseudonym, sex=facts.patient_sex))
    study = Study(
        study_uid=facts.study_instance_uid,
        study_key="S" + keyed_hash(key, "study:" + facts.study_instance_uid, 11),
        patient_pseudonym=pseudonym,
        study_date=facts.study_date,
        age_years=facts.patient_age_years,
        site=facts.institution_name,
        modality=facts.modality,
    )
    session.add(study)
    session.flush()
    return study


def _get_or_create_series(session: Session, study: Study, facts: HeaderFacts) -> Series:
    series = session.scalars(
        select(Series).where(Series.series_uid == facts.series_instance_uid)
    ).first()
    if series is None:
        series = Series(
            series_uid=facts.series_instance_uid,
            study_id=study.id,
            modality=facts.modality,
            view_position=facts.view_position,
            body_part=facts.body_part_examined,
            manufacturer=facts.manufacturer,
            institution=facts.institution_name,
            station=facts.station_name,
        )
        session.add(series)
        session.flush()
    return series


def _cache_volumes(settings: Settings, session: Session, series_ids: set[int]) -> None:
    """Stack each volumetric series that gained slices into one cached array.

    Slices are ordered by their position along the slice normal (then instance number); a
    series whose slices differ in size is left without a volume (and so is not a model input).
    """
    if not series_ids:
        return
    for series in session.scalars(select(Series).where(Series.id.in_(series_ids))):
        insts = list(series.instances)
        if series.modality not in VOLUMETRIC or len(insts) < 2:
            continue
        insts.sort(key=lambda i: (i.slice_position or 0.0, i.instance_number or 0))
        if len({(i.rows, i.columns, i.frames) for i in insts}) != 1:
            series.volume_cache_key = None
            continue
        volume = np.stack([np.load(cache_path(settings, i.cache_key)) for i in insts])
        series.volume_cache_key = _write_cache(settings, volume)


def ingest(
    settings: Settings,
    src: Path,
    labels: Path | None = None,
    cohort: str | None = None,
    progress: bool = True,
) -> IngestSummary:
    """Walk ``src``, catalog every readable DICOM instance, quarantine the rest.

    Safe to interrupt and run again: work is committed in batches, and instances already in
    the catalog (by SOPInstanceUID) are skipped after a header-only read.
    """
    if not src.exists():
        raise CatalogError(f"no such file or folder: {src}")
    label_map = read_labels(labels) if labels else {}
    key = pseudonym_key(settings)
    files = list(iter_files(src))
    ingested = present = quarantined = skipped = 0
    study_uids: set[str] = set()
    touched_series: set[int] = set()
    with session_scope(settings.database_url) as session:
        if cohort and session.get(Cohort, cohort) is None:
            session.add(Cohort(name=cohort))
    bar = tqdm(files, desc="ingest", unit="file", disable=not progress)
    with new_session(settings.database_url) as session:
        quarantined_paths = set(session.scalars(select(Quarantine.path)))
        for n, path in enumerate(bar, 1):
            if path.suffix.lower() in SIDECAR_SUFFIXES or (labels and path == labels):
                skipped += 1
                continue
            try:
                facts = read_header(path)
                study_uids.add(facts.study_instance_uid)
                if session.scalars(
                    select(Instance.id).where(Instance.sop_uid == facts.sop_instance_uid)
                ).first():
                    present += 1  # known instance: skipped after a header-only read
                    continue
                sha = file_sha256(path)
                image = read_image(path)
            except (UnreadableDicomError, OSError) as err:
                reason = getattr(err, "reason", "not_readable")
                detail = getattr(err, "detail", str(err))
                _quarantine(session, path, _sha_or_none(path), reason, detail)
                quarantined += 1
                continue
            cache_key = _write_cache(settings, image.pixels)
            study = _get_or_create_study(session, key, facts)
            series = _get_or_create_series(session, study, facts)
            spacing = facts.pixel_spacing[0] if facts.pixel_spacing else None
            session.add(
                Instance(
                    sop_uid=facts.sop_instance_uid,
                    series_id=series.id,
                    path=str(path.resolve()),
                    file_sha256=sha,
                    pixel_hash=image.pixel_hash,
                    cache_key=cache_key,
                    rows=facts.rows,
                    columns=facts.columns,
                    frames=facts.number_of_frames,
                    photometric=facts.photometric_interpretation,
                    transfer_syntax=facts.transfer_syntax_uid,
                    pixel_spacing=spacing,
                    voi_source=image.voi_source,
                    slice_position=_slice_position(facts),
                    instance_number=facts.instance_number,
                )
            )
            touched_series.add(series.id)
            if str(path) in quarantined_paths:  # it reads now (e.g. a codec was installed)
                session.execute(delete(Quarantine).where(Quarantine.path == str(path)))
            ingested += 1
            if n % COMMIT_EVERY == 0:  # an interrupted ingest keeps what it committed
                session.commit()
            bar.set_postfix(new=ingested, present=present, quarantined=quarantined, refresh=False)
        session.commit()
        _cache_volumes(settings, session, touched_series)
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
    )


def cohort_hash(items: Sequence[CohortItem]) -> str:
    """Digest of a cohort's exact inputs: study keys, splits, labels and pixel hashes."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda i: i.study_key):
        h.update(f"{it.study_key}|{it.split}|{it.label}|{','.join(it.pixel_hashes)}\n".encode())
    return h.hexdigest()
