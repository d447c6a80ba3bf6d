"""Models (admins only): every bundle on disk and the tasks it is promoted for.

Read-only: promotion is a guarded decision made with ``workbench promote`` on the command line
(it compares the models on the locked test split and writes an audit event); this page only
shows the registry (``models/promoted.json``).
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from workbench.ui import data
from workbench.ui.auth import require_page
from workbench.ui.common import settings


def main() -> None:
    require_page("models")
    s = settings()
    st.title("Models")
    models = data.model_statuses(s)
    if not models:
        st.info("No model bundles yet. Train one with `workbench train`.")
        return
    st.dataframe(
        pd.DataFrame(
            {
                "Model": [m.ref for m in models],
                "Created": [m.created for m in models],
                "Promoted": ["yes" if m.promoted_for else "" for m in models],
                "For task": [", ".join(m.promoted_for) for m in models],
            }
        ),
        hide_index=True,
        width="stretch",
    )
    st.caption(
        "Promotion is made on the command line with `workbench promote NAME/VERSION --task "
        "TASK`: it compares the candidate with the promoted model on the locked test split and "
        "refuses a worse one; every decision is in the audit log."
    )


if __name__ == "__main__":
    main()
