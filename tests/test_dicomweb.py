"""DICOMweb pull against a real Orthanc on loopback (skipped when Orthanc is not installed)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import func, select

from tests.conftest import make_settings
from tests.orthanc import OrthancServer, orthanc_server
from workbench.config import Settings
from workbench.db.store import Instance, Series, Study, session_scope
from workbench.dicom.dicomweb import (
    Credentials,
    DicomwebError,
    StudyRef,
    connect,
    load_credentials,
    retrieve_study,
    search_studies,
)
from workbench.dicom.read.header import read_header
from workbench.dicom.read.pixels import read_image
from workbench.dicom.synth import synthesize_cohort
from workbench.pacs.pull import pull_dicomweb, pulled_dir, staging_dir

N_STUDIES = 4


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four synthetic DX studies (two instances each) in mixed transfer syntaxes."""
    out = tmp_path_factory.mktemp("source")
    synthesize_cohort(out, n_studies=N_STUDIES, seed=2, modality="DX", image_size=64)
    return out


def _source_files(source: Path) -> list[Path]:
    return sorted(source.rglob("*.dcm"))


def _store(server: OrthancServer, source: Path) -> None:
    """STOW-RS every source file into ``server``."""
    client = connect(server.dicomweb_url, Credentials(server.user, server.password))
    client.store_instances([pydicom.dcmread(f) for f in _source_files(source)])


def _credentials(server: OrthancServer) -> Credentials:
    return Credentials(server.user, server.password)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, source: Path) -> Iterator[OrthancServer]:
    """An Orthanc holding the source studies, shared by the tests that only read from it."""
    with orthanc_server(tmp_path_factory.mktemp("pacs")) as server:
        _store(server, source)
        yield server


def _catalog_counts(settings: Settings) -> dict[str, int]:
    """StudyInstanceUID -> number of catalogued instances."""
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(Study.study_uid, func.count(Instance.id))
            .join(Series, Series.study_id == Study.id)
            .join(Instance, Instance.series_id == Series.id)
            .group_by(Study.study_uid)
        ).all()
    return {uid: n for uid, n in rows}


def _source_counts(source: Path) -> dict[str, int]:
    return dict(Counter(read_header(f).study_instance_uid for f in _source_files(source)))


def _instance_paths(settings: Settings) -> list[tuple[str, str]]:
    with session_scope(settings.database_url) as session:
        return [(s, p) for s, p in session.execute(select(Instance.sop_uid, Instance.path))]


# --- search and pull ------------------------------------------------------------------------


def test_qido_finds_stored_studies_and_filters_by_modality_patient_and_date(
    pacs: OrthancServer, source: Path
) -> None:
    client = connect(pacs.dicomweb_url, _credentials(pacs))
    headers = [read_header(f) for f in _source_files(source)]
    by_study = {h.study_instance_uid: h for h in headers}

    every = search_studies(client)
    assert {r.study_uid for r in every} == set(by_study)
    counts = _source_counts(source)
    assert all(r.n_instances == counts[r.study_uid] for r in every)
    assert all(r.modalities == ("DX",) for r in every)

    assert {r.study_uid for r in search_studies(client, modality="DX")} == set(by_study)
    assert search_studies(client, modality="CT") == []

    patient = headers[0].patient_id
    theirs = {h.study_instance_uid for h in headers if h.patient_id == patient}
    assert {r.study_uid for r in search_studies(client, patient_id=patient)} == theirs

    one = headers[0].study_instance_uid
    assert [r.study_uid for r in search_studies(client, study_uid=one)] == [one]
    assert len(search_studies(client, limit=2)) == 2

    dates = sorted(h.study_date for h in headers if h.study_date)
    assert len(search_studies(client, date_from=dates[0], date_to=dates[-1])) == N_STUDIES
    assert search_studies(client, date_to="19000101") == []
    with pytest.raises(DicomwebError, match="YYYYMMDD"):
        search_studies(client, date_from="2020-01-01")


