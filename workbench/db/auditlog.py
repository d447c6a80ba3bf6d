"""The audit log for auditors: verify the hash chain, export every event (CSV or JSON).

The chain itself (append, hash) lives in :mod:`workbench.db.store`; this module only reads it, and
records each export as an event of its own ("audit.export").
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import func, select

from workbench.config import Settings
from workbench.db.store import (
    AuditEvent,
    audit_fields,
    first_bad_audit,
    record_audit,
    session_scope,
)

Format = Literal["csv", "json"]
COLUMNS = (
    "id",
    "at",
    "actor",
    "action",
    "object_type",
    "object_id",
    "old_value",
    "new_value",
    "reason",
    "prev_hash",
    "hash",
)


@dataclass(frozen=True)
class Verification:
    events: int
    bad_id: int | None  # the first row whose chain does not hold
    bad_action: str | None

    @property
    def ok(self) -> bool:
        return self.bad_id is None


def verify(settings: Settings) -> Verification:
    """Walk the chain from the first event; name the first row that does not check out."""
    with session_scope(settings.database_url) as session:
        n = int(session.scalar(select(func.count()).select_from(AuditEvent)) or 0)
        bad = first_bad_audit(session)
        return Verification(n, bad.id if bad else None, bad.action if bad else None)


def _rows(settings: Settings) -> list[dict[str, Any]]:
    with session_scope(settings.database_url) as session:
        return [
            {"id": ev.id, **audit_fields(ev), "prev_hash": ev.prev_hash, "hash": ev.hash}
            for ev in session.scalars(select(AuditEvent).order_by(AuditEvent.id))
        ]


def render(rows: list[dict[str, Any]], fmt: Format) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=1, sort_keys=False, default=str) + "\n"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for row in rows:
        # JSON values stay JSON inside their cell, so an auditor can re-check each hash.
        w.writerow(
            {
                k: json.dumps(v, sort_keys=True) if k in ("old_value", "new_value") else v
                for k, v in row.items()
            }
        )
    return buf.getvalue()


def export_text(settings: Settings, fmt: Format, actor: str) -> tuple[str, int]:
    """Every event rendered as ``fmt``, and their count; the export itself is audited."""
    rows = _rows(settings)
    text = render(rows, fmt)
    with session_scope(settings.database_url) as session:
        record_audit(
            session,
            actor,
            "audit.export",
            "audit_log",
            fmt,
            new_value={"events": len(rows), "last_id": rows[-1]["id"] if rows else None},
        )
    return text, len(rows)


def export(settings: Settings, fmt: Format, out: Path | None, actor: str) -> int:
    """Write the export to ``out`` (or standard output); the number of events."""
    text, n = export_text(settings, fmt, actor)
    if out is None:
        sys.stdout.write(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return n
