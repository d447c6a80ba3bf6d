"""The review app driven headless by Streamlit's AppTest, on the session's tiny pipeline.

Each test gets its own copy of the pipeline's database (reviews written here must not leak into
other tests' reports), while the cache and the model bundles are shared read-only.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df
from streamlit.testing.v1 import AppTest

from workbench.config import get_settings
from workbench.db.store import AuditEvent, Prediction, Review, session_scope, verify_audit
from workbench.predict.results import probability_text
from workbench.review import reviews as review_store
from workbench.review import users
from workbench.ui import auth, data
from workbench.ui.common import OPEN_PREDICTION, PAGE_FILES, page_file
from workbench.ui.imaging import blend, window_level

APP = Path(__file__).resolve().parents[1] / "streamlit_app.py"
TIMEOUT = 60


# Test fixture password (not a secret): every test account signs in with it.
PASSWORD = "test-fixture-password"  # test fixture only
ACCOUNTS = {
    "grey": "clinician",
    "yang": "clinician",
    "ross": "researcher",
    "audrey": "auditor",
    "bailey": "admin",
}


@pytest.fixture
def app_db(pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private copy of the pipeline's catalog, with one account per role; the app sees it
    through the environment."""
    src = pipeline.settings.database_url.removeprefix("sqlite:///")
    home = tmp_path / "home"
    home.mkdir()
    dst = home / "workbench.db"
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    url = f"sqlite:///{dst}"
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    monkeypatch.setenv("WORKBENCH_DATABASE_URL", url)
    monkeypatch.setenv("WORKBENCH_CACHE", str(pipeline.settings.cache_dir))
    monkeypatch.setenv("WORKBENCH_MODELS", str(pipeline.settings.models_dir))
    s = get_settings()
    for name, role in ACCOUNTS.items():
        users.add_user(s, "test", name, role, PASSWORD)
    # The tiny model may flag any study as out of distribution; the tests that need a flagged
    # study flag one themselves, so that the others see the same page every run.
    with session_scope(url) as session:
        for p in session.scalars(select(Prediction).where(Prediction.ood_flag.is_(True))):
            p.ood_flag = False
            p.ood = {**(p.ood or {}), "flagged": False}
    yield url


def new_app() -> AppTest:
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT)


def button(at: AppTest, label: str):
    matches = [b for b in at.button if b.label == label]
    assert matches, f"no button {label!r} among {[b.label for b in at.button]}"
    return matches[0]


def sign_in(name: str = "grey", password: str = PASSWORD) -> AppTest:
    at = new_app().run()
    at.text_input(key="signin_name").input(name)
    at.text_input(key="signin_password").input(password)
    button(at, "Sign in").click().run()
    assert not at.exception, at.exception
    return at


def open_first_study(at: AppTest) -> int:
    assert [t.value for t in at.title] == ["Worklist"]
    button(at, "Open study").click().run()
    assert not at.exception, at.exception
    return int(at.session_state[OPEN_PREDICTION])


def test_an_unsigned_session_sees_only_the_sign_in(app_db: str) -> None:
    at = new_app().run()
    assert not at.exception
    assert [t.value for t in at.title] == ["Clinician review workbench"]
    assert [w.label for w in at.text_input] == ["User name", "Password"]
    assert len(at.dataframe) == 0


def test_a_blank_name_does_not_sign_in(app_db: str) -> None:
    at = new_app().run()
    button(at, "Sign in").click().run()
    assert [e.value for e in at.error] == ["Enter your user name and password."]
    assert [t.value for t in at.title] == ["Clinician review workbench"]


def test_signing_out_returns_to_the_sign_in(app_db: str) -> None:
    at = sign_in()
    button(at, "Sign out").click().run()
    assert not at.exception, at.exception
    assert [t.value for t in at.title] == ["Clinician review workbench"]
    assert [w.label for w in at.text_input] == ["User name", "Password"]


def test_the_worklist_shows_the_predicted_studies_by_priority(app_db: str) -> None:
    at = sign_in()
    table = at.dataframe[0].value
    with session_scope(app_db) as session:
        preds = session.scalars(select(Prediction)).all()
        expected = sorted(
            ((p.priority, p.study.study_key) for p in preds), key=lambda t: (-t[0], t[1])
        )
    assert list(table["Study"]) == [key for _, key in expected]
    probs = list(table["Probability"])
    assert probs == sorted(probs, reverse=True)
    assert np.allclose(probs, [p for p, _ in expected])  # full precision: the column sorts
    shown = display_values(at.dataframe[0])["Probability"]
    assert list(shown) == [probability_text(p) for p, _ in expected]
    assert set(table["Review"]) == {"Unreviewed"}
    assert list(table.columns) == [
        "Study",
        "Site",
        "Modality",
        "Predicted",
        "Top finding",
        "Probability",
        "Prediction set",
        "OOD",
        "Top-k",
        "Review",
    ]
    # No UIDs or paths anywhere on the page: study keys are short pseudonyms.
    assert all(len(k) <= 16 and "." not in k for k in table["Study"])


