"""Stored predictions and their cached saliency maps, read without torch (the app uses this;
:mod:`workbench.inference` makes them)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from workbench.config import Settings
from workbench.store import Prediction, new_session

EXPLAIN_METHODS: tuple[str, ...] = ("gradcam", "ig", "occlusion", "none")


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
