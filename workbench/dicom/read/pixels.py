"""Decoding a file's pixels, bounded, and handing them to the display pipeline.

Pixel data: every transfer syntax that pydicom decodes with the installed plugins (native little
and big endian, deflate, RLE, JPEG, JPEG-LS, JPEG 2000, HTJ2K). A syntax without a codec is
``unsupported_transfer_syntax`` and the detail names the plugin that would decode it.

Reading is bounded by ``max_pixel_bytes``: the declared pixel size is checked before anything is
decoded; values larger than it are not even loaded; and a compressed frame whose own header
(JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ) declares a larger image than the DICOM header is
refused before a codec allocates for it."""

from __future__ import annotations

import hashlib
import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.pixels import (
    get_decoder,
    pixel_array,
)
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    UID,
)

from workbench.dicom.read.display import color_display, display_pipeline, is_color
from workbench.dicom.read.header import HeaderFacts, read_header, safe_facts
from workbench.dicom.read.hounsfield import hounsfield_values
from workbench.dicom.read.io import (
    DEFAULT_MAX_PIXEL_BYTES,
    HEADER_ALLOWANCE,
    PIXEL_KEYWORDS,
    UnreadableDicomError,
    dcmread_bounded,
    hit_eof,
)
from workbench.dicom.read.tags import opt_int

#: ``read_image(frames=...)``: the whole (multi-frame) image, its first frame, or frame ``i``.
FrameSelection = Literal["volume", "first"] | int


# Files up to this size are read into memory once (parse and file hash from the same bytes);
# larger ones are parsed from disk, their big values loaded only when used.
_IN_MEMORY_BYTES = 64 * 2**20


class _FrameIndexError(IndexError):
    """``read_image(frames=i)`` asked for a frame the file does not have (a caller's mistake)."""


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


def _canonical_dtype(arr: np.ndarray, ds: Dataset) -> np.dtype[Any]:
    """Little-endian dtype set by the header, not the decoder, so hashes agree across codecs."""
    if arr.dtype.kind == "f":
        return np.dtype(f"<f{arr.dtype.itemsize}")
    if arr.dtype.kind == "b":
        return np.dtype("<u1")
    bits = opt_int(ds.get("BitsAllocated")) or arr.dtype.itemsize * 8
    size = 1 if bits <= 8 else 2 if bits <= 16 else 4 if bits <= 32 else 8
    signed = (opt_int(ds.get("PixelRepresentation")) or 0) == 1
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
    spp = max(1, opt_int(ds.get("SamplesPerPixel")) or 1)
    bits = max(1, opt_int(ds.get("BitsAllocated")) or 8)
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
    file_limit = max_pixel_bytes + max_pixel_bytes // 8 + HEADER_ALLOWANCE
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
        ds = dcmread_bounded(
            path,
            stop_before_pixels=False,
            defer_size=max_pixel_bytes + 1,
            inflate_budget=max_pixel_bytes + HEADER_ALLOWANCE,
            data=data,
        )
    ended_early = hit_eof(caught)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            facts = safe_facts(ds, truncated=ended_early)
    except UnreadableDicomError as exc:
        if ended_early:
            raise _reread_header_or_truncated(path, "file ends inside a data element") from exc
        raise
    if not any(kw in ds for kw in PIXEL_KEYWORDS):
        if ended_early:
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
        if is_color(ds):
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
