"""The loop closed: predict with the promoted model, clinicians read, their reads become a
cohort, the promoted model is fine-tuned on it, compared, and promoted or refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.conftest import TINY_COHORT, TINY_MODEL, Pipeline, copy_home
from workbench.cli import main
from workbench.db.store import AuditEvent, Prediction, session_scope
from workbench.review.promotion import promoted_model
from workbench.review.reviews import save_review


@pytest.fixture
def home(pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A copy of the pipeline's home: catalog (SQLite's backup API), pixel cache and model."""
    settings = copy_home(pipeline, tmp_path / "home", monkeypatch, models=True)
    return settings


def test_reads_fine_tune_the_promoted_model_which_is_then_guarded(home, capsys) -> None:
    # the model in use for the task
    assert main(["promote", f"{TINY_MODEL}/v1", "--resamples", "50"]) == 0
    # predict: the promoted model tags the studies it had not seen (the train split)
    assert main(["predict", "--cohort", TINY_COHORT, "--split", "train", "--explain", "none"]) == 0
    # read: two clinicians read every prediction; they disagree on one study
    with session_scope(home.database_url) as s:
        preds = [
            (p.id, p.study.label, p.study.study_key, tuple(p.probabilities))
            for p in s.scalars(select(Prediction).order_by(Prediction.id))
        ]
    assert len({key for _, _, key, _ in preds}) == 36  # every study has a prediction now
    read_keys: set[str] = set()
    for pid, label, key, classes in preds:
        if key in read_keys:
            continue
        other = next(c for c in classes if c != label)
        save_review(home, "ann", pid, True, label, "")
        save_review(home, "bob", pid, True, label if read_keys else other, "")  # one dispute
        read_keys.add(key)
    # the reads become a cohort of their own
    capsys.readouterr()
    assert main(["cohort", "from-reads", "reads", "--source", TINY_COHORT, "--reads-only"]) == 0
    assert "35 labelled studies (35 read); left out: 1 conflict" in capsys.readouterr().out
    # fine-tune the promoted model on it
    code = main(
        ["train", "--cohort", "reads", "--name", TINY_MODEL, "--init-from", "promoted",
         "--epochs", "1", "--image-size", "64", "--batch-size", "8", "--precision", "fp32",
         "--label-randomization-epochs", "0", "--sanity-images", "0"]
    )  # fmt: skip
    assert code == 0
    meta = json.loads(
        (home.models_dir / TINY_MODEL / "v2" / "configs" / "metadata.json").read_text()
    )
    training = meta["workbench"]["training"]
    assert training["init_from"] == f"{TINY_MODEL}/v1"  # the promoted model, by name
    assert meta["workbench"]["split"]["label_sources"]["train"].get("read", 0) > 0
    # compare and guard: the new version is promoted or refused, and either is audited
    capsys.readouterr()
    assert main(["compare", f"{TINY_MODEL}/v1", f"{TINY_MODEL}/v2", "--cohort", "reads",
                 "--resamples", "50"]) == 0  # fmt: skip
    assert "AUROC" in capsys.readouterr().out
    code = main(["promote", f"{TINY_MODEL}/v2", "--resamples", "50"])
    with session_scope(home.database_url) as s:
        decisions = [
            e.action
            for e in s.scalars(select(AuditEvent).where(AuditEvent.object_type == "model_task"))
        ]
    assert decisions[0] == "promote"  # v1
    if code == 0:
        assert decisions[-1] == "promote" and promoted_model(home, TINY_MODEL) == f"{TINY_MODEL}/v2"
    else:
        assert code == 1 and decisions[-1] == "promote_refused"
        assert promoted_model(home, TINY_MODEL) == f"{TINY_MODEL}/v1"


def test_init_from_promoted_needs_a_promoted_model(home, capsys) -> None:
    code = main(["train", "--cohort", TINY_COHORT, "--name", "other", "--init-from", "promoted"])
    assert code == 1
    assert capsys.readouterr().err.strip() == (
        "error: --init-from promoted: no model is promoted for task 'other' "
        "(see `workbench promote`)"
    )
