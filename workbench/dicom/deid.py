"""De-identification: the DICOM Basic Application Level Confidentiality Profile (PS3.15 E.1).

:func:`deidentify` applies Table E.1-1 (:mod:`workbench.dicom.deid_profile`) to a deep copy of
a dataset, recursively in sequences, and removes every private tag. Identity becomes keyed and
consistent, never random, so that a batch (and a second run with the same key) stays linked:

* UIDs (action ``U``) become ``2.25.<128 bits of HMAC-SHA256(key, uid)>`` (:func:`remap_uid`):
  a reference in a sequence gets the same new UID as the instance it references;
* Patient ID and Patient Name become the catalog's pseudonym,
  ``"P" + HMAC-SHA256(key, "patient:" + PatientID)[:15]`` (:func:`patient_pseudonym`);
* with ``keep_dates`` (Retain Longitudinal Temporal Information with Modified Dates Option)
  every date is shifted by a per-patient number of days (:func:`date_shift_days`), so the
  intervals between a patient's studies are kept; times are kept (whole-day shift).

Why our own table rather than a library: pydicom and highdicom have no confidentiality profile;
``deid`` (pydicom/deid) works from its own recipes rather than Table E.1-1; ``dicognito`` and
``dicom-anonymizer`` replace UIDs and dates randomly per process (no keyed, cross-run mapping, no
date-shift option) and the latter keeps its UID map in a module-global dict. The table itself is
transcribed (see :mod:`workbench.dicom.deid_profile`).

Compound actions are resolved without knowing each IOD's attribute types, so always towards IOD
conformance: ``Z/D``, ``X/D`` and ``X/Z/D`` give ``D`` (a dummy value), ``X/Z`` gives ``Z``
(zero length), ``X/Z/U*`` keeps the sequence and de-identifies its items (instance UIDs
replaced). A ``D`` on a sequence keeps its items' structure and gives each attribute in it its
own row's action, or a dummy value when it has no row. ``K`` sequences and sequences outside the
table are de-identified item by item.

Images that may show identity in their pixels are refused (:class:`BurnedInAnnotationError`):
this module does not clean pixel data.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import get_expected_length
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from workbench.dicom.deid_profile import (
    BASIC_PROFILE,
    EDITION,
    REPEATING_GROUP_ROWS,
    RETAIN_DATES_EXCLUDED,
    RETAIN_DEVICE_IDENTITY,
)
from workbench.errors import UsageError, WorkbenchError

__all__ = [
    "REFUSAL_REASONS",
    "BurnedInAnnotationError",
    "DeidConfig",
    "ExportSummary",
    "check_burned_in",
    "date_shift_days",
    "deidentify",
    "deidentify_file",
    "export_deidentified",
    "keyed_hash",
    "patient_pseudonym",
    "remap_uid",
]

#: Why :func:`export_deidentified` may refuse a file (the keys of ``ExportSummary.refused``).
REFUSAL_REASONS: tuple[str, ...] = (
    "burned_in_annotation",
    "not_dicom",
    "unreadable",
    "missing_attribute",
    "truncated_pixel_data",
    "duplicate_instance",
    "deidentify_error",
)

#: Modalities whose images often carry burned-in text (a missing BurnedInAnnotation is a no).
BURNED_IN_MODALITIES = frozenset({"US", "SC", "OT", "XC", "ES"})
SECONDARY_CAPTURE_CLASSES = frozenset(
    {
        SecondaryCaptureImageStorage,
        MultiFrameSingleBitSecondaryCaptureImageStorage,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        MultiFrameTrueColorSecondaryCaptureImageStorage,
    }
)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Export file names: out/<Study UID>/<Series UID>/<SOP Instance UID>.dcm (new UIDs).
_NAME_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_NATIVE = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian})

#: Dummy values (action ``D``) by VR. UIDs are remapped instead, so references stay linked.
DUMMY_TEXT = "DEIDENTIFIED"
DUMMY_DATE = "19000101"
_DUMMY: dict[str, Any] = {
    **dict.fromkeys(("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"), DUMMY_TEXT),
    "AS": "000D",
    "DA": DUMMY_DATE,
    "DT": DUMMY_DATE + "000000",
    "TM": "000000",
    "DS": "0",
    "IS": "0",
    "UR": "urn:deidentified",
    **dict.fromkeys(("FL", "FD", "SL", "SS", "UL", "US", "SV", "UV", "AT"), 0),
    **dict.fromkeys(("OB", "OD", "OF", "OL", "OV", "OW", "UN"), b"\x00" * 8),
}

# CID 7050 De-identification Methods (coding scheme DCM).
_CODE_BASIC = ("113100", "Basic Application Confidentiality Profile")
_CODE_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
_CODE_DEVICE = ("113109", "Retain Device Identity Option")

_COMPOUND = {"Z/D": "D", "X/D": "D", "X/Z/D": "D", "X/Z": "Z", "X/Z/U*": "U*"}
_ROWS: dict[int, tuple[str, str, str]] = {
    tag: (keyword, vr, _COMPOUND.get(action, action)) for tag, keyword, vr, action in BASIC_PROFILE
}
_PATIENT_ID = 0x00100020
_PATIENT_NAME = 0x00100010
_PATIENT_BIRTH_DATE = 0x00100030


@dataclass(frozen=True)
class DeidConfig:
    """How to de-identify.

    Args:
        key: the installation's secret (``workbench.config.pseudonym_key``): pseudonyms, UIDs
            and date shifts are keyed hashes of the originals.
        keep_dates: Retain Longitudinal Temporal Information with Modified Dates: shift every
            date by a per-patient offset instead of removing it.
        keep_device_identity: Retain Device Identity Option (serial numbers, station names...).
        allow_burned_in: de-identify images that may show identity in their pixels anyway.
    """

    key: bytes
    keep_dates: bool = False
    keep_device_identity: bool = False
    allow_burned_in: bool = False


class BurnedInAnnotationError(WorkbenchError):
    """An image that says (or may, by its modality) carry identifying text in its pixels."""


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_deidentified` did: files written, and refusals by reason."""

    written: int
    refused: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        refused = ", ".join(f"{n} {reason}" for reason, n in sorted(self.refused.items()))
        return f"written {self.written}, refused {sum(self.refused.values())}" + (
            f" ({refused})" if refused else ""
        )


