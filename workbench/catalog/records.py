"""Plain records read from the catalog that layers above it pass around (no database, no
scikit-learn, no torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StudyHeader:
    """The header facts of one study that the profile compares (from the catalog)."""

    modality: str | None
    body_parts: tuple[str, ...] = ()
    photometrics: tuple[str, ...] = ()
    spatial_dims: int = 2
    # (rows, columns) of each image
    sizes: tuple[tuple[int, int], ...] = ()
