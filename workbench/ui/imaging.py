"""Pixels for the screen: cached display arrays, window / level, the heat-map overlay.

The app never decodes DICOM. It reads the display-pipeline pixels the catalog cached at
ingest (float16 in [0, 1], native rows x cols, or slices x rows x cols for a volume) and the
saliency maps inference cached beside them (same shape, in [0, 1]). For CT it also reads the
modality values cached at ingest (Hounsfield units, float16, the same shape as the display
pixels), which the CT presets and the file's own windows are applied to.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import streamlit as st
from PIL import Image

from workbench.catalog.ingest import cache_path
from workbench.config import Settings
from workbench.dicom.read.display import linear_window
from workbench.dicom.read.header import FileWindow
from workbench.predict.heatmap import overlay

#: Largest side, in pixels, of an image sent to the browser: a viewer column is narrower than
#: this even on a high-density screen, and a full-resolution radiograph (3000 px a side) would
#: cost seconds to encode and send. Zooming crops before reducing, so detail is never lost.
DISPLAY_MAX_SIDE = 1024
MIN_WIDTH = 0.02
MAX_WIDTH = 2.0
# Window presets on the display scale (the cache holds the file's own windowing in [0, 1]):
# name -> (center, width). "File default" shows the image as its DICOM display pipeline did.
PRESETS: dict[str, tuple[float, float]] = {
    "File default": (0.5, 1.0),
    "Soft": (0.5, 0.7),
    "Bone / high contrast": (0.6, 0.4),
    "Lung / low contrast": (0.45, 1.6),
}


#: CT window presets in Hounsfield units, name -> (center, width): the "typical window width
#: and level values" of Radiopaedia's article "Windowing (CT)" (D. J. Bell, A. Murphy et al.,
#: https://radiopaedia.org/articles/windowing-ct): chest lungs W:1500 L:-600, mediastinum
#: W:350 L:50; abdomen soft tissues W:400 L:50, liver W:150 L:30; spine bone W:1800 L:400;
#: head brain W:80 L:40.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "Lung": (-600.0, 1500.0),
    "Mediastinum": (50.0, 350.0),
    "Abdomen": (50.0, 400.0),
    "Liver": (30.0, 150.0),
    "Bone": (400.0, 1800.0),
    "Brain": (40.0, 80.0),
}
#: The CT preset shown first when the file has no window of its own.
CT_DEFAULT_PRESET = "Abdomen"
#: Slider ranges in HU (widened to take in every preset of the shown image): the CT number
#: scale of a 12-bit scanner (-1,024..3,071) with some room.
HU_CENTER_RANGE = (-1200.0, 3200.0)
HU_WIDTH_RANGE = (1.0, 4500.0)


def file_window_name(number: int, window: FileWindow) -> str:
    """What the preset box calls a file's window: its explanation, else "File window N"."""
    return window.explanation or f"File window {number}"


def hu_presets(windows: Sequence[FileWindow]) -> dict[str, tuple[float, float]]:
    """The window presets of a CT image in HU: the file's own windows first (in its order, by
    name), then :data:`CT_PRESETS`. A name met twice gets the window's number, or "(default)"
    for a CT preset, so that every entry can be chosen."""
    out: dict[str, tuple[float, float]] = {}
    for n, w in enumerate(windows, 1):
        name = file_window_name(n, w)
        if name in out:
            name = f"{name} (file window {n})"
        out[name] = (float(w.center), float(w.width))
    for name, cw in CT_PRESETS.items():
        out[f"{name} (default)" if name in out else name] = cw
    return out


def hu_default(windows: Sequence[FileWindow]) -> tuple[str, float, float]:
    """The preset a CT image opens with: its file's first window (what the display pipeline
    applied at ingest), else :data:`CT_DEFAULT_PRESET`."""
    presets = hu_presets(windows)
    name = next(iter(presets)) if windows else CT_DEFAULT_PRESET
    return (name, *presets[name])


