"""De-identification of what a destination receives: the PS3.15 Basic Application Level
Confidentiality Profile (Annex E), with its Retain Longitudinal Temporal Information with Modified
Dates and Retain Patient Characteristics options, applied to our own result objects.

Pseudonyms are consistent and reversible: every UID, patient identity, accession number and date
offset goes through a ``Mapping`` (the node's ``deid_map`` table), so the SEG, SR and Surface
Segmentation of a job still reference each other and the same pseudonymised source series, two
jobs of one patient share one pseudonym, and ``reidentify`` restores what comes back.

The profile is applied by rules, first match wins: the attribute table below (PS3.15 Table
E.1-1, the attributes that are neither UIDs, person names, dates nor times); private tags are
removed; UIDs are replaced (U) unless they are well-known (SOP classes, transfer syntaxes, coding
schemes); person names, dates, times and date-times are replaced with dummies (D), or dates
shifted per patient with ``retain_longitudinal_dates``. Sequences are de-identified item by item,
the SR Content Sequence included: the node only sends objects it wrote itself, whose content is
its own measurements, so the Clean Structured Content Option keeps it and cleans it the same way.
"""

from __future__ import annotations

import copy
import datetime
import json
import secrets
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import UID

PATIENT_CHARACTERISTICS = frozenset({"PatientSex", "PatientAge", "PatientSize", "PatientWeight",
                                     "EthnicGroup", "SmokingStatus", "PregnancyStatus",
                                     "PatientSexNeutered"})
# PS3.15 Table E.1-1, the attributes the rules by VR below do not cover. X remove, Z empty,
# D dummy value, P consistent pseudonym (the profile's D, kept in the mapping for re-identification).
ACTIONS: dict[str, str] = {
    "PatientName": "P", "PatientID": "P", "AccessionNumber": "P",
    "PatientBirthDate": "Z", "PatientSex": "Z", "StudyID": "Z", "ReferringPhysicianName": "Z",
    "ContentCreatorName": "Z",
    "ReferencedPerformedProcedureStepSequence": "Z",  # X/Z/D; Type 2 in the SR Document Series
    "ContentDescription": "Z",  # not in E.1-1, but free text (highdicom puts a UID in it)
    "DeviceSerialNumber": "D", "VerifyingObserverName": "D", "VerifyingOrganization": "D", "PersonName": "D",
    **dict.fromkeys((
        "PatientBirthTime", "PatientAge", "PatientSize", "PatientWeight", "EthnicGroup",
        "SmokingStatus", "PregnancyStatus", "PatientSexNeutered", "OtherPatientIDs",
        "OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
        "PatientAddress", "PatientTelephoneNumbers", "PatientComments", "IssuerOfPatientID",
        "IssuerOfPatientIDQualifiersSequence", "MilitaryRank", "BranchOfService",
        "MedicalRecordLocator", "CountryOfResidence", "RegionOfResidence", "PatientReligiousPreference",
        "PatientInsurancePlanCodeSequence", "PatientPrimaryLanguageCodeSequence", "Occupation",
        "AdditionalPatientHistory", "MedicalAlerts", "Allergies", "ResponsiblePerson",
        "ResponsibleOrganization", "PatientState", "ReferencedPatientSequence",
        "ReferencedPatientPhotoSequence", "LastMenstrualDate", "PatientTransportArrangements",
        "PersonAddress", "PersonTelephoneNumbers", "StudyDescription", "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers", "ReferringPhysicianIdentificationSequence",
        "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
        "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence",
        "RequestingPhysician", "RequestingService", "ConsultingPhysicianName",
        "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "AdmissionID",
        "IssuerOfAdmissionIDSequence", "ReasonForStudy", "RequestedProcedureDescription",
        "RequestedProcedureID", "RequestAttributesSequence", "ReferencedStudySequence",
        "ProcedureCodeSequence", "StudyComments", "IssuerOfAccessionNumberSequence",
        "SeriesDescription", "OperatorsName", "OperatorIdentificationSequence",
        "PerformingPhysicianName", "PerformingPhysicianIdentificationSequence",
        "PerformedProcedureStepDescription", "PerformedProcedureStepID",
        "ProtocolName", "ScheduledProcedureStepID",
        "ScheduledProcedureStepDescription", "ImageComments", "AcquisitionComments",
        "DerivationDescription", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
        "InstitutionCodeSequence", "StationName", "TimezoneOffsetFromUTC", "TextComments", "TextString",
        "DigitalSignaturesSequence", "OriginalAttributesSequence", "ModifiedAttributesSequence",
        "MACParametersSequence", "EncryptedAttributesSequence", "ReferencedDigitalSignatureSequence",
        "ReferencedSOPInstanceMACSequence", "ParticipantSequence", "PersonIdentificationCodeSequence",
        "ServiceEpisodeID", "ServiceEpisodeDescription", "IssuerOfServiceEpisodeIDSequence",
    ), "X"),
}
TAGS = {tag_for_keyword(k): (k, a) for k, a in ACTIONS.items()}
assert None not in TAGS, "an ACTIONS keyword pydicom does not know"
# UIDs that name a class, a syntax or a scheme rather than an instance: never replaced
KEPT_UID_KEYWORDS = frozenset({"TransferSyntaxUID", "CodingSchemeUID", "ContextUID", "MappingResourceUID",
                               "ContextGroupExtensionCreatorUID", "PrivateInformationCreatorUID"})
