"""Results back to the PACS: the TID 1500 SR and the overlay secondary capture, stored with
STOW-RS into a real Orthanc and read back with WADO-RS (skipped when Orthanc is not installed);
both checked by Debian's ``dciodvfy`` (skipped when dicom3tools is not installed)."""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from tests.conftest import Pipeline, run_cli
from tests.orthanc import OrthancServer, orthanc_server
from workbench.dicom.dicomweb import (
    Credentials,
    DicomwebError,
    ServerUnreachableError,
    connect,
    store_instances,
)
from workbench.dicom.synth import synthesize_cohort
from workbench.dicom.write import (
    NOT_FOR_DIAGNOSIS,
    DicomWriteError,
    ModelIdentity,
    build_measurement_report,
    build_overlay_image,
    read_measurement_report,
)

MODEL = ModelIdentity(name="chest-xray", version="v3", bundle_hash="ab12" * 16)
PROBABILITIES = {"normal": 0.125, "pneumonia": 0.75, "effusion": 0.125}
PREDICTED = "pneumonia"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The files of one synthetic DX study (a PA and a lateral view)."""
    out = tmp_path_factory.mktemp("source")
    synthesize_cohort(out, n_studies=1, seed=11, modality="DX", image_size=64)
    return sorted(out.rglob("*.dcm"))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, study: list[Path]) -> Iterator[OrthancServer]:
    """An Orthanc holding the source study."""
    with orthanc_server(tmp_path_factory.mktemp("pacs")) as server:
        store_instances(_client(server), [pydicom.dcmread(f) for f in study])
        yield server


def _client(server: OrthancServer, password: str | None = None):  # noqa: ANN202
    return connect(server.dicomweb_url, Credentials(server.user, password or server.password))


def _headers(files: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def _overlay_rgb(source: Path) -> np.ndarray:
    """A made-up heat map blended over the source image: (rows, cols, 3) uint8."""
    pixels = pydicom.dcmread(source).pixel_array.astype(np.float64)
    grey = (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1.0)
    rows, cols = grey.shape
    y, x = np.mgrid[:rows, :cols]
    heat = np.exp(-((y - rows / 3) ** 2 + (x - cols / 2) ** 2) / (2 * (rows / 6) ** 2))
    rgb = 0.6 * grey[..., None] + 0.4 * np.stack([heat, np.zeros_like(heat), 1 - heat], -1)
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _objects(study: list[Path]) -> tuple[Dataset, Dataset]:
    sr = build_measurement_report(_headers(study), PROBABILITIES, PREDICTED, MODEL)
    sc = build_overlay_image(
        pydicom.dcmread(study[0], stop_before_pixels=True),
        _overlay_rgb(study[0]),
        MODEL,
        ["gradcam saliency for pneumonia (p = 0.75)"],
    )
    return sr, sc


def _dciodvfy(ds: Dataset, path: Path) -> list[str]:
    """dciodvfy's report lines on ``ds`` written to ``path``; skip when it is not installed."""
    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    ds.save_as(path, enforce_file_format=True)
    done = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    return (done.stdout + done.stderr).splitlines()


# --- building, no server --------------------------------------------------------------------


