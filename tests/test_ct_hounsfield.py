"""CT modality values: the Hounsfield-unit cache written at ingest, the file's own windows in
the catalog, and the review app's CT presets and HU sliders applied to those values."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from tests.conftest import make_settings
from tests.test_app import PASSWORD, open_study_page, sign_in
from workbench.catalog.cache import HU_CACHE_FORMAT, file_cache_key, hu_cache_key
from workbench.catalog.cohorts import items_for_studies
from workbench.catalog.ingest import cache_path, ingest
from workbench.config import Settings, get_settings
from workbench.db.store import Instance, Prediction, Series, Study, session_scope
from workbench.dicom.read.header import FileWindow
from workbench.dicom.read.hounsfield import hounsfield_values
from workbench.dicom.read.pixels import read_image
from workbench.review import users
from workbench.ui import data
from workbench.ui.imaging import CT_PRESETS, hu_presets, window_hu

SLOPE, INTERCEPT = 0.5, -1024.0
WINDOWS = ((40.0, 400.0, "MEDIASTINUM"), (-600.0, 1500.0, "LUNG"))


def ct_dataset(
    hu: np.ndarray,
    *,
    slope: float = SLOPE,
    intercept: float = INTERCEPT,
    windows: Sequence[tuple[float, float, str]] = WINDOWS,
    series_uid: str | None = None,
    study_uid: str | None = None,
    position: float = 0.0,
    number: int = 1,
    modality: str = "CT",
) -> Dataset:
    """One CT slice whose stored values give exactly ``hu`` through the rescale."""
    stored = np.rint((hu - intercept) / slope).astype(np.int16)
    assert np.array_equal(stored * slope + intercept, hu), "hu must be on the rescale's grid"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.PatientID = "FAKEID-CT-0001"
    ds.PatientSex = "F"
    ds.PatientAge = "061Y"
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0, 0, position]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if windows:
        ds.WindowCenter = [c for c, _, _ in windows]
        ds.WindowWidth = [w for _, w, _ in windows]
        ds.WindowCenterWidthExplanation = [e for _, _, e in windows]
    ds.PixelData = stored.astype("<i2").tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def known_hu(shape: tuple[int, int] = (48, 40), seed: int = 0) -> np.ndarray:
    """HU on the rescale's half-unit grid over the whole CT range, air to dense bone."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-2048, 6143, size=shape).astype(np.float64) * SLOPE
    hu.flat[:4] = [-1024.0, 0.0, 3071.5, 40.5]
    return hu


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_series(folder: Path, size: int = 32) -> list[np.ndarray]:
    """A CT series of four slices whose file names and instance numbers do not follow their
    positions; returns each slice's HU in position order."""
    series_uid, study_uid = generate_uid(), generate_uid()
    ramp = np.linspace(-1000.0, 1500.0, size * size).reshape(size, size)
    slices = [np.rint((ramp + 100.0 * k) / SLOPE) * SLOPE for k in range(4)]
    for name, k in zip("abcd", (2, 0, 3, 1), strict=True):
        ds = ct_dataset(
            slices[k], series_uid=series_uid, study_uid=study_uid, position=2.5 * k, number=4 - k
        )
        save(ds, folder / f"{name}.dcm")
    return slices


# --------------------------------------------------------------------------------- ingest


def test_a_ct_slice_ingests_with_its_hu_cache_exact_and_its_windows_recorded(
    settings: Settings, tmp_path: Path
) -> None:
    hu = known_hu()
    path = save(ct_dataset(hu), tmp_path / "src" / "ct.dcm")
    summary = ingest(settings, tmp_path / "src", progress=False, workers=1)
    assert summary.ingested == 1
    with session_scope(settings.database_url) as session:
        inst = session.scalars(select(Instance)).one()
        hu_key, key, windows = inst.hu_cache_key, inst.cache_key, inst.windows
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert hu_key == hu_cache_key(sha) and hu_key != key == file_cache_key(sha)
    cached = np.load(cache_path(settings, hu_key))
    assert cached.dtype == np.float16 and cached.shape == hu.shape
    # exact to float16: the nearest float16 of each HU value, within half a float16 step
    assert np.array_equal(cached, hu.astype(np.float16))
    assert np.allclose(cached, hu, rtol=2**-11, atol=0)
    assert np.abs(cached.astype(np.float64) - hu).max() <= 1.0  # 2 HU steps above 2,048
    assert windows == [
        {"center": 40.0, "width": 400.0, "explanation": "MEDIASTINUM"},
        {"center": -600.0, "width": 1500.0, "explanation": "LUNG"},
    ]
    # The display cache is what it always was: the first window, through the display pipeline.
    display = np.load(cache_path(settings, key))
    assert np.array_equal(display, read_image(path, dtype=np.float16).pixels)
    # ...and the file's first window applied to the HU reproduces it.
    assert np.allclose(window_hu(cached, 40.0, 400.0), display, atol=2e-3)


