"""What every page shares: where the page files are, the settings, small formatting helpers.

Pages are files in this folder, registered by ``streamlit_app.py`` with ``st.navigation``; they
are addressed by absolute path so the app runs from any working directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pandas as pd
from pandas.io.formats.style import Styler

from workbench.config import Settings, get_settings
from workbench.predict.results import probability_text

PageName = Literal[
    "signin",
    "worklist",
    "study",
    "labelling",
    "cohorts",
    "reports",
    "audit",
    "adjudication",
    "models",
]

_HERE = Path(__file__).resolve().parent
PAGE_FILES: dict[PageName, str] = {
    "signin": "signin.py",
    "worklist": "worklist.py",
    "study": "study.py",
    "labelling": "labelling.py",
    "cohorts": "cohorts.py",
    "reports": "reports.py",
    "audit": "audit.py",
    "adjudication": "adjudication.py",
    "models": "models.py",
}

# Session-state keys shared between pages (per user: st.session_state is per browser session).
OPEN_PREDICTION = "open_prediction_id"
WORKLIST_MODEL = "worklist_model"


def page_file(name: PageName) -> Path:
    """Absolute path of a page's script."""
    return _HERE / PAGE_FILES[name]


def settings() -> Settings:
    """The workbench settings from the environment (cheap; read on every run)."""
    return get_settings()


def format_top_k(top_k: Sequence[tuple[str, float]]) -> str:
    return " · ".join(f"{label} {probability_text(p)}" for label, p in top_k)


def styled(frame: pd.DataFrame, columns: Sequence[str] = ("Probability",)) -> Styler:
    """A table whose probability columns (numbers in [0, 1]) read as
    :func:`~workbench.predict.results.probability_text` ("<1%", "37%", ">99%") while the cells keep
    their numbers, so that a column still sorts by value. Show it with a ``NumberColumn``
    without a format (a format, or a progress bar's label, would replace this text and round
    0.9996 to "100%")."""

    def text(p: object) -> str:
        return probability_text(float(p) if isinstance(p, int | float) else None)

    return frame.style.format({c: text for c in columns if c in frame.columns}, na_rep="")
