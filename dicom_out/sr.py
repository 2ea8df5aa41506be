"""Per-structure measurements -> a TID 1500 Measurement Report (highdicom Comprehensive 3D SR).

One measurement group (TID 1411, volumetric ROI) per structure, each referencing its segment in the
SEG by SOP Instance UID and Segment Number and carrying the same Tracking UID as that segment, so a
viewer can go from a number in the report to the voxels it was computed from.

Each is followed by a second group (TID 1410, planar ROI) with the same Tracking Identifier and
UID: an outline-free "where to look" region, the rectangle enclosing the structure on the source
slice where its cross-section is largest. OHIF 3.x (up to 3.13 at least) shows a measurement
only when its groups, merged by Tracking UID, hold a SCOORD/SCOORD3D: it draws the numbers of
both groups at that region, and without one it fails on the report altogether.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from vesalius.dicom_out.common import check_same_study
from vesalius.dicom_out.identity import (
    DEVICE_SERIAL_NUMBER,
    DEVICE_UID,
    MANUFACTURER,
    MODEL_NAME,
    SERIES_NUMBER,
    SOFTWARE_VERSION,
    Algorithm,
    derived_uid,
    name_series,
)
from vesalius.dicom_out.seg import SEGMENTATION_STORAGE, segment_numbers, segment_tracking_uid
from vesalius.dicom_out.sources import source_headers
from vesalius.inference.measures import Measurement
from vesalius.inference.series.frames import frame_number
from vesalius.inference.terminology import term_for
from vesalius.inference.volume import Volume

VOLUME = codes.SCT.Volume  # SCT 118565006
AREA = codes.SCT.Area  # SCT 42798000: the structure's surface area, from its mesh
MEAN = codes.SCT.Mean  # SCT 373098007 (derivation)
STANDARD_DEVIATION = codes.SCT.StandardDeviation  # SCT 386136009 (derivation)
MILLILITER = Code("ml", "UCUM", "milliliter")
SQUARE_CENTIMETER = codes.UCUM.SquareCentimeter
HOUNSFIELD_UNIT = codes.UCUM.HounsfieldUnit
NO_UNIT = Code("1", "UCUM", "no units")

# Longitudinal follow-up (the node's volume history): no DCM or SCT concept names "the value of this
# measurement in a prior study" or "its change since then", so these two are private codes of the
# scheme 99VES (docs/outputs.md), declared in the SR's Coding Scheme Identification Sequence; the
# prior study's date is the standard DCM 111060 "Study Date", a property of the prior volume.
PRIVATE_SCHEME = "99VES"
PRIOR_VOLUME = Code("PRIORVOL", PRIVATE_SCHEME, "Volume in prior study")
VOLUME_CHANGE = Code("VOLCHANGE", PRIVATE_SCHEME, "Volume change since prior study")
STUDY_DATE = codes.DCM.StudyDate  # DCM 111060


@dataclass(frozen=True)
class Prior:
    """A structure's volume in an earlier study of the same patient, and that study's date."""

    volume_ml: float
    study_date: str  # DICOM DA, YYYYMMDD


def concept_key(name: str) -> str:
    """How priors are keyed: the structure's coded concept (type, laterality, region where it has
    them), so two model versions (or models) naming it differently still follow one structure."""
    term = term_for(name)
    parts = (term.type, term.modifier, term.region, term.region_modifier)
    return "/".join(f"{code.scheme_designator}:{code.value}" for code in parts if code is not None)


_PROCEDURES = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
    "PT": codes.LN.PETUnspecifiedBodyRegion,
}


def _intensity(modality: str) -> tuple[Code, Code] | None:
    """What the mean/std inside a structure measures, and its unit; None when not meaningful."""
    if modality == "CT":
        return codes.DCM.AttenuationCoefficient, HOUNSFIELD_UNIT
    if modality == "MR":
        return codes.DCM.MRSignalIntensity, NO_UNIT
    return None


def _prior_measurements(volume_ml: float, prior: Prior,
                        algorithm_id: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    """The prior volume (with its study's date as a property) and the change to this one."""
    before = hd.sr.Measurement(name=PRIOR_VOLUME, value=round(prior.volume_ml, 1), unit=MILLILITER)
    item = before[0]
    item.ContentSequence = hd.sr.ContentSequence([hd.sr.DateContentItem(
        name=STUDY_DATE, value=prior.study_date,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES)], is_root=False)
    change = hd.sr.Measurement(name=VOLUME_CHANGE, value=round(volume_ml - prior.volume_ml, 1),
                               unit=MILLILITER, algorithm_id=algorithm_id)
    return [before, change]


def _measurements(measurement: Measurement, modality: str,
                  algorithm_id: hd.sr.AlgorithmIdentification,
                  prior: Prior | None = None) -> list[hd.sr.Measurement]:
    measurement = measurement.rounded()  # 0.1 mL, 0.1 cm2, 1 HU: no digits the voxels cannot tell
    items = [
        hd.sr.Measurement(name=VOLUME, value=float(measurement.volume_ml), unit=MILLILITER,
                          algorithm_id=algorithm_id),
    ]
    if prior is not None:
        items += _prior_measurements(float(measurement.volume_ml), prior, algorithm_id)
    if measurement.surface_area_cm2 is not None:
        items.append(hd.sr.Measurement(name=AREA, value=float(measurement.surface_area_cm2),
                                       unit=SQUARE_CENTIMETER, algorithm_id=algorithm_id))
    quantity = _intensity(modality)
    if quantity is None:
        return items
    intensity, unit = quantity
    items.append(hd.sr.Measurement(name=intensity, value=float(measurement.mean), unit=unit,
                                   derivation=MEAN, algorithm_id=algorithm_id))
    items.append(hd.sr.Measurement(name=intensity, value=float(measurement.std), unit=unit,
                                   derivation=STANDARD_DEVIATION, algorithm_id=algorithm_id))
    return items


# The structure is not wholly in the scan: TID 1500's qualitative evaluation (TID 1501 row
# "Qualitative Evaluations") with the DCM concepts the image-quality templates use for exactly
# this, Imaging Series Quality (130550) = Anatomy coverage incomplete (130576, CID 6315).
IMAGING_SERIES_QUALITY = Code("130550", "DCM", "Imaging Series Quality")
ANATOMY_COVERAGE_INCOMPLETE = Code("130576", "DCM", "Anatomy coverage incomplete")


def completeness_evaluations(measurement: Measurement) -> list[hd.sr.QualitativeEvaluation]:
    """"Anatomy coverage incomplete" for a structure the scan cuts (first/last slice, FOV edge).

    Its volume counts only the voxels in the scan and its area leaves out the cut faces; a
    complete structure carries no evaluation (the absence of the flag is the claim).
    """
    if not measurement.incomplete:
        return []
    return [hd.sr.QualitativeEvaluation(name=IMAGING_SERIES_QUALITY, value=ANATOMY_COVERAGE_INCOMPLETE)]


def _location_group(volume: Volume, label_map: np.ndarray, measurement: Measurement,
                    tracking_identifier: hd.sr.TrackingIdentifier,
                    ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group: the rectangle enclosing the structure on its key slice (the one with the
    most of its voxels, ``Measurement.key_slice``).

    It measures nothing itself; it gives viewers that place measurements on an image (OHIF)
    the slice and region where the structure's numbers belong. Coordinates are image column/row
    of pixel edges (SCOORD: the top left corner of the top left pixel is 0,0).
    """
    label, z = measurement.label, measurement.key_slice
    inside = label.mask(label_map[z])
    if not inside.any():
        raise ValueError(f"{label.name!r} has no voxel on its key slice {z}: the measurement is not "
                         "of this label map")
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    left, right, top, bottom = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    corners = [(left, top), (right, top), (right, bottom), (left, bottom), (left, top)]
    source = volume.sources[z]
    frame = frame_number(source)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array(corners, dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=str(source.SOPInstanceUID),
            referenced_frame_numbers=None if frame is None else [frame],
        ),
    )
    term = term_for(label.name)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking_identifier, referenced_region=region,
        finding_type=term.type, finding_category=term.category,
    )


def build_sr(volume: Volume, seg: pydicom.Dataset, measurements: Sequence[Measurement],
             algorithm: Algorithm, *, label_map: np.ndarray,
             priors: Mapping[str, Prior] | None = None) -> pydicom.Dataset:
    """A Comprehensive 3D SR measurement report on the SEG's segments, with derived UIDs.

    ``label_map`` is the model's label array the SEG was made from; on each measurement's key
    slice it places the structure's "where to look" region (see the module docstring).

    ``seg`` must be the BINARY SEG of the same run: Referenced Segment Number (TID 1411) is
    defined for Segmentation Storage, and dciodvfy rejects it on a Label Map Segmentation; so the
    report always travels with the BINARY SEG, and a Label Map SEG is an addition, never a
    replacement.

    ``priors`` (by ``concept_key`` of a structure's type) are the volumes of an earlier study of
    the same patient: a structure with one carries it, its date and the change (docs/outputs.md).
    """
    priors = priors or {}
    if seg.SOPClassUID != SEGMENTATION_STORAGE:
        raise ValueError("the SR references the BINARY SEG (Segmentation Storage); "
                         f"got SOP class {seg.SOPClassUID}")
    if not measurements:
        raise ValueError("no measurement to report")
    check_same_study(volume, seg)
    if label_map.shape != volume.array.shape:
        raise ValueError(f"label map shape {label_map.shape} differs from the volume's "
                         f"{volume.array.shape}")
    numbers = segment_numbers(seg)
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
                 | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    for measurement in measurements:
        term = term_for(measurement.label.name)
        tracking_uid = segment_tracking_uid(volume, algorithm, measurement.label)
        if tracking_uid not in numbers:
            raise ValueError(f"the SEG has no segment for {measurement.label.name!r}")
        tracking_identifier = hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=term.label)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking_identifier,
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=numbers[tracking_uid],
                # the series, not each of its (often hundreds of) slices per group
                source_series=hd.sr.SourceSeriesForSegmentation(volume.series_uid),
            ),
            finding_type=term.type,
            finding_category=term.category,
            finding_sites=[hd.sr.FindingSite(anatomic_location=term.type,
                                             laterality=term.modifier)],
            algorithm_id=algorithm_id,
            measurements=_measurements(measurement, volume.modality, algorithm_id,
                                       priors.get(concept_key(measurement.label.name))),
            qualitative_evaluations=completeness_evaluations(measurement) or None,
        ))
        groups.append(_location_group(volume, label_map, measurement,
                                      tracking_identifier))

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID, name=MODEL_NAME, manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME, serial_number=DEVICE_SERIAL_NUMBER,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_PROCEDURES.get(volume.modality, codes.SCT.ImagingProcedure),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *source_headers(volume)],
        content=report,
        series_instance_uid=derived_uid(volume.series_uid, algorithm, "sr/series"),
        series_number=SERIES_NUMBER["sr"],
        sop_instance_uid=derived_uid(volume.series_uid, algorithm, "sr/instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
    )
    sr.ManufacturerModelName = MODEL_NAME
    sr.SoftwareVersions = SOFTWARE_VERSION
    sr.DeviceSerialNumber = DEVICE_SERIAL_NUMBER
    name_series(sr, algorithm, "sr")
    if any(concept_key(m.label.name) in priors for m in measurements):
        sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    return sr


def _private_scheme() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "Vesalius longitudinal measurements"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    return item
