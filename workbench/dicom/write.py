"""DICOM out: a study's AI result as objects a PACS files beside the study (highdicom, no torch).

Two builders, both taking plain records (source headers, class names, probabilities, the model's
identity, an RGB array), both giving a new series in the *same* study (patient and study
attributes copied from the source headers, so the PACS files them under the study they came from):

- :func:`build_measurement_report`: a Comprehensive 3D SR following TID 1500 (Imaging
  Measurement Report). One measurement group per class holds its calibrated probability (UCUM
  unit ``1``), one more group the predicted finding as a qualitative evaluation; every group names
  the algorithm (TID 4019: model name, bundle version, bundle hash) and the source images; the
  observer context is a device (the model). The report is ``VerificationFlag UNVERIFIED`` and
  ``CompletionFlag PARTIAL``, and its series description says it is not for diagnostic use until
  a clinician verifies it.
- :func:`build_overlay_image`: a Secondary Capture (RGB) of the saliency overlay with a caption
  burned in (so ``BurnedInAnnotation YES``), referencing the image it was drawn over.

:func:`read_measurement_report` reads back what :func:`build_measurement_report` wrote.

Class names become codes in a local coding scheme (``99WBENCH``; PS3.16 8.2 reserves "99"
prefixes for such schemes); the probability concept is local too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from workbench.errors import WorkbenchError

SCHEME = "99WBENCH"
MANUFACTURER = "workbench"
NOT_FOR_DIAGNOSIS = "not for diagnostic use until verified"
SR_SERIES_DESCRIPTION = f"AI result - {NOT_FOR_DIAGNOSIS}"
SC_SERIES_DESCRIPTION = f"AI heatmap - {NOT_FOR_DIAGNOSIS}"
SR_SERIES_NUMBER = 9001
SC_SERIES_NUMBER = 9002

CALIBRATED_PROBABILITY = hd.sr.CodedConcept("CALPROB", SCHEME, "Calibrated probability")
PREDICTED_FINDING = hd.sr.CodedConcept("PREDFIND", SCHEME, "Predicted finding")
UNIT_ONE = hd.sr.CodedConcept("1", "UCUM", "no units")
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging")
REPORT_TITLE = codes.cid7021.ImagingMeasurementReport
ALGORITHM_NAME, ALGORITHM_VERSION = "111001", "111003"  # DCM codes of TID 4019's rows
# An overlay narrower than this is scaled up (nearest neighbour) so that its caption is legible.
MIN_SC_WIDTH = 512


class DicomWriteError(WorkbenchError, ValueError):
    """The inputs cannot make a valid object (no sources, probabilities not matching classes...)."""


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made the result: bundle name, version and content hash."""

    name: str
    version: str
    bundle_hash: str
    manufacturer: str = MANUFACTURER

    @property
    def device_uid(self) -> str:
        """A UID for the model as an SR device observer, the same for the same bundle."""
        return str(generate_uid(entropy_srcs=[f"workbench-model|{self.bundle_hash}"]))

    def algorithm(self) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(
            name=self.name[:64],
            version=self.version[:64],
            parameters=[f"bundle_hash={self.bundle_hash}"],
            family=codes.cid7162.ArtificialIntelligence,
            manufacturer=self.manufacturer,
        )


@dataclass(frozen=True)
class ReportContent:
    """What :func:`read_measurement_report` finds in an SR."""

    probabilities: dict[str, float]
    predicted_label: str | None
    source_sop_uids: tuple[str, ...]
    verified: bool
    complete: bool
    algorithm_name: str | None
    algorithm_version: str | None


def class_code(name: str) -> hd.sr.CodedConcept:
    """The local code of a class: its name as code value and meaning."""
    if not name or not name.strip():
        raise DicomWriteError("a class name is empty")
    return hd.sr.CodedConcept(name, SCHEME, name[:64])


def derived_uid(*parts: str) -> str:
    """A UID derived from ``parts``: the same inputs give the same object, so a result sent
    twice replaces itself in the PACS instead of appearing twice."""
    return str(generate_uid(entropy_srcs=["|".join(("workbench-result", *parts))]))