def test_the_report_reads_back_its_classes_probabilities_and_sources_and_is_unverified(
    study: list[Path],
) -> None:
    sr, sc = _objects(study)
    content = read_measurement_report(sr)
    assert content.probabilities == PROBABILITIES
    assert content.predicted_label == PREDICTED
    assert set(content.source_sop_uids) == {h.SOPInstanceUID for h in _headers(study)}
    assert (content.algorithm_name, content.algorithm_version) == ("chest-xray", "v3")
    assert not content.verified and not content.complete
    assert sr.VerificationFlag == "UNVERIFIED"
    assert NOT_FOR_DIAGNOSIS in sr.SeriesDescription
    assert NOT_FOR_DIAGNOSIS in sc.SeriesDescription
    source = _headers(study)[0]
    for obj in (sr, sc):  # the same patient and study, a new series
        assert obj.StudyInstanceUID == source.StudyInstanceUID
        assert obj.PatientID == source.PatientID
        assert obj.SeriesInstanceUID not in {h.SeriesInstanceUID for h in _headers(study)}
    assert sc.BurnedInAnnotation == "YES"
    assert sc.PhotometricInterpretation == "RGB"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_it_refuses_a_prediction_it_cannot_report(study: list[Path]) -> None:
    headers = _headers(study)
    with pytest.raises(DicomWriteError, match="not one of the classes"):
        build_measurement_report(headers, PROBABILITIES, "fracture", MODEL)
    with pytest.raises(DicomWriteError, match=r"not in \[0, 1\]"):
        build_measurement_report(headers, {"normal": 1.5, "pneumonia": 0.0}, "normal", MODEL)
    with pytest.raises(DicomWriteError, match="no source images"):
        build_measurement_report([], PROBABILITIES, PREDICTED, MODEL)
    other = copy.deepcopy(headers[0])
    other.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(DicomWriteError, match="2 studies"):
        build_measurement_report([headers[0], other], PROBABILITIES, PREDICTED, MODEL)


def test_dciodvfy_finds_no_errors_in_the_report_or_the_overlay(
    study: list[Path], tmp_path: Path
) -> None:
    sr, sc = _objects(study)
    for name, obj in (("sr", sr), ("sc", sc)):
        lines = _dciodvfy(obj, tmp_path / f"{name}.dcm")
        errors = [line for line in lines if line.startswith("Error")]
        assert errors == [], f"{name}: {errors}"


