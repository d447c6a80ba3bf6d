"""Fuzzing the DICOM reader: every mutated file is read or quarantined, in bounded memory.

The mutations are made by the test from a few small valid seeds with a fixed-seed numpy
Generator, so a failure names a file that the next run makes again, byte for byte.
"""

from __future__ import annotations

import logging
import resource
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.uid import JPEGLSLossless

from workbench.dicom.read.header import read_header
from workbench.dicom.read.io import QUARANTINE_REASONS, UnreadableDicomError
from workbench.dicom.read.pixels import read_image
from workbench.dicom.synth import synthesize_cohort

MUTANTS_PER_SEED = 180
MAX_PIXEL_BYTES = 2 * 2**20  # the per-file ceiling the reader is asked to keep
PEAK_LIMIT = 200 * 2**20  # over the whole run, Python + numpy (tracemalloc) and the process RSS
LONG_LENGTH_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
BOGUS_VRS = [b"ZZ", b"\x00\x00", b"OB", b"SQ", b"UN", b"US", b"UT", b"FD", b"AT", b"  "]
BAD_LENGTHS = [0, 1, 3, 0xFFFF, 0xFFFE, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFF]
HUGE = [65535, 32768, 16384, 4097, 0]


# ---------------------------------------------------------------------------- seeds


def _seeds(root: Path) -> dict[str, bytes]:
    """Small valid files: synthetic DX (uncompressed, RLE, JPEG-LS) and pydicom's CT / MR."""
    synthesize_cohort(root / "synth", 3, seed=1, image_size=64)
    by_syntax: dict[str, Path] = {}
    for path in sorted((root / "synth").rglob("*.dcm")):
        syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        by_syntax.setdefault(syntax.name, path)
    seeds = {f"synth {name}": path.read_bytes() for name, path in by_syntax.items()}
    if not any("JPEG-LS" in name for name in seeds):  # three studies may not reach that site
        ds = pydicom.dcmread(by_syntax["Explicit VR Little Endian"])
        ds.compress(JPEGLSLossless, generate_instance_uid=False)
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        seeds["synth JPEG-LS Lossless"] = buffer.getvalue()
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_jp2klossless.dcm"):
        path = pydicom.data.get_testdata_file(name, download=False)
        if path is not None:
            seeds[name] = Path(path).read_bytes()
    return seeds


def _elements(data: bytes) -> list[tuple[int, str, int, bool]]:
    """(value offset, VR, length, explicit VR) of each top-level data element of a file."""
    ds = pydicom.dcmread(BytesIO(data))
    out = []
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.value_tell is not None:
            out.append((int(raw.value_tell), str(raw.VR), int(raw.length), not raw.is_implicit_VR))
    return out


# ---------------------------------------------------------------------------- mutations


def _length_field(vr: str, explicit: bool, value_at: int) -> tuple[int, int]:
    """(offset, size) of an element's length field."""
    if not explicit or vr in LONG_LENGTH_VRS:
        return value_at - 4, 4
    return value_at - 2, 2


def truncate(rng: np.random.Generator, data: bytes, elems: list) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def flip_bytes(rng: np.random.Generator, data: bytes, elems: list) -> bytes:
    out = bytearray(data)
    for at in rng.integers(128, len(out), size=int(rng.integers(1, 9))):
        out[at] ^= int(rng.integers(1, 256))
    return bytes(out)


def wrong_length(rng: np.random.Generator, data: bytes, elems: list) -> bytes:
    value_at, vr, length, explicit = elems[int(rng.integers(len(elems)))]
    at, size = _length_field(vr, explicit, value_at)
    choices = [*BAD_LENGTHS, length + 2, max(0, length - 2), int(rng.integers(0, 2**16))]
    new = choices[int(rng.integers(len(choices)))] % (2 ** (8 * size))
    out = bytearray(data)
    out[at : at + size] = new.to_bytes(size, "little")
    return bytes(out)


def bogus_vr(rng: np.random.Generator, data: bytes, elems: list) -> bytes:
    explicit = [e for e in elems if e[3]]
    if not explicit:
        return flip_bytes(rng, data, elems)
    value_at, vr, _, _ = explicit[int(rng.integers(len(explicit)))]
    at = value_at - (8 if vr in LONG_LENGTH_VRS else 4)
    out = bytearray(data)
    out[at : at + 2] = BOGUS_VRS[int(rng.integers(len(BOGUS_VRS)))]
    return bytes(out)


