"""Reading DICOM: quarantine reasons, pixel hashes, codecs, colour, frames, the standard
display pipeline and series geometry."""

from __future__ import annotations

import dataclasses
import pickle
import tracemalloc
import zlib
from pathlib import Path
from typing import cast

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

import workbench.dicom.read.display as display_module
import workbench.dicom.read.pixels as pixels_module
import workbench.dicom.read.tags as tags_module
from workbench.dicom.read.display import color_display, display_pipeline
from workbench.dicom.read.geometry import check_series_geometry
from workbench.dicom.read.header import HeaderFacts, read_header
from workbench.dicom.read.io import QUARANTINE_REASONS, UnreadableDicomError
from workbench.dicom.read.pixels import read_image

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


def test_presentation_lut_shape_inverse_inverts_monochrome2(tmp_path: Path) -> None:
    v = stored_12bit()
    window = {"WindowCenter": 1500, "WindowWidth": 2000}
    plain = read_image(save(make_ds(v, **window), tmp_path / "plain.dcm"))
    identity = read_image(
        save(make_ds(v, PresentationLUTShape="IDENTITY", **window), tmp_path / "id.dcm")
    )
    inverse = read_image(
        save(make_ds(v, PresentationLUTShape="INVERSE", **window), tmp_path / "inv.dcm")
    )
    assert np.array_equal(identity.pixels, plain.pixels)
    assert np.allclose(inverse.pixels, 1.0 - plain.pixels, atol=1e-6)


def test_monochrome1_with_presentation_lut_shape_inverse_is_inverted_once(tmp_path: Path) -> None:
    # what DX requires of MONOCHROME1: INVERSE restates the inversion, it does not undo it
    v = stored_12bit()
    window = {"WindowCenter": 1500, "WindowWidth": 2000}
    m2 = read_image(save(make_ds(v, **window), tmp_path / "m2.dcm"))
    m1 = make_ds(v, photometric="MONOCHROME1", PresentationLUTShape="INVERSE", **window)
    assert np.allclose(read_image(save(m1, tmp_path / "m1.dcm")).pixels, 1.0 - m2.pixels, atol=1e-6)


def test_padding_stays_black_under_presentation_lut_inverse() -> None:
    arr = stored_12bit((8, 8))
    arr[:2] = 0
    ds = make_ds(arr, PixelPaddingValue=0, PresentationLUTShape="INVERSE")
    out, _ = display_pipeline(ds, arr)
    assert np.all(out[:2] == 0.0) and out[2:].max() == 1.0


def make_color(arr: np.ndarray, photometric: str = "RGB", **attrs: object) -> Dataset:
    """An 8-bit, 3-sample image (interleaved), one or more frames."""
    ds = make_ds(np.zeros(arr.shape[:-1], dtype=np.uint16), photometric=photometric, **attrs)
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    ds["PixelData"].VR = "OB"
    return ds


def test_an_rgb_image_keeps_its_colour_for_display_and_gives_bt601_luma(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, size=(6, 7, 3)).astype(np.uint8)
    rgb[0, 0] = (255, 0, 0)
    image = read_image(save(make_color(rgb), tmp_path / "rgb.dcm"))
    assert image.color and image.voi_source == "none"
    assert image.rgb is not None and np.array_equal(image.rgb, rgb)
    luma = (rgb.astype(np.float64) / 255) @ np.array([0.299, 0.587, 0.114])
    assert image.pixels.shape == (6, 7) and image.pixels.dtype == np.float32
    assert np.allclose(image.pixels, luma, atol=1e-6)
    assert image.pixels[0, 0] == pytest.approx(0.299, abs=1e-6)