def test_pull_catalogs_every_instance_with_the_source_pixels(
    pacs: OrthancServer, source: Path, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path / "home")
    summary = pull_dicomweb(
        settings,
        pacs.dicomweb_url,
        _credentials(pacs),
        modality="DX",
        labels=source / "labels.csv",
        cohort="pulled",
        progress=False,
    )
    n_files = len(_source_files(source))
    assert (summary.found, summary.pulled, summary.already_present, summary.failed) == (
        N_STUDIES,
        N_STUDIES,
        0,
        0,
    )
    assert summary.ingest.ingested == n_files
    assert summary.ingest.quarantined == 0
    assert summary.ingest.labelled == N_STUDIES
    assert len(summary.ingest.study_ids) == N_STUDIES
    assert _catalog_counts(settings) == _source_counts(source)

    # every pulled file decodes to the same stored pixels as its source
    source_hash = {
        read_header(f).sop_instance_uid: read_image(f).pixel_hash for f in _source_files(source)
    }
    pulled = _instance_paths(settings)
    assert len(pulled) == n_files
    for sop_uid, path in pulled:
        assert Path(path).is_relative_to(pulled_dir(settings).resolve())
        assert sop_uid not in Path(path).name  # file names are hashes, not UIDs
        assert read_image(Path(path)).pixel_hash == source_hash[sop_uid]
    assert not any(staging_dir(settings).iterdir())

    # a second pull finds everything present and adds nothing
    again = pull_dicomweb(settings, pacs.dicomweb_url, _credentials(pacs), progress=False)
    assert (again.pulled, again.already_present, again.ingest.ingested) == (0, N_STUDIES, 0)
    assert _catalog_counts(settings) == _source_counts(source)


