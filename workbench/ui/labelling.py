"""Labelling (clinicians, admins): read the studies ``workbench suggest`` ranked for a cohort.

The model's output is hidden until the reader asks for it, so that a read is not anchored by the
model; whether it was shown is stored with the read (``review.model_visible``). A read is a
review of the study's stored prediction: versions, blind second reads and adjudication work as
on the review pages, and ``workbench cohort from-reads`` turns the reads into labels.
"""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from workbench.config import Settings
from workbench.review import reviews as review_store
from workbench.review.worklist import Worklist, load_worklist, worklist_cohorts
from workbench.ui import data, imaging
from workbench.ui.auth import Reviewer, require_page
from workbench.ui.common import settings
from workbench.ui.study import CONFIDENCE, view_name

SHOW_MODEL = "labelling_show_model"


def worklist_table(worklist: Worklist, mine: dict[int, int]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "Rank": [x.rank for x in worklist.suggestions],
            "Study": [x.study_key for x in worklist.suggestions],
            "Your read": [
                f"version {mine[x.prediction_id]}" if x.prediction_id in mine else "not yet"
                for x in worklist.suggestions
            ],
        }
    )


def images(s: Settings, detail: data.PredictionDetail) -> None:
    """The study's images as stored for display, with no heat map."""
    cols = st.columns(max(1, min(3, len(detail.images))))
    for n, image in enumerate(detail.images):
        pixels = imaging.load_display(s, image.cache_key)
        with cols[n % len(cols)]:
            if pixels is None:
                st.warning(f"{view_name(image.view)}: not in the cache (re-run ingest)")
                continue
            middle = imaging.n_slices(pixels) // 2
            st.image(
                imaging.png(imaging.to_grey(imaging.reduce(imaging.plane(pixels, middle)))),
                caption=view_name(image.view),
            )


def model_output(detail: data.PredictionDetail) -> None:
    st.dataframe(
        pd.DataFrame(
            {
                "Class": list(detail.probabilities),
                "Probability": list(detail.probabilities.values()),
            }
        ),
        hide_index=True,
    )
    st.caption(f"{detail.model_name} {detail.model_version} predicted {detail.predicted_label}.")


def read_form(
    s: Settings, reviewer: Reviewer, worklist: Worklist, detail: data.PredictionDetail
) -> None:
    key = f"label_{detail.prediction_id}"
    mine = review_store.reviews_for(s, detail.prediction_id, reviewer=reviewer.name)
    current = mine[0] if mine else None
    opened = st.session_state.setdefault(f"{key}_opened", time.time())
    classes = list(worklist.classes or detail.classes)
    with st.form(f"{key}_form"):
        if worklist.multilabel:
            options = classes + ([worklist.negative_class] if worklist.negative_class else [])
            chosen = st.multiselect(
                "Findings present"
                + (f" (none: {worklist.negative_class})" if worklist.negative_class else ""),
                options,
                default=[c for c in current.corrected_labels if c in options] if current else [],
                key=f"{key}_findings",
            )
        else:
            label = st.selectbox(
                "Label",
                classes,
                index=classes.index(current.label)
                if current and current.label in classes
                else None,
                key=f"{key}_label",
            )
            chosen = [label] if label else []
        confidence = st.select_slider(
            "Confidence",
            options=list(CONFIDENCE),
            value=current.confidence if current and current.confidence else 3,
            format_func=lambda c: CONFIDENCE[c],
            key=f"{key}_confidence",
        )
        comment = st.text_area("Comment", max_chars=4000, key=f"{key}_comment")
        reason = ""
        if current is not None:
            reason = st.text_input(
                "Why do you change your read? (the earlier version is kept)", key=f"{key}_reason"
            )
        submitted = st.form_submit_button(
            "Save read" if current is None else "Save new version", type="primary"
        )
    receipt_key = f"{key}_receipt"
    if not submitted:
        if st.session_state.get(receipt_key) is not None:
            st.success(
                f"Read #{st.session_state[receipt_key]} saved and recorded in the audit log."
            )
        return
    problem = validate_read(chosen, worklist.negative_class, worklist.multilabel)
    if problem is None and current is not None and not reason.strip():
        problem = "Say why you change your read."
    if problem:
        st.error(problem)
        return
    labels = list(chosen)
    try:
        saved = review_store.save_review(
            s,
            reviewer.name,
            detail.prediction_id,
            agree=";".join(sorted(labels)) == detail.predicted_label,
            label=labels[0],
            comment=comment,
            role=reviewer.role,
            confidence=int(confidence),
            reason=reason,
            seconds_spent=round(time.time() - float(opened), 1),
            corrected_labels=labels,
            model_visible=bool(st.session_state.get(SHOW_MODEL, False)),
            negative_class=worklist.negative_class,
        )
    except review_store.ReviewError as err:
        st.error(f"The read was not saved: {err}. Your entries are kept above.")
    except (SQLAlchemyError, OSError) as err:
        st.error(f"The read was not saved: the database reported “{err}”. Submit again later.")
    else:
        st.session_state[f"{key}_opened"] = time.time()  # a next version's own time
        st.session_state[receipt_key] = saved.id
        st.rerun()  # the list shows the read, the form its next version


def validate_read(chosen: list[str], negative: str | None, multilabel: bool) -> str | None:
    """Why a read cannot be saved yet, or None."""
    if not chosen:
        return "Choose the findings present." if multilabel else "Choose a label."
    if multilabel and negative in chosen and len(chosen) > 1:
        return f"“{negative}” means no finding: choose it alone, or only the findings."
    return None


def main() -> None:
    reviewer = require_page("labelling")
    s = settings()
    st.title("Labelling")
    cohorts = worklist_cohorts(s)
    if not cohorts:
        st.info("No labelling worklist yet: run `workbench suggest --cohort NAME`.")
        return
    cohort = st.selectbox("Cohort", cohorts, key="labelling_cohort")
    worklist = load_worklist(s, str(cohort))
    if worklist is None or not worklist.suggestions:
        st.info("This cohort's worklist is empty.")
        return
    st.caption(
        f"{len(worklist.suggestions)} studies suggested by {worklist.strategy} "
        f"({' + '.join(worklist.models)}), most useful first."
    )
    ids = [x.prediction_id for x in worklist.suggestions if x.prediction_id is not None]
    mine = review_store.read_versions(s, reviewer.name, ids)
    st.dataframe(worklist_table(worklist, mine), hide_index=True)
    readable = [x for x in worklist.suggestions if x.prediction_id is not None]
    first_unread = next((x for x in readable if x.prediction_id not in mine), readable[0])
    choice = st.selectbox(
        "Study to read",
        [x.study_key for x in readable],
        index=readable.index(first_unread),
        key=f"labelling_study_{cohort}",
    )
    item = next(x for x in readable if x.study_key == choice)
    assert item.prediction_id is not None
    detail = data.load_prediction(s, item.prediction_id)
    if detail is None:
        st.warning("This study's prediction is gone; run `workbench suggest` again.")
        return
    left, right = st.columns([3, 2], gap="large")
    with left:
        images(s, detail)
    with right:
        st.toggle(
            "Show the model's output",
            value=False,
            key=SHOW_MODEL,
            help="Off by default so that your read is not anchored; recorded with the read.",
        )
        if st.session_state.get(SHOW_MODEL):
            model_output(detail)
        read_form(s, reviewer, worklist, detail)


if __name__ == "__main__":
    main()