DUMMIES = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y", "IS": "0", "DS": "0"}
DUMMY_TEXT = "ANONYMIZED"
MARKS = ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
         "LongitudinalTemporalInformationModified")
CODES = {"basic": ("113100", "Basic Application Confidentiality Profile"),  # CID 7050
         "retain_longitudinal_dates": ("113107",
                                       "Retain Longitudinal Temporal Information Modified Dates Option"),
         "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
         "clean_structured_content": ("113104", "Clean Structured Content Option")}


class Mapping(Protocol):
    """Where pseudonyms live (node.store.DeidMapping): one per (kind, original), both ways."""

    def pseudonym(self, kind: str, original: str, new: Callable[[], str]) -> str: ...

    def original(self, kind: str, pseudonym: str) -> str | None: ...


@dataclass(frozen=True)
class Profile:
    retain_longitudinal_dates: bool = False
    retain_patient_characteristics: bool = False

    @classmethod
    def from_options(cls, options: Iterable[str]) -> Profile:
        chosen = set(options)
        return cls("retain_longitudinal_dates" in chosen, "retain_patient_characteristics" in chosen)


def new_uid() -> str:
    return f"2.25.{int.from_bytes(secrets.token_bytes(16), 'big')}"


def _code() -> str:
    return secrets.token_hex(6).upper()


def _is_kept_uid(keyword: str, value: str) -> bool:
    well_known = UID(value).name != value  # pydicom names the UIDs of its registry
    return well_known or keyword.endswith("ClassUID") or keyword in KEPT_UID_KEYWORDS


def _shift(value: str, vr: str, days: int) -> str:
    """A DA or DT value moved by whole days (the time part of a DT stays as it is)."""
    if len(value) < 8:
        return DUMMIES[vr]
    day = datetime.date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    moved = day + datetime.timedelta(days=days)
    return moved.strftime("%Y%m%d") + value[8:]


def _values(element: Any) -> list[str]:
    value = element.value
    if value is None or value == "":
        return []
    return [str(v) for v in value] if isinstance(value, pydicom.multival.MultiValue) else [str(value)]


def _set(element: Any, values: list[str]) -> None:
    element.value = values if len(values) > 1 else values[0] if values else ""


class _Deidentifier:
    def __init__(self, mapping: Mapping, profile: Profile, patient_id: str) -> None:
        self.mapping, self.profile, self.patient_id = mapping, profile, patient_id
        self.days = int(mapping.pseudonym("date_offset", patient_id,
                                          lambda: str(-secrets.randbelow(3285) - 365)))

    def dataset(self, ds: Dataset) -> None:
        for element in list(ds):
            if element.tag.is_private:
                del ds[element.tag]
                continue
            keyword = element.keyword
            action = TAGS.get(element.tag, (keyword, None))[1]
            if action and keyword in PATIENT_CHARACTERISTICS and self.profile.retain_patient_characteristics:
                action = "K"
            if action == "X":
                del ds[element.tag]
            elif action == "Z":
                element.value = [] if element.VR == "SQ" else ""
            elif action == "D":
                if _values(element):
                    element.value = DUMMIES.get(element.VR, DUMMY_TEXT)
            elif action == "P":
                element.value = self.pseudonym(keyword, str(element.value or ""))
            elif action == "K":
                continue
            elif element.VR == "SQ":
                for item in element.value:
                    self.dataset(item)
            elif element.VR == "UI":
                _set(element, [v if _is_kept_uid(keyword, v) else
                               self.mapping.pseudonym("uid", v, new_uid) for v in _values(element)])
            elif element.VR in ("DA", "DT"):
                shifted = self.profile.retain_longitudinal_dates
                _set(element, [_shift(v, element.VR, self.days) if shifted else DUMMIES[element.VR]
                               for v in _values(element)])
            elif element.VR == "TM" and not self.profile.retain_longitudinal_dates:
                _set(element, [DUMMIES["TM"] for _ in _values(element)])
            elif element.VR == "PN" and _values(element):
                element.value = DUMMY_TEXT

    def pseudonym(self, keyword: str, value: str) -> str:
        if keyword == "PatientID":
            return patient_pseudonym(self.mapping, value)
        if keyword == "PatientName":
            return self.mapping.pseudonym("patient_name", json.dumps([self.patient_id, value]),
                                          lambda: f"ANON^{_code()}")
        if not value:  # no accession number: nothing to hide
            return value
        return self.mapping.pseudonym("accession", value, _code)