def test_a_review_is_stored_with_its_audit_event(app_db: str) -> None:
    at = sign_in("grey")
    pid = open_first_study(at)
    with session_scope(app_db) as session:
        pred = session.get(Prediction, pid)
        assert pred is not None
        predicted, key = pred.predicted_label, pred.study.study_key
        corrected = next(c for c in pred.probabilities if c != predicted)
    assert [t.value for t in at.title] == [f"Study {key}"]
    assert {s.label for s in at.slider} >= {
        "Window level (center)",
        "Window width",
        "Heat-map opacity",
    }
    at.radio(key=f"review_{pid}_assessment").set_value("Disagree")
    at.selectbox(key=f"review_{pid}_label").set_value(corrected)
    at.text_area(key=f"review_{pid}_comment").input("Opacity is a positioning artefact.")
    button(at, "Submit review").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert any("saved" in s.value for s in at.success)

    with session_scope(app_db) as session:
        reviews = session.scalars(select(Review)).all()
        assert len(reviews) == 1
        review = reviews[0]
        assert (review.prediction_id, review.reviewer, review.agree, review.label) == (
            pid,
            "grey",
            False,
            corrected,
        )
        assert review.comment == "Opacity is a positioning artefact."
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.action == review_store.REVIEW_ACTION)
        ).all()
        assert len(events) == 1
        ev = events[0]
        assert (ev.actor, ev.object_type, ev.object_id) == ("grey", "review", str(review.id))
        assert ev.new_value is not None
        assert ev.new_value["agree"] is False
        assert ev.new_value["label"] == corrected
        assert ev.new_value["comment"] == "Opacity is a positioning artefact."
        assert ev.new_value["prediction_id"] == pid
        assert ev.new_value["study_key"] == key
        assert verify_audit(session) is None

    # "Next unreviewed" moves on to another study; the worklist shows this one as disagreed.
    button(at, "Next unreviewed").click().run()
    assert int(at.session_state[OPEN_PREDICTION]) != pid
    assert [t.value for t in at.title] != [f"Study {key}"]
    button(at, "Worklist").click().run()
    table = at.dataframe[0].value
    assert table.loc[table["Study"] == key, "Review"].tolist() == ["Disagreed"]


def test_an_inconsistent_review_is_refused_and_nothing_is_stored(app_db: str) -> None:
    at = sign_in()
    pid = open_first_study(at)
    with session_scope(app_db) as session:
        pred = session.get(Prediction, pid)
        assert pred is not None
        other = next(c for c in pred.probabilities if c != pred.predicted_label)
    at.radio(key=f"review_{pid}_assessment").set_value("Agree")
    at.selectbox(key=f"review_{pid}_label").set_value(other)
    button(at, "Submit review").click().run()
    assert any("choose Disagree" in e.value for e in at.error)
    at.radio(key=f"review_{pid}_assessment").set_value("Disagree")
    button(at, "Submit review").click().run()
    assert [e.value for e in at.error] == ["Give a reason for disagreeing in the comment."]
    with session_scope(app_db) as session:
        assert session.scalars(select(Review)).all() == []


def test_a_review_survives_a_database_error(app_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    at = sign_in()
    pid = open_first_study(at)

    def locked(*args, **kwargs):
        raise OperationalError("INSERT INTO review", {}, Exception("database is locked"))

    with monkeypatch.context() as m:
        m.setattr(review_store, "save_review", locked)
        at.radio(key=f"review_{pid}_assessment").set_value("Agree")
        at.text_area(key=f"review_{pid}_comment").input("Clear lungs.")
        button(at, "Submit review").click().run()
        assert not at.exception, at.exception
        assert any("not saved" in e.value and "database is locked" in e.value for e in at.error)
        assert at.radio(key=f"review_{pid}_assessment").value == "Agree"
        assert at.text_area(key=f"review_{pid}_comment").value == "Clear lungs."
        with session_scope(app_db) as session:
            assert session.scalars(select(Review)).all() == []
    # The database is back: the same entries are submitted again and stored.
    button(at, "Submit review").click().run()
    assert not at.error, [e.value for e in at.error]
    with session_scope(app_db) as session:
        reviews = session.scalars(select(Review)).all()
        assert [(r.agree, r.comment) for r in reviews] == [(True, "Clear lungs.")]


def test_the_cohort_page_shows_the_cohort_and_the_model_metrics(pipeline, app_db: str) -> None:
    at = sign_in("ross")
    at.switch_page(str(page_file("cohorts"))).run()
    assert not at.exception, at.exception
    assert f"Cohort {pipeline.cohort}" in [h.value for h in at.subheader]
    counts = at.dataframe[0].value
    total = counts.loc[counts["Label"] == "total"]
    assert int(total["total"].iloc[0]) == 36
    assert {"train", "calibration", "test"} <= set(counts.columns)
    content = at.dataframe[1].value  # what the cohort is made of, from the headers
    views = content.loc[content["facet"] == "view"]
    assert set(views["value"]) == {"PA", "LL"} and int(views["count"].sum()) == 72
    assert "transfer syntax" in set(content["facet"])
    assert {m.label for m in at.metric} >= {"Accuracy", "AUROC (macro)"}
    assert any(pipeline.model in s.value for s in at.selectbox)


def test_the_report_page_builds_the_report_and_offers_four_downloads(pipeline, app_db: str) -> None:
    at = sign_in("audrey")
    at.switch_page(str(page_file("reports"))).run()
    assert not at.exception, at.exception
    assert at.selectbox(key="report_model").value.startswith(f"{pipeline.model}/")
    button(at, "Build report").click().run(timeout=300)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    labels = [b.label for b in at.download_button]
    assert labels == ["Download HTML", "Download PDF", "Download JSON", "Download CSV"]
    with session_scope(app_db) as session:
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.action == data.REPORT_ACTION)
        ).all()
        assert [e.actor for e in events] == ["audrey"]
        assert events[0].new_value is not None
        assert set(events[0].new_value["files"]) == {
            "report.html",
            "report.pdf",
            "report.json",
            "cases.csv",
        }


