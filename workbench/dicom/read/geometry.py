"""Series geometry: whether a series' slices stack into one volume."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from workbench.dicom.read.header import HeaderFacts

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