def hu_ranges(
    presets: dict[str, tuple[float, float]],
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(center range, width range) of the HU sliders: the defaults, widened to every preset."""
    centers = [c for c, _ in presets.values()]
    widths = [w for _, w in presets.values()]
    return (
        (min(HU_CENTER_RANGE[0], *centers), max(HU_CENTER_RANGE[1], *centers)),
        (min(HU_WIDTH_RANGE[0], *widths), max(HU_WIDTH_RANGE[1], *widths)),
    )


@st.cache_data(max_entries=128, show_spinner=False)
def _load(path: str) -> np.ndarray:
    # Global cache: the key is a content-addressed file, the value a pure pixel array.
    return np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)


def load_display(settings: Settings, cache_key: str) -> np.ndarray | None:
    """The cached display pixels of one image, or None when the cache lacks them."""
    path = cache_path(settings, cache_key)
    return _load(str(path)) if path.is_file() else None


def load_hounsfield(settings: Settings, hu_cache_key: str | None) -> np.ndarray | None:
    """The cached modality values (HU) of a CT image or volume, or None when there are none."""
    return load_display(settings, hu_cache_key) if hu_cache_key else None


def load_saliency(settings: Settings, saliency_file: str | None) -> np.ndarray | None:
    """A cached saliency map, or None when there is none (or it would leave the cache folder)."""
    if not saliency_file:
        return None
    root = settings.cache_dir.resolve()
    path = (root / saliency_file).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return _load(str(path))


def n_slices(arr: np.ndarray) -> int:
    return int(arr.shape[0]) if arr.ndim == 3 else 1


def plane(arr: np.ndarray, index: int = 0) -> np.ndarray:
    """The 2-D plane to show: the image itself, or slice ``index`` of a volume."""
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3:
        return arr[int(np.clip(index, 0, arr.shape[0] - 1))]
    raise ValueError(f"expected a 2-D image or a 3-D volume, got shape {arr.shape}")


def window_level(image: np.ndarray, center: float, width: float) -> np.ndarray:
    """Re-window a [0, 1] display image: ``center - width/2`` maps to black, ``+ width/2`` to white.

    center 0.5 / width 1.0 leaves the image as the DICOM display pipeline produced it.
    """
    width = max(float(width), MIN_WIDTH)
    low = float(center) - width / 2.0
    out = (np.nan_to_num(image.astype(np.float32), nan=0.0) - low) / width
    return np.clip(out, 0.0, 1.0)


def window_hu(image: np.ndarray, center: float, width: float) -> np.ndarray:
    """Window modality values (HU) for display in [0, 1] with the display pipeline's own DICOM
    LINEAR window (:func:`workbench.dicom.read.display.linear_window`), so that the file's own
    window looks as ingest showed it. Pixels without a value (padding, NaN) are black."""
    return linear_window(image.astype(np.float32), float(center), float(width))


def to_grey_rgb(image: np.ndarray) -> np.ndarray:
    """A [0, 1] grey image as uint8 RGB, so both panels go through the same encoder."""
    return np.repeat(to_grey(image)[..., None], 3, axis=2)


def blend(image: np.ndarray, heat: np.ndarray | None, alpha: float) -> np.ndarray:
    """Heat map over the windowed image (uint8 RGB); the plain image when there is no map."""
    if heat is None or heat.shape != image.shape or alpha <= 0.0:
        return to_grey_rgb(image)
    return overlay(image, heat, alpha=float(np.clip(alpha, 0.0, 1.0)))


def zoom(image: np.ndarray, factor: float) -> np.ndarray:
    """The centre ``1/factor`` of a 2-D plane (factor 1 leaves it whole)."""
    if factor <= 1.0 or image.ndim != 2:
        return image
    rows, cols = image.shape
    h, w = max(1, round(rows / factor)), max(1, round(cols / factor))
    top, left = (rows - h) // 2, (cols - w) // 2
    return image[top : top + h, left : left + w]


def thumbnail(image: np.ndarray, size: int = 128) -> np.ndarray:
    """A small uint8 grey preview of a display image (the middle slice of a volume)."""
    flat = plane(image, n_slices(image) // 2)
    return to_grey(np.nan_to_num(reduce(flat, size), nan=0.0))


def reduce(image: np.ndarray, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """A 2-D plane reduced by the smallest integer factor that brings its longer side to at most
    ``max_side``, each output pixel the mean of its block (the image unchanged when it fits)."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D plane, got shape {image.shape}")
    factor = int(np.ceil(max(image.shape) / max_side))
    if factor <= 1:
        return image
    rows, cols = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = (
        image[:rows, :cols]
        .astype(np.float32)
        .reshape(rows // factor, factor, cols // factor, factor)
    )
    return blocks.mean(axis=(1, 3))


def png(image: np.ndarray) -> bytes:
    """uint8 grey (H, W) or RGB (H, W, 3) as PNG bytes for ``st.image``: lossless, at zlib level
    1 (a fifth of the default level's time for files about a quarter larger)."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(
        out, format="PNG", compress_level=1
    )
    return out.getvalue()


def to_grey(image: np.ndarray) -> np.ndarray:
    """A [0, 1] grey image as uint8 grey levels."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
