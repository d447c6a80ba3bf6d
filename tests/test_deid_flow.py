"""De-identification through the command line: at ingest (``--deid-to``) and on export."""

from __future__ import annotations

from pathlib import Path

import pydicom
from sqlalchemy import inspect, select, text

from tests.conftest import make_settings, run_cli
from workbench.db.store import AuditEvent, get_engine, session_scope
from workbench.dicom.synth import synthesize_cohort

MARKERS = ("Fakename", "FAKEID", "FAKEACC", "Fakedoc")


def _catalog_text(url: str) -> str:
    engine = get_engine(url)
    rows = []
    with engine.connect() as conn:
        for table in inspect(engine).get_table_names():
            rows += [" ".join(map(str, r)) for r in conn.execute(text(f'SELECT * FROM "{table}"'))]
    return "\n".join(rows)


def test_ingest_with_deid_keeps_no_original_identity_anywhere(tmp_path: Path) -> None:
    src = tmp_path / "src"
    synthesize_cohort(src, n_studies=6, seed=11, modality="DX", image_size=48)
    originals = set()
    for p in src.rglob("*.dcm"):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        originals |= {str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), str(ds.PatientID)}
        originals.add(str(ds.PatientName))
    home = make_settings(tmp_path / "home").home
    out = tmp_path / "deid"
    r = run_cli(
        [
            "ingest",
            str(src),
            "--labels",
            str(src / "labels.csv"),
            "--cohort",
            "d",
            "--deid-to",
            str(out),
            "--keep-dates",
        ],
        home,
    )
    assert r.returncode == 0, r.stderr
    assert "de-identify: written 12, refused 0" in r.stdout
    assert "labelled 6 studies" in r.stdout  # labels followed the remapped UIDs
    blobs = {
        "cli output": r.stdout + r.stderr,
        "catalog": _catalog_text(f"sqlite:///{home / 'workbench.db'}"),
    }
    for f in out.rglob("*"):
        if f.is_file():
            blobs[str(f)] = f.read_bytes().decode("latin-1")
    for where, blob in blobs.items():
        for s in (*MARKERS, *originals):
            assert s not in blob, f"{s!r} found in {where}"
    for f in out.rglob("*.dcm"):
        assert pydicom.dcmread(f, stop_before_pixels=True).PatientIdentityRemoved == "YES"


def test_export_writes_deidentified_copies_and_an_audit_event(tmp_path: Path) -> None:
    src = tmp_path / "src"
    synthesize_cohort(src, n_studies=3, seed=12, modality="DX", image_size=48)
    settings = make_settings(tmp_path / "home")
    assert run_cli(["ingest", str(src), "--cohort", "e"], settings.home).returncode == 0
    before = {p: p.read_bytes() for p in src.rglob("*.dcm")}
    r = run_cli(["export", str(tmp_path / "out"), "--cohort", "e"], settings.home)
    assert r.returncode == 0, r.stderr
    assert "written 6, refused 0" in r.stdout
    assert {p: p.read_bytes() for p in src.rglob("*.dcm")} == before  # sources untouched
    exported = list((tmp_path / "out").rglob("*.dcm"))
    assert len(exported) == 6
    for f in exported:
        blob = f.read_bytes().decode("latin-1")
        assert not any(m in blob for m in MARKERS)
    with session_scope(settings.database_url) as s:
        (event,) = s.scalars(select(AuditEvent)).all()
        assert (event.action, event.object_id) == ("export.deidentified", "e")
        assert event.new_value is not None and event.new_value["written"] == 6
    bad = run_cli(["export", str(tmp_path / "x"), "--cohort", "nope"], settings.home)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: ")
