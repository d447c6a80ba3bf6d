"""Calibration per site: a map for each site with enough calibration studies, beside the
global one, kept only where it beats the global map on the site's own studies."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
from sklearn.metrics import log_loss

from workbench.config import SITE_MIN_STUDIES
from workbench.metrics import brier_score, expected_calibration_error
from workbench.posthoc.calibration import (
    FORMAT_VERSION,
    Calibration,
    Calibrator,
    LabelCalibration,
    LabelCalibrator,
    MapCalibrator,
    calibration_from_dict,
    sigmoid,
    softmax,
)

CalibrationMap = Calibration | LabelCalibration

# A site gets a map of its own only with at least this many calibration studies, and at least
# SITE_MIN_PER_CLASS studies of every class (sigmoid models: positives and negatives of every
# label), the fewest that still allow a held-out estimate; below that it uses the global map.
SITE_MIN_PER_CLASS = 2
GLOBAL_MAP = "global"


def site_map_name(site: str) -> str:
    """The name a prediction records for a site's own map (``"site:NAME"``)."""
    return f"site:{site}"


@dataclass(frozen=True)
class SiteCalibration:
    """A calibration map per site beside the global one (``train --calibrate-per-site``).

    ``sites`` maps a site (the catalog's name for it) to its own map, of the same kind as the
    global one (:class:`Calibration` for softmax models, :class:`LabelCalibration` for sigmoid
    ones); ``fallback`` lists each site of the calibration split that uses the global map, with
    the reason. A study of a site with no map of its own, of an unknown site (None) or of a site
    never seen at calibration is calibrated by the global map.
    """

    global_map: CalibrationMap
    sites: Mapping[str, CalibrationMap]
    fallback: Mapping[str, str]
    min_studies: int = SITE_MIN_STUDIES

    @property
    def classes(self) -> tuple[str, ...]:
        return self.global_map.classes

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def map_for(self, site: str | None) -> tuple[CalibrationMap, str]:
        """The map that calibrates a study of ``site`` and its recorded name."""
        if site is not None and site in self.sites:
            return self.sites[site], site_map_name(site)
        return self.global_map, GLOBAL_MAP

    def map_names(self, sites: Sequence[str | None]) -> list[str]:
        return [self.map_for(s)[1] for s in sites]

    def apply(self, logits: np.ndarray, sites: Sequence[str | None] | None = None) -> np.ndarray:
        """(n, k) logits and the n studies' sites -> (n, k) probabilities, each row through its
        site's map (all through the global map when ``sites`` is None)."""
        z = np.atleast_2d(np.asarray(logits, dtype=np.float64))
        if sites is None:
            return self.global_map.apply(z)
        if len(sites) != z.shape[0]:
            raise ValueError(f"{z.shape[0]} rows of logits but {len(sites)} sites")
        out = np.empty(z.shape, dtype=np.float64)
        rows_of: dict[str | None, list[int]] = {}
        for i, s in enumerate(sites):
            rows_of.setdefault(s if s in self.sites else None, []).append(i)
        for site, rows in rows_of.items():
            out[rows] = self.map_for(site)[0].apply(z[rows])
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the bundle (the global map is stored on its own, as before)."""
        return {
            "version": FORMAT_VERSION,
            "min_studies": self.min_studies,
            "min_per_class": SITE_MIN_PER_CLASS,
            "sites": {s: m.to_dict() for s, m in sorted(self.sites.items())},
            "fallback": dict(sorted(self.fallback.items())),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], global_map: CalibrationMap) -> SiteCalibration:
        version = int(d.get("version", FORMAT_VERSION))
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported site calibration format version {version}")
        sites = {str(s): calibration_from_dict(m) for s, m in (d.get("sites") or {}).items()}
        for s, m in sites.items():
            if m.classes != global_map.classes:
                raise ValueError(f"site {s!r}: its calibration has other classes")
        return cls(
            global_map=global_map,
            sites=sites,
            fallback={str(s): str(r) for s, r in (d.get("fallback") or {}).items()},
            min_studies=int(d.get("min_studies", SITE_MIN_STUDIES)),
        )


def apply_calibration(
    calibration: CalibrationMap | SiteCalibration,
    logits: np.ndarray,
    sites: Sequence[str | None],
) -> np.ndarray:
    """Calibrated probabilities of (n, k) logits: each row through its study's site's map when
    ``calibration`` is a :class:`SiteCalibration`, else all through the one map."""
    if isinstance(calibration, SiteCalibration):
        return calibration.apply(logits, sites)
    return np.asarray(calibration.apply(logits))


def _too_few(labels: np.ndarray, classes: Sequence[str], min_studies: int) -> str | None:
    """Why a site's calibration studies cannot fit a map of their own (None: they can)."""
    n = len(labels)
    if n < min_studies:
        return f"{n} calibration studies, needs {min_studies}"
    if labels.ndim == 1:
        counts = np.bincount(labels.astype(np.int64), minlength=len(classes))
        for c, m in zip(classes, counts, strict=True):
            if m < SITE_MIN_PER_CLASS:
                return f"class {c!r} has {m} calibration studies here, needs {SITE_MIN_PER_CLASS}"
        return None
    for j, c in enumerate(classes):
        pos = int(labels[:, j].sum())
        if min(pos, n - pos) < SITE_MIN_PER_CLASS:
            return (
                f"label {c!r} has {pos} positive and {n - pos} negative calibration studies "
                f"here, needs {SITE_MIN_PER_CLASS} of each"
            )
    return None


