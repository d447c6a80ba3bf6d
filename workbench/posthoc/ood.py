"""Out-of-distribution flags: is this study like the ones the model was trained on?

Two checks, either of which flags a study:

* **Header facts.** Modality, body part, photometric interpretation, number of spatial
  dimensions and image size are compared with what the training cohort contained (a
  :class:`HeaderProfile`). A CT shown to a chest X-ray model is refused before any pixel is
  looked at, with the reason in words.
* **Embedding distance.** The distance from the study's (normalised) embedding to its k-th
  nearest training study (Sun et al. 2022, "Out-of-distribution detection with deep nearest
  neighbors"), or optionally the Mahalanobis distance to the training embeddings (Lee et al.
  2018; covariance by scikit-learn's Ledoit-Wolf estimator). The threshold is a high quantile
  (default 99%) of the same score on the calibration split, studies the network never trained
  on, so about 1% of in-distribution studies are flagged by design; the report measures it.

A flagged study is shown as such and its probabilities are not presented as a finding.
Everything is stored as data: the profile and threshold as JSON, the Mahalanobis parameters as
arrays; the k-NN score reuses the bundle's :class:`~workbench.posthoc.similar.EmbeddingIndex`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from sklearn.covariance import LedoitWolf

from workbench.catalog.records import StudyHeader
from workbench.posthoc.similar import EmbeddingIndex, normalise

Method = Literal["knn", "mahalanobis"]
DEFAULT_QUANTILE = 0.99
DEFAULT_K = 5
# An image up to this factor smaller or larger than any training image still counts as seen.
SIZE_FACTOR = 2.0


@dataclass
class HeaderProfile:
    """What the training cohort's headers contained (the post-hoc protocol:
    ``HeaderProfile().fit(headers)``; :meth:`apply` gives a study's reasons to be flagged)."""

    modalities_: tuple[str, ...] = ()
    body_parts_: tuple[str, ...] = ()
    photometrics_: tuple[str, ...] = ()
    spatial_dims_: tuple[int, ...] = ()
    min_side_: int = 0
    max_side_: int = 0

    def fit(self, headers: Iterable[StudyHeader]) -> HeaderProfile:
        hs = list(headers)
        sides = [s for h in hs for size in h.sizes for s in size]
        self.modalities_ = tuple(sorted({h.modality for h in hs if h.modality}))
        self.body_parts_ = tuple(sorted({b.upper() for h in hs for b in h.body_parts if b}))
        self.photometrics_ = tuple(sorted({p for h in hs for p in h.photometrics if p}))
        self.spatial_dims_ = tuple(sorted({h.spatial_dims for h in hs}))
        self.min_side_ = min(sides) if sides else 0
        self.max_side_ = max(sides) if sides else 0
        return self

    def apply(self, h: StudyHeader) -> list[str]:
        """Why this study's header is unlike the training cohort's (empty: it is not)."""
        why = []
        if self.modalities_ and h.modality not in self.modalities_:
            why.append(
                f"modality {h.modality or 'unknown'} (trained on {', '.join(self.modalities_)})"
            )
        unseen = sorted({b.upper() for b in h.body_parts if b} - set(self.body_parts_))
        if self.body_parts_ and unseen:
            why.append(f"body part {', '.join(unseen)} (trained on {', '.join(self.body_parts_)})")
        odd = sorted(set(h.photometrics) - set(self.photometrics_))
        if self.photometrics_ and odd:
            why.append(f"photometric interpretation {', '.join(odd)} not seen in training")
        if self.spatial_dims_ and h.spatial_dims not in self.spatial_dims_:
            why.append(f"{h.spatial_dims}D input for a {self.spatial_dims_[0]}D model")
        if self.max_side_:
            lo, hi = self.min_side_ / SIZE_FACTOR, self.max_side_ * SIZE_FACTOR
            bad = [f"{r}x{c}" for r, c in h.sizes if not (lo <= r <= hi and lo <= c <= hi)]
            if bad:
                why.append(
                    f"image size {', '.join(sorted(set(bad)))} far from the training sizes "
                    f"({self.min_side_}-{self.max_side_} px)"
                )
        return why

    def to_dict(self) -> dict[str, Any]:
        """The bundle's record (the keys bundles have always stored)."""
        return {
            "modalities": list(self.modalities_),
            "body_parts": list(self.body_parts_),
            "photometrics": list(self.photometrics_),
            "spatial_dims": list(self.spatial_dims_),
            "min_side": self.min_side_,
            "max_side": self.max_side_,
        }

    @classmethod
    def from_dict(cls, p: Mapping[str, Any]) -> HeaderProfile:
        return cls(
            modalities_=tuple(p["modalities"]),
            body_parts_=tuple(p["body_parts"]),
            photometrics_=tuple(p["photometrics"]),
            spatial_dims_=tuple(int(x) for x in p["spatial_dims"]),
            min_side_=int(p["min_side"]),
            max_side_=int(p["max_side"]),
        )


