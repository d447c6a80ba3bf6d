"""What the app reads from the store and the model bundles; reviews (the app's one write) come
from :mod:`workbench.review.reviews` and are re-exported here for the pages.

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
from typing import Any

from sqlalchemy import distinct, func, select

from workbench.config import Settings
from workbench.db.store import (
    Cohort,
    CohortMember,
    Instance,
    Prediction,
    Series,
    Study,
    new_session,
    record_audit,
    session_scope,
)
from workbench.dicom.read.header import FileWindow
from workbench.model.bundle_info import BundleError, list_bundles, read_bundle_info, version_number
from workbench.predict.results import (
    EXPLAIN_METHODS,
    latest_predictions,
    probability_text,
    saliency_path,
)
from workbench.review.reviews import (
    ReviewStatus,
    current_reads,
    review_status,
)

REPORT_ACTION = "report.build"
UNASSIGNED = "unassigned"


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
    cohorts: tuple[str, ...] = ()
    prediction_set: dict[str, Any] | None = None
    ood_flag: bool = False

    @property
    def set_size(self) -> int:
        return set_size(self.prediction_set)

    @property
    def scored(self) -> bool:
        return bool(self.top_k)


@dataclass(frozen=True)
class ImageRef:
    """One image of a prediction: where its cached display pixels and saliency map are."""

    view: str
    cache_key: str
    saliency_file: str | None  # relative to the cache folder
    saliency_target: str | None
    probabilities: dict[str, float]
    pixel_hash: str | None = None
    # A CT image or volume: its modality values (HU) in the cache, when ingest cached them,
    # and its file's own windows (in HU; for a volume, those of its slices in slice order).
    hu_cache_key: str | None = None
    windows: tuple[FileWindow, ...] = ()


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
    prediction_set: dict[str, Any] | None = None
    ood_flag: bool = False
    ood: dict[str, Any] | None = None
    similar: tuple[dict[str, Any], ...] = ()
    calibration_map: str | None = None  # "site:NAME" or "global"; None for older predictions

    @property
    def scored(self) -> bool:
        """False for a refused study (input the model cannot take): it has no scores."""
        return bool(self.probabilities)


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
    if not probabilities:  # refused: out of distribution, not scored
        return "not scored"
    return min(probabilities, key=lambda c: abs(probabilities[c] - priority))


def set_size(pset: dict[str, Any] | None) -> int:
    """How many answers a prediction set leaves open (multi-label: the uncertain labels)."""
    if not pset:
        return 0
    if "labels" in pset:
        return sum(v == "uncertain" for v in dict(pset["labels"]).values())
    return len(pset.get("classes") or ())


def set_text(pset: dict[str, Any] | None, top: str | None = None) -> str:
    """A prediction set as a reader says it: "90% prediction set: {nodule, effusion}"; an empty
    set names the top class; "" when the bundle ships no sets."""
    if not pset:
        return ""
    level = probability_text(float(pset.get("coverage", 0.9)))
    if "labels" in pset:
        parts = ", ".join(f"{k}: {v}" for k, v in dict(pset["labels"]).items())
        return f"{level} prediction set: {{{parts}}}"
    classes = list(pset.get("classes") or ())
    if not classes:
        shown = f"{{{top}}}" if top else "{}"
        return f"{level} prediction set: {shown} (more certain than the {level} level needs)"
    return f"{level} prediction set: {{{', '.join(classes)}}}"


def calibration_text(calibration_map: str | None) -> str:
    """Which calibration map gave the probabilities, as the study page says it; "" for a
    prediction that did not record it (made before maps were recorded: the global one)."""
    if not calibration_map:
        return ""
    if calibration_map.startswith("site:"):
        return f"Calibrated with the map fitted for site {calibration_map.removeprefix('site:')}."
    return "Calibrated with the model's global map."


def set_short(pset: dict[str, Any] | None, top: str | None = None) -> str:
    """The set for a table cell: "{nodule, effusion}"."""
    if not pset:
        return ""
    if "labels" in pset:
        open_ = [k for k, v in dict(pset["labels"]).items() if v in ("uncertain", "present")]
        return "{" + ", ".join(open_) + "}"
    classes = list(pset.get("classes") or ())
    return "{" + ", ".join(classes or ([top] if top else [])) + "}"


def _cohorts_of(session: Any, study_ids: list[int]) -> dict[int, tuple[str, ...]]:
    out: dict[int, list[str]] = defaultdict(list)
    if not study_ids:
        return {}
    for sid, name in session.execute(
        select(CohortMember.study_id, CohortMember.cohort_name).where(
            CohortMember.study_id.in_(study_ids)
        )
    ):
        out[int(sid)].append(str(name))
    return {k: tuple(sorted(v)) for k, v in out.items()}


def list_models(settings: Settings) -> list[ModelRef]:
    """Models with stored predictions: the promoted ones first (``workbench promote``: the
    model the app opens on), then the most recently used."""
    from workbench.review.promotion import PromotionError, read_registry

    try:
        promoted = set(read_registry(settings).values())
    except PromotionError:
        promoted = set()
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
    return sorted(
        models,
        key=lambda m: (f"{m.name}/{m.version}" in promoted, m.newest, version_number(m.version)),
        reverse=True,
    )


def worklist(settings: Settings, bundle_hash: str, viewer: str | None = None) -> list[WorklistRow]:
    """The newest prediction per study of one model, highest priority first.

    With ``viewer`` the statuses are as that (blinded) reader may see them.
    """
    preds = latest_predictions(settings, bundle_hash)
    with new_session(settings.database_url) as session:
        reviews = current_reads(session, [p.id for p in preds.values()])
        cohorts = _cohorts_of(session, [int(p.study_id) for p in preds.values()])
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
                status=review_status(reviews.get(p.id), viewer),
                cohorts=cohorts.get(int(p.study_id), ()),
                prediction_set=p.prediction_set,
                ood_flag=bool(p.ood_flag),
            )
        )
    # Priority first; among equals the less certain (larger set, probability nearer 0.5) first.
    return sorted(
        rows, key=lambda r: (-r.priority, -r.set_size, abs(r.priority - 0.5), r.study_key)
    )


#: At most this many of a volume's file windows are offered (distinct ones, in slice order).
MAX_VOLUME_WINDOWS = 8


def _file_windows(value: Any) -> list[FileWindow]:
    """Windows as the catalog records them (see ``Instance.windows``); malformed entries are
    left out."""
    out = []
    for w in value or ():
        try:
            center, width = float(w["center"]), float(w["width"])
        except (KeyError, TypeError, ValueError):
            continue
        explanation = w.get("explanation")
        out.append(FileWindow(center, width, str(explanation) if explanation else None))
    return out


def _hounsfield_refs(
    session: Any, study_id: int, keys: set[str]
) -> dict[str, tuple[str | None, tuple[FileWindow, ...]]]:
    """For the shown images' cache keys (an instance's, or a series' volume), the HU cache key
    and the file windows, looked up within the prediction's own study."""
    rows = session.execute(
        select(
            Instance.cache_key,
            Instance.hu_cache_key,
            Instance.windows,
            Instance.slice_position,
            Instance.instance_number,
            Series.id,
            Series.volume_cache_key,
            Series.hu_volume_cache_key,
        )
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id == study_id)
    ).all()
    out: dict[str, tuple[str | None, tuple[FileWindow, ...]]] = {}
    volumes: dict[int, list[Any]] = defaultdict(list)
    for row in rows:
        if row.cache_key in keys:
            out[row.cache_key] = (row.hu_cache_key, tuple(_file_windows(row.windows)))
        if row.volume_cache_key in keys:
            volumes[row.id].append(row)
    for slices in volumes.values():
        slices.sort(key=lambda r: (r.slice_position or 0.0, r.instance_number or 0))
        windows: list[FileWindow] = []
        for r in slices:
            for w in _file_windows(r.windows):
                if w not in windows and len(windows) < MAX_VOLUME_WINDOWS:
                    windows.append(w)
        first = slices[0]
        out[first.volume_cache_key] = (first.hu_volume_cache_key, tuple(windows))
    return out


