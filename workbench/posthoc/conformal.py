"""Split conformal prediction sets: APS and RAPS for single-label problems, per label for
multi-label ones, with the fitted threshold stored as data.

A prediction set is the list of classes that, over studies like the calibration split, contains
the true class with probability at least ``coverage`` (default 90%). The score is the adaptive
prediction set score of Romano et al. 2020 (APS), optionally with the regularisation of
Angelopoulos et al. 2021 (RAPS: a penalty ``lam`` per class beyond the ``k_reg``-th), the
threshold the ``ceil((n+1)(1-alpha))/n`` quantile of the calibration scores.

Written here rather than taken from MAPIE: MAPIE fits through an estimator object and keeps the
fitted state in that object, while a bundle must hold the threshold as a few numbers that
``predict`` reads back without unpickling anything. The formulas follow the reference code of
Angelopoulos et al. (``conformal_classification``); the tests check coverage empirically.

Randomisation (which makes coverage exact rather than conservative) uses one uniform number per
study; :func:`study_uniform` derives it from the study key, so a study always gets the same set.

Empty sets are allowed by default, as the guarantee needs: when the model's top-1 accuracy is
above the target coverage, some studies must get no class for the coverage to be 90% rather
than the accuracy. An empty set means "more certain than the coverage level requires"; the app
shows such a study's top class with that note. ``allow_empty=False`` forces one class, which
raises coverage towards the top-1 accuracy.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from workbench.errors import UsageError

Method = Literal["aps", "raps"]
DEFAULT_COVERAGE = 0.9


def study_uniform(study_key: str, salt: str = "conformal") -> float:
    """A number in [0, 1) fixed by the study key: the randomisation of its prediction set."""
    digest = hashlib.sha256(f"{salt}|{study_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _sorted(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: classes by decreasing probability (N, K), those probabilities, their cumsum."""
    order = np.argsort(-probs, axis=1, kind="stable")
    ordered = np.take_along_axis(probs, order, axis=1)
    return order, ordered, np.cumsum(ordered, axis=1)


def _penalties(k: int, lam: float, k_reg: int) -> np.ndarray:
    """RAPS penalty of each rank (0-based): ``lam`` from rank ``k_reg`` on, cumulated."""
    pen = np.zeros(k)
    pen[k_reg:] = lam
    return np.cumsum(pen)


