"""Binary, multi-class, one-vs-rest and multi-label problems, balanced sampling, K-fold
cross-validation and the experiment record, end to end on small synthetic cohorts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_settings
from workbench.catalog.cohorts import cohort_items, patient_folds
from workbench.catalog.ingest import ingest
from workbench.config import Settings
from workbench.dicom.synth import synthesize_cohort
from workbench.model.bundle import load_bundle
from workbench.model.distributed import World
from workbench.model.problems import (
    Problem,
    ProblemError,
    make_objective,
    parse_label,
    resolve_problem,
    sample_weights,
)
from workbench.predict.inference import predict_items
from workbench.predict.results import latest_predictions
from workbench.train.config import TrainConfig
from workbench.train.loop import epoch_batches
from workbench.train.training import train


@pytest.fixture(scope="module")
def multilabel_home(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """30 DX studies, some with both a nodule and an effusion ('effusion;nodule')."""
    root = tmp_path_factory.mktemp("multilabel")
    s = make_settings(root / "home")
    src = root / "src"
    summary = synthesize_cohort(
        src, n_studies=30, seed=3, modality="DX", image_size=48, multilabel=True
    )
    assert summary.class_counts["effusion;nodule"] >= 3
    ingest(s, src, src / "labels.csv", "ml", progress=False, workers=1)
    return s


def test_labels_parse_into_sets_and_the_problem_follows_them() -> None:
    assert parse_label("nodule; effusion") == ("effusion", "nodule")
    assert parse_label("normal") == () and parse_label(None) == ()
    p = resolve_problem("auto", ["nodule;effusion", "normal", "nodule"])
    assert (p.kind, p.classes, p.negative) == ("multilabel", ("effusion", "nodule"), "normal")
    assert p.target("effusion;nodule").tolist() == [1.0, 1.0]  # type: ignore[union-attr]
    assert p.target("normal").tolist() == [0.0, 0.0]  # type: ignore[union-attr]
    assert p.decide(np.array([0.2, 0.9]), [0.5, 0.5]) == "nodule"
    assert p.decide(np.array([0.7, 0.9]), [0.5, 0.5]) == "effusion;nodule"
    assert p.decide(np.array([0.1, 0.2]), [0.5, 0.5]) == "normal"
    assert resolve_problem("auto", ["lesion", "no_lesion"]).kind == "binary"
    assert resolve_problem("auto", ["a", "b", "c"]).kind == "multiclass"
    ovr = resolve_problem("ovr", ["a", "b", "c"])
    assert ovr.sigmoid and ovr.target("b").tolist() == [0.0, 1.0, 0.0]  # type: ignore[union-attr]
    with pytest.raises(ProblemError, match="use --problem multilabel"):
        resolve_problem("multiclass", ["a;b", "a"])
    with pytest.raises(ProblemError, match="needs 2 classes"):
        resolve_problem("binary", ["a", "b", "c"])


def test_a_multilabel_cohort_trains_calibrates_per_label_and_predicts_label_sets(
    multilabel_home: Settings,
) -> None:
    s = multilabel_home
    cfg = TrainConfig(
        cohort="ml", name="ml", epochs=1, image_size=32, batch_size=8, device="cpu"
    )  # problem auto: a study with two labels makes it multi-label
    result = train(s, cfg, progress=False)
    wb = json.loads((result.bundle / "configs" / "metadata.json").read_text())["workbench"]
    assert wb["problem"] == "multilabel"
    assert wb["classes"] == ["effusion", "nodule"] and wb["negative_class"] == "normal"
    assert wb["calibration"]["method"] == "per_label"
    assert set(wb["calibration"]["labels"]) == {"effusion", "nodule"}
    assert set(wb["thresholds"]) == {"effusion", "nodule"}
    assert all(0.0 <= t <= 1.0 for t in wb["thresholds"].values())
    detail = wb["metrics"]["test_detail"]
    for label in ("effusion", "nodule"):
        per = detail["per_class"][label]
        assert {"auroc", "auroc_ci", "threshold", "sensitivity", "specificity"} <= set(per)
        assert "ece_after" in per
    assert set(wb["metrics"]["test"]["auroc_per_label"]) == {"effusion", "nodule"}
    assert "pos_weight" in wb["training"]["loss"]

    bundle = load_bundle(s.models_dir, "ml")
    assert bundle.problem == "multilabel" and bundle.thresholds is not None
    items = cohort_items(s, "ml", "test")
    preds = predict_items(s, bundle, items, explain="none", progress=False)
    assert len(preds) == len(items)
    allowed = {"normal", "effusion", "nodule", "effusion;nodule"}
    for p in preds:
        assert set(p.probabilities) == {"effusion", "nodule"}
        assert all(0.0 <= v <= 1.0 for v in p.probabilities.values())
        assert p.predicted_label in allowed
        chosen = {
            c for c, t in zip(bundle.classes, bundle.thresholds, strict=True)
            if p.probabilities[c] >= t
        }  # fmt: skip
        assert set(parse_label(p.predicted_label)) == chosen
    rows = latest_predictions(s, bundle.bundle_hash, [i.study_id for i in items])
    assert {r.predicted_label for r in rows.values()} <= allowed


def test_one_vs_rest_trains_k_sigmoids_reported_per_class(tmp_path: Path) -> None:
    s = make_settings(tmp_path / "home")
    src = tmp_path / "src"
    synthesize_cohort(src, n_studies=24, seed=8, modality="DX", image_size=48)
    ingest(s, src, src / "labels.csv", "c", progress=False, workers=1)
    cfg = TrainConfig(
        cohort="c", name="ovr", epochs=1, image_size=32, batch_size=8, device="cpu",
        problem="ovr", sanity_images=0,  # the saliency checks of a sigmoid model: multi-label
    )  # fmt: skip
    result = train(s, cfg, progress=False)
    wb = json.loads((result.bundle / "configs" / "metadata.json").read_text())["workbench"]
    assert wb["problem"] == "ovr" and wb["classes"] == ["effusion", "nodule", "normal"]
    assert set(wb["metrics"]["test_detail"]["per_class"]) == set(wb["classes"])
    assert set(wb["thresholds"]) == set(wb["classes"])
    bundle = load_bundle(s.models_dir, "ovr")
    (pred,) = predict_items(
        s, bundle, cohort_items(s, "c", "test")[:1], explain="none", progress=False
    )
    # independent sigmoids: the predicted class is the most probable one
    assert pred.predicted_label == max(pred.probabilities, key=pred.probabilities.__getitem__)


def test_balanced_sampling_is_seeded_per_epoch_and_evens_out_the_classes() -> None:
    problem = Problem("multiclass", ("a", "b"), None)
    targets = [0] * 90 + [1] * 10
    draw = sample_weights(problem, targets)
    first = epoch_batches(100, 10, seed=1, epoch=3, draw=draw)
    assert first == epoch_batches(100, 10, seed=1, epoch=3, draw=draw)  # resume replays it
    assert first != epoch_batches(100, 10, seed=1, epoch=4, draw=draw)
    drawn = np.asarray([targets[i] for b in first for i in b])
    assert 0.3 < drawn.mean() < 0.7  # about half rare-class images instead of a tenth
    # with the sampler balancing, the loss is not weighted again
    assert make_objective(problem, targets, "sampler", World()).class_weight is None
    weighted = make_objective(problem, targets, "weights", World())
    assert weighted.class_weight is not None
    assert torch.allclose(weighted.class_weight, torch.tensor([100 / 90 / 2, 100 / 10 / 2]))


def test_two_fold_cross_validation_reports_each_fold_and_mean_and_sd(
    multilabel_home: Settings,
) -> None:
    s = multilabel_home
    items = [i for i in cohort_items(s, "ml") if i.label]
    folds = patient_folds(items, 2, seed=0)
    assert set(folds.values()) == {0, 1}
    by_patient: dict[str, set[int]] = {}
    for it in items:
        by_patient.setdefault(it.patient, set()).add(folds[it.patient])
    assert all(len(v) == 1 for v in by_patient.values())  # no patient in two folds
    cfg = TrainConfig(
        cohort="ml", name="cv", epochs=1, image_size=32, batch_size=8, device="cpu", folds=2,
        sanity_images=0,  # each fold's saliency checks: tested on a single run
    )  # fmt: skip
    result = train(s, cfg, progress=False)
    assert result.folds is not None
    record = json.loads((s.home / "crossval" / "cv.json").read_text())
    assert [f["fold"] for f in record["per_fold"]] == [1, 2]
    for key in ("accuracy", "auroc_macro", "ece_after"):
        assert set(record[key]) == {"mean", "sd"}
    assert record["accuracy"]["mean"] == pytest.approx(
        np.mean([f["accuracy"] for f in record["per_fold"]])
    )
    for k in (1, 2):
        wb = load_bundle(s.models_dir, f"cv-fold{k}").contract.to_dict()
        test_patients = {i.patient for i in items if folds[i.patient] == k - 1}
        assert wb["split"]["patients"]["test"] == len(test_patients)
