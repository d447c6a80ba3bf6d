"""Reading DICOM: quarantine reasons, pixel hashes and the standard display pipeline."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from workbench.dicom.read import (
    QUARANTINE_REASONS,
    UnreadableDicomError,
    display_pipeline,
    read_header,
    read_image,
)

RNG = np.random.default_rng(0)


def make_ds(
    arr: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    **attrs: object,
) -> Dataset:
    """A minimal single- or multi-frame grayscale image (Explicit VR Little Endian)."""
    signed = arr.dtype.kind == "i"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientID = "FAKEID-000001"
    ds.PatientAge = "045Y"
    ds.PatientSex = "F"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if arr.ndim == 3:
        ds.NumberOfFrames = arr.shape[0]
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = arr.astype("<i2" if signed else "<u2").tobytes()
    ds["PixelData"].VR = "OW"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def stored_12bit(shape: tuple[int, ...] = (32, 40)) -> np.ndarray:
    return RNG.integers(0, 4096, size=shape).astype(np.uint16)


# ---------------------------------------------------------------------------- display pipeline


def test_monochrome1_and_its_monochrome2_twin_display_the_same(tmp_path: Path) -> None:
    v = stored_12bit()
    mono2 = save(make_ds(v, WindowCenter=1500, WindowWidth=2000), tmp_path / "m2.dcm")
    mono1 = save(
        make_ds(4095 - v, photometric="MONOCHROME1", WindowCenter=4095 - 1500, WindowWidth=2000),
        tmp_path / "m1.dcm",
    )
    a, b = read_image(mono2), read_image(mono1)
    assert a.voi_source == b.voi_source == "window"
    assert np.allclose(a.pixels, b.pixels, atol=1e-3)


def test_monochrome1_without_window_inverts_the_minmax_display() -> None:
    v = stored_12bit()
    out2, src2 = display_pipeline(make_ds(v), v)
    out1, src1 = display_pipeline(make_ds(4095 - v, photometric="MONOCHROME1"), 4095 - v)
    assert src1 == src2 == "minmax"
    assert np.allclose(out1, out2, atol=1e-6)
    assert out2.dtype == np.float32 and out2.min() == 0.0 and out2.max() == 1.0


def test_rescale_slope_and_intercept_are_applied_before_the_window(tmp_path: Path) -> None:
    hu = RNG.integers(-500, 1500, size=(24, 24)) * 2  # even, so both stored forms are exact
    plain = make_ds((hu + 1000).astype(np.uint16), RescaleSlope=1, RescaleIntercept=-1000)
    scaled = make_ds(((hu + 3000) // 2).astype(np.uint16), RescaleSlope=2, RescaleIntercept=-3000)
    for ds in (plain, scaled):
        ds.WindowCenter, ds.WindowWidth = 400, 1800
    a = read_image(save(plain, tmp_path / "a.dcm"))
    b = read_image(save(scaled, tmp_path / "b.dcm"))
    assert not np.array_equal(plain.pixel_array, scaled.pixel_array)
    assert np.allclose(a.pixels, b.pixels, atol=1e-6)


def test_a_known_stored_value_maps_through_rescale_and_linear_window() -> None:
    arr = np.array([[1500, 0], [4095, 1400]], dtype=np.uint16)
    ds = make_ds(arr, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=2000, WindowWidth=1001)
    out, source = display_pipeline(ds, arr)
    assert source == "window"
    # stored 1500 -> 2 * 1500 - 1000 = 2000; PS3.3 C.11.2.1.2.1 LINEAR:
    # ((x - (c - 0.5)) / (w - 1) + 0.5) = (2000 - 1999.5) / 1000 + 0.5
    assert out[0, 0] == pytest.approx(0.5005, abs=1e-6)
    assert out[0, 1] == 0.0 and out[1, 0] == 1.0
    # stored 1400 -> 1800: (1800 - 1999.5) / 1000 + 0.5
    assert out[1, 1] == pytest.approx(0.3005, abs=1e-6)


def test_window_values_may_be_multi_valued_and_the_first_is_used(tmp_path: Path) -> None:
    v = stored_12bit()
    multi = read_image(
        save(make_ds(v, WindowCenter=[1000, 3000], WindowWidth=[500, 10]), tmp_path / "m.dcm")
    )
    single = read_image(save(make_ds(v, WindowCenter=1000, WindowWidth=500), tmp_path / "s.dcm"))
    assert np.array_equal(multi.pixels, single.pixels)
    assert (multi.facts.window_center, multi.facts.window_width) == (1000.0, 500.0)


def test_voi_lut_sequence_is_preferred_over_the_window() -> None:
    arr = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    ds = make_ds(arr, WindowCenter=1, WindowWidth=2)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.LUTData = [0, 51, 102, 255]
    ds.VOILUTSequence = [item]
    out, source = display_pipeline(ds, arr)
    assert source == "voi_lut"
    assert np.allclose(out, [[0.0, 0.2, 0.4, 1.0]])


def test_padding_pixels_become_black_and_do_not_stretch_minmax() -> None:
    arr = RNG.integers(-1000, 1000, size=(20, 20)).astype(np.int16)
    arr[:4] = -2000
    ds = make_ds(arr, PixelPaddingValue=-2000)
    out, source = display_pipeline(ds, arr)
    assert source == "minmax"
    assert np.all(out[:4] == 0.0)
    assert out[4:].min() == 0.0 and out[4:].max() == 1.0
    body = arr[4:]
    expected = (body - body.min()) / (body.max() - body.min())
    assert np.allclose(out[4:], expected, atol=1e-6)


def test_padding_stays_black_after_monochrome1_inversion(tmp_path: Path) -> None:
    arr = stored_12bit((16, 16))
    arr[:, :3] = 4095
    ds = make_ds(arr, photometric="MONOCHROME1", PixelPaddingValue=4095)
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    image = read_image(save(ds, tmp_path / "pad.dcm"))
    assert np.all(image.pixels[:, :3] == 0.0)
    assert image.pixels[:, 3:].mean() > 0.2


def test_padding_range_limit_masks_the_whole_range() -> None:
    arr = np.array([[0, 5, 10, 11, 500, 1000]], dtype=np.uint16)
    ds = make_ds(arr, PixelPaddingValue=0, PixelPaddingRangeLimit=10)
    out, _ = display_pipeline(ds, arr)
    assert np.all(out[0, :3] == 0.0)
    assert out[0, -1] == 1.0
    assert out[0, 3] == 0.0  # 11 is the smallest real pixel


def test_signed_stored_values_are_sign_extended_from_bits_stored(tmp_path: Path) -> None:
    arr = np.array([[-2048, -1, 0, 2047]], dtype=np.int16)
    ds = make_ds(arr)
    raw = arr.astype("<i2").view("<u2") & 0x0FFF  # 12-bit two's complement, high bits clear
    ds.PixelData = raw.astype("<u2").tobytes()
    image = read_image(save(ds, tmp_path / "signed.dcm"))
    assert np.allclose(image.pixels, (arr + 2048) / 4095)


def test_multiframe_gives_frames_rows_columns(tmp_path: Path) -> None:
    image = read_image(save(make_ds(stored_12bit((3, 8, 10))), tmp_path / "mf.dcm"))
    assert image.pixels.shape == (3, 8, 10)
    assert image.facts.number_of_frames == 3


# ---------------------------------------------------------------------------- hashes


def test_pixel_hash_is_the_same_for_uncompressed_rle_and_jpeg_ls_copies(tmp_path: Path) -> None:
    v = stored_12bit((30, 26))
    plain = save(make_ds(v, WindowCenter=2048, WindowWidth=4096), tmp_path / "plain.dcm")
    hashes, pixels = [], []
    for syntax in (RLELossless, JPEGLSLossless):
        ds = pydicom.dcmread(plain)
        ds.compress(syntax, generate_instance_uid=False)
        path = save(ds, tmp_path / f"{syntax.name[:3]}.dcm")
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
        image = read_image(path)
        hashes.append(image.pixel_hash)
        pixels.append(image.pixels)
    reference = read_image(plain)
    assert hashes == [reference.pixel_hash] * 2
    assert all(np.array_equal(p, reference.pixels) for p in pixels)


def test_pixel_hash_changes_when_one_pixel_changes(tmp_path: Path) -> None:
    v = stored_12bit((8, 8))
    w = v.copy()
    w[3, 3] ^= 1
    a = read_image(save(make_ds(v), tmp_path / "a.dcm"))
    b = read_image(save(make_ds(w), tmp_path / "b.dcm"))
    assert a.pixel_hash != b.pixel_hash and len(a.pixel_hash) == 64


# ---------------------------------------------------------------------------- quarantine


def test_unreadable_error_carries_reason_and_detail() -> None:
    err = UnreadableDicomError("too_large", "big")
    assert (err.reason, err.detail, str(err)) == ("too_large", "big", "too_large: big")
    with pytest.raises(ValueError):
        UnreadableDicomError("nope", "x")
    assert len(QUARANTINE_REASONS) == 7


def test_a_text_file_is_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("this is a clinical note, not an image\n" * 40)
    for reader in (read_header, read_image):
        with pytest.raises(UnreadableDicomError) as info:
            reader(path)
        assert info.value.reason == "not_dicom"


def test_a_dataset_without_preamble_is_read_only_if_it_is_an_image(tmp_path: Path) -> None:
    ds = make_ds(stored_12bit((8, 8)))
    del ds.file_meta
    raw = tmp_path / "raw.dcm"
    ds.save_as(raw, implicit_vr=True, little_endian=True)  # no preamble, no file meta
    assert raw.read_bytes()[128:132] != b"DICM"
    image = read_image(raw)
    assert image.pixels.shape == (8, 8)
    assert image.facts.transfer_syntax_uid == "1.2.840.10008.1.2"
    del ds.PixelData
    ds.save_as(raw, implicit_vr=True, little_endian=True)
    with pytest.raises(UnreadableDicomError) as info:
        read_header(raw)
    assert info.value.reason == "not_dicom"


def test_missing_rows_is_a_missing_attribute(tmp_path: Path) -> None:
    ds = make_ds(stored_12bit((8, 8)))
    del ds.Rows
    path = save(ds, tmp_path / "norows.dcm")
    for reader in (read_header, read_image):
        with pytest.raises(UnreadableDicomError) as info:
            reader(path)
        assert (info.value.reason, info.value.detail) == ("missing_attribute", "Rows")


def test_no_pixel_data_is_reported(tmp_path: Path) -> None:
    ds = make_ds(stored_12bit((8, 8)))
    del ds.PixelData
    path = save(ds, tmp_path / "nopix.dcm")
    assert read_header(path).rows == 8
    with pytest.raises(UnreadableDicomError) as info:
        read_image(path)
    assert info.value.reason == "no_pixel_data"


def test_truncated_native_pixel_data(tmp_path: Path) -> None:
    path = save(make_ds(stored_12bit((64, 64))), tmp_path / "full.dcm")
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-1000])
    assert read_header(cut).rows == 64
    with pytest.raises(UnreadableDicomError) as info:
        read_image(cut)
    assert info.value.reason == "truncated_pixel_data"


def test_truncated_encapsulated_pixel_data(tmp_path: Path) -> None:
    ds = make_ds(stored_12bit((64, 64)))
    ds.compress(RLELossless, generate_instance_uid=False)
    data = save(ds, tmp_path / "rle.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2 + 200])
    with pytest.raises(UnreadableDicomError) as info:
        read_image(cut)
    assert info.value.reason == "truncated_pixel_data"


def test_file_cut_inside_the_header_gets_a_header_reason(tmp_path: Path) -> None:
    data = save(make_ds(stored_12bit((64, 64))), tmp_path / "full.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:300])
    with pytest.raises(UnreadableDicomError) as info:
        read_image(cut)
    assert info.value.reason in ("not_dicom", "missing_attribute")


def test_huge_declared_size_is_too_large_without_allocating(tmp_path: Path) -> None:
    ds = make_ds(stored_12bit((4, 4)), NumberOfFrames=50)
    ds.Rows, ds.Columns = 65535, 65535  # ~400 GiB declared, 32 bytes present
    path = save(ds, tmp_path / "huge.dcm")
    tracemalloc.start()
    try:
        with pytest.raises(UnreadableDicomError) as info:
            read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.reason == "too_large"
    assert peak < 20 * 2**20


def test_max_pixel_bytes_is_the_limit(tmp_path: Path) -> None:
    path = save(make_ds(stored_12bit((16, 16))), tmp_path / "s.dcm")
    assert read_image(path, max_pixel_bytes=512).pixels.shape == (16, 16)
    with pytest.raises(UnreadableDicomError) as info:
        read_image(path, max_pixel_bytes=511)
    assert info.value.reason == "too_large"


def test_a_transfer_syntax_without_codec_is_unsupported(tmp_path: Path) -> None:
    ds = make_ds(stored_12bit((8, 8)))
    path = save(ds, tmp_path / "plain.dcm")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "mpeg.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(UnreadableDicomError) as info:
        read_image(path)
    assert info.value.reason == "unsupported_transfer_syntax"


# ---------------------------------------------------------------------------- header facts


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")
def test_header_facts_parse_age_sex_and_geometry(tmp_path: Path) -> None:
    ds = make_ds(
        stored_12bit((8, 8)),
        PixelSpacing=[0.5, 0.25],
        ImagePositionPatient=[1, 2, 3],
        ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
        InstanceNumber=7,
        StudyDate="20210304",
        Manufacturer="Acme",
    )
    facts = read_header(save(ds, tmp_path / "h.dcm"))
    assert facts.patient_age_years == 45 and facts.patient_sex == "F"
    assert facts.pixel_spacing == (0.5, 0.25)
    assert facts.image_position_patient == (1.0, 2.0, 3.0)
    assert facts.image_orientation_patient == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert facts.instance_number == 7 and facts.study_date == "20210304"
    assert facts.manufacturer == "Acme" and facts.station_name is None
    assert (facts.rows, facts.columns, facts.number_of_frames) == (8, 8, 1)
    assert facts.transfer_syntax_uid == ExplicitVRLittleEndian
    for age, years in (("006M", 0), ("010W", 0), ("003D", 0), ("099Y", 99), ("junk", None)):
        ds.PatientAge = age
        assert read_header(save(ds, tmp_path / "h.dcm")).patient_age_years == years


# ---------------------------------------------------------------------------- pydicom's files


@pytest.mark.parametrize(
    "name",
    ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"],
)
def test_pydicom_bundled_files_read_fine(name: str) -> None:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    image = read_image(Path(path))
    assert image.pixels.dtype == np.float32
    assert image.pixels.shape == (image.facts.rows, image.facts.columns)
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0
    assert image.pixels.max() > image.pixels.min()


def test_pydicom_lossless_variants_share_the_pixel_hash() -> None:
    names = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"]
    paths = [get_testdata_file(n, download=False) for n in names]
    if any(p is None for p in paths):
        pytest.skip("MR_small variants are not bundled")
    hashes = {read_image(Path(p)).pixel_hash for p in paths if p is not None}
    assert len(hashes) == 1


def test_pydicom_truncated_file_is_truncated_pixel_data() -> None:
    path = get_testdata_file("MR_truncated.dcm", download=False)
    if path is None:
        pytest.skip("MR_truncated.dcm is not bundled")
    with pytest.raises(UnreadableDicomError) as info:
        read_image(Path(path))
    assert info.value.reason == "truncated_pixel_data"