def test_stow_reports_instances_the_server_refused_without_naming_them(
    study: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    sr, sc = _objects(study)
    client = connect("http://127.0.0.1:9/dicom-web", None)
    failed = Dataset()
    failed.ReferencedSOPInstanceUID = sc.SOPInstanceUID
    failed.FailureReason = 0xA700
    answer = Dataset()
    answer.FailedSOPSequence = [failed]
    monkeypatch.setattr(client, "store_instances", lambda datasets: answer)
    with pytest.raises(DicomwebError, match=r"refused 1 of 2 \(failure reason 0xA700\)") as err:
        store_instances(client, [sr, sc])
    assert sc.SOPInstanceUID not in str(err.value)


def test_stow_to_a_server_that_is_not_there_is_a_clear_error(study: list[Path]) -> None:
    from tests.orthanc import free_port

    sr, _ = _objects(study)
    client = connect(f"http://127.0.0.1:{free_port()}/dicom-web", None, retries=0)
    with pytest.raises(ServerUnreachableError, match="cannot reach the DICOMweb server"):
        store_instances(client, [sr])


# --- STOW and back --------------------------------------------------------------------------


def test_stow_stores_the_report_and_overlay_and_wado_gives_them_back(
    pacs: OrthancServer, study: list[Path], tmp_path: Path
) -> None:
    sr, sc = _objects(study)
    client = _client(pacs)
    result = store_instances(client, [sr, sc])
    assert set(result.stored) == {sr.SOPInstanceUID, sc.SOPInstanceUID}

    study_uid = sr.StudyInstanceUID
    got_sr = client.retrieve_instance(study_uid, sr.SeriesInstanceUID, sr.SOPInstanceUID)
    got_sc = client.retrieve_instance(study_uid, sc.SeriesInstanceUID, sc.SOPInstanceUID)
    content = read_measurement_report(got_sr)
    assert content.probabilities == PROBABILITIES
    assert content.predicted_label == PREDICTED
    assert set(content.source_sop_uids) == {h.SOPInstanceUID for h in _headers(study)}
    assert got_sr.VerificationFlag == "UNVERIFIED"
    assert got_sc.BurnedInAnnotation == "YES"
    assert np.array_equal(got_sc.pixel_array, sc.pixel_array)
    # the PACS files both under the source study, beside its own series
    series = {
        s["0020000E"]["Value"][0] for s in client.search_for_series(study_instance_uid=study_uid)
    }
    assert {sr.SeriesInstanceUID, sc.SeriesInstanceUID} < series
    # sending the same objects again leaves one copy of each
    assert set(store_instances(client, [sr, sc]).stored) == {sr.SOPInstanceUID, sc.SOPInstanceUID}
    assert len(client.search_for_instances(study_uid, sr.SeriesInstanceUID)) == 1

    for name, obj in (("sr", got_sr), ("sc", got_sc)):
        lines = _dciodvfy(obj, tmp_path / f"{name}.dcm")
        assert [line for line in lines if line.startswith("Error")] == [], name


def test_stow_with_a_wrong_password_says_the_credentials_were_refused(
    pacs: OrthancServer, study: list[Path]
) -> None:
    sr, _ = _objects(study)
    with pytest.raises(DicomwebError, match="refused the credentials") as err:
        store_instances(_client(pacs, password="not-the-password"), [sr])  # test fixture
    assert err.value.status == 401
    assert "not-the-password" not in str(err.value)


# --- through the CLI, on the trained pipeline -------------------------------------------------


def test_send_stores_the_latest_prediction_audits_it_and_sending_again_adds_no_copies(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    from workbench.db.store import AuditEvent, Prediction, Study, session_scope

    settings = pipeline.settings
    with session_scope(settings.database_url) as session:
        pred = session.scalars(select(Prediction).order_by(Prediction.id)).first()
        assert pred is not None
        key, study_uid = pred.study.study_key, pred.study.study_uid
        probabilities = dict(pred.probabilities)
    with orthanc_server(tmp_path / "pacs") as server:
        env = {
            "WORKBENCH_DATABASE_URL": settings.database_url,
            "WORKBENCH_MODELS": str(settings.models_dir),
            "WORKBENCH_CACHE": str(settings.cache_dir),
            "WORKBENCH_DICOMWEB_USER": server.user,
        }
        refused = run_cli(
            ["send", "--dicomweb", server.dicomweb_url, "--study", key],
            settings.home,
            WORKBENCH_DICOMWEB_PASSWORD="wrong",  # test fixture
            **env,
        )
        assert refused.returncode == 1
        assert "refused the credentials" in refused.stderr

        done = run_cli(
            ["send", "--dicomweb", server.dicomweb_url, "--study", key, "--model", pipeline.model],
            settings.home,
            WORKBENCH_DICOMWEB_PASSWORD=server.password,
            **env,
        )
        assert done.returncode == 0, done.stderr
        assert "sent 1 studies" in done.stdout
        client = _client(server)
        found = client.search_for_instances(study_instance_uid=study_uid)
        by_class = [(i["00080016"]["Value"][0], i) for i in found]
        sr_item = next(i for uid, i in by_class if uid == COMPREHENSIVE_3D_SR)
        sr = client.retrieve_instance(
            study_uid, sr_item["0020000E"]["Value"][0], sr_item["00080018"]["Value"][0]
        )
        content = read_measurement_report(sr)
        assert content.probabilities == pytest.approx(probabilities)
        assert content.algorithm_name == pipeline.model
        sc_items = [i for uid, i in by_class if uid == SECONDARY_CAPTURE]
        assert len(sc_items) == 2  # one overlay per explained view (PA and lateral)
        sc = client.retrieve_instance(
            study_uid, sc_items[0]["0020000E"]["Value"][0], sc_items[0]["00080018"]["Value"][0]
        )
        assert sc.BurnedInAnnotation == "YES" and sc.PatientID == sr.PatientID
        for name, obj in (("sr", sr), ("sc", sc)):
            lines = _dciodvfy(obj, tmp_path / f"cli-{name}.dcm")
            assert [line for line in lines if line.startswith("Error")] == [], name
        first_send = {i["00080018"]["Value"][0] for i in found}

        # --all sends every study this model predicted, the one above a second time
        with session_scope(settings.database_url) as session:
            predicted = set(
                session.scalars(
                    select(Study.study_key)
                    .join(Prediction, Prediction.study_id == Study.id)
                    .where(Prediction.model_name == pipeline.model)
                )
            )
        assert key in predicted and len(predicted) > 1
        again = run_cli(
            ["send", "--dicomweb", server.dicomweb_url, "--all", "--model", pipeline.model],
            settings.home,
            WORKBENCH_DICOMWEB_PASSWORD=server.password,
            **env,
        )
        assert again.returncode == 0, again.stderr
        assert f"sent {len(predicted)} studies" in again.stdout
        # sending again sent the same instances (UIDs derive from the prediction), not copies:
        # the study holds exactly what the first send stored
        resent = client.search_for_instances(study_instance_uid=study_uid)
        assert {i["00080018"]["Value"][0] for i in resent} == first_send
        every = client.search_for_instances()
        srs = [i for i in every if i["00080016"]["Value"][0] == COMPREHENSIVE_3D_SR]
        assert len(srs) == len(predicted)  # one SR per predicted study
    with session_scope(settings.database_url) as session:
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "send_to_pacs").order_by(AuditEvent.id)
        ).all()
    assert [e.actor for e in events] == ["cli"] * (1 + len(predicted))
    sent_keys = [e.new_value["study_key"] for e in events if e.new_value is not None]
    assert sent_keys[0] == key and sorted(sent_keys[1:]) == sorted(predicted)
    twice = [e.new_value for e in events if e.new_value and e.new_value["study_key"] == key]
    assert twice[0]["sr_sop_instance_uid"] == twice[1]["sr_sop_instance_uid"]
    assert twice[0]["sc_sop_instance_uids"] == twice[1]["sc_sop_instance_uids"]
    # the command names studies by key, never by patient identity
    source = pydicom.dcmread(next(pipeline.source.rglob("*.dcm")), stop_before_pixels=True)
    assert str(source.PatientName) not in done.stdout + done.stderr


