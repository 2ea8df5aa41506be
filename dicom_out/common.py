"""Building blocks shared by the writers assembled on pydicom (surfaces, encapsulated STL).

highdicom does these for the SEG and the SR; the objects no library writes need the same: the
source's patient and study, coded items, and references to the instances they were derived from.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sr.coding import Code
from pydicom.uid import UID, ExplicitVRLittleEndian

from vesalius.dicom_out.identity import DEVICE_SERIAL_NUMBER, MANUFACTURER, MODEL_NAME, SOFTWARE_VERSION
from vesalius.inference.volume import Volume

# Copied from the source so the object files under the same patient and study.
PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "OtherPatientIDsSequence", "PatientAge", "PatientSize", "PatientWeight",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDescription",
)
# Patient and General Study type 2 attributes: present, if only empty.
_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
           "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def code_item(code: Code) -> pydicom.Dataset:
    """A Code Sequence item (value, scheme, meaning)."""
    item = pydicom.Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def image_reference(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A Referenced SOP Class/Instance item for ``ds``."""
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def referenced_series(datasets: Sequence[pydicom.Dataset]) -> pydicom.Dataset:
    """A Referenced Series Sequence item listing ``datasets`` (all of one series)."""
    item = pydicom.Dataset()
    item.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    item.ReferencedInstanceSequence = [image_reference(ds) for ds in datasets]
    return item


def new_derived_dataset(source: pydicom.Dataset, sop_class_uid: str,
                        sop_instance_uid: str) -> pydicom.Dataset:
    """A dataset in the source's patient and study, with SOP Common, our equipment and file meta."""
    now = datetime.datetime.now()
    ds = pydicom.Dataset()
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            ds[keyword] = source[keyword]
    for keyword in _TYPE_2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime
    # General Equipment + Enhanced General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.DeviceSerialNumber = DEVICE_SERIAL_NUMBER
    ds.SoftwareVersions = SOFTWARE_VERSION
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def check_same_study(volume: Volume, seg: pydicom.Dataset | None) -> None:
    """ValueError when the SEG an object references belongs to another study than the source."""
    if seg is not None and seg.StudyInstanceUID != volume.study_uid:
        raise ValueError("the SEG belongs to another study than the source series")


def derived_from(volume: Volume, seg: pydicom.Dataset | None) -> list[pydicom.Dataset]:
    """The instances an object was derived from: the source slices, and the SEG when given."""
    return [*volume.sources, *([seg] if seg is not None else [])]


def common_instance_references(volume: Volume, seg: pydicom.Dataset | None) -> list[pydicom.Dataset]:
    """Referenced Series Sequence (Common Instance Reference): the source series, and the SEG's."""
    references = [referenced_series(volume.sources)]
    if seg is not None:
        references.append(referenced_series([seg]))
    return references