def noise_after_dicm(rng: np.random.Generator, data: bytes, elems: list) -> bytes:
    start = 132 + int(rng.integers(0, 400))
    if rng.random() < 0.3:  # everything after the preamble (and a bit) is noise
        return data[:start] + rng.bytes(int(rng.integers(0, 4096)))
    n = int(rng.integers(1, 256))
    return data[:start] + rng.bytes(n) + data[start + n :]


def huge_dimensions(rng: np.random.Generator, data: bytes, elems: list) -> bytes:
    ds = pydicom.dcmread(BytesIO(data))
    which = rng.integers(0, 4)
    if which in (0, 3):
        ds.Rows = HUGE[int(rng.integers(len(HUGE)))]
    if which in (1, 3):
        ds.Columns = HUGE[int(rng.integers(len(HUGE)))]
    if which == 2 or rng.random() < 0.3:
        choices = ["2147483647", "1000000", "65536", "0", "-3", "3", "2"]
        ds.NumberOfFrames = choices[int(rng.integers(len(choices)))]
    buffer = BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def two_at_once(rng: np.random.Generator, data: bytes, elems: list) -> bytes:
    """Any mutation, then one that needs no element offsets (the first may move them)."""
    first = MUTATIONS[int(rng.integers(len(MUTATIONS) - 1))]
    second = (truncate, flip_bytes, noise_after_dicm)[int(rng.integers(3))]
    mutated = first(rng, data, elems)
    return second(rng, mutated, elems) if len(mutated) > 132 else mutated


Mutation = Callable[[np.random.Generator, bytes, list], bytes]
MUTATIONS: list[Mutation] = [
    truncate,
    flip_bytes,
    wrong_length,
    bogus_vr,
    noise_after_dicm,
    huge_dimensions,
    two_at_once,  # last: it draws from the others
]


def make_mutants(root: Path) -> list[Path]:
    rng = np.random.default_rng(20240611)
    out = root / "mutants"
    out.mkdir()
    paths = []
    for s, (_name, data) in enumerate(sorted(_seeds(root).items())):
        elems = _elements(data)
        for i in range(MUTANTS_PER_SEED):
            mutation = MUTATIONS[i % len(MUTATIONS)]
            path = out / f"{s}-{i:03d}-{mutation.__name__}.dcm"
            path.write_bytes(mutation(rng, data, elems))
            paths.append(path)
    return paths


# ---------------------------------------------------------------------------- the run


def _outcome(reader: Callable[[Path], object], path: Path) -> str:
    try:
        reader(path)
    except UnreadableDicomError as err:
        assert err.reason in QUARANTINE_REASONS
        return err.reason
    return "ok"


@pytest.fixture
def quiet_pydicom() -> Iterator[None]:
    """pydicom logs a warning for every oddity it meets; a thousand broken files meet many."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.usefixtures("quiet_pydicom")
def test_mutated_files_are_read_or_quarantined_in_bounded_memory(tmp_path: Path) -> None:
    paths = make_mutants(tmp_path)
    assert len(paths) >= 1000
    assert len({p.read_bytes() for p in paths}) > 0.9 * len(paths)  # mostly distinct files

    def image(path: Path) -> object:
        # every third file asks for its first frame only, the others for the whole image
        frames = "first" if int(path.name.split("-")[1]) % 3 == 0 else "volume"
        return read_image(path, max_pixel_bytes=MAX_PIXEL_BYTES, frames=frames)

    outcomes: Counter[str] = Counter()
    crashes: list[str] = []
    # ru_maxrss is the process's high-water mark: it can only catch growth past earlier peaks
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    tracemalloc.start()
    try:
        for path in paths:
            for label, reader in (("header", read_header), ("image", image)):
                try:
                    outcomes[f"{label}:{_outcome(reader, path)}"] += 1
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException:  # a Rust codec's panic is a BaseException
                    crashes.append(f"{path.name} {label}: {traceback.format_exc(limit=3)}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    print(
        f"{len(paths)} mutants in {elapsed:.1f} s; peak {peak / 2**20:.1f} MiB traced, "
        f"RSS high-water +{rss_growth / 2**20:.1f} MiB; {sorted(outcomes.items())}"
    )

    assert not crashes, f"{len(crashes)} uncaught exceptions, first:\n" + "\n".join(crashes[:3])
    assert peak < PEAK_LIMIT
    assert rss_growth < PEAK_LIMIT
    # the mutations reach the interesting places: some files still read, most are quarantined
    # and more than one reason is exercised
    assert outcomes["image:ok"] > 0
    assert sum(1 for key in outcomes if key.startswith("image:") and key != "image:ok") >= 4
