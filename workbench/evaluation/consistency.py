"""Test-retest consistency: does a model say the same thing twice, and nearly the same thing
when the acquisition changes a little?

The report reads the store and the bundle and runs no network, so these numbers are computed
here, by forward passes, and kept as JSON beside the bundle (``consistency/<cohort>.json`` in
the bundle folder; the bundle hash covers the weights and metadata only, so this does not
change it). ``workbench report --retest`` writes the file first; the report renders it.

For each evaluated study (the same scope as the report: the test split of the training cohort,
or every labelled study of another cohort):

* repeat: the study predicted twice from the same pixels. Inference is deterministic, so the
  flip rate and the largest probability change must be 0; anything else is a bug to report.
* perturbations (MONAI transforms on the network input, fixed parameters / seeded): intensity
  scaled by ±5%, Gaussian noise (std 0.02 of the [0, 1] range), rotation by ±3°. Per
  perturbation: the top-1 flip rate, the mean absolute change of the calibrated
  probabilities, and for the saliency map of the first image (the class explained for the
  original) the Spearman rank correlation between the original map and the perturbed one
  (rotated maps are rotated back first, so the correlation compares the same anatomy).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.catalog.cohorts import CohortItem, cohort_items
from workbench.config import Settings
from workbench.errors import WorkbenchError
from workbench.model.bundle import Bundle, code_version, load_bundle

RETEST_FORMAT = 1
DEFAULT_MAX_SALIENCY = 16  # saliency maps are the expensive part: at most this many studies
NOISE_STD = 0.02
INTENSITY = 0.05
ROTATION_DEG = 3.0


class ConsistencyError(WorkbenchError):
    """Test-retest that cannot be run (no studies in scope...)."""


def retest_path(bundle_path: Path, cohort: str) -> Path:
    """Where the test-retest JSON of a bundle on a cohort lives."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cohort)
    return bundle_path / "consistency" / f"{safe}.json"


