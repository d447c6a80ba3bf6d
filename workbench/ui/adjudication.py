"""Adjudication (admins): studies whose readers disagree, each reader's current read side by
side, and the admin's settling read (stored as a review of kind "adjudication", audited)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from workbench.review import reviews as review_store
from workbench.ui.auth import require_page
from workbench.ui.common import settings


def main() -> None:
    reviewer = require_page("adjudication")
    s = settings()
    st.title("Adjudication")
    if st.session_state.get("adjudicated"):
        st.success(f"Adjudication #{st.session_state['adjudicated']} saved.")
    disputes = review_store.disputes(s)
    if not disputes:
        st.success("No disagreements between readers are waiting for adjudication.")
        return
    st.caption(f"{len(disputes)} studies where readers disagree, oldest first.")
    for d in disputes:
        with st.container(border=True):
            st.subheader(f"Study {d.study_key}")
            st.caption(f"{d.model} predicted {d.predicted_label}")
            st.dataframe(
                pd.DataFrame(
                    {
                        "Reader": [r.reviewer for r in d.reads],
                        "Version": [r.version for r in d.reads],
                        "Assessment": ["agreed" if r.agree else "disagreed" for r in d.reads],
                        "Label": [r.label for r in d.reads],
                        "Confidence": [r.confidence for r in d.reads],
                        "Comment": [r.comment for r in d.reads],
                    }
                ),
                hide_index=True,
                width="stretch",
            )
            key = f"adjudicate_{d.prediction_id}"
            with st.form(key):
                label = st.selectbox("Final label", d.classes, key=f"{key}_label")
                reason = st.text_input("Reason", key=f"{key}_reason", max_chars=1000)
                done = st.form_submit_button("Adjudicate", type="primary")
            if done:
                if not reason.strip():
                    st.error("Give the reason for the final label.")
                    continue
                saved = review_store.save_review(
                    s,
                    reviewer.name,
                    d.prediction_id,
                    agree=label == d.predicted_label,
                    label=str(label),
                    comment=reason,
                    role=reviewer.role,
                    kind="adjudication",
                    reason=reason,
                )
                st.session_state["adjudicated"] = saved.id
                st.rerun()


if __name__ == "__main__":
    main()
