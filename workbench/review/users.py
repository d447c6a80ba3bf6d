"""Accounts: who may sign in, with which role, and the sign-in check itself.

Passwords are stored only as argon2id hashes (argon2-cffi). Too many wrong passwords in a row lock
the account for a while. Every change to an account and every sign-in, failed sign-in, lockout
and sign-out is an audit event. No Streamlit here: the CLI and the app both call these functions.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, get_args

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from workbench.config import Settings
from workbench.db.store import UserAccount, record_audit, session_scope, utcnow
from workbench.errors import WorkbenchError

Role = Literal["clinician", "researcher", "auditor", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)
MIN_PASSWORD = 10
# Letters, digits and . _ - ; 2 to 64 characters, starting with a letter or digit.
_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,63}")
_HASHER = PasswordHasher()  # argon2id with the library's current recommended parameters
# Verified against when the user does not exist, so that an unknown name takes as long to refuse
# as a wrong password (no user enumeration by timing).
_DUMMY_HASH = _HASHER.hash("not-a-real-password-just-timing")


class AccountError(WorkbenchError, ValueError):
    """An account operation that cannot be done; the message is safe to show."""


class SignInError(WorkbenchError, ValueError):
    """A refused sign-in. The message never says whether the user exists."""


@dataclass(frozen=True)
class Account:
    username: str
    role: Role
    disabled: bool
    failed_attempts: int
    locked_until: datetime | None
    created_at: datetime

    def locked(self, now: datetime | None = None) -> bool:
        return self.locked_until is not None and self.locked_until > (now or utcnow())


def _account(u: UserAccount) -> Account:
    return Account(
        username=u.username,
        role=u.role,  # type: ignore[arg-type]
        disabled=u.disabled,
        failed_attempts=u.failed_attempts,
        locked_until=u.locked_until,
        created_at=u.created_at,
    )


def check_password_strength(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"a password needs at least {MIN_PASSWORD} characters")


def _get(session: Session, username: str) -> UserAccount:
    user = session.scalars(select(UserAccount).where(UserAccount.username == username)).first()
    if user is None:
        raise AccountError(f"no user named {username!r}")
    return user


def add_user(settings: Settings, actor: str, username: str, role: str, password: str) -> Account:
    """Create an account (audited as "user.create"); the password is hashed, never stored."""
    if not _USERNAME.fullmatch(username):
        raise AccountError("a user name is 2-64 letters, digits, '.', '_' or '-'")
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    check_password_strength(password)
    with session_scope(settings.database_url) as session:
        exists = session.scalars(select(UserAccount).where(UserAccount.username == username))
        if exists.first() is not None:
            raise AccountError(f"a user named {username!r} already exists")
        user = UserAccount(
            username=username,
            password_hash=_HASHER.hash(password),
            role=role,
            disabled=False,
            failed_attempts=0,
        )
        session.add(user)
        session.flush()
        record_audit(session, actor, "user.create", "user", username, new_value={"role": role})
        return _account(user)


def disable_user(settings: Settings, actor: str, username: str) -> Account:
    """Disable an account (audited); it can no longer sign in, and open sessions end."""
    with session_scope(settings.database_url) as session:
        user = _get(session, username)
        user.disabled = True
        record_audit(
            session,
            actor,
            "user.disable",
            "user",
            username,
            old_value={"disabled": False},
            new_value={"disabled": True},
        )
        return _account(user)


def reset_password(settings: Settings, actor: str, username: str, password: str) -> Account:
    """Set a new password, clear failed attempts and any lock (audited, without the password)."""
    check_password_strength(password)
    with session_scope(settings.database_url) as session:
        user = _get(session, username)
        user.password_hash = _HASHER.hash(password)
        user.failed_attempts = 0
        user.locked_until = None
        record_audit(session, actor, "user.password_reset", "user", username)
        return _account(user)


def list_users(settings: Settings) -> list[Account]:
    with session_scope(settings.database_url) as session:
        users = session.scalars(select(UserAccount).order_by(UserAccount.username))
        return [_account(u) for u in users]


def get_account(settings: Settings, username: str) -> Account | None:
    with session_scope(settings.database_url) as session:
        user = session.scalars(select(UserAccount).where(UserAccount.username == username)).first()
        return _account(user) if user is not None else None


REFUSED = "Wrong user name or password."
UNKNOWN_ACTOR = "(unknown user)"


def authenticate(settings: Settings, username: str, password: str) -> Account:
    """The account for these credentials, or :class:`SignInError`.

    Each outcome is audited: "auth.sign_in", "auth.sign_in_failed", "auth.locked" (the attempt
    that locks the account) and "auth.refused_locked" (attempts while locked or disabled).
    """
    username = username.strip()
    if not username or not password:
        raise SignInError("Enter your user name and password.")
    username = username[:64]
    now = utcnow()
    # The outcome is decided inside the transaction and raised after it commits, so that the
    # failed-attempt counter and the audit event are kept even though the sign-in is refused.
    failure: str | None = None
    with session_scope(settings.database_url) as session:
        user = session.scalars(select(UserAccount).where(UserAccount.username == username)).first()
        if user is None:
            _verify(_DUMMY_HASH, password)
            # What was typed is not stored (people type passwords into the name field): only
            # a digest, so that repeated attempts with the same name can be told apart.
            digest = hashlib.sha256(username.encode()).hexdigest()[:16]
            record_audit(
                session, UNKNOWN_ACTOR, "auth.sign_in_failed", "user", digest, reason="unknown user"
            )
            failure = REFUSED
        elif user.disabled or (user.locked_until is not None and user.locked_until > now):
            why = "disabled" if user.disabled else "locked"
            record_audit(session, username, "auth.refused_locked", "user", username, reason=why)
            failure = (
                "This account is disabled; ask an administrator."
                if user.disabled
                else "This account is locked after too many wrong passwords; try again later "
                "or ask an administrator to reset it."
            )
        elif not _verify(user.password_hash, password):
            user.failed_attempts += 1
            record_audit(
                session,
                username,
                "auth.sign_in_failed",
                "user",
                username,
                new_value={"failed_attempts": user.failed_attempts},
                reason="wrong password",
            )
            failure = REFUSED
            if user.failed_attempts >= settings.max_failed_signins:
                user.locked_until = now + timedelta(minutes=settings.lockout_minutes)
                user.failed_attempts = 0
                record_audit(
                    session,
                    username,
                    "auth.locked",
                    "user",
                    username,
                    new_value={"locked_until": user.locked_until.isoformat()},
                    reason=f"{settings.max_failed_signins} wrong passwords",
                )
        else:
            if _HASHER.check_needs_rehash(user.password_hash):
                user.password_hash = _HASHER.hash(password)
            user.failed_attempts = 0
            user.locked_until = None
            record_audit(
                session, username, "auth.sign_in", "user", username, new_value={"role": user.role}
            )
            return _account(user)
    raise SignInError(failure)


def record_sign_out(settings: Settings, username: str, reason: str = "") -> None:
    """Audit the end of an app session ("auth.sign_out"; reason "idle" for a timeout)."""
    with session_scope(settings.database_url) as session:
        record_audit(session, username, "auth.sign_out", "user", username, reason=reason)


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False
