"""Modality values in Hounsfield units, for a CT image whose modality LUT is a linear rescale."""

from __future__ import annotations

import math

import numpy as np
from pydicom.dataset import Dataset

from workbench.dicom.read.display import is_color, lut_domain, padding_mask
from workbench.dicom.read.tags import opt_float, present, text_of, value_of

_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _rescale_of(item: Dataset) -> tuple[float | None, float | None, str | None]:
    return (
        opt_float(value_of(item, "RescaleSlope")),
        opt_float(value_of(item, "RescaleIntercept")),
        text_of(item, "RescaleType"),
    )


def _linear_rescale(ds: Dataset) -> tuple[float, float] | None:
    """(slope, intercept) when the modality LUT is a linear rescale to Hounsfield units.

    Rescale Slope / Intercept are read from the top level, else the Pixel Value Transformation
    of the Shared Functional Groups, else of the Per-frame Functional Groups when every frame
    has the same values (frames rescaled differently get None: one rescale would be wrong for
    some of them). None as well for a Modality LUT Sequence (a table, not a rescale), a missing
    slope or intercept, a zero slope, or a Rescale Type other than HU (CT Image: absent means
    HU, PS3.3 C.8.2.1).
    """
    if present(ds, "ModalityLUTSequence"):
        return None
    slope, intercept, kind = _rescale_of(ds)
    if slope is None or intercept is None:
        slope = intercept = kind = None
        shared = value_of(ds, "SharedFunctionalGroupsSequence")
        item = value_of(shared[0], "PixelValueTransformationSequence") if shared else None
        if item:
            slope, intercept, kind = _rescale_of(item[0])
        else:
            found = set()
            for frame in value_of(ds, "PerFrameFunctionalGroupsSequence") or ():
                inner = value_of(frame, "PixelValueTransformationSequence")
                found.add(_rescale_of(inner[0]) if inner else (None, None, None))
            if len(found) == 1:
                slope, intercept, kind = found.pop()
    if slope is None or intercept is None or slope == 0:
        return None
    if kind is not None and kind.upper() != "HU":
        return None
    return slope, intercept


def hounsfield_values(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """A CT image's modality values in Hounsfield units (Rescale Slope x stored + Intercept),
    float16, the shape of ``stored``; None when the image is not a grayscale CT whose modality
    LUT is a linear rescale to HU (see :func:`_linear_rescale`), or when its display is
    inverted (MONOCHROME1, Presentation LUT Shape INVERSE: a viewer windowing these values
    would show it the other way round).

    float16 keeps 11 significant bits: values are exact to 0.5 HU up to 1,024 HU, 1 HU up to
    2,048 and 2 HU up to 4,096 (so within 1 HU over the usual -1,024..3,071 range), coarser
    above (metal); that is below what a display window shows. Values beyond float16's range
    (+-65,504) are clipped to it. Padding pixels (Pixel Padding Value / Range Limit) are NaN:
    they have no modality value.
    """
    if str(value_of(ds, "Modality") or "").strip() != "CT" or is_color(ds):
        return None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric != "MONOCHROME2" or (text_of(ds, "PresentationLUTShape") or "") == "INVERSE":
        return None
    rescale = _linear_rescale(ds)
    if rescale is None:
        return None
    slope, intercept = rescale
    arr = np.asarray(stored)
    domain = lut_domain(arr)
    if domain is not None:
        # As in the display pipeline: once per possible stored value, then a table look-up
        # (casting every pixel to float16 was most of the cost).
        values, index = domain
        table = _rescaled_float16(values, slope, intercept)
        mask = padding_mask(ds, values, any_=False)
        if mask is not None:
            table[mask] = np.nan
        return np.take(table, index)
    hu = _rescaled_float16(arr, slope, intercept)
    mask = padding_mask(ds, arr)
    if mask is not None:
        hu[mask] = np.nan
    return hu


def _rescaled_float16(values: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    x = values.astype(np.float32)
    if slope != 1:
        x *= np.float32(slope)
    if intercept != 0:
        x += np.float32(intercept)
    if values.dtype.kind in "ui":
        info = np.iinfo(values.dtype)
        bound = max(abs(info.min * slope + intercept), abs(info.max * slope + intercept))
    else:
        bound = math.inf
    if bound > _FLOAT16_MAX:
        np.clip(x, -_FLOAT16_MAX, _FLOAT16_MAX, out=x)
    return x.astype(np.float16)