def test_a_dx_image_gets_no_hu_cache(settings: Settings, tmp_path: Path) -> None:
    hu = known_hu(seed=1)
    ds = ct_dataset(hu, modality="DX")
    ds.BurnedInAnnotation = "NO"
    save(ds, tmp_path / "src" / "dx.dcm")
    ingest(settings, tmp_path / "src", progress=False, workers=1)
    with session_scope(settings.database_url) as session:
        inst = session.scalars(select(Instance)).one()
        assert inst.hu_cache_key is None
        assert [w["explanation"] for w in inst.windows or []] == ["MEDIASTINUM", "LUNG"]
        series = session.scalars(select(Series)).one()
        assert series.hu_volume_cache_key is None
    assert len(list((settings.cache_dir / "pixels").rglob("*.npy"))) == 1  # the display only


def test_a_ct_series_gets_an_hu_volume_stacked_like_the_display_volume(
    settings: Settings, tmp_path: Path
) -> None:
    slices = ct_series(tmp_path / "src")
    ingest(settings, tmp_path / "src", progress=False, workers=1)
    with session_scope(settings.database_url) as session:
        series = session.scalars(select(Series)).one()
        volume_key, hu_volume_key = series.volume_cache_key, series.hu_volume_cache_key
    assert volume_key and hu_volume_key and hu_volume_key != volume_key
    hu = np.load(cache_path(settings, hu_volume_key))
    assert hu.dtype == np.float16 and hu.shape == (4, 32, 32)
    assert np.array_equal(hu, np.stack(slices).astype(np.float16))  # slice (position) order
    display = np.load(cache_path(settings, volume_key))
    assert np.allclose(window_hu(hu, 40.0, 400.0), display, atol=2e-3)
    # What training and prediction read is the display volume, as before.
    with session_scope(settings.database_url) as session:
        study_id = session.scalars(select(Study.id)).one()
    [item] = items_for_studies(settings, [study_id])
    assert item.cache_keys == (volume_key,) and item.images == (cache_path(settings, volume_key),)
    # Ingesting again stacks nothing new and keeps the keys.
    ingest(settings, tmp_path / "src", progress=False, workers=1)
    with session_scope(settings.database_url) as session:
        assert session.scalars(select(Series)).one().hu_volume_cache_key == hu_volume_key


def test_the_hu_cache_format_differs_from_the_display_format() -> None:
    assert HU_CACHE_FORMAT != "display-pipeline-1/float16/all-frames"
    assert hu_cache_key("0" * 64) != file_cache_key("0" * 64)
    assert hu_cache_key("0" * 64, "first") != hu_cache_key("0" * 64)


# ------------------------------------------------------------------------- read.py rules


def _stored(ds: Dataset) -> np.ndarray:
    return np.frombuffer(ds.PixelData, dtype="<i2").reshape(ds.Rows, ds.Columns)


@pytest.mark.parametrize("shape", [(8, 8), (512, 512)])  # per pixel, and through a table
def test_hu_values_follow_the_rescale_and_padding_has_none(shape: tuple[int, int]) -> None:
    hu = known_hu(shape)
    ds = ct_dataset(hu)
    assert np.array_equal(hounsfield_values(ds, _stored(ds)), hu.astype(np.float16))
    ds.PixelPaddingValue = int(_stored(ds)[0, 0])
    ds["PixelPaddingValue"].VR = "SS"
    out = hounsfield_values(ds, _stored(ds))
    assert out is not None and np.isnan(out[0, 0]) and not np.isnan(out[0, 1])