def test_ybr_full_is_converted_to_rgb(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, size=(2, 8, 8, 3)).astype(np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    image = read_image(save(make_color(ybr, "YBR_FULL"), tmp_path / "ybr.dcm"))
    plain = read_image(save(make_color(rgb), tmp_path / "rgb.dcm"))
    assert image.rgb is not None and image.rgb.shape == (2, 8, 8, 3)
    assert np.abs(image.rgb.astype(int) - rgb).max() <= 2  # 8-bit YCbCr round trip
    assert np.abs(image.pixels - plain.pixels).max() < 2 / 255


def test_palette_colour_goes_through_its_lut(tmp_path: Path) -> None:
    indices = np.array([[0, 1, 2], [3, 255, 1]], dtype=np.uint8)
    ramp = np.arange(256, dtype=np.uint16)
    luts = {"Red": ramp * 257, "Green": 65535 - ramp * 257, "Blue": np.full(256, 32768)}
    ds = make_ds(np.zeros((2, 3), dtype=np.uint16), photometric="PALETTE COLOR")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = indices.tobytes()
    ds["PixelData"].VR = "OB"
    for colour, lut in luts.items():
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype("<u2").tobytes())
        ds[f"{colour}PaletteColorLookupTableData"].VR = "OW"
    image = read_image(save(ds, tmp_path / "palette.dcm"))
    assert image.color and image.rgb is not None
    expected = np.stack([luts[c][indices] for c in ("Red", "Green", "Blue")], axis=-1) / 65535
    assert np.array_equal(image.rgb, np.rint(expected * 255).astype(np.uint8))
    assert np.allclose(image.pixels, expected @ np.array([0.299, 0.587, 0.114]), atol=1e-6)


def test_color_display_is_public_and_pure() -> None:
    rgb = np.full((2, 2, 3), 128, dtype=np.uint8)
    ds = make_color(rgb)
    luma, shown = color_display(ds, rgb)
    assert np.allclose(luma, 128 / 255) and np.array_equal(shown, rgb)
    assert display_pipeline(ds, rgb)[1] == "none"


def test_frames_select_the_volume_the_first_frame_or_one_frame(tmp_path: Path) -> None:
    v = stored_12bit((3, 8, 10))
    window = {"WindowCenter": 2048, "WindowWidth": 4096}  # per pixel, so frames compare
    path = save(make_ds(v, **window), tmp_path / "mf.dcm")
    volume = read_image(path)
    first = read_image(path, frames="first")
    third = read_image(path, frames=2)
    assert volume.pixels.shape == (3, 8, 10) and volume.facts.number_of_frames == 3
    assert first.pixels.shape == third.pixels.shape == (8, 10)
    assert np.array_equal(first.pixels, volume.pixels[0])
    assert np.array_equal(third.pixels, volume.pixels[2])
    # only the frames asked for are hashed: frame 2 hashes as a single-frame file of it
    alone = read_image(save(make_ds(v[2], **window), tmp_path / "one.dcm"))
    assert third.pixel_hash == alone.pixel_hash != volume.pixel_hash
    with pytest.raises(IndexError):
        read_image(path, frames=3)
    for bad in ("middle", True, 1.5):
        with pytest.raises(ValueError):
            read_image(path, frames=bad)  # type: ignore[arg-type]


def test_frames_of_a_compressed_multiframe_image(tmp_path: Path) -> None:
    v = stored_12bit((4, 16, 12))
    ds = make_ds(v, WindowCenter=2048, WindowWidth=4096)
    ds.compress(RLELossless, generate_instance_uid=False)
    path = save(ds, tmp_path / "rle.dcm")
    volume = read_image(path)
    assert volume.pixels.shape == (4, 16, 12)
    assert np.array_equal(read_image(path, frames=3).pixels, volume.pixels[3])


def test_a_single_frame_file_has_one_frame(tmp_path: Path) -> None:
    path = save(make_ds(stored_12bit((8, 8))), tmp_path / "one.dcm")
    assert read_image(path, frames="first").pixels.shape == (8, 8)
    assert read_image(path, frames=0).pixel_hash == read_image(path).pixel_hash
    with pytest.raises(IndexError):
        read_image(path, frames=1)


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
    copy = pickle.loads(pickle.dumps(err))  # crosses a process pool intact
    assert (copy.reason, copy.detail) == ("too_large", "big")
    assert QUARANTINE_REASONS[:7] == (
        "not_dicom",
        "missing_attribute",
        "no_pixel_data",
        "truncated_pixel_data",
        "unsupported_transfer_syntax",
        "too_large",
        "decode_error",
    )
    assert {"inconsistent_series", "burned_in_annotation"} <= set(QUARANTINE_REASONS)


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


