"""Header facts: what the catalogue needs from a file's header, read without its pixels."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from workbench.dicom.read.io import (
    DEFAULT_MAX_PIXEL_BYTES,
    HEADER_ALLOWANCE,
    HEADER_DEFER,
    PIXEL_KEYWORDS,
    UnreadableDicomError,
    dcmread_bounded,
    hit_eof,
)
from workbench.dicom.read.tags import (
    as_list,
    first_value,
    float_tuple,
    functional_group_item,
    lookup,
    opt_float,
    opt_int,
    present,
    text_of,
    value_of,
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
    value = first_value(lookup(ds, "NumberOfFrames"))
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
    if truncated or any(present(ds, kw) for kw in _IMAGE_PIXEL_KEYWORDS):
        return False
    if any(kw in ds for kw in PIXEL_KEYWORDS):
        return False
    if "Image" in UID(str(ds.SOPClassUID)).name:  # "CT Image Storage" is one, however damaged
        return False
    return max(ds.keys(), default=0) > 0x00280011


def _check_required(ds: Dataset, truncated: bool) -> None:
    for kw in REQUIRED_ATTRIBUTES:
        if present(ds, kw):
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
    sex = text_of(ds, "PatientSex")
    sex = sex.upper() if sex else None
    study_date = text_of(ds, "StudyDate")
    if study_date is not None and not re.fullmatch(r"\d{8}", study_date):
        study_date = None
    spacing = float_tuple(lookup(ds, "PixelSpacing", "PixelMeasuresSequence"), 2)
    if spacing is None:
        spacing = float_tuple(lookup(ds, "ImagerPixelSpacing"), 2)
    ipp = float_tuple(lookup(ds, "ImagePositionPatient", "PlanePositionSequence"), 3)
    iop = float_tuple(lookup(ds, "ImageOrientationPatient", "PlaneOrientationSequence"))
    bits_stored = opt_int(lookup(ds, "BitsStored"))
    if bits_stored is None:
        bits_stored = opt_int(lookup(ds, "BitsAllocated")) or 0
    return HeaderFacts(
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        patient_id=text_of(ds, "PatientID") or "",
        patient_sex=sex if sex in ("M", "F", "O") else None,
        patient_age_years=_age_years(text_of(ds, "PatientAge")),
        study_date=study_date,
        modality=str(ds.Modality).strip(),
        manufacturer=text_of(ds, "Manufacturer"),
        institution_name=text_of(ds, "InstitutionName"),
        station_name=text_of(ds, "StationName"),
        view_position=text_of(ds, "ViewPosition"),
        body_part_examined=text_of(ds, "BodyPartExamined"),
        rows=rows,
        columns=columns,
        number_of_frames=_number_of_frames(ds),
        photometric_interpretation=str(ds.PhotometricInterpretation).strip(),
        bits_stored=bits_stored,
        pixel_representation=opt_int(lookup(ds, "PixelRepresentation")) or 0,
        transfer_syntax_uid=_transfer_syntax(ds),
        pixel_spacing=cast("tuple[float, float] | None", spacing),
        window_center=opt_float(lookup(ds, "WindowCenter", "FrameVOILUTSequence")),
        window_width=opt_float(lookup(ds, "WindowWidth", "FrameVOILUTSequence")),
        image_position_patient=cast("tuple[float, float, float] | None", ipp),
        image_orientation_patient=iop,
        instance_number=opt_int(lookup(ds, "InstanceNumber")),
        burned_in_annotation=text_of(ds, "BurnedInAnnotation"),
        samples_per_pixel=max(1, opt_int(lookup(ds, "SamplesPerPixel")) or 1),
        slice_thickness=opt_float(lookup(ds, "SliceThickness", "PixelMeasuresSequence")),
        series_number=opt_int(lookup(ds, "SeriesNumber")),
        frame_of_reference_uid=text_of(ds, "FrameOfReferenceUID"),
        windows=_file_windows(ds),
    )


#: At most this many of a file's windows are kept (a header may list dozens).
MAX_FILE_WINDOWS = 16


def _file_windows(ds: Dataset) -> tuple[FileWindow, ...]:
    """Every Window Center / Width pair of the header (multi-valued: the n-th center goes with
    the n-th width and the n-th Window Center & Width Explanation), from the top level, else
    the Frame VOI LUT of the Shared (else first Per-frame) Functional Groups. A pair that is not
    a finite number with a positive width is left out."""
    source: Dataset | None = ds
    if not present(ds, "WindowCenter"):
        source = functional_group_item(ds, "FrameVOILUTSequence")
    if source is None:
        return ()
    centers = as_list(value_of(source, "WindowCenter"))
    widths = as_list(value_of(source, "WindowWidth"))
    explanations = as_list(value_of(source, "WindowCenterWidthExplanation"))
    out: list[FileWindow] = []
    for n, (c, w) in enumerate(zip(centers, widths, strict=False)):
        center, width = opt_float(c), opt_float(w)
        if center is None or width is None or width <= 0:
            continue
        text = str(explanations[n]).strip()[:64] if n < len(explanations) else ""
        out.append(FileWindow(center, width, text or None))
        if len(out) == MAX_FILE_WINDOWS:
            break
    return tuple(out)


def safe_facts(ds: Dataset, truncated: bool) -> HeaderFacts:
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
        ds = dcmread_bounded(
            path,
            stop_before_pixels=True,
            defer_size=HEADER_DEFER,
            inflate_budget=DEFAULT_MAX_PIXEL_BYTES + HEADER_ALLOWANCE,
        )
        return safe_facts(ds, truncated=hit_eof(caught))
