"""Bounded reading of a file, and the one error every reading problem becomes.

Everything that can go wrong with a file's contents is reported as an
:class:`UnreadableDicomError` whose ``reason`` is one of :data:`QUARANTINE_REASONS`, so that
ingest can quarantine the file with a stable, countable reason instead of crashing. Only an
operating-system error about the path itself (no such file, no permission) is left as the
:class:`OSError` it is.

No read asks the file for more bytes than it holds (a corrupt element length cannot make a huge
buffer), and a deflated data set is inflated only up to a budget."""

from __future__ import annotations

import io
import os
import re
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from workbench.config import DEFAULT_MAX_PIXEL_MB
from workbench.dicom.read.tags import opt_int, text_of, value_of
from workbench.errors import WorkbenchError

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


#: The default ceiling on the declared pixel data of one file.
DEFAULT_MAX_PIXEL_BYTES = DEFAULT_MAX_PIXEL_MB * 2**20


PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# What a header may add to a file beyond its pixel data (overlays, ICC profiles, private blobs).
HEADER_ALLOWANCE = 64 * 2**20
# Header-only reads leave values larger than this on disk until something asks for them.
HEADER_DEFER = 2**20
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


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
    sop_class = text_of(ds, "SOPClassUID")
    if sop_class is None or len(sop_class) > 64 or not _UID_RE.match(sop_class):
        problems.append("SOPClassUID")
    for keyword in ("Rows", "Columns"):
        value = opt_int(value_of(ds, keyword))
        if value is None or not 0 < value < 2**16:
            problems.append(keyword)
    if not _pixel_data_length(ds):
        problems.append("PixelData")
    return problems


def _open(path: Path, data: bytes | None) -> _CappedFile | io.BytesIO:
    # A BytesIO never allocates more than what is left of its buffer either.
    return io.BytesIO(data) if data is not None else _CappedFile(path)


def dcmread_bounded(
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
        for kw in PIXEL_KEYWORDS:
            if kw in ds:
                del ds[kw]
    return ds


def hit_eof(caught: Sequence[warnings.WarningMessage]) -> bool:
    return any("End of file" in str(w.message) for w in caught)