def test_opening_a_study_goes_to_it_without_reading_the_worklist_again(
    app_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = sign_in()
    chosen = at.selectbox(key="worklist_pick").value
    reads: list[str] = []
    real = data.worklist

    def counted(*args, **kwargs):
        reads.append("worklist")
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "worklist", counted)
    button(at, "Open study").click().run()
    assert not at.exception, at.exception
    assert int(at.session_state[OPEN_PREDICTION]) == chosen
    assert [t.value for t in at.title][0].startswith("Study ")
    assert reads == []  # the click switches before the worklist would be read and sent again


def test_the_study_page_sends_its_images_as_lossless_png(app_db: str) -> None:
    # st.image re-encodes image bytes without an alpha channel as JPEG unless told the format.
    at = open_study_page(sign_in(), top_prediction(app_db))
    urls = [img.url for el in at.get("image") for img in el.proto.imgs]  # type: ignore[attr-defined]
    assert len(urls) >= 2  # original and overlay (and the prior cases' thumbnails)
    assert all(url.endswith(".png") for url in urls), urls


def test_the_sign_in_page_preloads_the_study_widgets_disabled(app_db: str) -> None:
    from workbench.ui.preload import PRELOAD_KEY

    at = new_app().run()
    hidden = [
        at.slider(key=f"{PRELOAD_KEY}_slider"),
        at.select_slider(key=f"{PRELOAD_KEY}_select_slider"),
        at.text_area(key=f"{PRELOAD_KEY}_text_area"),
    ]
    assert all(w.disabled for w in hidden)
    assert f".st-key-{PRELOAD_KEY} {{ display: none" in " ".join(
        h.proto.body
        for h in at.get("html")  # type: ignore[attr-defined]
    )
    # signed in, the study page itself has no such widgets
    at = open_study_page(sign_in(), top_prediction(app_db))
    assert not [s for s in at.slider if s.key and s.key.startswith(PRELOAD_KEY)]


def test_the_study_page_without_a_study_points_to_the_worklist(app_db: str) -> None:
    at = sign_in()
    at.switch_page(str(page_file("study"))).run()
    assert [i.value for i in at.info] == ["Open a study from the worklist."]


def test_window_level_and_overlay_arithmetic() -> None:
    img = np.linspace(0.0, 1.0, 11, dtype=np.float32).reshape(1, 11)
    assert np.allclose(window_level(img, 0.5, 1.0), img)
    narrow = window_level(img, 0.5, 0.2)
    assert narrow.min() == 0.0 and narrow.max() == 1.0 and narrow[0, 5] == pytest.approx(0.5)
    plain = blend(img, np.ones_like(img), alpha=0.0)
    assert plain.shape == (1, 11, 3) and (plain[..., 0] == plain[..., 2]).all()
    hot = blend(img, np.ones_like(img), alpha=0.5)
    assert not (hot[..., 0] == hot[..., 2]).all()


def test_large_images_are_reduced_for_the_browser_and_sent_as_lossless_png() -> None:
    import io

    from PIL import Image

    from workbench.ui.imaging import DISPLAY_MAX_SIDE, png, reduce, to_grey

    big = np.random.default_rng(0).random((3000, 2200), dtype=np.float32)
    small = reduce(big)
    assert small.shape == (1000, 733) and max(small.shape) <= DISPLAY_MAX_SIDE
    assert small[0, 0] == pytest.approx(big[:3, :3].mean(), rel=1e-5)  # each pixel a block mean
    fits = big[:800, :600]
    assert reduce(fits) is fits  # an image that fits is sent as it is
    grey = to_grey(small)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png(grey)))), grey)  # lossless


