"""Send results back to the PACS: per study, a TID 1500 SR and the heat-map overlays (STOW-RS).

For the latest stored prediction of each selected study this reads the source files' headers
(from ``Instance.path``; the objects carry the patient and study identity because they go back to
the PACS the study came from), builds the SR (``dicom.write.build_measurement_report``) and one
Secondary Capture per explained image (the cached display pixels with the cached saliency map
drawn over them, as the review app shows them), stores them in one STOW-RS request and writes an
audit event. Logs and messages name studies by their study key only.

The objects' UIDs are derived from the prediction (bundle hash, study, prediction row and time),
so sending the same prediction again sends the same instances, not new copies.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import func, select
from tqdm import tqdm

from workbench.catalog.ingest import cache_path
from workbench.config import Settings
from workbench.db.store import Instance, Prediction, Series, Study, record_audit, session_scope
from workbench.dicom.dicomweb import (
    Credentials,
    DicomwebError,
    ServerUnreachableError,
    _display_url,
    connect,
    store_instances,
)
from workbench.dicom.write import (
    DicomWriteError,
    ModelIdentity,
    build_measurement_report,
    build_overlay_image,
    derived_uid,
)
from workbench.errors import NotFoundError, WorkbenchError
from workbench.predict.results import probability_text

logger = logging.getLogger(__name__)

ACTOR = "cli"
ACTION = "send_to_pacs"
OVERLAY_ALPHA = 0.4  # the review app's default


class SendError(WorkbenchError):
    """A study's result cannot be built (missing source files, cache or saliency)."""


@dataclass(frozen=True)
class _Source:
    sop_uid: str
    path: str
    cache_key: str
    series_uid: str
    volume_cache_key: str | None
    order: tuple[float, int]  # slice position, instance number (volumes are stacked this way)


@dataclass(frozen=True)
class _Job:
    prediction_id: int
    study_key: str
    study_uid: str
    created_at: str
    model: ModelIdentity
    probabilities: dict[str, float]
    predicted_label: str
    explain_method: str | None
    per_image: tuple[dict[str, object], ...]
    sources: tuple[_Source, ...]


@dataclass(frozen=True)
class SendSummary:
    sent: tuple[str, ...]  # study keys
    failed: tuple[str, ...]  # "study key: reason"
    instances: int

    def line(self) -> str:
        return (
            f"sent {len(self.sent)} studies ({self.instances} instances), failed {len(self.failed)}"
        )


def _jobs(settings: Settings, study_keys: Sequence[str] | None, model: str | None) -> list[_Job]:
    """The latest prediction of each selected study, as plain records."""
    with session_scope(settings.database_url) as session:
        latest = select(func.max(Prediction.id)).join(Study, Study.id == Prediction.study_id)
        if model:
            name, _, version = model.partition("/")
            latest = latest.where(Prediction.model_name == name)
            if version:
                latest = latest.where(Prediction.model_version == version)
        if study_keys is not None:
            wanted = set(study_keys)
            known = set(session.scalars(select(Study.study_key).where(Study.study_key.in_(wanted))))
            if wanted - known:
                raise NotFoundError(f"no study with key {', '.join(sorted(wanted - known))}")
            latest = latest.where(Study.study_key.in_(wanted))
        ids = list(session.scalars(latest.group_by(Prediction.study_id)))
        jobs = []
        for p in session.scalars(select(Prediction).where(Prediction.id.in_(ids))):
            rows = session.execute(
                select(Instance, Series)
                .join(Series, Series.id == Instance.series_id)
                .where(Series.study_id == p.study_id)
            ).all()
            sources = tuple(
                _Source(
                    sop_uid=i.sop_uid,
                    path=i.path,
                    cache_key=i.cache_key,
                    series_uid=s.series_uid,
                    volume_cache_key=s.volume_cache_key,
                    order=(i.slice_position or 0.0, i.instance_number or 0),
                )
                for i, s in rows
            )
            jobs.append(
                _Job(
                    prediction_id=p.id,
                    study_key=p.study.study_key,
                    study_uid=p.study.study_uid,
                    created_at=p.created_at.isoformat(),
                    model=ModelIdentity(p.model_name, p.model_version, p.bundle_hash),
                    probabilities={str(k): float(v) for k, v in p.probabilities.items()},
                    predicted_label=p.predicted_label,
                    explain_method=p.explain_method,
                    per_image=tuple(dict(im) for im in p.per_image),
                    sources=sources,
                )
            )
    return sorted(jobs, key=lambda j: j.study_key)


def _header(source: _Source) -> Dataset:
    try:
        return pydicom.dcmread(source.path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as err:
        raise SendError(f"a source file is unreadable ({type(err).__name__})") from None


def _image_sources(job: _Job, cache_key: str) -> list[_Source]:
    """The instances behind one model input: one 2D instance, or a volume's sorted slices."""
    flat = [s for s in job.sources if s.cache_key == cache_key]
    if flat:
        return flat[:1]
    return sorted(
        (s for s in job.sources if s.volume_cache_key == cache_key), key=lambda s: s.order
    )


def _load(path: Path) -> np.ndarray:
    try:
        return np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)
    except (OSError, ValueError):
        raise SendError("a cached image or saliency map is missing") from None