@dataclass
class ConformalSets:
    """A split-conformal predictor for one single-label problem (the post-hoc protocol of
    :mod:`workbench.posthoc.protocol`): ``ConformalSets(coverage, method).fit(probs, labels,
    u)`` learns the threshold ``qhat_``; :meth:`apply` gives prediction sets.

    ``method``: ``"aps"`` or ``"raps"`` (``lam``, ``k_reg`` apply to RAPS only).
    """

    coverage: float = DEFAULT_COVERAGE
    method: Method = "aps"
    lam: float = 0.01
    k_reg: int = 1
    randomized: bool = True
    allow_empty: bool = True
    qhat_: float = math.nan
    n_calibration_: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.coverage < 1:
            raise UsageError(f"coverage must be between 0 and 1, not {self.coverage}")
        if self.method != "raps":
            self.lam, self.k_reg = 0.0, 0

    def scores(self, probs: np.ndarray, labels: np.ndarray, u: np.ndarray) -> np.ndarray:
        """The conformity score of each (probabilities, true label) row: the probability mass
        of the classes ranked above the true one, plus (randomised) a uniform share ``u`` of
        the true class's own, plus the RAPS penalty up to its rank."""
        probs = np.asarray(probs, dtype=np.float64)
        order, ordered, cumsum = _sorted(probs)
        pen = _penalties(probs.shape[1], self.lam, self.k_reg)
        rank = np.argmax(order == np.asarray(labels)[:, None], axis=1)  # 0-based rank of truth
        rows = np.arange(len(probs))
        full = cumsum[rows, rank] + pen[rank]
        if not self.randomized:
            return full
        above = cumsum[rows, rank] - ordered[rows, rank]
        return above + np.asarray(u) * ordered[rows, rank] + pen[rank]

    def fit(
        self, probs: np.ndarray, labels: np.ndarray, u: np.ndarray | None = None
    ) -> ConformalSets:
        """Learn the set threshold from calibration probabilities (N, K) and true labels (N,);
        ``u``: one uniform number per row (see :func:`study_uniform`), default 0.5 for all."""
        probs = np.asarray(probs, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        u = np.full(len(probs), 0.5) if u is None else np.asarray(u, dtype=np.float64)
        qhat = conformal_quantile(self.scores(probs, labels, u), self.coverage)
        if not math.isfinite(qhat):
            raise ValueError(
                f"{len(probs)} calibration studies are too few for {self.coverage:.0%} "
                f"coverage (at least {math.ceil(self.coverage / (1 - self.coverage))} needed)"
            )
        self.qhat_, self.n_calibration_ = qhat, len(probs)
        return self

    def apply(self, probs: np.ndarray, u: np.ndarray | None = None) -> list[list[int]]:
        """The prediction set of each row (class indices, most probable first); empty only
        when ``allow_empty`` (see the module docstring).

        A class is in the set exactly when its score (as in :meth:`scores`, same ``u``) is
        within the threshold, which is what makes the coverage hold.
        """
        if math.isnan(self.qhat_):
            raise ValueError("fit the conformal predictor first")
        probs = np.asarray(probs, dtype=np.float64)
        n, k = probs.shape
        u = np.full(n, 0.5) if u is None else np.asarray(u, dtype=np.float64)
        order, ordered, cumsum = _sorted(probs)
        pen = _penalties(k, self.lam, self.k_reg)
        sizes = np.minimum(((cumsum + pen[None, :]) <= self.qhat_).sum(axis=1) + 1, k)
        if self.randomized:
            rows, last = np.arange(n), sizes - 1
            room = self.qhat_ - (cumsum[rows, last] - ordered[rows, last]) - pen[last]
            keep_last = u * ordered[rows, last] < room
            sizes = sizes - (~keep_last).astype(int)
        if not self.allow_empty:
            sizes = np.maximum(sizes, 1)
        return [order[i, : sizes[i]].tolist() for i in range(n)]

    def to_dict(self) -> dict[str, Any]:
        """The bundle's record (the keys bundles have always stored)."""
        return {
            "method": self.method,
            "coverage": self.coverage,
            "qhat": self.qhat_,
            "n_calibration": self.n_calibration_,
            "lam": self.lam,
            "k_reg": self.k_reg,
            "randomized": self.randomized,
            "allow_empty": self.allow_empty,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConformalSets:
        out = cls(
            coverage=float(d["coverage"]),
            method=d["method"],
            lam=float(d.get("lam", 0.0)),
            k_reg=int(d.get("k_reg", 0)),
            randomized=bool(d.get("randomized", True)),
            allow_empty=bool(d.get("allow_empty", True)),
        )
        out.qhat_, out.n_calibration_ = float(d["qhat"]), int(d["n_calibration"])
        return out


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The ``k``-th smallest score, ``k = ceil((n+1) coverage)`` (``inf`` when ``k > n``).

    That order statistic is what split conformal's guarantee is stated for (Vovk et al.;
    Angelopoulos & Bates 2021). ``np.quantile(scores, k / n, method="higher")``, as often
    written, interpolates at ``(n-1) k / n`` and rounds up: the ``(k+1)``-th smallest, one
    order statistic too conservative. ``inverted_cdf`` gives the ``k``-th exactly.
    """
    n = len(scores)
    k = math.ceil((n + 1) * coverage) if n else 0
    if not n or k > n:
        return math.inf
    return float(np.quantile(scores, k / n, method="inverted_cdf"))


@dataclass
class MultiLabelConformal:
    """One conformal predictor per label of a multi-label problem, each over {absent, present}
    (the post-hoc protocol): ``MultiLabelConformal(labels, coverage).fit(probs, targets, u)``.

    A label's set is {present}, {absent} or both (undecided); coverage holds per label.
    """

    labels: tuple[str, ...]
    coverage: float = DEFAULT_COVERAGE
    per_label_: tuple[ConformalSets, ...] = ()

    def fit(
        self, probs: np.ndarray, targets: np.ndarray, u: np.ndarray | None = None
    ) -> MultiLabelConformal:
        """Per-label APS from probabilities (N, L) and 0/1 targets (N, L)."""
        probs = np.asarray(probs, dtype=np.float64)
        targets = np.asarray(targets).astype(np.int64)
        self.per_label_ = tuple(
            ConformalSets(self.coverage, "aps").fit(_two(probs[:, j]), targets[:, j], u)
            for j in range(probs.shape[1])
        )
        return self

    def apply(self, probs: np.ndarray, u: np.ndarray | None = None) -> list[dict[str, str]]:
        """Per row: label -> "present", "absent", "uncertain" (both in the set) or "confident"
        (an empty set: either call is more certain than the coverage needs)."""
        probs = np.asarray(probs, dtype=np.float64)
        out: list[dict[str, str]] = [{} for _ in range(len(probs))]
        for j, (name, cp) in enumerate(zip(self.labels, self.per_label_, strict=True)):
            for i, s in enumerate(cp.apply(_two(probs[:, j]), u)):
                if len(s) == 1:
                    out[i][name] = "present" if s[0] else "absent"
                else:  # both, or none (more certain than needed): no call at this level
                    out[i][name] = "uncertain" if len(s) == 2 else "confident"
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "per_label": [c.to_dict() for c in self.per_label_]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MultiLabelConformal:
        per_label = tuple(ConformalSets.from_dict(c) for c in d["per_label"])
        coverage = per_label[0].coverage if per_label else DEFAULT_COVERAGE
        return cls(tuple(d["labels"]), coverage, per_label)


def _two(p: np.ndarray) -> np.ndarray:
    """One label's probabilities as two classes {absent, present}."""
    return np.stack([1 - p, p], axis=1)


def coverage_summary(
    sets: Sequence[Sequence[int]],
    labels: Sequence[int],
    groups: Mapping[str, Sequence[str | None]] | None = None,
) -> dict[str, Any]:
    """Empirical coverage and mean set size, overall and per subgroup value.

    ``groups`` maps a subgroup name (e.g. "site") to one value per study.
    """
    hit = np.array([int(y) in s for s, y in zip(sets, labels, strict=True)], dtype=float)
    size = np.array([len(s) for s in sets], dtype=float)
    out: dict[str, Any] = {
        "n": len(hit),
        "coverage": float(hit.mean()) if len(hit) else None,
        "mean_set_size": float(size.mean()) if len(size) else None,
        "subgroups": {},
    }
    for name, values in (groups or {}).items():
        idx: dict[str, list[int]] = defaultdict(list)
        for i, v in enumerate(values):
            idx["unknown" if v is None else str(v)].append(i)
        out["subgroups"][name] = {
            v: {
                "n": len(ii),
                "coverage": float(hit[ii].mean()),
                "mean_set_size": float(size[ii].mean()),
            }
            for v, ii in sorted(idx.items())
        }
    return out