def test_the_app_pages_load_without_torch() -> None:
    # The review app never runs a model: its pages must not import torch or MONAI (seconds of
    # start-up on the first page a reviewer opens).
    import subprocess
    import sys

    modules = ", ".join(f"workbench.ui.{Path(f).stem}" for f in PAGE_FILES.values())
    code = (
        f"import sys, {modules}\n"
        "heavy = sorted(m for m in ('torch', 'monai', 'captum', 'sklearn') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_the_cohort_page_lists_the_quarantine_without_folder_names(app_db: str) -> None:
    from workbench.db.store import Quarantine, session_scope

    with session_scope(app_db) as s:
        s.add(
            Quarantine(
                path="/archive/Fakename_Alice/CT/broken.dcm",
                file_sha256=None,
                reason="truncated_pixel_data",
                detail="PixelData holds 100 of 8192 bytes",
            )
        )
    at = sign_in("ross")
    at.switch_page(str(page_file("cohorts"))).run()
    assert not at.exception, at.exception
    assert "Quarantine" in [h.value for h in at.subheader]
    table = at.dataframe[-1].value
    assert list(table["file"]) == ["broken.dcm"]
    assert list(table["reason"]) == ["truncated_pixel_data"]
    assert "Fakename" not in table.to_string()


# --- roles, sessions, second reads --------------------------------------------------------


LANDING = {
    "grey": "Worklist",
    "ross": "Cohorts and models",
    "audrey": "Consistency report",
    "bailey": "Worklist",
}
GUARDED = tuple(name for name in PAGE_FILES if name != "signin")  # every page but sign-in


def page_app(name: str, user: str | None) -> AppTest:
    """One page's script run on its own (as if reached by URL), signed in as ``user``."""
    at = AppTest.from_file(str(page_file(name)), default_timeout=TIMEOUT)
    if user is not None:
        at.session_state[auth.SESSION_KEY] = {"name": user, "role": ACCOUNTS[user]}
        at.session_state[auth.LAST_SEEN] = time.time()
    return at.run()


def test_every_page_refuses_an_unauthenticated_session(app_db: str) -> None:
    for name in GUARDED:
        at = page_app(name, None)
        assert not at.exception, (name, at.exception)
        assert [w.value for w in at.warning] == ["Please sign in to use the review workbench."]
        assert len(at.title) == 0 and len(at.dataframe) == 0 and len(at.button) == 0, name


def test_every_page_refuses_a_role_it_is_not_for(app_db: str) -> None:
    for name in GUARDED:
        for user, role in ACCOUNTS.items():
            at = page_app(name, user)
            if auth.may_open(role, name):  # type: ignore[arg-type]
                # (Run outside the app, a page's links to other pages raise; that is not it.)
                assert not [e for e in at.error if "not open" in e.value], (name, user)
                continue
            assert not at.exception, (name, user, at.exception)
            assert [e.value for e in at.error] == [f"This page is not open to the {role} role."]
            assert len(at.title) == 0 and len(at.dataframe) == 0, (name, user)
            assert not [b for b in at.button if b.label != "Sign out"], (name, user)


def test_each_role_lands_on_its_home_and_the_menu_lists_only_its_pages(app_db: str) -> None:
    assert auth.allowed_pages("clinician") == ["signin", "worklist", "study", "labelling"]
    assert auth.allowed_pages("researcher") == ["signin", "cohorts", "reports"]
    assert auth.allowed_pages("auditor") == ["signin", "reports", "audit"]
    assert set(auth.allowed_pages("admin")) == set(auth.PAGE_ROLES)
    for user, title in LANDING.items():
        at = sign_in(user)
        assert [t.value for t in at.title] == [title], user


def test_a_clinician_cannot_reach_the_audit_export_or_adjudication(app_db: str) -> None:
    at = sign_in("grey")
    for name in ("audit", "adjudication", "cohorts"):
        # Not in a clinician's navigation at all: Streamlit has no such page to switch to (the
        # page script itself refuses the role too: see the test above).
        with pytest.raises(ValueError, match="Could not find a navigation page"):
            at.switch_page(str(page_file(name))).run()
    assert not at.exception, at.exception
    assert [t.value for t in at.title] == [LANDING["grey"]]
    assert not [b for b in at.button if b.label == "Export the audit log"]


def test_an_auditor_cannot_submit_a_review(app_db: str) -> None:
    with session_scope(app_db) as session:
        pid = session.scalars(select(Prediction.id)).first()
        assert pid is not None
        label = session.get(Prediction, pid).predicted_label  # type: ignore[union-attr]
    at = AppTest.from_file(str(page_file("study")), default_timeout=TIMEOUT)
    at.session_state[auth.SESSION_KEY] = {"name": "audrey", "role": "auditor"}
    at.session_state[auth.LAST_SEEN] = time.time()
    at.session_state[OPEN_PREDICTION] = pid
    at.run()
    assert [e.value for e in at.error] == ["This page is not open to the auditor role."]
    assert not [b for b in at.button if "review" in b.label.lower()]
    # The data layer refuses too, whatever page calls it.
    with pytest.raises(review_store.ReviewError, match="auditor role cannot"):
        review_store.save_review(get_settings(), "audrey", pid, True, label, "", role="auditor")
    with session_scope(app_db) as session:
        assert session.scalars(select(Review)).all() == []


def test_five_wrong_passwords_lock_the_account_in_the_app(app_db: str) -> None:
    for _ in range(5):
        at = sign_in("grey", "not-the-password")
        assert [e.value for e in at.error] == ["Wrong user name or password."]
    at = sign_in("grey", PASSWORD)
    assert any("locked" in e.value for e in at.error)
    assert [t.value for t in at.title] == ["Clinician review workbench"]
    with session_scope(app_db) as session:
        acts = list(session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
        assert acts.count("auth.sign_in_failed") == 5
        assert "auth.locked" in acts and acts[-1] == "auth.refused_locked"


def test_an_idle_session_is_signed_out(app_db: str) -> None:
    at = sign_in("grey")
    assert [t.value for t in at.title] == ["Worklist"]
    at.session_state[auth.LAST_SEEN] = time.time() - 31 * 60
    at.run()
    assert [t.value for t in at.title] == ["Clinician review workbench"]
    assert any("signed out after 30 minutes" in i.value for i in at.info)
    assert [w.label for w in at.text_input] == ["User name", "Password"]
    with session_scope(app_db) as session:
        last = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc())).first()
        assert last is not None and (last.action, last.reason) == ("auth.sign_out", "idle")