def patient_pseudonym(mapping: Mapping, patient_id: str) -> str:
    """The consistent pseudonym of a Patient ID (what the history and the case library key on)."""
    return mapping.pseudonym("patient_id", patient_id, lambda: f"VES{_code()}")


def deidentify(datasets: Sequence[Dataset], mapping: Mapping,
               options: Iterable[str] = ()) -> list[Dataset]:
    """De-identified copies of ``datasets`` (file meta included); the originals stay untouched."""
    profile = Profile.from_options(options)
    out = []
    for original in datasets:
        ds = copy.deepcopy(original)
        worker = _Deidentifier(mapping, profile, str(ds.get("PatientID", "") or ""))
        worker.dataset(ds)
        if hasattr(ds, "file_meta"):
            worker.dataset(ds.file_meta)
        _mark(ds, profile)
        out.append(ds)
    return out


def _mark(ds: Dataset, profile: Profile) -> None:
    """Say what was done (PS3.15 E.1.1): Patient Identity Removed and the method's codes."""
    options = ("retain_longitudinal_dates", "retain_patient_characteristics")
    chosen = ["basic", "clean_structured_content"] + [name for name in options if getattr(profile, name)]
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "PS3.15 Basic Application Level Confidentiality Profile"
    items = []
    for name in chosen:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = CODES[name][0], "DCM", CODES[name][1]
        items.append(item)
    ds.DeidentificationMethodCodeSequence = items
    shifted = profile.retain_longitudinal_dates
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if shifted else "REMOVED"


def reidentify(ds: Dataset, mapping: Mapping) -> Dataset:
    """A copy of a de-identified object (ours coming back, or one a research site derived from it)
    with the original UIDs, patient identity, accession number and (shifted) dates restored.
    What the profile removed or replaced with dummies cannot come back; unknown UIDs stay."""
    out = copy.deepcopy(ds)
    pseudo_id = str(out.get("PatientID", "") or "")
    patient_id = mapping.original("patient_id", pseudo_id)
    shifted = out.get("LongitudinalTemporalInformationModified") == "MODIFIED" and patient_id is not None
    days = int(mapping.pseudonym("date_offset", patient_id, lambda: "0")) if shifted and patient_id else 0

    def restore(item: Dataset) -> None:
        for element in item:
            if element.VR == "SQ":
                for child in element.value:
                    restore(child)
            elif element.VR == "UI":
                _set(element, [mapping.original("uid", v) or v for v in _values(element)])
            elif element.keyword == "PatientID" and patient_id is not None:
                element.value = patient_id
            elif element.keyword == "PatientName":
                found = mapping.original("patient_name", str(element.value or ""))
                element.value = json.loads(found)[1] if found else element.value
            elif element.keyword == "AccessionNumber" and element.value:
                element.value = mapping.original("accession", str(element.value)) or element.value
            elif days and element.VR in ("DA", "DT"):
                _set(element, [_shift(v, element.VR, -days) for v in _values(element)])

    restore(out)
    if hasattr(out, "file_meta"):
        restore(out.file_meta)
    for keyword in MARKS:
        if keyword in out:
            delattr(out, keyword)
    return out


@contextmanager
def deidentified_files(store: Any, profile: str, options: Sequence[str],
                       files: Sequence[Path]) -> Iterator[list[Path]]:
    """The files a destination receives: as they are, or (``profile`` "basic") de-identified
    copies in a temporary folder of the data folder, removed after the delivery."""
    if not profile:
        yield list(files)
        return
    from vesalius.node.store import deid_mapping

    originals = [pydicom.dcmread(f) for f in files]
    with deid_mapping(store) as mapping:
        datasets = deidentify(originals, mapping, options)
    with tempfile.TemporaryDirectory(dir=store.data_dir, prefix=".deid-") as tmp:
        paths = []
        for n, ds in enumerate(datasets):
            path = Path(tmp) / f"{n:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        yield paths
