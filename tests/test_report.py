"""The consistency report, built from the session's tiny model and its stored predictions."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import html as html_lib
import json
import re
import shutil
import sqlite3
import time
import zlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from workbench.catalog.cohorts import cohort_items
from workbench.config import Settings
from workbench.db.store import Cohort, CohortMember, Review, Study, session_scope, utcnow
from workbench.evaluation.render import SECTION_TITLES, format_number, lookup
from workbench.evaluation.report import ReportError, build_report
from workbench.model.bundle_info import hash_bundle
from workbench.predict.results import latest_predictions

N_RESAMPLES = 100  # enough for intervals to exist; keeps each build to a few seconds on 2 cores
FORBIDDEN = ("FAKEID", "FAKEACC", "Fakename")
NUM_SPAN = re.compile(r'<span class="num" data-key="([^"]+)">([^<]*)</span>')


@dataclass(frozen=True)
class Built:
    html: Path
    pdf: Path
    json: Path
    csv: Path
    seconds: float

    @property
    def paths(self) -> list[Path]:
        return [self.html, self.pdf, self.json, self.csv]

    def data(self) -> dict[str, Any]:
        return json.loads(self.json.read_text())

    def rows(self) -> list[dict[str, str]]:
        with self.csv.open(newline="") as fh:
            return list(csv.DictReader(fh))


def build(settings: Settings, model: str, cohort: str, out: Path) -> Built:
    t0 = time.perf_counter()
    paths = build_report(settings, model, cohort, out, n_resamples=N_RESAMPLES, seed=0)
    return Built(*paths, seconds=time.perf_counter() - t0)


@pytest.fixture(scope="module")
def report(pipeline, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The report of the tiny model on its own training cohort (no reviews in the store)."""
    return build(pipeline.settings, pipeline.model, pipeline.cohort, tmp_path_factory.mktemp("r"))


