"""Drawing a saliency map over the displayed image: numpy and matplotlib's colour maps only,
no torch (the review app and the DICOM writers draw overlays without loading a model)."""

from __future__ import annotations

from typing import cast

import matplotlib
import numpy as np


def overlay(
    display: np.ndarray, heat: np.ndarray, alpha: float = 0.4, cmap: str = "jet"
) -> np.ndarray:
    """Blend a grey image with a colour-mapped heat map.

    ``display``: 2-D grey image in [0, 1]; ``heat``: 2-D map in [0, 1] of the same shape.
    Returns (H, W, 3) uint8 RGB ``(1 - alpha) * grey + alpha * cmap(heat)``; ``alpha=0``
    gives the grey image.  Out-of-range and non-finite values are clipped / zeroed.
    """
    g = np.asarray(display, dtype=np.float64)
    h = np.asarray(heat, dtype=np.float64)
    if g.ndim != 2 or h.shape != g.shape:
        raise ValueError(f"display and heat must be 2-D of equal shape, got {g.shape}, {h.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    g = np.clip(np.nan_to_num(g, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    h = np.clip(np.nan_to_num(h, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    colour = matplotlib.colormaps[cmap](h)[..., :3]
    rgb = (1.0 - alpha) * g[..., None] + alpha * colour
    return cast(np.ndarray, np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8))
