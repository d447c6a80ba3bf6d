"""Out-of-distribution flags and similar-case retrieval on embeddings with known structure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from workbench.catalog.records import StudyHeader
from workbench.posthoc.ood import HeaderProfile, OODDetector, false_flag_rate
from workbench.posthoc.similar import QUANTILES, EmbeddingIndex, precision_at_k

CLASSES = ("normal", "nodule", "effusion")


def _clusters(n: int, rng: np.random.Generator, dim: int = 64):
    """Three classes as clusters around fixed directions (ReLU-like, non-negative features)."""
    centres = np.abs(np.random.default_rng(99).normal(0, 1, (3, dim)))
    labels = rng.integers(0, 3, n)
    x = centres[labels] + rng.normal(0, 0.35, (n, dim))
    return np.maximum(x, 0), [CLASSES[i] for i in labels]


DX = StudyHeader("DX", ("CHEST",), ("MONOCHROME2",), 2, ((512, 512),))


@pytest.fixture(scope="module")
def fitted() -> tuple[EmbeddingIndex, OODDetector, np.random.Generator]:
    rng = np.random.default_rng(0)
    train, train_labels = _clusters(600, rng)
    held_out, _ = _clusters(300, rng)
    index = EmbeddingIndex().fit(train, [f"S{i:011d}" for i in range(600)], train_labels)
    profile = HeaderProfile().fit(
        [DX, StudyHeader("DX", ("CHEST",), ("MONOCHROME1",), 2, ((480, 400),))]
    )
    return index, OODDetector(profile).fit(index, train, held_out), rng


def test_similar_studies_share_the_query_label_well_above_chance(fitted) -> None:
    index, _, rng = fitted
    test, labels = _clusters(200, rng)
    p_at_5 = precision_at_k(index, test, labels, k=5)
    assert p_at_5 > 0.9  # chance is about 1/3
    found = index.apply(test[:1], k=3)[0]
    assert len(found) == 3 and found[0].similarity >= found[-1].similarity


def test_a_study_can_be_left_out_of_its_own_neighbours(fitted) -> None:
    index, _, _ = fitted
    own = index.embeddings_[:1]
    assert index.apply(own, k=1)[0][0].study_key == index.study_keys_[0]
    assert all(
        n.study_key != index.study_keys_[0]
        for n in index.apply(own, [index.study_keys_[0]], k=5)[0]
    )


def test_noise_and_another_modality_are_flagged_and_in_distribution_mostly_not(fitted) -> None:
    index, det, rng = fitted
    test, _ = _clusters(500, rng)
    results = det.apply(index, test, [DX] * len(test))
    assert false_flag_rate(results) <= 0.03
    noise = np.abs(rng.normal(0, 1, (20, 64)))
    assert all(r.flagged for r in det.apply(index, noise, [DX] * 20))
    ct = StudyHeader("CT", ("CHEST",), ("MONOCHROME2",), 3, ((512, 512),))
    result = det.apply(index, test[:1], [ct])[0]
    assert result.flagged and any("modality CT" in r for r in result.reasons)
    assert any("3D input" in r for r in result.reasons)


def test_header_profile_names_what_is_unlike_training() -> None:
    profile = HeaderProfile().fit([DX])
    assert profile.apply(DX) == []
    odd = StudyHeader("DX", ("KNEE",), ("RGB",), 2, ((64, 64),))
    reasons = " | ".join(profile.apply(odd))
    assert "body part KNEE" in reasons and "RGB" in reasons and "64x64" in reasons


def test_mahalanobis_score_also_separates_noise(fitted) -> None:
    index, _, rng = fitted
    train = index.embeddings_
    held_out, _ = _clusters(300, rng)
    det = OODDetector(HeaderProfile().fit([DX]), method="mahalanobis").fit(index, train, held_out)
    test, _ = _clusters(300, rng)
    assert false_flag_rate(det.apply(index, test, [DX] * 300)) <= 0.04
    noise = np.abs(rng.normal(0, 1, (20, 64)))
    assert all(r.flagged for r in det.apply(index, noise, [DX] * 20))
    again = OODDetector.from_dict(json.loads(json.dumps(det.to_dict())), det.arrays())
    np.testing.assert_allclose(again.scores(index, noise), det.scores(index, noise), rtol=1e-5)


def test_index_and_detector_round_trip_as_plain_data(fitted, tmp_path: Path) -> None:
    index, det, rng = fitted
    index.save(tmp_path / "index.npz")
    loaded = EmbeddingIndex.load(tmp_path / "index.npz")
    queries, _ = _clusters(10, rng)
    assert loaded.apply(queries, k=4) == index.apply(queries, k=4)
    again = OODDetector.from_dict(json.loads(json.dumps(det.to_dict())))
    assert again.apply(loaded, queries, [DX] * 10) == det.apply(index, queries, [DX] * 10)


def test_closeness_percentiles_tell_apart_neighbours_that_similarity_rounds_together(
    fitted,
) -> None:
    index, _, rng = fitted
    test, _ = _clusters(20, rng)
    found = index.apply(test, k=5)
    closer = [n.closer_than for row in found for n in row]
    assert all(0.0 <= c <= 100.0 for c in closer)
    for row in found:  # nearest first: never closer than a nearer neighbour
        assert all(a.closer_than >= b.closer_than for a, b in zip(row, row[1:], strict=False))
        # neighbours at different distances get different percentiles
        for a, b in zip(row, row[1:], strict=False):
            if b.distance - a.distance > 1e-3 and 0 < b.closer_than < 100:
                assert a.closer_than > b.closer_than
    # what the study page used to show ("similarity 0.94") against what it shows now
    assert len({round(c) for c in closer}) > 3 * len(
        {f"{n.similarity:.2f}" for r in found for n in r}
    )


def test_closeness_is_measured_against_the_index_own_neighbour_distances(fitted) -> None:
    index, _, _ = fitted
    ref = index.reference_distances()
    assert len(ref) == 5 * len(index)  # leave-one-out: each study's 5 nearest other studies
    assert ref.min() > 0  # no study is its own neighbour
    assert len(index.neighbour_quantiles_) == QUANTILES
    typical = np.quantile(ref, [0.1, 0.5, 0.9])
    np.testing.assert_allclose(index.closer_than(typical), [90, 50, 10], atol=1.0)
    assert index.closer_than(np.array([0.0, 2.0])).tolist() == [100.0, 0.0]


def test_an_index_saved_without_quantiles_computes_the_same_ones_on_load(
    fitted, tmp_path: Path
) -> None:
    index, _, rng = fitted
    old = tmp_path / "old_index.npz"  # as bundles wrote it before the quantiles were stored
    np.savez(
        old,
        embeddings=index.embeddings_.astype(np.float16),
        study_keys=index.study_keys_,
        labels=index.labels_,
    )
    loaded = EmbeddingIndex.load(old)
    np.testing.assert_array_equal(loaded.neighbour_quantiles_, index.neighbour_quantiles_)
    queries, _ = _clusters(5, rng)
    assert loaded.apply(queries, k=5) == index.apply(queries, k=5)
    index.save(tmp_path / "new.npz")  # and a new one stores them
    with np.load(tmp_path / "new.npz") as saved:
        np.testing.assert_array_equal(saved["neighbour_quantiles"], index.neighbour_quantiles_)


def test_an_index_of_one_study_has_no_closeness() -> None:
    index = EmbeddingIndex().fit(np.ones((1, 8)), ["S1"], ["normal"])
    (only,) = index.apply(np.ones((1, 8)), k=5)[0]
    assert only.study_key == "S1" and np.isnan(only.closer_than)


def test_the_index_follows_the_post_hoc_protocol(fitted) -> None:
    from workbench.posthoc.protocol import PostHocModel

    index, _, rng = fitted
    fresh = EmbeddingIndex(k=3)
    assert isinstance(fresh, PostHocModel)
    with pytest.raises(ValueError, match="not fitted"):
        fresh.apply(index.embeddings_[:1])
    assert fresh.fit(index.embeddings_, index.study_keys_, index.labels_) is fresh
    again = EmbeddingIndex.from_dict(json.loads(json.dumps(fresh.to_dict())), fresh.arrays())
    queries, _ = _clusters(6, rng)
    assert again.apply(queries) == fresh.apply(queries)
    assert all(len(row) == 3 for row in again.apply(queries))
