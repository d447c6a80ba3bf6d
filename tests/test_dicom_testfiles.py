"""pydicom's bundled test files: each one decodes or is quarantined for the reason it deserves,
and compressed copies decode to the pixels of their uncompressed twin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import DATA_ROOT
from pydicom.pixels import get_decoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
)

from workbench.dicom.read.header import read_header
from workbench.dicom.read.io import UnreadableDicomError
from workbench.dicom.read.pixels import DecodedImage, read_image

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def local_testdata_files() -> list[Path]:
    """The files bundled in pydicom's own ``test_files`` folder: nothing downloaded, no
    external data sources (whose contents this file has no expectations for)."""
    root = Path(DATA_ROOT) / "test_files"
    return sorted(p for p in root.iterdir() if p.is_file())


FILES = {p.name: p for p in local_testdata_files()}


def bundled(name: str) -> Path:
    if name not in FILES:
        pytest.skip(f"{name} is not bundled with pydicom {pydicom.__version__}")
    return FILES[name]


def _can_decode(syntax: pydicom.uid.UID, besides: frozenset[str] = frozenset()) -> bool:
    return bool(set(get_decoder(syntax).available_plugins) - besides)


# Pillow decodes 8-bit JPEG only; 12-bit JPEG Extended and JPEG Lossless need pylibjpeg-libjpeg
# (or GDCM), which this environment may or may not have.
JPEG_12BIT = _can_decode(JPEGExtended12Bit, besides=frozenset({"pillow"}))
JPEG_LOSSLESS = _can_decode(JPEGLosslessSV1)
NO_LIBJPEG = ("unsupported_transfer_syntax", "1.2.840.10008.1.2.4", "pylibjpeg-libjpeg")

#: Every bundled file that does not decode: (reason, start of the detail, text in the detail).
EXPECTED_FAILURES: dict[str, tuple[str, str, str]] = {
    # no preamble: accepted only if it is an image (SOPClassUID, Rows, Columns, PixelData)
    "ExplVR_BigEndNoMeta.dcm": ("not_dicom", "no DICOM preamble", "Rows"),
    "ExplVR_LitEndNoMeta.dcm": ("not_dicom", "no DICOM preamble", "Rows"),
    "rtstruct.dcm": ("not_dicom", "no DICOM preamble", "PixelData"),
    # "the same as CT_small.dcm with no File Meta", but a stray byte before the first element
    # makes the whole file parse as one UN element
    "no_meta.dcm": ("not_dicom", "no DICOM preamble", "SOPClassUID"),
    "README.txt": ("not_dicom", "no DICOM preamble", ""),
    "crayons.icc": ("not_dicom", "no DICOM preamble", ""),
    "rtplan.dump": ("not_dicom", "no DICOM preamble", ""),
    "rtstruct.dump": ("not_dicom", "no DICOM preamble", ""),
    "test1.json": ("not_dicom", "no DICOM preamble", ""),
    "test_PN.json": ("not_dicom", "no DICOM preamble", ""),
    "zipMR.gz": ("not_dicom", "no DICOM preamble", ""),
    # images that lack an attribute the catalogue needs (their pixels decode: see below)
    "GDCMJ2K_TextGBR.dcm": ("missing_attribute", "Modality", ""),
    "SC_jpeg_no_color_transform.dcm": ("missing_attribute", "Modality", ""),
    "SC_jpeg_no_color_transform_2.dcm": ("missing_attribute", "Modality", ""),
    "SC_rgb_jpeg_app14_dcmd.dcm": ("missing_attribute", "Modality", ""),
    "JPEGLSNearLossless_08.dcm": ("missing_attribute", "SeriesInstanceUID", ""),
    "JPEGLSNearLossless_16.dcm": ("missing_attribute", "SeriesInstanceUID", ""),
    "SC_rgb_jls_lossy_line.dcm": ("missing_attribute", "SeriesInstanceUID", ""),
    "SC_rgb_jls_lossy_sample.dcm": ("missing_attribute", "SeriesInstanceUID", ""),
    # Number of Frames '1A': the size of the pixel data is unknown
    "badVR.dcm": ("missing_attribute", "NumberOfFrames", "1A"),
    # fragments of data sets made to test the parser, not composite objects
    "UN_sequence.dcm": ("missing_attribute", "SOPInstanceUID", ""),
    "empty_charset_LEI.dcm": ("missing_attribute", "SOPInstanceUID", ""),
    "meta_missing_tsyntax.dcm": ("missing_attribute", "SOPInstanceUID", ""),
    "nested_priv_SQ.dcm": ("missing_attribute", "SOPInstanceUID", ""),
    "no_meta_group_length.dcm": ("missing_attribute", "SOPInstanceUID", ""),
    "priv_SQ.dcm": ("missing_attribute", "SOPInstanceUID", ""),
    # whole objects that are not images
    "reportsi.dcm": ("no_pixel_data", "not an image", "SR"),
    "reportsi_with_empty_number_tags.dcm": ("no_pixel_data", "not an image", "SR"),
    "test-SR.dcm": ("no_pixel_data", "not an image", "SR"),
    "rtplan.dcm": ("no_pixel_data", "not an image", "RT Plan"),
    "rtplan_truncated.dcm": ("no_pixel_data", "not an image", "RT Plan"),
    "waveform_ecg.dcm": ("no_pixel_data", "not an image", "Waveform"),
    # broken pixel data
    "MR_truncated.dcm": ("truncated_pixel_data", "8130 bytes", "8192 expected"),
    # 4 codestream bytes overwritten with a sequence delimiter: the SIZ segment now declares
    # an image 3722445056 columns wide, refused before a codec allocates for it
    "JPEG2000-embedded-sequence-delimiter.dcm": ("decode_error", "a compressed frame", "1024x"),
}
if not JPEG_12BIT:
    EXPECTED_FAILURES["JPEG-lossy.dcm"] = NO_LIBJPEG
    EXPECTED_FAILURES["JPGExtended.dcm"] = NO_LIBJPEG
elif "gdcm" not in get_decoder(JPEGExtended12Bit).available_plugins:
    # libjpeg rejects this file's scan header ("misplaced marker segment"); only GDCM reads it
    EXPECTED_FAILURES["JPEG-lossy.dcm"] = (
        "unsupported_transfer_syntax",
        "1.2.840.10008.1.2.4",
        "gdcm",
    )
if not JPEG_LOSSLESS:
    EXPECTED_FAILURES["SC_rgb_jpeg_gdcm.dcm"] = NO_LIBJPEG

HEADER_REASONS = frozenset({"not_dicom", "missing_attribute", "no_pixel_data"})


def test_the_bundled_files_are_found_locally_and_the_table_names_real_files() -> None:
    assert len(FILES) > 60
    assert "CT_small.dcm" in FILES and "MR_small_RLE.dcm" in FILES
    assert set(EXPECTED_FAILURES) <= set(FILES), "stale names in EXPECTED_FAILURES"


def _check_decoded(image: DecodedImage) -> None:
    facts = image.facts
    frames = (facts.number_of_frames,) if facts.number_of_frames > 1 else ()
    assert image.pixels.shape == (*frames, facts.rows, facts.columns)
    assert image.pixels.dtype == np.float32
    assert np.isfinite(image.pixels).all()
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0
    assert len(image.pixel_hash) == 64
    if image.color:
        assert image.rgb is not None and image.rgb.shape == (*image.pixels.shape, 3)
        assert image.rgb.dtype == np.uint8 and image.voi_source == "none"
    else:
        assert image.rgb is None and image.voi_source in ("voi_lut", "window", "minmax")


@pytest.mark.parametrize("name", sorted(FILES))
def test_each_bundled_file_decodes_or_is_quarantined_for_the_right_reason(name: str) -> None:
    path = FILES[name]
    if name not in EXPECTED_FAILURES:
        image = read_image(path)
        _check_decoded(image)
        assert read_header(path) == image.facts
        return
    reason, detail_start, detail_has = EXPECTED_FAILURES[name]
    with pytest.raises(UnreadableDicomError) as info:
        read_image(path)
    assert info.value.reason == reason, info.value.detail
    assert info.value.detail.startswith(detail_start), info.value.detail
    assert detail_has in info.value.detail
    if reason in HEADER_REASONS:  # the header alone says so too
        with pytest.raises(UnreadableDicomError) as info:
            read_header(path)
        assert info.value.reason == reason


def _patched(name: str, folder: Path) -> Path:
    """A copy of a bundled image with the catalogue attributes it lacks filled in."""
    ds = pydicom.dcmread(bundled(name))
    ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or pydicom.uid.generate_uid()
    ds.StudyInstanceUID = ds.get("StudyInstanceUID") or pydicom.uid.generate_uid()
    ds.Modality = ds.get("Modality") or "OT"
    out = folder / name
    ds.save_as(out)
    return out


PATCHABLE = [
    name
    for name, (reason, detail, _) in EXPECTED_FAILURES.items()
    if reason == "missing_attribute" and detail in ("Modality", "SeriesInstanceUID")
]


@pytest.mark.parametrize("name", PATCHABLE)
def test_images_quarantined_for_a_catalogue_attribute_decode_once_it_is_there(
    name: str, tmp_path: Path
) -> None:
    _check_decoded(read_image(_patched(name, tmp_path)))


# ---------------------------------------------------------------------------- twins


def _open(name: str, tmp_path: Path, frames: str | int = "volume") -> DecodedImage:
    path = (
        _patched(name, tmp_path)
        if EXPECTED_FAILURES.get(name, ("",))[0] == "missing_attribute"
        else bundled(name)
    )
    return read_image(path, frames=frames)  # type: ignore[arg-type]


LOSSLESS_TWINS = [
    # (reference, copy, frames of the copy)
    ("MR_small.dcm", "MR_small_RLE.dcm", "volume"),
    ("MR_small.dcm", "MR_small_bigendian.dcm", "volume"),
    ("MR_small.dcm", "MR_small_expb.dcm", "volume"),
    ("MR_small.dcm", "MR_small_implicit.dcm", "volume"),
    ("MR_small.dcm", "MR_small_jp2klossless.dcm", "volume"),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "volume"),
    ("MR_small.dcm", "MR_small_padded.dcm", "volume"),
    ("rtdose.dcm", "rtdose_expb.dcm", "volume"),
    ("rtdose.dcm", "rtdose_rle.dcm", "volume"),
    ("rtdose_1frame.dcm", "rtdose_expb_1frame.dcm", "volume"),
    ("rtdose_1frame.dcm", "rtdose_rle_1frame.dcm", "volume"),
    ("rtdose_1frame.dcm", "rtdose.dcm", "first"),
    ("rtdose_1frame.dcm", "rtdose_rle.dcm", 0),
    ("liver_1frame.dcm", "liver_expb_1frame.dcm", "volume"),
    ("SC_rgb_rle.dcm", "SC_rgb_gdcm_KY.dcm", "volume"),  # JPEG 2000, lossless content
    ("SC_rgb_rle.dcm", "SC_rgb_rle_2frame.dcm", "first"),
    ("SC_rgb_rle_16bit.dcm", "SC_rgb_rle_16bit_2frame.dcm", "first"),
    ("SC_rgb_rle_32bit.dcm", "SC_rgb_rle_32bit_2frame.dcm", 0),
    ("SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm", "volume"),
]
if JPEG_LOSSLESS:
    LOSSLESS_TWINS.append(("SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm", "volume"))


@pytest.mark.parametrize(("reference", "copy", "frames"), LOSSLESS_TWINS)
def test_lossless_copies_decode_to_exactly_their_twin(
    reference: str, copy: str, frames: str | int, tmp_path: Path
) -> None:
    a, b = _open(reference, tmp_path), _open(copy, tmp_path, frames)
    assert b.pixel_hash == a.pixel_hash  # the stored values, whatever the syntax and byte order
    assert np.array_equal(b.pixels, a.pixels)
    assert b.color == a.color
    if a.rgb is not None:
        assert b.rgb is not None and np.array_equal(b.rgb, a.rgb)


@pytest.mark.parametrize(
    ("reference", "copy", "frames"),
    [
        ("SC_rgb_rle.dcm", "SC_rgb_rle_16bit.dcm", "volume"),
        ("SC_rgb_rle.dcm", "SC_rgb_rle_32bit.dcm", "volume"),
        ("SC_rgb_rle_2frame.dcm", "SC_rgb_rle_16bit_2frame.dcm", "volume"),
        ("SC_rgb_rle_2frame.dcm", "SC_rgb_rle_32bit_2frame.dcm", 1),
    ],
)
def test_8_16_and_32_bit_copies_of_a_colour_image_display_the_same(
    reference: str, copy: str, frames: str | int, tmp_path: Path
) -> None:
    # 16- and 32-bit copies hold v * 257 and v * 16843009: the same fraction of full scale
    a = _open(reference, tmp_path, 1 if frames == 1 else "volume")
    b = _open(copy, tmp_path, frames)
    assert a.rgb is not None and b.rgb is not None
    assert np.array_equal(b.rgb, a.rgb)
    assert np.allclose(b.pixels, a.pixels, atol=1e-6)
    assert b.pixel_hash != a.pixel_hash


#: Lossy copies agree with their twin within this mean absolute error of the display values
#: (a fraction of full scale), for the RGB a person sees and the luma the model sees. Measured:
#: <= 0.011 for chroma-subsampled JPEG (SC_rgb_dcmtk_+eb+cy+n1 / +np, SC_rgb_jpeg_lossy_gdcm),
#: ~0.003 for JPEG-LS near-lossless, ~0.006 for the 3x3 JPEG.
LOSSY_MEAN_ABS_ERROR = 0.02

LOSSY_TWINS = [
    ("SC_rgb_rle.dcm", "SC_rgb_dcmtk_+eb+cr.dcm"),
    ("SC_rgb_rle.dcm", "SC_rgb_dcmtk_+eb+cy+n1.dcm"),
    ("SC_rgb_rle.dcm", "SC_rgb_dcmtk_+eb+cy+n2.dcm"),
    ("SC_rgb_rle.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm"),
    ("SC_rgb_rle.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm"),
    ("SC_rgb_rle.dcm", "SC_rgb_dcmtk_+eb+cy+s4.dcm"),
    ("SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm"),
    ("SC_rgb_rle.dcm", "SC_rgb_jpeg_lossy_gdcm.dcm"),
    ("SC_rgb_rle.dcm", "SC_ybr_full_422_uncompressed.dcm"),
    ("SC_rgb_rle.dcm", "SC_rgb_jls_lossy_line.dcm"),
    ("SC_rgb_rle.dcm", "SC_rgb_jls_lossy_sample.dcm"),
    ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb_dcmtk_+eb+cy+n2.dcm"),
    ("SC_rgb_small_odd.dcm", "SC_rgb_small_odd_jpeg.dcm"),
    ("SC_rgb_jpeg_dcmd.dcm", "SC_rgb_jpeg.dcm"),
    # the same RGB JPEG; libjpeg and Pillow may decode it with different IDCT rounding
    ("SC_rgb_jpeg_dcmd.dcm", "SC_jpeg_no_color_transform.dcm"),
]


@pytest.mark.parametrize(("reference", "copy"), LOSSY_TWINS)
def test_lossy_copies_decode_close_to_their_twin(reference: str, copy: str, tmp_path: Path) -> None:
    a, b = _open(reference, tmp_path), _open(copy, tmp_path)
    assert b.pixels.shape == a.pixels.shape
    assert float(np.abs(b.pixels - a.pixels).mean()) < LOSSY_MEAN_ABS_ERROR
    assert a.rgb is not None and b.rgb is not None
    rgb_error = np.abs(b.rgb.astype(np.float64) - a.rgb.astype(np.float64)).mean() / 255
    assert rgb_error < LOSSY_MEAN_ABS_ERROR


def test_a_deflated_copy_decodes_to_its_twin(tmp_path: Path) -> None:
    for name, syntax in (
        ("MR_small.dcm", DeflatedExplicitVRLittleEndian),
        ("image_dfl.dcm", ExplicitVRLittleEndian),  # and the bundled deflated file, inflated
    ):
        ds = pydicom.dcmread(bundled(name))
        ds.file_meta.TransferSyntaxUID = syntax
        twin = tmp_path / f"twin-{name}"
        ds.save_as(twin, enforce_file_format=True)
        assert pydicom.dcmread(twin).file_meta.TransferSyntaxUID == syntax
        a, b = read_image(bundled(name)), read_image(twin)
        assert b.pixel_hash == a.pixel_hash and np.array_equal(b.pixels, a.pixels)
