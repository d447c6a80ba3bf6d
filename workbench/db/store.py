"""The database: SQLAlchemy tables, engines and sessions, and the audit log.

SQLite is the default (WAL, a busy timeout, ``BEGIN IMMEDIATE`` for every transaction so that
concurrent writers queue instead of failing); PostgreSQL or any other SQLAlchemy URL works through
``WORKBENCH_DATABASE_URL``. The schema is created and upgraded by Alembic (``migrations/``).

No PHI is stored here: patients are known only by a keyed-hash pseudonym, studies by their UID and
a short study key used in every export and log.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Patient(Base):
    __tablename__ = "patient"
    pseudonym: Mapped[str] = mapped_column(String(32), primary_key=True)
    sex: Mapped[str | None] = mapped_column(String(8))
    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_key: Mapped[str] = mapped_column(String(16), unique=True)
    patient_pseudonym: Mapped[str] = mapped_column(ForeignKey("patient.pseudonym"), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    age_years: Mapped[int | None] = mapped_column(Integer)
    site: Mapped[str | None] = mapped_column(String(128))
    modality: Mapped[str | None] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(64))
    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    view_position: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    manufacturer: Mapped[str | None] = mapped_column(String(128))
    institution: Mapped[str | None] = mapped_column(String(128))
    station: Mapped[str | None] = mapped_column(String(128))
    # A volumetric series (CT, MR, PT) is also cached as one (slices, rows, columns) array,
    # unless its geometry is inconsistent: then `problems` says why, in plain words.
    volume_cache_key: Mapped[str | None] = mapped_column(String(64))
    # The same volume of a CT series in Hounsfield units (every slice has HU cached), stacked
    # in the same order; for the viewer only (models read the display volume).
    hu_volume_cache_key: Mapped[str | None] = mapped_column(String(64))
    problems: Mapped[list[Any] | None] = mapped_column(JSON)
    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    path: Mapped[str] = mapped_column(String(1024), index=True)
    # Size and modification time let a re-ingest skip a known file without opening it.
    file_size: Mapped[int | None] = mapped_column(BigInteger)
    file_mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    file_sha256: Mapped[str] = mapped_column(String(64), index=True)
    pixel_hash: Mapped[str] = mapped_column(String(64), index=True)
    cache_key: Mapped[str] = mapped_column(String(64))
    # A CT image's modality values (HU, float16) when its modality LUT is a linear rescale.
    hu_cache_key: Mapped[str | None] = mapped_column(String(64))
    # The file's own windows: [{"center", "width", "explanation"}] in its order, None if none.
    windows: Mapped[list[Any] | None] = mapped_column(JSON)
    rows: Mapped[int] = mapped_column(Integer)
    columns: Mapped[int] = mapped_column(Integer)
    frames: Mapped[int] = mapped_column(Integer, default=1)
    photometric: Mapped[str] = mapped_column(String(16))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    pixel_spacing: Mapped[float | None] = mapped_column(Float)
    voi_source: Mapped[str] = mapped_column(String(16))
    slice_position: Mapped[float | None] = mapped_column(Float)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    ingested_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    series: Mapped[Series] = relationship(back_populates="instances")


class Quarantine(Base):
    __tablename__ = "quarantine"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(String(1024), unique=True)
    file_sha256: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(String(1024))
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Cohort(Base):
    __tablename__ = "cohort"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    split_seed: Mapped[int | None] = mapped_column(Integer)
    split_fractions: Mapped[list[Any] | None] = mapped_column(JSON)
    # how the cohort was made when not by ingest (e.g. `cohort from-reads`: its options, counts
    # and reader agreement); None for an ingested cohort
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class CohortMember(Base):
    __tablename__ = "cohort_member"
    __table_args__ = (UniqueConstraint("cohort_name", "study_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cohort_name: Mapped[str] = mapped_column(ForeignKey("cohort.name"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    split: Mapped[str | None] = mapped_column(String(16))
    # the study's label in this cohort when it is not the catalog's (Study.label, from a labels
    # CSV): from clinicians' reads; label_source says where it came from ("read",
    # "adjudicated"); both None: the catalog's label
    label: Mapped[str | None] = mapped_column(String(256))
    label_source: Mapped[str | None] = mapped_column(String(16))
    study: Mapped[Study] = relationship()


class Prediction(Base):
    __tablename__ = "prediction"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(128), index=True)
    model_version: Mapped[str] = mapped_column(String(64))
    bundle_hash: Mapped[str] = mapped_column(String(64))
    code_version: Mapped[str] = mapped_column(String(64))
    transform_hash: Mapped[str] = mapped_column(String(64))
    pixel_hashes: Mapped[list[Any]] = mapped_column(JSON)
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    raw_probabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    predicted_label: Mapped[str] = mapped_column(String(64))
    top_k: Mapped[list[Any]] = mapped_column(JSON)
    priority: Mapped[float] = mapped_column(Float, index=True)
    per_image: Mapped[list[Any]] = mapped_column(JSON)
    explain_method: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # What the bundle ships for trust (None when it ships none): the conformal prediction set
    # {"coverage", "classes"}, the out-of-distribution result {"flagged", "score", "threshold",
    # "reasons"} with its flag as a column for the worklist filter, and the most similar
    # training studies [{"study_key", "label", "similarity", "distance", "closer_than"}].
    prediction_set: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    ood_flag: Mapped[bool | None] = mapped_column(Boolean, index=True)
    ood: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    similar: Mapped[list[Any] | None] = mapped_column(JSON)
    # The calibration map applied: "site:NAME" (a per-site map, train --calibrate-per-site) or
    # "global"; None for predictions made before this was recorded.
    calibration_map: Mapped[str | None] = mapped_column(String(160))
    study: Mapped[Study] = relationship()


class Review(Base):
    """One version of one reader's review of a prediction; rows are never updated.

    An edit adds a row with ``version + 1`` that names the row it supersedes; a reader's current
    opinion is their highest version. ``kind`` is "read" (a clinician's read, first or second)
    or "adjudication" (an admin settling readers who disagree).
    """

    __tablename__ = "review"
    # A unique index rather than a constraint: SQLite adds it without rebuilding the table.
    __table_args__ = (
        Index("uq_review_version", "prediction_id", "reviewer", "kind", "version", unique=True),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("prediction.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    reviewer: Mapped[str] = mapped_column(String(128))
    agree: Mapped[bool] = mapped_column(Boolean)
    label: Mapped[str] = mapped_column(String(64))
    comment: Mapped[str] = mapped_column(String(4096), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(16), default="read", server_default="read")
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    supersedes_id: Mapped[int | None] = mapped_column(
        ForeignKey("review.id", name="fk_review_supersedes")
    )
    confidence: Mapped[int | None] = mapped_column(Integer)  # 1 (unsure) .. 5 (certain)
    reason: Mapped[str] = mapped_column(String(1024), default="", server_default="")
    seconds_spent: Mapped[float | None] = mapped_column(Float)
    # Every label the reader holds true (multi-label problems); ``label`` is the main one.
    corrected_labels: Mapped[list[Any] | None] = mapped_column(JSON)
    # whether the reader saw the model's output before this read (labelling shows it only on
    # request, so that a read is not anchored); None: a review page read, which always shows it
    model_visible: Mapped[bool | None] = mapped_column(Boolean)


class UserAccount(Base):
    """A person who may sign in to the app; the password is kept as an argon2id hash only."""

    __tablename__ = "user_account"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_attempts: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class AuditEvent(Base):
    """Append-only; each row carries the hash of the previous one so tampering is detectable."""

    __tablename__ = "audit_event"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(64))
    object_id: Mapped[str] = mapped_column(String(64))
    old_value: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    new_value: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    reason: Mapped[str] = mapped_column(String(1024), default="")
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


# --- engines and sessions -------------------------------------------------------------------


def _sqlite_pragmas(engine: Engine) -> None:
    # SQLAlchemy's documented recipe for pysqlite: take over transaction control so that every
    # transaction starts with BEGIN IMMEDIATE (writers queue on the busy timeout, no upgrade
    # deadlocks), and switch the journal to WAL so readers never block the writer.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


@cache
def get_engine(url: str) -> Engine:
    """One engine per URL, with the schema migrated to the latest revision."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        _sqlite_pragmas(engine)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    migrate(engine)
    return engine


def _head_revision() -> str:
    """The newest revision: our revision ids are the files' four-digit prefixes, in order."""
    versions = Path(__file__).parent / "migrations" / "versions"
    return max(p.name[:4] for p in versions.glob("[0-9][0-9][0-9][0-9]_*.py"))


def _current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    except Exception:  # no table yet: a new database
        return None


def migrate(engine: Engine, use_alembic: bool = False) -> None:
    """Bring the schema to Alembic's head revision.

    A database already at the head is recognised with one query, and an empty one gets the
    models' schema stamped at the head, both without importing Alembic (half a second, paid by
    every process that opens the catalog: the CLI, the app, ingest). Anything else, or
    ``use_alembic``, runs the migrations; a test checks that they build the same schema.
    """
    current, head = _current_revision(engine), _head_revision()
    if current == head:
        return
    if current is None and not use_alembic and not inspect(engine).get_table_names():
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
            )
            conn.execute(text("INSERT INTO alembic_version (version_num) VALUES (:v)"), {"v": head})
        return
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    factory = sessionmaker(get_engine(url), expire_on_commit=False)
    with factory() as session, session.begin():
        yield session


