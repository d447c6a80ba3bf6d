"""Cohorts made from real anatomy: findings planted into images that ship inside packages.

Our synthetic chest cohort (:mod:`workbench.dicom.synth`) is one test among several. This
module takes real scans that a package ships (pydicom's ``CT_small.dcm``, a 128 x 128 axial
CT slice, and ``MR_small.dcm``, a 64 x 64 MR slice; any other single-frame grayscale file by
path) and writes a labelled cohort of one-slice studies, each a fresh copy with new UIDs and a
fake patient. Variety between studies comes from flips, a small shift, an intensity scale and
noise; findings are drawn into the stored pixel values at a chosen size and contrast:

* ``binary``: ``lesion`` (a bright disc) or ``no_lesion``;
* ``multiclass``: ``disc``, ``bar`` (an elongated bright band) or ``no_finding``;
* ``multilabel``: any subset of ``disc`` and ``bar`` (``bar;disc``; ``no_finding`` for neither).

The finding's contrast is a fraction of the source image's own 1st-99th percentile range,
its radius a fraction of the image side, so the same recipe makes plainly visible and subtle
findings on any source. Nothing here is real patient data: the sources are the packages' public
test images, every identity is fake, and the output is deterministic for a seed.
"""

from __future__ import annotations

import copy
import csv
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from workbench.errors import NotFoundError, UsageError

Task = Literal["binary", "multiclass", "multilabel"]

#: pydicom's public test images of real anatomy (one slice each), by name.
PACKAGE_SOURCES = ("CT_small.dcm", "MR_small.dcm")


@dataclass(frozen=True)
class PlantedCohort:
    out: Path
    labels_csv: Path
    n_studies: int
    class_counts: dict[str, int]
    sources: tuple[str, ...]


def package_source(name: str) -> Path:
    """The path of one of pydicom's bundled test files (never downloaded)."""
    import pydicom.data

    path = pydicom.data.get_testdata_file(name, download=False)  # never from the network
    if path is None:
        raise NotFoundError(f"{name} is not bundled with this pydicom")
    return Path(path)


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d = np.hypot(yy - cy, xx - cx)
    return np.clip(r + 0.5 - d, 0.0, 1.0)  # anti-aliased edge


def _bar(shape: tuple[int, int], cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    u = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
    v = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
    along = np.clip(2.5 * r + 0.5 - np.abs(u), 0.0, 1.0)
    across = np.clip(0.45 * r + 0.5 - np.abs(v), 0.0, 1.0)
    return along * across


def _labels(task: Task, k: int) -> list[str]:
    if task == "binary":
        return ["lesion"] if k % 2 else []
    if task == "multiclass":
        return [("no_finding", "disc", "bar")[k % 3]] if k % 3 else []
    return [["disc"], ["bar"], ["disc", "bar"], []][k % 4]


def _label_text(task: Task, findings: list[str]) -> str:
    if task == "binary":
        return "lesion" if findings else "no_lesion"
    if not findings:
        return "no_finding"
    return ";".join(sorted(findings))


def planted_cohort(
    out: Path,
    n_studies: int,
    seed: int,
    task: Task = "binary",
    sources: Sequence[str | Path] = PACKAGE_SOURCES,
    radius: tuple[float, float] = (0.06, 0.1),
    contrast: tuple[float, float] = (0.35, 0.6),
) -> PlantedCohort:
    """Write ``n_studies`` one-slice studies under ``out`` with ``labels.csv``.

    Args:
        sources: package test-file names (:data:`PACKAGE_SOURCES`) or paths of single-frame
            grayscale DICOM files; studies cycle through them.
        radius: the finding's radius as a fraction of the image side, drawn uniformly.
        contrast: the finding's added intensity as a fraction of the source's 1st-99th
            percentile range, drawn uniformly.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bases: list[tuple[Dataset, np.ndarray, float]] = []
    for src in sources:
        path = Path(src) if Path(src).exists() else package_source(str(src))
        source = pydicom.dcmread(path)
        px = source.pixel_array.astype(np.float64)
        if px.ndim != 2:
            raise UsageError(f"{path.name}: a single-frame grayscale image is needed")
        lo, hi = np.percentile(px, [1, 99])
        bases.append((source, px, float(hi - lo)))
    rows: list[tuple[str, str]] = []
    findings_out: dict[str, list[dict[str, float | str]]] = {}
    order = rng.permutation(n_studies)  # labels balanced, their order shuffled
    for n in range(n_studies):
        ds0, px0, span = bases[n % len(bases)]
        ds = copy.deepcopy(ds0)
        px = px0.copy()
        if rng.random() < 0.5:
            px = px[:, ::-1]
        shift = rng.integers(-px.shape[0] // 16, px.shape[0] // 16 + 1, size=2)
        px = np.roll(px, tuple(int(s) for s in shift), axis=(0, 1))
        px = px * rng.uniform(0.9, 1.1) + rng.normal(0.0, 0.02 * span, px.shape)
        side = min(px.shape)
        drawn: list[dict[str, float | str]] = []
        for name in _labels(task, int(order[n])):
            r = rng.uniform(*radius) * side
            cy, cx = rng.uniform(0.25, 0.75, size=2) * np.asarray(px.shape)
            if name in ("lesion", "disc"):
                mask = _disc(px.shape, cy, cx, r)
            else:
                mask = _bar(px.shape, cy, cx, r, float(rng.uniform(0, np.pi)))
            px = px + mask * rng.uniform(*contrast) * span
            drawn.append({"finding": name, "center_row": cy, "center_col": cx, "radius_px": r})
        stored = _stored(ds, px)
        study_uid = generate_uid(entropy_srcs=["plant", str(seed), str(n), "study"])
        _rewrite(ds, stored, n, seed, study_uid)
        path = out / f"p{n:05d}" / "s1" / "0001.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        label = _label_text(task, [str(d["finding"]) for d in drawn])
        rows.append((str(study_uid), label))
        if drawn:
            findings_out[str(study_uid)] = drawn
    labels_csv = out / "labels.csv"
    with labels_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["StudyInstanceUID", "label"])
        writer.writerows(rows)
    (out / "findings.json").write_text(json.dumps(findings_out, indent=1, sort_keys=True))
    names = tuple(Path(s).name for s in sources)
    return PlantedCohort(out, labels_csv, n_studies, dict(Counter(r[1] for r in rows)), names)


def _stored(ds: Dataset, px: np.ndarray) -> np.ndarray:
    """``px`` clipped to the stored type's range and cast to it."""
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    bits = int(ds.BitsStored)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    dtype = np.int16 if signed else np.uint16
    return np.clip(np.rint(px), lo, hi).astype(dtype)


def _rewrite(ds: Dataset, stored: np.ndarray, n: int, seed: int, study_uid: str) -> None:
    """New pixels, uncompressed, fresh UIDs and an obviously fake identity."""
    ent = ["plant", str(seed), str(n)]
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.PixelData = stored.tobytes()
    ds.Rows, ds.Columns = stored.shape
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*ent, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[*ent, "sop"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = f"FAKEID-PLANT-{seed}-{n:05d}"
    ds.PatientName = f"Fake^Planted{n:05d}"
    ds.AccessionNumber = f"FAKEACC-{seed}-{n:05d}"
    ds.InstanceNumber = 1
    for tag in ("SmallestImagePixelValue", "LargestImagePixelValue"):  # no longer true
        if tag in ds:
            del ds[tag]