def read_retest(bundle_path: Path, cohort: str) -> dict[str, Any] | None:
    """The stored test-retest results, or None when none were computed (or unreadable)."""
    try:
        data = json.loads(retest_path(bundle_path, cohort).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def scope_items(items: Sequence[CohortItem], training_cohort: str | None, cohort: str) -> list:
    """The report's scope: the test split of the training cohort, else every labelled study."""
    if cohort == training_cohort:
        return [i for i in items if i.split == "test" and i.images]
    return [i for i in items if i.label and i.images]


Perturb = Callable[[torch.Tensor], torch.Tensor]


def perturbations(
    seed: int, spatial_dims: int = 2
) -> list[tuple[str, str, float, Perturb, Perturb | None]]:
    """(name, description, parameter, transform of one (C, H, W) or (C, D, H, W) input,
    inverse for saliency maps). Volumes rotate in the axial (H, W) plane."""
    from monai.transforms import RandGaussianNoise, Rotate, ScaleIntensity

    def noise(x: torch.Tensor) -> torch.Tensor:
        # A fresh, seeded transform per call: the same study always gets the same noise.
        t = RandGaussianNoise(prob=1.0, mean=0.0, std=NOISE_STD)
        t.set_random_state(seed)
        return torch.as_tensor(t(x))

    def rot(deg: float) -> Perturb:
        rad = math.radians(deg)
        angle: float | tuple[float, float, float] = rad if spatial_dims == 2 else (rad, 0.0, 0.0)
        t = Rotate(angle=angle, keep_size=True, mode="bilinear", padding_mode="zeros")
        return lambda x: torch.as_tensor(t(x))

    def scale(f: float) -> Perturb:
        t = ScaleIntensity(minv=None, maxv=None, factor=f)
        return lambda x: torch.as_tensor(t(x))

    up, down, deg = 1 + INTENSITY, 1 - INTENSITY, ROTATION_DEG
    return [
        ("intensity_up", "intensity scaled", up, scale(INTENSITY), None),
        ("intensity_down", "intensity scaled", down, scale(-INTENSITY), None),
        ("noise", "Gaussian noise (std)", NOISE_STD, noise, None),
        ("rotate_plus", "rotation (degrees)", deg, rot(deg), rot(-deg)),
        ("rotate_minus", "rotation (degrees)", -deg, rot(-deg), rot(deg)),
    ]


def _inputs(bundle: Bundle, item: CohortItem) -> list[torch.Tensor]:
    from workbench.model.data import eval_transforms

    transform = eval_transforms(bundle.spec)
    return [torch.as_tensor(transform({"image": str(p)})["image"]).float() for p in item.images]


def _probs(
    bundle: Bundle, inputs: Sequence[torch.Tensor], precision: str, site: str | None
) -> np.ndarray:
    """Calibrated study probabilities (K,) as predict_study computes them: mean image logit,
    through the map of the study's site."""
    from workbench.model.runtime import autocast, resolve_precision, to_device

    model = bundle.network
    device = next(model.parameters()).device
    prec = resolve_precision(precision, device, bundle.spec.spatial_dims, training=False)
    x = to_device(torch.stack(list(inputs)), device, bundle.spec.spatial_dims)
    with torch.no_grad(), autocast(device, prec):
        logits = model(x).float().cpu().numpy()
    calibration, _ = bundle.calibration_for(site)
    return np.asarray(calibration.apply(logits.mean(axis=0, keepdims=True))[0])


def _saliency(bundle: Bundle, x: torch.Tensor, target: int, method: str) -> np.ndarray:
    from workbench.predict.explain import saliency

    device = next(bundle.network.parameters()).device
    return saliency(bundle.network, x[None].to(device), target, method=method)  # type: ignore[arg-type]


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    from scipy.stats import spearmanr

    a, b = a.ravel(), b.ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None  # a constant map has no ranking
    return float(spearmanr(a, b).statistic)


def compute_retest(
    settings: Settings,
    model: str,
    cohort: str,
    seed: int = 0,
    explain: str = "gradcam",
    max_saliency: int = DEFAULT_MAX_SALIENCY,
    max_studies: int | None = None,
) -> dict[str, Any]:
    """Run the repeat and perturbation checks; returns the JSON-ready dict (not written)."""
    from workbench.evaluation.jsonout import normalise
    from workbench.model.runtime import resolve_device

    bundle = load_bundle(settings.models_dir, model, resolve_device(settings.device))
    items = scope_items(cohort_items(settings, cohort), bundle.contract.cohort, cohort)
    if max_studies is not None:
        items = items[:max_studies]
    if not items:
        raise ConsistencyError(f"cohort {cohort!r} has no studies in the report's scope")
    perts = perturbations(seed, bundle.spec.spatial_dims)
    repeat_flips, repeat_max = 0, 0.0
    changes: dict[str, list[float]] = {p[0]: [] for p in perts}
    flips: dict[str, int] = {p[0]: 0 for p in perts}
    rhos: dict[str, list[float]] = {p[0]: [] for p in perts}
    n_sal = 0
    for n, item in enumerate(items):
        inputs = _inputs(bundle, item)
        p0 = _probs(bundle, inputs, settings.precision, item.site)
        p1 = _probs(bundle, _inputs(bundle, item), settings.precision, item.site)  # run again
        repeat_flips += int(p0.argmax() != p1.argmax())
        repeat_max = max(repeat_max, float(np.abs(p0 - p1).max()))
        do_sal = explain != "none" and n < max_saliency
        target = int(p0.argmax())
        base_map = _saliency(bundle, inputs[0], target, explain) if do_sal else None
        n_sal += int(do_sal)
        for name, _, _, fn, inverse in perts:
            moved = [fn(x) for x in inputs]
            p = _probs(bundle, moved, settings.precision, item.site)
            flips[name] += int(p.argmax() != p0.argmax())
            changes[name].append(float(np.abs(p - p0).mean()))
            if base_map is not None:
                heat = _saliency(bundle, moved[0], target, explain)
                if inverse is not None:
                    heat = np.asarray(inverse(torch.from_numpy(heat[None].copy())))[0]
                rho = _spearman(base_map, heat)
                if rho is not None:
                    rhos[name].append(rho)
    n = len(items)
    rows = []
    for name, desc, param, *_ in perts:
        r = rhos[name]
        rows.append(
            {
                "name": name,
                "description": desc,
                "parameter": param,
                "n": n,
                "n_flips": flips[name],
                "flip_rate": flips[name] / n,
                "mean_abs_probability_change": float(np.mean(changes[name])),
                "max_abs_probability_change": float(np.max(changes[name])),
                "n_saliency": len(r),
                "saliency_spearman_mean": float(np.mean(r)) if r else None,
                "saliency_spearman_min": float(np.min(r)) if r else None,
            }
        )
    data = {
        "retest_format": RETEST_FORMAT,
        "model": f"{bundle.name}/{bundle.version}",
        "bundle_hash": bundle.bundle_hash,
        "cohort": cohort,
        "n_studies": n,
        "seed": seed,
        "saliency_method": explain,
        "n_saliency_studies": n_sal,
        "computed_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "code_version": code_version(),
        "repeat": {
            "n": n,
            "n_flips": repeat_flips,
            "flip_rate": repeat_flips / n,
            "max_abs_probability_change": repeat_max,
        },
        "perturbations": rows,
    }
    return dict(normalise(data))


def write_retest(settings: Settings, model: str, cohort: str, **kwargs: Any) -> Path:
    """Compute test-retest and write it atomically beside the bundle; returns the path."""
    from workbench.evaluation.jsonout import dump_json
    from workbench.model.bundle_info import resolve_bundle_path

    data = compute_retest(settings, model, cohort, **kwargs)
    path = retest_path(resolve_bundle_path(settings.models_dir, model), cohort)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".retest.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(dump_json(data))
    os.replace(tmp, path)
    return path
