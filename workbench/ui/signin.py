"""Sign-in with a user name and password (accounts: ``workbench users``); once signed in, the
account page with the way to each page the role may open."""

from __future__ import annotations

import streamlit as st

from workbench.ui.auth import (
    FLASH,
    GO_HOME,
    HOME,
    SignInError,
    allowed_pages,
    authenticate,
    current_reviewer,
    sign_in,
    sign_out,
)
from workbench.ui.common import page_file
from workbench.ui.preload import preload_review_widgets

DISCLAIMER = (
    "Decision support under clinician review; not for autonomous diagnosis. "
    "Patients are shown by pseudonym and study key only."
)
TITLES = {
    "worklist": "Worklist",
    "study": "Study",
    "adjudication": "Adjudication",
    "cohorts": "Cohorts and models",
    "reports": "Reports",
    "audit": "Audit log",
}


def main() -> None:
    st.title("Clinician review workbench")
    reviewer = current_reviewer()
    if reviewer is not None:
        if st.session_state.pop(GO_HOME, False):
            # The menu that holds the role's pages exists from this run on: go to its home.
            st.switch_page(str(page_file(HOME[reviewer.role])))
        st.success(f"Signed in as **{reviewer.name}** ({reviewer.role}).")
        for page in allowed_pages(reviewer.role):
            if page in TITLES:
                st.page_link(str(page_file(page)), label=TITLES[page])
        if st.button("Sign out", icon=":material/logout:"):
            sign_out()
            st.rerun()
        st.caption(DISCLAIMER)
        return

    flash = st.session_state.pop(FLASH, None)
    if flash:
        st.info(flash)
    with st.form("sign_in"):
        name = st.text_input("User name", key="signin_name", autocomplete="username")
        password = st.text_input(
            "Password", type="password", key="signin_password", autocomplete="current-password"
        )
        submitted = st.form_submit_button("Sign in", type="primary", icon=":material/login:")
    if submitted:
        try:
            reviewer = authenticate(name, password)
        except SignInError as err:
            st.error(str(err))
        else:
            sign_in(reviewer)
            st.rerun()
    st.caption(DISCLAIMER)
    # While the reviewer types, the browser gets the study page's widget code ready (hidden).
    preload_review_widgets()


if __name__ == "__main__":
    main()