def _overlays(settings: Settings, job: _Job, headers: dict[str, Dataset]) -> list[Dataset]:
    """One Secondary Capture per explained image of the prediction."""
    from workbench.predict.heatmap import overlay

    root = settings.cache_dir.resolve()
    out: list[Dataset] = []
    for n, im in enumerate(job.per_image):
        sal_file = im.get("saliency_file")
        if not sal_file:
            continue
        cache_key = str(im["cache_key"])
        refs = _image_sources(job, cache_key)
        if not refs:
            raise SendError("the prediction's images are no longer in the catalog")
        sal_path = (root / str(sal_file)).resolve()
        if not sal_path.is_relative_to(root):
            raise SendError("a saliency path leaves the cache folder")
        display, heat = _load(cache_path(settings, cache_key)), _load(sal_path)
        if display.shape != heat.shape:
            raise SendError("a saliency map does not match its image")
        ref = refs[0]
        if display.ndim == 3:  # a volume: the slice where the map is strongest
            k = int(np.argmax(heat.reshape(heat.shape[0], -1).sum(axis=1)))
            display, heat = display[k], heat[k]
            ref = refs[min(k, len(refs) - 1)]
        rgb = overlay(display, heat, alpha=OVERLAY_ALPHA)
        target = str(im.get("saliency_target") or job.predicted_label)
        p = job.probabilities.get(target)
        method = job.explain_method or "saliency"
        caption = f"{method} saliency for {target}" + (
            f" (calibrated probability {probability_text(p)})" if p is not None else ""
        )
        out.append(
            build_overlay_image(
                headers[ref.sop_uid],
                rgb,
                job.model,
                [caption],
                description=f"{method} saliency map for {target} over the displayed image",
                series_uid=_uid(job, "sc-series"),
                sop_uid=_uid(job, "sc", str(n)),
                instance_number=n + 1,
            )
        )
    return out


def _uid(job: _Job, *what: str) -> str:
    return derived_uid(
        job.model.bundle_hash, job.study_uid, str(job.prediction_id), job.created_at, *what
    )


def build_study_objects(settings: Settings, job: _Job) -> list[Dataset]:
    """The SR and the overlays of one prediction."""
    used = {str(im["cache_key"]) for im in job.per_image}
    sources = [s for key in sorted(used) for s in _image_sources(job, key)] or list(job.sources)
    if not sources:
        raise SendError("the study has no instances in the catalog")
    headers = {s.sop_uid: _header(s) for s in sources}
    try:
        sr = build_measurement_report(
            [headers[s.sop_uid] for s in sources],
            job.probabilities,
            job.predicted_label,
            job.model,
            series_uid=_uid(job, "sr-series"),
            sop_uid=_uid(job, "sr"),
        )
        return [sr, *_overlays(settings, job, headers)]
    except DicomWriteError as err:
        raise SendError(str(err)) from None


def send_results(
    settings: Settings,
    url: str,
    credentials: Credentials | None,
    study_keys: Sequence[str] | None = None,
    model: str | None = None,
    timeout: float = 30,
    progress: bool = True,
) -> SendSummary:
    """Build and STOW the SR and overlays of the latest prediction of each selected study.

    Args:
        settings: the workbench home (catalog, predictions, caches).
        url: the DICOMweb service root.
        credentials: basic-auth credentials (see ``load_credentials``), or None.
        study_keys: the studies to send, by study key; None for every predicted study.
        model: only predictions of this model (``NAME`` or ``NAME/VERSION``).
        timeout: seconds per HTTP request.

    A study whose objects cannot be built, or which the server refuses, is counted as failed and
    the rest go on; a server that cannot be reached or refuses the credentials stops the send.
    """
    jobs = _jobs(settings, study_keys, model)
    if not jobs:
        raise NotFoundError("no stored predictions match: run `workbench predict` first")
    client = connect(url, credentials, timeout=timeout)
    sent: list[str] = []
    failed: list[str] = []
    n_instances = 0
    for job in tqdm(jobs, desc="send", unit="study", disable=not progress):
        try:
            objects = build_study_objects(settings, job)
            result = store_instances(client, objects)
        except ServerUnreachableError:
            raise
        except DicomwebError as err:
            if err.status in (401, 403):
                raise
            failed.append(f"{job.study_key}: {err}")
            logger.warning("study %s not sent: %s", job.study_key, err)
            continue
        except SendError as err:
            failed.append(f"{job.study_key}: {err}")
            logger.warning("study %s not sent: %s", job.study_key, err)
            continue
        with session_scope(settings.database_url) as session:
            record_audit(
                session,
                ACTOR,
                ACTION,
                "prediction",
                job.prediction_id,
                new_value={
                    "study_key": job.study_key,
                    "server": _display_url(url),
                    "model": f"{job.model.name}/{job.model.version}",
                    "bundle_hash": job.model.bundle_hash,
                    "sr_sop_instance_uid": str(objects[0].SOPInstanceUID),
                    "sc_sop_instance_uids": [str(o.SOPInstanceUID) for o in objects[1:]],
                    "stored": len(result.stored),
                },
            )
        sent.append(job.study_key)
        n_instances += len(objects)
        logger.info("study %s: sent %d instances", job.study_key, len(objects))
    return SendSummary(tuple(sent), tuple(failed), n_instances)
