"""Comparing two bundles on the locked test split, and the guarded promotion built on it."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from workbench.cli import main
from workbench.config import Settings
from workbench.db.store import AuditEvent, session_scope, verify_audit
from workbench.evaluation.compare import compare_bundles
from workbench.review.promotion import (
    PromotionRefused,
    promote,
    promoted_model,
    read_registry,
)

N_RESAMPLES = 100
HEAD = "class_layers.out"  # DenseNet121's final linear layer


def _copy(src: Path, dst: Path, note: str) -> Path:
    """A copy of a bundle; its metadata gets a note so the bundle hash differs."""
    shutil.copytree(src, dst)
    meta = dst / "configs" / "metadata.json"
    data = json.loads(meta.read_text())
    data["changelog"]["copy"] = note
    meta.write_text(json.dumps(data, indent=2))
    return dst


def _edit_head(bundle: Path, scale: float) -> None:
    """Multiply the final layer's weights and bias by ``scale`` (0: a constant score)."""
    weights = bundle / "models" / "model.pt"
    state = torch.load(weights, weights_only=True)
    state[f"{HEAD}.weight"].mul_(scale)
    state[f"{HEAD}.bias"].mul_(scale)
    torch.save(state, weights)


@pytest.fixture(scope="module")
def home(pipeline, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The pipeline's catalog and bundle copied to a home of its own, with more versions of
    the tiny model: v2 its head negated, v3 its head zeroed (every study gets the same
    probabilities: AUROC 0.5, the degraded model). The session's 2-epoch model is close to
    chance and may rank worse than chance on its 8 test studies; its negated twin then ranks
    better, so one of v1 / v2 is a model clearly better than v3 (see ``good``)."""
    root = tmp_path_factory.mktemp("promote")
    src = pipeline.settings.database_url.removeprefix("sqlite:///")
    dst = root / "workbench.db"
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    models = root / "models"
    v1 = models / pipeline.model / "v1"
    shutil.copytree(pipeline.bundle, v1)
    _edit_head(_copy(v1, v1.parent / "v2", "head negated"), -1.0)
    _edit_head(_copy(v1, v1.parent / "v3", "head zeroed"), 0.0)
    return dataclasses.replace(
        pipeline.settings, database_url=f"sqlite:///{dst}", models_dir=models
    )


@pytest.fixture(scope="module")
def good(pipeline, home: Settings) -> tuple[str, str]:
    """(the better of v1 and v2, v4: a copy of it with the same weights)."""
    m = pipeline.model
    data = compare_bundles(home, f"{m}/v1", f"{m}/v2", pipeline.cohort, n_resamples=10)
    best = "v1" if data["auroc"]["old"] >= data["auroc"]["new"] else "v2"
    auroc = max(data["auroc"]["old"], data["auroc"]["new"])
    # It must beat a constant score by more than the margin for the test to mean anything.
    assert auroc > 0.5 + 0.02, auroc
    root = home.models_dir / m
    _copy(root / best, root / "v4", f"same weights as {best}")
    return f"{m}/{best}", f"{m}/v4"


@pytest.fixture
def env(home: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Point the CLI's settings at the module's home."""
    monkeypatch.setenv("WORKBENCH_DATABASE_URL", home.database_url)
    monkeypatch.setenv("WORKBENCH_MODELS", str(home.models_dir))
    monkeypatch.delenv("WORKBENCH_DEBUG", raising=False)
    return home


def audit(settings: Settings, action: str) -> list[AuditEvent]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def test_compare_json_has_paired_auroc_flips_shifts_thresholds_and_subgroups(
    pipeline, env: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp.json"
    m = pipeline.model
    code = main(
        ["compare", f"{m}/v1", f"{m}/v3", "--cohort", pipeline.cohort, "--out", str(out)]
        + ["--resamples", str(N_RESAMPLES)]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "macro AUROC" in printed.out and "flip rate" in printed.out
    data = json.loads(out.read_text())
    assert data["old"]["model"] == f"{m}/v1" and data["new"]["model"] == f"{m}/v3"
    assert data["split"] == "test" and data["n_studies"] > 0
    a = data["auroc"]
    assert a["new"] == 0.5  # the zeroed head ranks every study the same
    assert a["diff"] == pytest.approx(a["new"] - a["old"], abs=1e-6)
    assert len(a["diff_ci"]) == 2
    assert 0 <= data["flip_rate"] <= 1
    shift = data["score_shift"]
    assert {"mean_old", "mean_new", "mean_shift", "ks_statistic", "ks_pvalue"} <= set(
        shift["finding"]
    )
    assert shift["finding"]["ks_statistic"] > 0  # a constant score is a shifted distribution
    assert set(shift["per_class"]) == set(data["classes"])
    for t in data["threshold"]["per_class"].values():
        assert {"old_sensitivity", "old_threshold", "new_threshold", "threshold_shift"} <= set(t)
    assert set(data["subgroups"]) == {"site", "manufacturer", "sex", "age_band", "view"}
    for rows in data["subgroups"].values():
        assert sum(r["n"] for r in rows) == data["n_studies"]


def test_the_same_weights_compare_as_identical(
    pipeline, env: Settings, good: tuple[str, str]
) -> None:
    data = compare_bundles(env, *good, pipeline.cohort, n_resamples=N_RESAMPLES)
    assert data["flip_rate"] == 0
    assert data["auroc"]["diff"] == 0
    assert data["score_shift"]["finding"]["ks_statistic"] == 0
    assert all(t["threshold_shift"] == 0 for t in data["threshold"]["per_class"].values())


def test_promotion_refuses_a_degraded_model_and_accepts_an_equal_one_with_audit_events(
    pipeline, env: Settings, good: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    m, task = pipeline.model, "chest"
    best, same = good
    degraded = f"{m}/v3"
    first = promote(env, best, task=task, reason="first model", n_resamples=N_RESAMPLES)
    assert first.promoted and first.previous is None and first.comparison is None
    assert promoted_model(env, task) == best

    with pytest.raises(PromotionRefused, match="refused to promote"):
        promote(env, degraded, task=task, n_resamples=N_RESAMPLES)
    assert read_registry(env) == {task: best}  # unchanged

    # The CLI: one line, non-zero exit; the registry still names the good model.
    code = main(["promote", degraded, "--task", task, "--resamples", str(N_RESAMPLES)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: refused to promote")

    code = main(
        ["promote", same, "--task", task, "--reason", "retrained"]
        + ["--resamples", str(N_RESAMPLES)]
    )
    assert code == 0, capsys.readouterr().err
    assert promoted_model(env, task) == same

    refused = audit(env, "promote_refused")
    assert len(refused) == 2
    assert refused[0].old_value["model"] == best
    assert refused[0].new_value["model"] == degraded
    assert refused[0].new_value["auroc_macro"] == 0.5
    done = audit(env, "promote")
    assert [e.new_value["model"] for e in done] == [best, same]
    assert done[1].old_value["model"] == best and done[1].reason == "retrained"
    assert done[1].new_value["auroc_diff"] == 0
    with session_scope(env.database_url) as session:
        assert verify_audit(session) is None


def test_predict_without_a_model_uses_the_promoted_one(
    pipeline, env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    (env.models_dir / "promoted.json").write_text(json.dumps({"t": f"{pipeline.model}/v2"}))
    code = main(["predict", "--cohort", pipeline.cohort, "--split", "test", "--explain", "none"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"with {pipeline.model}/v2" in out.out


def test_the_guard_refuses_on_the_point_difference_or_the_interval_and_explains() -> None:
    from workbench.review.promotion import guard

    def cmp(old: float, new: float, lo: float | None) -> dict:
        return {"auroc": {"old": old, "new": new, "diff": new - old, "diff_ci": [lo, None]}}

    assert guard(cmp(0.90, 0.89, -0.015), 0.02)[0] is True
    ok, why = guard(cmp(0.90, 0.85, -0.01), 0.02)
    assert not ok and "more than the margin" in why
    ok, why = guard(cmp(0.90, 0.90, -0.06), 0.02)
    assert not ok and "paired 95% CI" in why
    ok, why = guard(cmp(0.90, 0.91, None), 0.02)
    assert ok and "point difference decided" in why
    assert (
        guard({"auroc": {"old": None, "new": 0.9, "diff": None, "diff_ci": [None, None]}}, 0.02)[0]
        is False
    )


def test_the_threshold_for_a_sensitivity_keeps_that_share_of_positives() -> None:
    import numpy as np

    from workbench.evaluation.compare import threshold_for_sensitivity

    scores = np.asarray([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    positive = np.asarray([True, True, True, True, False, False])
    assert threshold_for_sensitivity(scores, positive, 0.5) == 0.8
    assert threshold_for_sensitivity(scores, positive, 1.0) == 0.6
    assert threshold_for_sensitivity(scores, positive, 0.0) == 0.9  # at least one positive
    assert threshold_for_sensitivity(scores, np.zeros(6, bool), 0.5) is None
