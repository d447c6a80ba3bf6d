"""The synthetic cohort generator writes valid, deterministic, site-varied fake DICOM."""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForPresentation

from workbench.dicom.read.pixels import read_image
from workbench.dicom.synth import CT_CLASSES, DX_CLASSES, SITES, synthesize_cohort

DX_SIZE = 64


@pytest.fixture(scope="module")
def dx_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dx")
    summary = synthesize_cohort(out, n_studies=15, seed=11, modality="DX", image_size=DX_SIZE)
    assert summary.n_studies == 15
    assert summary.n_files == 30
    return out


@pytest.fixture(scope="module")
def ct_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ct")
    synthesize_cohort(out, n_studies=4, seed=5, modality="CT", image_size=48)
    return out


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.dcm"))


def _labels(root: Path) -> dict[str, str]:
    with (root / "labels.csv").open(newline="") as fh:
        return {row["StudyInstanceUID"]: row["label"] for row in csv.DictReader(fh)}


def _site_of(ds: pydicom.Dataset):
    return next(s for s in SITES if s.manufacturer == ds.Manufacturer)


def test_every_dx_file_is_valid_part10_with_its_sites_transfer_syntax(dx_cohort: Path) -> None:
    files = _files(dx_cohort)
    assert len(files) == 30
    for path in files:
        with path.open("rb") as fh:
            assert fh.read(132)[128:] == b"DICM"
        ds = pydicom.dcmread(path)
        site = _site_of(ds)
        assert ds.file_meta.TransferSyntaxUID == site.transfer_syntax
        assert ds.SOPClassUID == DigitalXRayImageStorageForPresentation
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        size = site.dx_size(DX_SIZE)
        assert ds.pixel_array.shape == (size, size)
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 12, 0)
        assert ds.pixel_array.max() <= 4095
        assert ds.ViewPosition in ("PA", "LL")
        assert ds.BodyPartExamined == "CHEST"
        assert ds.BurnedInAnnotation == "NO"
        assert ds.PhotometricInterpretation == site.photometric
        assert read_image(path).voi_source == "window"


def test_folder_names_do_not_identify_anyone(dx_cohort: Path) -> None:
    for path in _files(dx_cohort):
        rel = path.relative_to(dx_cohort).as_posix()
        assert re.fullmatch(r"p\d{4}/s\d{2}/se\d/\d{4}\.dcm", rel), rel


def test_identifying_tags_are_obviously_fake_and_consistent(dx_cohort: Path) -> None:
    for path in _files(dx_cohort):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert str(ds.PatientName).startswith("Fake")
        assert ds.PatientID.startswith("FAKEID-")
        assert ds.AccessionNumber.startswith("FAKEACC-")
        assert str(ds.ReferringPhysicianName).startswith("Fakedoc^")
        assert ds.InstitutionName.startswith("Fake")
        birth, study = ds.PatientBirthDate, ds.StudyDate
        age = int(study[:4]) - int(birth[:4]) - (study[4:] < birth[4:])
        assert ds.PatientAge == f"{age:03d}Y"


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        synthesize_cohort(out, n_studies=6, seed=seed, image_size=32)
    files_a = [p.relative_to(a) for p in sorted(a.rglob("*")) if p.is_file()]
    files_b = [p.relative_to(b) for p in sorted(b.rglob("*")) if p.is_file()]
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "labels.csv").read_bytes() != (c / "labels.csv").read_bytes()
    first = sorted(a.rglob("*.dcm"))[0].relative_to(a)
    assert (a / first).read_bytes() != (c / first).read_bytes()


def test_every_class_is_present_in_roughly_the_planned_balance(dx_cohort: Path) -> None:
    labels = _labels(dx_cohort)
    counts = {c: sum(v == c for v in labels.values()) for c in DX_CLASSES}
    assert all(counts[c] >= 1 for c in DX_CLASSES), counts
    assert counts["normal"] >= counts["nodule"] and counts["normal"] >= counts["effusion"]


def test_six_studies_already_contain_every_class(tmp_path: Path) -> None:
    summary = synthesize_cohort(tmp_path, n_studies=6, seed=99, image_size=32)
    assert all(summary.class_counts[c] >= 1 for c in DX_CLASSES), summary.class_counts


def test_labels_csv_has_one_row_per_study_matching_the_files(dx_cohort: Path) -> None:
    assert (dx_cohort / "labels.csv").read_text().splitlines()[0] == "StudyInstanceUID,label"
    labels = _labels(dx_cohort)
    assert len(labels) == 15
    studies = {
        pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in _files(dx_cohort)
    }
    assert studies == set(labels)


def test_each_study_has_a_pa_and_a_lateral_series(dx_cohort: Path) -> None:
    views: dict[str, list[str]] = defaultdict(list)
    series: dict[str, set[str]] = defaultdict(set)
    for path in _files(dx_cohort):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        views[ds.StudyInstanceUID].append(ds.ViewPosition)
        series[ds.StudyInstanceUID].add(ds.SeriesInstanceUID)
    assert all(sorted(v) == ["LL", "PA"] for v in views.values())
    assert all(len(s) == 2 for s in series.values())


def test_some_patient_has_two_studies_on_different_dates(dx_cohort: Path) -> None:
    studies: dict[str, dict[str, str]] = defaultdict(dict)
    for path in _files(dx_cohort):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        studies[ds.PatientID][ds.StudyInstanceUID] = ds.StudyDate
    repeat = [s for s in studies.values() if len(s) == 2]
    assert repeat
    assert all(len(set(s.values())) == 2 for s in repeat)