@pytest.mark.parametrize(
    "change",
    ["modality_lut", "rescale_type", "no_rescale", "monochrome1", "not_ct"],
)
def test_no_hu_values_without_a_linear_rescale_to_hu(change: str) -> None:
    ds = ct_dataset(known_hu((8, 8)))
    if change == "modality_lut":
        item = Dataset()
        item.LUTDescriptor = [4, 0, 16]
        item.LUTData = [0, 1, 2, 3]
        ds.ModalityLUTSequence = [item]
    elif change == "rescale_type":
        ds.RescaleType = "US"  # unspecified units
    elif change == "no_rescale":
        del ds.RescaleSlope
    elif change == "monochrome1":
        ds.PhotometricInterpretation = "MONOCHROME1"
    else:
        ds.Modality = "MR"
    assert hounsfield_values(ds, _stored(ds)) is None


def _enhanced(per_frame: Sequence[tuple[float, float]] | None, shared: bool) -> Dataset:
    hu = known_hu((8, 8))
    ds = ct_dataset(hu)
    del ds.RescaleSlope, ds.RescaleIntercept

    def transform(slope: float, intercept: float) -> Dataset:
        item, inner = Dataset(), Dataset()
        inner.RescaleSlope, inner.RescaleIntercept, inner.RescaleType = slope, intercept, "HU"
        item.PixelValueTransformationSequence = [inner]
        return item

    if shared:
        ds.SharedFunctionalGroupsSequence = [transform(SLOPE, INTERCEPT)]
    if per_frame is not None:
        ds.PerFrameFunctionalGroupsSequence = [transform(s, i) for s, i in per_frame]
    return ds


def test_hu_values_read_the_rescale_from_functional_groups() -> None:
    expected = known_hu((8, 8)).astype(np.float16)
    shared = _enhanced(None, shared=True)
    assert np.array_equal(hounsfield_values(shared, _stored(shared)), expected)
    same = _enhanced([(SLOPE, INTERCEPT)] * 3, shared=False)
    assert np.array_equal(hounsfield_values(same, _stored(same)), expected)
    differ = _enhanced([(SLOPE, INTERCEPT), (1.0, -1024.0)], shared=False)
    assert hounsfield_values(differ, _stored(differ)) is None  # one rescale would be wrong


def test_every_window_of_the_header_is_read_with_its_explanation(tmp_path: Path) -> None:
    ds = ct_dataset(known_hu((8, 8)))
    ds.WindowCenter = [40, -600, 400]
    ds.WindowWidth = [400, 1500, 0]  # a zero width is no window
    ds.WindowCenterWidthExplanation = ["MEDIASTINUM"]
    facts = read_image(save(ds, tmp_path / "w.dcm")).facts
    assert facts.windows == (FileWindow(40.0, 400.0, "MEDIASTINUM"), FileWindow(-600.0, 1500.0))
    assert (facts.window_center, facts.window_width) == (40.0, 400.0)


# --------------------------------------------------------------------------------- the app


def test_the_preset_box_names_file_windows_then_the_ct_presets() -> None:
    presets = hu_presets([FileWindow(40, 400, "MEDIASTINUM"), FileWindow(-600, 1500)])
    assert list(presets)[:2] == ["MEDIASTINUM", "File window 2"]
    assert list(presets)[2:] == list(CT_PRESETS)
    clash = hu_presets([FileWindow(400, 2000, "Bone"), FileWindow(30, 300, "Bone")])
    assert list(clash)[:2] == ["Bone", "Bone (file window 2)"]
    assert clash["Bone (default)"] == CT_PRESETS["Bone"]


def test_window_hu_is_a_dicom_linear_window_and_padding_is_black() -> None:
    hu = np.array([[-1000.0, 39.5, 40.0, 1000.0, np.nan]], dtype=np.float32)
    out = window_hu(hu, 40.0, 401.0)
    assert out[0, 0] == 0.0 and out[0, 3] == 1.0 and out[0, 4] == 0.0
    assert out[0, 1] == pytest.approx(0.5) and out[0, 2] == pytest.approx(0.5 + 0.5 / 400)