@pytest.fixture(scope="module")
def copied(pipeline, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The pipeline's catalog copied to a database of its own, so tests here can add reviews
    and cohorts without other test modules seeing them. Bundles and caches are shared."""
    src = pipeline.settings.database_url.removeprefix("sqlite:///")
    dst = tmp_path_factory.mktemp("db") / "workbench.db"
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    return dataclasses.replace(pipeline.settings, database_url=f"sqlite:///{dst}")


def add_cohort(settings: Settings, name: str, study_ids: list[int]) -> None:
    with session_scope(settings.database_url) as session:
        session.add(Cohort(name=name))
        session.flush()
        for sid in study_ids:
            session.add(CohortMember(cohort_name=name, study_id=sid))


def pdf_pages(pdf: bytes) -> int:
    """Page objects in a PDF, looking inside compressed object streams too."""
    chunks = [pdf]
    for stream in re.findall(rb"stream\r?\n(.*?)endstream", pdf, flags=re.S):
        with contextlib.suppress(zlib.error):
            chunks.append(zlib.decompress(stream))
    return sum(len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", c)) for c in chunks)


def visible_text(html: str) -> str:
    """The HTML without its style sheet, embedded images and tags."""
    html = re.sub(r"<style.*?</style>", " ", html, flags=re.S)
    html = re.sub(r'src="data:[^"]*"', " ", html)
    return html_lib.unescape(re.sub(r"<[^>]+>", " ", html))


def test_it_builds_html_pdf_json_and_csv_from_the_tiny_model(report: Built) -> None:
    assert [p.name for p in report.paths] == [
        "report.html",
        "report.pdf",
        "report.json",
        "cases.csv",
    ]
    pdf = report.pdf.read_bytes()
    assert pdf.startswith(b"%PDF")
    assert pdf_pages(pdf) > 0
    html = report.html.read_text()
    for title in SECTION_TITLES:
        assert title in html
    # One self-contained file: figures are embedded, nothing is fetched.
    assert html.count('src="data:image/png;base64,') == 3
    assert not re.search(r'(src|href)="(https?:|file:|/)', html)
    print(f"report build: {report.seconds:.1f} s")


def test_every_number_the_html_shows_is_in_the_json(report: Built) -> None:
    html = report.html.read_text()
    data = report.data()
    shown = NUM_SPAN.findall(html)
    keys = {k for k, _ in shown}
    for key in (
        "performance.auroc_macro",
        "performance.auroc_macro_ci.0",
        "performance.accuracy",
        "performance.top1",
        "performance.top_k_accuracy",
        "calibration.ece_before",
        "calibration.ece_after",
        "calibration.brier_before",
        "calibration.brier_after",
        "subgroups.site.0.accuracy",
        "subgroups.sex.0.auroc_macro",
        "subgroups.age_band.0.n",
        "subgroups.manufacturer.0.accuracy",
        "subgroups.view.0.n",
        "evaluation.n_studies",
        "evaluation.n_missing_prediction",
    ):
        assert key in keys, key
    for c in data["performance"]["classes"]:
        assert f"performance.per_class.{c}.auroc" in keys
        assert f"performance.per_class.{c}.sensitivity" in keys
    for key, text in shown:
        value = lookup(data, key)
        assert text == format_number(value), (key, text, value)
        if isinstance(value, float):
            assert value == round(value, 6) and text == f"{value:.3f}"
    # ... and no decimal number is shown outside those marked spans.
    rest = visible_text(NUM_SPAN.sub(" ", html))
    assert not re.findall(r"(?<![\w.])\d+\.\d{2,}(?![\w.])", rest)  # (versions like 2.13.0 pass)


def test_the_json_has_sorted_keys_and_is_byte_identical_between_builds(
    pipeline, report: Built, tmp_path: Path
) -> None:
    text = report.json.read_text()
    data = json.loads(text)
    assert text == json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert "generated_at" not in data  # the build time is in the HTML and PDF only
    again = build(pipeline.settings, pipeline.model, pipeline.cohort, tmp_path)
    assert again.json.read_bytes() == report.json.read_bytes()
    assert again.csv.read_bytes() == report.csv.read_bytes()
    assert "generated 20" in again.html.read_text()


def test_the_training_cohort_is_evaluated_on_its_test_split_only(pipeline, report: Built) -> None:
    data = report.data()
    test_keys = {i.study_key for i in cohort_items(pipeline.settings, pipeline.cohort, "test")}
    ev = data["evaluation"]
    assert ev["is_training_cohort"] is True
    assert ev["n_studies"] == len(test_keys) == data["performance"]["n"]
    assert ev["n_missing_prediction"] == 0
    assert {r["study_key"] for r in report.rows()} == test_keys
    assert data["lineage"]["evaluated_cohort"]["matches_training_hash"] is True
    # Recomputed metrics are compared with those the bundle recorded on the same split.
    assert data["consistency"]["checked"] is True
    assert data["performance"]["bundle_recorded"]["accuracy"] is not None
    assert data["lineage"]["model"]["bundle_hash"] == hash_bundle(pipeline.bundle)
    assert "test split of the training cohort" in report.html.read_text()


def test_cases_csv_has_one_row_per_study_and_no_identifiers(pipeline, report: Built) -> None:
    data = report.data()
    rows = report.rows()
    classes = data["performance"]["classes"]
    assert len(rows) == data["evaluation"]["n_studies"]
    assert len({r["study_key"] for r in rows}) == len(rows)
    for r in rows:
        assert r["true_label"] in classes and r["predicted_label"] in classes
        assert abs(sum(float(r[f"p_{c}"]) for c in classes) - 1) < 1e-4
        assert r["age_band"] in {"<40", "40-59", "60-79", "80+", "unknown"}
    with session_scope(pipeline.settings.database_url) as session:
        uids = list(session.scalars(select(Study.study_uid)))
    assert uids
    for path in report.paths:
        content = path.read_bytes()
        for word in FORBIDDEN:
            assert word.encode() not in content, (word, path.name)
        if path.suffix != ".pdf":
            text = content.decode()
            assert str(pipeline.source) not in text and str(pipeline.settings.home) not in text
            assert not any(uid in text for uid in uids), path.name


def test_it_says_plainly_when_there_are_no_reviews(report: Built) -> None:
    assert report.data()["reader_agreement"]["has_reviews"] is False
    assert "No clinician reviews exist" in report.html.read_text()


def test_a_stored_review_appears_in_reader_agreement_with_kappa(
    pipeline, copied: Settings, tmp_path: Path
) -> None:
    test_ids = [i.study_id for i in cohort_items(copied, pipeline.cohort, "test")]
    preds = latest_predictions(copied, hash_bundle(pipeline.bundle), test_ids)
    (a, pa), (b, pb) = sorted(preds.items())[:2]
    classes = list(pa.probabilities)
    other = next(c for c in classes if c != pa.predicted_label)
    now = utcnow()
    with session_scope(copied.database_url) as session:
        # dr-a first agreed with study a, then changed their mind (version 2): only the latest
        # counts.
        for pred, sid, label, at, version in (
            (pa, a, pa.predicted_label, now - timedelta(minutes=5), 1),
            (pa, a, other, now, 2),
            (pb, b, pb.predicted_label, now, 1),
        ):
            session.add(
                Review(
                    prediction_id=pred.id,
                    study_id=sid,
                    reviewer="dr-a",
                    agree=label == pred.predicted_label,
                    label=label,
                    comment="free text that must not be exported",
                    created_at=at,
                    version=version,
                )
            )
    built = build(copied, pipeline.model, pipeline.cohort, tmp_path)
    ra = built.data()["reader_agreement"]
    key_a = pa.study.study_key
    assert ra["has_reviews"] is True and ra["n_reviews"] == 2 and ra["n_reviewers"] == 1
    assert ra["kappa"] is not None and ra["readers"][0]["kappa"] == ra["kappa"]
    assert ra["agreement"] == 0.5
    assert ra["disagreements"] == [
        {
            "study_key": key_a,
            "reviewer": "dr-a",
            "model_label": pa.predicted_label,
            "reviewer_label": other,
            "reference_label": pa.study.label,
        }
    ]
    html = built.html.read_text()
    section = html[html.index(SECTION_TITLES[4]) :]
    assert key_a in section and "dr-a" in section
    assert 'data-key="reader_agreement.kappa"' in section
    assert "must not be exported" not in html + built.json.read_text() + built.csv.read_text()
    rows = {r["study_key"]: r for r in built.rows()}
    assert rows[key_a]["reviewer_labels"] == f"dr-a:{other}"


def test_another_cohort_is_evaluated_on_all_labelled_studies_and_counts_missing_predictions(
    pipeline, copied: Settings, tmp_path: Path
) -> None:
    items = cohort_items(copied, pipeline.cohort)
    add_cohort(copied, "external", [i.study_id for i in items])
    built = build(copied, pipeline.model, "external", tmp_path)
    ev = built.data()["evaluation"]
    n_train = sum(1 for i in items if i.split == "train")
    assert ev["is_training_cohort"] is False
    assert ev["n_evaluable"] == len(items)
    assert ev["n_missing_prediction"] == n_train
    assert ev["n_studies"] == len(items) - n_train == len(built.rows())
    assert f"{n_train} of {len(items)} evaluable studies have no stored prediction" in (
        built.html.read_text()
    )


def test_a_cohort_without_predictions_raises_a_clear_report_error(
    pipeline, copied: Settings, tmp_path: Path
) -> None:
    train = cohort_items(copied, pipeline.cohort, "train")
    add_cohort(copied, "unpredicted", [i.study_id for i in train])
    with pytest.raises(ReportError, match="no stored predictions") as err:
        build_report(copied, pipeline.model, "unpredicted", tmp_path / "a")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ReportError, match="no cohort named"):
        build_report(copied, pipeline.model, "nonexistent", tmp_path / "b")
    with pytest.raises(ReportError, match="no model bundle"):
        build_report(copied, "no-such-model", pipeline.cohort, tmp_path / "c")


# --- test-retest, subgroup flags, conformal coverage and OOD rate -------------------------


@pytest.fixture(scope="module")
def retested(pipeline, tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Built, Built]:
    """Test-retest computed for a copy of the tiny model's bundle (its own models folder, so
    the other reports here stay without it), then the report built twice."""
    from workbench.evaluation.consistency import write_retest

    root = tmp_path_factory.mktemp("retest")
    models = root / "models"
    shutil.copytree(pipeline.bundle, models / pipeline.model / pipeline.bundle.name)
    settings = dataclasses.replace(pipeline.settings, models_dir=models)
    write_retest(settings, pipeline.model, pipeline.cohort, max_saliency=3)
    first = build(settings, pipeline.model, pipeline.cohort, root / "a")
    second = build(settings, pipeline.model, pipeline.cohort, root / "b")
    return settings, first, second


def test_test_retest_is_stored_beside_the_bundle_and_rendered(pipeline, retested) -> None:
    from workbench.evaluation.consistency import retest_path

    settings, built, _ = retested
    stored = retest_path(settings.models_dir / pipeline.model / "v1", pipeline.cohort)
    assert stored.exists()
    rt = built.data()["test_retest"]
    assert rt["available"] is True and rt["matches_bundle"] is True
    assert rt["n_studies"] == built.data()["evaluation"]["n_studies"]
    # The same pixels twice give the same answer: inference is deterministic.
    assert rt["repeat"]["flip_rate"] == 0 and rt["repeat"]["max_abs_probability_change"] == 0
    names = [r["name"] for r in rt["perturbations"]]
    assert names == ["intensity_up", "intensity_down", "noise", "rotate_plus", "rotate_minus"]
    for r in rt["perturbations"]:
        assert 0 <= r["flip_rate"] <= 1 and r["mean_abs_probability_change"] >= 0
        assert r["n_saliency"] <= 3
        if r["saliency_spearman_mean"] is not None:
            assert -1 <= r["saliency_spearman_mean"] <= 1
    html = built.html.read_text()
    assert SECTION_TITLES[5] in html and "No test-retest results" not in html


def test_the_report_without_retest_says_how_to_compute_it(report: Built) -> None:
    assert report.data()["test_retest"] == {"available": False}
    assert "No test-retest results are stored" in report.html.read_text()


def test_a_retested_report_is_stable_and_shows_only_json_numbers(retested) -> None:
    _, first, second = retested
    assert first.json.read_bytes() == second.json.read_bytes()
    html = first.html.read_text()
    data = first.data()
    shown = NUM_SPAN.findall(html)
    keys = {k for k, _ in shown}
    for key in (
        "test_retest.repeat.flip_rate",
        "test_retest.perturbations.0.flip_rate",
        "test_retest.perturbations.2.mean_abs_probability_change",
        "test_retest.perturbations.3.saliency_spearman_mean",
        "subgroups.site.0.accuracy_ci.0",
    ):
        assert key in keys, key
    for key, text in shown:
        assert text == format_number(lookup(data, key)), key
    rest = visible_text(NUM_SPAN.sub(" ", html))
    assert not re.findall(r"(?<![\w.])\d+\.\d{2,}(?![\w.])", rest)


def test_subgroups_carry_intervals_and_flag_a_group_whose_interval_excludes_the_overall() -> None:
    import numpy as np

    from workbench.evaluation.report import _subgroups, _warnings

    # 60 studies at site A all right, 30 at site B all wrong: B's interval is [0, 0].
    cases = [
        _fake_case(
            f"s{i}", "A" if i < 60 else "B", label=i % 2, predicted=i % 2 if i < 60 else 1 - i % 2
        )
        for i in range(90)
    ]
    labels = np.asarray([c.label_index for c in cases])
    probs = np.asarray([c.probabilities for c in cases])
    overall = {"accuracy": 60 / 90, "auroc_macro": None}
    sub = _subgroups(cases, probs, labels, overall, n_resamples=50, seed=0)
    b = next(r for r in sub["site"] if r["group"] == "B")
    assert b["accuracy_ci"] == [0.0, 0.0] and b["excludes_overall"]["accuracy"] == "below"
    a = next(r for r in sub["site"] if r["group"] == "A")
    assert a["excludes_overall"]["accuracy"] == "above"
    assert {"attribute": "site", "group": "B", "metrics": ["accuracy"], "sides": ["below"]} in sub[
        "flagged"
    ]
    data = {
        "evaluation": {"n_missing_prediction": 0, "n_foreign_label": 0, "n_studies": 90},
        "lineage": {
            "evaluated_cohort": {"matches_training_hash": None},
            "predictions": {"n_pixels_changed": 0, "n_transform_mismatch": 0},
        },
        "consistency": {},
        "subgroups": sub,
    }
    assert any("Subgroup site = B" in w and "below" in w for w in _warnings(data))


def _fake_case(key: str, site: str, label: int, predicted: int) -> Any:
    from workbench.evaluation.report import Case

    p = (0.9, 0.1) if predicted == 0 else (0.1, 0.9)
    return Case(
        study_key=key,
        patient=key,
        split="test",
        site=site,
        sex="F",
        age_band="40-59",
        label=("normal", "nodule")[label],
        label_index=label,
        predicted_label=("normal", "nodule")[predicted],
        probabilities=p,
        raw_probabilities=p,
        pixel_hashes=(),
        pixels_changed=False,
        transform_hash="",
        code_version="",
    )


def test_conformal_coverage_and_ood_rate_per_subgroup_when_the_model_provides_them(
    tmp_path: Path,
) -> None:
    import numpy as np

    from workbench.db.store import Prediction
    from workbench.evaluation.report import _conformal, _ood, ood_flag
    from workbench.model.bundle_info import BundleInfo
    from workbench.model.contract import ModelContract
    from workbench.posthoc.conformal import ConformalSets

    cases = [_fake_case(f"s{i}", "AB"[i % 2], i % 2, 0) for i in range(10)]
    probs = np.asarray([c.probabilities for c in cases])
    labels = np.asarray([c.label_index for c in cases])
    contract = ModelContract(("normal", "nodule"), 64, 2, {"method": "none"})
    plain = BundleInfo("m", "v1", tmp_path, contract)
    assert _conformal(plain, cases, probs, labels) == {"available": False}
    assert _ood(plain, cases)["available"] is False
    # qhat 1: every set holds every class, so coverage is 1 everywhere.
    cs = ConformalSets(method="aps", coverage=0.9, qhat_=1.0, n_calibration_=20)
    trust = {"conformal": cs.to_dict()}
    with_sets = BundleInfo("m", "v1", tmp_path, dataclasses.replace(contract, trust=trust))
    cf = _conformal(with_sets, cases, probs, labels)
    assert cf["available"] is True and cf["coverage"] == 1.0 and cf["mean_set_size"] == 2.0
    assert [g["group"] for g in cf["subgroups"]["site"]] == ["A", "B"]

    assert ood_flag(Prediction(ood_flag=True)) is True
    assert ood_flag(Prediction(per_image=[{"view": "PA"}])) is None
    flagged = [dataclasses.replace(c, ood=c.site == "B") for c in cases]
    od = _ood(plain, flagged)
    assert od["available"] is True and od["rate"] == 0.5
    assert {g["group"]: g["rate"] for g in od["subgroups"]["site"]} == {"A": 0.0, "B": 1.0}
