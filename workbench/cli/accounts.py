"""Commands for the people and the record: ``users``, ``audit``."""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path

from workbench.cli.common import actor
from workbench.config import environment_value, get_settings
from workbench.db import auditlog
from workbench.errors import UsageError, WorkbenchError
from workbench.review import users


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this group's commands to the parser."""
    s = sub.add_parser(
        "users",
        help="app accounts: add, disable, reset-password, list",
        description="Passwords come from WORKBENCH_NEW_PASSWORD or are prompted for; never from "
        "the command line.",
    )
    us = s.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    u = us.add_parser("add", help="create an account")
    u.add_argument("name")
    u.add_argument("--role", required=True, choices=["clinician", "researcher", "auditor", "admin"])
    u = us.add_parser("disable", help="disable an account (it can no longer sign in)")
    u.add_argument("name")
    u = us.add_parser("reset-password", help="set a new password and lift a lockout")
    u.add_argument("name")
    us.add_parser("list", help="accounts with their role and state")

    s = sub.add_parser("audit", help="verify or export the hash-chained audit log")
    au = s.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    au.add_parser("verify", help="check the chain; name the first bad row and exit 1 if any")
    u = au.add_parser("export", help="every audit event as CSV or JSON")
    u.add_argument("--format", choices=["csv", "json"], default="csv")
    u.add_argument("--out", type=Path, help="write here (default: standard output)")


def new_password(username: str) -> str:
    """A new password from WORKBENCH_NEW_PASSWORD, or typed twice at a prompt (never argv)."""
    env = environment_value("WORKBENCH_NEW_PASSWORD")
    if env:
        return env
    first = getpass.getpass(f"New password for {username}: ")
    if getpass.getpass("Repeat it: ") != first:
        raise UsageError("the two passwords differ")
    return first


def cmd_users(a: argparse.Namespace) -> None:
    settings = get_settings()
    if a.users_command == "add":
        acc = users.add_user(settings, actor(), a.name, a.role, new_password(a.name))
        print(f"added {acc.username} ({acc.role})")
    elif a.users_command == "disable":
        acc = users.disable_user(settings, actor(), a.name)
        print(f"disabled {acc.username}")
    elif a.users_command == "reset-password":
        acc = users.reset_password(settings, actor(), a.name, new_password(a.name))
        print(f"new password set for {acc.username}; failed attempts and lock cleared")
    else:
        accounts = users.list_users(settings)
        for acc in accounts:
            state = "disabled" if acc.disabled else "locked" if acc.locked() else "active"
            print(f"{acc.username:24s} {acc.role:10s} {state:8s} created {acc.created_at:%Y-%m-%d}")
        print(f"{len(accounts)} users")


def cmd_audit(a: argparse.Namespace) -> None:
    settings = get_settings()
    if a.audit_command == "verify":
        result = auditlog.verify(settings)
        if result.bad_id is not None:
            raise WorkbenchError(
                f"audit chain broken at event {result.bad_id} ({result.bad_action}): the row "
                "was changed, or a row before it was inserted or deleted"
            )
        print(f"audit chain intact: {result.events} events")
        return
    n = auditlog.export(settings, a.format, a.out, actor=actor())
    if a.out:
        print(f"exported {n} audit events to {a.out}")


COMMANDS = {"users": cmd_users, "audit": cmd_audit}