@pytest.fixture
def ct_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """A catalog with one CT series (two file windows) and a stored prediction on its volume;
    the app sees it through the environment. Returns the prediction's id."""
    settings = make_settings(tmp_path / "home")
    ct_series(tmp_path / "src")
    ingest(settings, tmp_path / "src", progress=False, workers=1)
    with session_scope(settings.database_url) as session:
        series = session.scalars(select(Series)).one()
        pred = Prediction(
            study_id=series.study_id,
            model_name="ct-model",
            model_version="v1",
            bundle_hash="ct-model",
            code_version="c",
            transform_hash="t",
            pixel_hashes=[],
            probabilities={"normal": 0.3, "nodule": 0.7},
            raw_probabilities={"normal": 0.3, "nodule": 0.7},
            predicted_label="nodule",
            top_k=[["nodule", 0.7]],
            priority=0.7,
            per_image=[
                {
                    "view": "CT",
                    "cache_key": series.volume_cache_key,
                    "probabilities": {"normal": 0.3, "nodule": 0.7},
                }
            ],
        )
        session.add(pred)
        session.flush()
        pid = pred.id
    monkeypatch.setenv("WORKBENCH_HOME", str(settings.home))
    monkeypatch.setenv("WORKBENCH_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("WORKBENCH_CACHE", str(settings.cache_dir))
    monkeypatch.setenv("WORKBENCH_MODELS", str(settings.models_dir))
    users.add_user(get_settings(), "test", "grey", "clinician", PASSWORD)
    return pid


def test_the_study_page_offers_ct_presets_in_hu_and_bone_differs_from_lung(ct_app: int) -> None:
    detail = data.load_prediction(get_settings(), ct_app)
    assert detail is not None and detail.images[0].hu_cache_key is not None
    at = open_study_page(sign_in("grey"), ct_app)
    box = at.selectbox(key="hu_preset")
    assert box.options[:2] == ["MEDIASTINUM", "LUNG"]
    assert {"Lung", "Mediastinum", "Bone", "Brain", "Abdomen"} <= set(box.options)
    # The image opens on the file's first window, in HU.
    assert box.value == "MEDIASTINUM"
    assert (at.slider(key="hu_center").value, at.slider(key="hu_width").value) == (40.0, 400.0)
    assert {s.label for s in at.slider} >= {"Window level (center, HU)", "Window width (HU)"}

    def shown() -> tuple[str, str]:
        [original, *_] = at.get("image")
        return original.value[0], original.captions[0]  # type: ignore[attr-defined]

    at.selectbox(key="hu_preset").set_value("Bone").run()
    assert not at.exception, at.exception
    assert (at.slider(key="hu_center").value, at.slider(key="hu_width").value) == (400.0, 1800.0)
    bone_url, bone_caption = shown()
    assert "window level 400 HU / width 1800 HU" in bone_caption
    at.selectbox(key="hu_preset").set_value("Lung").run()
    assert not at.exception, at.exception
    lung_url, lung_caption = shown()
    assert "window level -600 HU / width 1500 HU" in lung_caption
    assert lung_url != bone_url  # a different picture, not only a different caption

    # Free adjustment in HU: the box then says "Custom"; slices and zoom still work.
    at.slider(key="hu_width").set_value(600.0).run()
    assert not at.exception, at.exception
    assert at.selectbox(key="hu_preset").value == "Custom"
    at.slider(key=f"slice_{ct_app}").set_value(1).run()
    at.select_slider(key="zoom").set_value(2.0).run()
    assert not at.exception, at.exception
    assert "zoom 2×" in shown()[1]
    # Reset returns to the file's own window.
    next(b for b in at.button if b.label == "Reset").click().run()
    assert at.selectbox(key="hu_preset").value == "MEDIASTINUM"
    assert (at.slider(key="hu_center").value, at.slider(key="hu_width").value) == (40.0, 400.0)


def test_a_study_without_hu_keeps_the_display_scale_presets(ct_app: int) -> None:
    with session_scope(get_settings().database_url) as session:
        for series in session.scalars(select(Series)):
            series.hu_volume_cache_key = None  # as if ingested before HU was cached
    at = open_study_page(sign_in("grey"), ct_app)
    assert not at.exception, at.exception
    assert at.selectbox(key="wl_preset").value == "File default"
    assert not [b for b in at.selectbox if b.key == "hu_preset"]
    assert {s.label for s in at.slider} >= {"Window level (center)", "Window width"}