def test_a_disabled_users_open_session_ends_at_the_next_click(app_db: str) -> None:
    at = sign_in("grey")
    assert [t.value for t in at.title] == ["Worklist"]
    users.disable_user(get_settings(), "bailey", "grey")  # what `workbench users disable` does
    button(at, "Open study").click().run()  # the next click
    assert not at.exception, at.exception
    assert [t.value for t in at.title] == ["Clinician review workbench"]
    assert any("changed by an administrator" in i.value for i in at.info)
    assert auth.SESSION_KEY not in at.session_state
    assert OPEN_PREDICTION not in at.session_state  # the click did not open the study
    with session_scope(app_db) as session:
        last = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc())).first()
        assert last is not None
        assert (last.actor, last.action, last.reason) == (
            "grey",
            "auth.sign_out",
            "account changed",
        )
    # and the account cannot sign in again
    again = sign_in("grey")
    assert any("disabled" in e.value for e in again.error)


def test_sign_in_and_sign_out_are_audited(app_db: str) -> None:
    at = sign_in("grey")
    assert "signin_password" not in at.session_state  # the typed password does not linger
    button(at, "Sign out").click().run()
    with session_scope(app_db) as session:
        acts = [
            (e.actor, e.action)
            for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))
            if e.action.startswith("auth.")
        ]
    assert acts == [("grey", "auth.sign_in"), ("grey", "auth.sign_out")]


def test_the_auditor_verifies_and_exports_the_audit_log(app_db: str) -> None:
    at = sign_in("audrey")
    at.switch_page(str(page_file("audit"))).run()
    assert not at.exception, at.exception
    assert [t.value for t in at.title] == ["Audit log"]
    assert any("hash chain holds" in s.value for s in at.success)
    at.radio(key="audit_format").set_value("json")
    with session_scope(app_db) as session:
        n = len(session.scalars(select(AuditEvent)).all())  # 5 accounts and a sign-in
    button(at, "Export the audit log").click().run()
    assert [b.label for b in at.download_button] == [f"Download {n} events (JSON)"]
    with session_scope(app_db) as session:
        last = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc())).first()
        assert last is not None and (last.actor, last.action) == ("audrey", "audit.export")
        assert verify_audit(session) is None


def review_in_app(at: AppTest, pid: int, agree: bool, label: str, comment: str) -> None:
    at.radio(key=f"review_{pid}_assessment").set_value("Agree" if agree else "Disagree")
    at.selectbox(key=f"review_{pid}_label").set_value(label)
    at.text_area(key=f"review_{pid}_comment").input(comment)
    labels = [b.label for b in at.button]
    button(at, "Submit review" if "Submit review" in labels else "Save new version").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


