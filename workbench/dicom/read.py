"""DICOM reading: header facts, pixel decoding and the display pipeline.

Everything that can go wrong with a file on disk is reported as an :class:`UnreadableDicomError`
whose ``reason`` is one of :data:`QUARANTINE_REASONS`, so that ingest can quarantine the file
with a stable, countable reason instead of crashing.

The display pipeline follows the order of the DICOM standard (PS3.3 C.11, PS3.4 N.2.1):

1. Pixel Padding Value (and Pixel Padding Range Limit) mask, on the stored values;
2. Modality LUT or Rescale Slope/Intercept (:func:`pydicom.pixels.apply_modality_lut`);
3. VOI LUT Sequence or Window Center/Width (:func:`pydicom.pixels.apply_voi_lut`, the VOI LUT
   Sequence preferred when both are present); when neither exists, the min/max of the
   non-padding pixels;
4. linear map to [0, 1];
5. MONOCHROME1 inversion (``1 - x``).

Padding pixels are set to 0 (black) at the very end, after the inversion.

Multi-frame "enhanced" objects keep rescale and window values in functional groups; when the
top level lacks them, those of the Shared (else the first Per-frame) Functional Groups are used.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

__all__ = [
    "QUARANTINE_REASONS",
    "REQUIRED_ATTRIBUTES",
    "DecodedImage",
    "HeaderFacts",
    "UnreadableDicomError",
    "display_pipeline",
    "pixel_hash",
    "read_header",
    "read_image",
]

QUARANTINE_REASONS: tuple[str, ...] = (
    "not_dicom",
    "missing_attribute",
    "no_pixel_data",
    "truncated_pixel_data",
    "unsupported_transfer_syntax",
    "too_large",
    "decode_error",
)

#: Attributes without which a file cannot be catalogued (checked in this order).
REQUIRED_ATTRIBUTES: tuple[str, ...] = (
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "SOPClassUID",
    "Rows",
    "Columns",
    "PhotometricInterpretation",
    "Modality",
)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_FORCE_REQUIRED = ("SOPClassUID", "Rows", "Columns", "PixelData")


class UnreadableDicomError(Exception):
    """A file that cannot be used; ``reason`` is one of :data:`QUARANTINE_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in QUARANTINE_REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}")
        if len(detail) > 500:
            detail = detail[:500] + "..."
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class HeaderFacts:
    """What the catalogue needs from a header. ``patient_id`` is raw identity: pseudonymise it."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    patient_id: str
    patient_sex: str | None
    patient_age_years: int | None
    study_date: str | None
    modality: str
    manufacturer: str | None
    institution_name: str | None
    station_name: str | None
    view_position: str | None
    body_part_examined: str | None
    rows: int
    columns: int
    number_of_frames: int
    photometric_interpretation: str
    bits_stored: int
    pixel_representation: int
    transfer_syntax_uid: str
    pixel_spacing: tuple[float, float] | None
    window_center: float | None
    window_width: float | None
    image_position_patient: tuple[float, float, float] | None
    image_orientation_patient: tuple[float, ...] | None
    instance_number: int | None


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: display-pipeline output in [0, 1] plus a hash of the stored values."""

    facts: HeaderFacts
    pixels: np.ndarray
    pixel_hash: str
    voi_source: str


# --------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Give a dataset read without file meta a Transfer Syntax UID matching how it was parsed."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif little is False:
        meta.TransferSyntaxUID = ExplicitVRBigEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _dcmread(path: Path, *, stop_before_pixels: bool, defer_size: int | None = None) -> Dataset:
    """``dcmread`` with the quarantine rules for files that are not DICOM.

    A file without the 128-byte preamble and "DICM" is accepted only if it still parses (forced)
    and has SOPClassUID, Rows, Columns and PixelData; otherwise it is ``not_dicom``.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, defer_size=defer_size)
    except InvalidDicomError:
        pass
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:  # a "DICM" file whose header cannot be parsed
        raise UnreadableDicomError(
            "not_dicom", f"unparseable DICOM header ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        # full parse (PixelData must be seen), but large values stay on disk until used
        ds = pydicom.dcmread(path, force=True, defer_size=defer_size or 4096)
    except Exception as exc:
        raise UnreadableDicomError(
            "not_dicom", f"no DICOM preamble and not parseable ({type(exc).__name__})"
        ) from exc
    missing = [k for k in _FORCE_REQUIRED if k not in ds]
    if missing:
        raise UnreadableDicomError(
            "not_dicom", f"no DICOM preamble and no {', '.join(missing)} when forced"
        )
    _ensure_transfer_syntax(ds)
    if stop_before_pixels:
        for kw in _PIXEL_KEYWORDS:
            if kw in ds:
                del ds[kw]
    return ds


# --------------------------------------------------------------------------------------------
# Header facts
# --------------------------------------------------------------------------------------------


def _present(ds: Dataset, keyword: str) -> bool:
    try:
        value = ds.get(keyword)
    except Exception:
        return False
    return value is not None and value != ""


def _check_required(ds: Dataset) -> None:
    for kw in REQUIRED_ATTRIBUTES:
        if not _present(ds, kw):
            raise UnreadableDicomError("missing_attribute", kw)


def _get(ds: Dataset, keyword: str) -> Any:
    """``ds.get`` for optional attributes: a malformed value reads as absent (None)."""
    try:
        return ds.get(keyword)
    except Exception:
        return None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = _get(ds, keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _first(value: Any) -> Any:
    if isinstance(value, (list, tuple, MultiValue)):
        return value[0] if len(value) else None
    return value


def _fg_item(ds: Dataset, sequence: str) -> Dataset | None:
    """The first item of ``sequence`` in the Shared, else first Per-frame, Functional Groups."""
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        fgs = _get(ds, group)
        if not fgs:
            continue
        inner = _get(fgs[0], sequence)
        if inner:
            return cast(Dataset, inner[0])
    return None


def _lookup(ds: Dataset, keyword: str, fg_sequence: str | None = None) -> Any:
    value = _get(ds, keyword)
    if (value is None or value == "") and fg_sequence is not None:
        item = _fg_item(ds, fg_sequence)
        if item is not None:
            value = _get(item, keyword)
    return None if value == "" else value


def _float_tuple(value: Any, n: int | None = None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        seq = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        out = tuple(float(v) for v in seq)
    except (TypeError, ValueError):
        return None
    if not out or (n is not None and len(out) != n) or not all(math.isfinite(v) for v in out):
        return None
    return out


def _opt_float(value: Any) -> float | None:
    value = _first(value)
    try:
        out = float(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None
    return out if out is not None and math.isfinite(out) else None


def _opt_int(value: Any) -> int | None:
    value = _first(value)
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


_AGE = re.compile(r"^\s*(\d{1,3})\s*([YMWD]?)\s*$", re.IGNORECASE)


def _age_years(value: Any) -> int | None:
    if value is None:
        return None
    match = _AGE.match(str(value))
    if not match:
        return None
    unit = match.group(2).upper() or "Y"
    return int(match.group(1)) if unit == "Y" else 0


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    tsuid = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsuid:
        return str(tsuid)
    implicit, little = ds.original_encoding
    if implicit:
        return str(ImplicitVRLittleEndian)
    return str(ExplicitVRBigEndian if little is False else ExplicitVRLittleEndian)


def _required_int(ds: Dataset, keyword: str) -> int:
    try:
        value = int(ds.get(keyword))
    except (TypeError, ValueError) as exc:
        raise UnreadableDicomError("missing_attribute", f"{keyword} (not an integer)") from exc
    if value <= 0:
        raise UnreadableDicomError("missing_attribute", f"{keyword} (not positive)")
    return value


def _facts(ds: Dataset) -> HeaderFacts:
    _check_required(ds)
    rows, columns = _required_int(ds, "Rows"), _required_int(ds, "Columns")
    sex = _text(ds, "PatientSex")
    sex = sex.upper() if sex else None
    study_date = _text(ds, "StudyDate")
    if study_date is not None and not re.fullmatch(r"\d{8}", study_date):
        study_date = None
    spacing = _float_tuple(_lookup(ds, "PixelSpacing", "PixelMeasuresSequence"), 2)
    if spacing is None:
        spacing = _float_tuple(_lookup(ds, "ImagerPixelSpacing"), 2)
    ipp = _float_tuple(_lookup(ds, "ImagePositionPatient", "PlanePositionSequence"), 3)
    iop = _float_tuple(_lookup(ds, "ImageOrientationPatient", "PlaneOrientationSequence"))
    bits_stored = _opt_int(_lookup(ds, "BitsStored"))
    if bits_stored is None:
        bits_stored = _opt_int(_lookup(ds, "BitsAllocated")) or 0
    return HeaderFacts(
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        patient_id=_text(ds, "PatientID") or "",
        patient_sex=sex if sex in ("M", "F", "O") else None,
        patient_age_years=_age_years(_text(ds, "PatientAge")),
        study_date=study_date,
        modality=str(ds.Modality).strip(),
        manufacturer=_text(ds, "Manufacturer"),
        institution_name=_text(ds, "InstitutionName"),
        station_name=_text(ds, "StationName"),
        view_position=_text(ds, "ViewPosition"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        rows=rows,
        columns=columns,
        number_of_frames=max(1, _opt_int(_lookup(ds, "NumberOfFrames")) or 1),
        photometric_interpretation=str(ds.PhotometricInterpretation).strip(),
        bits_stored=bits_stored,
        pixel_representation=_opt_int(_lookup(ds, "PixelRepresentation")) or 0,
        transfer_syntax_uid=_transfer_syntax(ds),
        pixel_spacing=cast("tuple[float, float] | None", spacing),
        window_center=_opt_float(_lookup(ds, "WindowCenter", "FrameVOILUTSequence")),
        window_width=_opt_float(_lookup(ds, "WindowWidth", "FrameVOILUTSequence")),
        image_position_patient=cast("tuple[float, float, float] | None", ipp),
        image_orientation_patient=iop,
        instance_number=_opt_int(_lookup(ds, "InstanceNumber")),
    )


def read_header(path: Path) -> HeaderFacts:
    """Header facts without reading pixel data.

    Raises :class:`UnreadableDicomError` with ``not_dicom`` or ``missing_attribute``.
    """
    ds = _dcmread(Path(path), stop_before_pixels=True)
    return _facts(ds)


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def _canonical_dtype(arr: np.ndarray, ds: Dataset) -> np.dtype[Any]:
    """Little-endian dtype set by the header, not the decoder, so hashes agree across codecs."""
    if arr.dtype.kind == "f":
        return np.dtype(f"<f{arr.dtype.itemsize}")
    if arr.dtype.kind == "b":
        return np.dtype("<u1")
    bits = _opt_int(ds.get("BitsAllocated")) or arr.dtype.itemsize * 8
    size = 1 if bits <= 8 else 2 if bits <= 16 else 4 if bits <= 32 else 8
    signed = (_opt_int(ds.get("PixelRepresentation")) or 0) == 1
    # PALETTE COLOR indices and YBR->RGB converted colour are unsigned whatever the header says
    if (
        arr.dtype.kind == "u"
        and signed
        and str(ds.get("PhotometricInterpretation", ""))
        in (
            "PALETTE COLOR",
            "RGB",
            "YBR_FULL",
            "YBR_FULL_422",
        )
    ):
        signed = False
    return np.dtype(f"<{'i' if signed else 'u'}{size}")


def pixel_hash(arr: np.ndarray, ds: Dataset) -> str:
    """sha256 over the stored pixel values as a canonical little-endian dtype, plus the shape."""
    dtype = _canonical_dtype(arr, ds)
    canon = np.ascontiguousarray(arr, dtype=dtype)
    digest = hashlib.sha256()
    digest.update(f"{dtype.str}|{','.join(str(n) for n in canon.shape)}|".encode())
    digest.update(canon.data)
    return digest.hexdigest()


def _declared_bytes(ds: Dataset, facts: HeaderFacts) -> int:
    spp = _opt_int(ds.get("SamplesPerPixel")) or 1
    bits = _opt_int(ds.get("BitsAllocated")) or 8
    return facts.rows * facts.columns * facts.number_of_frames * spp * math.ceil(bits / 8)


def _reread_header_or_truncated(path: Path, detail: str) -> UnreadableDicomError:
    """The full read lost something; blame the header if it is broken, else the pixel data."""
    try:
        read_header(path)
    except UnreadableDicomError as exc:
        return exc
    return UnreadableDicomError("truncated_pixel_data", detail)


def read_image(path: Path, max_pixel_bytes: int = 512 * 2**20) -> DecodedImage:
    """Read, decode and run the display pipeline on one file.

    The declared pixel size is checked before anything is decoded; pixel data values larger than
    ``max_pixel_bytes`` are not even loaded into memory.
    """
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # raises not_dicom itself; a cut file mostly reads "fine" with an end-of-file warning
        ds = _dcmread(path, stop_before_pixels=False, defer_size=max_pixel_bytes + 1)
    hit_eof = any("End of file" in str(w.message) for w in caught)

    try:
        facts = _facts(ds)
    except UnreadableDicomError as exc:
        if hit_eof:
            raise _reread_header_or_truncated(path, "file ends inside a data element") from exc
        raise
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        if hit_eof:
            raise UnreadableDicomError("truncated_pixel_data", "file ends inside the pixel data")
        raise UnreadableDicomError("no_pixel_data", "no PixelData element")
    if "BitsAllocated" not in ds:
        raise UnreadableDicomError("missing_attribute", "BitsAllocated")

    declared = _declared_bytes(ds, facts)
    if declared > max_pixel_bytes:
        raise UnreadableDicomError(
            "too_large", f"{declared} bytes declared > limit of {max_pixel_bytes}"
        )

    tsuid = UID(facts.transfer_syntax_uid)
    try:
        decoder = get_decoder(tsuid)
    except NotImplementedError as exc:
        raise UnreadableDicomError(
            "unsupported_transfer_syntax", f"{tsuid} ({tsuid.name}): no decoder exists"
        ) from exc
    if not decoder.is_available:
        raise UnreadableDicomError(
            "unsupported_transfer_syntax", f"{tsuid} ({tsuid.name}): no codec installed"
        )

    if "PixelData" in ds and not tsuid.is_encapsulated:
        try:
            expected = int(get_expected_length(ds, "bytes"))
            actual = len(ds.PixelData)
        except Exception as exc:
            raise UnreadableDicomError("decode_error", f"{type(exc).__name__}: {exc}") from exc
        if actual < expected:
            raise UnreadableDicomError(
                "truncated_pixel_data", f"{actual} bytes of pixel data, {expected} expected"
            )

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = ds.pixel_array
    except (EOFError, OSError) as exc:
        raise UnreadableDicomError("truncated_pixel_data", f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        message = str(exc)
        if "less than expected" in message:
            raise UnreadableDicomError("truncated_pixel_data", message) from exc
        if ("missing" in message and "dependencies" in message) or "does not support" in message:
            raise UnreadableDicomError("unsupported_transfer_syntax", message) from exc
        raise UnreadableDicomError("decode_error", f"{type(exc).__name__}: {message}") from exc

    try:
        display, source = display_pipeline(ds, stored)
    except Exception as exc:
        raise UnreadableDicomError(
            "decode_error", f"display pipeline: {type(exc).__name__}: {exc}"
        ) from exc
    return DecodedImage(
        facts=facts,
        pixels=display,
        pixel_hash=pixel_hash(stored, ds),
        voi_source=source,
    )


# --------------------------------------------------------------------------------------------
# Display pipeline
# --------------------------------------------------------------------------------------------

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


def _pipeline_dataset(ds: Dataset) -> Dataset:
    """A private copy of what the LUT functions read (they write to it), with functional groups
    merged in."""
    view = Dataset()
    for kw in _PIPELINE_KEYWORDS:
        source: Dataset | None = ds if kw in ds else None
        if source is None and kw in _FG_SOURCES:
            item = _fg_item(ds, _FG_SOURCES[kw])
            source = item if item is not None and kw in item else None
        if source is None:
            continue
        try:
            elem = source[kw]
        except Exception:  # an unparseable value is left out
            continue
        view[elem.tag] = copy.deepcopy(elem)
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


def _padding_mask(ds: Dataset, arr: np.ndarray) -> np.ndarray | None:
    """Pixels equal to Pixel Padding Value, or inside [value, range limit] when a limit is given."""
    value = _opt_int(_get(ds, "PixelPaddingValue"))
    if value is None:
        return None
    limit = _opt_int(_get(ds, "PixelPaddingRangeLimit"))
    signed = (_opt_int(ds.get("PixelRepresentation")) or 0) == 1
    bits = _opt_int(ds.get("BitsAllocated")) or 16

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
    return mask if mask.any() else None


def _window_ok(view: Dataset) -> bool:
    center = _opt_float(_get(view, "WindowCenter"))
    width = _opt_float(_get(view, "WindowWidth"))
    if center is None or width is None:
        return False
    function = str(view.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function == "LINEAR":
        return width >= 1
    return function in ("LINEAR_EXACT", "SIGMOID") and width > 0


def _voi_lut_item(view: Dataset) -> Dataset | None:
    seq = _get(view, "VOILUTSequence")
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


def _to_gray(ds: Dataset, arr: np.ndarray) -> np.ndarray:
    """Colour images (RGB after pydicom's YBR conversion, or palette) as luminance."""
    if str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.shape[-1] != 3:
        return arr.astype(np.float64)
    weights = np.array([0.299, 0.587, 0.114])
    return cast(np.ndarray, arr.astype(np.float64) @ weights)


def _unit_range(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi == lo:
        return np.zeros(values.shape, dtype=np.float64)
    out = (values.astype(np.float64) - lo) / (hi - lo)
    return cast(np.ndarray, np.clip(out, 0.0, 1.0))


def display_pipeline(ds: Dataset, arr: np.ndarray) -> tuple[np.ndarray, str]:
    """Stored values -> display values in [0, 1] (float32) and the VOI step used.

    ``voi_source`` is ``"voi_lut"``, ``"window"`` or ``"minmax"``. Colour images are reduced to
    luminance and scaled by their min/max. ``ds`` is not modified.
    """
    arr = np.asarray(arr)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    samples = _opt_int(ds.get("SamplesPerPixel")) or 1
    if samples > 1 or photometric == "PALETTE COLOR":
        gray = _to_gray(ds, arr)
        vals = gray[np.isfinite(gray)]
        lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 0.0)
        colour = _unit_range(np.nan_to_num(gray, nan=lo), lo, hi)
        return colour.astype(np.float32), "minmax"

    mask = _padding_mask(ds, arr)
    view = _pipeline_dataset(ds)
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

    if photometric == "MONOCHROME1":
        out = 1.0 - out
    if mask is not None:
        out = np.where(mask, 0.0, out)
    return out.astype(np.float32), source