@dataclass(frozen=True)
class OODResult:
    flagged: bool
    score: float
    threshold: float
    reasons: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": list(self.reasons)}


@dataclass
class OODDetector:
    """Header profile + embedding score with a fitted threshold (see the module docstring)."""

    profile: HeaderProfile
    method: Method = "knn"
    k: int = DEFAULT_K
    quantile: float = DEFAULT_QUANTILE
    threshold_: float = float("inf")
    # the held-out scores the threshold came from: how many studies, and their spread
    reference_: dict[str, float] = field(default_factory=dict)
    location_: np.ndarray | None = None
    precision_: np.ndarray | None = None

    def fit(self, index: EmbeddingIndex, train: np.ndarray, held_out: np.ndarray) -> OODDetector:
        """Fit on the training embeddings (already in ``index``) and set the threshold from
        the held-out (calibration split) embeddings."""
        if self.method == "mahalanobis":
            cov = LedoitWolf().fit(normalise(train))
            self.location_ = cov.location_.astype(np.float32)
            self.precision_ = cov.precision_.astype(np.float32)
        scores = self.scores(index, held_out)
        if len(scores) == 0:
            raise ValueError("the OOD threshold needs held-out studies")
        self.threshold_ = float(np.quantile(scores, self.quantile, method="higher"))
        self.reference_ = {
            "n": float(len(scores)),
            "median": float(np.median(scores)),
            "max": float(scores.max()),
        }
        return self

    def scores(self, index: EmbeddingIndex, embeddings: np.ndarray) -> np.ndarray:
        """Higher is stranger: k-th neighbour distance, or Mahalanobis distance."""
        if len(embeddings) == 0:
            return np.zeros(0)
        if self.method == "mahalanobis":
            if self.location_ is None or self.precision_ is None:
                raise ValueError("fit the detector first")
            d = normalise(embeddings) - self.location_
            return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, self.precision_, d), 0.0))
        return index.distances(embeddings, self.k)[:, -1]

    def apply(
        self, index: EmbeddingIndex, embeddings: np.ndarray, headers: Sequence[StudyHeader]
    ) -> list[OODResult]:
        """One result per study: flagged when its header or its embedding is unlike training."""
        scores = self.scores(index, embeddings)
        out = []
        for score, header in zip(scores, headers, strict=True):
            reasons = self.profile.apply(header)
            if score > self.threshold_:
                reasons.append(
                    f"image content unlike the training studies (score {score:.3f} > "
                    f"threshold {self.threshold_:.3f})"
                )
            out.append(OODResult(bool(reasons), float(score), self.threshold_, tuple(reasons)))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters; the Mahalanobis arrays go separately (:meth:`arrays`)."""
        return {
            "profile": self.profile.to_dict(),
            "method": self.method,
            "k": self.k,
            "quantile": self.quantile,
            "threshold": self.threshold_,
            "reference": self.reference_,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        if self.location_ is None or self.precision_ is None:
            return {}
        return {"ood_location": self.location_, "ood_precision": self.precision_}

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None
    ) -> OODDetector:
        profile = HeaderProfile.from_dict(d["profile"])
        det = cls(profile, d["method"], int(d["k"]), float(d["quantile"]))
        det.threshold_ = float(d["threshold"])
        det.reference_ = dict(d.get("reference", {}))
        if arrays and "ood_location" in arrays:
            det.location_ = np.asarray(arrays["ood_location"], dtype=np.float32)
            det.precision_ = np.asarray(arrays["ood_precision"], dtype=np.float32)
        return det


def false_flag_rate(results: Sequence[OODResult]) -> float:
    """Share of flagged studies (on in-distribution studies: the false-flag rate)."""
    return float(np.mean([r.flagged for r in results])) if results else 0.0
