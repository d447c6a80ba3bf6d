"""What ships with a trained model, checked on a synthetic cohort with known answers.

One module fixture trains the compact MONAI DenseNet (``densenet-small``, see
``workbench/model/nets.py``) on a synthetic chest cohort (1,200 studies, 128 px, patient-level split
30 / 17 / 53 so that the test split, about 650 studies, is large enough to measure a 15-bin
ECE), predicts the test split (Grad-CAM for 40 nodule studies), and predicts two studies the
model must refuse: a CT study and a DX study whose pixels are pure noise. Calibration,
conformal sets, OOD, similar cases and the saliency checks are the same code for either
architecture; the compact one makes the fixture 5 minutes instead of 15 on 2 AVX2 cores (AMD
EPYC, 2026-12-07), which keeps `make test` within its 20 minutes. DenseNet121 on the same
cohort, measured the same day: accuracy 0.960, AUROC 0.990, ECE 0.067 -> 0.012 (temperature),
every test here passing; the compact one: 0.969, 0.992, 0.089 -> 0.019. At 96 px DenseNet121's
Grad-CAM (6 x 6 cells) failed the deletion check on the 4 sanity images. It trains
on two torch threads whatever the machine: the thread count changes the order of float sums,
and twelve epochs amplify that into another model (one thread gave accuracy 0.72 where two
gave 0.91 on the earlier 400-study cohort). The figures each test measures are printed and
written to ``tests/artifacts/trust_figures.json`` (they go into the session notes; the
assertions are the issue's own thresholds and a few floors well below the measured figures).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from tests.conftest import make_settings, torch_threads
from workbench.catalog.cohorts import cohort_items, items_for_studies
from workbench.catalog.ingest import cache_path, ingest
from workbench.config import Settings
from workbench.db.store import Instance, Prediction, Study, session_scope
from workbench.dicom.synth import synthesize_cohort
from workbench.model.bundle import Bundle, load_bundle
from workbench.model.data import eval_transforms
from workbench.posthoc.conformal import ConformalSets, coverage_summary, study_uniform
from workbench.predict.explain import gradcam_layer_for, saliency
from workbench.predict.inference import _to_native, predict_items
from workbench.predict.results import latest_predictions
from workbench.train.config import TrainConfig
from workbench.train.training import train

# The fixture trains a real model (about 5 minutes on 2 idle cores): room for a busy machine.
pytestmark = pytest.mark.timeout(1800)

ARTIFACTS = Path(__file__).parent / "artifacts"
COHORT, MODEL = "trust", "trust-model"
FIGURES: dict[str, Any] = {}


def _record(name: str, value: Any) -> None:
    FIGURES[name] = value
    print(f"{name}: {json.dumps(value, default=float)}")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "trust_figures.json").write_text(
        json.dumps(FIGURES, indent=2, sort_keys=True, default=float)
    )


@dataclass
class Trained:
    settings: Settings
    bundle: Bundle
    src: Path
    test_ids: list[int]
    ct_id: int
    noise_id: int


def _noise_study(template: Path, out: Path, seed: int) -> Path:
    """A DX study like the cohort's, whose pixels are uniform noise."""
    ds = pydicom.dcmread(template)
    ds.decompress() if ds.file_meta.TransferSyntaxUID.is_compressed else None
    rng = np.random.default_rng(seed)
    bits = int(ds.BitsStored)
    noise = rng.integers(0, 2**bits, (int(ds.Rows), int(ds.Columns))).astype(np.uint16)
    ds.PixelData = noise.tobytes()
    ds.PatientID = "FAKEID-NOISE"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["noise-study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["noise-series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["noise-image"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out.mkdir(parents=True, exist_ok=True)
    path = out / "noise.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    with torch_threads(2):
        trained = _train_and_predict(tmp_path_factory.mktemp("trust"))
    yield trained


def _train_and_predict(root: Path) -> Trained:
    settings = make_settings(root / "home")
    src = root / "studies"
    # 1,200 studies split 30 / 17 / 53 by patient: about 360 to train on, 200 to calibrate
    # and 640 to test. A 15-bin ECE measured on n studies is biased upwards by sampling noise
    # of roughly 0.4 / sqrt(n) for a model of accuracy 0.9 (about 0.04 on the 118 test studies
    # of a 390-study cohort), so a test of the ECE <= 0.03 needs hundreds of them.
    # The model trains at the images' own 128 px on 360 studies: at 96 px on 200 it did not
    # find the nodules (accuracy 0.75; every saliency method put 0-1% of its mass on them),
    # and a saliency map can only show evidence a model uses. Here: accuracy 0.97.
    synthesize_cohort(src, n_studies=1200, seed=11, modality="DX", image_size=128)
    ingest(settings, src, src / "labels.csv", COHORT, progress=False)
    train(
        settings,
        TrainConfig(
            cohort=COHORT,
            name=MODEL,
            epochs=12,
            architecture="densenet-small",
            image_size=128,
            batch_size=16,
            device="cpu",
            split_fractions=(0.30, 0.17, 0.53),
            sanity_images=4,
        ),
        progress=False,
    )
    bundle = load_bundle(settings.models_dir, MODEL)
    test = cohort_items(settings, COHORT, "test")
    # Grad-CAM maps only where a test reads them: 40 of the studies labelled nodule.
    mapped = [i for i in test if i.label == "nodule"][:40]
    predict_items(settings, bundle, mapped, explain="gradcam", progress=False)
    others = [i for i in test if i not in mapped]
    predict_items(settings, bundle, others, explain="none", progress=False)

    # two studies unlike the training data: another modality, and noise with a DX header
    ct_src = root / "ct"
    synthesize_cohort(ct_src, n_studies=1, seed=5, modality="CT", image_size=32)
    template = next(p for p in sorted(src.rglob("*.dcm")))
    _noise_study(template, root / "noise", seed=3)
    ingest(settings, ct_src, progress=False, workers=1)
    ingest(settings, root / "noise", progress=False, workers=1)
    with session_scope(settings.database_url) as s:
        ct_id = s.scalars(select(Study.id).where(Study.modality == "CT")).one()
        noise_uid = generate_uid(entropy_srcs=["noise-study"])
        noise_id = s.scalars(select(Study.id).where(Study.study_uid == noise_uid)).one()
    predict_items(
        settings, bundle, items_for_studies(settings, [ct_id, noise_id]), "none", progress=False
    )
    return Trained(settings, bundle, src, [i.study_id for i in test], ct_id, noise_id)


def _trust(trained: Trained) -> dict[str, Any]:
    return dict(trained.bundle.contract.to_dict()["trust"])


def test_the_shipped_calibration_keeps_the_test_ece_within_target(trained: Trained) -> None:
    m = trained.bundle.contract.to_dict()["metrics"]["test"]
    _record(
        "calibration",
        {
            "method": trained.bundle.contract.to_dict()["calibration"]["method"],
            "held_out_log_loss": trained.bundle.contract.to_dict()["calibration_fit"][
                "held_out_log_loss"
            ],
            "ece_before": m["ece_before"],
            "ece_after": m["ece_after"],
            "accuracy": m["accuracy"],
            "auroc_macro": m["auroc_macro"],
            "n_test": len(trained.test_ids),
            "with_intervals": trained.bundle.contract.to_dict()["metrics"]["test_detail"][
                "calibration"
            ],
        },
    )
    detail = trained.bundle.contract.to_dict()["metrics"]["test_detail"]["calibration"]
    for stage in ("before", "after"):
        for name in ("ece", "ece_adaptive", "mce", "brier", "log_loss"):
            r = detail[stage][name]
            assert r["ci_low"] <= r["value"] <= r["ci_high"], (stage, name)
    # The targets: ECE after <= before, and <= 0.03 on the test split. Measured on
    # 646 test studies: 0.089 -> 0.019 with temperature scaling (the lowest held-out log loss
    # on the calibration split; DenseNet121: 0.067 -> 0.012). The earlier fixture (96 px, 200
    # training studies, accuracy 0.75) was overconfident: 0.080 -> 0.017 with Platt scaling.
    # Calibration lowering a miscalibrated model's ECE is tested on logits in
    # tests/test_calibration.py and tests/test_site_calibration.py.
    assert m["ece_after"] <= m["ece_before"]
    assert m["ece_after"] <= 0.03


def test_conformal_coverage_over_repeated_splits_is_within_three_points(
    trained: Trained,
) -> None:
    preds = latest_predictions(trained.settings, trained.bundle.bundle_hash, trained.test_ids)
    classes = trained.bundle.classes
    rows = [p for p in preds.values() if p.study.label in classes]
    probs = np.array([[p.probabilities[c] for c in classes] for p in rows])
    labels = np.array([classes.index(p.study.label) for p in rows])
    u = np.array([study_uniform(p.study.study_key) for p in rows])
    rng = np.random.default_rng(0)
    covs, sizes = [], []
    for _ in range(200):
        perm = rng.permutation(len(rows))
        cal, test = perm[: len(rows) // 2], perm[len(rows) // 2 :]
        cp = ConformalSets(0.9, "aps").fit(probs[cal], labels[cal], u[cal])
        summary = coverage_summary(cp.apply(probs[test], u[test]), labels[test].tolist())
        covs.append(summary["coverage"])
        sizes.append(summary["mean_set_size"])
    stored = _trust(trained)["trust_report"]["conformal_test"]
    _record(
        "conformal",
        {
            "repeated_splits": 200,
            "studies_per_half": len(rows) // 2,
            "mean_coverage": float(np.mean(covs)),
            "sd_coverage": float(np.std(covs)),
            "mean_set_size": float(np.mean(sizes)),
            "bundle_test_coverage": stored["coverage"],
            "bundle_test_set_size": stored["mean_set_size"],
            "bundle_test_by_site": stored["subgroups"]["site"],
        },
    )
    assert abs(np.mean(covs) - 0.9) <= 0.03
    # every stored prediction carries its set
    assert all(p.prediction_set and "classes" in p.prediction_set for p in rows)


def test_another_modality_and_pure_noise_are_flagged_and_test_studies_rarely(
    trained: Trained,
) -> None:
    preds = latest_predictions(trained.settings, trained.bundle.bundle_hash)
    test = [preds[i] for i in trained.test_ids if i in preds]
    false_flags = float(np.mean([bool(p.ood_flag) for p in test]))
    ct, noise = preds[trained.ct_id], preds[trained.noise_id]
    _record(
        "ood",
        {
            "test_false_flag_rate": false_flags,
            "n_test": len(test),
            "ct_reasons": ct.ood["reasons"] if ct.ood else None,
            "noise_score": noise.ood["score"] if noise.ood else None,
            "threshold": noise.ood["threshold"] if noise.ood else None,
        },
    )
    assert ct.ood_flag and any("CT" in r for r in ct.ood["reasons"])
    assert not ct.probabilities  # refused, not scored
    assert noise.ood_flag and any("unlike the training" in r for r in noise.ood["reasons"])
    assert false_flags <= 0.05


def test_randomised_model_maps_differ_from_the_trained_models(trained: Trained) -> None:
    checks = _trust(trained)["saliency_checks"]["methods"]
    _record("saliency_checks", checks)
    for method in ("gradcam", "gradient"):
        assert checks[method]["randomized_model_rank_corr"] < 0.5, method
        assert checks[method]["deletion_auc"] < checks[method]["random_deletion_auc"], method
    # Data randomisation: the plain gradient of a model trained on shuffled labels differs
    # (measured 0.13; DenseNet121 0.18, and 0.11 on one thread); Grad-CAM's correlation swings
    # from run to run (0.03 here; DenseNet121 -0.08, -0.48 on one thread, 0.83 once on the
    # 400-study cohort), as Adebayo et al.
    # found for some methods: recorded in the bundle and shown in the app, not asserted for it.
    assert checks["gradient"]["label_randomized_rank_corr"] < 0.5


def _on_the_nodule(heat: np.ndarray, dist: np.ndarray, radius: float) -> tuple[float, ...]:
    """(mass inside the radius, mass within twice the radius, map peak within twice the
    radius) of a non-negative map, as fractions; the pointing game is Zhang et al. 2016's."""
    heat = np.clip(heat.astype(np.float64), 0.0, None)
    total = heat.sum()
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return (
        float(heat[dist <= radius].sum() / total),
        float(heat[dist <= 2 * radius].sum() / total),
        float(dist[peak] <= 2 * radius),
    )


def _best_single_cell(
    grid: tuple[int, ...], transform: Any, inp: Any, dist: np.ndarray, radius: float
) -> float:
    """The largest share of a Grad-CAM map inside the nodule when only one cell of the
    layer's grid is active, upsampled exactly as :func:`workbench.predict.explain.saliency` does:
    how well a map of this resolution could localise this nodule at best."""
    import torch
    from captum.attr import LayerAttribution

    best = 0.0
    for cell in np.ndindex(*grid):
        raw = torch.zeros((1, 1, *grid))
        raw[(0, 0, *cell)] = 1.0
        up = LayerAttribution.interpolate(raw, tuple(inp.shape[1:]), interpolate_mode="bilinear")
        heat = _to_native(transform, inp, up[0, 0].numpy())
        if heat.sum() > 0:
            best = max(best, float(heat[dist <= radius].sum() / heat.sum()))
    return best


def test_gradcam_mass_falls_on_the_nodule(trained: Trained) -> None:
    import torch

    findings = json.loads((trained.src / "findings.json").read_text())
    preds = latest_predictions(trained.settings, trained.bundle.bundle_hash, trained.test_ids)
    with session_scope(trained.settings.database_url) as s:
        sop_of = dict(s.execute(select(Instance.cache_key, Instance.sop_uid)).all())
    bundle = trained.bundle
    model = bundle.network.eval()
    transform = eval_transforms(bundle.spec)
    target = bundle.classes.index("nodule")
    nodule_studies = [p for p in preds.values() if p.study.label == "nodule"]
    recall = float(
        np.mean([max(p.probabilities, key=p.probabilities.get) == "nodule" for p in nodule_studies])
    )
    path_of = {
        key: path
        for item in cohort_items(trained.settings, COHORT, "test")
        for key, path in zip(item.cache_keys, item.images, strict=True)
    }
    stored, coarser, grads, igs, bound, area = [], [], [], [], [], []
    grid: tuple[int, ...] = ()
    for p in nodule_studies:
        for im in p.per_image:
            f = findings.get(sop_of.get(im["cache_key"], ""))
            if not f or im["saliency_target"] != "nodule" or not im["saliency_file"]:
                continue
            f = f.get("nodule", f)
            heat = np.load(trained.settings.cache_dir / im["saliency_file"]).astype(np.float64)
            if heat.sum() <= 0:
                continue
            rows, cols = np.indices(heat.shape)
            dist = np.hypot(rows - f["center_row"], cols - f["center_col"])
            r = float(f["radius_px"])
            stored.append(_on_the_nodule(heat, dist, r))
            area.append((float(np.mean(dist <= r)), float(np.mean(dist <= 2 * r))))
            inp = transform({"image": str(path_of[im["cache_key"]])})["image"]
            x = torch.as_tensor(inp)[None].float()
            layer, grid = gradcam_layer_for(model, x)
            bound.append(_best_single_cell(grid, transform, inp, dist, r))
            # the same image with the other methods, and Grad-CAM on the last block (norm5,
            # 2x coarser: the default before this fixture measured it)
            for out, kw in (
                (grads, {"method": "gradient"}),
                (igs, {"method": "ig"}),
                (coarser, {"method": "gradcam", "layer": model.features.norm5}),
            ):
                if len(out) < 40:  # 40 images are enough for these comparisons
                    m = saliency(model, x, target, **kw)  # type: ignore[arg-type]
                    out.append(_on_the_nodule(_to_native(transform, inp, m), dist, r))

    def summary(rows: list[tuple[float, ...]]) -> dict[str, float]:
        a = np.array(rows)
        return {
            "images": len(a),
            "mass_inside_radius": float(a[:, 0].mean()),
            "mass_inside_twice_radius": float(a[:, 1].mean()),
            "peak_within_twice_radius": float(a[:, 2].mean()),
        }

    figures = {
        "nodule_recall_top1": recall,
        "gradcam_grid": list(grid),
        "gradcam": summary(stored),
        "gradcam_norm5": summary(coarser),
        "gradient": summary(grads),
        "integrated_gradients": summary(igs),
        "area_inside_radius": float(np.mean([a[0] for a in area])),
        "area_inside_twice_radius": float(np.mean([a[1] for a in area])),
        "best_single_cell_inside_radius": float(np.mean(bound)),
    }
    _record("gradcam_on_nodules", figures)
    assert len(stored) >= 20
    # The model finds most nodules (measured 0.89; a map can only show evidence it uses) ...
    assert recall >= 0.6
    # ... and the pixel-level maps point at them: their peak lies within twice the radius (an
    # area of about 2% of the image) at least ten times as often as a randomly placed peak
    # would. Measured: gradient 0.68, Integrated Gradients 0.28 of 40 images; chance 0.019
    # (DenseNet121: 0.50 and 0.58).
    chance = figures["area_inside_twice_radius"]
    for name in ("gradient", "integrated_gradients"):
        assert figures[name]["peak_within_twice_radius"] >= 10 * chance, name
    # the bundle records the grid the app states for Grad-CAM
    assert _trust(trained)["saliency_checks"]["gradcam"]["grid"] == list(grid)
    # An earlier target, most of the Grad-CAM mass inside the nodule, cannot be reached: a
    # Grad-CAM map is no finer than its layer's grid (denseblock3: 8 x 8 cells of 16 px at
    # 128 px) and the nodules' radius is 3 to 6 px, so even a map with only the best-placed
    # cell active holds 16% inside (best_single_cell_inside_radius). What the maps do show,
    # and what is asserted: they concentrate on the nodule well beyond its share of the image,
    # and their peak points at it far more often than chance. Measured: 5.1% of the mass
    # within twice the radius, an area of 1.9% of the image (2.7x); peak there in 51% of 80
    # maps against a chance of 1.9%; 1.3% of the mass inside the radius. DenseNet121 on this
    # fixture (2026-12-07): 6.4%, 19% (just above ten times chance), 1.6%. A map that
    # collapsed to uniform, or onto the wrong place, fails both.
    assert figures["gradcam"]["mass_inside_twice_radius"] >= 2 * chance
    assert figures["gradcam"]["peak_within_twice_radius"] >= 10 * chance


def test_similar_cases_share_the_label_well_above_chance(trained: Trained) -> None:
    report = _trust(trained)["trust_report"]["similar_test"]
    preds = latest_predictions(trained.settings, trained.bundle.bundle_hash, trained.test_ids)
    hits = [n["label"] == p.study.label for p in preds.values() for n in (p.similar or [])]
    _record(
        "similar_cases",
        {
            "k": report["k"],
            "precision_at_k": report["precision_at_k"],
            "chance": report["chance"],
            "precision_from_predictions": float(np.mean(hits)),
        },
    )
    assert report["precision_at_k"] > report["chance"] + 0.15
    assert math.isclose(float(np.mean(hits)), report["precision_at_k"], abs_tol=0.02)


def test_bundle_lists_the_index_file_by_hash(trained: Trained) -> None:
    import hashlib

    files = trained.bundle.contract.to_dict()["data_files"]
    index = trained.bundle.path / "models" / "similar_index.npz"
    assert files["similar_index.npz"] == hashlib.sha256(index.read_bytes()).hexdigest()
    assert cache_path(trained.settings, "ab" * 32).name.endswith(".npy")
    with session_scope(trained.settings.database_url) as s:
        n = len(s.scalars(select(Prediction.id).where(Prediction.ood_flag.is_not(None))).all())
    assert n >= len(trained.test_ids)