# --- audit log -------------------------------------------------------------------------------

GENESIS = "0" * 64


def _event_hash(prev_hash: str, fields: dict[str, Any]) -> str:
    payload = json.dumps(fields, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256((prev_hash + payload).encode()).hexdigest()


def audit_fields(ev: AuditEvent) -> dict[str, Any]:
    """The fields of an audit event that its hash covers (in a fixed order)."""
    return {
        "at": ev.at.isoformat(),
        "actor": ev.actor,
        "action": ev.action,
        "object_type": ev.object_type,
        "object_id": ev.object_id,
        "old_value": ev.old_value,
        "new_value": ev.new_value,
        "reason": ev.reason,
    }


# Any constant: PostgreSQL's transaction-level advisory lock that serialises appends to the chain.
_APPEND_LOCK = 7_300_417


def lock_for_append(session: Session) -> None:
    """Serialise this transaction's appends (audit chain, review versions) with everyone else's.

    SQLite already runs one writer at a time (``BEGIN IMMEDIATE``). PostgreSQL, under READ
    COMMITTED, would let two transactions read the same last audit row and fork the chain, so
    they queue on an advisory lock that is released at commit or rollback.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _APPEND_LOCK})


def record_audit(
    session: Session,
    actor: str,
    action: str,
    object_type: str,
    object_id: str | int,
    old_value: dict[str, Any] | None = None,
    new_value: dict[str, Any] | None = None,
    reason: str = "",
) -> AuditEvent:
    """Append one audit event, chained to the previous one by hash."""
    lock_for_append(session)
    last = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(1)).first()
    prev = last.hash if last else GENESIS
    ev = AuditEvent(
        at=utcnow(),
        actor=actor,
        action=action,
        object_type=object_type,
        object_id=str(object_id),
        old_value=old_value,
        new_value=new_value,
        reason=reason,
        prev_hash=prev,
        hash="",
    )
    ev.hash = _event_hash(prev, audit_fields(ev))
    session.add(ev)
    session.flush()
    return ev


def first_bad_audit(session: Session) -> AuditEvent | None:
    """The first audit row whose chain does not hold (edited, inserted or deleted before it)."""
    prev = GENESIS
    for ev in session.scalars(select(AuditEvent).order_by(AuditEvent.id)):
        if ev.prev_hash != prev or ev.hash != _event_hash(prev, audit_fields(ev)):
            return ev
        prev = ev.hash
    return None


def verify_audit(session: Session) -> int | None:
    """Id of the first audit row whose chain does not hold, or None when all rows check out."""
    bad = first_bad_audit(session)
    return bad.id if bad is not None else None


def new_session(url: str) -> Session:
    """A plain session for long jobs that commit in batches (``session.commit()``)."""
    return sessionmaker(get_engine(url), expire_on_commit=False)()
