"""One evaluated study of the report: catalog facts, its latest prediction and reviews."""

from __future__ import annotations

from dataclasses import dataclass

from workbench.catalog.subgroups import UNKNOWN


@dataclass(frozen=True)
class Case:
    """One evaluated study: catalog facts, its latest prediction and its latest reviews."""

    study_key: str
    patient: str
    split: str | None
    site: str
    sex: str
    age_band: str
    label: str
    label_index: int
    predicted_label: str
    probabilities: tuple[float, ...]  # calibrated, in the bundle's class order
    raw_probabilities: tuple[float, ...]  # uncalibrated softmax
    pixel_hashes: tuple[str, ...]  # as the prediction recorded them
    pixels_changed: bool  # the catalog's pixel hashes differ from the prediction's
    transform_hash: str
    code_version: str
    reviews: tuple[tuple[str, str], ...] = ()  # (reviewer, label), latest per reviewer
    ood: bool | None = None  # flagged out-of-distribution, where the prediction says so
    manufacturer: str = UNKNOWN  # of the study's series ('+'-joined when they differ)
    view: str = UNKNOWN  # the study's view positions, sorted and '+'-joined (e.g. "LL+PA")
    calibration_map: str | None = None  # "site:NAME" or "global"; None: not recorded (older)
