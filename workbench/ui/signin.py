"""Sign-in: a reviewer's name is enough for now (see :mod:`workbench.ui.auth` for the seam)."""

from __future__ import annotations

import streamlit as st

from workbench.ui.auth import SignInError, authenticate, current_reviewer, sign_in, sign_out
from workbench.ui.common import page_file

DISCLAIMER = (
    "Decision support under clinician review; not for autonomous diagnosis. "
    "Patients are shown by pseudonym and study key only."
)


def main() -> None:
    st.title("Clinician review workbench")
    reviewer = current_reviewer()
    if reviewer is not None:
        st.success(f"Signed in as **{reviewer.name}** ({reviewer.role}).")
        st.page_link(str(page_file("worklist")), label="Open the worklist", icon=":material/list:")
        if st.button("Sign out", icon=":material/logout:"):
            sign_out()
            st.rerun()
        st.caption(DISCLAIMER)
        return

    with st.form("sign_in"):
        name = st.text_input("Your name", key="signin_name", placeholder="e.g. Dr A. Rivera")
        submitted = st.form_submit_button("Sign in", type="primary", icon=":material/login:")
    if submitted:
        try:
            reviewer = authenticate(name)
        except SignInError as err:
            st.error(str(err))
        else:
            sign_in(reviewer)
            st.switch_page(str(page_file("worklist")))
    st.caption(DISCLAIMER)


if __name__ == "__main__":
    main()
