"""Post-hoc probability calibration of classifier logits.

The fitting is done by scikit-learn (:class:`~sklearn.calibration.CalibratedClassifierCV`
around a :class:`~sklearn.frozen.FrozenEstimator`); the learned parameters are then
extracted as plain JSON-serialisable data so that a :class:`Calibration` can be stored,
audited and re-applied with numpy alone (no pickles, no sklearn objects at inference time).

Input representation
--------------------
The frozen "classifier" handed to sklearn takes the logits matrix itself as ``X``.  Its
``decision_function`` (which sklearn prefers over ``predict_proba`` for calibration) is
a canonical, softmax-invariant form of the logits:

* ``k > 2``: the *row-centred* logits ``z - mean(z, axis=1)``.  Centring changes nothing
  for softmax, makes the per-class one-vs-rest features independent of an arbitrary
  per-row offset, and guarantees that sklearn's temperature scaler never mistakes the
  logits for probabilities (it takes ``log`` of inputs whose rows lie in [0, 1] and sum
  to 1 - centred rows sum to 0).
* ``k == 2``: sklearn requires a 1-D binary decision function; we use the half logit
  difference ``(z1 - z0) / 2``.  sklearn expands it to ``(-d, d)``, which equals the
  centred logits, so the fitted binary temperature is the true inverse temperature.

:meth:`Calibration.apply` applies the same transform before using the parameters.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self, cast, get_args

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold

from workbench.metrics import brier_score, check_probs_labels, expected_calibration_error

Method = Literal["none", "temperature", "sigmoid", "isotonic"]

_METHODS: tuple[str, ...] = get_args(Method)
FORMAT_VERSION = 1
_MAX_FOLDS = 5


# --------------------------------------------------------------------------- helpers


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise numerically stable softmax of an (n, k) array (float64)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return cast(np.ndarray, e / np.sum(e, axis=-1, keepdims=True))


def _check_logits(logits: np.ndarray, k: int | None = None) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be a 2-D (n, k) array, got shape {z.shape}")
    if z.shape[1] < 2:
        raise ValueError(f"need at least 2 classes, got {z.shape[1]} logit columns")
    if k is not None and z.shape[1] != k:
        raise ValueError(f"logits have {z.shape[1]} columns but the calibration has {k}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or infinite values")
    return z


def _decision(z: np.ndarray) -> np.ndarray:
    """Canonical decision values fed to sklearn (see module docstring)."""
    if z.shape[1] == 2:
        return cast(np.ndarray, (z[:, 1] - z[:, 0]) / 2.0)
    return cast(np.ndarray, z - z.mean(axis=1, keepdims=True))


class _LogitsClassifier(ClassifierMixin, BaseEstimator):
    """A pre-"fitted" identity classifier: its input X *is* the (n, k) logits matrix.

    ``predict_proba`` is ``softmax(X)``, ``decision_function`` the canonical decision
    values of :func:`_decision`, ``classes_`` is ``arange(k)``.  Wrapped in a
    :class:`FrozenEstimator` so that sklearn only fits the calibrator on top.
    """

    def __init__(self, n_classes: int = 2) -> None:
        self.n_classes = n_classes

    def fit(self, X: Any = None, y: Any = None) -> _LogitsClassifier:
        self.classes_ = np.arange(self.n_classes)
        self.n_features_in_ = self.n_classes
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        return _decision(_check_logits(X, self.n_classes))

    def predict_proba(self, X: Any) -> np.ndarray:
        return softmax(_check_logits(X, self.n_classes))

    def predict(self, X: Any) -> np.ndarray:
        return cast(np.ndarray, np.argmax(_check_logits(X, self.n_classes), axis=1))


def _fit_sklearn(logits: np.ndarray, labels: np.ndarray, method: str) -> CalibratedClassifierCV:
    """Fit sklearn's calibrator of ``method`` on all of (logits, labels).

    The base estimator is frozen, so its cross-validated predictions equal its plain
    predictions; a single (all, all) split avoids sklearn's pointless 5-fold pass and its
    "at least 5 samples per class" requirement.  Every class must occur in ``labels``.
    """
    k = logits.shape[1]
    n = logits.shape[0]
    idx = np.arange(n)
    est = FrozenEstimator(_LogitsClassifier(k).fit())
    cal = CalibratedClassifierCV(est, method=method, cv=[(idx, idx)])
    cal.fit(logits, labels)
    return cal


def _extract_params(cal: CalibratedClassifierCV, method: str, k: int) -> dict[str, Any]:
    """Turn a fitted sklearn calibrator into plain JSON-serialisable parameters."""
    (pipeline,) = cal.calibrated_classifiers_
    calibrators = pipeline.calibrators
    decision = "half_logit_difference" if k == 2 else "centred_logits"
    if method == "temperature":
        beta = float(np.asarray(calibrators[0].beta_))
        return {"decision": decision, "beta": beta, "temperature": 1.0 / beta}
    if method == "sigmoid":
        return {
            "decision": decision,
            "a": [float(c.a_) for c in calibrators],
            "b": [float(c.b_) for c in calibrators],
        }
    if method == "isotonic":
        for c in calibrators:
            if c.out_of_bounds != "clip" or not c.increasing_:
                raise RuntimeError("unexpected isotonic calibrator configuration")
        return {
            "decision": decision,
            "out_of_bounds": "clip",
            "x_min": [float(c.X_min_) for c in calibrators],
            "x_max": [float(c.X_max_) for c in calibrators],
            "x_thresholds": [[float(v) for v in c.X_thresholds_] for c in calibrators],
            "y_thresholds": [[float(v) for v in c.y_thresholds_] for c in calibrators],
        }
    raise ValueError(f"unknown method {method!r}")


# --------------------------------------------------------------------------- Calibration


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration map from logits to probabilities, stored as plain data.

    ``params`` by method (all lists are per calibrated column; for ``k == 2`` there is one
    column, the positive class, and class 0 gets ``1 - p1`` exactly as sklearn does):

    * ``none``: ``{}`` - plain softmax.
    * ``temperature``: ``beta`` (inverse temperature) and ``temperature = 1 / beta``;
      ``p = softmax(beta * z)``.
    * ``sigmoid``: ``a``, ``b``; one-vs-rest ``p_c = 1 / (1 + exp(a_c * d_c + b_c))``.
    * ``isotonic``: ``x_thresholds``, ``y_thresholds`` (piecewise-linear interpolation),
      ``x_min``/``x_max`` (inputs are clipped to this range: ``out_of_bounds="clip"``).

    For sigmoid / isotonic with ``k > 2`` the one-vs-rest outputs are divided by their row
    sum; a row whose outputs are all 0 becomes uniform (sklearn's behaviour).  ``d`` is
    the canonical decision value described in the module docstring (``params["decision"]``).
    """

    method: Method
    params: dict[str, Any]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}")
        if len(self.classes) < 2:
            raise ValueError("a calibration needs at least 2 classes")
        k = len(self.classes)
        n_cols = 1 if k == 2 else k
        p = self.params
        if self.method == "temperature":
            if not (float(p["beta"]) > 0):
                raise ValueError("temperature calibration needs beta > 0")
        elif self.method == "sigmoid":
            if len(p["a"]) != n_cols or len(p["b"]) != n_cols:
                raise ValueError(f"sigmoid calibration needs {n_cols} (a, b) pairs")
        elif self.method == "isotonic":
            keys = ("x_min", "x_max", "x_thresholds", "y_thresholds")
            if any(len(p[key]) != n_cols for key in keys):
                raise ValueError(f"isotonic calibration needs {n_cols} per-column entries")
            for xs, ys in zip(p["x_thresholds"], p["y_thresholds"], strict=True):
                if len(xs) != len(ys) or len(xs) == 0:
                    raise ValueError("isotonic thresholds must be non-empty and paired")

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable representation (round-trips through ``from_dict``)."""
        return {
            "version": FORMAT_VERSION,
            "method": self.method,
            "classes": list(self.classes),
            "params": _jsonable(self.params),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        version = int(d.get("version", FORMAT_VERSION))
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported calibration format version {version}")
        method = d["method"]
        if method not in _METHODS:
            raise ValueError(f"unknown calibration method {method!r}")
        return cls(
            method=cast(Method, method),
            params=dict(d.get("params") or {}),
            classes=tuple(str(c) for c in d["classes"]),
        )

    @classmethod
    def identity(cls, classes: Sequence[str]) -> Calibration:
        """The no-op calibration (plain softmax)."""
        return cls(method="none", params={}, classes=tuple(classes))

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """(n, k) logits -> (n, k) calibrated probabilities (float64, rows sum to 1).

        Reproduces ``CalibratedClassifierCV.predict_proba`` of the fitted sklearn object
        with numpy only.
        """
        k = self.n_classes
        z = _check_logits(np.atleast_2d(logits), k)
        if self.method == "none":
            return softmax(z)
        d = _decision(z)
        p = self.params
        if self.method == "temperature":
            scaled = np.stack([-d, d], axis=1) if k == 2 else d
            proba = softmax(float(p["beta"]) * scaled)
        else:
            cols = d[:, None] if k == 2 else d
            out = np.empty_like(cols)
            for j in range(cols.shape[1]):
                if self.method == "sigmoid":
                    t = float(p["a"][j]) * cols[:, j] + float(p["b"][j])
                    out[:, j] = _expit(-t)
                else:  # isotonic, out_of_bounds="clip"
                    xs = np.asarray(p["x_thresholds"][j], dtype=np.float64)
                    ys = np.asarray(p["y_thresholds"][j], dtype=np.float64)
                    x = np.clip(cols[:, j], float(p["x_min"][j]), float(p["x_max"][j]))
                    out[:, j] = ys[0] if xs.size == 1 else np.interp(x, xs, ys)
            if k == 2:
                proba = np.column_stack([1.0 - out[:, 0], out[:, 0]])
            else:
                denom = out.sum(axis=1, keepdims=True)
                proba = np.full_like(out, 1.0 / k)
                np.divide(out, denom, out=proba, where=denom != 0)
        # sklearn: "cases where the predicted probability minimally exceeds 1.0"
        proba[(proba > 1.0) & (proba <= 1.0 + 1e-5)] = 1.0
        return cast(np.ndarray, proba)


def _expit(x: np.ndarray) -> np.ndarray:
    """Logistic sigmoid 1 / (1 + exp(-x)) without overflow warnings (= scipy's expit)."""
    e = np.exp(-np.abs(x))
    return cast(np.ndarray, np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def _metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    k = probs.shape[1]
    return {
        "ece": expected_calibration_error(probs, labels),
        "brier": brier_score(probs, labels),
        "log_loss": float(log_loss(labels, probs, labels=np.arange(k))),
        "accuracy": float(np.mean(probs.argmax(axis=1) == labels)),
    }


# --------------------------------------------------------------------------- fitting


# Minimum calibration-set size (studies) for each method to be a candidate.
MIN_SAMPLES: dict[str, int] = {"temperature": 10, "sigmoid": 40, "isotonic": 200}
#: From this many calibration samples on, "none" is no longer a candidate: temperature at least.
TEMPERATURE_FLOOR = 100
#: A shipped calibration whose ECE on the calibration data exceeds this is reported as weak.
ECE_TARGET = 0.05


class MapCalibrator:
    """What the calibrators share: what they learn is a map (``map_``), the plain data a bundle
    stores; applying and storing go through it."""

    map_: Any

    def fitted_map(self) -> Any:
        """``map_``, or a ValueError saying that :meth:`fit` comes first."""
        if not hasattr(self, "map_"):
            raise ValueError(f"this {type(self).__name__} is not fitted yet: call fit() first")
        return self.map_

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Logits -> calibrated probabilities, through the fitted map."""
        return np.asarray(self.fitted_map().apply(logits))

    def to_dict(self) -> dict[str, Any]:
        """The fitted map as plain data (what the bundle stores)."""
        return dict(self.fitted_map().to_dict())


class Calibrator(MapCalibrator):
    """Chooses and fits the calibration map of a softmax model (the post-hoc protocol,
    :mod:`workbench.posthoc.protocol`).

    :meth:`fit` tries ``"none"`` plus ``methods`` and keeps the lowest held-out log loss
    (stratified K-fold, ``K = min(5, smallest class count)``; ties keep the simpler / earlier
    candidate, ``none`` first). With at least :data:`TEMPERATURE_FLOOR` samples ``none`` drops
    out and temperature scaling is the floor. If some class has fewer than 2 samples no
    held-out estimate is possible and ``none`` is kept (with a warning).

    Learned, after :meth:`fit`:

    * ``map_``: the chosen :class:`Calibration`, refitted on *all* the calibration data.
    * ``held_out_log_loss_``: per evaluated candidate, the log loss of out-of-fold
      predictions. ``none`` has nothing to fit: its value is the softmax log loss on all data.
    * ``before_``: ece / brier / log_loss / accuracy of the uncalibrated softmax.
    * ``after_``: the same metrics for the chosen method, **cross-fitted**: computed on the
      out-of-fold predictions used for model selection (each sample is calibrated by a map
      fitted without it), not on the in-sample refit; an honest, slightly pessimistic
      estimate. For ``none`` it equals ``before_``.
    * ``n_folds_``: folds used (0 when only ``none`` could be evaluated); ``notes_``: why
      candidates were skipped or kept.
    """

    map_: Calibration
    held_out_log_loss_: dict[str, float]
    before_: dict[str, float]
    after_: dict[str, float]
    n_folds_: int
    notes_: tuple[str, ...]

    def __init__(
        self,
        classes: Sequence[str],
        methods: Sequence[Method] = ("temperature", "sigmoid", "isotonic"),
        seed: int = 0,
    ) -> None:
        for m in methods:
            if m not in _METHODS:
                raise ValueError(f"unknown calibration method {m!r}")
        self.classes = tuple(str(c) for c in classes)
        self.methods = tuple(methods)
        self.seed = seed

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> Self:
        """Fit the candidates on (n, k) logits and (n,) class indices; keep the best."""
        k = len(self.classes)
        z = _check_logits(logits, k)
        p0, y = check_probs_labels(softmax(z), labels)

        before = _metrics(p0, y)
        held_out: dict[str, float] = {"none": before["log_loss"]}
        oof: dict[str, np.ndarray] = {"none": p0}
        candidates = [m for m in dict.fromkeys(self.methods) if m != "none"]
        notes: list[str] = []

        min_count = int(np.bincount(y, minlength=k).min())
        n_folds = min(_MAX_FOLDS, min_count)
        if candidates and n_folds < 2:
            msg = (
                f"smallest class has {min_count} sample(s): cannot estimate held-out "
                "calibration quality, using no calibration"
            )
            warnings.warn(msg, stacklevel=2)
            notes.append(msg)
            candidates, n_folds = [], 0
        elif not candidates:
            n_folds = 0
        # Flexible calibrators overfit small calibration sets (a per-class sigmoid fitted on a
        # handful of studies can take slopes in the hundreds): each needs a minimum sample size.
        too_small = [m for m in candidates if len(y) < MIN_SAMPLES[m]]
        for m in too_small:
            notes.append(f"{m} skipped: {len(y)} calibration samples, needs {MIN_SAMPLES[m]}")
        candidates = [m for m in candidates if m not in too_small]

        if candidates:
            splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=self.seed)
            folds = list(splitter.split(z, y))
            for m in candidates:
                pred = np.zeros_like(p0)
                for train, test in folds:
                    pred[test] = _fit_sklearn(z[train], y[train], m).predict_proba(z[test])
                oof[m] = pred
                held_out[m] = float(log_loss(y, pred, labels=np.arange(k)))

        # Temperature scaling is the floor on a calibration split large enough to fit its one
        # parameter well: it can only move T away from 1 where the data say so, while "none"
        # ships whatever over- or under-confidence training left.
        floor = "temperature" in candidates and len(y) >= TEMPERATURE_FLOOR
        best = "temperature" if floor else "none"
        if best != "none":
            notes.append(f"temperature is the floor ({len(y)} >= {TEMPERATURE_FLOOR} samples)")
        for m in candidates:
            if held_out[m] < held_out[best]:
                best = m

        if best == "none":
            self.map_ = Calibration.identity(self.classes)
        else:
            cal = _fit_sklearn(z, y, best)
            self.map_ = Calibration(
                method=cast(Method, best),
                params=_extract_params(cal, best, k),
                classes=self.classes,
            )
        self.held_out_log_loss_ = held_out
        self.before_ = dict(before)
        self.after_ = dict(before if best == "none" else _metrics(oof[best], y))
        self.n_folds_ = n_folds
        self.notes_ = tuple(notes)
        return self

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], /) -> Self:
        """A fitted calibrator from its stored map (no fit report: it is not stored)."""
        cal = Calibration.from_dict(d)
        out = cls(cal.classes, methods=(cal.method,))
        out.map_ = cal
        return out


# --------------------------------------------------------------------------- per label


def _as_binary_logits(z: np.ndarray) -> np.ndarray:
    """(n,) sigmoid logit -> (n, 2) logits [-z/2, z/2], whose softmax is [1 - s(z), s(z)]:
    a sigmoid output is calibrated as the binary softmax problem it is."""
    z = np.asarray(z, dtype=np.float64)
    return np.stack([-z / 2.0, z / 2.0], axis=1)


@dataclass(frozen=True)
class LabelCalibration:
    """Independent calibrations of K sigmoid outputs (one-vs-rest or multi-label models).

    Each label's map is a binary :class:`Calibration` (none / temperature / sigmoid /
    isotonic, chosen by held-out log loss) of that label's logit, stored as plain data.
    ``apply`` gives (n, K) probabilities that need not sum to one.
    """

    labels: tuple[Calibration, ...]
    classes: tuple[str, ...]
    method: str = "per_label"

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """(n, K) logits -> (n, K) calibrated per-label probabilities (float64)."""
        z = np.atleast_2d(np.asarray(logits, dtype=np.float64))
        if z.shape[1] != self.n_classes:
            raise ValueError(f"logits have {z.shape[1]} columns but {self.n_classes} labels")
        if not np.all(np.isfinite(z)):
            raise ValueError("logits contain NaN or infinite values")
        return np.stack(
            [cal.apply(_as_binary_logits(z[:, j]))[:, 1] for j, cal in enumerate(self.labels)],
            axis=1,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "method": self.method,
            "classes": list(self.classes),
            "labels": {c: cal.to_dict() for c, cal in zip(self.classes, self.labels, strict=True)},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LabelCalibration:
        classes = tuple(str(c) for c in d["classes"])
        return cls(tuple(Calibration.from_dict(d["labels"][c]) for c in classes), classes)


def calibration_from_dict(d: Mapping[str, Any]) -> Calibration | LabelCalibration:
    """Either kind of stored calibration, by its ``method``."""
    if d.get("method") == "per_label":
        return LabelCalibration.from_dict(d)
    return Calibration.from_dict(d)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function, float64, without overflow warnings."""
    return _expit(np.asarray(logits, dtype=np.float64))


class LabelCalibrator(MapCalibrator):
    """Fits one binary calibration per sigmoid output (one-vs-rest or multi-label models), each
    chosen by :class:`Calibrator` on that label's logit (the post-hoc protocol).

    Learned, after :meth:`fit`: ``map_`` (a :class:`LabelCalibration`) and ``report_``: per
    label, the chosen method, the held-out log losses and the notes. A label without two
    positives and two negatives keeps the plain sigmoid (``none``).
    """

    map_: LabelCalibration
    report_: dict[str, dict[str, Any]]

    def __init__(self, classes: Sequence[str], seed: int = 0) -> None:
        self.classes = tuple(str(c) for c in classes)
        self.seed = seed

    def fit(self, logits: np.ndarray, targets: np.ndarray) -> Self:
        """logits: (n, K); targets: (n, K) 0/1."""
        z = np.asarray(logits, dtype=np.float64)
        y = np.asarray(targets).astype(np.int64)
        fitted, report = [], {}
        for j, c in enumerate(self.classes):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "smallest class has 1 sample": noted below
                one = Calibrator(("no", "yes"), seed=self.seed).fit(
                    _as_binary_logits(z[:, j]), y[:, j]
                )
            fitted.append(one.map_)
            report[c] = {
                "method": one.map_.method,
                "held_out_log_loss": one.held_out_log_loss_,
                "notes": list(one.notes_),
            }
        self.map_ = LabelCalibration(tuple(fitted), self.classes)
        self.report_ = report
        return self

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], /) -> Self:
        cal = LabelCalibration.from_dict(d)
        out = cls(cal.classes)
        out.map_ = cal
        return out