def test_an_edit_adds_a_version_and_keeps_the_first(app_db: str) -> None:
    at = sign_in("grey")
    pid = open_first_study(at)
    with session_scope(app_db) as session:
        pred = session.get(Prediction, pid)
        assert pred is not None
        predicted = pred.predicted_label
        other = next(c for c in pred.probabilities if c != predicted)
    review_in_app(at, pid, True, predicted, "")
    assert [h.value for h in at.subheader if h.value.startswith("Your review")] == [
        "Your review (version 1)"
    ]
    at.radio(key=f"review_{pid}_assessment").set_value("Disagree")
    at.selectbox(key=f"review_{pid}_label").set_value(other)
    at.text_area(key=f"review_{pid}_comment").input("Small effusion at the left base.")
    button(at, "Save new version").click().run()
    assert [e.value for e in at.error] == ["Say why you change your review."]
    at.text_input(key=f"review_{pid}_reason").input("Second look at the lateral view.")
    button(at, "Save new version").click().run()
    assert not at.error, [e.value for e in at.error]
    with session_scope(app_db) as session:
        rows = session.scalars(select(Review).order_by(Review.id)).all()
        assert [(r.version, r.agree, r.label) for r in rows] == [
            (1, True, predicted),
            (2, False, other),
        ]
        assert rows[1].supersedes_id == rows[0].id
        assert rows[1].reason == "Second look at the lateral view."
        assert rows[0].confidence == 3 and rows[0].seconds_spent is not None
        acts = list(session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
        assert acts[-2:] == [review_store.REVIEW_ACTION, review_store.REVISE_ACTION]
        assert verify_audit(session) is None


def test_a_second_read_is_blind_and_a_disagreement_goes_to_adjudication(app_db: str) -> None:
    first = sign_in("grey")
    pid = open_first_study(first)
    with session_scope(app_db) as session:
        pred = session.get(Prediction, pid)
        assert pred is not None
        predicted, key = pred.predicted_label, pred.study.study_key
        other = next(c for c in pred.probabilities if c != predicted)
    review_in_app(first, pid, True, predicted, "Agree with the model.")

    # The second reader sees that a colleague read it, but not what they said.
    second = sign_in("yang")
    table = second.dataframe[0].value
    assert table.loc[table["Study"] == key, "Review"].tolist() == ["Second read open"]
    second.session_state[OPEN_PREDICTION] = pid
    second.switch_page(str(page_file("study"))).run()
    assert any("Second read" in i.value for i in second.info)
    page_text = " ".join(
        [m.value for m in second.markdown]
        + [str(d.value.to_dict()) for d in second.dataframe]
        + [c.value for c in second.caption]
    )
    assert "grey" not in page_text and "Agree with the model." not in page_text
    review_in_app(second, pid, False, other, "Effusion, not normal.")
    for d in second.dataframe:
        assert "grey" not in d.value.to_string()

    # The admin sees the dispute and settles it.
    admin = sign_in("bailey")
    admin.radio(key="worklist_filter").set_value("Disputed").run()
    table = admin.dataframe[0].value
    assert table["Study"].tolist() == [key]
    assert table["Review"].tolist() == ["Disputed"]
    admin.switch_page(str(page_file("adjudication"))).run()
    assert not admin.exception, admin.exception
    assert f"Study {key}" in [h.value for h in admin.subheader]
    readers = admin.dataframe[0].value
    assert readers["Reader"].tolist() == ["grey", "yang"]
    admin.selectbox(key=f"adjudicate_{pid}_label").set_value(other)
    admin.text_input(key=f"adjudicate_{pid}_reason").input("Effusion visible on the lateral.")
    button(admin, "Adjudicate").click().run()
    assert not admin.exception, admin.exception
    assert any("No disagreements" in s.value for s in admin.success)
    with session_scope(app_db) as session:
        adj = session.scalars(select(Review).where(Review.kind == "adjudication")).one()
        assert (adj.reviewer, adj.label, adj.agree) == ("bailey", other, False)
        assert verify_audit(session) is None
    assert review_store.disputes(get_settings()) == []


# --- trust outputs on the study page and the worklist ------------------------------------


def top_prediction(app_db: str) -> int:
    """The prediction at the top of the newest model's worklist."""
    s = get_settings()
    return data.worklist(s, data.list_models(s)[0].bundle_hash)[0].prediction_id


def set_trust(app_db: str, pid: int, **fields) -> None:
    with session_scope(app_db) as session:
        pred = session.get(Prediction, pid)
        assert pred is not None
        for name, value in fields.items():
            setattr(pred, name, value)


def open_study_page(at: AppTest, pid: int) -> AppTest:
    at.session_state[OPEN_PREDICTION] = pid
    at.switch_page(str(page_file("study"))).run()
    assert not at.exception, at.exception
    return at


def display_values(table) -> pd.DataFrame:
    """What a styled ``st.dataframe`` shows in its cells (the pandas Styler's text)."""
    return convert_arrow_bytes_to_pandas_df(table.proto.arrow_data.styler.display_values)


def page_text(at: AppTest) -> str:
    return " ".join(
        [m.value for m in at.markdown] + [c.value for c in at.caption] + [e.value for e in at.error]
    )


def test_the_study_page_warns_when_the_study_is_out_of_distribution(app_db: str) -> None:
    pid = top_prediction(app_db)
    reason = "View position 'XX' was never seen in training"
    ood = {"flagged": True, "score": 0.9, "threshold": 0.3, "reasons": [reason]}
    set_trust(app_db, pid, ood_flag=True, ood=ood)
    at = open_study_page(sign_in("grey"), pid)
    warnings = [e.value for e in at.error]
    assert len(warnings) == 1 and "Out of distribution" in warnings[0]
    assert reason in warnings[0] and "not valid" in warnings[0]
    # The scores are there for the curious, but folded away and labelled as not valid.
    folded = [x for x in at.expander if x.label == "Scores (not valid for this study)"]
    assert len(folded) == 1 and not folded[0].proto.expanded
    assert [m.label for m in folded[0].metric] == ["Top finding", "Calibrated probability"]
    # The review form still works.
    assert at.radio(key=f"review_{pid}_assessment") is not None


def test_a_refused_study_shows_the_warning_and_no_scores(app_db: str) -> None:
    pid = top_prediction(app_db)
    reason = "3D CT input for a 2D model: not scored"
    ood = {"flagged": True, "score": None, "threshold": None, "reasons": [reason]}
    set_trust(app_db, pid, ood_flag=True, ood=ood, probabilities={}, top_k=[], per_image=[])
    at = open_study_page(sign_in("grey"), pid)
    assert any(reason in e.value and "did not score" in e.value for e in at.error)
    assert not [m for m in at.metric if m.label == "Calibrated probability"]
    assert not [x for x in at.expander if x.label.startswith("Scores")]
    assert any("No scores" in i.value for i in at.info)
    # The reader can still give the label: the form offers the model's classes.
    assert len(at.selectbox(key=f"review_{pid}_label").options) >= 2


def test_the_study_page_shows_the_prediction_set_operating_points_and_checks(
    app_db: str,
) -> None:
    pid = top_prediction(app_db)
    pset = {"coverage": 0.9, "classes": ["nodule", "effusion"]}
    set_trust(app_db, pid, prediction_set=pset, ood_flag=False)
    at = open_study_page(sign_in("grey"), pid)
    assert not at.error, [e.value for e in at.error]
    text = page_text(at)
    assert "90% prediction set: {nodule, effusion}" in text
    # operating points: threshold per class and whether the probability is above it
    points = next(d.value for d in at.dataframe if "Threshold" in d.value.columns)
    assert set(points["Above"]) <= {"above", "below"}
    assert {"Sensitivity", "Specificity"} <= set(points.columns)
    assert "calibration split" in text
    # saliency sanity checks for the method shown
    assert any("sanity checks" in x.label for x in at.expander)
    assert "rank correlation with a randomised model" in text
    assert "for a random map" in text
    # and what the Grad-CAM map can resolve: its grid, one cell in the model's pixels
    assert "this Grad-CAM map has" in text and "px of the model's" in text
    # similar prior cases, with thumbnails from the cache
    assert "Similar prior cases" in [h.value for h in at.subheader]
    captions = [c for img in at.get("image") for c in img.captions]  # type: ignore[attr-defined]
    assert len(captions) >= 3  # original, overlay and at least one prior case
    priors = [c for c in captions if "of training neighbours" in c]
    assert 1 <= len(priors) <= 5


def test_a_near_certain_probability_is_shown_as_more_than_99_not_100_percent(
    app_db: str,
) -> None:
    pid = top_prediction(app_db)
    with session_scope(app_db) as session:
        pred = session.get(Prediction, pid)
        assert pred is not None
        classes = list(pred.probabilities)
    probs = {c: 0.0 for c in classes} | {classes[0]: 0.9996, classes[1]: 0.0004}
    set_trust(
        app_db,
        pid,
        probabilities=probs,
        top_k=[[classes[0], 0.9996], [classes[1], 0.0004]],
        priority=0.9996,
        ood_flag=False,
        similar=[
            {"study_key": "S1", "label": "x", "similarity": 0.9991, "closer_than": 97.2},
            {"study_key": "S2", "label": "x", "similarity": 0.9990, "closer_than": 99.96},
            {"study_key": "S3", "label": "x", "similarity": 0.9990},  # stored before percentiles
        ],
    )
    at = open_study_page(sign_in("grey"), pid)
    assert [m.value for m in at.metric if m.label == "Calibrated probability"] == [">99%"]
    top_k = next(c.value for c in at.caption if c.value.startswith("Top-"))
    assert f"{classes[0]} >99%" in top_k and f"{classes[1]} <1%" in top_k
    table = next(d for d in at.dataframe if "Class" in d.value.columns)
    shown = dict(zip(table.value["Class"], display_values(table)["Probability"], strict=True))
    assert shown[classes[0]] == ">99%" and shown[classes[1]] == "<1%"
    assert "100%" not in page_text(at)
    # similar cases: a percentile that separates them, and the older similarity to 4 decimals
    images = [c for img in at.get("image") for c in img.captions]  # type: ignore[attr-defined]
    text = " | ".join(images + [c.value for c in at.caption])
    assert "closer than 97% of training neighbours" in text
    assert "closer than >99% of training neighbours" in text
    assert "similarity 0.9990" in text


def test_an_empty_prediction_set_names_the_top_class(app_db: str) -> None:
    pid = top_prediction(app_db)
    set_trust(app_db, pid, prediction_set={"coverage": 0.9, "classes": []}, ood_flag=False)
    with session_scope(app_db) as session:
        predicted = session.get(Prediction, pid).predicted_label  # type: ignore[union-attr]
    at = open_study_page(sign_in("grey"), pid)
    assert f"90% prediction set: {{{predicted}}} (more certain than the 90% level needs)" in (
        page_text(at)
    )


def test_window_presets_set_level_and_width(app_db: str) -> None:
    at = open_study_page(sign_in("grey"), top_prediction(app_db))
    assert at.selectbox(key="wl_preset").value == "File default"
    at.selectbox(key="wl_preset").set_value("Bone / high contrast").run()
    assert not at.exception, at.exception
    assert at.slider(key="wl_center").value == pytest.approx(0.6)
    assert at.slider(key="wl_width").value == pytest.approx(0.4)
    at.select_slider(key="zoom").set_value(2.0).run()
    assert not at.exception, at.exception
    captions = [c for img in at.get("image") for c in img.captions]  # type: ignore[attr-defined]
    assert any("zoom 2×" in c for c in captions)
    button(at, "Reset").click().run()
    assert at.slider(key="wl_width").value == pytest.approx(1.0)
    assert at.selectbox(key="wl_preset").value == "File default"


def test_the_worklist_filters_by_ood_and_shows_sets_and_badges(app_db: str) -> None:
    pid = top_prediction(app_db)
    with session_scope(app_db) as session:
        for p in session.scalars(select(Prediction)):
            p.ood_flag = p.id == pid
        key = session.get(Prediction, pid).study.study_key  # type: ignore[union-attr]
    set_trust(app_db, pid, prediction_set={"coverage": 0.9, "classes": ["nodule", "normal"]})
    at = sign_in("grey")
    table = at.dataframe[0].value
    assert table.loc[table["Study"] == key, "OOD"].tolist() == ["⚠ OOD"]
    assert table.loc[table["Study"] == key, "Prediction set"].tolist() == ["{nodule, normal}"]
    assert (table["OOD"] == "").sum() == len(table) - 1
    at.selectbox(key="worklist_ood").set_value("Flagged").run()
    assert at.dataframe[0].value["Study"].tolist() == [key]
    at.selectbox(key="worklist_ood").set_value("Not flagged").run()
    assert key not in at.dataframe[0].value["Study"].tolist()
    at.selectbox(key="worklist_ood").set_value("All").run()
    for name in ("worklist_cohort", "worklist_modality", "worklist_site"):
        options = at.selectbox(key=name).options
        assert options[0] == "All" and len(options) >= 2, name
        at.selectbox(key=name).set_value(options[1]).run()
        assert not at.exception, at.exception
        assert len(at.dataframe) <= 1


def test_only_an_admin_sees_the_models_page(pipeline, app_db: str) -> None:
    at = sign_in("bailey")
    at.switch_page(str(page_file("models"))).run()
    assert not at.exception, at.exception
    assert [t.value for t in at.title] == ["Models"]
    table = at.dataframe[0].value
    assert any(ref.startswith(f"{pipeline.model}/") for ref in table["Model"])
    assert "Promoted" in table.columns
    clinician = sign_in("grey")
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        clinician.switch_page(str(page_file("models"))).run()
    assert "Models" not in [t.value for t in clinician.title]
    assert not [d for d in clinician.dataframe if "Promoted" in d.value.columns]


def test_the_app_opens_on_the_promoted_model(tmp_path: Path) -> None:
    """Two models with predictions: the promoted one is listed first (the worklist's default),
    even when the other was used more recently."""
    import json as _json
    from datetime import datetime, timedelta

    from tests.conftest import make_settings
    from workbench.db.store import Patient, Prediction, Study, session_scope

    settings = make_settings(tmp_path / "home")
    with session_scope(settings.database_url) as session:
        session.add(Patient(pseudonym="P1"))
        study = Study(study_uid="1.2.3", study_key="S0000000000A", patient_pseudonym="P1")
        session.add(study)
        session.flush()
        now = datetime(2026, 11, 30, 12, 0)
        for name, at in (("old-model", now), ("new-model", now + timedelta(hours=1))):
            session.add(
                Prediction(
                    study_id=study.id,
                    model_name=name,
                    model_version="v1",
                    bundle_hash=name,
                    code_version="c",
                    transform_hash="t",
                    pixel_hashes=[],
                    probabilities={},
                    raw_probabilities={},
                    predicted_label="",
                    top_k=[],
                    priority=0.0,
                    per_image=[],
                    created_at=at,
                )
            )
    assert [m.name for m in data.list_models(settings)] == ["new-model", "old-model"]
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    (settings.models_dir / "promoted.json").write_text(_json.dumps({"chest": "old-model/v1"}))
    assert [m.name for m in data.list_models(settings)] == ["old-model", "new-model"]
