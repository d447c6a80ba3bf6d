"""The labelling page (AppTest): a clinician reads a suggested study with the model's output
hidden unless asked for, and the read lands as a label with its provenance."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from tests.conftest import TINY_COHORT, TINY_MODEL, Pipeline, copy_home
from workbench.db.store import AuditEvent, Prediction, Review, session_scope
from workbench.review import users
from workbench.review.worklist import Suggestion, Worklist, worklist_path
from workbench.ui import auth
from workbench.ui.common import page_file
from workbench.ui.labelling import validate_read

PASSWORD = "labelling-fixture-password"  # test fixture only


@pytest.fixture
def worklist(pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A copy of the pipeline's home with a clinician and a worklist of three stored
    predictions (as `workbench suggest` leaves them)."""
    settings = copy_home(pipeline, tmp_path / "home", monkeypatch)
    users.add_user(settings, "test", "ann", "clinician", PASSWORD)
    with session_scope(settings.database_url) as s:
        preds = s.scalars(select(Prediction).order_by(Prediction.id).limit(3)).all()
        picks = [
            (p.id, p.study.study_key, p.predicted_label, tuple(p.probabilities)) for p in preds
        ]
    made = Worklist(
        cohort=TINY_COHORT,
        models=(f"{TINY_MODEL}/v1",),
        strategy="entropy",
        n_unlabelled=3,
        n_labelled_reference=0,
        suggestions=tuple(
            Suggestion(n + 1, key, 0.5, predicted, None, pid)
            for n, (pid, key, predicted, _) in enumerate(picks)
        ),
        classes=picks[0][3],
    )
    path = worklist_path(settings, TINY_COHORT)
    path.parent.mkdir(parents=True)
    import json

    path.write_text(json.dumps(made.to_dict()))
    return settings, picks


def _page() -> AppTest:
    at = AppTest.from_file(str(page_file("labelling")), default_timeout=120)
    at.session_state[auth.SESSION_KEY] = {"name": "ann", "role": "clinician"}
    at.session_state[auth.LAST_SEEN] = time.time()
    return at.run()


def _submit(at: AppTest) -> None:
    next(b for b in at.button if b.label == "Save read").click().run()


def _reads(settings) -> list[Review]:  # noqa: ANN001
    with session_scope(settings.database_url) as s:
        rows = s.scalars(select(Review).order_by(Review.id)).all()
        s.expunge_all()
        return list(rows)


def test_a_read_is_blind_by_default_and_lands_with_its_provenance(worklist) -> None:
    settings, picks = worklist
    at = _page()
    assert not at.exception, at.exception
    text = " ".join(m.value for m in at.markdown) + " ".join(c.value for c in at.caption)
    assert "predicted" not in text  # the model's output is hidden
    assert at.toggle(key="labelling_show_model").value is False
    pid, key, predicted, classes = picks[0]  # the first unread study is open
    label = next(c for c in classes if c != predicted)
    at.selectbox(key=f"label_{pid}_label").select(label)
    _submit(at)
    assert not at.exception, at.exception
    assert any("saved" in s.value for s in at.success)
    (read,) = _reads(settings)
    assert (read.prediction_id, read.reviewer, read.label, read.kind) == (pid, "ann", label, "read")
    assert read.model_visible is False and read.agree is False and read.version == 1
    with session_scope(settings.database_url) as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "review.create")).one()
        assert event.new_value["model_visible"] is False
    # the next open study is the next unread one; showing the model is recorded with the read
    at = _page()
    pid2, _, predicted2, _ = picks[1]
    at.toggle(key="labelling_show_model").set_value(True).run()
    assert any(predicted2 in c.value for c in at.caption)
    at.selectbox(key=f"label_{pid2}_label").select(predicted2)
    _submit(at)
    reads = _reads(settings)
    assert reads[-1].prediction_id == pid2 and reads[-1].model_visible is True
    assert reads[-1].agree is True


def test_a_read_without_a_label_or_with_no_finding_beside_findings_is_refused() -> None:
    assert validate_read([], None, multilabel=False) == "Choose a label."
    assert validate_read([], "normal", multilabel=True) == "Choose the findings present."
    assert "choose it alone" in str(validate_read(["normal", "nodule"], "normal", True))
    assert validate_read(["nodule", "effusion"], "normal", True) is None
    assert validate_read(["normal"], "normal", True) is None
