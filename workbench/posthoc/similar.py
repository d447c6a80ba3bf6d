"""An index of the training cohort's embeddings: the most similar prior studies, and the
distances that the out-of-distribution score is made of.

Embeddings are the network's pooled features (DenseNet121: 1,024 numbers per study, the mean
over the study's images), L2-normalised so that Euclidean distance ranks like cosine
similarity. The search is scikit-learn's ``NearestNeighbors`` (exact, brute force): for the
cohort sizes a bundle carries (thousands of studies) it answers in milliseconds, so an
approximate library would not pay for itself.

How close is close: DenseNet features are non-negative, so every pair of studies has a high
cosine similarity (the demo model showed "similarity 1.00" for all five neighbours) and the raw
number does not tell one neighbour from another. Each neighbour therefore also gets
``closer_than``: the percentage of the index's own neighbour pairs (each training study with its
:data:`NEIGHBOURS` nearest *other* training studies, leave-one-out) that lie farther apart than
this pair. 97 reads "closer than 97% of typical neighbour pairs in training"; 50 is a typical
neighbour; 0 is farther than any. The distribution is summarised once, when the index is built,
as :data:`QUANTILES` quantiles of those distances (``EmbeddingIndex.neighbour_quantiles_``),
and saved with the index.

Stored in the bundle as plain arrays (``np.savez``, read back with ``allow_pickle=False``):
the embeddings as float16, the study keys (pseudonyms, never UIDs), the labels and the
neighbour-distance quantiles. An index saved before the quantiles existed computes them when it
is loaded (at most :data:`REFERENCE_QUERIES` leave-one-out searches).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Self, cast

import numpy as np
from sklearn.neighbors import NearestNeighbors

# How many neighbours a study is shown, and how many of each training study's neighbours make
# the reference distances that ``closer_than`` compares with.
NEIGHBOURS = 5
# The reference distribution is kept as this many quantiles (0%, 0.5%, ..., 100%).
QUANTILES = 201
# At most this many training studies (evenly spaced rows) search their own neighbours for the
# reference distances: enough for the quantiles, and bounded for a large index.
REFERENCE_QUERIES = 2000
#: The version of :meth:`EmbeddingIndex.to_dict`'s record.
FORMAT_VERSION = 1


def normalise(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); a zero row stays zero."""
    x = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


@dataclass(frozen=True)
class Neighbour:
    study_key: str
    label: str
    # cosine similarity of the two studies' embeddings, in [-1, 1]
    similarity: float
    # Euclidean distance of the two unit embeddings, in [0, 2]
    distance: float
    # percentage (0-100) of the index's own neighbour pairs that are farther apart; NaN for an
    # index of one study (it has no pairs)
    closer_than: float


