"""Predictions: calibrated, aggregated per study, explained, stored with their hashes."""

from __future__ import annotations

import csv

import numpy as np
from sqlalchemy import select

from tests.conftest import Pipeline
from workbench.catalog.cohorts import cohort_items
from workbench.catalog.ingest import cache_path
from workbench.db.store import Prediction, session_scope
from workbench.model.bundle import load_bundle
from workbench.predict.inference import write_csv
from workbench.predict.results import latest_predictions


def test_each_prediction_is_stored_with_pixel_and_bundle_hashes(pipeline: Pipeline) -> None:
    s = pipeline.settings
    bundle = load_bundle(s.models_dir, pipeline.model)
    items = {i.study_id: i for i in cohort_items(s, pipeline.cohort, "test")}
    with session_scope(s.database_url) as session:
        rows = session.scalars(select(Prediction).where(Prediction.study_id.in_(items))).all()
        assert len(rows) == len(items)
        for row in rows:
            assert row.bundle_hash == bundle.bundle_hash
            assert row.pixel_hashes == list(items[row.study_id].pixel_hashes)
            assert row.transform_hash == bundle.spec.transform_hash()
            assert row.code_version
            assert abs(sum(row.probabilities.values()) - 1) < 1e-6
            assert row.predicted_label == max(row.probabilities, key=row.probabilities.get)
            assert [c for c, _ in row.top_k] == sorted(
                row.probabilities, key=row.probabilities.get, reverse=True
            )
            assert len(row.per_image) == 2  # PA and lateral views
            findings = {c: p for c, p in row.probabilities.items() if c != "normal"}
            assert row.priority == max(findings.values())


def test_saliency_maps_have_the_image_shape_are_finite_and_not_constant(
    pipeline: Pipeline,
) -> None:
    s = pipeline.settings
    bundle = load_bundle(s.models_dir, pipeline.model)
    preds = latest_predictions(s, bundle.bundle_hash)
    assert preds
    informative = total = 0
    for pred in preds.values():
        for im in pred.per_image:
            heat = np.load(s.cache_dir / im["saliency_file"]).astype(np.float32)
            image = np.load(cache_path(s, im["cache_key"]))
            assert heat.shape == image.shape  # mapped back onto the image's own grid
            assert np.isfinite(heat).all()
            assert heat.min() >= 0.0 and heat.max() <= 1.0
            total += 1
            informative += heat.std() > 0
    # Grad-CAM keeps only positive evidence: for a weak 2-epoch model an image may hold none
    # for its top finding (an honest all-zero map), but most maps must point somewhere.
    assert informative >= 0.75 * total, f"{informative} of {total} maps are informative"


def test_predictions_csv_uses_study_keys_not_uids(pipeline: Pipeline, tmp_path) -> None:
    s = pipeline.settings
    bundle = load_bundle(s.models_dir, pipeline.model)
    preds = list(latest_predictions(s, bundle.bundle_hash).values())
    out = tmp_path / "p.csv"
    write_csv(out, bundle, preds)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(preds)
    assert {r["study_key"] for r in rows} == {p.study.study_key for p in preds}
    text = out.read_text()
    assert "1.2." not in text.replace(bundle.bundle_hash, "")  # no DICOM UIDs
    for c in bundle.classes:
        assert all(0.0 <= float(r[f"p_{c}"]) <= 1.0 for r in rows)