# --------------------------------------------------------------------------------------------
# Keyed identities
# --------------------------------------------------------------------------------------------


def keyed_hash(key: bytes, value: str, length: int = 16) -> str:
    """HMAC-SHA256 of ``value`` in hex, cut to ``length``: the workbench's keyed hash.

    The one definition: the catalog imports it for its pseudonyms and study keys, so a
    de-identified export and the catalog name a patient the same way.
    """
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:length]


def patient_pseudonym(patient_id: str, key: bytes) -> str:
    """The catalog's patient pseudonym: ``"P" + keyed_hash(key, "patient:" + id, 15)``."""
    return "P" + keyed_hash(key, "patient:" + patient_id, 15)


def remap_uid(uid: str, key: bytes) -> str:
    """A new UID for ``uid``: ``2.25.`` and 128 bits of HMAC-SHA256(key, uid) as an integer.

    The same UID and key give the same result in any batch and any run; at most 44 characters.
    """
    clean = str(uid).strip().rstrip("\x00")
    digest = hmac.new(key, ("uid:" + clean).encode(), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def date_shift_days(patient_id: str, key: bytes) -> int:
    """The patient's date shift, in -365..-1 days, from a keyed hash of the Patient ID."""
    digest = hmac.new(key, ("dateshift:" + patient_id).encode(), hashlib.sha256).digest()
    return -(int.from_bytes(digest[:8], "big") % 365) - 1


# --------------------------------------------------------------------------------------------
# Burned-in annotation
# --------------------------------------------------------------------------------------------


def check_burned_in(ds: Dataset) -> None:
    """Raise :class:`BurnedInAnnotationError` for an image that may show identity in its pixels.

    Burned In Annotation YES is refused; so is a missing (or unknown) value for the modalities
    and SOP classes that often carry burned-in text (US, SC, OT, XC, ES; secondary capture).
    Datasets without pixel data pass.
    """
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        return
    burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if burned == "YES":
        raise BurnedInAnnotationError("BurnedInAnnotation is YES")
    if burned == "NO":
        return
    modality = str(ds.get("Modality", "") or "").strip().upper()
    sop_class = str(ds.get("SOPClassUID", "") or "").strip()
    if modality in BURNED_IN_MODALITIES or sop_class in SECONDARY_CAPTURE_CLASSES:
        state = f"is {burned!r}" if burned else "is missing"
        raise BurnedInAnnotationError(
            f"BurnedInAnnotation {state} for modality {modality or '?'} (SOP class {sop_class})"
        )


# --------------------------------------------------------------------------------------------
# The profile
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    config: DeidConfig
    shift_days: int


def _action(tag: BaseTag, config: DeidConfig) -> str | None:
    """The action for ``tag`` under ``config``; None when the table has no row (keep)."""
    row = _ROWS.get(int(tag))
    if row is None:
        for value, mask, _keyword, action in REPEATING_GROUP_ROWS:
            if int(tag) & mask == value:
                return action
        return None
    keyword, vr, action = row
    if config.keep_device_identity and keyword in RETAIN_DEVICE_IDENTITY:
        return "K"
    if config.keep_dates and vr in ("DA", "DT", "TM") and keyword not in RETAIN_DATES_EXCLUDED:
        return "C"
    return action


def _shift_date(text: str, days: int) -> str | None:
    """A DA value (or a DT value's date part) moved by ``days``; None when it is not a date."""
    text = text.strip()
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        day = dt.datetime.strptime(text[:8], "%Y%m%d").date()
        moved = day + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return moved.strftime("%Y%m%d") + text[8:]


def _values(elem: DataElement) -> list[Any]:
    value = elem.value
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _set_values(elem: DataElement, values: list[Any]) -> None:
    if not values:
        elem.value = empty_value_for_VR(elem.VR)
    elif len(values) == 1:
        elem.value = values[0]
    else:
        elem.value = values


def _clean_date(elem: DataElement, ctx: _Context) -> None:
    """Action ``C`` of the Modified Dates option: shift DA / DT values, keep TM."""
    if elem.VR not in ("DA", "DT"):
        return
    shifted = [_shift_date(str(v), ctx.shift_days) for v in _values(elem)]
    _set_values(elem, [v for v in shifted if v is not None])


def _remap(elem: DataElement, ctx: _Context) -> None:
    values = [remap_uid(str(v), ctx.config.key) for v in _values(elem) if str(v).strip()]
    _set_values(elem, values)


def _dummy(elem: DataElement, ctx: _Context) -> None:
    if elem.VR == "SQ":
        for item in elem.value:
            _dummy_item(item, ctx)
    elif elem.VR == "UI":
        _remap(elem, ctx)
    elif elem.VR in _DUMMY:
        elem.value = _DUMMY[elem.VR]
    else:  # a VR without a dummy (unknown): zero length
        elem.value = empty_value_for_VR(elem.VR)


def _apply(ds: Dataset, elem: DataElement, action: str, ctx: _Context) -> None:
    if action == "X":
        del ds[elem.tag]
    elif action == "Z":
        elem.value = empty_value_for_VR(elem.VR)
    elif action == "D":
        _dummy(elem, ctx)
    elif action in ("U", "U*"):
        if elem.VR == "SQ":
            for item in elem.value:
                _clean_item(item, ctx)
        elif elem.VR == "UI":
            _remap(elem, ctx)
        else:
            elem.value = empty_value_for_VR(elem.VR)
    elif action == "C":
        _clean_date(elem, ctx)
    elif action == "K":
        if elem.VR == "SQ":
            for item in elem.value:
                _clean_item(item, ctx)
    else:  # pragma: no cover - the table holds only the codes above
        raise ValueError(f"unknown action {action!r}")


def _patient_identity(ds: Dataset, elem: DataElement, ctx: _Context, top: bool) -> None:
    """Patient ID -> pseudonym of its value; Patient Name -> pseudonym of the item's ID."""
    if int(elem.tag) == _PATIENT_ID:
        pid = str(elem.value or "").strip()
        elem.value = patient_pseudonym(pid, ctx.config.key) if (pid or top) else ""
        return
    source = ds.get("PatientID", None)
    pid = str(source or "").strip()
    if top or pid:
        elem.value = patient_pseudonym(pid, ctx.config.key)
    else:
        elem.value = ""


def _common(ds: Dataset, elem: DataElement, ctx: _Context, top: bool) -> bool:
    """Rules before the table: private tags, group lengths, patient identity. True if done."""
    tag = elem.tag
    if tag.is_private or tag.element == 0:
        del ds[tag]
        return True
    if int(tag) in (_PATIENT_ID, _PATIENT_NAME):
        _patient_identity(ds, elem, ctx, top)
        return True
    return False


def _clean_item(ds: Dataset, ctx: _Context, top: bool = False) -> None:
    """Apply the profile to every attribute of ``ds`` (recursively in sequences)."""
    # Patient Name needs the item's original Patient ID: do it before the ID is replaced.
    order = sorted(ds.keys(), key=lambda t: (int(t) != _PATIENT_NAME, int(t)))
    for tag in order:
        if tag not in ds:
            continue
        elem = ds[tag]
        if _common(ds, elem, ctx, top):
            continue
        action = _action(tag, ctx.config)
        if action is not None:
            _apply(ds, elem, action, ctx)
        elif elem.VR == "SQ":
            for item in elem.value:
                _clean_item(item, ctx)
        elif ctx.config.keep_dates and elem.VR in ("DA", "DT"):
            _clean_date(elem, ctx)  # dates outside the table move with the others


def _dummy_item(ds: Dataset, ctx: _Context) -> None:
    """Action ``D`` on a sequence: each attribute gets its own row's action, else a dummy."""
    order = sorted(ds.keys(), key=lambda t: (int(t) != _PATIENT_NAME, int(t)))
    for tag in order:
        if tag not in ds:
            continue
        elem = ds[tag]
        if _common(ds, elem, ctx, top=False):
            continue
        action = _action(tag, ctx.config)
        if action is not None:
            _apply(ds, elem, action, ctx)
        else:
            _dummy(elem, ctx)


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return str(meta.TransferSyntaxUID)
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit:
        return ImplicitVRLittleEndian
    if little is False:
        return ExplicitVRBigEndian
    return ExplicitVRLittleEndian


def _code_item(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def deidentify(ds: pydicom.Dataset, config: DeidConfig) -> pydicom.Dataset:
    """A de-identified deep copy of ``ds`` (the input is not changed).

    Raises:
        BurnedInAnnotationError: the image may show identity in its pixels (see
            :func:`check_burned_in`), unless ``config.allow_burned_in``.
    """
    if not config.allow_burned_in:
        check_burned_in(ds)
    original_pid = str(ds.get("PatientID", "") or "").strip()
    transfer_syntax = _transfer_syntax(ds)
    out = copy.deepcopy(ds)
    out.preamble = None  # a preamble may hold anything (e.g. a TIFF header): write zeros
    ctx = _Context(config=config, shift_days=date_shift_days(original_pid, config.key))
    _clean_item(out, ctx, top=True)
    if "PatientID" not in out:
        out.PatientID = patient_pseudonym(original_pid, config.key)
    if "PatientName" not in out:
        out.PatientName = patient_pseudonym(original_pid, config.key)

    out.PatientIdentityRemoved = "YES"
    methods = ["PS3.15 E.1 Basic Application Level Confidentiality Profile"]
    codes = [_code_item(*_CODE_BASIC)]
    if config.keep_dates:
        methods.append("Retain Longitudinal Temporal Information Modified Dates")
        codes.append(_code_item(*_CODE_DATES))
    if config.keep_device_identity:
        methods.append("Retain Device Identity")
        codes.append(_code_item(*_CODE_DEVICE))
    methods.append(f"workbench; table {EDITION}"[:64])
    out.DeidentificationMethod = methods
    out.DeidentificationMethodCodeSequence = Sequence(codes)
    out.LongitudinalTemporalInformationModified = "MODIFIED" if config.keep_dates else "REMOVED"

    meta = FileMetaDataset()
    if "SOPClassUID" in out:
        meta.MediaStorageSOPClassUID = out.SOPClassUID
    if "SOPInstanceUID" in out:
        meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    out.file_meta = meta
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


class _Unreadable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _read(src: Path) -> Dataset:
    """Read a whole file (opened read-only) or raise :class:`_Unreadable` with a reason."""
    try:
        ds = pydicom.dcmread(src)
    except InvalidDicomError:
        try:  # no preamble: accept it only if it parses and is an instance
            ds = pydicom.dcmread(src, force=True)
        except Exception as exc:
            raise _Unreadable("not_dicom") from exc
        if not all(kw in ds for kw in ("SOPClassUID", "SOPInstanceUID")):
            raise _Unreadable("not_dicom") from None
    except Exception as exc:
        raise _Unreadable("unreadable") from exc
    if not all(kw in ds for kw in _NAME_UIDS):  # e.g. a file cut short in its header
        raise _Unreadable("missing_attribute")
    if "PixelData" in ds and UID(_transfer_syntax(ds)) in _NATIVE:
        try:
            short = len(ds.PixelData) < int(get_expected_length(ds, "bytes"))
        except Exception as exc:
            raise _Unreadable("unreadable") from exc
        if short:
            raise _Unreadable("truncated_pixel_data")
    return ds


def _write(ds: Dataset, dst: Path) -> None:
    """Write ``ds`` to ``dst`` atomically (a temporary file beside it, then a rename)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def deidentify_file(src: Path, dst: Path, config: DeidConfig) -> None:
    """Read ``src`` (read-only), de-identify it and write the result to ``dst``.

    Raises:
        BurnedInAnnotationError: see :func:`deidentify`.
        ValueError: ``dst`` is ``src``, or ``src`` is not a readable DICOM file.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise UsageError("refusing to write the de-identified copy over its source")
    try:
        ds = _read(src)
    except _Unreadable as err:
        raise WorkbenchError(f"{src.name}: {err.reason}") from err
    _write(deidentify(ds, config), dst)


def export_deidentified(paths: Iterable[Path], out: Path, config: DeidConfig) -> ExportSummary:
    """Write de-identified copies of ``paths`` under ``out``, refusing what cannot be exported.

    Files are named by their new UIDs only: ``out/<Study UID>/<Series UID>/<SOP UID>.dcm``.
    Unreadable files, images with (possibly) burned-in annotation and instances seen twice are
    counted in ``refused`` by reason (:data:`REFUSAL_REASONS`); the batch goes on.
    """
    out = Path(out)
    written = 0
    refused: Counter[str] = Counter()
    seen: set[Path] = set()
    for path in paths:
        try:
            ds = _read(Path(path))
        except _Unreadable as err:
            refused[err.reason] += 1
            continue
        try:
            new = deidentify(ds, config)
        except BurnedInAnnotationError:
            refused["burned_in_annotation"] += 1
            continue
        except Exception:
            refused["deidentify_error"] += 1
            continue
        uids = [str(new[kw].value) for kw in _NAME_UIDS]
        dst = out / uids[0] / uids[1] / f"{uids[2]}.dcm"
        if dst in seen:
            refused["duplicate_instance"] += 1
            continue
        seen.add(dst)
        _write(new, dst)
        written += 1
    return ExportSummary(written=written, refused=dict(refused))
