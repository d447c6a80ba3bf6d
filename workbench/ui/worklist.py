"""Worklist: one model's newest prediction per study, the most urgent (highest calibrated
probability of a finding) first, with each study's review status."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from workbench.ui import data
from workbench.ui.auth import Reviewer, require_page
from workbench.ui.common import (
    OPEN_PREDICTION,
    WORKLIST_MODEL,
    format_top_k,
    page_file,
    percent,
    settings,
)

STATUS_TEXT = {
    "unreviewed": "Unreviewed",
    "agreed": "Agreed",
    "disagreed": "Disagreed",
    "disputed": "Disputed",
    "read_by_other": "Second read open",
}
FILTERS = ("All", "Unreviewed", "Reviewed", "Disputed")
SHOWN: dict[str, set[str]] = {
    "Unreviewed": {"unreviewed"},
    "Reviewed": {"agreed", "disagreed", "read_by_other"},
    "Disputed": {"disputed"},
}


def blind_viewer(reviewer: Reviewer) -> str | None:
    """Clinicians read blind to each other; admins (who adjudicate) see every read."""
    return reviewer.name if reviewer.role == "clinician" else None


def open_study(prediction_id: int) -> None:
    """Open one prediction on the study page."""
    st.session_state[OPEN_PREDICTION] = int(prediction_id)
    st.switch_page(str(page_file("study")))


def table(rows: list[data.WorklistRow]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "Study": [r.study_key for r in rows],
            "Site": [r.site or "" for r in rows],
            "Modality": [r.modality or "" for r in rows],
            "Predicted": [r.predicted_label for r in rows],
            "Top finding": [r.top_finding for r in rows],
            "Probability": [round(100.0 * r.priority, 1) for r in rows],
            "Top-k": [format_top_k(r.top_k) for r in rows],
            "Review": [STATUS_TEXT[r.status] for r in rows],
        }
    )


def main() -> None:
    reviewer = require_page("worklist")
    s = settings()
    st.title("Worklist")

    models = data.list_models(s)
    if not models:
        st.info("No predictions yet. Train a model and run `workbench predict` on a cohort.")
        return
    by_hash = {m.bundle_hash: m for m in models}
    if st.session_state.get(WORKLIST_MODEL) not in by_hash:
        st.session_state.pop(WORKLIST_MODEL, None)  # the newest model is the default
    top = st.columns([2, 1])
    bundle_hash = top[0].selectbox(
        "Model",
        options=list(by_hash),
        format_func=lambda h: f"{by_hash[h].label} · {by_hash[h].studies} studies",
        key=WORKLIST_MODEL,
        persist_state="session",
    )
    shown = top[1].radio(
        "Show", FILTERS, horizontal=True, key="worklist_filter", persist_state="session"
    )

    rows = data.worklist(s, bundle_hash, viewer=blind_viewer(reviewer))
    counts = {k: sum(r.status == k for r in rows) for k in STATUS_TEXT}
    st.caption(
        f"{len(rows)} studies · "
        + " · ".join(f"{n} {STATUS_TEXT[k].lower()}" for k, n in counts.items() if n)
        + ". Sorted by the calibrated probability of the most probable finding, highest first."
    )
    if shown in SHOWN:
        rows = [r for r in rows if r.status in SHOWN[shown]]
    if not rows:
        st.success(f"Nothing to show under “{shown}”.")
        return

    st.dataframe(
        table(rows),
        hide_index=True,
        width="stretch",
        column_config={
            "Probability": st.column_config.ProgressColumn(
                "Probability",
                help="Calibrated probability of the top finding",
                format="%.0f%%",
                min_value=0,
                max_value=100,
            ),
            "Review": st.column_config.TextColumn("Review", help="Latest review of the study"),
        },
    )

    by_id = {r.prediction_id: r for r in rows}
    pick, go = st.columns([3, 1], vertical_alignment="bottom")
    chosen = pick.selectbox(
        "Study to open",
        options=list(by_id),
        format_func=lambda p: (
            f"{by_id[p].study_key} · {by_id[p].top_finding} {percent(by_id[p].priority)}"
            f" · {STATUS_TEXT[by_id[p].status].lower()}"
        ),
        key="worklist_pick",
    )
    if go.button("Open study", type="primary", icon=":material/radiology:", width="stretch"):
        open_study(chosen)


if __name__ == "__main__":
    main()
