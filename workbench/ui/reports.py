"""Reports: build the consistency report of a model on a cohort and download it
(HTML, PDF, JSON, CSV). The numbers are computed by :mod:`workbench.evaluation.report`, not here."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from workbench.model.bundle_info import list_bundles
from workbench.ui import data
from workbench.ui.auth import require_page
from workbench.ui.common import settings

log = logging.getLogger(__name__)

BUILT = "reports_built"  # session state: the files of the last report this user built
FORMATS = {
    ".html": ("HTML", "text/html"),
    ".pdf": ("PDF", "application/pdf"),
    ".json": ("JSON", "application/json"),
    ".csv": ("CSV", "text/csv"),
}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def build(model: str, cohort: str, actor: str) -> None:
    from workbench.evaluation.report import ReportError, build_report

    s = settings()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    out = s.home / "reports" / _slug(model) / _slug(cohort) / stamp
    try:
        with st.spinner(f"Building the report of {model} on {cohort}…"):
            files = build_report(s, model, cohort, out)
    except ReportError as err:
        st.error(f"The report could not be built: {err}")
        return
    try:
        data.record_report(s, actor, model, cohort, files)
    except (SQLAlchemyError, OSError) as err:
        log.warning("report build not audited: %s", err)
        st.warning("The report was built but its audit event could not be recorded.")
    st.session_state[BUILT] = {
        "model": model,
        "cohort": cohort,
        "files": [str(f) for f in files],
    }


def downloads(built: dict[str, Any]) -> None:
    model, cohort = str(built["model"]), str(built["cohort"])
    st.success(f"Report of **{model}** on cohort **{cohort}** is ready.")
    files = [Path(str(f)) for f in built["files"]]
    cols = st.columns(len(files))
    for col, path in zip(cols, files, strict=True):
        kind, mime = FORMATS.get(path.suffix, (path.suffix.lstrip(".").upper(), None))
        if not path.is_file():
            col.warning(f"{kind} is missing")
            continue
        col.download_button(
            f"Download {kind}",
            data=path.read_bytes(),
            file_name=f"{_slug(model)}_{_slug(cohort)}_{path.name}",
            mime=mime,
            on_click="ignore",
            icon=":material/download:",
            width="stretch",
            key=f"download_{path.suffix}",
        )


def main() -> None:
    reviewer = require_page("reports")
    s = settings()
    st.title("Consistency report")
    st.caption(
        "How well, how consistently and for whom a model works: performance with confidence "
        "intervals, calibration, subgroups and reader agreement, traced to the exact model "
        "bundle and inputs. The training cohort is evaluated on its test split only."
    )
    bundles = list_bundles(s.models_dir)
    cohorts = [c.name for c in data.cohort_summaries(s)]
    if not bundles or not cohorts:
        st.info("A report needs a trained model and a cohort with stored predictions.")
        return
    refs = {b.ref: b for b in bundles}
    left, right = st.columns(2)
    model = left.selectbox("Model", list(refs), key="report_model")
    trained_on = refs[model].contract.cohort
    cohort = right.selectbox(
        "Cohort",
        cohorts,
        index=cohorts.index(trained_on) if trained_on in cohorts else 0,
        key=f"report_cohort_{model}",
    )
    if st.button("Build report", type="primary", icon=":material/summarize:"):
        st.session_state.pop(BUILT, None)
        build(model, cohort, reviewer.name)
    built = st.session_state.get(BUILT)
    if isinstance(built, dict):
        downloads(built)


if __name__ == "__main__":
    main()
