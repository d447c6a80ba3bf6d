"""Who is using the app: sign-in, the signed-in reviewer, and the guard every page calls.

For now a reviewer's name is enough. Roles and passwords plug in at :func:`authenticate`
(check a credential, look up a role) without touching the pages: they only ever call
:func:`require_reviewer` and read the :class:`Reviewer` it returns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import streamlit as st

from workbench.ui.common import page_file

Role = Literal["clinician", "researcher", "auditor"]

SESSION_KEY = "reviewer"
# Letters (any script), digits, space and . ' - _ ; 1 to 64 characters.
_NAME = re.compile(r"[^\W][\w .'-]{0,63}")


class SignInError(ValueError):
    """A sign-in that cannot be accepted; the message is shown to the user."""


@dataclass(frozen=True)
class Reviewer:
    name: str
    role: Role = "clinician"


def authenticate(name: str, password: str | None = None) -> Reviewer:
    """The reviewer for these credentials, or :class:`SignInError`.

    The seam for real authentication: today any well-formed name signs in as a clinician and
    ``password`` is ignored.
    """
    name = " ".join(name.split())
    if not name:
        raise SignInError("Enter your name to sign in.")
    if not _NAME.fullmatch(name):
        raise SignInError("Use letters, digits, spaces and . ' - _ (at most 64 characters).")
    return Reviewer(name=name)


def sign_in(reviewer: Reviewer) -> None:
    # A plain dict, not the dataclass: it survives Streamlit reloading this module in development.
    st.session_state[SESSION_KEY] = {"name": reviewer.name, "role": reviewer.role}


def sign_out() -> None:
    # Drop everything the session holds: drafts, selections and the reviewer.
    for key in list(st.session_state.keys()):
        del st.session_state[key]


def current_reviewer() -> Reviewer | None:
    stored = st.session_state.get(SESSION_KEY)
    if not isinstance(stored, dict) or not stored.get("name"):
        return None
    return Reviewer(name=str(stored["name"]), role=stored.get("role", "clinician"))


def require_reviewer() -> Reviewer:
    """The signed-in reviewer; otherwise say so, link to the sign-in page and stop the page."""
    reviewer = current_reviewer()
    if reviewer is None:
        st.warning("Please sign in to use the review workbench.")
        st.page_link(str(page_file("signin")), label="Go to sign-in", icon=":material/login:")
        st.stop()
    _sidebar(reviewer)
    return reviewer


def _sidebar(reviewer: Reviewer) -> None:
    with st.sidebar:
        st.caption(f"Signed in as **{reviewer.name}** ({reviewer.role})")
        if st.button("Sign out", key="auth_sign_out", icon=":material/logout:"):
            sign_out()
            st.switch_page(str(page_file("signin")))
