"""The clinician review app: ``streamlit run streamlit_app.py``.

This file only registers the pages (``workbench/ui/``) with ``st.navigation``. Before sign-in
the menu is hidden and every page but sign-in refuses to show content.
"""

import streamlit as st

from workbench.ui.auth import current_reviewer
from workbench.ui.common import page_file

st.set_page_config(page_title="Workbench review", page_icon=":material/radiology:", layout="wide")
signed_in = current_reviewer() is not None
pages = {
    "": [
        st.Page(
            page_file("signin"),
            title="Account" if signed_in else "Sign in",
            icon=":material/account_circle:",
            default=True,
        ),
    ],
    "Review": [
        st.Page(page_file("worklist"), title="Worklist", icon=":material/format_list_numbered:"),
        st.Page(page_file("study"), title="Study", icon=":material/radiology:"),
    ],
    "Cohorts and reports": [
        st.Page(page_file("cohorts"), title="Cohorts and models", icon=":material/groups:"),
        st.Page(page_file("reports"), title="Reports", icon=":material/summarize:"),
    ],
}
st.navigation(pages, position="sidebar" if signed_in else "hidden").run()
