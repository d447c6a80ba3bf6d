"""The clinician review app: ``streamlit run streamlit_app.py`` (or ``workbench app``).

This file only registers the pages (``workbench/ui/``) with ``st.navigation``: before sign-in
only the sign-in page exists and the menu is hidden; after it, only the pages the user's role may
open are registered. Each page checks the role again itself (``require_page``).
"""

import streamlit as st

# The pages' modules are imported with the app, once per server process, so that the first
# open of a page after sign-in does not pay for them (pandas, matplotlib's colour maps...).
import workbench.ui.study
import workbench.ui.worklist  # noqa: F401
from workbench.ui.auth import allowed_pages, current_reviewer
from workbench.ui.common import page_file
from workbench.ui.warmup import settle_imports

settle_imports()  # once per server process
st.set_page_config(page_title="Workbench review", page_icon=":material/radiology:", layout="wide")
reviewer = current_reviewer()  # also ends an idle session
PAGES = {  # name: (menu section, title, icon)
    "worklist": ("Review", "Worklist", ":material/format_list_numbered:"),
    "study": ("Review", "Study", ":material/radiology:"),
    "labelling": ("Review", "Labelling", ":material/label:"),
    "adjudication": ("Review", "Adjudication", ":material/gavel:"),
    "cohorts": ("Cohorts and reports", "Cohorts and models", ":material/groups:"),
    "reports": ("Cohorts and reports", "Reports", ":material/summarize:"),
    "audit": ("Cohorts and reports", "Audit log", ":material/verified_user:"),
    "models": ("Cohorts and reports", "Models", ":material/model_training:"),
}
sections: dict[str, list] = {
    "": [
        st.Page(
            page_file("signin"),
            title="Account" if reviewer else "Sign in",
            icon=":material/account_circle:",
            default=True,
        )
    ]
}
for name in allowed_pages(reviewer.role) if reviewer else []:
    if name in PAGES:
        section, title, icon = PAGES[name]
        sections.setdefault(section, []).append(st.Page(page_file(name), title=title, icon=icon))
st.navigation(sections, position="sidebar" if reviewer else "hidden").run()
