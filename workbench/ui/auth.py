"""Who is using the app: sign-in with a password, roles, idle time-out, and the guard every page
calls.

Accounts live in the database (:mod:`workbench.review.users`: argon2id hashes, lockout, audit). The
session keeps only the user name and role; every run re-checks that the account is still enabled
and that the session has not been idle too long. Pages call :func:`require_page` with their own
name, so a page refuses a wrong-role session even when reached by URL.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import streamlit as st
from streamlit.errors import StreamlitAPIException

from workbench.review import users
from workbench.ui.common import PAGE_FILES, PageName, page_file, settings

Role = users.Role
SignInError = users.SignInError

SESSION_KEY = "reviewer"
LAST_SEEN = "auth_last_seen"
FLASH = "auth_flash"  # a message for the sign-in page (why the session ended)
GO_HOME = "auth_go_home"

ALL_ROLES: frozenset[Role] = frozenset(users.ROLES)
# Which roles may open which page. The app's menu and every page's own guard read this one table.
PAGE_ROLES: dict[PageName, frozenset[Role]] = {
    "signin": ALL_ROLES,
    "worklist": frozenset({"clinician", "admin"}),
    "study": frozenset({"clinician", "admin"}),
    "labelling": frozenset({"clinician", "admin"}),
    "cohorts": frozenset({"researcher", "admin"}),
    "reports": frozenset({"researcher", "auditor", "admin"}),
    "audit": frozenset({"auditor", "admin"}),
    "adjudication": frozenset({"admin"}),
    "models": frozenset({"admin"}),
}
# Where each role lands after signing in.
HOME: dict[Role, PageName] = {
    "clinician": "worklist",
    "researcher": "cohorts",
    "auditor": "reports",
    "admin": "worklist",
}
assert set(PAGE_ROLES) == set(PAGE_FILES)


@dataclass(frozen=True)
class Reviewer:
    name: str
    role: Role = "clinician"


def may_open(role: Role, page: PageName) -> bool:
    return role in PAGE_ROLES[page]


def allowed_pages(role: Role) -> list[PageName]:
    return [p for p in PAGE_FILES if may_open(role, p)]


def authenticate(name: str, password: str) -> Reviewer:
    """The reviewer for these credentials, or :class:`SignInError` (audited either way)."""
    account = users.authenticate(settings(), name, password)
    return Reviewer(name=account.username, role=account.role)


def sign_in(reviewer: Reviewer) -> None:
    # A plain dict, not the dataclass: it survives Streamlit reloading this module in development.
    st.session_state[SESSION_KEY] = {"name": reviewer.name, "role": reviewer.role}
    st.session_state[LAST_SEEN] = time.time()
    st.session_state[GO_HOME] = True
    st.session_state.pop("signin_password", None)  # the typed password does not linger


def sign_out(reason: str = "") -> None:
    """End the session (audited) and drop everything it holds: drafts, selections, the user."""
    stored = st.session_state.get(SESSION_KEY)
    if isinstance(stored, dict) and stored.get("name"):
        users.record_sign_out(settings(), str(stored["name"]), reason)
    for key in list(st.session_state.keys()):
        del st.session_state[key]


def current_reviewer() -> Reviewer | None:
    """The signed-in reviewer, or None. Ends the session when it has been idle too long or the
    account was disabled since, and leaves the sign-in page a message saying so."""
    stored = st.session_state.get(SESSION_KEY)
    if not isinstance(stored, dict) or not stored.get("name"):
        return None
    s = settings()
    now = time.time()
    last = float(st.session_state.get(LAST_SEEN, 0.0))
    if now - last > s.idle_minutes * 60:
        sign_out("idle")
        st.session_state[FLASH] = (
            f"You were signed out after {s.idle_minutes:g} minutes without activity."
        )
        return None
    account = users.get_account(s, str(stored["name"]))
    if account is None or account.disabled or account.role != stored.get("role"):
        sign_out("account changed")
        st.session_state[FLASH] = "Your account was changed by an administrator; sign in again."
        return None
    st.session_state[LAST_SEEN] = now
    return Reviewer(name=account.username, role=account.role)


def require_page(page: PageName) -> Reviewer:
    """The signed-in reviewer if their role may use ``page``; otherwise say why and stop."""
    reviewer = current_reviewer()
    if reviewer is None:
        st.warning("Please sign in to use the review workbench.")
        with contextlib.suppress(StreamlitAPIException):  # no link when run outside the app
            st.page_link(str(page_file("signin")), label="Go to sign-in", icon=":material/login:")
        st.stop()
    if not may_open(reviewer.role, page):
        st.error(f"This page is not open to the {reviewer.role} role.")
        st.stop()
    _sidebar(reviewer)
    return reviewer


def _sidebar(reviewer: Reviewer) -> None:
    with st.sidebar:
        st.caption(f"Signed in as **{reviewer.name}** ({reviewer.role})")
        if st.button("Sign out", key="auth_sign_out", icon=":material/logout:"):
            sign_out()
            st.switch_page(str(page_file("signin")))
