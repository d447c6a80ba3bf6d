"""Split conformal prediction sets: coverage, determinism, multi-label, stored as data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from workbench.posthoc.conformal import (
    ConformalSets,
    MultiLabelConformal,
    conformal_quantile,
    coverage_summary,
    study_uniform,
)


def _calibrated(n: int, k: int, rng: np.random.Generator, sharp: float = 2.0):
    """Probabilities (n, k) and labels drawn from them: a perfectly calibrated model."""
    logits = rng.normal(0, sharp, (n, k))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(k, p=p) for p in probs])
    return probs, labels


@pytest.mark.parametrize("method", ["aps", "raps"])
def test_coverage_over_repeated_random_splits_is_within_three_points(method: str) -> None:
    rng = np.random.default_rng(0)
    probs, labels = _calibrated(4000, 5, rng)
    covs = []
    for _ in range(40):
        perm = rng.permutation(len(probs))
        cal, test = perm[:1000], perm[1000:2000]
        cp = ConformalSets(0.9, method).fit(probs[cal], labels[cal], rng.random(len(cal)))
        sets = cp.apply(probs[test], u=rng.random(len(test)))
        covs.append(coverage_summary(sets, labels[test])["coverage"])
    covs_arr = np.array(covs)
    assert abs(covs_arr.mean() - 0.9) < 0.01, covs_arr.mean()
    assert (np.abs(covs_arr - 0.9) <= 0.03).mean() >= 0.95, covs_arr


def test_without_randomisation_coverage_is_at_least_the_target() -> None:
    rng = np.random.default_rng(1)
    probs, labels = _calibrated(3000, 4, rng)
    cp = ConformalSets(0.9, "aps", randomized=False).fit(probs[:1500], labels[:1500])
    cov = coverage_summary(cp.apply(probs[1500:]), labels[1500:])["coverage"]
    assert cov >= 0.9 - 0.015


def test_raps_keeps_coverage_and_bounds_the_largest_sets() -> None:
    rng = np.random.default_rng(2)
    probs, labels = _calibrated(4000, 10, rng, sharp=3.0)
    u_cal, u_test = rng.random(2000), rng.random(2000)
    aps = ConformalSets(0.9, "aps").fit(probs[:2000], labels[:2000], u_cal)
    raps = ConformalSets(0.9, "raps", lam=0.2, k_reg=2).fit(probs[:2000], labels[:2000], u_cal)
    aps_sets, raps_sets = aps.apply(probs[2000:], u_test), raps.apply(probs[2000:], u_test)
    assert max(map(len, raps_sets)) < max(map(len, aps_sets))
    assert abs(coverage_summary(raps_sets, labels[2000:])["coverage"] - 0.9) <= 0.03


def test_sets_put_the_most_probable_class_first_and_can_be_kept_non_empty() -> None:
    rng = np.random.default_rng(3)
    probs, labels = _calibrated(500, 3, rng)
    assert any(not s for s in ConformalSets(0.5).fit(probs, labels).apply(probs, rng.random(500)))
    cp = ConformalSets(0.5, allow_empty=False).fit(probs, labels)
    for p, s in zip(probs, cp.apply(probs, rng.random(500)), strict=True):
        assert s and s[0] == int(np.argmax(p))
        assert len(set(s)) == len(s)


def test_a_study_gets_the_same_set_every_time() -> None:
    u1 = study_uniform("S0123456789A")
    assert u1 == study_uniform("S0123456789A") and 0 <= u1 < 1
    assert u1 != study_uniform("S0123456789B")


def test_the_fitted_threshold_is_plain_json_and_round_trips() -> None:
    rng = np.random.default_rng(4)
    probs, labels = _calibrated(300, 3, rng)
    cp = ConformalSets(0.9, "raps").fit(probs, labels, rng.random(300))
    again = ConformalSets.from_dict(json.loads(json.dumps(cp.to_dict())))
    assert again == cp
    assert again.apply(probs[:20], np.full(20, 0.3)) == cp.apply(probs[:20], np.full(20, 0.3))


def test_the_threshold_is_the_ceil_n_plus_1_coverage_th_smallest_score() -> None:
    # n = 100 scores 1..100 at 90%: k = ceil(101 x 0.9) = 91, so the threshold is 91, not 92
    scores = np.arange(1.0, 101.0)
    np.random.default_rng(1).shuffle(scores)
    assert conformal_quantile(scores, 0.9) == 91.0
    assert conformal_quantile(np.arange(1.0, 10.0), 0.9) == 9.0  # n = 9: k = 9, the largest
    assert conformal_quantile(np.arange(1.0, 9.0), 0.9) == np.inf  # n = 8: k = 9 > n


def test_too_few_calibration_studies_is_a_clear_error() -> None:
    probs = np.full((5, 2), 0.5)
    with pytest.raises(ValueError, match="too few"):
        ConformalSets(0.9).fit(probs, np.array([0, 1, 0, 1, 0]))


def test_multilabel_sets_cover_each_label() -> None:
    rng = np.random.default_rng(5)
    n = 4000
    p = 1 / (1 + np.exp(-rng.normal(0, 2, (n, 3))))
    y = (rng.random((n, 3)) < p).astype(int)
    ml = MultiLabelConformal(("a", "b", "c"), 0.9).fit(p[:2000], y[:2000], rng.random(2000))
    ml = MultiLabelConformal.from_dict(json.loads(json.dumps(ml.to_dict())))
    out = ml.apply(p[2000:], rng.random(2000))
    for j, name in enumerate("abc"):
        truth = np.where(y[2000:, j] == 1, "present", "absent")
        covered = np.mean([o[name] in ("uncertain", t) for o, t in zip(out, truth, strict=True)])
        # a "confident" label (empty set) counts as not covered, as the guarantee defines it
        assert abs(covered - 0.9) <= 0.03, (name, covered)


def test_coverage_summary_reports_subgroups() -> None:
    sets = [[0], [1, 0], [2], [0]]
    summary = coverage_summary(sets, [0, 0, 1, 1], {"site": ["A", "A", "B", None]})
    assert summary["coverage"] == 0.5 and summary["mean_set_size"] == 1.25
    assert summary["subgroups"]["site"]["A"] == {"n": 2, "coverage": 1.0, "mean_set_size": 1.5}
    assert summary["subgroups"]["site"]["unknown"]["coverage"] == 0.0


def test_the_post_hoc_models_follow_one_protocol() -> None:
    """fit returns self, learned state ends in "_", apply uses it, and the bundle record
    round-trips through to_dict / from_dict."""
    import dataclasses

    from workbench.catalog.records import StudyHeader
    from workbench.posthoc.ood import HeaderProfile
    from workbench.posthoc.protocol import PostHocModel

    rng = np.random.default_rng(5)
    probs, labels = _calibrated(400, 3, rng)
    binary = np.stack([probs[:, 0], 1 - probs[:, 0]], axis=1)
    targets = (rng.random((400, 2)) < 0.5).astype(int)
    header = StudyHeader("DX", ("CHEST",), ("MONOCHROME2",), 2, ((256, 256),))
    cases = [
        (ConformalSets(0.9), (probs, labels), (probs[:5],)),
        (ConformalSets(0.8, "raps"), (probs, labels), (probs[:5],)),
        (
            MultiLabelConformal(("a", "b"), 0.9),
            (np.c_[binary[:, 0], 1 - binary[:, 0]], targets),
            (binary[:5],),
        ),
        (HeaderProfile(), ([header],), (header,)),
    ]
    for model, fit_args, apply_args in cases:
        assert isinstance(model, PostHocModel)
        learned = [f.name for f in dataclasses.fields(model) if f.name.endswith("_")]
        assert learned, type(model).__name__
        assert model.fit(*fit_args) is model
        again = type(model).from_dict(model.to_dict())
        assert again.apply(*apply_args) == model.apply(*apply_args)
        assert again.to_dict() == model.to_dict()
