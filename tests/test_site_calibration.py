"""Per-site calibration (``train --calibrate-per-site``): a map per site with enough calibration
studies, the global map for the others, stored as JSON, applied and recorded by ``predict``.

The numpy-level tests use sites whose logits are miscalibrated differently: the same true
probabilities, with logits scaled up at one site (overconfident) and down at another, twice
as large (underconfident). Pooled, the two errors nearly cancel, so the global map hardly
changes anything, while each site on its own is far from calibrated.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_settings, torch_threads
from workbench.posthoc.calibration import (
    Calibration,
    Calibrator,
    LabelCalibration,
    LabelCalibrator,
    softmax,
)
from workbench.posthoc.site_calibration import (
    GLOBAL_MAP,
    SiteCalibration,
    SiteCalibrator,
    site_calibration_metrics,
)

# site -> (logit scale, studies per n): north overconfident, south underconfident and larger
SCALES: dict[str, float | tuple[float, int]] = {"north": (2.0, 1), "south": (0.5, 2)}


def _fit_sites(
    logits: np.ndarray, labels: np.ndarray, sites: list, global_map: object, **kw: object
) -> tuple[SiteCalibration, dict]:
    """SiteCalibrator(...).fit(...): the fitted map and what the fit found per site."""
    fitted = SiteCalibrator(global_map, **kw).fit(logits, labels, sites)  # type: ignore[arg-type]
    return fitted.map_, fitted.report_


def _sites(
    n: int, seed: int, scales: Mapping[str, float | tuple[float, int]] = SCALES, k: int = 3
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(logits, labels, sites): labels drawn from softmax(t), logits ``t * scale`` per site,
    ``n`` studies per site (``n * share`` where a site is given as (scale, share))."""
    rng = np.random.default_rng(seed)
    zs, ys, sites = [], [], []
    for site, spec in scales.items():
        scale, share = spec if isinstance(spec, tuple) else (spec, 1)
        t = rng.normal(size=(n * share, k)) * 1.5
        y = (rng.random(n * share)[:, None] > np.cumsum(softmax(t), axis=1)).sum(axis=1)
        zs.append(t * scale)
        ys.append(np.minimum(y, k - 1))
        sites += [site] * (n * share)
    return np.vstack(zs), np.concatenate(ys), sites


def _classes(k: int) -> tuple[str, ...]:
    return tuple(f"c{i}" for i in range(k))


@pytest.mark.parametrize("k", [2, 3])
def test_per_site_maps_lower_each_sites_ece_and_log_loss_below_the_global_maps(k: int) -> None:
    z, y, sites = _sites(100, seed=0, k=k)
    global_map = Calibrator(_classes(k)).fit(z, y).map_
    per_site, fit = _fit_sites(z, y, sites, global_map, seed=0)
    assert set(per_site.sites) == {"north", "south"} and not per_site.fallback
    for site in SCALES:
        assert fit[site]["map"] == f"site:{site}"
        assert fit[site]["held_out_log_loss"] < fit[site]["global_log_loss"]

    # measured on fresh studies of the same sites
    zt, yt, st = _sites(1000, seed=1, k=k)
    m = site_calibration_metrics(zt, yt, st, per_site)
    for site in SCALES:
        row = m["per_site"][site]
        assert row["map"] == f"site:{site}" and row["n"] == st.count(site)
        assert row["per_site"]["ece"] < row["global"]["ece"], (site, row)
        assert row["per_site"]["log_loss"] < row["global"]["log_loss"], (site, row)
        assert row["per_site"]["ece"] < 0.05
    overall = m["overall"]
    assert overall["per_site"]["log_loss"] < overall["global"]["log_loss"]
    assert overall["per_site"]["brier"] < overall["global"]["brier"]


def test_a_multilabel_models_sites_get_per_label_maps_that_beat_the_global_ones() -> None:
    # two labels, each a binary problem miscalibrated per site as above
    z2, y2, sites = _sites(100, seed=2, k=2)
    z2b, y2b, _ = _sites(100, seed=3, k=2)
    logits = np.stack([z2[:, 1] - z2[:, 0], z2b[:, 1] - z2b[:, 0]], axis=1)
    targets = np.stack([y2, y2b], axis=1)
    global_map = LabelCalibrator(("effusion", "nodule")).fit(logits, targets).map_
    per_site, fit = _fit_sites(logits, targets, sites, global_map)
    assert all(isinstance(m, LabelCalibration) for m in per_site.sites.values())
    assert set(per_site.sites) == {"north", "south"}
    assert set(fit["north"]["method"]) == {"effusion", "nodule"}
    probs = per_site.apply(logits, sites)
    assert probs.shape == (300, 2) and np.all((probs >= 0) & (probs <= 1))
    m = site_calibration_metrics(logits, targets, sites, per_site)
    for site in SCALES:
        row = m["per_site"][site]
        assert row["per_site"]["log_loss"] < row["global"]["log_loss"], (site, row)


