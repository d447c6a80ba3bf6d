"""Concurrent review writers: 8 processes x 300 reviews against SQLite (WAL, BEGIN IMMEDIATE)
and against a real PostgreSQL (``tests/postgres.py``). No review may be lost or duplicated, no
writer may see a lock error, versions must stay contiguous per reader, and the audit chain must
still verify. The throughput is printed, not asserted (the machine is shared)."""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.postgres import postgres_fixture
from workbench.config import Settings
from workbench.db.store import (
    AuditEvent,
    Patient,
    Prediction,
    Review,
    Study,
    get_engine,
    session_scope,
    verify_audit,
)

WORKERS = 8
WRITES = 300
READERS = 4  # two processes share each reader name, so they race for the same version numbers
PREDICTIONS = 12
CLASSES = ("normal", "effusion")

postgres = postgres_fixture("module")


def _settings(url: str) -> Settings:
    tmp = Path(tempfile.gettempdir())
    return Settings(home=tmp, database_url=url, models_dir=tmp, cache_dir=tmp)


def seed(url: str) -> list[int]:
    """A handful of predictions to review (no images: reviews only need the rows)."""
    with session_scope(url) as s:
        s.add(Patient(pseudonym="p0"))
        ids = []
        for i in range(PREDICTIONS):
            study = Study(study_uid=f"1.2.3.{i}", study_key=f"S{i:04d}", patient_pseudonym="p0")
            s.add(study)
            s.flush()
            pred = Prediction(
                study_id=study.id,
                model_name="m",
                model_version="v1",
                bundle_hash="h",
                code_version="c",
                transform_hash="t",
                pixel_hashes=[],
                probabilities={"normal": 0.7, "effusion": 0.3},
                raw_probabilities={"normal": 0.7, "effusion": 0.3},
                predicted_label="normal",
                top_k=[["normal", 0.7]],
                priority=0.7,
                per_image=[],
            )
            s.add(pred)
            s.flush()
            ids.append(pred.id)
    return ids


def write_reviews(
    url: str, worker: int, prediction_ids: list[int], barrier: Any, results: Any
) -> None:
    """One writer process: WRITES reviews, each its own transaction with its audit event."""
    from workbench.review.reviews import save_review

    settings = _settings(url)
    get_engine(url)  # connect (and check the schema) before the clock starts
    errors: list[str] = []
    barrier.wait()
    for j in range(WRITES):
        agree = (worker + j) % 3 != 0
        try:
            save_review(
                settings,
                f"reader{worker % READERS}",
                prediction_ids[(worker + j) % len(prediction_ids)],
                agree=agree,
                label=CLASSES[0] if agree else CLASSES[1],
                comment="",
                reason=f"w{worker}-{j}",  # unique per write: finds lost and duplicated rows
                confidence=1 + j % 5,
            )
        except Exception as err:  # noqa: BLE001 - reported to the parent, which fails the test
            errors.append(f"{type(err).__name__}: {err}"[:300])
    results.put((worker, errors))


def run_writers(url: str) -> tuple[float, list[str]]:
    ids = seed(url)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(WORKERS + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=write_reviews, args=(url, w, ids, barrier, results))
        for w in range(WORKERS)
    ]
    for p in procs:
        p.start()
    try:
        barrier.wait(timeout=120)
        t0 = time.perf_counter()
        errors: list[str] = []
        for _ in procs:
            _, errs = results.get(timeout=300)
            errors += errs
        elapsed = time.perf_counter() - t0
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return elapsed, errors


