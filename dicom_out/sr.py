"""Per-structure measurements -> a TID 1500 Measurement Report (highdicom Comprehensive 3D SR).

One measurement group (TID 1411, volumetric ROI) per structure, each referencing its segment in the
SEG by SOP Instance UID and Segment Number and carrying the same Tracking UID as that segment, so a
viewer can go from a number in the report to the voxels it was computed from.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import pydicom
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
)
from vesalius.dicom_out.seg import SEGMENTATION_STORAGE, segment_numbers, segment_tracking_uid
from vesalius.dicom_out.sources import source_headers
from vesalius.inference.measures import Measurement
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


def _measurements(measurement: Measurement, modality: str,
                  algorithm_id: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    items = [
        hd.sr.Measurement(name=VOLUME, value=float(measurement.volume_ml), unit=MILLILITER,
                          algorithm_id=algorithm_id),
    ]
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


def build_sr(volume: Volume, seg: pydicom.Dataset, measurements: Sequence[Measurement],
             algorithm: Algorithm) -> pydicom.Dataset:
    """A Comprehensive 3D SR measurement report on the SEG's segments, with derived UIDs.

    ``seg`` must be the BINARY SEG of the same run: Referenced Segment Number (TID 1411) is
    defined for Segmentation Storage, and dciodvfy rejects it on a Label Map Segmentation; so the
    report always travels with the BINARY SEG, and a Label Map SEG is an addition, never a
    replacement.
    """
    if seg.SOPClassUID != SEGMENTATION_STORAGE:
        raise ValueError("the SR references the BINARY SEG (Segmentation Storage); "
                         f"got SOP class {seg.SOPClassUID}")
    if not measurements:
        raise ValueError("no measurement to report")
    check_same_study(volume, seg)
    numbers = segment_numbers(seg)
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)
    groups = []
    for measurement in measurements:
        term = term_for(measurement.label.name)
        tracking_uid = segment_tracking_uid(volume, algorithm, measurement.label)
        if tracking_uid not in numbers:
            raise ValueError(f"the SEG has no segment for {measurement.label.name!r}")
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=term.label),
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
            measurements=_measurements(measurement, volume.modality, algorithm_id),
        ))

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
    sr.SeriesDescription = f"Vesalius {algorithm.name} measurements"[:64]
    return sr
