"""What ships with a model: operating points, conformal sets, OOD, similar cases (arrays)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from workbench.catalog.records import StudyHeader
from workbench.posthoc.calibration import Calibration
from workbench.predict.trust import (
    INDEX_FILE,
    SplitOutputs,
    apply_operating_points,
    fit_trust,
    index_bytes,
    load_trust,
    operating_points,
)

CLASSES = ("effusion", "nodule", "normal")
DX = StudyHeader("DX", ("CHEST",), ("MONOCHROME2",), 2, ((256, 256),))


def _split(n: int, rng: np.random.Generator, offset: int) -> SplitOutputs:
    labels = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), labels] += 2.5
    centres = np.abs(np.random.default_rng(7).normal(0, 1, (3, 32)))
    emb = np.maximum(centres[labels] + rng.normal(0, 0.3, (n, 32)), 0)
    return SplitOutputs(
        study_ids=np.arange(offset, offset + n),
        study_keys=tuple(f"S{offset + i:011d}" for i in range(n)),
        logits=logits,
        embeddings=emb,
        labels=labels,
        headers=(DX,) * n,
        subgroups={"site": ["A" if i % 2 else "B" for i in range(n)]},
    )


def test_trust_fits_on_calibration_and_measures_on_test() -> None:
    rng = np.random.default_rng(0)
    train, cal, test = _split(300, rng, 0), _split(300, rng, 1000), _split(600, rng, 2000)
    trust = fit_trust(CLASSES, Calibration.identity(CLASSES), train, cal, test)
    report = trust.report
    assert abs(report["conformal_test"]["coverage"] - 0.9) <= 0.03
    assert set(report["conformal_test"]["subgroups"]["site"]) == {"A", "B"}
    assert report["ood_test"]["false_flag_rate"] <= 0.03
    assert report["similar_test"]["precision_at_k"] > 0.9 > report["similar_test"]["chance"]
    for name, point in report["operating_points_test"].items():
        assert point["sensitivity"] >= 0.85, name
    meta = trust.metadata()
    assert meta["conformal"]["qhat"] > 0 and meta["ood"]["threshold"] > 0


def test_operating_point_reaches_the_target_sensitivity_on_its_own_split() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 500)
    probs = np.clip(labels * 0.3 + rng.random(500) * 0.7, 0, 1)
    p = np.stack([1 - probs, probs], axis=1)
    points = operating_points(p, labels, ("neg", "pos"), 0.9)
    pos = points["classes"]["pos"]
    assert pos["sensitivity"] >= 0.9 and pos["specificity"] > 0.3
    again = apply_operating_points(points, p, labels, ("neg", "pos"))
    assert again["pos"]["sensitivity"] == pos["sensitivity"]


def test_each_similar_case_carries_its_closeness_also_from_an_older_bundle(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(2)
    train, cal, test = _split(200, rng, 0), _split(100, rng, 1000), _split(50, rng, 2000)
    trust = fit_trust(CLASSES, Calibration.identity(CLASSES), train, cal, test)
    new, old = tmp_path / "new", tmp_path / "old"
    for bundle in (new, old):
        (bundle / "models").mkdir(parents=True)
    (new / "models" / INDEX_FILE).write_bytes(index_bytes(trust.index))
    idx = trust.index  # an index file as bundles wrote it before it held the quantiles
    np.savez(
        old / "models" / INDEX_FILE,
        embeddings=idx.embeddings_.astype(np.float16),
        study_keys=idx.study_keys_,
        labels=idx.labels_,
    )
    meta = json.loads(json.dumps(trust.metadata()))
    probs = np.full(3, 1 / 3)
    found = []
    for bundle in (new, old):
        loaded = load_trust(bundle, meta)
        assert loaded is not None
        found.append(
            loaded.assess(CLASSES, test.study_keys[0], probs, test.embeddings[0], DX)["similar"]
        )
    assert found[0] == found[1]
    closer = [n["closer_than"] for n in found[0]]
    assert len(closer) == 5 and all(0 <= c <= 100 for c in closer)
    assert closer == sorted(closer, reverse=True)
    assert [n["distance"] for n in found[0]] == sorted(n["distance"] for n in found[0])
