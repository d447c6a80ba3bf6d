"""Batch tagging: `workbench predict MODEL FOLDER` ingests, predicts and resumes after a stop."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.conftest import make_settings
from workbench.cli import main
from workbench.db.store import Prediction, session_scope
from workbench.dicom.synth import synthesize_cohort

N_STUDIES = 5


def test_an_interrupted_folder_run_resumes_without_duplicate_predictions(
    pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "incoming"
    synthesize_cohort(src, n_studies=N_STUDIES, seed=11, modality="DX", image_size=64)
    home = make_settings(tmp_path / "home")
    monkeypatch.setenv("WORKBENCH_HOME", str(home.home))
    monkeypatch.setenv("WORKBENCH_DATABASE_URL", home.database_url)
    monkeypatch.setenv("WORKBENCH_CACHE", str(home.cache_dir))
    monkeypatch.setenv("WORKBENCH_MODELS", str(pipeline.settings.models_dir))
    monkeypatch.delenv("WORKBENCH_DEBUG", raising=False)
    out = tmp_path / "tags.csv"
    args = ["predict", pipeline.model, str(src), "--explain", "none", "--out", str(out)]

    # A run stopped after 2 studies (--max stands in for a kill: rows are committed per
    # study, so a kill leaves the same state as a stop between two studies).
    assert main([*args, "--max", "2"]) == 0
    first = capsys.readouterr().out
    assert "predicted 2 studies" in first and f"{N_STUDIES - 2} left" in first

    def rows() -> int:
        with session_scope(home.database_url) as session:
            return int(session.scalar(select(func.count(Prediction.id))) or 0)

    assert rows() == 2
    assert main(args) == 0
    second = capsys.readouterr().out
    assert f"predicted {N_STUDIES - 2} studies" in second and "(2 already done)" in second
    assert rows() == N_STUDIES
    assert main(args) == 0  # a third run has nothing left to do
    assert "predicted 0 studies" in capsys.readouterr().out
    assert rows() == N_STUDIES

    with out.open(newline="") as fh:
        tags = list(csv.DictReader(fh))
    assert len(tags) == N_STUDIES == len({t["study_key"] for t in tags})
    for t in tags:
        # Top-k tags with their calibrated probabilities, most probable first.
        top = [(c, float(p)) for c, p in (kv.split(":") for kv in t["top_k"].split(";"))]
        assert top[0][0] == t["predicted_label"]
        assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
        assert abs(float(t[f"p_{top[0][0]}"]) - top[0][1]) < 1e-4