def _smooth_12bit(shape: tuple[int, int] = (48, 40)) -> np.ndarray:
    y, x = np.mgrid[: shape[0], : shape[1]]
    image = 2048 + 1200 * np.sin(x / 7.0) * np.cos(y / 9.0) + RNG.normal(0, 20, shape)
    return np.clip(image, 0, 4095).astype(np.uint16)


@pytest.mark.parametrize(
    ("syntax", "options"),
    [(JPEGLSNearLossless, {"jls_error": 3}), (JPEG2000, {"j2k_cr": [15]})],
)
def test_lossy_grayscale_copies_decode_close_to_the_original(
    syntax: pydicom.uid.UID, options: dict[str, object], tmp_path: Path
) -> None:
    v = _smooth_12bit()
    plain = save(make_ds(v, WindowCenter=2048, WindowWidth=4096), tmp_path / "plain.dcm")
    ds = pydicom.dcmread(plain)
    ds.compress(syntax, generate_instance_uid=False, **options)
    lossy = read_image(save(ds, tmp_path / "lossy.dcm"))
    reference = read_image(plain)
    assert lossy.facts.transfer_syntax_uid == syntax
    assert np.abs(lossy.pixels - reference.pixels).mean() < 0.02  # of the display range
    if syntax == JPEGLSNearLossless:  # near-lossless: no stored value moves more than NEAR
        assert np.abs(lossy.pixels - reference.pixels).max() <= 3 / 4095 + 1e-6


def test_htj2k_is_decoded(tmp_path: Path) -> None:
    # No HTJ2K encoder is installed; a JPEG 2000 Part 1 codestream is also valid HTJ2K (Part 15
    # decoders read it), so relabelling a lossless J2K copy drives the HTJ2K decoder path.
    v = stored_12bit((64, 48))
    plain = save(make_ds(v), tmp_path / "plain.dcm")
    ds = pydicom.dcmread(plain)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    image = read_image(save(ds, tmp_path / "htj2k.dcm"))
    assert image.facts.transfer_syntax_uid == HTJ2KLossless
    assert image.pixel_hash == read_image(plain).pixel_hash


