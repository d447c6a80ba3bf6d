"""Audit log (auditors, admins): check the hash chain, export every event as CSV or JSON.
Each export is itself an audit event."""

from __future__ import annotations

import streamlit as st

from workbench.db import auditlog
from workbench.ui.auth import require_page
from workbench.ui.common import settings

EXPORTED = "audit_exported"  # session state: (format, text) of the last export


def main() -> None:
    reviewer = require_page("audit")
    s = settings()
    st.title("Audit log")
    result = auditlog.verify(s)
    if result.ok:
        st.success(f"The hash chain holds: {result.events} events, none changed or removed.")
    else:
        st.error(
            f"The hash chain is broken at event {result.bad_id} ({result.bad_action}): that row "
            "was changed, or a row before it was inserted or deleted."
        )
    fmt = st.radio("Format", ["csv", "json"], horizontal=True, key="audit_format")
    if st.button("Export the audit log", type="primary", icon=":material/download:"):
        text, n = auditlog.export_text(s, fmt, actor=reviewer.name)  # type: ignore[arg-type]
        st.session_state[EXPORTED] = (fmt, text, n)
    exported = st.session_state.get(EXPORTED)
    if exported:
        fmt_done, text, n = exported
        st.download_button(
            f"Download {n} events ({fmt_done.upper()})",
            data=text,
            file_name=f"audit.{fmt_done}",
            mime="text/csv" if fmt_done == "csv" else "application/json",
            on_click="ignore",
            icon=":material/download:",
        )


if __name__ == "__main__":
    main()
