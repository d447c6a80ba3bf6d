"""What every page shares: where the page files are, the settings, small formatting helpers.

Pages are files in this folder, registered by ``streamlit_app.py`` with ``st.navigation``; they
are addressed by absolute path so the app runs from any working directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from workbench.config import Settings, get_settings

PageName = Literal[
    "signin", "worklist", "study", "cohorts", "reports", "audit", "adjudication", "models"
]

_HERE = Path(__file__).resolve().parent
PAGE_FILES: dict[PageName, str] = {
    "signin": "signin.py",
    "worklist": "worklist.py",
    "study": "study.py",
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


def percent(p: float) -> str:
    return f"{100.0 * p:.0f}%" if p >= 0.01 or p == 0 else "<1%"


def format_top_k(top_k: Sequence[tuple[str, float]]) -> str:
    return " · ".join(f"{label} {percent(p)}" for label, p in top_k)