class EmbeddingIndex:
    """Nearest training studies by embedding, on the post-hoc protocol
    (:mod:`workbench.posthoc.protocol`).

    Built with ``k``, the neighbours :meth:`apply` returns. :meth:`fit` learns ``embeddings_``
    (normalised, and kept at the float16 values the bundle stores, so that a loaded index
    answers exactly like the one that was saved), ``study_keys_`` (pseudonyms), ``labels_``
    (text: "nodule", or "a;b" for several) and ``neighbour_quantiles_`` (see the module
    docstring). The record is :meth:`to_dict` with its :meth:`arrays` beside it
    (:meth:`save` / :meth:`load` write and read them as one ``.npz``).
    """

    embeddings_: np.ndarray
    study_keys_: np.ndarray
    labels_: np.ndarray
    neighbour_quantiles_: np.ndarray

    def __init__(self, k: int = NEIGHBOURS) -> None:
        if k < 1:
            raise ValueError("an embedding index returns at least one neighbour")
        self.k = k

    def fit(self, embeddings: np.ndarray, study_keys: Sequence[str], labels: Sequence[str]) -> Self:
        """Index (N, F) study embeddings with their N study keys and labels."""
        self._learn(embeddings, study_keys, labels, None)
        return self

    def _learn(
        self,
        embeddings: np.ndarray,
        study_keys: Sequence[str],
        labels: Sequence[str],
        neighbour_quantiles: np.ndarray | None,
    ) -> None:
        if not len(embeddings) == len(study_keys) == len(labels):
            raise ValueError("one study key and one label per embedding row")
        if len(embeddings) == 0:
            raise ValueError("an embedding index needs at least one study")
        self.embeddings_ = normalise(embeddings).astype(np.float16).astype(np.float32)
        self.study_keys_ = np.asarray(study_keys, dtype=str)
        self.labels_ = np.asarray(labels, dtype=str)
        self._nn = NearestNeighbors(algorithm="brute").fit(self.embeddings_)
        self.neighbour_quantiles_ = (
            self._quantiles()
            if neighbour_quantiles is None
            else np.asarray(neighbour_quantiles, np.float32)
        )

    def _check_fitted(self) -> None:
        if not hasattr(self, "embeddings_"):
            raise ValueError("this EmbeddingIndex is not fitted yet: call fit() first")

    def __len__(self) -> int:
        self._check_fitted()
        return len(self.study_keys_)

    def distances(self, embeddings: np.ndarray, k: int) -> np.ndarray:
        """(M, k) Euclidean distances of unit vectors to their k nearest training studies."""
        k = min(k, len(self))
        dist, _ = self._nn.kneighbors(normalise(embeddings), n_neighbors=k)
        return np.asarray(dist)

    def reference_distances(
        self, k: int = NEIGHBOURS, max_queries: int = REFERENCE_QUERIES
    ) -> np.ndarray:
        """Distances of training studies to their k nearest *other* training studies (leave one
        out), flattened; from at most ``max_queries`` evenly spaced studies. Empty for an index
        of one study."""
        n = len(self)
        k = min(k, n - 1)
        if k < 1:
            return np.zeros(0, dtype=np.float32)
        rows = np.unique(np.linspace(0, n - 1, min(n, max_queries)).round().astype(np.int64))
        dist, idx = self._nn.kneighbors(self.embeddings_[rows], n_neighbors=k + 1)
        # drop each study itself (an exact duplicate may come first: drop by index, and the
        # farthest when the study is not among the k + 1)
        own = idx == rows[:, None]
        own[~own.any(axis=1), -1] = True
        return np.asarray(dist[~own].reshape(len(rows), k), dtype=np.float32).ravel()

    def _quantiles(self) -> np.ndarray:
        """(:data:`QUANTILES`,) quantiles of :meth:`reference_distances`, at 0%, 0.5%, ...,
        100%; empty for an index of one study."""
        ref = self.reference_distances()
        if len(ref) == 0:
            return np.zeros(0, dtype=np.float32)
        return np.quantile(ref, np.linspace(0.0, 1.0, QUANTILES)).astype(np.float32)

    def closer_than(self, distances: np.ndarray) -> np.ndarray:
        """For each distance, the percentage (0-100) of the index's own neighbour pairs that
        are farther apart (interpolated between the stored quantiles); NaN for an index of one
        study."""
        self._check_fitted()
        d = np.asarray(distances, dtype=np.float64)
        q = self.neighbour_quantiles_
        if len(q) == 0:
            return np.full(d.shape, np.nan)
        nearer = np.interp(d, q.astype(np.float64), np.linspace(0.0, 1.0, len(q)))
        return np.clip(100.0 * (1.0 - nearer), 0.0, 100.0)

    def apply(
        self, embeddings: np.ndarray, exclude: Sequence[str] = (), k: int | None = None
    ) -> list[list[Neighbour]]:
        """The ``k`` (default: the index's) most similar training studies for each row, most
        similar first. ``exclude``: study keys never returned (the study itself, when it was in
        training)."""
        k = self.k if k is None else k
        skip = set(exclude)
        n = min(len(self), k + len(skip))
        dist, idx = self._nn.kneighbors(normalise(embeddings), n_neighbors=n)
        out = []
        closer = self.closer_than(dist)
        for drow, irow, crow in zip(dist, idx, closer, strict=True):
            found = [
                Neighbour(
                    str(self.study_keys_[i]),
                    str(self.labels_[i]),
                    float(1 - d * d / 2),  # unit vectors: |a - b|^2 = 2 - 2 cos
                    float(d),
                    float(c),
                )
                for d, i, c in zip(drow, irow, crow, strict=True)
                if self.study_keys_[i] not in skip
            ]
            out.append(found[:k])
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON part of the record; the arrays go beside it (:meth:`arrays`)."""
        self._check_fitted()
        return {"version": FORMAT_VERSION, "k": self.k, "studies": len(self)}

    def arrays(self) -> dict[str, np.ndarray]:
        """Embeddings (float16), study keys, labels and neighbour-distance quantiles."""
        self._check_fitted()
        return {
            "embeddings": self.embeddings_.astype(np.float16),
            "study_keys": self.study_keys_,
            "labels": self.labels_,
            "neighbour_quantiles": self.neighbour_quantiles_,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Self:
        """A fitted index from its record and arrays; arrays saved before the quantiles
        existed compute them here."""
        version = int(d.get("version", FORMAT_VERSION))
        if version > FORMAT_VERSION:
            raise ValueError(f"unsupported embedding index format version {version}")
        out = cls(int(d.get("k", NEIGHBOURS)))
        out._learn(
            arrays["embeddings"],
            [str(s) for s in arrays["study_keys"]],
            [str(s) for s in arrays["labels"]],
            arrays.get("neighbour_quantiles"),
        )
        return out

    def save(self, path: Path | BinaryIO) -> None:
        """The arrays as one ``.npz`` (what a bundle ships)."""
        np.savez(path, **cast(dict[str, Any], self.arrays()))  # numpy types **kwds as bool

    @classmethod
    def load(cls, path: Path) -> Self:
        """An index saved by :meth:`save` (one saved without quantiles computes them)."""
        with np.load(path, allow_pickle=False) as data:
            return cls.from_dict({}, {name: data[name] for name in data.files})


def precision_at_k(
    index: EmbeddingIndex, embeddings: np.ndarray, labels: Sequence[str], k: int = 5
) -> float:
    """Mean share of each query's k neighbours that carry the query's own label (queries
    that are not in the index, e.g. the test split)."""
    hits = [
        f.label == labels[i] for i, found in enumerate(index.apply(embeddings, k=k)) for f in found
    ]
    return float(np.mean(hits)) if hits else 0.0
