"""DICOM reading: header facts, pixel decoding and the display pipeline.

Everything that can go wrong with a file's contents is reported as an
:class:`UnreadableDicomError` whose ``reason`` is one of :data:`QUARANTINE_REASONS`, so that
ingest can quarantine the file with a stable, countable reason instead of crashing. Only an
operating-system error about the path itself (no such file, no permission) is left as the
:class:`OSError` it is.

Pixel data: every transfer syntax that pydicom decodes with the installed plugins (native little
and big endian, deflate, RLE, JPEG, JPEG-LS, JPEG 2000, HTJ2K). A syntax without a codec is
``unsupported_transfer_syntax`` and the detail names the plugin that would decode it.

Reading is bounded by ``max_pixel_bytes``: the declared pixel size is checked before anything is
decoded; no read asks the file for more bytes than it holds (a corrupt element length cannot
make a huge buffer); a deflated data set is inflated only up to the budget; and a compressed
frame whose own header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ) declares a larger image than the
DICOM header is refused before a codec allocates for it.

The grayscale display pipeline follows the order of the DICOM standard (PS3.3 C.11, PS3.4 N.2.1):

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
import functools
import hashlib
import io
import math
import os
import re
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragments
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    get_decoder,
    pixel_array,
)
from pydicom.pixels.utils import get_expected_length
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from workbench.config import DEFAULT_MAX_PIXEL_MB
from workbench.errors import WorkbenchError

__all__ = [
    "DEFAULT_MAX_PIXEL_BYTES",
    "QUARANTINE_REASONS",
    "REQUIRED_ATTRIBUTES",
    "DecodedImage",
    "FileWindow",
    "FrameSelection",
    "HeaderFacts",
    "UnreadableDicomError",
    "check_series_geometry",
    "color_display",
    "display_pipeline",
    "hounsfield_values",
    "linear_window",
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
    # raised by the catalog, not by this module: a file that cannot be opened at all
    "not_readable",
    # also raised by the catalog: a series whose slices do not make one volume
    # (see check_series_geometry), and an image with burned-in annotation (possible PHI)
    "inconsistent_series",
    "burned_in_annotation",
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

#: The default ceiling on the declared pixel data of one file.
DEFAULT_MAX_PIXEL_BYTES = DEFAULT_MAX_PIXEL_MB * 2**20

#: ``read_image(frames=...)``: the whole (multi-frame) image, its first frame, or frame ``i``.
FrameSelection = Literal["volume", "first"] | int

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# What a header may add to a file beyond its pixel data (overlays, ICC profiles, private blobs).
_HEADER_ALLOWANCE = 64 * 2**20
# Header-only reads leave values larger than this on disk until something asks for them.
_HEADER_DEFER = 2**20
# Files up to this size are read into memory once (parse and file hash from the same bytes);
# larger ones are parsed from disk, their big values loaded only when used.
_IN_MEMORY_BYTES = 64 * 2**20
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UNDEFINED_LENGTH = 0xFFFFFFFF


class UnreadableDicomError(WorkbenchError):
    """A file that cannot be used; ``reason`` is one of :data:`QUARANTINE_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in QUARANTINE_REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}")
        if len(detail) > 500:
            detail = detail[:500] + "..."
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[UnreadableDicomError], tuple[str, str]]:
        # picklable across a process pool (the default would call cls("reason: detail"))
        return (type(self), (self.reason, self.detail))


class _FrameIndexError(IndexError):
    """``read_image(frames=i)`` asked for a frame the file does not have (a caller's mistake)."""


@dataclass(frozen=True)
class FileWindow:
    """One of a file's own VOI windows (Window Center / Width, PS3.3 C.11.2.1.2), in the units
    of the modality LUT's output (Hounsfield units for CT), with its Window Center & Width
    Explanation (e.g. "LUNG") when the file gives one."""

    center: float
    width: float
    explanation: str | None = None


@dataclass(frozen=True)
class HeaderFacts:
    """What the catalogue needs from a header. ``patient_id`` is raw identity: pseudonymise it.

    ``burned_in_annotation`` is the raw Burned In Annotation value ("YES", "NO") or None when
    the header does not say. ``window_center`` / ``window_width`` are the first window (the one
    the display pipeline applies); ``windows`` are all of them, in the file's order.
    """

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
    burned_in_annotation: str | None = None
    samples_per_pixel: int = 1
    slice_thickness: float | None = None
    series_number: int | None = None
    frame_of_reference_uid: str | None = None
    windows: tuple[FileWindow, ...] = ()


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: what the model sees, what a person sees, and a hash of the stored values.

    ``pixels`` is float32 in [0, 1], shaped ``(rows, columns)`` for one frame or ``(frames,
    rows, columns)`` for a multi-frame volume: the grayscale display pipeline's output, or the
    BT.601 luma of a colour image. ``rgb`` is None for grayscale; for colour it is the image as
    a person sees it, uint8 with a trailing axis of 3. ``voi_source`` is ``"voi_lut"``,
    ``"window"`` or ``"minmax"`` for grayscale and ``"none"`` for colour (no VOI stage).
    ``hounsfield`` (only when asked for, see :func:`read_image`): a CT image's modality values
    in Hounsfield units, float16, the same shape as ``pixels`` (see :func:`hounsfield_values`).
    """

    facts: HeaderFacts
    pixels: np.ndarray
    pixel_hash: str
    voi_source: str
    rgb: np.ndarray | None = None
    # sha256 of the whole file, when it was small enough to be read into memory in one piece
    file_sha256: str | None = None
    hounsfield: np.ndarray | None = None

    @property
    def color(self) -> bool:
        return self.rgb is not None


# --------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------


class _CappedFile:
    """A read-only file whose ``read(n)`` never asks for more than what is left of the file.

    pydicom reads a value with ``fp.read(length)``; a buffered file allocates ``length`` bytes
    before it finds out that the file is shorter, so a corrupt length (0xFFFFFFF0) would cost
    4 GiB. pydicom re-opens a deferred value with ``type(fp)(name, "rb")``, so that read goes
    through this class too.
    """

    def __init__(self, name: str | os.PathLike[str], mode: str = "rb") -> None:
        if mode != "rb":
            raise ValueError("read-only")
        self._fh = open(name, "rb")  # noqa: SIM115 - closed by close() / the context manager
        self.name = os.fspath(name)
        self._size = os.fstat(self._fh.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self._fh.read()
        return self._fh.read(max(0, min(size, self._size - self._fh.tell())))

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def close(self) -> None:
        self._fh.close()

    @property
    def closed(self) -> bool:
        return self._fh.closed

    def __enter__(self) -> _CappedFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_DEFLATED = str(DeflatedExplicitVRLittleEndian).encode()


def _check_inflated_size(path: Path, budget: int, data: bytes | None = None) -> None:
    """Refuse a deflated data set that inflates past ``budget`` bytes, before pydicom inflates
    all of it in one ``zlib.decompress`` call (a "zip bomb" would take all memory)."""
    with _open(path, data) as fp:
        if _DEFLATED not in fp.read(16384):
            return
        fp.seek(0)
        try:
            read_preamble(cast(Any, fp), False)
            meta = _read_file_meta_info(cast(Any, fp))
        except Exception:
            return  # the real read says what is wrong
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        try:
            while not inflater.eof:
                data = fp.read(2**20)
                if not data:
                    return
                while data and not inflater.eof:
                    total += len(inflater.decompress(data, 2**22))
                    if total > budget:
                        raise UnreadableDicomError(
                            "too_large", f"deflated data set inflates past {budget} bytes"
                        )
                    data = inflater.unconsumed_tail
        except zlib.error:
            return  # a corrupt stream: the real read reports it


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


def _pixel_data_length(ds: Dataset) -> int | None:
    """The length of the PixelData value as read (undefined length for encapsulated), or None."""
    try:
        elem = ds.get_item("PixelData")
    except Exception:
        return None
    if elem is None:
        return None
    if isinstance(elem, RawDataElement):
        return int(elem.length)
    return len(elem.value) if elem.value is not None else 0


def _forced_problems(ds: Dataset) -> list[str]:
    """Why a dataset read without the "DICM" preamble is not an image we accept."""
    problems = []
    sop_class = _text(ds, "SOPClassUID")
    if sop_class is None or len(sop_class) > 64 or not _UID_RE.match(sop_class):
        problems.append("SOPClassUID")
    for keyword in ("Rows", "Columns"):
        value = _opt_int(_get(ds, keyword))
        if value is None or not 0 < value < 2**16:
            problems.append(keyword)
    if not _pixel_data_length(ds):
        problems.append("PixelData")
    return problems


def _open(path: Path, data: bytes | None) -> _CappedFile | io.BytesIO:
    # A BytesIO never allocates more than what is left of its buffer either.
    return io.BytesIO(data) if data is not None else _CappedFile(path)


def _dcmread(
    path: Path,
    *,
    stop_before_pixels: bool,
    defer_size: int | None,
    inflate_budget: int,
    data: bytes | None = None,
) -> Dataset:
    """``dcmread`` with the quarantine rules for files that are not DICOM.

    A file without the 128-byte preamble and "DICM" is accepted only if it still parses (forced)
    and has a valid SOPClassUID, positive Rows and Columns, and non-empty PixelData; otherwise
    it is ``not_dicom``. ``data``: the file's bytes, when the caller has read them already
    (nothing is deferred then: it is all in memory).
    """
    if data is not None:
        defer_size = None
    _check_inflated_size(path, inflate_budget, data)
    fp = _open(path, data)  # an OSError here (no such file, no permission) is the caller's
    try:
        with fp:
            return pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels, defer_size=defer_size)
    except InvalidDicomError:
        pass
    except Exception as exc:  # a "DICM" file whose header cannot be parsed
        raise UnreadableDicomError(
            "not_dicom", f"unparseable DICOM header ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        # full parse (PixelData must be seen), but large values stay on disk until used
        with _open(path, data) as fp:
            ds = pydicom.dcmread(
                fp, force=True, defer_size=None if data is not None else (defer_size or 4096)
            )
        problems = _forced_problems(ds)
    except Exception as exc:
        raise UnreadableDicomError(
            "not_dicom", f"no DICOM preamble and not parseable ({type(exc).__name__})"
        ) from exc
    if problems:
        raise UnreadableDicomError(
            "not_dicom", f"no DICOM preamble and no valid {', '.join(problems)} when forced"
        )
    _ensure_transfer_syntax(ds)
    if stop_before_pixels:
        for kw in _PIXEL_KEYWORDS:
            if kw in ds:
                del ds[kw]
    return ds


def _hit_eof(caught: Sequence[warnings.WarningMessage]) -> bool:
    return any("End of file" in str(w.message) for w in caught)


# --------------------------------------------------------------------------------------------
# Header facts
# --------------------------------------------------------------------------------------------


@functools.cache
def _tag(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword} is not a DICOM keyword")
    return BaseTag(tag)


def _present(ds: Dataset, keyword: str) -> bool:
    value = _get(ds, keyword)
    return value is not None and value != ""


def _get(ds: Dataset, keyword: str) -> Any:
    """``ds.get(keyword)`` for optional attributes: a malformed value reads as absent (None).

    Looked up by tag rather than through ``Dataset.__getattr__`` (which maps the keyword to a
    tag on every call): header facts read some forty attributes per file, and that mapping
    was a fifth of an ingest's time.
    """
    try:
        tag = _tag(keyword)
        elem = ds.get_item(tag)
        if elem is None:
            return None
        if isinstance(elem, RawDataElement) and elem.VR != "SQ":
            return _converted(ds, elem)
        return ds[tag].value
    except Exception:
        return None


#: Converted values of raw elements by (tag, VR, bytes, encoding, character set): most header
#: values repeat from file to file (sizes, bit depths, windows, the scanner's names), and
#: pydicom's conversion of a raw element was half of the header's cost in an ingest. Capped.
_CONVERTED: dict[tuple[Any, ...], Any] = {}
_CONVERTED_MAX = 8192
_SPECIFIC_CHARACTER_SET = BaseTag(0x00080005)


@functools.cache
def _ambiguous_vr(tag: int) -> bool:
    """Whether the element's VR depends on other elements (US or SS, OB or OW...): its value
    then depends on more than its own bytes, and it is never taken from the cache."""
    try:
        return " or " in dictionary_VR(tag)
    except KeyError:  # a private or unknown tag: converted from its own bytes
        return False


def _converted(ds: Dataset, raw: RawDataElement) -> Any:
    """``ds[raw.tag].value``, from :data:`_CONVERTED` when the same raw value was seen before.

    The cached values are shared between datasets and must be treated as read-only (every
    caller here only reads them). Long values (over 64 bytes) are not cached.
    """
    value = raw.value
    if value is None or len(value) > 64 or _ambiguous_vr(int(raw.tag)):
        return ds[raw.tag].value
    charset = ds.get_item(_SPECIFIC_CHARACTER_SET)
    key = (
        int(raw.tag),
        raw.VR,
        value,
        raw.is_little_endian,
        raw.is_implicit_VR,
        charset.value if isinstance(charset, RawDataElement) else getattr(charset, "value", None),
    )
    try:
        return _CONVERTED[key]
    except KeyError:
        hashable = True
    except TypeError:  # a character set already converted to a (multi-valued) list
        hashable = False
    converted = ds[raw.tag].value
    if hashable and len(_CONVERTED) < _CONVERTED_MAX and not isinstance(converted, Dataset):
        _CONVERTED[key] = converted
    return converted


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
    except (TypeError, ValueError, OverflowError):
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
    except (TypeError, ValueError, OverflowError) as exc:
        raise UnreadableDicomError("missing_attribute", f"{keyword} (not an integer)") from exc
    if value <= 0:
        raise UnreadableDicomError("missing_attribute", f"{keyword} (not positive)")
    return value


def _number_of_frames(ds: Dataset) -> int:
    """Number of Frames, 1 when absent (or 0, as pydicom reads it); a value that is not a
    number makes the pixel data's size unknown, so it is a missing attribute."""
    value = _first(_lookup(ds, "NumberOfFrames"))
    if value is None:
        return 1
    try:
        frames = int(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UnreadableDicomError(
            "missing_attribute", f"NumberOfFrames (not an integer: {str(value)[:20]!r})"
        ) from exc
    if frames < 0:
        raise UnreadableDicomError("missing_attribute", "NumberOfFrames (negative)")
    return max(1, frames)


_IMAGE_PIXEL_KEYWORDS = (
    "Rows",
    "Columns",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "BitsAllocated",
)


def _not_an_image(ds: Dataset, truncated: bool) -> bool:
    """An object with no Image Pixel attribute at all (SR, RT plan, waveform...) that goes on
    past where they would be (tags are ascending), so that it was not merely cut short."""
    if truncated or any(_present(ds, kw) for kw in _IMAGE_PIXEL_KEYWORDS):
        return False
    if any(kw in ds for kw in _PIXEL_KEYWORDS):
        return False
    if "Image" in UID(str(ds.SOPClassUID)).name:  # "CT Image Storage" is one, however damaged
        return False
    return max(ds.keys(), default=0) > 0x00280011


def _check_required(ds: Dataset, truncated: bool) -> None:
    for kw in REQUIRED_ATTRIBUTES:
        if _present(ds, kw):
            continue
        if kw == "Rows" and _not_an_image(ds, truncated):
            sop_class = UID(str(ds.SOPClassUID))
            raise UnreadableDicomError(
                "no_pixel_data", f"not an image: {sop_class.name or sop_class} has no Rows"
            )
        raise UnreadableDicomError("missing_attribute", kw)


def _facts(ds: Dataset, truncated: bool = False) -> HeaderFacts:
    _check_required(ds, truncated)
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
        number_of_frames=_number_of_frames(ds),
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
        burned_in_annotation=_text(ds, "BurnedInAnnotation"),
        samples_per_pixel=max(1, _opt_int(_lookup(ds, "SamplesPerPixel")) or 1),
        slice_thickness=_opt_float(_lookup(ds, "SliceThickness", "PixelMeasuresSequence")),
        series_number=_opt_int(_lookup(ds, "SeriesNumber")),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        windows=_file_windows(ds),
    )


#: At most this many of a file's windows are kept (a header may list dozens).
MAX_FILE_WINDOWS = 16


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _file_windows(ds: Dataset) -> tuple[FileWindow, ...]:
    """Every Window Center / Width pair of the header (multi-valued: the n-th center goes with
    the n-th width and the n-th Window Center & Width Explanation), from the top level, else
    the Frame VOI LUT of the Shared (else first Per-frame) Functional Groups. A pair that is not
    a finite number with a positive width is left out."""
    source: Dataset | None = ds
    if not _present(ds, "WindowCenter"):
        source = _fg_item(ds, "FrameVOILUTSequence")
    if source is None:
        return ()
    centers = _values(_get(source, "WindowCenter"))
    widths = _values(_get(source, "WindowWidth"))
    explanations = _values(_get(source, "WindowCenterWidthExplanation"))
    out: list[FileWindow] = []
    for n, (c, w) in enumerate(zip(centers, widths, strict=False)):
        center, width = _opt_float(c), _opt_float(w)
        if center is None or width is None or width <= 0:
            continue
        text = str(explanations[n]).strip()[:64] if n < len(explanations) else ""
        out.append(FileWindow(center, width, text or None))
        if len(out) == MAX_FILE_WINDOWS:
            break
    return tuple(out)


def _safe_facts(ds: Dataset, truncated: bool) -> HeaderFacts:
    """:func:`_facts`, with any surprise from a malformed value reported as ``not_dicom``."""
    try:
        return _facts(ds, truncated)
    except UnreadableDicomError:
        raise
    except Exception as exc:
        raise UnreadableDicomError(
            "not_dicom", f"malformed header ({type(exc).__name__}: {exc})"
        ) from exc


def read_header(path: Path) -> HeaderFacts:
    """Header facts without reading pixel data.

    Raises :class:`UnreadableDicomError` with ``not_dicom``, ``missing_attribute``,
    ``no_pixel_data`` (an object that is not an image: SR, RT plan, waveform...) or
    ``too_large`` (a deflated data set that inflates past the default pixel ceiling).
    """
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = _dcmread(
            path,
            stop_before_pixels=True,
            defer_size=_HEADER_DEFER,
            inflate_budget=DEFAULT_MAX_PIXEL_BYTES + _HEADER_ALLOWANCE,
        )
        return _safe_facts(ds, truncated=_hit_eof(caught))


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
    spp = max(1, _opt_int(ds.get("SamplesPerPixel")) or 1)
    bits = max(1, _opt_int(ds.get("BitsAllocated")) or 8)
    return facts.rows * facts.columns * facts.number_of_frames * spp * math.ceil(bits / 8)


def _reread_header_or_truncated(path: Path, detail: str) -> UnreadableDicomError:
    """The full read lost something; blame the header if it is broken, else the pixel data."""
    try:
        read_header(path)
    except UnreadableDicomError as exc:
        return exc
    return UnreadableDicomError("truncated_pixel_data", detail)


def _decoder(tsuid: UID) -> Any:
    """pydicom's decoder for ``tsuid``; ``unsupported_transfer_syntax`` naming what is missing."""
    name = tsuid.name if tsuid.name != str(tsuid) else "unknown"
    try:
        decoder = get_decoder(tsuid)
    except Exception as exc:  # NotImplementedError: pydicom has no decoder for it at all
        raise UnreadableDicomError(
            "unsupported_transfer_syntax", f"{tsuid} ({name}): pydicom has no decoder for it"
        ) from exc
    if not decoder.is_available:
        raise UnreadableDicomError(
            "unsupported_transfer_syntax",
            f"{tsuid} ({name}): no codec installed; {_missing_plugins(decoder)}",
        )
    return decoder


def _missing_plugins(decoder: Any) -> str:
    # pydicom words them "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"
    missing = [str(m).strip() for m in getattr(decoder, "missing_dependencies", [])]
    return "plugins that would decode it: " + ("; ".join(missing) if missing else "none known")


_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
_JPEG_LS_SOF = 0xF7
_JPEG_LS_LSE = 0xF8
_OVERSIZE = (2**32, 2**32, 1)
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
# JPEG (baseline, extended, lossless) and JPEG-LS; JPEG 2000 and HTJ2K
_JPEG_SYNTAXES = frozenset(f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81))
_J2K_SYNTAXES = frozenset(f"1.2.840.10008.1.2.4.{n}" for n in (90, 91, 92, 93, 201, 202, 203))


def _jpeg_size(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) of a JPEG / JPEG-LS frame's SOFn / SOF55 segment, or None.

    A JPEG-LS LSE "oversize dimensions" segment counts as too large.
    """
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None  # not at a marker: the decoder will say what is wrong
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        if marker in _JPEG_SOF or marker == _JPEG_LS_SOF:
            seg = data[pos + 4 : pos + 10]  # P, Y, X, Nf
            if len(seg) < 6:
                return None
            return int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big"), seg[5]
        if marker == _JPEG_LS_LSE and data[pos + 4 : pos + 5] == b"\x04":
            return _OVERSIZE
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def _j2k_size(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) of a JPEG 2000 / HTJ2K frame's SIZ segment, or None; the
    codestream may sit in a JP2 wrapper."""
    if data.startswith(_J2K_SOC_SIZ):
        at = 0
    elif data.startswith(_JP2_SIGNATURE):
        at = data.find(_J2K_SOC_SIZ, 0, 65536)
        if at < 0:
            return None
    else:
        return None
    # Lsiz Rsiz | Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz | Csiz
    siz = data[at + 4 : at + 4 + 38]
    if len(siz) < 38:
        return None
    xsiz, ysiz, x0, y0 = struct.unpack(">4I", siz[4:20])
    return max(0, ysiz - y0), max(0, xsiz - x0), int.from_bytes(siz[36:38], "big")


def _check_compressed_frames(ds: Dataset, facts: HeaderFacts) -> None:
    """Refuse compressed frames that declare more pixels than the DICOM header, before a codec
    allocates for them (a corrupt or hostile SOF / SIZ could ask for gigabytes)."""
    syntax = facts.transfer_syntax_uid
    size_of = (
        _jpeg_size if syntax in _JPEG_SYNTAXES else _j2k_size if syntax in _J2K_SYNTAXES else None
    )
    if size_of is None:
        return  # RLE: its decoders size the output from the DICOM header
    try:
        for fragment in generate_fragments(ds.PixelData):
            size = size_of(fragment)
            if size is None:
                continue
            rows, columns, components = size
            if (
                rows > facts.rows
                or columns > facts.columns
                or components > max(4, facts.samples_per_pixel)
            ):
                raise UnreadableDicomError(
                    "decode_error",
                    f"a compressed frame declares {rows}x{columns}x{components}, the header "
                    f"{facts.rows}x{facts.columns}x{facts.samples_per_pixel}",
                )
    except UnreadableDicomError:
        raise
    except Exception:
        return  # unparseable fragments: the decoder reports them


def _frame_index(frames: FrameSelection) -> int | None:
    if isinstance(frames, bool) or not isinstance(frames, (str, int)):
        raise ValueError(f"frames must be 'volume', 'first' or a frame index, not {frames!r}")
    if isinstance(frames, int):
        return frames
    if frames not in ("volume", "first"):
        raise ValueError(f"frames must be 'volume', 'first' or a frame index, not {frames!r}")
    return None if frames == "volume" else 0


def read_image(
    path: Path,
    max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES,
    *,
    frames: FrameSelection = "volume",
    dtype: npt.DTypeLike = np.float32,
    hounsfield: bool = False,
) -> DecodedImage:
    """Read, decode and run the display pipeline on one file.

    Args:
        path: the file.
        max_pixel_bytes: ceiling on the declared pixel data (rows x columns x frames x samples
            x bytes per sample); a file over it is ``too_large`` and nothing is decoded, and
            values larger than it are not even loaded into memory.
        frames: ``"volume"`` (every frame: ``(frames, rows, columns)``, or ``(rows, columns)``
            for a single-frame file), ``"first"`` or a 0-based frame index (one frame,
            ``(rows, columns)``). Only the frames asked for are decoded and hashed.
        dtype: of ``pixels`` (computed in float32; float16 is what the ingest cache stores).
        hounsfield: also give a CT image's modality values in HU (``DecodedImage.hounsfield``,
            see :func:`hounsfield_values`; None for any other image). A failure there never
            makes the file unreadable: the image then simply has none.

    Raises:
        UnreadableDicomError: for anything wrong with the file, with a reason from
            :data:`QUARANTINE_REASONS`.
        IndexError: ``frames`` is an index the file does not have.
        ValueError: ``frames`` is not one of the values above.
        OSError: the path cannot be opened at all (missing, a folder, no permission).
    """
    path = Path(path)
    index = _frame_index(frames)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a broken file's warnings become its reason
            return _read_image(path, max_pixel_bytes, index, np.dtype(dtype), hounsfield)
    except (UnreadableDicomError, _FrameIndexError):
        raise
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # anything unforeseen is still a quarantine, never a crash
        # (BaseException: a codec written in Rust reports a panic as pyo3's PanicException)
        raise UnreadableDicomError("decode_error", f"{type(exc).__name__}: {exc}") from exc


def _read_image(
    path: Path, max_pixel_bytes: int, index: int | None, dtype: np.dtype[Any], hounsfield: bool
) -> DecodedImage:
    # A file far larger than its pixel ceiling is refused before it is read at all (encapsulated
    # pixel data of undefined length is read in full, whatever its declared size).
    file_limit = max_pixel_bytes + max_pixel_bytes // 8 + _HEADER_ALLOWANCE
    file_size = path.stat().st_size
    if file_size > file_limit:
        raise UnreadableDicomError(
            "too_large", f"a file of {file_size} bytes > {file_limit} allowed for its pixels"
        )
    # A file of ordinary size is read once: parsed from memory and hashed from the same bytes.
    data = path.read_bytes() if file_size <= _IN_MEMORY_BYTES else None
    file_sha256 = hashlib.sha256(data).hexdigest() if data is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # raises not_dicom itself; a cut file mostly reads "fine" with an end-of-file warning
        ds = _dcmread(
            path,
            stop_before_pixels=False,
            defer_size=max_pixel_bytes + 1,
            inflate_budget=max_pixel_bytes + _HEADER_ALLOWANCE,
            data=data,
        )
    hit_eof = _hit_eof(caught)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            facts = _safe_facts(ds, truncated=hit_eof)
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
    if index is not None and not 0 <= index < facts.number_of_frames:
        raise _FrameIndexError(f"frame {index} asked, the file has {facts.number_of_frames}")

    tsuid = UID(facts.transfer_syntax_uid)
    decoder = _decoder(tsuid)
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
    elif "PixelData" in ds:
        _check_compressed_frames(ds, facts)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = pixel_array(ds, index=index)
    except (EOFError, OSError) as exc:
        raise UnreadableDicomError("truncated_pixel_data", f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        message = str(exc)
        if "less than expected" in message:
            raise UnreadableDicomError("truncated_pixel_data", message) from exc
        if ("missing" in message and "dependencies" in message) or "does not support" in message:
            # e.g. 12-bit JPEG Extended with only Pillow installed
            raise UnreadableDicomError(
                "unsupported_transfer_syntax",
                f"{tsuid} ({tsuid.name}): the installed plugins cannot decode this file; "
                f"{_missing_plugins(decoder)} ({' '.join(message.split())})",
            ) from exc
        raise UnreadableDicomError("decode_error", f"{type(exc).__name__}: {message}") from exc
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # pyo3's PanicException from a Rust codec on corrupt data
        raise UnreadableDicomError("decode_error", f"codec {type(exc).__name__}: {exc}") from exc

    try:
        rgb: np.ndarray | None = None
        if _is_color(ds):
            pixels, rgb = color_display(ds, stored)
            pixels, source = pixels.astype(dtype, copy=False), "none"
        else:
            pixels, source = display_pipeline(ds, stored, dtype=dtype)
    except Exception as exc:
        raise UnreadableDicomError(
            "decode_error", f"display pipeline: {type(exc).__name__}: {exc}"
        ) from exc
    hu: np.ndarray | None = None
    if hounsfield and facts.modality == "CT":
        try:
            hu = hounsfield_values(ds, stored)
        except Exception:  # an extra for the viewer: the display pixels above still stand
            hu = None
    return DecodedImage(
        facts=facts,
        pixels=pixels,
        pixel_hash=pixel_hash(stored, ds),
        voi_source=source,
        rgb=rgb,
        file_sha256=file_sha256,
        hounsfield=hu,
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


def _pipeline_dataset(ds: Dataset, private: bool = True) -> Dataset:
    """What the LUT functions read, with functional groups merged in: a private deep copy
    (pydicom's LUT functions write to it), or with ``private=False`` the elements themselves,
    for read-only use."""
    view = Dataset()
    for kw in _PIPELINE_KEYWORDS:
        tag = _tag(kw)  # by tag: a keyword lookup maps the keyword to a tag on every call
        source: Dataset | None = ds if ds.get_item(tag) is not None else None
        if source is None and kw in _FG_SOURCES:
            item = _fg_item(ds, _FG_SOURCES[kw])
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


def _padding_mask(ds: Dataset, arr: np.ndarray, any_: bool = True) -> np.ndarray | None:
    """Pixels equal to Pixel Padding Value, or inside [value, range limit] when a limit is given.

    None when there is no padding value, or (``any_``) when no pixel is padding."""
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
    return mask if not any_ or mask.any() else None


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


_BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _is_color(ds: Dataset) -> bool:
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    return (_opt_int(ds.get("SamplesPerPixel")) or 1) > 1 or photometric == "PALETTE COLOR"


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
            bits = _opt_int(ds.get("BitsStored")) or arr.dtype.itemsize * 8
            full = float(2 ** max(1, min(bits, arr.dtype.itemsize * 8)) - 1)
    unit = np.clip(rgb.astype(np.float32) / np.float32(full), 0.0, 1.0)
    luma = np.clip(unit @ _BT601, 0.0, 1.0).astype(np.float32)
    return luma, np.rint(unit * 255.0).astype(np.uint8)


def _unit_range(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi == lo:
        return np.zeros(values.shape, dtype=np.float64)
    out = (values.astype(np.float64) - lo) / (hi - lo)
    return cast(np.ndarray, np.clip(out, 0.0, 1.0))


def _linear_window_fast(view: Dataset, arr: np.ndarray) -> np.ndarray | None:
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
    center = cast(float, _opt_float(_get(view, "WindowCenter")))
    width = cast(float, _opt_float(_get(view, "WindowWidth")))
    slope = _opt_float(_get(view, "RescaleSlope"))
    intercept = _opt_float(_get(view, "RescaleIntercept"))
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
    if _is_color(ds):
        return color_display(ds, arr)[0].astype(dtype, copy=False), "none"

    if fast:  # the fast path only reads the attributes: no private copy needed
        fast_view = _pipeline_dataset(ds, private=False)
        domain = _lut_domain(arr)
        if domain is not None:
            # Every step is a function of the stored value alone: run it once per possible
            # value (a table of at most 65,536 entries) and index the table with the image.
            values, index = domain
            table = _linear_window_fast(fast_view, values)
            if table is not None:
                table = _finish(ds, photometric, table, _padding_mask(ds, values, any_=False))
                return np.take(table.astype(dtype, copy=False), index), "window"
        else:
            quick = _linear_window_fast(fast_view, arr)
            if quick is not None:
                shown = _finish(ds, photometric, quick, _padding_mask(ds, arr))
                return shown.astype(dtype, copy=False), "window"
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
    return _finish(ds, photometric, out, mask).astype(dtype, copy=False), source


def _lut_domain(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
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


def _finish(ds: Dataset, photometric: str, out: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Presentation inversion and the padding mask, the last steps of the display pipeline."""
    # Presentation LUT (PS3.3 C.11.6.1.2): INVERSE means "P-Value = maximum - output", the
    # minimum shown white. Image IODs say INVERSE shall be used with MONOCHROME1 and IDENTITY
    # with MONOCHROME2 (General Image and DX Image modules, PS3.3 C.7.6.1, C.8.11.2): for
    # MONOCHROME1 the shape restates the inversion that the photometric interpretation already
    # implies, so it is applied once, never twice; on MONOCHROME2, INVERSE inverts the image.
    shape = (_text(ds, "PresentationLUTShape") or "").upper()
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        out = 1.0 - out
    if mask is not None:
        out = np.where(mask, 0.0, out)
    return out.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Modality values (Hounsfield units)
# --------------------------------------------------------------------------------------------

_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _rescale_of(item: Dataset) -> tuple[float | None, float | None, str | None]:
    return (
        _opt_float(_get(item, "RescaleSlope")),
        _opt_float(_get(item, "RescaleIntercept")),
        _text(item, "RescaleType"),
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
    if _present(ds, "ModalityLUTSequence"):
        return None
    slope, intercept, kind = _rescale_of(ds)
    if slope is None or intercept is None:
        slope = intercept = kind = None
        shared = _get(ds, "SharedFunctionalGroupsSequence")
        item = _get(shared[0], "PixelValueTransformationSequence") if shared else None
        if item:
            slope, intercept, kind = _rescale_of(item[0])
        else:
            found = set()
            for frame in _get(ds, "PerFrameFunctionalGroupsSequence") or ():
                inner = _get(frame, "PixelValueTransformationSequence")
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
    if str(_get(ds, "Modality") or "").strip() != "CT" or _is_color(ds):
        return None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric != "MONOCHROME2" or (_text(ds, "PresentationLUTShape") or "") == "INVERSE":
        return None
    rescale = _linear_rescale(ds)
    if rescale is None:
        return None
    slope, intercept = rescale
    arr = np.asarray(stored)
    domain = _lut_domain(arr)
    if domain is not None:
        # As in the display pipeline: once per possible stored value, then a table look-up
        # (casting every pixel to float16 was most of the cost).
        values, index = domain
        table = _rescaled_float16(values, slope, intercept)
        mask = _padding_mask(ds, values, any_=False)
        if mask is not None:
            table[mask] = np.nan
        return np.take(table, index)
    hu = _rescaled_float16(arr, slope, intercept)
    mask = _padding_mask(ds, arr)
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


# --------------------------------------------------------------------------------------------
# Series geometry
# --------------------------------------------------------------------------------------------

_ORIENTATION_TOLERANCE = 1e-3  # direction cosines
_MIN_STEP_TOLERANCE_MM = 0.01


def _mm(value: float) -> str:
    return f"{value:.2f} mm"


def check_series_geometry(facts: Sequence[HeaderFacts]) -> list[str]:
    """Problems, in plain words, that stop a series' slices from stacking into one volume.

    Slices are sorted by ImagePositionPatient projected on the normal of the (most common)
    ImageOrientationPatient. Reported: differing orientation, rows/columns or pixel spacing;
    slices without position or orientation; duplicated positions; missing positions (a gap
    that is a whole multiple of the median step); and other non-uniform steps. Steps agree
    when within 1% of the median step or 0.01 mm, whichever is larger. An empty list means
    the series is consistent (as is any series of fewer than two slices).
    """
    problems: list[str] = []
    n = len(facts)
    if n < 2:
        return problems

    sizes = Counter((f.rows, f.columns) for f in facts)
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c} ({k} slices)" for (r, c), k in sizes.most_common())
        problems.append(f"differing rows/columns: {listed}")
    spacings = Counter(
        tuple(round(v, 4) for v in f.pixel_spacing) for f in facts if f.pixel_spacing
    )
    if len(spacings) > 1:
        listed = ", ".join(f"{a:g} x {b:g} mm ({k} slices)" for (a, b), k in spacings.items())
        problems.append(f"differing pixel spacing: {listed}")

    orientations = [
        np.asarray(f.image_orientation_patient, dtype=np.float64)
        for f in facts
        if f.image_orientation_patient is not None and len(f.image_orientation_patient) == 6
    ]
    if len(orientations) < n:
        problems.append(f"{n - len(orientations)} of {n} slices have no valid orientation")
    if not orientations:
        return problems
    counts = Counter(tuple(np.round(o, 3)) for o in orientations)
    reference = np.asarray(counts.most_common(1)[0][0], dtype=np.float64)
    odd = [o for o in orientations if np.abs(o - reference).max() > _ORIENTATION_TOLERANCE]
    if odd:
        problems.append(
            f"differing orientation: {len(odd)} of {n} slices are not "
            f"{_cosines(reference)} (e.g. {_cosines(odd[0])})"
        )
    normal = np.cross(reference[:3], reference[3:])
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        problems.append(
            f"degenerate orientation {_cosines(reference)}: rows and columns are parallel"
        )
        return problems
    normal /= length

    located = [f.image_position_patient for f in facts if f.image_position_patient is not None]
    if len(located) < n:
        problems.append(f"{n - len(located)} of {n} slices have no position")
    if len(located) < 2:
        return problems
    positions = np.sort(np.asarray(located, dtype=np.float64) @ normal)
    steps = np.diff(positions)
    moving = steps[steps > _MIN_STEP_TOLERANCE_MM]
    if moving.size == 0:
        problems.append(f"duplicated positions: all {len(positions)} slices at {_mm(positions[0])}")
        return problems
    median = float(np.median(moving))
    tolerance = max(0.01 * median, _MIN_STEP_TOLERANCE_MM)

    duplicated = [float(positions[i]) for i in np.flatnonzero(steps <= tolerance)]
    if duplicated:
        where = ", ".join(_mm(p) for p in duplicated[:5]) + (", ..." if len(duplicated) > 5 else "")
        problems.append(f"duplicated positions: {len(duplicated)} extra slice(s) at {where}")
    missing: list[str] = []
    uneven: list[str] = []
    for i in np.flatnonzero(steps > tolerance):
        step, lo, hi = float(steps[i]), float(positions[i]), float(positions[i + 1])
        multiple = round(step / median)
        if abs(step - median) <= tolerance:
            continue
        if multiple >= 2 and abs(step - multiple * median) <= tolerance * multiple:
            missing.append(f"{multiple - 1} between {_mm(lo)} and {_mm(hi)}")
        else:
            uneven.append(f"{_mm(step)} between {_mm(lo)} and {_mm(hi)}")
    if missing:
        problems.append(f"missing positions (step {_mm(median)}): " + "; ".join(missing[:5]))
    if uneven:
        problems.append(
            f"non-uniform spacing (median step {_mm(median)}): " + "; ".join(uneven[:5])
        )
    return problems


def _cosines(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"