def _map_log_loss(cal: CalibrationMap, logits: np.ndarray, labels: np.ndarray) -> float:
    """Log loss of a map's probabilities (sigmoid models: the mean over labels)."""
    return _scores(cal.apply(logits), labels)["log_loss"]


class SiteCalibrator(MapCalibrator):
    """Fits a map per site, as the global one was fitted, and keeps it where it beats the
    global map (the post-hoc protocol, :mod:`workbench.posthoc.protocol`).

    Each site with enough calibration studies (``min_studies``, and every class present twice:
    see :func:`_too_few`) is fitted with :class:`~workbench.posthoc.calibration.Calibrator`
    (sigmoid models: :class:`~workbench.posthoc.calibration.LabelCalibrator`), which picks the
    method by held-out log loss on the site's own studies. The site keeps that map only when
    its held-out log loss is below the global map's log loss on the same studies; the global
    map was fitted on them too, so the comparison leans towards the global map, the safer
    side. Studies without a site (None) count for no site.

    Learned, after :meth:`fit`: ``map_`` (a :class:`SiteCalibration`) and ``report_``: per site
    seen, ``n``, ``map`` (``"site:NAME"`` or ``"global"``), ``reason`` for a fallback, and where
    fitted the chosen ``method``, its ``held_out_log_loss`` and the ``global_log_loss``.
    """

    map_: SiteCalibration
    report_: dict[str, dict[str, Any]]

    def __init__(
        self, global_map: CalibrationMap, min_studies: int = SITE_MIN_STUDIES, seed: int = 0
    ) -> None:
        self.global_map = global_map
        self.min_studies = min_studies
        self.seed = seed

    def fit(self, logits: np.ndarray, labels: np.ndarray, sites: Sequence[str | None]) -> Self:
        """logits: (n, k) study-level logits of the calibration split; labels: (n,) class
        indices, or (n, k) 0/1 targets for sigmoid models; sites: the n studies' sites."""
        z = np.asarray(logits, dtype=np.float64)
        y = np.asarray(labels)
        if len(sites) != z.shape[0] or y.shape[0] != z.shape[0]:
            raise ValueError("logits, labels and sites must have one row per study")
        global_map = self.global_map
        classes = global_map.classes
        fitted: dict[str, CalibrationMap] = {}
        fallback: dict[str, str] = {}
        report: dict[str, dict[str, Any]] = {}
        for site in sorted({s for s in sites if s is not None}):
            rows = np.array([i for i, s in enumerate(sites) if s == site])
            entry: dict[str, Any] = {"n": len(rows)}
            reason = _too_few(y[rows], classes, self.min_studies)
            if reason is None:
                site_map: CalibrationMap
                if isinstance(global_map, LabelCalibration):
                    per_label = LabelCalibrator(classes, self.seed).fit(z[rows], y[rows])
                    site_map = per_label.map_
                    held_out = float(
                        np.mean(
                            [
                                f["held_out_log_loss"][f["method"]]
                                for f in per_label.report_.values()
                            ]
                        )
                    )
                    entry["method"] = {c: f["method"] for c, f in per_label.report_.items()}
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # too few per class is ruled out above
                        one = Calibrator(classes, seed=self.seed).fit(z[rows], y[rows])
                    site_map = one.map_
                    held_out = one.held_out_log_loss_[site_map.method]
                    entry["method"] = site_map.method
                global_loss = _map_log_loss(global_map, z[rows], y[rows])
                entry["held_out_log_loss"] = held_out
                entry["global_log_loss"] = global_loss
                if held_out < global_loss:
                    fitted[site] = site_map
                else:
                    reason = (
                        f"the global map fits its studies as well (log loss {global_loss:.4f}, "
                        f"its own map {held_out:.4f} held out)"
                    )
            if reason is not None:
                fallback[site] = reason
                entry["reason"] = reason
            entry["map"] = site_map_name(site) if site in fitted else GLOBAL_MAP
            report[site] = entry
        self.map_ = SiteCalibration(global_map, fitted, fallback, self.min_studies)
        self.report_ = report
        return self

    def apply(self, logits: np.ndarray, sites: Sequence[str | None] | None = None) -> np.ndarray:
        """(n, k) logits -> probabilities, each row through its site's map."""
        return np.asarray(self.fitted_map().apply(logits, sites))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], global_map: CalibrationMap) -> Self:
        cal = SiteCalibration.from_dict(d, global_map)
        out = cls(global_map, cal.min_studies)
        out.map_ = cal
        return out