def test_predict_tags_the_studies_a_dicomweb_search_finds(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """Batch tagging from a PACS: push two studies, then `workbench predict --dicomweb` with a
    patient filter pulls (into a fresh home) and predicts exactly those, once."""
    from collections import defaultdict

    from workbench.db.store import Prediction, session_scope
    from workbench.dicom.dicomweb import store_instances

    by_study: dict[str, list[Path]] = defaultdict(list)
    for f in sorted(pipeline.source.rglob("*.dcm")):
        by_study[str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)].append(f)
    patients: dict[str, list[str]] = defaultdict(list)
    for uid, files in by_study.items():
        patients[str(pydicom.dcmread(files[0], stop_before_pixels=True).PatientID)].append(uid)
    patient, uids = next(iter(sorted(patients.items())))
    other = next(u for p, us in sorted(patients.items()) if p != patient for u in us)
    home = tmp_path / "home"
    with orthanc_server(tmp_path / "pacs") as server:
        client = _client(server)
        for uid in [*uids, other]:
            store_instances(client, [pydicom.dcmread(f) for f in by_study[uid]])
        args = ["predict", "--model", str(pipeline.bundle), "--dicomweb", server.dicomweb_url]
        args += ["--patient", patient, "--explain", "none"]
        env = {"WORKBENCH_DICOMWEB_USER": server.user}
        done = run_cli(args, home, WORKBENCH_DICOMWEB_PASSWORD=server.password, **env)
        assert done.returncode == 0, done.stderr
        assert f"found {len(uids)} studies" in done.stdout
        again = run_cli(args, home, WORKBENCH_DICOMWEB_PASSWORD=server.password, **env)
        assert again.returncode == 0, again.stderr
        assert "predicted 0 studies" in again.stdout
    with session_scope(f"sqlite:///{home / 'workbench.db'}") as session:
        rows = session.scalars(select(Prediction)).all()
        assert sorted(r.study.study_uid for r in rows) == sorted(uids)  # once each, no other
