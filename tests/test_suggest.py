"""`workbench suggest`: the unlabelled studies a read would teach most, uncertain and diverse,
stored as the cohort's labelling worklist."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from tests.conftest import TINY_MODEL, Pipeline, _env_for, make_settings
from workbench.cli import main
from workbench.review.suggest import diverse_order, uncertainty
from workbench.review.worklist import STRATEGIES, load_worklist


def test_an_unsure_study_scores_above_a_sure_one_under_every_uncertainty() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.96, 0.02, 0.02], [0.4, 0.4, 0.2]])
    for strategy in ("entropy", "margin"):
        scores = uncertainty([probs], strategy, sigmoid=False)
        assert scores[0] > scores[1] and scores[2] > scores[1], strategy
    sizes = np.array([2, 1, 2])
    scores = uncertainty([probs], "set-size", sigmoid=False, set_sizes=sizes)
    assert scores[1] < min(scores[0], scores[2])  # the singleton set is the surest
    assert scores[2] > scores[0]  # equal sizes: the higher entropy first
    labels = np.array([[0.5, 0.1], [0.99, 0.02]])  # sigmoid: one probability per label
    for strategy in ("entropy", "margin"):
        scores = uncertainty([labels], strategy, sigmoid=True)
        assert scores[0] > scores[1], strategy


def test_ensemble_disagreement_is_zero_when_members_agree_and_grows_when_they_do_not() -> None:
    a = np.array([[0.9, 0.1], [0.5, 0.5]])
    same = uncertainty([a, a], "ensemble-disagreement", sigmoid=False)
    np.testing.assert_allclose(same, 0.0, atol=1e-12)
    b = np.array([[0.1, 0.9], [0.5, 0.5]])  # they disagree on the first study only
    split = uncertainty([a, b], "ensemble-disagreement", sigmoid=False)
    assert split[0] > 0.3 and abs(split[1]) < 1e-12
    with pytest.raises(Exception, match="two models or more"):
        uncertainty([a], "ensemble-disagreement", sigmoid=False)


def test_picks_spread_across_clusters_where_the_top_scores_sit_in_one() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[5.0, 0.0], [0.0, 5.0], [-5.0, 0.0]])
    emb = np.concatenate([c + rng.normal(0, 0.1, (6, 2)) for c in centres])
    # cluster 0 holds the six most uncertain studies, then cluster 1, then cluster 2
    scores = np.concatenate([np.full(6, 0.9), np.full(6, 0.8), np.full(6, 0.7)])
    scores += rng.uniform(0, 0.01, 18)
    top3 = np.argsort(-scores)[:3]
    assert len({int(i) // 6 for i in top3}) == 1  # ranking by score alone: one cluster
    picks = diverse_order(scores, emb, np.zeros((0, 2)), n=3, pool_factor=6)
    assert sorted(int(i) // 6 for i in picks) == [0, 1, 2]
    # a labelled study in cluster 0: the first pick goes elsewhere
    picks = diverse_order(scores, emb, centres[:1], n=2, pool_factor=6)
    assert all(int(i) // 6 != 0 for i in picks)
    # the pool bounds the choice: with n=1 and no reference, a pick from the uncertain pool
    assert diverse_order(scores, emb, np.zeros((0, 2)), n=1, pool_factor=3)[0] in set(
        np.argsort(-scores)[:3].tolist()
    )


@pytest.fixture
def incoming(pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A home of its own with the pipeline's model and a cohort of 16 unlabelled and 6
    labelled studies (the environment points at it while the test runs)."""
    from workbench.catalog.ingest import ingest
    from workbench.dicom.synth import synthesize_cohort

    settings = make_settings(tmp_path / "home")
    shutil.copytree(pipeline.bundle, settings.models_dir / TINY_MODEL / pipeline.bundle.name)
    src = tmp_path / "new"
    synthesize_cohort(src, n_studies=22, seed=31, modality="DX", image_size=96)
    labels = (src / "labels.csv").read_text().splitlines()
    (src / "labels.csv").write_text("\n".join(labels[:7]) + "\n")  # header + 6 labelled
    ingest(settings, src, src / "labels.csv", "incoming", progress=False)
    for k, v in _env_for(settings).items():
        monkeypatch.setenv(k, v)
    return settings


def test_suggest_ranks_unlabelled_studies_and_stores_the_worklist(incoming, tmp_path) -> None:
    from workbench.catalog.cohorts import cohort_items
    from workbench.db.store import AuditEvent, session_scope

    out = tmp_path / "suggested.csv"
    code = main(
        ["suggest", "--cohort", "incoming", "--n", "5", "--model", TINY_MODEL, "--out", str(out)]
    )
    assert code == 0
    worklist = load_worklist(incoming, "incoming")
    assert worklist is not None and worklist.strategy == "entropy"
    assert worklist.n_unlabelled == 16 and len(worklist.suggestions) == 5
    assert [s.rank for s in worklist.suggestions] == [1, 2, 3, 4, 5]
    unlabelled = {i.study_key for i in cohort_items(incoming, "incoming") if not i.label}
    keys = [s.study_key for s in worklist.suggestions]
    assert len(set(keys)) == 5 and set(keys) <= unlabelled
    # the picks come from the uncertainty pool: the 15 most uncertain of the 16
    assert worklist.n_labelled_reference > 6  # the model's training studies and the 6 labelled
    stored = (incoming.home / "suggestions" / "incoming.json").read_text()
    assert "1.2.826" not in stored and "FAKE" not in stored  # keys only, no UIDs or names
    # each pick has a stored prediction (no heat map) for the labelling page to open
    from workbench.db.store import Prediction

    with session_scope(incoming.database_url) as s:
        for sug in worklist.suggestions:
            pred = s.get(Prediction, sug.prediction_id)
            assert pred is not None and pred.study.study_key == sug.study_key
            assert pred.explain_method == "none"
    assert worklist.classes and worklist.multilabel is False
    rows = list(csv.DictReader(out.open()))
    assert [r["study_key"] for r in rows] == keys
    with session_scope(incoming.database_url) as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "suggest.worklist")).one()
        assert event.object_id == "incoming" and event.new_value["studies"] == keys


def test_an_ensemble_of_one_model_twice_agrees_with_itself(incoming, capsys) -> None:
    code = main(
        ["suggest", "--cohort", "incoming", "--n", "3", "--model", TINY_MODEL, "--model",
         TINY_MODEL, "--strategy", "ensemble-disagreement"]
    )  # fmt: skip
    assert code == 0
    worklist = load_worklist(incoming, "incoming")
    assert worklist is not None and len(worklist.models) == 2
    assert all(abs(s.score) < 1e-6 for s in worklist.suggestions)
    # one model cannot disagree with itself: a one-line refusal
    capsys.readouterr()
    code = main(["suggest", "--cohort", "incoming", "--model", TINY_MODEL, "--strategy",
                 "ensemble-disagreement"])  # fmt: skip
    assert code == 1
    assert "two models or more" in capsys.readouterr().err


def test_every_strategy_is_offered_and_coreset_needs_no_uncertainty(incoming) -> None:
    from workbench.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    strategy = next(a for a in sub.choices["suggest"]._actions if a.dest == "strategy")
    assert tuple(strategy.choices) == STRATEGIES
    assert main(["suggest", "--cohort", "incoming", "--n", "4", "--model", TINY_MODEL,
                 "--strategy", "coreset"]) == 0  # fmt: skip
    worklist = load_worklist(incoming, "incoming")
    assert worklist is not None and [s.score for s in worklist.suggestions] == [0.0] * 4
    json.dumps(worklist.to_dict())
