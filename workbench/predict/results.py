"""Stored predictions and their cached saliency maps, read without torch (the app uses this;
:mod:`workbench.predict.inference` makes them), and how a probability reads to a person."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from workbench.config import Settings
from workbench.db.store import Prediction, new_session

EXPLAIN_METHODS: tuple[str, ...] = ("gradcam", "ig", "occlusion", "none")


def probability_text(p: float | None) -> str:
    """A probability as a person reads it: whole percent, never rounded onto a bound.

    * exactly 0 and exactly 1 read "0%" and "100%" (values outside [0, 1] are clipped);
    * anything else below 1% reads "<1%" and anything above 99% reads ">99%", so that 0.9996
      never shows as "100%" nor 0.0004 as "0%";
    * in between, the nearest whole percent (a half rounds up): 0.125 reads "13%";
    * ``None`` and NaN read "n/a".

    Whole percent because the probabilities are calibrated on a few hundred studies: a finer
    step would claim a precision the calibration does not have. Machine-readable outputs (JSON,
    CSV) keep the full number; this is for the app, captions and printed lines only.
    """
    if p is None or math.isnan(p):
        return "n/a"
    if p >= 1.0:
        return "100%"
    if p <= 0.0:
        return "0%"
    if p < 0.01:
        return "<1%"
    if p > 0.99:
        return ">99%"
    return f"{math.floor(100.0 * p + 0.5):d}%"


def saliency_path(settings: Settings, bundle_hash: str, pixel_hash: str, method: str) -> Path:
    key = hashlib.sha256(f"{bundle_hash}|{pixel_hash}|{method}".encode()).hexdigest()
    return settings.cache_dir / "saliency" / key[:2] / f"{key}.npy"


def latest_predictions(
    settings: Settings, bundle_hash: str, study_ids: Sequence[int] | None = None
) -> dict[int, Prediction]:
    """The newest stored prediction per study for one bundle."""
    with new_session(settings.database_url) as session:
        q = (
            select(Prediction)
            .where(Prediction.bundle_hash == bundle_hash)
            .options(selectinload(Prediction.study))
        )
        if study_ids is not None:
            q = q.where(Prediction.study_id.in_(list(study_ids)))
        rows: dict[int, Prediction] = {}
        for row in session.scalars(q.order_by(Prediction.id)):
            rows[row.study_id] = row
        return rows
