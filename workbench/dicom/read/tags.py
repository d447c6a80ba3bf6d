"""Reading one attribute of a header safely: by tag, a malformed value read as absent, the
functional groups of an enhanced multi-frame object consulted, numbers checked for finiteness.

Shared by the header, display and Hounsfield modules of this package; nothing here raises."""

from __future__ import annotations

import functools
import math
from typing import Any, cast

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag


@functools.cache
def tag_of(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword} is not a DICOM keyword")
    return BaseTag(tag)


def present(ds: Dataset, keyword: str) -> bool:
    value = value_of(ds, keyword)
    return value is not None and value != ""


def value_of(ds: Dataset, keyword: str) -> Any:
    """``ds.get(keyword)`` for optional attributes: a malformed value reads as absent (None).

    Looked up by tag rather than through ``Dataset.__getattr__`` (which maps the keyword to a
    tag on every call): header facts read some forty attributes per file, and that mapping
    was a fifth of an ingest's time.
    """
    try:
        tag = tag_of(keyword)
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


def text_of(ds: Dataset, keyword: str) -> str | None:
    value = value_of(ds, keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def first_value(value: Any) -> Any:
    if isinstance(value, (list, tuple, MultiValue)):
        return value[0] if len(value) else None
    return value


def functional_group_item(ds: Dataset, sequence: str) -> Dataset | None:
    """The first item of ``sequence`` in the Shared, else first Per-frame, Functional Groups."""
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        fgs = value_of(ds, group)
        if not fgs:
            continue
        inner = value_of(fgs[0], sequence)
        if inner:
            return cast(Dataset, inner[0])
    return None


def lookup(ds: Dataset, keyword: str, fg_sequence: str | None = None) -> Any:
    value = value_of(ds, keyword)
    if (value is None or value == "") and fg_sequence is not None:
        item = functional_group_item(ds, fg_sequence)
        if item is not None:
            value = value_of(item, keyword)
    return None if value == "" else value


def float_tuple(value: Any, n: int | None = None) -> tuple[float, ...] | None:
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


def opt_float(value: Any) -> float | None:
    value = first_value(value)
    try:
        out = float(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None
    return out if out is not None and math.isfinite(out) else None


def opt_int(value: Any) -> int | None:
    value = first_value(value)
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError, OverflowError):
        return None


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