def test_a_codec_missing_for_the_syntax_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydicom.pixels import get_decoder

    # pyproject installs pylibjpeg-libjpeg, so the machine without it is made here: pydicom's
    # decoder loses its available plugins and lists pylibjpeg among the missing ones, as it
    # does where the package is not installed.
    decoder = get_decoder(JPEGLosslessSV1)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(
        decoder,
        "_unavailable",
        {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1"), "gdcm": ("gdcm>=3.0.10",)},
    )
    assert not decoder.is_available
    ds = make_ds(stored_12bit((8, 8)))
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xc3" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    with pytest.raises(UnreadableDicomError) as info:
        read_image(save(ds, tmp_path / "jpll.dcm"))
    assert info.value.reason == "unsupported_transfer_syntax"
    assert "pylibjpeg-libjpeg" in info.value.detail and "gdcm" in info.value.detail


def test_a_compressed_frame_larger_than_the_header_is_refused_before_decoding(
    tmp_path: Path,
) -> None:
    v = stored_12bit((32, 32))
    for syntax in (JPEGLSLossless, JPEG2000Lossless):
        ds = make_ds(v)
        ds.compress(syntax, generate_instance_uid=False)
        ds.Rows = 16  # the codestream still says 32 x 32
        with pytest.raises(UnreadableDicomError) as info:
            read_image(save(ds, tmp_path / f"{syntax.name[:8]}.dcm"))
        assert info.value.reason == "decode_error"
        assert "declares 32x32x1" in info.value.detail


def test_a_huge_element_length_does_not_allocate_it(tmp_path: Path) -> None:
    ds = make_ds(stored_12bit((8, 8)))
    ds.add_new(0x00091010, "UT", "marker-text")
    data = bytearray(save(ds, tmp_path / "ok.dcm").read_bytes())
    at = data.find(b"marker-text")
    data[at - 4 : at] = (0xFFFFFFF0).to_bytes(4, "little")  # a 4 GiB value in a 1 KiB file
    path = tmp_path / "long.dcm"
    path.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        for reader in (read_header, read_image):
            with pytest.raises(UnreadableDicomError) as info:
                reader(path)
            assert info.value.reason == "missing_attribute"  # it swallowed what follows
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


def test_a_deflate_bomb_is_too_large_before_it_is_inflated(tmp_path: Path) -> None:
    ds = make_ds(stored_12bit((4, 4)))
    del ds.PixelData
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    body.write(b"\xe0\x7f\x10\x00OB\x00\x00" + (80 * 2**20).to_bytes(4, "little"))
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = [deflater.compress(body.getvalue())]
    zeros = bytes(2**20)
    stream += [deflater.compress(zeros) for _ in range(80)]  # 80 MiB of pixel data, inflated
    stream.append(deflater.flush())
    head = DicomBytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    write_file_meta_info(head, ds.file_meta)
    path = tmp_path / "bomb.dcm"
    path.write_bytes(head.getvalue() + b"".join(stream))
    assert path.stat().st_size < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(UnreadableDicomError) as info:
            read_image(path, max_pixel_bytes=2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.reason == "too_large" and "inflates" in info.value.detail
    assert peak < 20 * 2**20


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_dataset_without_preamble_needs_valid_rows_columns_and_sop_class(tmp_path: Path) -> None:
    for change in ({"Rows": 0}, {"SOPClassUID": "not a uid"}):
        ds = make_ds(stored_12bit((8, 8)))
        del ds.file_meta
        for key, value in change.items():
            setattr(ds, key, value)
        raw = tmp_path / "raw.dcm"
        ds.save_as(raw, implicit_vr=True, little_endian=True)
        with pytest.raises(UnreadableDicomError) as info:
            read_image(raw)
        assert info.value.reason == "not_dicom"


def test_a_non_integer_number_of_frames_is_a_missing_attribute(tmp_path: Path) -> None:
    data = save(make_ds(stored_12bit((8, 8)), NumberOfFrames=1), tmp_path / "ok.dcm").read_bytes()
    frames = b"\x28\x00\x08\x00IS\x02\x001 "  # (0028,0008) IS "1 "
    assert data.count(frames) == 1
    path = tmp_path / "frames.dcm"
    path.write_bytes(data.replace(frames, frames[:-2] + b"1A"))  # like pydicom's badVR.dcm
    for reader in (read_header, read_image):
        with pytest.raises(UnreadableDicomError) as info:
            reader(path)
        assert info.value.reason == "missing_attribute"
        assert info.value.detail == "NumberOfFrames (not an integer: '1A')"


def test_a_structured_report_has_no_pixel_data(tmp_path: Path) -> None:
    ds = make_ds(stored_12bit((8, 8)))
    for keyword in ("Rows", "Columns", "PixelData", "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(ds, keyword)
    for keyword in ("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.ValueType = "CONTAINER"  # (0040,A040), after where an image's pixel description sits
    path = save(ds, tmp_path / "sr.dcm")
    for reader in (read_header, read_image):
        with pytest.raises(UnreadableDicomError) as info:
            reader(path)
        assert info.value.reason == "no_pixel_data"
        assert "Basic Text SR" in info.value.detail


def test_read_image_never_lets_a_surprise_escape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save(make_ds(stored_12bit((8, 8))), tmp_path / "ok.dcm")

    class Panic(BaseException):  # what a Rust codec's panic looks like from Python
        pass

    def explode(*args: object, **kwargs: object) -> None:
        raise Panic("index out of bounds")

    monkeypatch.setattr(pixels_module, "pixel_array", explode)
    with pytest.raises(UnreadableDicomError) as info:
        read_image(path)
    assert info.value.reason == "decode_error" and "Panic" in info.value.detail


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


def test_header_facts_carry_burned_in_annotation_samples_and_series_geometry(
    tmp_path: Path,
) -> None:
    ds = make_ds(
        stored_12bit((8, 8)),
        BurnedInAnnotation="YES",
        SliceThickness="2.5",
        SeriesNumber=4,
        FrameOfReferenceUID="1.2.3.4",
    )
    facts = read_header(save(ds, tmp_path / "h.dcm"))
    assert facts.burned_in_annotation == "YES"
    assert facts.samples_per_pixel == 1
    assert facts.slice_thickness == 2.5
    assert facts.series_number == 4
    assert facts.frame_of_reference_uid == "1.2.3.4"
    bare = read_header(save(make_ds(stored_12bit((8, 8))), tmp_path / "bare.dcm"))
    assert (bare.burned_in_annotation, bare.slice_thickness, bare.series_number) == (None,) * 3
    assert bare.frame_of_reference_uid is None
    rgb = read_header(save(make_color(np.zeros((4, 4, 3), np.uint8)), tmp_path / "rgb.dcm"))
    assert rgb.samples_per_pixel == 3


# ---------------------------------------------------------------------------- series geometry

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def slice_at(z: float, orientation: tuple[float, ...] = AXIAL, **changes: object) -> HeaderFacts:
    """One slice of a series whose normal is ``orientation``'s, ``z`` mm along it."""
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, column)
    position = tuple(float(v) for v in (-100 * row - 120 * column + z * normal))
    facts = HeaderFacts(
        sop_instance_uid=generate_uid(),
        series_instance_uid="1.2.3",
        study_instance_uid="1.2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        patient_id="P",
        patient_sex=None,
        patient_age_years=None,
        study_date=None,
        modality="CT",
        manufacturer=None,
        institution_name=None,
        station_name=None,
        view_position=None,
        body_part_examined=None,
        rows=64,
        columns=64,
        number_of_frames=1,
        photometric_interpretation="MONOCHROME2",
        bits_stored=12,
        pixel_representation=0,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        pixel_spacing=(0.7, 0.7),
        window_center=None,
        window_width=None,
        image_position_patient=cast("tuple[float, float, float]", position),
        image_orientation_patient=orientation,
        instance_number=None,
    )
    return dataclasses.replace(facts, **changes)  # type: ignore[arg-type]


def series(zs: list[float], orientation: tuple[float, ...] = AXIAL) -> list[HeaderFacts]:
    slices = [slice_at(z, orientation) for z in zs]
    return [slices[i] for i in RNG.permutation(len(slices))]  # order on disk is arbitrary


def test_a_regular_series_has_no_geometry_problem() -> None:
    assert check_series_geometry(series([2.5 * k for k in range(12)])) == []
    assert check_series_geometry(series([-40.0 + 1.25 * k for k in range(5)])) == []
    # jitter below 0.01 mm (and below 1% of the step) is not a problem
    assert check_series_geometry(series([2.5 * k + 0.004 * (-1) ** k for k in range(8)])) == []
    assert check_series_geometry(series([0.0])) == [] and check_series_geometry([]) == []


def test_a_gantry_tilted_series_is_sorted_along_its_own_normal() -> None:
    tilt = np.deg2rad(15)
    tilted = (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(np.sin(tilt)))
    assert check_series_geometry(series([3.0 * k for k in range(10)], tilted)) == []


def test_a_missing_slice_is_reported() -> None:
    problems = check_series_geometry(series([2.5 * k for k in range(12) if k != 5]))
    assert len(problems) == 1
    assert (
        problems[0].startswith("missing positions")
        and "1 between 10.00 mm and 15.00 mm" in (problems[0])
    )
    two_gone = check_series_geometry(series([2.5 * k for k in range(12) if k not in (5, 6)]))
    assert "2 between" in two_gone[0]


def test_a_duplicated_slice_is_reported() -> None:
    slices = series([2.5 * k for k in range(10)])
    problems = check_series_geometry([*slices, slice_at(7.5)])
    assert problems == ["duplicated positions: 1 extra slice(s) at 7.50 mm"]


def test_mixed_orientations_are_reported() -> None:
    tilt = np.deg2rad(10)
    tilted = (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(np.sin(tilt)))
    slices = [slice_at(2.5 * k, AXIAL if k < 6 else tilted) for k in range(10)]
    problems = check_series_geometry(slices)
    assert any(p.startswith("differing orientation: 4 of 10 slices") for p in problems)


def test_non_uniform_spacing_and_differing_sizes_are_reported() -> None:
    zs = [0.0, 2.5, 5.0, 7.5, 11.0, 13.5, 16.0]
    assert any(p.startswith("non-uniform spacing") for p in check_series_geometry(series(zs)))
    slices = series([2.5 * k for k in range(6)])
    slices[2] = dataclasses.replace(slices[2], rows=32)
    assert check_series_geometry(slices)[0].startswith("differing rows/columns: 64x64 (5")
    slices[3] = dataclasses.replace(slices[3], image_position_patient=None)
    assert "1 of 6 slices have no position" in check_series_geometry(slices)


# ---------------------------------------------------------------------------- pydicom's files


@pytest.mark.parametrize(
    "name",
    ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"],
)
def test_pydicom_bundled_files_read_fine(name: str) -> None:
    path = pydicom.data.get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    image = read_image(Path(path))
    assert image.pixels.dtype == np.float32
    assert image.pixels.shape == (image.facts.rows, image.facts.columns)
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0
    assert image.pixels.max() > image.pixels.min()


def test_pydicom_lossless_variants_share_the_pixel_hash() -> None:
    names = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"]
    paths = [pydicom.data.get_testdata_file(n, download=False) for n in names]
    if any(p is None for p in paths):
        pytest.skip("MR_small variants are not bundled")
    hashes = {read_image(Path(p)).pixel_hash for p in paths if p is not None}
    assert len(hashes) == 1


def test_pydicom_truncated_file_is_truncated_pixel_data() -> None:
    path = pydicom.data.get_testdata_file("MR_truncated.dcm", download=False)
    if path is None:
        pytest.skip("MR_truncated.dcm is not bundled")
    with pytest.raises(UnreadableDicomError) as info:
        read_image(Path(path))
    assert info.value.reason == "truncated_pixel_data"


@pytest.mark.parametrize(
    "attrs",
    [
        {"WindowCenter": 2048, "WindowWidth": 4096},
        {"WindowCenter": 900, "WindowWidth": 700, "RescaleSlope": 2, "RescaleIntercept": -1024},
        {"WindowCenter": 40, "WindowWidth": 400, "RescaleSlope": 1, "RescaleIntercept": -1024},
        {"WindowCenter": 1500, "WindowWidth": 1, "VOILUTFunction": "LINEAR"},
        {"WindowCenter": 1000.5, "WindowWidth": 333.3, "VOILUTFunction": "LINEAR_EXACT"},
        {
            "WindowCenter": [300, 40],
            "WindowWidth": [1500, 400],
            "RescaleSlope": 0.5,
            "RescaleIntercept": -200,
            "PixelPaddingValue": 0,
        },
    ],
)
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_the_fast_linear_window_gives_pydicoms_values(
    attrs: dict[str, object], photometric: str
) -> None:
    arr = RNG.integers(0, 4096, (40, 50)).astype(np.uint16)
    arr[:2] = 0
    ds = make_ds(arr, photometric=photometric, **attrs)
    view = display_module.pipeline_dataset(ds)
    assert display_module.linear_window_fast(view, arr) is not None  # the fast path is taken
    fast, fast_source = display_pipeline(ds, arr)
    general, general_source = display_pipeline(ds, arr, fast=False)
    assert fast_source == general_source == "window"
    assert fast.dtype == np.float32 and fast.shape == arr.shape
    np.testing.assert_allclose(fast, general, atol=2e-6)


def test_signed_data_takes_the_same_values_on_the_fast_path() -> None:
    arr = RNG.integers(-1024, 2047, (30, 30)).astype(np.int16)
    ds = make_ds(arr, WindowCenter=40, WindowWidth=400, RescaleSlope=1, RescaleIntercept=0)
    np.testing.assert_allclose(
        display_pipeline(ds, arr)[0], display_pipeline(ds, arr, fast=False)[0], atol=2e-6
    )


@pytest.mark.parametrize(
    ("dtype", "low", "high", "attrs"),
    [
        (np.uint16, 0, 4096, {"WindowCenter": 900, "WindowWidth": 700, "RescaleSlope": 2}),
        (np.uint16, 0, 4096, {"WindowCenter": 300, "WindowWidth": 1500, "PixelPaddingValue": 0}),
        (np.int16, -2048, 2048, {"WindowCenter": 40, "WindowWidth": 400}),
        (
            np.int16,
            -2048,
            2048,
            {"WindowCenter": 40, "WindowWidth": 400, "PixelPaddingValue": 63488},  # -2048 as US
        ),
        (np.uint8, 0, 256, {"WindowCenter": 127.5, "WindowWidth": 200}),
    ],
)
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("dtype_out", [np.float32, np.float16])
def test_the_lookup_table_path_gives_exactly_the_per_pixel_values(
    dtype: type[np.integer],
    low: int,
    high: int,
    attrs: dict[str, object],
    photometric: str,
    dtype_out: type[np.floating],
) -> None:
    # 512 x 512: large enough that the pipeline runs once per possible value (a table) and the
    # image indexes the table; the result must equal running it on every pixel, bit for bit.
    arr = RNG.integers(low, high, (512, 512)).astype(dtype)
    arr[:3] = low
    ds = make_ds(arr, photometric=photometric, bits_stored=8 * arr.itemsize, **attrs)
    if arr.itemsize == 1:
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
    assert display_module.lut_domain(arr) is not None  # the table is used
    view = display_module.pipeline_dataset(ds, private=False)
    direct = display_module.linear_window_fast(view, arr)
    assert direct is not None
    mask = display_module.padding_mask(ds, arr)
    expected = display_module.finish_display(ds, photometric, direct, mask).astype(dtype_out)
    table, source = display_pipeline(ds, arr, dtype=dtype_out)
    assert source == "window" and table.dtype == dtype_out and table.shape == arr.shape
    np.testing.assert_array_equal(table, expected)
    if "PixelPaddingValue" in attrs:
        assert (table[:3] == 0).all()
    general, _ = display_pipeline(ds, arr, fast=False)
    np.testing.assert_allclose(
        table.astype(np.float32), general, atol=1e-3 if dtype_out is np.float16 else 2e-6
    )


def _raw_dataset(ds: Dataset, implicit: bool = False) -> Dataset:
    """``ds`` written and read back: its elements raw (unconverted), as after dcmread."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    fp = DicomBytesIO()
    ds.save_as(fp, implicit_vr=implicit, little_endian=True)
    return pydicom.dcmread(DicomBytesIO(fp.getvalue()), force=True)


def test_the_header_value_cache_keeps_character_sets_and_ambiguous_vrs_apart() -> None:
    # Header values are converted once per distinct raw value and shared between files: the
    # same bytes must still read differently under another character set, and an element
    # whose VR depends on PixelRepresentation (US or SS) must follow each file's own.
    names = []
    for charset in ("ISO_IR 100", "ISO_IR 144"):  # Latin-1, Cyrillic: same byte, two letters
        ds = Dataset()
        ds.SpecificCharacterSet = charset
        ds.add_new(0x00100010, "PN", b"\xe4")
        names.append(str(tags_module.value_of(_raw_dataset(ds), "PatientName")))
    assert names == ["ä", "ф"]

    paddings = []
    for representation in (0, 1):
        ds = Dataset()
        ds.PixelRepresentation = representation
        ds.add_new(0x00280120, "US", 0xFFFF)  # the same two bytes in both files
        paddings.append(tags_module.value_of(_raw_dataset(ds, implicit=True), "PixelPaddingValue"))
    assert paddings == [0xFFFF, -1]
