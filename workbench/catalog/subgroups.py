"""The subgroups a report and a comparison break results down by: age bands, views,
manufacturers. Shared by training (the bundle's subgroup metrics), the report and compare, so
their groups match."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from sqlalchemy import select

from workbench.config import Settings
from workbench.db.store import Series, new_session

AGE_BANDS: tuple[tuple[int | None, int | None, str], ...] = (
    (None, 40, "<40"),
    (40, 60, "40-59"),
    (60, 80, "60-79"),
    (80, None, "80+"),
)
UNKNOWN = "unknown"
#: The subgroup attributes results are broken down by, in the order reports show them, with
#: their headings (the report, compare and training's subgroup metrics use the same ones).
SUBGROUP_ATTRS: tuple[tuple[str, str], ...] = (
    ("site", "Site"),
    ("manufacturer", "Manufacturer"),
    ("sex", "Sex"),
    ("age_band", "Age band (years)"),
    ("view", "Views"),
)


def age_band(age: int | None) -> str:
    """The band of an age in years (``AGE_BANDS``), or ``unknown``."""
    if age is None:
        return UNKNOWN
    for lo, hi, name in AGE_BANDS:
        if (lo is None or age >= lo) and (hi is None or age < hi):
            return name
    return UNKNOWN


def manufacturers(settings: Settings, study_ids: Sequence[int]) -> dict[int, str]:
    """study id → manufacturer of its series ('+'-joined when they differ), from the catalog."""
    found: dict[int, set[str]] = defaultdict(set)
    if not study_ids:
        return {}
    with new_session(settings.database_url) as session:
        q = select(Series.study_id, Series.manufacturer).where(Series.study_id.in_(list(study_ids)))
        for sid, maker in session.execute(q):
            found[sid].add(maker or UNKNOWN)
    return {sid: "+".join(sorted(v)) for sid, v in found.items()}


def view_group(views: Sequence[str]) -> str:
    """A study's views as one group name: sorted, '+'-joined ("LL+PA")."""
    return "+".join(sorted({v or UNKNOWN for v in views})) or UNKNOWN