def test_the_three_sites_differ_in_vendor_photometric_syntax_and_spacing(dx_cohort: Path) -> None:
    seen: dict[str, set[tuple]] = defaultdict(set)
    for path in _files(dx_cohort):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        seen[ds.Manufacturer].add(
            (
                ds.InstitutionName,
                ds.StationName,
                ds.PhotometricInterpretation,
                ds.file_meta.TransferSyntaxUID,
                tuple(float(v) for v in ds.PixelSpacing),
                int(ds.Rows),
                float(ds.RescaleSlope),
                float(ds.RescaleIntercept),
            )
        )
    assert len(seen) == 3
    assert all(len(v) == 1 for v in seen.values())  # one profile per site
    profiles = [next(iter(v)) for v in seen.values()]
    for i in range(8):
        if i == 2:
            assert sorted(p[2] for p in profiles) == ["MONOCHROME1", "MONOCHROME2", "MONOCHROME2"]
        else:
            assert len({p[i] for p in profiles}) == 3, i


def test_every_site_looks_alike_after_the_display_pipeline(dx_cohort: Path) -> None:
    """Outside the body is dark for all sites, the MONOCHROME1 site included."""
    per_site: dict[str, list[float]] = defaultdict(list)
    for path in _files(dx_cohort):
        image = read_image(path)
        corner = float(image.pixels[:6, :6].mean())
        assert corner < 0.2, (image.facts.manufacturer, corner)
        per_site[image.facts.photometric_interpretation].append(float(image.pixels.mean()))
    assert abs(np.mean(per_site["MONOCHROME1"]) - np.mean(per_site["MONOCHROME2"])) < 0.1


def test_findings_point_at_bright_nodules_and_effusion_rows(dx_cohort: Path) -> None:
    findings = json.loads((dx_cohort / "findings.json").read_text())
    labels = _labels(dx_cohort)
    by_sop = {}
    for path in _files(dx_cohort):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_sop[ds.SOPInstanceUID] = path
        if labels[ds.StudyInstanceUID] != "normal":
            assert ds.SOPInstanceUID in findings
    kinds = {f["label"] for f in findings.values()}
    assert kinds == {"nodule", "effusion"}
    for sop, finding in findings.items():
        pixels = read_image(by_sop[sop]).pixels
        assert finding["rows"] == pixels.shape[0]
        if finding["label"] == "nodule":
            r, c, radius = finding["center_row"], finding["center_col"], finding["radius_px"]
            assert 0.02 * pixels.shape[1] <= radius <= 0.055 * pixels.shape[1]
            yy, xx = np.mgrid[: pixels.shape[0], : pixels.shape[1]]
            d = np.hypot(yy - r, xx - c)
            inner = pixels[d < radius * 0.5].mean()
            ring = pixels[(d > radius * 1.5) & (d < radius * 2.5)].mean()
            assert inner > ring + 0.03, (inner, ring)  # faint nodules are faint, not absent
        else:
            assert 0 <= finding["row_min"] < finding["row_max"] < pixels.shape[0]
            assert finding["sides"]


def test_ct_mode_writes_32_slice_series_with_consistent_geometry(ct_cohort: Path) -> None:
    series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for path in _files(ct_cohort):
        ds = pydicom.dcmread(path)
        series[ds.SeriesInstanceUID].append(ds)
    assert len(series) == 4
    labels = _labels(ct_cohort)
    assert set(labels.values()) <= set(CT_CLASSES) and len(set(labels.values())) == 2
    for slices in series.values():
        assert len(slices) == 32
        slices.sort(key=lambda d: int(d.InstanceNumber))
        first = slices[0]
        assert first.SOPClassUID == CTImageStorage
        assert first.Modality == "CT"
        assert first.PhotometricInterpretation == "MONOCHROME2"
        assert float(first.RescaleIntercept) == -1024
        assert (float(first.WindowCenter), float(first.WindowWidth)) == (40, 400)
        assert first.pixel_array.shape == (48, 48)
        assert len({d.FrameOfReferenceUID for d in slices}) == 1
        assert len({d.StudyInstanceUID for d in slices}) == 1
        ipp = np.array([[float(v) for v in d.ImagePositionPatient] for d in slices])
        assert np.allclose(ipp[:, :2], ipp[0, :2])
        steps = np.diff(ipp[:, 2])
        assert np.allclose(steps, float(first.SliceThickness), atol=1e-3)
        assert all(
            list(map(float, d.ImageOrientationPatient)) == [1, 0, 0, 0, 1, 0] for d in slices
        )
        assert all(
            np.isclose(float(d.SliceLocation), float(d.ImagePositionPatient[2])) for d in slices
        )


def test_ct_lesion_findings_mark_a_bright_sphere(ct_cohort: Path) -> None:
    findings = json.loads((ct_cohort / "findings.json").read_text())
    assert findings
    for series_uid, finding in findings.items():
        assert finding["level"] == "series" and finding["label"] == "lesion"
        assert 4 <= finding["radius_vox"] <= 8
        z, y, x = (round(v) for v in finding["center_zyx"])
        sop = finding["sop_instance_uids"][z]
        path = next(
            p
            for p in _files(ct_cohort)
            if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == sop
        )
        ds = pydicom.dcmread(path)
        assert ds.SeriesInstanceUID == series_uid
        assert int(ds.InstanceNumber) == z + 1
        hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert hu[y - 1 : y + 2, x - 1 : x + 2].mean() > 50


def test_every_instance_of_a_larger_ct_cohort_has_its_own_uid(tmp_path: Path) -> None:
    # 12 studies x 32 slices: (study 1, slice 11) and (study 11, slice 1) must not collide.
    synthesize_cohort(tmp_path, n_studies=12, seed=1, modality="CT", image_size=32)
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in _files(tmp_path)]
    assert len(uids) == 12 * 32 == len(set(uids))