def check(url: str) -> None:
    with session_scope(url) as s:
        rows = s.scalars(select(Review).order_by(Review.id)).all()
        reasons = [r.reason for r in rows]
        expected = {f"w{w}-{j}" for w in range(WORKERS) for j in range(WRITES)}
        assert len(rows) == WORKERS * WRITES
        assert set(reasons) == expected and len(set(reasons)) == len(reasons)
        # Each reader's versions of a prediction are 1..n, each superseding the one before.
        chains: dict[tuple[int, str], list[Review]] = {}
        for r in rows:
            chains.setdefault((r.prediction_id, r.reviewer), []).append(r)
        for chain in chains.values():
            chain.sort(key=lambda r: r.version)
            assert [r.version for r in chain] == list(range(1, len(chain) + 1))
            assert [r.supersedes_id for r in chain] == [None] + [r.id for r in chain[:-1]]
        n_events = s.scalar(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.action.like("review.%"))
        )
        assert n_events == WORKERS * WRITES
        assert verify_audit(s) is None


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.timeout(300)
def test_concurrent_review_writers_lose_and_duplicate_nothing(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'workbench.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database("concurrency")
    get_engine(url)  # the schema, migrated once before the writers start
    elapsed, errors = run_writers(url)
    assert errors == [], errors[:5]
    check(url)
    with capsys.disabled():
        print(
            f"\n{backend}: {WORKERS} processes x {WRITES} review writes in {elapsed:.1f} s = "
            f"{WORKERS * WRITES / elapsed:.0f} transactions/s"
        )


def _migrated_schema_matches_the_models(url: str) -> None:
    """Run every Alembic migration on an empty database (not the shortcut that new databases
    take: the models' schema stamped at the head) and compare with the models."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from workbench.db.store import Base, _head_revision, migrate

    engine = create_engine(url)
    migrate(engine, use_alembic=True)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    assert version == _head_revision()
    engine.dispose()


def test_the_migrations_build_the_models_schema_on_postgresql(postgres) -> None:
    _migrated_schema_matches_the_models(postgres.create_database("schema"))


def test_the_migrations_build_the_models_schema_on_sqlite(tmp_path) -> None:
    _migrated_schema_matches_the_models(f"sqlite:///{tmp_path / 'schema.db'}")


def test_a_new_database_is_stamped_at_the_head_and_opens_without_alembic(tmp_path) -> None:
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'new.db'}"
    code = (
        "import sys; from workbench.db.store import get_engine, _current_revision, _head_revision;"
        f"e = get_engine({url!r}); assert _current_revision(e) == _head_revision();"
        "assert 'alembic' not in sys.modules, 'alembic was imported'"
    )
    for _ in range(2):  # create, then open again
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_database_at_0003_upgrades_keeping_its_rows_with_null_hu_columns(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Revision 0004 (HU cache keys, file windows) on a catalog made at 0003: its rows are
    still read, by the models and by the app, and the new columns are NULL."""
    import dataclasses
    from datetime import datetime

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import MetaData, create_engine, insert
    from sqlalchemy.orm import Session

    import workbench.db.store as store
    from tests.conftest import make_settings
    from workbench.db.store import Instance, Series, _current_revision, _head_revision, migrate
    from workbench.ui import data

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'at0003.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database("at0003")
    engine = create_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(store.__file__).parent / "migrations"))
    now = datetime(2026, 11, 30, 12, 0)
    volume = "v" * 64
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
        meta = MetaData()
        meta.reflect(conn, only=["patient", "study", "series", "instance", "prediction"])
        t = meta.tables
        conn.execute(insert(t["patient"]), {"pseudonym": "P1", "sex": "F"})
        conn.execute(
            insert(t["study"]),
            {"id": 1, "study_uid": "1.2.3", "study_key": "S0000000001", "patient_pseudonym": "P1"},
        )
        conn.execute(
            insert(t["series"]),
            {
                "id": 1,
                "series_uid": "1.2.3.4",
                "study_id": 1,
                "modality": "CT",
                "volume_cache_key": volume,
            },
        )
        conn.execute(
            insert(t["instance"]),
            [
                {
                    "sop_uid": f"1.2.3.4.{n}",
                    "series_id": 1,
                    "path": f"/x/{n}.dcm",
                    "file_sha256": "f" * 64,
                    "pixel_hash": "p" * 64,
                    "cache_key": f"{n}" * 64,
                    "rows": 8,
                    "columns": 8,
                    "frames": 1,
                    "photometric": "MONOCHROME2",
                    "transfer_syntax": "1.2.840.10008.1.2.1",
                    "voi_source": "window",
                    "slice_position": float(n),
                    "ingested_at": now,
                }
                for n in (1, 2)
            ],
        )
        conn.execute(
            insert(t["prediction"]),
            {
                "id": 1,
                "study_id": 1,
                "model_name": "m",
                "model_version": "v1",
                "bundle_hash": "b",
                "code_version": "c",
                "transform_hash": "t",
                "pixel_hashes": [],
                "probabilities": {"normal": 0.4, "nodule": 0.6},
                "raw_probabilities": {},
                "predicted_label": "nodule",
                "top_k": [["nodule", 0.6]],
                "priority": 0.6,
                "per_image": [{"view": "CT", "cache_key": volume}],
                "created_at": now,
            },
        )
    assert _current_revision(engine) == "0003"

    migrate(engine)
    assert _current_revision(engine) == _head_revision()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT hu_cache_key, windows FROM instance").all() == [
            (None, None),
            (None, None),
        ]
        assert conn.exec_driver_sql("SELECT hu_volume_cache_key FROM series").all() == [(None,)]
    with Session(engine) as session:
        series = session.scalars(select(Series)).one()
        assert (series.volume_cache_key, series.hu_volume_cache_key) == (volume, None)
        assert [i.cache_key[0] for i in series.instances] == ["1", "2"]
        assert all(i.hu_cache_key is None and i.windows is None for i in series.instances)
        assert session.scalars(select(func.count()).select_from(Instance)).one() == 2
    engine.dispose()
    # The app reads the old prediction: its volume, on the display scale (no HU cached).
    settings = dataclasses.replace(make_settings(tmp_path / "home"), database_url=url)
    detail = data.load_prediction(settings, 1)
    assert detail is not None and detail.images[0].cache_key == volume
    assert (detail.images[0].hu_cache_key, detail.images[0].windows) == (None, ())