def test_a_site_with_too_few_studies_or_a_missing_class_falls_back_to_the_global_map() -> None:
    z, y, sites = _sites(150, seed=4, scales={"north": 3.0, "small": 0.4, "one-class": 0.4})
    small = [i for i, s in enumerate(sites) if s == "small"][12:]
    one_class = [i for i, s in enumerate(sites) if s == "one-class" and y[i] != 0]
    drop = set(small) | set(one_class)
    keep = np.array([i for i in range(len(sites)) if i not in drop])
    z, y, sites = z[keep], y[keep], [sites[i] for i in keep]
    sites[0] = None  # type: ignore[call-overload]  # a study without a site: no site's
    global_map = Calibrator(_classes(3)).fit(z, y).map_
    per_site, fit = _fit_sites(z, y, sites, global_map, min_studies=30)

    assert set(per_site.sites) == {"north"}
    assert per_site.fallback["small"] == "12 calibration studies, needs 30"
    assert per_site.fallback["one-class"].startswith("class 'c1' has 0 calibration studies")
    assert fit["small"]["map"] == fit["one-class"]["map"] == GLOBAL_MAP
    assert "method" not in fit["small"]  # nothing was fitted for it
    assert None not in fit

    for site in ("small", "one-class", "never-seen", None):
        chosen, name = per_site.map_for(site)
        assert chosen is global_map and name == GLOBAL_MAP
    rows = [i for i, s in enumerate(sites) if s != "north"]
    np.testing.assert_array_equal(per_site.apply(z, sites)[rows], global_map.apply(z[rows]))
    m = site_calibration_metrics(z, y, sites, per_site)
    assert m["per_site"]["small"]["map"] == GLOBAL_MAP
    assert m["per_site"]["unknown"] == {**m["per_site"]["unknown"], "n": 1, "map": GLOBAL_MAP}


def test_sites_miscalibrated_alike_keep_the_global_map() -> None:
    """Three sites with the same miscalibration: on this seed no site's own map beats the
    global map's log loss on its studies, so every site keeps it, with the reason."""
    z, y, sites = _sites(100, seed=3, scales={"a": 2.0, "b": 2.0, "c": 2.0})
    global_map = Calibrator(_classes(3)).fit(z, y).map_
    per_site, fit = _fit_sites(z, y, sites, global_map)
    assert per_site.sites == {}
    for site in ("a", "b", "c"):
        assert per_site.fallback[site].startswith("the global map fits its studies as well")
        assert fit[site]["global_log_loss"] <= fit[site]["held_out_log_loss"]


def _split(z: np.ndarray, y: np.ndarray, sites: list[str], offset: int):  # -> SplitOutputs
    from workbench.catalog.records import StudyHeader
    from workbench.predict.trust import SplitOutputs

    n = len(y)
    header = StudyHeader("DX", ("CHEST",), ("MONOCHROME2",), 2, ((64, 64),))
    rng = np.random.default_rng(offset)
    return SplitOutputs(
        study_ids=np.arange(offset, offset + n),
        study_keys=tuple(f"S{offset + i:011d}" for i in range(n)),
        logits=z,
        embeddings=np.abs(rng.normal(size=(n, 8))),
        labels=y,
        headers=(header,) * n,
        subgroups={"site": sites},
    )


def test_conformal_sets_and_operating_points_are_fitted_on_the_per_site_probabilities() -> None:
    """The thresholds must hold for the numbers `predict` shows: with per-site maps, the
    conformal threshold and the operating points are those of the per-site probabilities, and
    the test coverage is measured on them (per site too)."""
    from workbench.posthoc.conformal import ConformalSets, study_uniform
    from workbench.predict.trust import fit_trust, operating_points

    classes = _classes(3)
    z, y, sites = _sites(100, seed=6)
    zt, yt, st = _sites(200, seed=7)
    global_map = Calibrator(classes).fit(z, y).map_
    per_site, _ = _fit_sites(z, y, sites, global_map)
    assert per_site.sites
    train, cal, test = _split(z, y, sites, 0), _split(z, y, sites, 1000), _split(zt, yt, st, 5000)

    trust = fit_trust(classes, per_site, train, cal, test)
    probs = per_site.apply(z, sites)
    u = np.array([study_uniform(k) for k in cal.study_keys])
    expected = ConformalSets(0.9, "aps").fit(probs, y, u)
    assert trust.conformal is not None and trust.conformal.qhat_ == expected.qhat_
    assert trust.operating_points == operating_points(probs, y, classes, 0.9)
    assert trust.conformal.qhat_ != fit_trust(classes, global_map, train, cal, test).conformal.qhat_  # type: ignore[union-attr]
    report = trust.report["conformal_test"]
    # one draw of 300 calibration studies: coverage varies by about 2 points around 90%
    assert 0.84 <= report["coverage"] <= 0.96
    assert set(report["subgroups"]["site"]) == {"north", "south"}