def _check_sources(sources: Sequence[Dataset]) -> None:
    if not sources:
        raise DicomWriteError("no source images to refer to")
    studies = {str(s.StudyInstanceUID) for s in sources}
    if len(studies) != 1:
        raise DicomWriteError(f"the source images belong to {len(studies)} studies, not one")


def build_measurement_report(
    sources: Sequence[Dataset],
    probabilities: Mapping[str, float],
    predicted_label: str,
    model: ModelIdentity,
    *,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    series_number: int = SR_SERIES_NUMBER,
    instance_number: int = 1,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Comprehensive 3D SR of one study's classification, unverified.

    Args:
        sources: headers (pixel data not needed) of the images the model saw, one study.
        probabilities: calibrated probability per class name, in the model's class order.
        predicted_label: the class the model predicts; one of ``probabilities``.
        model: the bundle that made the prediction.
        series_uid, sop_uid: default to new random UIDs (see :func:`derived_uid`).
    """
    _check_sources(sources)
    if predicted_label not in probabilities:
        raise DicomWriteError(f"the predicted label {predicted_label!r} is not one of the classes")
    for name, p in probabilities.items():
        if not (math.isfinite(float(p)) and 0.0 <= float(p) <= 1.0):
            raise DicomWriteError(f"the probability of {name!r} is not in [0, 1]")

    algorithm = model.algorithm()
    source_refs = [
        hd.sr.SourceImageForMeasurementGroup(str(s.SOPClassUID), str(s.SOPInstanceUID))
        for s in sources
    ]
    study_uid = str(sources[0].StudyInstanceUID)
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for name, p in probabilities.items():
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(model.bundle_hash, study_uid, "class", name),
                    identifier=f"probability of {name}"[:64],
                ),
                finding_type=class_code(name),
                algorithm_id=algorithm,
                source_images=source_refs,
                measurements=[
                    hd.sr.Measurement(
                        name=CALIBRATED_PROBABILITY,
                        value=float(p),
                        unit=UNIT_ONE,
                        algorithm_id=algorithm,
                    )
                ],
            )
        )
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid(model.bundle_hash, study_uid, "predicted"),
                identifier="predicted finding",
            ),
            algorithm_id=algorithm,
            source_images=source_refs,
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(
                    name=PREDICTED_FINDING, value=class_code(predicted_label)
                )
            ],
        )
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.device_uid,
            name=f"{model.name} {model.version}"[:64],
            manufacturer_name=model.manufacturer,
            model_name=model.name[:64],
            serial_number=model.bundle_hash[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=groups,
        title=REPORT_TITLE,
        referenced_images=list(sources),
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(sources),
        content=report,
        series_instance_uid=series_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_uid or hd.UID(),
        instance_number=instance_number,
        manufacturer=model.manufacturer,
        is_complete=False,
        is_final=False,
        is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
    )
    # Identify the local coding scheme (PS3.3 C.12.1.1.2: a private scheme should be listed).
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "Workbench local codes"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    listed = list(sr.get("CodingSchemeIdentificationSequence", None) or [])
    sr.CodingSchemeIdentificationSequence = [*listed, scheme]
    return sr


def read_measurement_report(ds: Dataset) -> ReportContent:
    """The classes, probabilities, predicted finding and source images of a report written by
    :func:`build_measurement_report` (e.g. as retrieved back from the PACS)."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds, copy=True)
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise DicomWriteError("the SR is not a TID 1500 measurement report")
    probabilities: dict[str, float] = {}
    predicted: str | None = None
    sources: list[str] = []
    name = version = None
    for group in report.get_image_measurement_groups():
        for image in group.source_images:
            uid = str(image.referenced_sop_instance_uid)
            if uid not in sources:
                sources.append(uid)
        for item in group[0].ContentSequence:  # the group is one CONTAINER item
            concept = item.name
            if concept.scheme_designator == "DCM" and concept.value == ALGORITHM_NAME:
                name = name or str(item.value)
            if concept.scheme_designator == "DCM" and concept.value == ALGORITHM_VERSION:
                version = version or str(item.value)
        finding_type = group.finding_type
        for m in group.get_measurements(name=CALIBRATED_PROBABILITY):
            if finding_type is not None:
                probabilities[str(finding_type.meaning)] = float(m.value)
        for q in group.get_qualitative_evaluations(name=PREDICTED_FINDING):
            value = q.value
            if isinstance(value, hd.sr.CodedConcept):
                predicted = str(value.meaning)
    return ReportContent(
        probabilities=probabilities,
        predicted_label=predicted,
        source_sop_uids=tuple(sources),
        verified=str(ds.get("VerificationFlag", "")) == "VERIFIED",
        complete=str(ds.get("CompletionFlag", "")) == "COMPLETE",
        algorithm_name=name,
        algorithm_version=version,
    )


# --- the overlay as a secondary capture -------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def caption_image(
    rgb: np.ndarray, lines: Sequence[str], min_width: int = MIN_SC_WIDTH
) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8, scaled up to at least ``min_width`` columns (nearest neighbour),
    with ``lines`` written white on black in a band below it; returns a new (H', W', 3) uint8."""
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise DicomWriteError(f"the overlay must be (rows, columns, 3) uint8, not {arr.shape}")
    factor = max(1, math.ceil(min_width / arr.shape[1]))
    if factor > 1:
        arr = np.repeat(np.repeat(arr, factor, axis=0), factor, axis=1)
    width = arr.shape[1]
    size = max(10, width // 40)
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while size > 8 and any(probe.textlength(t, font=font) > width - 8 for t in lines):
        size -= 1
        font = _font(size)
    line_h = int(size * 1.4)
    band = np.zeros((line_h * len(lines) + size // 2, width, 3), dtype=np.uint8)
    img = Image.fromarray(band)
    draw = ImageDraw.Draw(img)
    for n, text in enumerate(lines):
        draw.text((4, 2 + n * line_h), text, fill=(255, 255, 255), font=font)
    return np.concatenate([arr, np.asarray(img)], axis=0)


def build_overlay_image(
    source: Dataset,
    rgb: np.ndarray,
    model: ModelIdentity,
    caption: Sequence[str] = (),
    *,
    description: str = "saliency map over the displayed image",
    series_uid: str | None = None,
    sop_uid: str | None = None,
    series_number: int = SC_SERIES_NUMBER,
    instance_number: int = 1,
) -> hd.sc.SCImage:
    """A Secondary Capture (RGB, 8 bits) of an overlay drawn over ``source``'s image.

    The caption lines (and a line naming the model and saying the image is not for diagnostic
    use) are burned in below the image, so ``BurnedInAnnotation`` is ``YES``. The image refers to
    ``source`` as its source image; patient and study come from ``source``.
    """
    lines = [
        *caption,
        f"{model.name} {model.version} - AI result, {NOT_FOR_DIAGNOSIS}",
    ]
    pixels = caption_image(rgb, lines)
    orientation = source.get("PatientOrientation")
    patient_orientation = (
        (str(orientation[0]), str(orientation[1]))
        if orientation is not None and len(orientation) == 2
        else None
    )
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_uid or hd.UID(),
        instance_number=instance_number,
        manufacturer=model.manufacturer,
        transfer_syntax_uid="1.2.840.10008.1.2.1",  # explicit VR little endian
        patient_orientation=patient_orientation,
        series_description=SC_SERIES_DESCRIPTION,
    )
    sc.BurnedInAnnotation = "YES"
    if "Laterality" not in sc:  # General Series, type 2C: empty when the source has none
        sc.Laterality = source.get("Laterality", "")
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = f"{description} ({model.name} {model.version})"[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    sc.ManufacturerModelName = model.name[:64]
    sc.SoftwareVersions = model.version[:64]
    return sc
