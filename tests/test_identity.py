"""Deterministic output UIDs: a re-run replaces, a new model version adds."""

from __future__ import annotations

import pydicom
import pytest

from vesalius.dicom_out.common import new_derived_dataset
from vesalius.dicom_out.identity import (
    MANUFACTURER,
    MORPHOLOGICAL_OPERATIONS,
    SOFTWARE_VERSION,
    Algorithm,
    algorithm_identification,
    derived_uid,
)


def test_derived_uids_are_deterministic_valid_and_distinct() -> None:
    algorithm = Algorithm("builtin_ct", "1")
    first = derived_uid("1.2.3.4", algorithm, "seg/series")
    assert first == derived_uid("1.2.3.4", Algorithm("builtin_ct", "1"), "seg/series")
    assert first.startswith("2.25.") and len(first) <= 64
    assert first[5:].isdigit()
    others = {
        derived_uid("1.2.3.5", algorithm, "seg/series"),
        derived_uid("1.2.3.4", Algorithm("builtin_ct", "2"), "seg/series"),
        derived_uid("1.2.3.4", Algorithm("other", "1"), "seg/series"),
        derived_uid("1.2.3.4", algorithm, "seg/instance"),
    }
    assert first not in others and len(others) == 4
    with pytest.raises(ValueError):
        derived_uid("", algorithm, "seg/series")


def test_the_algorithm_family_describes_but_does_not_identify() -> None:
    plain = Algorithm("builtin_ct", "1")
    described = Algorithm("builtin_ct", "1", family=MORPHOLOGICAL_OPERATIONS)
    assert plain == described
    assert derived_uid("1.2.3", plain, "seg/series") == derived_uid("1.2.3", described,
                                                                    "seg/series")
    item = algorithm_identification(described)[0]
    assert (item.AlgorithmName, item.AlgorithmVersion) == ("builtin_ct", "1")
    assert item.AlgorithmFamilyCodeSequence[0].CodeValue == "123104"

def test_derived_objects_file_under_the_source_patient_and_name_our_equipment() -> None:
    source = pydicom.Dataset()
    source.PatientName, source.PatientID, source.StudyInstanceUID = "Doe^Jane", "P1", "1.2.3"
    source.SeriesInstanceUID, source.Modality = "1.2.3.4", "CT"
    ds = new_derived_dataset(source, "1.2.840.10008.5.1.4.1.1.66.5", "2.25.7")
    assert (ds.PatientName, ds.PatientID, ds.StudyInstanceUID) == ("Doe^Jane", "P1", "1.2.3")
    assert "SeriesInstanceUID" not in ds and "Modality" not in ds  # the object's own series
    assert ds.AccessionNumber == "" and ds.PatientBirthDate == ""  # type 2: present, if empty
    assert (ds.Manufacturer, ds.SoftwareVersions) == (MANUFACTURER, SOFTWARE_VERSION)
    assert SOFTWARE_VERSION and SOFTWARE_VERSION != "0+unknown"  # the installed package's
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == "2.25.7"
    assert ds.SeriesDate == ds.ContentDate == ds.InstanceCreationDate
