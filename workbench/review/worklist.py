"""A labelling worklist: the studies ``workbench suggest`` ranked for reading, stored as
``HOME/suggestions/COHORT.json`` (study keys only). No torch here: the app and the command
line read worklists without loading a model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workbench.config import Settings

#: How ``workbench suggest`` can rank (see :mod:`workbench.review.suggest`).
STRATEGIES: tuple[str, ...] = ("entropy", "margin", "set-size", "ensemble-disagreement", "coreset")
#: The format of the stored worklist.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Suggestion:
    """One study worth a read: its place in the list, its pseudonymous key, the score that put
    it in the pool, what the model(s) predict now, and the conformal set size when known."""

    rank: int
    study_key: str
    score: float
    predicted: str
    set_size: int | None = None
    # the stored prediction (no heat map) that the labelling page opens and reads attach to
    prediction_id: int | None = None


@dataclass(frozen=True)
class Worklist:
    """A ranked labelling worklist for a cohort (``HOME/suggestions/COHORT.json``)."""

    cohort: str
    models: tuple[str, ...]
    strategy: str
    n_unlabelled: int
    n_labelled_reference: int
    suggestions: tuple[Suggestion, ...]
    classes: tuple[str, ...] = ()
    multilabel: bool = False  # a read names every finding present (sigmoid models)
    negative_class: str | None = None  # a multi-label read of no finding (e.g. "normal")
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Worklist:
        return cls(
            cohort=d["cohort"],
            models=tuple(d["models"]),
            strategy=d["strategy"],
            n_unlabelled=int(d["n_unlabelled"]),
            n_labelled_reference=int(d["n_labelled_reference"]),
            suggestions=tuple(Suggestion(**s) for s in d["suggestions"]),
            classes=tuple(d.get("classes", ())),
            multilabel=bool(d.get("multilabel", False)),
            negative_class=d.get("negative_class"),
            created=d["created"],
        )

    def line(self) -> str:
        return (
            f"{len(self.suggestions)} of {self.n_unlabelled} unlabelled studies of "
            f"{self.cohort!r} suggested for reading ({self.strategy}, "
            f"{' + '.join(self.models)})"
        )


def worklist_path(settings: Settings, cohort: str) -> Path:
    return settings.home / "suggestions" / f"{cohort}.json"


def worklist_cohorts(settings: Settings) -> list[str]:
    """The cohorts that have a stored worklist, by name."""
    folder = settings.home / "suggestions"
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def load_worklist(settings: Settings, cohort: str) -> Worklist | None:
    """The cohort's latest stored worklist, or None."""
    path = worklist_path(settings, cohort)
    if not path.exists():
        return None
    return Worklist.from_dict(json.loads(path.read_text(encoding="utf-8")))
