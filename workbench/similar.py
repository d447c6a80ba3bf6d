"""An index of the training cohort's embeddings: the most similar prior studies, and the
distances that the out-of-distribution score is made of.

Embeddings are the network's pooled features (DenseNet121: 1,024 numbers per study, the mean
over the study's images), L2-normalised so that Euclidean distance ranks like cosine
similarity. The search is scikit-learn's ``NearestNeighbors`` (exact, brute force): for the
cohort sizes a bundle carries (thousands of studies) it answers in milliseconds, so an
approximate library would not pay for itself.

Stored in the bundle as plain arrays (``np.savez``, read back with ``allow_pickle=False``):
the embeddings as float16, the study keys (pseudonyms, never UIDs) and the labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.neighbors import NearestNeighbors


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


class EmbeddingIndex:
    """Nearest training studies by embedding.

    Args:
        embeddings: (N, F) study embeddings (normalised here).
        study_keys: the N study keys (pseudonyms).
        labels: the N labels as text ("nodule", or "a;b" for several).
    """

    def __init__(
        self, embeddings: np.ndarray, study_keys: Sequence[str], labels: Sequence[str]
    ) -> None:
        if not len(embeddings) == len(study_keys) == len(labels):
            raise ValueError("one study key and one label per embedding row")
        if len(embeddings) == 0:
            raise ValueError("an embedding index needs at least one study")
        # float16 is how the bundle stores them; keep the same values in memory so that a
        # loaded index answers exactly like the one that was saved
        self.embeddings = normalise(embeddings).astype(np.float16).astype(np.float32)
        self.study_keys = np.asarray(study_keys, dtype=str)
        self.labels = np.asarray(labels, dtype=str)
        self._nn = NearestNeighbors(algorithm="brute").fit(self.embeddings)

    def __len__(self) -> int:
        return len(self.study_keys)

    def distances(self, embeddings: np.ndarray, k: int) -> np.ndarray:
        """(M, k) Euclidean distances of unit vectors to their k nearest training studies."""
        k = min(k, len(self))
        dist, _ = self._nn.kneighbors(normalise(embeddings), n_neighbors=k)
        return np.asarray(dist)

    def query(
        self, embeddings: np.ndarray, k: int = 5, exclude: Sequence[str] = ()
    ) -> list[list[Neighbour]]:
        """The k most similar training studies for each row, most similar first.

        ``exclude``: study keys never returned (the study itself, when it was in training).
        """
        skip = set(exclude)
        n = min(len(self), k + len(skip))
        dist, idx = self._nn.kneighbors(normalise(embeddings), n_neighbors=n)
        out = []
        for drow, irow in zip(dist, idx, strict=True):
            found = [
                # unit vectors: |a - b|^2 = 2 - 2 cos
                Neighbour(str(self.study_keys[i]), str(self.labels[i]), float(1 - d * d / 2))
                for d, i in zip(drow, irow, strict=True)
                if self.study_keys[i] not in skip
            ]
            out.append(found[:k])
        return out

    def save(self, path: Path) -> None:
        np.savez(
            path,
            embeddings=self.embeddings.astype(np.float16),
            study_keys=self.study_keys,
            labels=self.labels,
        )

    @classmethod
    def load(cls, path: Path) -> EmbeddingIndex:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["embeddings"], data["study_keys"].tolist(), data["labels"].tolist())


def precision_at_k(
    index: EmbeddingIndex, embeddings: np.ndarray, labels: Sequence[str], k: int = 5
) -> float:
    """Mean share of each query's k neighbours that carry the query's own label (queries
    that are not in the index, e.g. the test split)."""
    hits = [
        f.label == labels[i] for i, found in enumerate(index.query(embeddings, k)) for f in found
    ]
    return float(np.mean(hits)) if hits else 0.0