def test_a_study_that_arrives_short_is_not_catalogued(
    pacs: OrthancServer, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workbench.pacs.pull as pull

    real = pull.retrieve_study

    def lose_one(client: DICOMwebClient, study_uid: str, dest: Path) -> int:
        real(client, study_uid, dest)
        victim = sorted(dest.glob("*.dcm"))[0]
        victim.unlink()
        return len(list(dest.glob("*.dcm")))

    monkeypatch.setattr(pull, "retrieve_study", lose_one)
    settings = make_settings(tmp_path / "home")
    one = read_header(_source_files(source)[0]).study_instance_uid
    summary = pull_dicomweb(
        settings, pacs.dicomweb_url, _credentials(pacs), study_uid=one, progress=False
    )
    assert (summary.found, summary.pulled, summary.failed) == (1, 0, 1)
    assert "reports 2 instances but sent 1" in summary.failures[0]
    assert _catalog_counts(settings) == {}
    assert not any(staging_dir(settings).iterdir())
    assert not pulled_dir(settings).exists()


# --- credentials and errors -----------------------------------------------------------------


def test_a_wrong_password_is_refused_in_one_line_without_the_password(
    pacs: OrthancServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = Credentials(pacs.user, "not-the-password-" + pacs.password[:4])
    settings = make_settings(tmp_path / "home")
    with caplog.at_level(logging.DEBUG), pytest.raises(DicomwebError) as info:
        pull_dicomweb(settings, pacs.dicomweb_url, wrong, progress=False)
    message = str(info.value)
    assert message == f"the server refused the credentials for {pacs.dicomweb_url} (HTTP 401)"
    assert info.value.status == 401
    assert "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    for secret in (wrong.password, pacs.password):
        assert secret not in message
        assert secret not in repr(info.value)
        assert secret not in caplog.text
    assert wrong.password not in repr(wrong)

    with pytest.raises(DicomwebError, match="asks for credentials"):
        search_studies(connect(pacs.dicomweb_url, None))


def test_an_unreachable_server_is_one_clear_line(tmp_path: Path) -> None:
    from tests.orthanc import free_port

    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    client = connect(url, Credentials("u", "secret-pw"), timeout=2, retries=1, backoff=0.01)
    with pytest.raises(DicomwebError) as info:
        retrieve_study(client, "1.2.3", tmp_path / "out")
    assert str(info.value) == f"retrieving a study: cannot reach the DICOMweb server at {url}"
    assert "secret-pw" not in repr(info.value)


def test_credentials_in_the_url_are_refused() -> None:
    with pytest.raises(DicomwebError, match="not in the URL") as info:
        connect("http://someone:hunter2@127.0.0.1:1/dicom-web", None)
    assert "hunter2" not in str(info.value)


def test_credentials_come_from_the_environment() -> None:
    env = {"WORKBENCH_DICOMWEB_USER": "reader", "WORKBENCH_DICOMWEB_PASSWORD": "pw:with:colons"}
    assert load_credentials(env) == Credentials("reader", "pw:with:colons")
    assert load_credentials({}) is None
    with pytest.raises(DicomwebError, match="WORKBENCH_DICOMWEB_PASSWORD is not set") as info:
        load_credentials({"WORKBENCH_DICOMWEB_USER": "reader"})
    assert "reader" not in str(info.value)


def test_credentials_come_from_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "dicomweb.cred"
    path.write_text("reader:s3cret:part\nignored second line\n")
    path.chmod(0o600)
    assert load_credentials({"WORKBENCH_DICOMWEB_CREDENTIALS": str(path)}) == Credentials(
        "reader", "s3cret:part"
    )
    path.write_text("no-separator-here\n")
    with pytest.raises(DicomwebError, match="must be user:password") as info:
        load_credentials({"WORKBENCH_DICOMWEB_CREDENTIALS": str(path)})
    assert "no-separator-here" not in str(info.value)
    with pytest.raises(DicomwebError, match="cannot open"):
        load_credentials({"WORKBENCH_DICOMWEB_CREDENTIALS": str(tmp_path / "missing")})


def test_a_world_readable_credentials_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dicomweb.cred"
    path.write_text("reader:s3cret\n")
    path.chmod(0o644)
    with pytest.raises(DicomwebError, match="readable or writable by every user") as info:
        load_credentials({"WORKBENCH_DICOMWEB_CREDENTIALS": str(path)})
    assert "s3cret" not in str(info.value)
    assert "chmod 600" in str(info.value)


# --- a server that dies mid-pull ------------------------------------------------------------


def test_a_pull_cut_by_a_dying_server_resumes_without_partial_or_duplicate_studies(
    source: Path, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path / "home")
    expected = _source_counts(source)
    with orthanc_server(tmp_path / "orthanc") as server:
        _store(server, source)
        staged: list[StudyRef] = []

        def kill_after_first(ref: StudyRef, folder: Path) -> None:
            staged.append(ref)
            if len(staged) == 1:
                assert folder.name.endswith(".partial")
                assert len(list(folder.glob("*.dcm"))) == expected[ref.study_uid]
                server.kill()

        with pytest.raises(DicomwebError, match="cannot reach") as info:
            pull_dicomweb(
                settings,
                server.dicomweb_url,
                _credentials(server),
                progress=False,
                on_study_staged=kill_after_first,
            )
        assert "\n" not in str(info.value)
        assert server.process is not None and server.process.poll() is not None

        # the study staged before the kill is whole in the catalog; the next one left only
        # a .partial folder and not a single catalog row
        counts = _catalog_counts(settings)
        assert counts == {staged[0].study_uid: expected[staged[0].study_uid]}
        leftovers = list(staging_dir(settings).iterdir())
        assert len(leftovers) == 1 and leftovers[0].name.endswith(".partial")
        assert len(list(pulled_dir(settings).iterdir())) == 1

        # same storage, server back: the pull completes, every study exactly once
        server.start()
        summary = pull_dicomweb(settings, server.dicomweb_url, _credentials(server), progress=False)
    assert (summary.found, summary.pulled, summary.already_present, summary.failed) == (
        N_STUDIES,
        N_STUDIES - 1,
        1,
        0,
    )
    assert _catalog_counts(settings) == expected
    sops = [s for s, _ in _instance_paths(settings)]
    assert len(sops) == len(set(sops)) == sum(expected.values())
    assert not any(staging_dir(settings).iterdir())
    assert len(list(pulled_dir(settings).iterdir())) == N_STUDIES
    assert all(os.path.exists(p) for _, p in _instance_paths(settings))


def test_the_cli_pulls_with_credentials_from_the_environment_and_fails_in_one_line(
    pacs: OrthancServer, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKBENCH_")}
    env.update(
        WORKBENCH_HOME=str(tmp_path / "home"),
        WORKBENCH_DICOMWEB_USER=pacs.user,
        WORKBENCH_DICOMWEB_PASSWORD=pacs.password,
        PYTHONWARNINGS="ignore",
    )
    cmd = [sys.executable, "-m", "workbench.cli", "ingest", "--dicomweb", pacs.dicomweb_url]
    ok = subprocess.run([*cmd, "--cohort", "pacs"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert pacs.password not in ok.stdout + ok.stderr
    env["WORKBENCH_DICOMWEB_PASSWORD"] = "wrong"
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"error: the server refused the credentials for {pacs.dicomweb_url} (HTTP 401)"
    ]
