"""`workbench cohort from-reads`: clinicians' reads become a labelled cohort, with each label's
source, conflicts left out and counted, adjudication respected, and agreement reported."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from tests.conftest import TINY_COHORT, Pipeline, copy_home
from workbench.catalog.cohorts import cohort_items
from workbench.cli import main
from workbench.config import Settings
from workbench.db.store import AuditEvent, Cohort, Prediction, session_scope
from workbench.review.from_reads import StudyReads, resolve
from workbench.review.reviews import save_review


def test_resolving_one_study_follows_adjudication_then_agreement_then_the_labels_file() -> None:
    agree = StudyReads("S1", {"ann": "nodule", "bob": "nodule"}, csv_label="normal")
    split = StudyReads("S2", {"ann": "nodule", "bob": "normal"}, csv_label="normal")
    settled = StudyReads("S3", {"ann": "nodule", "bob": "normal"}, "nodule", "normal")
    single = StudyReads("S4", {"ann": "nodule"}, csv_label="normal")
    unread = StudyReads("S5", {}, csv_label="normal")
    assert resolve(agree) == ("nodule", "read")
    assert resolve(split) == (None, "conflict")
    assert resolve(settled) == ("nodule", "adjudicated")
    assert resolve(single, min_readers=2) == ("normal", "csv")
    assert resolve(single, min_readers=2, reads_only=True) == (None, "too few readers")
    assert resolve(unread) == ("normal", "csv")
    assert resolve(unread, reads_only=True) == (None, "unread and unlabelled")
    assert resolve(agree, adjudicated_only=True) == (None, "not adjudicated")
    assert resolve(settled, adjudicated_only=True) == ("nodule", "adjudicated")


@pytest.fixture
def read(pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A copy of the pipeline's catalog, cache and model with reads of four studies:
    S_agree (two readers agree, the second after revising), S_split (they disagree),
    S_settled (they disagree and an admin adjudicated) and S_single (one reader)."""
    settings = copy_home(pipeline, tmp_path / "home", monkeypatch)
    with session_scope(settings.database_url) as s:
        preds = s.scalars(select(Prediction).order_by(Prediction.id)).all()
        rows = [(p.id, p.study.study_key, p.study.label, tuple(p.probabilities)) for p in preds]
    (
        (agree, key_a, csv_a, classes),
        (split, key_b, *_),
        (settled, key_c, *_),
        (single, key_d, *_),
    ) = rows[:4]
    other = next(c for c in classes if c != csv_a)  # the readers overrule the labels file
    save_review(settings, "ann", agree, False, other, "")
    save_review(settings, "bob", agree, True, csv_a, "")
    save_review(settings, "bob", agree, False, other, "", reason="looked again")  # version 2
    save_review(settings, "ann", split, True, classes[0], "")
    save_review(settings, "bob", split, False, classes[1], "")
    save_review(settings, "ann", settled, True, classes[0], "")
    save_review(settings, "bob", settled, False, classes[1], "")
    save_review(settings, "root", settled, False, classes[1], "", role="admin", kind="adjudication")
    save_review(settings, "ann", single, True, classes[0], "")
    return settings, {"agree": (key_a, other), "split": key_b, "settled": (key_c, classes[1]),
                      "single": key_d}  # fmt: skip


def _labels(settings: Settings, cohort: str) -> dict[str, tuple[str | None, str | None]]:
    return {i.study_key: (i.label, i.label_source) for i in cohort_items(settings, cohort)}


def test_reads_become_a_cohort_with_each_labels_source(read, capsys) -> None:
    settings, k = read
    code = main(["cohort", "from-reads", "reads", "--source", TINY_COHORT, "--min-readers", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "left out: 1 conflict" in out and "Cohen's kappa ann / bob" in out
    labels = _labels(settings, "reads")
    assert labels[k["agree"][0]] == (k["agree"][1], "read")  # the revised read counts
    assert k["split"] not in labels  # a conflict no one settled
    assert labels[k["settled"][0]] == (k["settled"][1], "adjudicated")
    assert labels[k["single"]][1] == "csv"  # one reader is not two: the labels file's label
    tiny = {i.study_key: i.label for i in cohort_items(settings, TINY_COHORT)}
    assert len(labels) == len(tiny) - 1
    assert all(src == "csv" for key, (_, src) in labels.items() if key not in
               {k["agree"][0], k["settled"][0]})  # fmt: skip
    assert tiny[k["agree"][0]] != k["agree"][1]  # the source cohort keeps its own labels
    with session_scope(settings.database_url) as s:
        made = s.get(Cohort, "reads")
        assert made is not None and made.provenance is not None
        record = made.provenance["from_reads"]
        assert record["labelled"] == {"csv": len(tiny) - 3, "read": 1, "adjudicated": 1}
        assert record["left_out"] == {"conflict": 1}
        pair = record["agreement"]["pairs"][0]
        assert pair["readers"] == ["ann", "bob"] and pair["studies"] == 3
        assert pair["kappa"] is not None and pair["kappa"] < 0.5  # they agreed on 1 of 3
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "cohort.from_reads")).one()
        assert event.object_id == "reads"
    assert main(["cohort", "reads"]) == 0
    assert "label source" in capsys.readouterr().out


def test_adjudicated_only_and_reads_only_narrow_the_cohort(read, capsys) -> None:
    settings, k = read
    assert main(["cohort", "from-reads", "settled", "--source", TINY_COHORT,
                 "--adjudicated-only"]) == 0  # fmt: skip
    assert _labels(settings, "settled") == {k["settled"][0]: (k["settled"][1], "adjudicated")}
    assert main(["cohort", "from-reads", "readers", "--source", TINY_COHORT, "--reads-only"]) == 0
    assert set(_labels(settings, "readers")) == {k["agree"][0], k["settled"][0], k["single"]}
    capsys.readouterr()
    assert main(["cohort", "from-reads", "readers", "--source", TINY_COHORT]) == 1
    assert (
        capsys.readouterr().err.strip()
        == "error: a cohort named 'readers' exists; choose another name"
    )


def test_training_records_where_its_labels_came_from(read) -> None:
    from workbench.model.bundle_info import read_bundle_info
    from workbench.train.config import TrainConfig
    from workbench.train.training import train

    settings, _ = read
    assert main(["cohort", "from-reads", "mixed", "--source", TINY_COHORT]) == 0
    train(
        settings,
        TrainConfig(cohort="mixed", name="from-reads", epochs=1, image_size=64, batch_size=8,
                    architecture="densenet-small", precision="fp32", device="cpu",
                    label_randomization_epochs=0, sanity_images=0),
        progress=False,
    )  # fmt: skip
    info = read_bundle_info(settings.models_dir, "from-reads")
    sources = info.contract.label_sources
    assert sources is not None and sources["read"] + sources["adjudicated"] == 3
    assert sum(sources.values()) == len(cohort_items(settings, "mixed"))
