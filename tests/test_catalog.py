"""Ingest into the catalog, quarantine, pseudonymisation and patient-level splits."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, select, text

from tests.conftest import make_settings
from workbench.catalog.cohorts import cohort_items, cohort_summary, split_cohort
from workbench.catalog.ingest import CatalogError, ingest, retry_quarantine
from workbench.config import Settings
from workbench.db.store import Instance, Quarantine, Series, Study, get_engine, session_scope
from workbench.dicom.synth import synthesize_cohort

FAKE_MARKERS = ("Fakename", "FAKEID", "FAKEACC", "Fakedoc")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("src") / "cohort"
    synthesize_cohort(out, n_studies=12, seed=3, modality="DX", image_size=64)
    return out


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _with_bad_files(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    good = next(dest.rglob("*.dcm"))
    data = good.read_bytes()
    (dest / "broken").mkdir()
    (dest / "broken" / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (dest / "broken" / "notes.dcm").write_bytes(b"this is a clinician's note, not DICOM\n" * 20)
    return dest


def test_ingest_counts_files_and_reingest_adds_nothing(settings: Settings, source: Path) -> None:
    n_dcm = len(list(source.rglob("*.dcm")))
    first = ingest(settings, source, source / "labels.csv", "c", progress=False)
    assert (first.ingested, first.already_present, first.quarantined) == (n_dcm, 0, 0)
    assert first.labelled == 12
    second = ingest(settings, source, source / "labels.csv", "c", progress=False)
    assert (second.ingested, second.already_present, second.quarantined) == (0, n_dcm, 0)
    with session_scope(settings.database_url) as s:
        assert len(s.scalars(select(Instance)).all()) == n_dcm
        assert len(s.scalars(select(Study)).all()) == 12
    assert len(cohort_items(settings, "c")) == 12


def test_ingest_quarantines_truncated_and_non_dicom_files_and_goes_on(
    settings: Settings, source: Path, tmp_path: Path
) -> None:
    src = _with_bad_files(source, tmp_path / "mixed")
    n_dcm = len(list(source.rglob("*.dcm")))
    before = _tree_hashes(src)
    summary = ingest(settings, src, src / "labels.csv", "c", progress=False)
    assert summary.ingested == n_dcm
    assert summary.quarantined == 2
    with session_scope(settings.database_url) as s:
        reasons = {Path(q.path).name: q.reason for q in s.scalars(select(Quarantine))}
    assert reasons == {"truncated.dcm": "truncated_pixel_data", "notes.dcm": "not_dicom"}
    assert _tree_hashes(src) == before, "ingest must never modify source files"


def test_catalog_holds_no_names_or_ids_from_the_source_headers(
    settings: Settings, source: Path
) -> None:
    ingest(settings, source, source / "labels.csv", "c", progress=False)
    engine = get_engine(settings.database_url)
    dump = []
    with engine.connect() as conn:
        for table in inspect(engine).get_table_names():
            for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                dump.append(" ".join(str(v) for v in row))
    blob = "\n".join(dump)
    assert "FAKEID" not in blob and blob  # the catalog is not empty, and holds no fake ID
    for marker in FAKE_MARKERS:
        assert marker not in blob


def test_split_puts_no_patient_in_two_splits_and_is_reproducible(
    settings: Settings, tmp_path: Path
) -> None:
    src = tmp_path / "many"
    synthesize_cohort(src, n_studies=40, seed=5, modality="DX", image_size=48)
    ingest(settings, src, src / "labels.csv", "big", progress=False)
    counts = split_cohort(settings, "big", seed=11)
    assert sum(counts.values()) == 40 and all(counts[s] > 0 for s in counts)
    items = cohort_items(settings, "big")
    splits_of: dict[str, set[str | None]] = {}
    for it in items:
        splits_of.setdefault(it.patient, set()).add(it.split)
    assert all(len(s) == 1 for s in splits_of.values())
    assert any(len([i for i in items if i.patient == p]) > 1 for p in splits_of)
    again = split_cohort(settings, "big", seed=11)
    assert again == counts
    assert [i.split for i in cohort_items(settings, "big")] == [i.split for i in items]
    with pytest.raises(CatalogError, match="already split"):
        split_cohort(settings, "big", seed=12)


def test_unknown_cohort_is_a_clear_error(settings: Settings) -> None:
    with pytest.raises(CatalogError, match="no cohort named 'nope'"):
        split_cohort(settings, "nope")


def _first_dcm(folder: Path) -> Path:
    return next(p for p in sorted(folder.rglob("*.dcm")))


def test_a_process_pool_and_a_single_process_catalog_the_same_pixels(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    synthesize_cohort(src, n_studies=20, seed=8, modality="DX", image_size=48)
    catalogs = []
    for workers in (1, 2):
        s = make_settings(tmp_path / f"home{workers}")
        summary = ingest(s, src, progress=False, workers=workers)
        assert summary.ingested == 40
        with session_scope(s.database_url) as session:
            catalogs.append(
                sorted(
                    (i.sop_uid, i.pixel_hash, i.cache_key)
                    for i in session.scalars(select(Instance))
                )
            )
    assert catalogs[0] == catalogs[1]


def test_reingest_skips_known_files_without_opening_them(
    settings: Settings, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest(settings, source, progress=False)
    import workbench.catalog.cache as cache

    def boom(path: Path, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"{path} was opened again")

    monkeypatch.setattr(cache, "read_image", boom)
    again = ingest(settings, source, progress=False, workers=1)
    assert again.ingested == 0 and again.already_present == 24


def test_an_image_that_may_carry_burned_in_text_is_quarantined_unless_allowed(
    settings: Settings, tmp_path: Path, source: Path
) -> None:
    import pydicom

    folder = tmp_path / "burned"
    folder.mkdir()
    ds = pydicom.dcmread(_first_dcm(source))
    ds.BurnedInAnnotation = "YES"
    ds.save_as(folder / "burned.dcm")
    us = pydicom.dcmread(_first_dcm(source))
    del us.BurnedInAnnotation
    us.Modality = "US"
    us.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["burned-in test"])
    us.file_meta.MediaStorageSOPInstanceUID = us.SOPInstanceUID
    us.save_as(folder / "us.dcm")
    refused = ingest(settings, folder, progress=False)
    assert (refused.ingested, refused.quarantined) == (0, 2)
    with session_scope(settings.database_url) as s:
        assert {q.reason for q in s.scalars(select(Quarantine))} == {"burned_in_annotation"}
    allowed = retry_quarantine(settings, progress=False, allow_burned_in=True)
    assert (allowed.ingested, allowed.quarantined) == (2, 0)
    with session_scope(settings.database_url) as s:
        assert s.scalars(select(Quarantine)).all() == []


def test_a_quarantined_file_that_reads_now_leaves_the_quarantine_on_retry(
    settings: Settings, tmp_path: Path, source: Path
) -> None:
    folder = tmp_path / "retry"
    folder.mkdir()
    good = _first_dcm(source).read_bytes()
    target = folder / "x.dcm"
    target.write_bytes(good[: len(good) // 3])
    assert ingest(settings, folder, progress=False).quarantined == 1
    target.write_bytes(good)  # e.g. the transfer finished, or a codec was installed
    summary = retry_quarantine(settings, progress=False)
    assert (summary.ingested, summary.quarantined) == (1, 0)
    with session_scope(settings.database_url) as s:
        assert s.scalars(select(Quarantine)).all() == []


def test_a_ct_series_with_a_missing_slice_is_reported_not_resampled(
    settings: Settings, tmp_path: Path
) -> None:
    import pydicom

    src = tmp_path / "ct"
    synthesize_cohort(src, n_studies=2, seed=9, modality="CT", image_size=32)
    by_series: dict[str, list[Path]] = {}
    for p in sorted(src.rglob("*.dcm")):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        by_series.setdefault(ds.SeriesInstanceUID, []).append((int(ds.InstanceNumber), p))
    broken_uid, slices = sorted(by_series.items())[0]
    dict(slices)[10].unlink()  # a slice in the middle goes missing
    ingest(settings, src, src / "labels.csv", "ct", progress=False)
    with session_scope(settings.database_url) as s:
        series = {se.series_uid: se for se in s.scalars(select(Series))}
        assert series[broken_uid].volume_cache_key is None
        assert "missing positions" in " ".join(series[broken_uid].problems or [])
        (other,) = [se for uid, se in series.items() if uid != broken_uid]
        assert other.volume_cache_key and not other.problems
    items = cohort_items(settings, "ct")
    assert sorted(len(i.images) for i in items) == [0, 1]


def test_the_cohort_summary_counts_sites_views_sizes_and_transfer_syntaxes(
    settings: Settings, source: Path
) -> None:
    ingest(settings, source, source / "labels.csv", "c", progress=False)
    summary = cohort_summary(settings, "c")
    assert (summary.studies, summary.instances) == (12, 24)
    c = summary.counts
    assert set(c["view"]) == {"PA", "LL"} and sum(c["view"].values()) == 24
    assert len(c["transfer syntax"]) >= 2 and "MONOCHROME1" in c["photometric"]
    assert sum(c["label"].values()) == 12 and sum(c["site"].values()) == 24
    assert summary.lines()[0].startswith("cohort c: 12 studies")


def _run_unguarded_ingest(tmp_path: Path, with_thread: bool) -> tuple[Any, int]:
    """An ingest script without a ``__main__`` guard, run in a fresh interpreter: its result
    and how many times the script's body ran. ``with_thread``: a thread is running, so the
    workers cannot be forked and are spawned."""
    import subprocess
    import sys

    src = tmp_path / "src"
    synthesize_cohort(src, n_studies=20, seed=8, modality="DX", image_size=32)
    marker = tmp_path / "runs.txt"
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import os, threading, time\n"
        "from pathlib import Path\n"
        "from tests.conftest import make_settings\n"
        "from workbench.catalog.ingest import ingest\n"
        f"with open({str(marker)!r}, 'a') as fh:\n"
        "    fh.write('run\\n')\n"
        + (
            "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
            if with_thread
            else ""
        )
        # Each process of the script takes a home of its own (by pid): a spawned worker that
        # re-runs the script dies at once when its own ingest tries to start a pool, instead of
        # first waiting out the SQLite busy timeout (about a minute) on the parent's database.
        + f"home = Path({str(tmp_path / 'homes')!r}) / str(os.getpid())\n"
        + f"s = ingest(make_settings(home), Path({str(src)!r}), progress=False, workers=2)\n"
        "print('ingested', s.ingested)\n"
    )
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=root,
        env={**__import__("os").environ, "PYTHONPATH": str(root)},
    )
    return r, len(marker.read_text().splitlines())


def test_an_unguarded_script_with_spawned_workers_gets_a_clear_error_not_a_runaway_pool(
    tmp_path: Path,
) -> None:
    # Spawned workers import the caller's main module; without a __main__ guard they re-run
    # the script. The pool must fail once, clearly, instead of respawning workers forever.
    r, runs = _run_unguarded_ingest(tmp_path, with_thread=True)
    assert r.returncode != 0
    assert "guard the script's entry point" in r.stderr
    assert runs <= 3  # the script, and each worker once


def test_an_unguarded_script_without_threads_forks_its_workers_and_ingests(
    tmp_path: Path,
) -> None:
    # With no other thread running, the workers are forked: they inherit the loaded modules
    # instead of importing the script again, so the script runs once and ingests everything.
    r, runs = _run_unguarded_ingest(tmp_path, with_thread=False)
    assert r.returncode == 0, r.stderr
    assert "ingested 40" in r.stdout
    assert runs == 1


def test_a_file_above_the_pixel_ceiling_is_quarantined_as_too_large(
    settings: Settings, source: Path
) -> None:
    import dataclasses

    tight = dataclasses.replace(settings, max_pixel_mb=0)  # every image is over the ceiling
    summary = ingest(tight, source, progress=False, workers=1)
    assert summary.ingested == 0 and summary.quarantined == 24
    with session_scope(settings.database_url) as s:
        assert {q.reason for q in s.scalars(select(Quarantine))} == {"too_large"}


@pytest.mark.parametrize(
    ("frames", "shape", "quarantined"),
    [("volume", (3, 8, 10), 0), ("first", (8, 10), 0), ("2", (8, 10), 0), ("5", None, 1)],
)
def test_multi_frame_files_are_cached_as_the_frames_asked_for(
    tmp_path: Path, frames: str, shape: tuple[int, ...] | None, quarantined: int
) -> None:
    import dataclasses

    import numpy as np

    from tests.test_dicom_read import make_ds, save, stored_12bit
    from workbench.catalog.ingest import cache_path

    folder = tmp_path / "mf"
    folder.mkdir()
    stored = stored_12bit((3, 8, 10))
    ds = make_ds(stored, WindowCenter=2048, WindowWidth=4096, BurnedInAnnotation="NO")
    save(ds, folder / "mf.dcm")
    settings = dataclasses.replace(make_settings(tmp_path / "home"), frames=frames)
    summary = ingest(settings, folder, progress=False, workers=1)
    assert summary.quarantined == quarantined
    with session_scope(settings.database_url) as s:
        if quarantined:
            assert "no frame 5" in s.scalars(select(Quarantine.detail)).one()
            return
        key = s.scalars(select(Instance.cache_key)).one()
    cached = np.load(cache_path(settings, key))
    assert cached.shape == shape and cached.dtype == np.float16
    expected = (stored[2] if frames == "2" else stored[0]) / 4095.0
    np.testing.assert_allclose(cached if cached.ndim == 2 else cached[0], expected, atol=1e-3)
