"""Worklist: one model's newest prediction per study, the most urgent (highest calibrated
probability of a finding) first and, among equals, the least certain (larger prediction set,
probability nearer 0.5) first; with each study's prediction set, out-of-distribution badge and
review status, filtered by cohort, modality, site, status and OOD flag."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from workbench.predict.results import probability_text
from workbench.ui import data
from workbench.ui.auth import Reviewer, require_page
from workbench.ui.common import (
    OPEN_PREDICTION,
    WORKLIST_MODEL,
    format_top_k,
    page_file,
    settings,
    styled,
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


PICK = "worklist_pick"
# Set by the "Open study" button's callback: the next run of this page goes straight to the
# study page instead of reading and sending the whole worklist again first.
SWITCH_TO_STUDY = "worklist_switch_to_study"


def _choose_study() -> None:
    """The "Open study" button's callback: it runs before the rerun the click starts."""
    chosen = st.session_state.get(PICK)
    if chosen is not None:
        st.session_state[OPEN_PREDICTION] = int(chosen)
        st.session_state[SWITCH_TO_STUDY] = True


OOD_FILTERS = ("All", "Flagged", "Not flagged")
OOD_BADGE = "⚠ OOD"
ALL = "All"


def table(rows: list[data.WorklistRow]) -> pd.DataFrame:
    """The worklist as numbers: "Probability" is the calibrated probability in [0, 1], full
    precision (the column sorts by it); :func:`~workbench.ui.common.styled` says it as text."""
    return pd.DataFrame(
        {
            "Study": [r.study_key for r in rows],
            "Site": [r.site or "" for r in rows],
            "Modality": [r.modality or "" for r in rows],
            "Predicted": [r.predicted_label for r in rows],
            "Top finding": [r.top_finding for r in rows],
            "Probability": [r.priority if r.scored else None for r in rows],
            "Prediction set": [data.set_short(r.prediction_set, r.predicted_label) for r in rows],
            "OOD": [OOD_BADGE if r.ood_flag else "" for r in rows],
            "Top-k": [format_top_k(r.top_k) for r in rows],
            "Review": [STATUS_TEXT[r.status] for r in rows],
        }
    )


def _choices(values: list[str | None]) -> list[str]:
    return [ALL, *sorted({v for v in values if v})]


def filters(rows: list[data.WorklistRow]) -> list[data.WorklistRow]:
    """The cohort, modality, site and OOD filters (the status filter is the "Show" radio)."""
    c1, c2, c3, c4 = st.columns(4)
    cohort = c1.selectbox(
        "Cohort",
        _choices([c for r in rows for c in r.cohorts]),
        key="worklist_cohort",
        persist_state="session",
    )
    modality = c2.selectbox(
        "Modality",
        _choices([r.modality for r in rows]),
        key="worklist_modality",
        persist_state="session",
    )
    site = c3.selectbox(
        "Site", _choices([r.site for r in rows]), key="worklist_site", persist_state="session"
    )
    ood = c4.selectbox(
        "Out of distribution", OOD_FILTERS, key="worklist_ood", persist_state="session"
    )
    return [
        r
        for r in rows
        if (cohort == ALL or cohort in r.cohorts)
        and (modality == ALL or r.modality == modality)
        and (site == ALL or r.site == site)
        and (ood == "All" or r.ood_flag == (ood == "Flagged"))
    ]


def main() -> None:
    reviewer = require_page("worklist")
    if st.session_state.pop(SWITCH_TO_STUDY, False):
        # The click on "Open study": switch before the worklist is read (a database query, the
        # table sent again) only to be replaced by the study page.
        st.switch_page(str(page_file("study")))
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
    rows = filters(rows)
    counts = {k: sum(r.status == k for r in rows) for k in STATUS_TEXT}
    n_ood = sum(r.ood_flag for r in rows)
    st.caption(
        f"{len(rows)} studies · "
        + " · ".join(f"{n} {STATUS_TEXT[k].lower()}" for k, n in counts.items() if n)
        + (f" · {n_ood} out of distribution" if n_ood else "")
        + ". Sorted by the calibrated probability of the most probable finding, highest first;"
        " among equals the least certain (larger prediction set) first."
    )
    if shown in SHOWN:
        rows = [r for r in rows if r.status in SHOWN[shown]]
    if not rows:
        st.success(f"Nothing to show under “{shown}”.")
        return

    st.dataframe(
        styled(table(rows)),
        hide_index=True,
        width="stretch",
        column_config={
            "Probability": st.column_config.NumberColumn(
                "Probability", help="Calibrated probability of the top finding"
            ),
            "Prediction set": st.column_config.TextColumn(
                "Prediction set", help="Classes the conformal prediction set keeps open"
            ),
            "OOD": st.column_config.TextColumn(
                "OOD", help="Out of distribution: the model's scores are not valid here"
            ),
            "Review": st.column_config.TextColumn("Review", help="Latest review of the study"),
        },
    )

    by_id = {r.prediction_id: r for r in rows}
    pick, go = st.columns([3, 1], vertical_alignment="bottom")
    pick.selectbox(
        "Study to open",
        options=list(by_id),
        format_func=lambda p: (
            f"{by_id[p].study_key} · {by_id[p].top_finding} {probability_text(by_id[p].priority)}"
            + (" · out of distribution" if by_id[p].ood_flag else "")
            + f" · {STATUS_TEXT[by_id[p].status].lower()}"
        ),
        key=PICK,
    )
    go.button(
        "Open study",
        type="primary",
        icon=":material/radiology:",
        width="stretch",
        on_click=_choose_study,
    )


if __name__ == "__main__":
    main()