def load_prediction(settings: Settings, prediction_id: int) -> PredictionDetail | None:
    with new_session(settings.database_url) as session:
        p = session.get(Prediction, prediction_id)
        if p is None:
            return None
        study = p.study
        hu = _hounsfield_refs(session, study.id, {str(im["cache_key"]) for im in p.per_image})
        images = tuple(
            ImageRef(
                view=str(im.get("view") or f"image {n + 1}"),
                cache_key=str(im["cache_key"]),
                saliency_file=im.get("saliency_file"),
                saliency_target=im.get("saliency_target"),
                probabilities={str(k): float(v) for k, v in im.get("probabilities", {}).items()},
                pixel_hash=im.get("pixel_hash"),
                hu_cache_key=hu.get(str(im["cache_key"]), (None, ()))[0],
                windows=hu.get(str(im["cache_key"]), (None, ()))[1],
            )
            for n, im in enumerate(p.per_image)
        )
        probabilities = {str(k): float(v) for k, v in p.probabilities.items()}
        classes = tuple(probabilities) or _bundle_classes(settings, p.model_name, p.model_version)
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
            classes=classes,
            probabilities=probabilities,
            predicted_label=p.predicted_label,
            top_finding=_top_finding(probabilities, p.priority, target),
            priority=float(p.priority),
            top_k=tuple((str(c), float(v)) for c, v in p.top_k),
            images=images,
            explain_method=p.explain_method,
            created_at=p.created_at,
            prediction_set=p.prediction_set,
            ood_flag=bool(p.ood_flag),
            ood=p.ood,
            similar=tuple(dict(x) for x in (p.similar or [])),
            calibration_map=p.calibration_map,
        )


