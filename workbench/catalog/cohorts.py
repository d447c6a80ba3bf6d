"""Cohorts: the patient-level train / calibration / test split, the items a run trains on, cohort
summaries and hashes, K-fold and held-out patients, study headers for the OOD profile."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from sqlalchemy import select

from workbench.catalog.cache import (
    file_cache_key,
)
from workbench.catalog.ingest import VOLUMETRIC, CatalogError, cache_path
from workbench.catalog.records import StudyHeader
from workbench.config import Settings
from workbench.db.store import (
    Cohort,
    CohortMember,
    Series,
    Study,
    session_scope,
)

# One definition of the keyed hash and the patient pseudonym, shared with de-identification.
from workbench.dicom.deid import keyed_hash

SPLITS = ("train", "calibration", "test")


DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)


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
    # where the label came from: "csv" (the catalog's, from a labels file), "read" (clinicians
    # who agreed) or "adjudicated"; None for an unlabelled study
    label_source: str | None = None

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
            item = _item(settings, m.study, m.split)
            if m.label is not None:  # a label of this cohort's own (from reads)
                item = replace(item, label=m.label, label_source=m.label_source)
            items.append(item)
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
        label_source="csv" if study.label else None,
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
    interpretations (per instance), and labels, their sources and splits (per study) of a
    cohort."""
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
            label = m.label if m.label is not None else st.label
            facets["label"][label or "(none)"] += 1
            source = m.label_source or ("csv" if st.label else None)
            facets["label source"][source or "(none)"] += 1
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