def _scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """ECE, Brier and log loss of softmax rows, or the mean over labels of sigmoid columns."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        problems = [(probs, labels)]
    else:  # each sigmoid column as the binary softmax problem [1 - p, p]
        problems = [
            (np.stack([1 - probs[:, j], probs[:, j]], axis=1), labels[:, j].astype(np.int64))
            for j in range(probs.shape[1])
        ]
    return {
        "ece": float(np.mean([expected_calibration_error(p, t) for p, t in problems])),
        "brier": float(np.mean([brier_score(p, t) for p, t in problems])),
        "log_loss": float(
            np.mean([log_loss(t, p, labels=np.arange(p.shape[1])) for p, t in problems])
        ),
    }


def site_calibration_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    sites: Sequence[str | None],
    site_calibration: SiteCalibration,
    unknown: str = "unknown",
) -> dict[str, Any]:
    """ECE, Brier and log loss of the uncalibrated (``raw``), globally calibrated (``global``)
    and per-site calibrated (``per_site``) probabilities, over all studies and per site (with
    the map each site's studies get). Sigmoid models: means over labels."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    sigmoid_model = isinstance(site_calibration.global_map, LabelCalibration)
    probs = {
        "raw": sigmoid(z) if sigmoid_model else softmax(z),
        "global": site_calibration.global_map.apply(z),
        "per_site": site_calibration.apply(z, sites),
    }
    out: dict[str, Any] = {
        "overall": {"n": len(y), **{name: _scores(p, y) for name, p in probs.items()}},
        "per_site": {},
    }
    for site in sorted(set(sites), key=lambda s: (s is None, s or "")):
        rows = np.array([i for i, s in enumerate(sites) if s == site])
        out["per_site"][unknown if site is None else site] = {
            "n": len(rows),
            "map": site_calibration.map_for(site)[1],
            **{key: _scores(p[rows], y[rows]) for key, p in probs.items()},
        }
    return out