def _bundle_classes(settings: Settings, model_name: str, model_version: str) -> tuple[str, ...]:
    """The bundle's classes (for the review form of a study the model did not score)."""
    try:
        return read_bundle_info(settings.models_dir, f"{model_name}/{model_version}").classes
    except BundleError:
        return ()


def bundle_trust(settings: Settings, model_name: str, model_version: str) -> dict[str, Any]:
    """The bundle's ``workbench.predict.trust`` metadata (operating points, saliency checks), or {}
    for an older bundle or one that is no longer on disk."""
    try:
        info = read_bundle_info(settings.models_dir, f"{model_name}/{model_version}")
    except BundleError:
        return {}
    return dict(info.contract.trust)


def saliency_files(settings: Settings, bundle_hash: str, image: ImageRef) -> dict[str, str]:
    """Every saliency method cached for one image: method -> file relative to the cache."""
    found: dict[str, str] = {}
    if not image.pixel_hash:
        return found
    for method in EXPLAIN_METHODS:
        if method == "none":
            continue
        path = saliency_path(settings, bundle_hash, image.pixel_hash, method)
        if path.is_file():
            found[method] = str(path.relative_to(settings.cache_dir))
    return found


def thumbnail_keys(settings: Settings, study_keys: list[str]) -> dict[str, str]:
    """For each study key, the cache key of one image to show as a thumbnail (a frontal view
    when there is one); studies without a cached image are left out."""
    if not study_keys:
        return {}
    rank = {"PA": 0, "AP": 1}
    best: dict[str, tuple[int, int, str]] = {}
    with new_session(settings.database_url) as session:
        rows = session.execute(
            select(Study.study_key, Series.view_position, Instance.id, Instance.cache_key)
            .join(Series, Series.study_id == Study.id)
            .join(Instance, Instance.series_id == Series.id)
            .where(Study.study_key.in_(study_keys))
        ).all()
    for key, view, iid, cache_key in rows:
        cand = (rank.get(str(view or "").upper(), 2), int(iid), str(cache_key))
        if key not in best or cand < best[key]:
            best[str(key)] = cand
    return {k: v[2] for k, v in best.items()}


@dataclass(frozen=True)
class ModelStatus:
    ref: str  # NAME/VERSION
    created: str
    promoted_for: tuple[str, ...]  # the tasks it is promoted for


def model_statuses(settings: Settings) -> list[ModelStatus]:
    """Every bundle on disk with the tasks it is promoted for (models/promoted.json)."""
    from workbench.review.promotion import PromotionError, read_registry

    try:
        registry = read_registry(settings)
    except PromotionError:
        registry = {}
    by_ref: dict[str, list[str]] = defaultdict(list)
    for task, ref in registry.items():
        by_ref[ref].append(task)
    return [
        ModelStatus(
            ref=b.ref,
            created=b.contract.created,
            promoted_for=tuple(sorted(by_ref.get(b.ref, []))),
        )
        for b in list_bundles(settings.models_dir)
    ]


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
