"""Accounts, sign-in with lockout, and the audit log's verify / export, from the API and the CLI."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.conftest import run_cli
from workbench.config import Settings
from workbench.db import auditlog
from workbench.db.store import AuditEvent, UserAccount, session_scope, utcnow
from workbench.review import users

# Test fixture passwords, clearly not secrets.
TEST_PASSWORD = "correct-horse-battery"  # test fixture only
WRONG_PASSWORD = "wrong-password-123"  # test fixture only


def actions(settings: Settings) -> list[str]:
    with session_scope(settings.database_url) as s:
        return list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))


def test_a_password_is_stored_only_as_an_argon2_hash(settings: Settings) -> None:
    users.add_user(settings, "admin", "grey", "clinician", TEST_PASSWORD)
    with session_scope(settings.database_url) as s:
        user = s.scalars(select(UserAccount)).one()
        assert user.password_hash.startswith("$argon2id$")
        assert TEST_PASSWORD not in user.password_hash
    db = Path(settings.database_url.removeprefix("sqlite:///"))
    assert TEST_PASSWORD.encode() not in db.read_bytes()
    acc = users.authenticate(settings, "grey", TEST_PASSWORD)
    assert (acc.username, acc.role) == ("grey", "clinician")
    assert actions(settings) == ["user.create", "auth.sign_in"]


def test_five_wrong_passwords_lock_the_account(settings: Settings) -> None:
    users.add_user(settings, "admin", "grey", "clinician", TEST_PASSWORD)
    for _ in range(5):
        with pytest.raises(users.SignInError, match="Wrong user name or password"):
            users.authenticate(settings, "grey", WRONG_PASSWORD)
    acc = users.get_account(settings, "grey")
    assert acc is not None and acc.locked()
    assert acc.locked_until is not None
    minutes = (acc.locked_until - utcnow()).total_seconds() / 60
    assert 14 < minutes <= 15
    # Locked: even the right password is refused, and the refusal is audited.
    with pytest.raises(users.SignInError, match="locked"):
        users.authenticate(settings, "grey", TEST_PASSWORD)
    assert actions(settings) == [
        "user.create",
        *["auth.sign_in_failed"] * 5,
        "auth.locked",
        "auth.refused_locked",
    ]
    # A password reset lifts the lock.
    users.reset_password(settings, "admin", "grey", "another-good-password")
    assert users.authenticate(settings, "grey", "another-good-password").username == "grey"


def test_the_lock_lasts_as_configured_and_then_expires(settings: Settings) -> None:
    short = dataclasses.replace(settings, max_failed_signins=2, lockout_minutes=0.0)
    users.add_user(short, "admin", "grey", "clinician", TEST_PASSWORD)
    for _ in range(2):
        with pytest.raises(users.SignInError):
            users.authenticate(short, "grey", WRONG_PASSWORD)
    assert "auth.locked" in actions(short)
    assert users.authenticate(short, "grey", TEST_PASSWORD).username == "grey"  # lock expired


def test_an_unknown_user_and_a_wrong_password_get_the_same_answer(settings: Settings) -> None:
    users.add_user(settings, "admin", "grey", "clinician", TEST_PASSWORD)
    with pytest.raises(users.SignInError) as unknown:
        users.authenticate(settings, "nobody", TEST_PASSWORD)
    with pytest.raises(users.SignInError) as wrong:
        users.authenticate(settings, "grey", WRONG_PASSWORD)
    assert str(unknown.value) == str(wrong.value)
    # What was typed as an unknown name is not kept (it may be a password typed in the wrong box).
    with session_scope(settings.database_url) as s:
        ev = s.scalars(select(AuditEvent).where(AuditEvent.reason == "unknown user")).one()
        assert ev.actor == users.UNKNOWN_ACTOR and "nobody" not in str(ev.object_id)


def test_a_disabled_account_cannot_sign_in(settings: Settings) -> None:
    users.add_user(settings, "admin", "grey", "clinician", TEST_PASSWORD)
    users.disable_user(settings, "admin", "grey")
    with pytest.raises(users.SignInError, match="disabled"):
        users.authenticate(settings, "grey", TEST_PASSWORD)


def test_accounts_refuse_bad_names_roles_and_short_passwords(settings: Settings) -> None:
    with pytest.raises(users.AccountError, match="role"):
        users.add_user(settings, "admin", "grey", "surgeon", TEST_PASSWORD)
    with pytest.raises(users.AccountError, match="characters"):
        users.add_user(settings, "admin", "grey", "clinician", "short")
    with pytest.raises(users.AccountError, match="user name"):
        users.add_user(settings, "admin", "a b", "clinician", TEST_PASSWORD)
    users.add_user(settings, "admin", "grey", "clinician", TEST_PASSWORD)
    with pytest.raises(users.AccountError, match="already exists"):
        users.add_user(settings, "admin", "grey", "auditor", TEST_PASSWORD)


def test_the_users_commands_take_the_password_from_the_environment(tmp_path: Path) -> None:
    env = {"WORKBENCH_NEW_PASSWORD": TEST_PASSWORD}
    r = run_cli(["users", "add", "grey", "--role", "clinician"], tmp_path, **env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "added grey (clinician)"
    r = run_cli(["users", "add", "audrey", "--role", "auditor"], tmp_path, **env)
    assert r.returncode == 0, r.stderr
    r = run_cli(["users", "disable", "grey"], tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli(["users", "list"], tmp_path)
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["audrey", "auditor", "active"]
    assert lines[1].split()[:3] == ["grey", "clinician", "disabled"]
    assert lines[-1] == "2 users"
    r = run_cli(["users", "reset-password", "grey"], tmp_path, WORKBENCH_NEW_PASSWORD="x")
    assert r.returncode == 1 and r.stderr.startswith("error: a password needs at least")
    r = run_cli(["users", "disable", "nobody"], tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == "error: no user named 'nobody'"
    # There is no way to give a password on the command line.
    r = run_cli(["users", "add", "x1", "--role", "admin", "--password", "p"], tmp_path)
    assert r.returncode == 2


def test_audit_verify_names_the_row_that_was_tampered_with(settings: Settings) -> None:
    home = settings.home
    users.add_user(settings, "admin", "grey", "clinician", TEST_PASSWORD)
    for _ in range(3):
        with pytest.raises(users.SignInError):
            users.authenticate(settings, "grey", WRONG_PASSWORD)
    users.authenticate(settings, "grey", TEST_PASSWORD)
    r = run_cli(["audit", "verify"], home)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "audit chain intact: 5 events"

    # Someone with the database file rewrites the third event to hide a failed sign-in.
    db = settings.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_event SET reason = 'typo' WHERE id = 3")
    r = run_cli(["audit", "verify"], home)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error: audit chain broken at event 3 (auth.sign_in_failed)")
    assert auditlog.verify(settings) == auditlog.Verification(5, 3, "auth.sign_in_failed")


def test_a_deleted_audit_row_is_detected_at_the_next_one(settings: Settings) -> None:
    users.add_user(settings, "admin", "grey", "clinician", TEST_PASSWORD)
    users.authenticate(settings, "grey", TEST_PASSWORD)
    users.record_sign_out(settings, "grey")
    db = settings.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit_event WHERE id = 2")
    assert auditlog.verify(settings).bad_id == 3


def test_an_inserted_audit_row_is_detected_even_with_a_valid_hash_of_its_own(
    settings: Settings,
) -> None:
    from workbench.db.store import GENESIS, AuditEvent, _event_hash, audit_fields, session_scope

    users.add_user(settings, "admin", "grey", "clinician", TEST_PASSWORD)
    users.authenticate(settings, "grey", TEST_PASSWORD)
    users.record_sign_out(settings, "grey")
    assert auditlog.verify(settings) == auditlog.Verification(3, None, None)
    # Someone with the database file slips a sign-in in after event 1: the later rows move up
    # one id, and the forged row is chained to event 1 with a hash that is right for its own
    # fields (the algorithm is public). The row after it still names event 1's hash.
    db = settings.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        for row_id in (3, 2):
            conn.execute("UPDATE audit_event SET id = id + 1 WHERE id = ?", (row_id,))
    with session_scope(settings.database_url) as session:
        first = session.get(AuditEvent, 1)
        assert first is not None and first.prev_hash == GENESIS
        forged = AuditEvent(
            id=2,
            at=first.at,
            actor="grey",
            action="auth.sign_in",
            object_type="user",
            object_id="grey",
            reason="",
            prev_hash=first.hash,
            hash="",
        )
        forged.hash = _event_hash(first.hash, audit_fields(forged))
        session.add(forged)
    assert auditlog.verify(settings) == auditlog.Verification(4, 3, "auth.sign_in")
    # A row appended at the end with a hash that is not its own is caught at that row.
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit_event WHERE id = 2")
        for row_id in (3, 4):
            conn.execute("UPDATE audit_event SET id = id - 1 WHERE id = ?", (row_id,))
        last_hash = conn.execute("SELECT hash FROM audit_event WHERE id = 3").fetchone()[0]
        conn.execute(
            "INSERT INTO audit_event (id, at, actor, action, object_type, object_id, reason,"
            " prev_hash, hash) VALUES (4, '2026-01-01 00:00:00', 'grey', 'auth.sign_in',"
            " 'user', 'grey', '', ?, ?)",
            (last_hash, last_hash),
        )
    assert auditlog.verify(settings) == auditlog.Verification(4, 4, "auth.sign_in")


def test_audit_export_writes_csv_and_json(settings: Settings, tmp_path: Path) -> None:
    users.add_user(settings, "admin", "grey", "clinician", TEST_PASSWORD)
    users.authenticate(settings, "grey", TEST_PASSWORD)
    out = str(settings.home / "a.json")
    r = run_cli(["audit", "export", "--format", "json", "--out", out], settings.home)
    assert r.returncode == 0, r.stderr
    events = json.loads((settings.home / "a.json").read_text())
    assert [e["action"] for e in events] == ["user.create", "auth.sign_in"]
    assert events[0]["new_value"] == {"role": "clinician"}
    r = run_cli(["audit", "export"], settings.home)  # CSV on standard output
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["action"] for row in rows] == ["user.create", "auth.sign_in", "audit.export"]
    assert all(len(row["hash"]) == 64 for row in rows)
    assert actions(settings)[-1] == "audit.export"
    assert auditlog.verify(settings).ok


def test_the_demo_makes_a_clinician_account_once(tmp_path: Path, monkeypatch, capsys) -> None:
    from tests.conftest import make_settings
    from workbench.cli import demo as cli_demo

    s = make_settings(tmp_path / "home")
    monkeypatch.delenv("WORKBENCH_DEMO_PASSWORD", raising=False)
    cli_demo.demo_account(s)
    out = capsys.readouterr().out
    password = out.split("password ", 1)[1].split(" ", 1)[0]
    assert users.authenticate(s, cli_demo.DEMO_USER, password).role == "clinician"
    cli_demo.demo_account(s)  # a second demo run leaves the account (and its password) alone
    assert password not in capsys.readouterr().out
    other = make_settings(tmp_path / "other")
    monkeypatch.setenv("WORKBENCH_DEMO_PASSWORD", TEST_PASSWORD)
    cli_demo.demo_account(other)
    assert TEST_PASSWORD not in capsys.readouterr().out
    assert users.authenticate(other, cli_demo.DEMO_USER, TEST_PASSWORD).username == "demo"


def test_migration_0002_turns_repeated_reviews_into_versions(tmp_path: Path) -> None:
    """A database made by revision 0001, with one reader reviewing a prediction twice."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine

    import workbench.db.store as store

    url = f"sqlite:///{tmp_path / 'old.db'}"
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(store.__file__).parent / "migrations"))
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    with sqlite3.connect(tmp_path / "old.db") as db:
        db.execute("INSERT INTO patient (pseudonym) VALUES ('p')")
        db.execute(
            "INSERT INTO study (id, study_uid, study_key, patient_pseudonym) "
            "VALUES (1, 'u', 'k', 'p')"
        )
        db.execute(
            "INSERT INTO prediction VALUES (1, 1, 'm', 'v1', 'h', 'c', 't', '[]', '{}', '{}', "
            "'normal', '[]', 0.5, '[]', NULL, '2026-01-01 00:00:00')"
        )
        for n, (who, label) in enumerate([("a", "normal"), ("b", "x"), ("a", "x")], 1):
            db.execute(
                "INSERT INTO review (id, prediction_id, study_id, reviewer, agree, label, comment, "
                f"created_at) VALUES ({n}, 1, 1, '{who}', 1, '{label}', '', '2026-01-01')"
            )
    engine.dispose()
    store.get_engine(url)  # upgrades to head
    with session_scope(url) as s:
        from workbench.db.store import Review

        rows = s.scalars(select(Review).order_by(Review.id)).all()
        assert [(r.reviewer, r.version, r.supersedes_id, r.kind) for r in rows] == [
            ("a", 1, None, "read"),
            ("b", 1, None, "read"),
            ("a", 2, 1, "read"),
        ]