def _no_pickle(obj: object) -> None:
    """Only JSON's own types all the way down."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert isinstance(key, str)
            _no_pickle(value)
    elif isinstance(obj, list):
        for value in obj:
            _no_pickle(value)
    else:
        assert obj is None or type(obj) in (str, int, float, bool), type(obj)


def test_site_calibration_round_trips_through_a_bundle_as_plain_json(tmp_path: Path) -> None:
    from workbench.model.bundle import load_bundle, save_bundle
    from workbench.model.data import InputSpec
    from workbench.model.nets import create_network

    z, y, sites = _sites(150, seed=5, scales={"north": 3.0, "south": 0.4, "small": 1.0})
    keep = np.array([i for i, s in enumerate(sites) if s != "small" or i % 150 < 10])
    z, y, sites = z[keep], y[keep], [sites[i] for i in keep]
    classes = _classes(3)
    global_map = Calibrator(classes).fit(z, y).map_
    per_site, _ = _fit_sites(z, y, sites, global_map)
    assert per_site.sites and per_site.fallback["small"] == "10 calibration studies, needs 30"
    own = sorted(per_site.sites)[0]

    stored = per_site.to_dict()
    _no_pickle(stored)
    again = SiteCalibration.from_dict(json.loads(json.dumps(stored)), global_map)
    assert again == per_site
    np.testing.assert_array_equal(again.apply(z, sites), per_site.apply(z, sites))

    spec = InputSpec(image_size=32, spatial_dims=2)
    net = create_network(2, 3)
    models = tmp_path / "models"
    extra = {"problem": "multiclass", "site_calibration": stored}
    save_bundle(models, "sited", net, classes, spec, global_map, extra)
    save_bundle(models, "plain", net, classes, spec, global_map, {"problem": "multiclass"})

    files = sorted(p.name for p in (models / "sited" / "v1").rglob("*") if p.is_file())
    assert files == ["README.md", "inference.json", "metadata.json", "model.pt"]
    meta = json.loads((models / "sited" / "v1" / "configs" / "metadata.json").read_text())
    _no_pickle(meta["workbench"]["site_calibration"])
    assert meta["workbench"]["calibration"] == global_map.to_dict()  # as without per-site maps
    card = (models / "sited" / "v1" / "docs" / "README.md").read_text()
    assert f"per site: {own} (" in card and "global map for " in card.split("small")[0]

    sited = load_bundle(models, "sited")
    assert sited.site_calibration == per_site
    assert sited.calibration_for(own) == (per_site.sites[own], f"site:{own}")
    assert sited.calibration_for("small") == (global_map, GLOBAL_MAP)
    assert sited.calibration_for(None) == (global_map, GLOBAL_MAP)
    # a bundle without per-site maps loads as before: the global map for every site
    plain = load_bundle(models, "plain")
    assert plain.site_calibration is None
    assert plain.calibration == global_map
    assert plain.calibration_for(own) == (global_map, GLOBAL_MAP)


def test_the_cli_flag_turns_per_site_calibration_on_and_is_off_by_default() -> None:
    from workbench.cli import build_parser
    from workbench.train.config import TrainConfig

    base = ["train", "--cohort", "c", "--name", "m"]
    off = build_parser().parse_args(base)
    on = build_parser().parse_args([*base, "--calibrate-per-site", "--site-min-studies", "12"])
    # the option's default is the configuration's (one source of defaults)
    assert off.calibrate_per_site is False and off.site_min_studies == 30
    assert on.calibrate_per_site is True and on.site_min_studies == 12
    assert TrainConfig(cohort="c", name="m").calibrate_per_site is False
    assert TrainConfig(cohort="c", name="m").site_min_studies == 30


def _sited_items(items: Sequence) -> dict[str | None, list]:
    out: dict[str | None, list] = {}
    for item in items:
        out.setdefault(item.site, []).append(item)
    return out


def test_train_and_predict_apply_the_studys_site_map_and_record_which(tmp_path: Path) -> None:
    """End to end on a tiny cohort (90 studies at three sites, one epoch at 32 px): the bundle
    holds the per-site fit, its metrics and maps; every stored prediction names the map that
    calibrated it and its probabilities are that map's; a bundle given a map for one site
    applies it to that site's studies only."""
    from sqlalchemy import select

    from workbench.catalog.cohorts import cohort_items
    from workbench.catalog.ingest import ingest
    from workbench.db.store import Prediction, new_session
    from workbench.dicom.synth import synthesize_cohort
    from workbench.model.bundle import load_bundle
    from workbench.predict.inference import predict_items, predict_study, write_csv
    from workbench.train.config import TrainConfig
    from workbench.train.training import train

    settings = make_settings(tmp_path / "home")
    src = tmp_path / "studies"
    synthesize_cohort(src, n_studies=90, seed=3, modality="DX", image_size=64)
    ingest(settings, src, src / "labels.csv", "sites", progress=False)
    with torch_threads(2):
        result = train(
            settings,
            TrainConfig(
                cohort="sites",
                name="sited",
                epochs=1,
                image_size=32,
                batch_size=8,
                device="cpu",
                split_fractions=(0.4, 0.4, 0.2),
                sanity_images=0,
                label_randomization_epochs=0,
                calibrate_per_site=True,
                site_min_studies=10,
            ),
            progress=False,
        )
    bundle = load_bundle(settings.models_dir, "sited")
    wb = bundle.contract.to_dict()
    fit = wb["calibration_fit"]["per_site"]
    cal_items = cohort_items(settings, "sites", "calibration")
    test_items = cohort_items(settings, "sites", "test")
    assert fit["min_studies"] == 10
    assert set(fit["sites"]) == {i.site for i in cal_items}
    site_cal = bundle.site_calibration
    assert site_cal is not None
    # every site seen at calibration has its own map or is listed with a reason
    assert set(site_cal.sites) | set(site_cal.fallback) == set(fit["sites"])
    detail = wb["metrics"]["test_detail"]["site_calibration"]
    assert set(detail["per_site"]) == {i.site for i in test_items}
    for row in detail["per_site"].values():
        assert set(row) >= {"n", "map", "raw", "global", "per_site"}
    assert result.metrics["ece_after"] == pytest.approx(detail["overall"]["per_site"]["ece"])
    assert "ece_after_global" in result.metrics

    predict_items(settings, bundle, test_items, explain="none", progress=False)
    out = tmp_path / "predictions.csv"
    with new_session(settings.database_url) as session:
        rows = {p.study_id: p for p in session.scalars(select(Prediction))}
        write_csv(out, bundle, list(rows.values()))
    with out.open() as fh:
        written = {r["study_key"]: r["calibration_map"] for r in csv.DictReader(fh)}
    assert written == {i.study_key: bundle.calibration_for(i.site)[1] for i in test_items}
    assert len(rows) == len(test_items)
    for item in test_items:
        row = rows[item.study_id]
        chosen, name = bundle.calibration_for(item.site)
        assert row.calibration_map == name
        # the raw softmax gives the study logit up to a constant, which no map sees
        logit = np.log([[row.raw_probabilities[c] for c in bundle.classes]])
        expected = chosen.apply(logit)[0]
        got = [row.probabilities[c] for c in bundle.classes]
        np.testing.assert_allclose(got, expected, atol=1e-5)

    # A map for one site only (a strong temperature, to be unmistakable): that site's studies
    # get it and say so, another site's get the global map.
    by_site = _sited_items(test_items)
    site_a, site_b = sorted(s for s in by_site if s is not None)[:2]
    hot = Calibration("temperature", {"decision": "centred_logits", "beta": 0.25,
                                      "temperature": 4.0}, bundle.classes)  # fmt: skip
    if len(bundle.classes) == 2:
        hot = replace(hot, params={**hot.params, "decision": "half_logit_difference"})
    forced = replace(
        bundle, site_calibration=SiteCalibration(bundle.calibration, {site_a: hot}, {})
    )
    a = predict_study(settings, forced, by_site[site_a][0], explain="none")
    b = predict_study(settings, forced, by_site[site_b][0], explain="none")
    assert a.calibration_map == f"site:{site_a}" and b.calibration_map == GLOBAL_MAP
    raw_a = np.log([[a.raw_probabilities[c] for c in bundle.classes]])
    np.testing.assert_allclose(
        [a.probabilities[c] for c in bundle.classes], softmax(0.25 * raw_a)[0], atol=1e-6
    )
    raw_b = np.log([[b.raw_probabilities[c] for c in bundle.classes]])
    np.testing.assert_allclose(
        [b.probabilities[c] for c in bundle.classes],
        bundle.calibration.apply(raw_b)[0],
        atol=1e-6,
    )


def test_the_study_page_says_which_map_calibrated_the_probabilities() -> None:
    from workbench.ui.data import calibration_text

    assert calibration_text("site:Fake Riverside Clinic") == (
        "Calibrated with the map fitted for site Fake Riverside Clinic."
    )
    assert calibration_text("global") == "Calibrated with the model's global map."
    assert calibration_text(None) == ""  # predictions made before the map was recorded
