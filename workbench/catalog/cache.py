"""The decoded-pixel cache, and the job that fills it: one DICOM file in, display pixels out.

Ingest runs :func:`decode_file` in worker processes, so this module imports only what that job
needs (pydicom through :mod:`workbench.dicom.read`, numpy): each spawned worker imports it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workbench.dicom.read.header import HeaderFacts
from workbench.dicom.read.io import DEFAULT_MAX_PIXEL_BYTES, UnreadableDicomError
from workbench.dicom.read.pixels import FrameSelection, read_image


def cache_path(cache_dir: Path, cache_key: str) -> Path:
    """Where the cached array with this key lives under ``cache_dir``."""
    return cache_dir / "pixels" / cache_key[:2] / f"{cache_key}.npy"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: Names what the cache holds for a file: bump it when the display pipeline's output changes.
CACHE_FORMAT = "display-pipeline-1/float16/all-frames"


def file_cache_key(file_sha: str, frames: str = "volume") -> str:
    """The cache key of a file's display pixels: its content hash, the frames taken (see
    ``Settings.frames``) and :data:`CACHE_FORMAT`.

    Keyed by the input rather than by hashing the output: the pipeline is a function of the
    file's bytes, and hashing 512 KiB of output again was a tenth of an ingest's time.
    """
    return hashlib.sha256(f"{CACHE_FORMAT}|{frames}|{file_sha}".encode()).hexdigest()


#: Names the modality-values cache of a CT file (Hounsfield units, float16, see
#: :func:`workbench.dicom.read.hounsfield.hounsfield_values`): distinct from
#: :data:`CACHE_FORMAT`, so that a file's two keys never collide. Bump it when those values change.
HU_CACHE_FORMAT = "modality-values-1/hounsfield/float16/all-frames"


def hu_cache_key(file_sha: str, frames: str = "volume") -> str:
    """The cache key of a CT file's modality values (HU), derived like :func:`file_cache_key`."""
    return hashlib.sha256(f"{HU_CACHE_FORMAT}|{frames}|{file_sha}".encode()).hexdigest()


def hu_volume_key(slice_keys: list[str]) -> str:
    """The cache key of a series' HU volume: its slices' HU keys in stacking order (each the
    hash of a file's bytes), so a volume already stacked is known without reading it again."""
    joined = ",".join(slice_keys)
    return hashlib.sha256(f"{HU_CACHE_FORMAT}|volume|{joined}".encode()).hexdigest()


def write_cache(cache_dir: Path, pixels: np.ndarray, key: str | None = None) -> str:
    """Store pixels as float16 under ``key`` (default: a hash of the pixels themselves, for
    volumes stacked from slices); return the key. Display-pipeline pixels are in [0, 1]; a CT
    file's modality values (:data:`HU_CACHE_FORMAT`) are in HU."""
    arr = np.ascontiguousarray(pixels, dtype=np.float16)
    if key is None:
        key = hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest()
    path = cache_path(cache_dir, key)
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            fh = tmp.open("wb")
        except FileNotFoundError:  # the first file in this folder (cheaper than mkdir each time)
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = tmp.open("wb")
        with fh:
            np.save(fh, arr)
        os.replace(tmp, path)
    return key


# Modalities that often carry burned-in text: without BurnedInAnnotation = NO they are refused.
BURNED_IN_MODALITIES = frozenset({"US", "SC", "OT", "XC", "ES", "GM", "SM"})


def burned_in_reason(facts: HeaderFacts) -> str | None:
    """Why an image may show burned-in PHI, or None when its header says it does not."""
    value = (getattr(facts, "burned_in_annotation", None) or "").upper()
    if value == "YES":
        return "BurnedInAnnotation is YES"
    if not value and facts.modality in BURNED_IN_MODALITIES:
        return f"BurnedInAnnotation is missing and {facts.modality} images often carry text"
    return None


@dataclass(frozen=True)
class Decoded:
    """What a worker learned about one file (picklable, no database objects)."""

    path: str
    size: int | None
    mtime_ns: int | None
    file_sha256: str | None
    facts: HeaderFacts | None = None
    pixel_hash: str | None = None
    cache_key: str | None = None
    # the modality values (HU) of a CT image whose modality LUT is a linear rescale
    hu_cache_key: str | None = None
    voi_source: str | None = None
    reason: str | None = None
    detail: str = ""


def decode_file(
    path: str,
    cache_dir: str,
    allow_burned_in: bool,
    max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES,
    frames: str = "volume",
) -> Decoded:
    """Read one file once: header facts, display pixels into the cache (and for CT, its
    modality values in HU under :func:`hu_cache_key`). Runs in a worker.

    ``frames``: "volume", "first" or a frame index as text (``Settings.frames``).
    """
    selection: FrameSelection = int(frames) if frames.isdigit() else frames  # type: ignore[assignment]
    p = Path(path)
    try:
        st = p.stat()
    except OSError as err:
        return Decoded(path, None, None, None, reason="not_readable", detail=str(err))
    try:
        image = read_image(p, max_pixel_bytes, frames=selection, dtype=np.float16, hounsfield=True)
        why = None if allow_burned_in else burned_in_reason(image.facts)
        if why:
            raise UnreadableDicomError("burned_in_annotation", why)
        # read_image hashed the bytes it read, unless the file was too big to read at once
        sha = image.file_sha256 or file_sha256(p)
        key = write_cache(Path(cache_dir), image.pixels, file_cache_key(sha, frames))
        hu_key = None
        if image.hounsfield is not None:
            hu_key = write_cache(Path(cache_dir), image.hounsfield, hu_cache_key(sha, frames))
    except UnreadableDicomError as err:
        reason, detail = err.reason, err.detail
    except IndexError as err:  # the frame asked for is not in this file
        reason, detail = "missing_attribute", f"no frame {frames}: {err}"
    except OSError as err:
        reason, detail = "not_readable", str(err)
    else:
        return Decoded(
            path,
            st.st_size,
            st.st_mtime_ns,
            sha,
            facts=image.facts,
            pixel_hash=image.pixel_hash,
            cache_key=key,
            hu_cache_key=hu_key,
            voi_source=image.voi_source,
        )
    try:
        bad_sha: str | None = file_sha256(p)
    except OSError:
        bad_sha = None
    return Decoded(path, st.st_size, st.st_mtime_ns, bad_sha, reason=reason, detail=detail)


def init_worker() -> None:
    """Keep freed memory in the worker for the next file instead of returning it to the OS.

    Each file allocates a few arrays of about its own size; by default glibc maps large blocks
    fresh and unmaps them on free, so every file paid for faulting in new zeroed pages (a third
    of the decode time of a 512x512 image on this VM). Linux with glibc only; elsewhere a no-op.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 256 * 2**20)  # blocks below 256 MiB come from the heap
    libc.mallopt(m_trim_threshold, 1 * 2**30)  # and stay there when freed
    libc.mallopt(m_top_pad, 64 * 2**20)
