"""De-identification: PS3.15 Basic Application Level Confidentiality Profile, keyed identities."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from workbench.dicom.deid import (
    DUMMY_DATE,
    BurnedInAnnotationError,
    DeidConfig,
    date_shift_days,
    deidentify,
    deidentify_file,
    export_deidentified,
    patient_pseudonym,
    remap_uid,
)
from workbench.dicom.deid_profile import (
    BASIC_PROFILE,
    RETAIN_DATES_EXCLUDED,
    RETAIN_DEVICE_IDENTITY,
)
from workbench.dicom.synth import synthesize_cohort

KEY = b"test-deid-key"
CONFIG = DeidConfig(key=KEY)

# Rows the hand-built fixture leaves out of the data set: the command group (0000) is never
# stored in a file, and the file meta group (0002: Media Storage SOP Instance UID) lives in
# ``file_meta``, where the fixture sets it to the original SOP Instance UID.
SKIPPED_GROUPS = {0x0000, 0x0002}
# Sequences whose items are kept (their UIDs replaced): they hold references, not codes.
REFERENCE_SEQUENCES = {"ReferencedImageSequence", "SourceImageSequence"}
# Sequences that get items of their own below (instead of a code item).
OWN_ITEMS = {"OtherPatientIDsSequence", "RequestAttributesSequence", "ReferencedStudySequence"}


# --------------------------------------------------------------------------------------------
# A dataset with PHI in every attribute of the profile
# --------------------------------------------------------------------------------------------


class Phi:
    """The fixture and every distinctive value it planted (to look for in the output)."""

    def __init__(self) -> None:
        self.strings: list[str] = []  # text, dates, times, UIDs, numbers as text
        self.blobs: list[bytes] = []  # binary values
        self.binary_numbers: dict[int, Any] = {}  # tag -> value of US / FL... rows
        self.uids: dict[str, str] = {}  # keyword -> original UID
        self.times: list[str] = []  # TM values (kept by the Modified Dates option)
        self._days = 0

    def day(self) -> dt.date:
        """A new date, 367 days after the last: no date shift (1..365 days) maps one onto
        another, so a shifted date never equals an original one."""
        self._days += 367
        return dt.date(1800, 1, 1) + dt.timedelta(days=self._days)

    def text(self, value: str) -> str:
        self.strings.append(value)
        return value

    def blob(self, value: bytes) -> bytes:
        self.blobs.append(value)
        return value


def _phi_value(phi: Phi, i: int, keyword: str, vr: str) -> Any:
    """A valid, distinctive value of ``vr`` for row ``i``."""
    if vr in ("LO", "LT", "ST", "UC", "UT"):
        return phi.text(f"PHI{i:03d}-{keyword}"[:64])
    if vr == "SH":
        return phi.text(f"PHI{i:03d}-SH")
    if vr == "PN":
        return phi.text(f"PHI{i:03d}^Person")
    if vr == "AE":
        return phi.text(f"PHI{i:03d}AE")
    if vr == "CS":
        return phi.text(f"PHI{i:03d}CS")
    if vr == "AS":
        return phi.text(f"{i % 1000:03d}W")
    if vr == "DA":
        return phi.text(phi.day().strftime("%Y%m%d"))
    if vr == "DT":
        return phi.text(phi.day().strftime("%Y%m%d") + f"1011{i % 60:02d}.{900000 + i}")
    if vr == "TM":
        value = phi.text(f"1213{i % 60:02d}.{800000 + i}")
        if keyword not in RETAIN_DATES_EXCLUDED:  # Patient Birth Time stays removed
            phi.times.append(value)
        return value
    if vr == "DS":
        return phi.text(f"-{i}.5{i}")
    if vr == "IS":
        return phi.text(f"-{i}7")
    if vr == "UI":
        uid = phi.text(f"1.2.999.{i}.{7 * i + 1}")
        phi.uids[keyword] = uid
        return uid
    if vr == "UR":
        return phi.text(f"http://phi{i:03d}.example/record")
    if vr in ("OB", "OW", "UN"):
        return phi.blob(f"PHI{i:03d}BLOB".encode())
    if vr in ("US", "SS", "UL", "SL"):
        return 40000 + i if vr in ("US", "UL") else -(1000 + i)
    if vr in ("FL", "FD"):
        return 1234.5 + i
    raise AssertionError(f"no fixture value for VR {vr} ({keyword})")


def _code_item(phi: Phi, i: int) -> Dataset:
    item = Dataset()
    item.CodeValue = phi.text(f"PHI{i:03d}CV")
    item.CodingSchemeDesignator = "99PHI"
    item.CodeMeaning = phi.text(f"PHI{i:03d} code meaning")
    return item


def _private_block(ds: Dataset, group: int, value: str) -> None:
    block = ds.private_block(group, "PHI CREATOR ACME HOSPITAL", create=True)
    block.add_new(0x01, "LO", value)
    block.add_new(0x02, "UN", b"PHI-PRIVATE-BYTES!")


def build_phi_dataset() -> tuple[Dataset, Phi]:
    """Every Table E.1-1 row (actions are never K there) holds a distinctive PHI value."""
    phi = Phi()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    for i, (tag, keyword, vr, _action) in enumerate(BASIC_PROFILE):
        if tag >> 16 in SKIPPED_GROUPS:
            continue
        if vr == "SQ":
            if keyword in REFERENCE_SEQUENCES | OWN_ITEMS:
                continue  # filled below
            ds.add_new(tag, vr, Sequence([_code_item(phi, i)]))
            continue
        value = _phi_value(phi, i, keyword, vr)
        if vr in ("US", "SS", "UL", "SL", "FL", "FD"):
            phi.binary_numbers[tag] = value
        ds.add_new(tag, vr, value)
    # The repeating-group rows: an overlay (with comments) and curve data.
    ds.add_new(0x60003000, "OW", phi.blob(b"PHIOVERLAYBITS"))
    ds.add_new(0x60004000, "LT", phi.text("PHI overlay comment"))
    ds.add_new(0x50003000, "OB", phi.blob(b"PHICURVEDATA"))

    # Sequences with PHI of their own, nested.
    other = Dataset()
    other.PatientID = phi.text("PHI-OTHER-PATIENT-ID")
    other.IssuerOfPatientID = phi.text("PHI-OTHER-ISSUER")
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    request = Dataset()
    request.RequestedProcedureID = phi.text("PHI-REQ-PROC-ID")
    request.ScheduledProcedureStepID = phi.text("PHI-SPS-ID")
    request.ScheduledProtocolCodeSequence = Sequence([_code_item(phi, 901)])
    ds.RequestAttributesSequence = Sequence([request])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study_ref.ReferencedSOPInstanceUID = phi.text("1.2.999.77.1")
    ds.ReferencedStudySequence = Sequence([study_ref])
    for n, keyword in enumerate(sorted(REFERENCE_SEQUENCES)):
        ref = Dataset()
        ref.ReferencedSOPClassUID = DigitalXRayImageStorageForPresentation
        ref.ReferencedSOPInstanceUID = phi.text(f"1.2.999.88.{n + 1}")
        ds[keyword] = pydicom.DataElement(keyword, "SQ", Sequence([ref]))
    # A sequence outside the table (kept) with table attributes two levels down.
    instance = Dataset()
    instance.ReferencedSOPClassUID = DigitalXRayImageStorageForPresentation
    instance.ReferencedSOPInstanceUID = phi.uids["SOPInstanceUID"]
    instance.InstitutionName = phi.text("PHI-NESTED-INSTITUTION")
    instance.ContentDate = phi.text(phi.day().strftime("%Y%m%d"))
    _private_block(instance, 0x0019, phi.text("PHI-PRIVATE-NESTED"))
    series = Dataset()
    series.SeriesInstanceUID = phi.uids["SeriesInstanceUID"]
    series.ReferencedInstanceSequence = Sequence([instance])
    ds.ReferencedSeriesSequence = Sequence([series])
    region = Dataset()
    region.CodeValue = "T-D3000"
    region.CodingSchemeDesignator = "SRT"
    region.CodeMeaning = "Chest"
    ds.AnatomicRegionSequence = Sequence([region])
    _private_block(ds, 0x0009, phi.text("PHI-PRIVATE-TOP"))

    # The image itself (none of these attributes is in the table).
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.Modality = "DX"
    ds.BurnedInAnnotation = "NO"
    pixels = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 13) % 4096
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = phi.text("PHI-SOURCE-AE")
    ds.file_meta = meta
    return ds, phi


def _walk(ds: Dataset) -> Iterator[pydicom.DataElement]:
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synthesize_cohort(out, n_studies=4, seed=1, modality="DX", image_size=64)
    return out


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


def _digests(paths: list[Path]) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


# --------------------------------------------------------------------------------------------
# The profile
# --------------------------------------------------------------------------------------------


def test_the_table_covers_every_row_of_table_e1_1() -> None:
    tags = [row[0] for row in BASIC_PROFILE]
    assert len(tags) > 600 and tags == sorted(tags) and len(set(tags)) == len(tags)
    assert {row[3] for row in BASIC_PROFILE} <= {
        "D", "Z", "X", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"
    }  # fmt: skip
    by_keyword = {row[1]: row[3] for row in BASIC_PROFILE}
    assert by_keyword["PatientName"] == "Z" and by_keyword["StudyInstanceUID"] == "U"
    assert by_keyword["ReferencedImageSequence"] == "X/Z/U*"
    assert set(by_keyword) >= RETAIN_DEVICE_IDENTITY


@pytest.mark.parametrize("keep_dates", [False, True])
def test_no_phi_from_any_profile_attribute_survives_in_the_written_file(
    tmp_path: Path, keep_dates: bool
) -> None:
    ds, phi = build_phi_dataset()
    src = tmp_path / "phi.dcm"
    ds.save_as(src, enforce_file_format=True)
    raw = src.read_bytes()
    planted = [s for s in phi.strings if s.encode() in raw] + [b for b in phi.blobs if b in raw]
    assert len(planted) == len(phi.strings) + len(phi.blobs)  # the fixture really holds them

    dst = tmp_path / "out.dcm"
    deidentify_file(src, dst, DeidConfig(key=KEY, keep_dates=keep_dates))
    data = dst.read_bytes()
    leaked = [s for s in phi.strings if s.encode() in data] + [b for b in phi.blobs if b in data]
    # The Modified Dates option shifts dates by whole days and so keeps times as they were.
    assert leaked == (phi.times if keep_dates else [])
    assert b"PHI" not in data and b"ACME" not in data

    out = pydicom.dcmread(dst)
    elems = list(_walk(out))
    assert not [e.tag for e in elems if e.tag.is_private]
    for tag, value in phi.binary_numbers.items():
        assert tag not in out or out[tag].value != value
    assert out.PatientIdentityRemoved == "YES"
    codes = [
        (c.CodeValue, c.CodingSchemeDesignator) for c in out.DeidentificationMethodCodeSequence
    ]
    assert codes == [("113100", "DCM")] + ([("113107", "DCM")] if keep_dates else [])
    assert out.DeidentificationMethod
    assert out.PatientID == patient_pseudonym(str(ds.PatientID), KEY)
    assert out.PatientName == out.PatientID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert np.array_equal(out.pixel_array, ds.pixel_array)
    # Kept: what the table does not list (non-identifying codes, image description).
    assert out.AnatomicRegionSequence[0].CodeValue == "T-D3000"
    assert out.Modality == "DX" and out.SOPClassUID == ds.SOPClassUID


def test_nested_sequences_are_deidentified_with_the_profile(tmp_path: Path) -> None:
    ds, phi = build_phi_dataset()
    out = deidentify(ds, CONFIG)
    assert "OtherPatientIDsSequence" not in out  # X
    assert "RequestAttributesSequence" not in out  # X
    assert len(out.ReferencedStudySequence) == 0  # X/Z -> Z
    series = out.ReferencedSeriesSequence[0]  # not in the table: kept, cleaned inside
    assert series.SeriesInstanceUID == out.SeriesInstanceUID
    instance = series.ReferencedInstanceSequence[0]
    assert instance.ReferencedSOPInstanceUID == out.SOPInstanceUID
    assert instance.InstitutionName == "DEIDENTIFIED"  # X/Z/D -> D
    assert instance.ContentDate == DUMMY_DATE
    assert not [e for e in _walk(instance) if e.tag.is_private]
    person = out.PersonIdentificationCodeSequence[0]  # D on a sequence: dummy leaves
    assert person.CodeValue == "DEIDENTIFIED" and person.CodeMeaning == "DEIDENTIFIED"
    for keyword in REFERENCE_SEQUENCES:  # X/Z/U*: kept, instance UIDs replaced
        ref = out[keyword].value[0]
        assert ref.ReferencedSOPInstanceUID.startswith("2.25.")
        assert ref.ReferencedSOPClassUID == DigitalXRayImageStorageForPresentation


def test_deidentify_returns_a_new_dataset_and_leaves_the_input_alone() -> None:
    ds, _ = build_phi_dataset()
    before = ds.to_json_dict()
    out = deidentify(ds, CONFIG)
    assert out is not ds
    assert ds.to_json_dict() == before


def test_the_pseudonym_is_the_catalogs() -> None:
    from workbench.dicom.deid import keyed_hash

    for pid in ("FAKEID-000001", "", "ÄÖ 123"):
        assert patient_pseudonym(pid, KEY) == "P" + keyed_hash(KEY, "patient:" + pid, 15)


def test_device_identity_is_kept_only_with_its_option() -> None:
    ds, _ = build_phi_dataset()
    station = ds.StationName
    assert deidentify(ds, CONFIG).StationName == "DEIDENTIFIED"
    out = deidentify(ds, DeidConfig(key=KEY, keep_device_identity=True))
    assert out.StationName == station and out.DeviceSerialNumber == ds.DeviceSerialNumber
    assert "113109" in [c.CodeValue for c in out.DeidentificationMethodCodeSequence]


# --------------------------------------------------------------------------------------------
# UIDs
# --------------------------------------------------------------------------------------------


def test_remapped_uids_are_valid_keyed_and_stable() -> None:
    uid = "1.2.826.0.1.3680043.8.498.123"
    new = remap_uid(uid, KEY)
    assert UID(new).is_valid and new.startswith("2.25.") and len(new) <= 64
    assert remap_uid(uid, KEY) == new
    assert remap_uid(uid, b"another-key") != new
    assert remap_uid(uid + "4", KEY) != new


def test_uids_are_remapped_consistently_across_files_and_references(cohort: Path) -> None:
    files = _dicom_files(cohort)
    a = pydicom.dcmread(files[0])
    same_study = [p for p in files[1:] if pydicom.dcmread(p).StudyInstanceUID == a.StudyInstanceUID]
    assert same_study
    b = pydicom.dcmread(same_study[0])
    derived = pydicom.dcmread(files[0])
    derived.SOPInstanceUID = "1.2.999.5.5.5"
    ref = Dataset()
    ref.ReferencedSOPClassUID = a.SOPClassUID
    ref.ReferencedSOPInstanceUID = a.SOPInstanceUID
    derived.SourceImageSequence = Sequence([ref])

    new_a, new_b, new_d = (deidentify(x, CONFIG) for x in (a, b, derived))
    assert new_a.StudyInstanceUID == new_b.StudyInstanceUID != a.StudyInstanceUID
    assert new_a.SeriesInstanceUID != new_b.SeriesInstanceUID
    assert new_d.SourceImageSequence[0].ReferencedSOPInstanceUID == new_a.SOPInstanceUID
    assert new_a.SOPInstanceUID != a.SOPInstanceUID


def test_export_names_files_by_new_uids_the_same_way_in_every_run(
    cohort: Path, tmp_path: Path
) -> None:
    files = _dicom_files(cohort)
    first = export_deidentified(files, tmp_path / "one", CONFIG)
    second = export_deidentified(files, tmp_path / "two", CONFIG)
    other = export_deidentified(files, tmp_path / "three", DeidConfig(key=b"other-key"))
    assert first.written == second.written == other.written == len(files)
    names = {p.relative_to(tmp_path / "one") for p in _dicom_files(tmp_path / "one")}
    assert names == {p.relative_to(tmp_path / "two") for p in _dicom_files(tmp_path / "two")}
    others = {p.relative_to(tmp_path / "three") for p in _dicom_files(tmp_path / "three")}
    assert not names & others
    originals = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    for name in names:
        assert len(name.parts) == 3 and all(part.startswith("2.25.") for part in name.parts)
        assert not any(uid in str(name) for uid in originals) and "FAKE" not in str(name)
    for path in _dicom_files(tmp_path / "one"):
        out = pydicom.dcmread(path)
        assert path.stem == out.SOPInstanceUID
        assert path.parent.name == out.SeriesInstanceUID
        assert path.parent.parent.name == out.StudyInstanceUID
        assert "FAKE" not in str(out.PatientName) + str(out.PatientID)
        assert b"Fake" not in path.read_bytes() and b"FAKE" not in path.read_bytes()


# --------------------------------------------------------------------------------------------
# Dates
# --------------------------------------------------------------------------------------------


def _day(text: str) -> dt.date:
    return dt.datetime.strptime(text, "%Y%m%d").date()


def _two_studies_37_days_apart(cohort: Path) -> tuple[Dataset, Dataset]:
    first = pydicom.dcmread(_dicom_files(cohort)[0])
    second = pydicom.dcmread(_dicom_files(cohort)[0])
    later = (_day(first.StudyDate) + dt.timedelta(days=37)).strftime("%Y%m%d")
    second.StudyDate = second.SeriesDate = second.ContentDate = later
    second.StudyInstanceUID = "1.2.999.37.1"
    second.SeriesInstanceUID = "1.2.999.37.2"
    second.SOPInstanceUID = "1.2.999.37.3"
    return first, second


def test_modified_dates_keep_the_interval_between_a_patients_studies(cohort: Path) -> None:
    first, second = _two_studies_37_days_apart(cohort)
    config = DeidConfig(key=KEY, keep_dates=True)
    new_first, new_second = deidentify(first, config), deidentify(second, config)
    assert (_day(new_second.StudyDate) - _day(new_first.StudyDate)).days == 37
    shift = (_day(new_first.StudyDate) - _day(first.StudyDate)).days
    assert shift == date_shift_days(str(first.PatientID), KEY) and -365 <= shift <= -1
    for new, old in ((new_first, first), (new_second, second)):
        assert new.StudyDate != old.StudyDate
        assert new.SeriesDate == new.ContentDate == new.StudyDate  # all dates move together
        assert new.StudyTime == old.StudyTime  # a whole-day shift keeps times
        assert new.PatientBirthDate == ""  # birth date stays as the Basic Profile says
        assert new.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = [c.CodeValue for c in new_first.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107"]


def test_dates_are_emptied_or_replaced_without_the_option(cohort: Path) -> None:
    first, _ = _two_studies_37_days_apart(cohort)
    first.AcquisitionDate = first.StudyDate
    new = deidentify(first, CONFIG)
    assert new.StudyDate == "" and new.StudyTime == ""  # Z
    assert new.AcquisitionDate == ""  # X/Z
    assert new.SeriesDate == new.ContentDate == DUMMY_DATE  # X/D, Z/D: a dummy
    assert new.PatientBirthDate == "" and "PatientAge" not in new
    assert new.LongitudinalTemporalInformationModified == "REMOVED"
    original_dates = {first.StudyDate, first.PatientBirthDate}
    assert not original_dates & {str(e.value) for e in _walk(new) if e.VR in ("DA", "DT")}


def test_date_shifts_are_per_patient_and_in_range() -> None:
    shifts = [date_shift_days(f"patient-{i}", KEY) for i in range(200)]
    assert all(-365 <= s <= -1 for s in shifts) and len(set(shifts)) > 100
    assert date_shift_days("patient-1", KEY) == shifts[1]


# --------------------------------------------------------------------------------------------
# Burned-in annotation and files
# --------------------------------------------------------------------------------------------


def _burned_in_variants(cohort: Path, folder: Path) -> list[Path]:
    files = _dicom_files(cohort)
    yes = pydicom.dcmread(files[0])
    yes.BurnedInAnnotation = "YES"
    us = pydicom.dcmread(files[1])
    us.Modality = "US"
    del us.BurnedInAnnotation
    sc = pydicom.dcmread(files[2])
    sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    del sc.BurnedInAnnotation
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, ds in (("yes.dcm", yes), ("us.dcm", us), ("sc.dcm", sc)):
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_burned_in_images_are_refused_unless_allowed(cohort: Path, tmp_path: Path) -> None:
    paths = _burned_in_variants(cohort, tmp_path)
    for path in paths:
        ds = pydicom.dcmread(path)
        with pytest.raises(BurnedInAnnotationError):
            deidentify(ds, CONFIG)
        assert deidentify(ds, DeidConfig(key=KEY, allow_burned_in=True)).PatientIdentityRemoved
    us = pydicom.dcmread(paths[1])
    us.BurnedInAnnotation = "NO"
    deidentify(us, CONFIG)  # a US image that says it has none passes


def test_export_refuses_burned_in_and_unreadable_files_and_goes_on(
    cohort: Path, tmp_path: Path
) -> None:
    burned = _burned_in_variants(cohort, tmp_path / "burned")
    native = [
        p
        for p in _dicom_files(cohort)
        if pydicom.dcmread(p).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    ]
    data = native[0].read_bytes()
    cut_header, cut_pixels = tmp_path / "cut_header.dcm", tmp_path / "cut_pixels.dcm"
    cut_header.write_bytes(data[:400])
    cut_pixels.write_bytes(data[:-100])  # native pixel data cut short
    sidecars = [cohort / "labels.csv", cohort / "findings.json"]
    good = _dicom_files(cohort)
    paths = [*good, *burned, cut_header, cut_pixels, *sidecars, tmp_path / "missing.dcm"]
    summary = export_deidentified(paths, tmp_path / "out", CONFIG)
    assert summary.written == len(good)
    assert summary.refused == {
        "burned_in_annotation": 3,
        "missing_attribute": 1,
        "truncated_pixel_data": 1,
        "not_dicom": 2,
        "unreadable": 1,
    }
    assert len(_dicom_files(tmp_path / "out")) == len(good)
    allowed = export_deidentified(
        burned, tmp_path / "allowed", DeidConfig(KEY, allow_burned_in=True)
    )
    assert allowed.written == 3 and allowed.refused == {}


def test_source_files_are_never_modified(cohort: Path, tmp_path: Path) -> None:
    files = _dicom_files(cohort)
    before = _digests(files)
    deidentify_file(files[0], tmp_path / "one.dcm", CONFIG)
    export_deidentified(files, tmp_path / "out", DeidConfig(key=KEY, keep_dates=True))
    assert _digests(files) == before
    copy = tmp_path / "copy.dcm"
    shutil.copyfile(files[0], copy)
    with pytest.raises(ValueError):
        deidentify_file(copy, copy, CONFIG)
    assert copy.read_bytes() == files[0].read_bytes()


def test_deidentified_synthetic_images_keep_their_pixels(cohort: Path, tmp_path: Path) -> None:
    for src in _dicom_files(cohort)[:2]:
        dst = tmp_path / src.name
        deidentify_file(src, dst, CONFIG)
        original, new = pydicom.dcmread(src), pydicom.dcmread(dst)
        assert np.array_equal(original.pixel_array, new.pixel_array)
        assert new.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert new.PatientID == patient_pseudonym(str(original.PatientID), KEY)
