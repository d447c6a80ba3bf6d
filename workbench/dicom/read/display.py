"""The display pipeline: stored values to what a person (and the model) sees, in [0, 1].

The grayscale pipeline follows the order of the DICOM standard (PS3.3 C.11, PS3.4 N.2.1):

1. Pixel Padding Value (and Pixel Padding Range Limit) mask, on the stored values;
2. Modality LUT or Rescale Slope/Intercept (:func:`pydicom.pixels.apply_modality_lut`);
3. VOI LUT Sequence or Window Center/Width (:func:`pydicom.pixels.apply_voi_lut`, the VOI LUT
   Sequence preferred when both are present); when neither exists, the min/max of the
   non-padding pixels;
4. linear map to [0, 1];
5. Presentation LUT: MONOCHROME1, or Presentation LUT Shape INVERSE, inverts (``1 - x``).

Padding pixels are set to 0 (black) at the very end, after the inversion.

Colour images have no modality or VOI stage: RGB as stored, YBR_FULL / YBR_FULL_422 converted
to RGB by pydicom (``convert_color_space``, or the codec for JPEG / JPEG 2000), PALETTE COLOR
through its LUT (:func:`pydicom.pixels.apply_color_lut`). They are kept as 8-bit RGB for display
and reduced to ITU-R BT.601 luma in [0, 1] for the model.

Multi-frame "enhanced" objects keep rescale and window values in functional groups; when the
top level lacks them, those of the Shared (else the first Per-frame) Functional Groups are used.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import cast

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
)

from workbench.dicom.read.tags import (
    functional_group_item,
    opt_float,
    opt_int,
    tag_of,
    text_of,
    value_of,
)

_PIPELINE_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SamplesPerPixel",
    "ModalityLUTSequence",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
)
_FG_SOURCES = {
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
    "RescaleType": "PixelValueTransformationSequence",
    "WindowCenter": "FrameVOILUTSequence",
    "WindowWidth": "FrameVOILUTSequence",
    "VOILUTFunction": "FrameVOILUTSequence",
}


def pipeline_dataset(ds: Dataset, private: bool = True) -> Dataset:
    """What the LUT functions read, with functional groups merged in: a private deep copy
    (pydicom's LUT functions write to it), or with ``private=False`` the elements themselves,
    for read-only use."""
    view = Dataset()
    for kw in _PIPELINE_KEYWORDS:
        tag = tag_of(kw)  # by tag: a keyword lookup maps the keyword to a tag on every call
        source: Dataset | None = ds if ds.get_item(tag) is not None else None
        if source is None and kw in _FG_SOURCES:
            item = functional_group_item(ds, _FG_SOURCES[kw])
            source = item if item is not None and item.get_item(tag) is not None else None
        if source is None:
            continue
        try:
            elem = source[tag]
        except Exception:  # an unparseable value is left out
            continue
        view[elem.tag] = copy.deepcopy(elem) if private else elem
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        view.file_meta = meta
    implicit, little = ds.original_encoding
    if implicit is not None and little is not None:
        view.set_original_encoding(implicit, little, ds.original_character_set)
    elif meta is None or "TransferSyntaxUID" not in meta:
        view.set_original_encoding(False, True, ds.original_character_set)
    if "PhotometricInterpretation" not in view:
        view.PhotometricInterpretation = "MONOCHROME2"
    return view


def padding_mask(ds: Dataset, arr: np.ndarray, any_: bool = True) -> np.ndarray | None:
    """Pixels equal to Pixel Padding Value, or inside [value, range limit] when a limit is given.

    None when there is no padding value, or (``any_``) when no pixel is padding."""
    value = opt_int(value_of(ds, "PixelPaddingValue"))
    if value is None:
        return None
    limit = opt_int(value_of(ds, "PixelPaddingRangeLimit"))
    signed = (opt_int(ds.get("PixelRepresentation")) or 0) == 1
    bits = opt_int(ds.get("BitsAllocated")) or 16

    def as_pixel(v: int) -> int:
        # an SS value read as US (ambiguous VR) still means the signed number
        if signed and v >= 2 ** (bits - 1):
            return v - 2**bits
        return v

    value = as_pixel(value)
    if limit is None:
        mask = arr == value
    else:
        limit = as_pixel(limit)
        lo, hi = min(value, limit), max(value, limit)
        mask = (arr >= lo) & (arr <= hi)
    return mask if not any_ or mask.any() else None


def _window_ok(view: Dataset) -> bool:
    center = opt_float(value_of(view, "WindowCenter"))
    width = opt_float(value_of(view, "WindowWidth"))
    if center is None or width is None:
        return False
    function = str(view.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function == "LINEAR":
        return width >= 1
    return function in ("LINEAR_EXACT", "SIGMOID") and width > 0


def _voi_lut_item(view: Dataset) -> Dataset | None:
    seq = value_of(view, "VOILUTSequence")
    if not seq:
        return None
    item = cast(Dataset, seq[0])
    if item.get("LUTDescriptor") is None or item.get("LUTData") is None:
        return None
    descriptor = cast(Sequence[int], item.LUTDescriptor)
    if len(descriptor) != 3 or not (descriptor[2] == 8 or 10 <= descriptor[2] <= 16):
        return None
    return item


def _window_output_range(view: Dataset) -> tuple[float, float]:
    """The output range of :func:`pydicom.pixels.apply_windowing` (PS3.3 C.11.2.1.2)."""
    if view.get("ModalityLUTSequence"):
        depth = int(view.ModalityLUTSequence[0].LUTDescriptor[2])
        y_min, y_max = 0.0, float(2**depth - 1)
    else:
        bits = int(view.BitsStored)
        if int(view.get("PixelRepresentation", 0) or 0) == 0:
            y_min, y_max = 0.0, float(2**bits - 1)
        else:
            y_min, y_max = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
        slope, intercept = view.get("RescaleSlope"), view.get("RescaleIntercept")
        if slope is not None and intercept is not None:
            y_min = y_min * float(slope) + float(intercept)
            y_max = y_max * float(slope) + float(intercept)
    return y_min, y_max


_BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def is_color(ds: Dataset) -> bool:
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    return (opt_int(ds.get("SamplesPerPixel")) or 1) > 1 or photometric == "PALETTE COLOR"


def color_display(ds: Dataset, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decoded colour pixels -> (BT.601 luma in [0, 1] as float32, RGB as uint8).

    ``arr`` is what pydicom decodes: RGB (YBR_FULL / YBR_FULL_422 already converted by
    ``convert_color_space``, YBR_ICT / YBR_RCT by the JPEG 2000 codec), or PALETTE COLOR
    indices, which go through the palette (``apply_color_lut``). Full scale is 2**BitsStored - 1
    for RGB and the LUT's own depth for a palette, so 8-, 16- and 32-bit copies of an image look
    the same. ``ds`` is not modified.
    """
    arr = np.asarray(arr)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        full = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else 1.0
    else:
        if arr.ndim < 3 or arr.shape[-1] != 3:
            raise ValueError(f"{photometric} pixels of shape {arr.shape} are not RGB")
        rgb = arr
        if arr.dtype.kind == "f":
            full = 1.0
        else:
            bits = opt_int(ds.get("BitsStored")) or arr.dtype.itemsize * 8
            full = float(2 ** max(1, min(bits, arr.dtype.itemsize * 8)) - 1)
    unit = np.clip(rgb.astype(np.float32) / np.float32(full), 0.0, 1.0)
    luma = np.clip(unit @ _BT601, 0.0, 1.0).astype(np.float32)
    return luma, np.rint(unit * 255.0).astype(np.uint8)


def _unit_range(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi == lo:
        return np.zeros(values.shape, dtype=np.float64)
    out = (values.astype(np.float64) - lo) / (hi - lo)
    return cast(np.ndarray, np.clip(out, 0.0, 1.0))


def linear_window_fast(view: Dataset, arr: np.ndarray) -> np.ndarray | None:
    """The common case in float32, in place: rescale, then a LINEAR / LINEAR_EXACT window.

    Hand-written because pydicom's ``apply_modality_lut`` + ``apply_windowing`` compute in
    float64 with copies (about 3 ms for a 512x512 image, most of an ingest); this path gives
    the same values (the test compares them) in a fraction of that. Returns None when the
    image needs the general path (a Modality LUT or VOI LUT table, SIGMOID, no usable window).
    """
    if "ModalityLUTSequence" in view or _voi_lut_item(view) is not None or not _window_ok(view):
        return None
    function = str(view.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT"):
        return None
    center = cast(float, opt_float(value_of(view, "WindowCenter")))
    width = cast(float, opt_float(value_of(view, "WindowWidth")))
    slope = opt_float(value_of(view, "RescaleSlope"))
    intercept = opt_float(value_of(view, "RescaleIntercept"))
    x = arr.astype(np.float32)
    if slope is not None and intercept is not None and (slope != 1 or intercept != 0):
        x *= np.float32(slope)
        x += np.float32(intercept)
    return linear_window(x, center, width, exact=function == "LINEAR_EXACT")


def linear_window(x: np.ndarray, center: float, width: float, exact: bool = False) -> np.ndarray:
    """A VOI window to [0, 1], in place on the float32 array ``x`` (returned): PS3.3
    C.11.2.1.2: LINEAR maps c - 0.5 - (w-1)/2 .. c - 0.5 + (w-1)/2 onto the output range (a
    width of 1 is a threshold at c - 0.5); LINEAR_EXACT (``exact``) maps c - w/2 .. c + w/2.
    NaN (no value) becomes 0."""
    if not exact:
        x -= np.float32(center - 0.5)
        x *= np.float32(1.0 / (width - 1)) if width > 1 else np.float32(np.inf)
    else:
        x -= np.float32(center)
        x *= np.float32(1.0 / width)
    x += np.float32(0.5)
    with np.errstate(invalid="ignore"):  # 0 x inf at the threshold: NaN, then 0
        np.clip(x, 0.0, 1.0, out=x)
    return cast(np.ndarray, np.nan_to_num(x, copy=False, nan=0.0))


def display_pipeline(
    ds: Dataset,
    arr: np.ndarray,
    *,
    fast: bool = True,
    dtype: npt.DTypeLike = np.float32,
) -> tuple[np.ndarray, str]:
    """Stored values -> display values in [0, 1] and the VOI step used.

    ``voi_source`` is ``"voi_lut"``, ``"window"`` or ``"minmax"``. A colour image has no VOI
    stage: it gives its BT.601 luma (see :func:`color_display`) and ``"none"``. ``ds`` is not
    modified. ``fast=False`` forces pydicom's general path (tests compare the two). The values
    are computed in float32 and returned as ``dtype`` (float16 for the cache: the same values
    as casting the float32 result).
    """
    arr = np.asarray(arr)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if is_color(ds):
        return color_display(ds, arr)[0].astype(dtype, copy=False), "none"

    if fast:  # the fast path only reads the attributes: no private copy needed
        fast_view = pipeline_dataset(ds, private=False)
        domain = lut_domain(arr)
        if domain is not None:
            # Every step is a function of the stored value alone: run it once per possible
            # value (a table of at most 65,536 entries) and index the table with the image.
            values, index = domain
            table = linear_window_fast(fast_view, values)
            if table is not None:
                table = finish_display(ds, photometric, table, padding_mask(ds, values, any_=False))
                return np.take(table.astype(dtype, copy=False), index), "window"
        else:
            quick = linear_window_fast(fast_view, arr)
            if quick is not None:
                shown = finish_display(ds, photometric, quick, padding_mask(ds, arr))
                return shown.astype(dtype, copy=False), "window"
    mask = padding_mask(ds, arr)
    view = pipeline_dataset(ds)
    modality = apply_modality_lut(arr, view)

    source = "minmax"
    voi_item = _voi_lut_item(view)
    out: np.ndarray | None = None
    if voi_item is not None:
        descriptor = cast(Sequence[int], voi_item.LUTDescriptor)
        entries = descriptor[0] or 2**16
        first = descriptor[1]
        # VOI LUT inputs are integers; keep indices inside the table (pydicom's index dtype is
        # the LUT's, so out-of-range values must not reach it)
        ints = np.clip(np.rint(modality), first, first + entries - 1).astype(np.int64)
        voi = apply_voi_lut(ints, view, prefer_lut=True)
        out = _unit_range(voi, 0.0, float(2 ** descriptor[2] - 1))
        source = "voi_lut"
    elif _window_ok(view):
        try:
            y_min, y_max = _window_output_range(view)
            windowed = apply_voi_lut(modality, view, prefer_lut=True)
        except (AttributeError, TypeError, ValueError):
            pass  # unusable window attributes: fall back to min/max
        else:
            out = _unit_range(windowed, y_min, y_max)
            source = "window"
    if out is None:
        source = "minmax"
        modality = modality.astype(np.float64, copy=False)
        valid = np.isfinite(modality)
        if mask is not None:
            valid &= ~mask
        vals = modality[valid]
        lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 0.0)
        out = _unit_range(np.nan_to_num(modality, nan=lo), lo, hi)
    return finish_display(ds, photometric, out, mask).astype(dtype, copy=False), source


def lut_domain(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(every value the stored pixels can take, the index of each pixel into those values),
    when a table over the values is much smaller than the image; otherwise None.

    8-bit data: 256 values. Unsigned 16-bit: 0..max (4,096 for 12-bit data). Signed 16-bit:
    all 65,536, indexed through the unsigned view of the same bits.
    """
    if arr.dtype.kind not in "ui" or arr.dtype.itemsize > 2:
        return None
    unsigned = np.dtype(f"u{arr.dtype.itemsize}").newbyteorder("=")
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        size = int(arr.max(initial=0)) + 1
    else:
        size = 2 ** (8 * arr.dtype.itemsize)
    if size * 4 > arr.size:
        return None
    values = np.arange(size, dtype=unsigned)
    if arr.dtype.kind == "i":
        return values.view(arr.dtype), arr.view(unsigned)
    return values, arr


def finish_display(
    ds: Dataset, photometric: str, out: np.ndarray, mask: np.ndarray | None
) -> np.ndarray:
    """Presentation inversion and the padding mask, the last steps of the display pipeline."""
    # Presentation LUT (PS3.3 C.11.6.1.2): INVERSE means "P-Value = maximum - output", the
    # minimum shown white. Image IODs say INVERSE shall be used with MONOCHROME1 and IDENTITY
    # with MONOCHROME2 (General Image and DX Image modules, PS3.3 C.7.6.1, C.8.11.2): for
    # MONOCHROME1 the shape restates the inversion that the photometric interpretation already
    # implies, so it is applied once, never twice; on MONOCHROME2, INVERSE inverts the image.
    shape = (text_of(ds, "PresentationLUTShape") or "").upper()
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        out = 1.0 - out
    if mask is not None:
        out = np.where(mask, 0.0, out)
    return out.astype(np.float32, copy=False)
