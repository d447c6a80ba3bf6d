"""Ingest into the catalog, quarantine, pseudonymisation and patient-level splits."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text

from workbench.catalog import CatalogError, cohort_items, ingest, split_cohort
from workbench.config import Settings
from workbench.dicom.synth import synthesize_cohort
from workbench.store import Instance, Quarantine, Study, get_engine, session_scope

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
