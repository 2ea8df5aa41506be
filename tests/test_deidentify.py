"""De-identification per destination: every element of every object we send is checked against
the PS3.15 Basic profile, pseudonyms are consistent across the objects of a study and across two
jobs of one patient, references still resolve, dciodvfy stays clean, ``reidentify`` restores the
originals, and a real delivery sends de-identified copies to one destination and the originals to
another.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from tests.conftest import free_port
from tests.dicom_checks import assert_dciodvfy_clean
from tests.peers import storescp, storescu, vesalius_node, wait_for
from tests.phantoms import Cylinder, write_phantom_series
from vesalius.node.deidentify import (
    ACTIONS,
    DUMMIES,
    DUMMY_TEXT,
    PATIENT_CHARACTERISTICS,
    deidentify,
    reidentify,
)
from vesalius.node.destinations.dicom import DicomDestination as Destination
from vesalius.node.pipeline import run_pipeline
from vesalius.node.send import files_for
from vesalius.node.store import Store, deid_mapping

CHEST = [Cylinder((0, 0, 0), (0, 0, 1), 70, 80, 40), Cylinder((0, 40, 0), (0, 0, 1), 10, 60, 700)]
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "MRN-555-0123", "PatientBirthDate": "19610203",
           "ReferringPhysicianName": "House^Gregory", "InstitutionName": "St Elsewhere Hospital"}
ACCESSIONS = ("ACC-98765", "ACC-22222")
SECRETS = [*PATIENT.values(), *ACCESSIONS, "20260101", "OTHER-ID-777", "PRIVATE-SECRET", "NESTED-SECRET"]
EVERYTHING = Destination(name="x", ae_title="X", host="", port=0, labelmap=True, encapsulated_stl=True)


def _job(tmp: Path, name: str, accession: str) -> list[Path]:
    """One series of the patient through the real pipeline; the files a destination receives."""
    series = write_phantom_series(tmp / name, shape=(24, 80, 80), spacing=(3, 2, 2), objects=CHEST)
    for path in series.paths:
        ds = pydicom.dcmread(path)
        for keyword, value in PATIENT.items():
            setattr(ds, keyword, value)
        ds.AccessionNumber = accession
        ds.save_as(path)
    out = tmp / f"{name}-results"
    run_pipeline(series.paths, out, "builtin_ct")
    return files_for(EVERYTHING, out)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Dataset], list[Dataset]]:
    """Two jobs of one patient (two studies), with PHI planted where a profile must find it."""
    tmp = tmp_path_factory.mktemp("deid")
    found = []
    for name, accession in zip(("a", "b"), ACCESSIONS, strict=True):
        datasets = [pydicom.dcmread(p) for p in _job(tmp, name, accession)]
        for ds in datasets:
            ds.OtherPatientIDs = "OTHER-ID-777"
            ds.private_block(0x0011, "ACME SITE", create=True).add_new(0x01, "LO", "PRIVATE-SECRET")
            nested = ds.ReferencedSeriesSequence[0] if "ReferencedSeriesSequence" in ds else \
                ds.CurrentRequestedProcedureEvidenceSequence[0]
            nested.private_block(0x0013, "ACME NESTED", create=True).add_new(0x02, "LO", "NESTED-SECRET")
        found.append(datasets)
    assert {len(found[0]), len(found[1])} == {len(found[0])} and len(found[0]) >= 5  # SEGs, surfaces, SR, STL
    return found[0], found[1]


@pytest.fixture
def store(database_url: str, tmp_path: Path) -> Store:
    """The pseudonym table on SQLite and on PostgreSQL."""
    return Store(tmp_path / "node", database_url)


def _walk(ds: Dataset, path: tuple = ()) -> Iterator[tuple[tuple, pydicom.DataElement]]:
    for element in ds:
        yield (*path, element.tag), element
        if element.VR == "SQ":
            for n, item in enumerate(element.value):
                yield from _walk(item, (*path, element.tag, n))


def _at(ds: Dataset, path: tuple) -> pydicom.DataElement | None:
    """The element at ``path`` in ``ds``, or None when it (or a sequence above it) is not there."""
    node: object = ds
    for step in path[:-1]:
        if type(step) is int:  # an item index (a tag is an int too)
            node = node[step] if step < len(node) else None  # type: ignore[index, arg-type]
        else:
            node = node[step].value if step in node else None  # type: ignore[operator, index]
        if node is None:
            return None
    return node[path[-1]] if path[-1] in node else None  # type: ignore[operator, index]


def _uid_kept(element: pydicom.DataElement) -> bool:
    value = pydicom.uid.UID(str(element.value))
    return value.name != str(value) or element.keyword.endswith("ClassUID") or element.keyword in (
        "TransferSyntaxUID", "CodingSchemeUID", "ContextUID", "MappingResourceUID")


def _serialized(ds: Dataset, tmp: Path) -> bytes:
    path = tmp / "check.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def test_every_element_follows_the_profile(jobs, store: Store, tmp_path: Path) -> None:
    originals = jobs[0]
    with deid_mapping(store) as mapping:
        sent = deidentify(originals, mapping)
    uids = {}
    for original, ds in zip(originals, sent, strict=True):
        assert original.PatientName == PATIENT["PatientName"]  # the originals are left as they were
        for path, element in _walk(original):
            after = _at(ds, path)
            action = ACTIONS.get(element.keyword)
            if element.tag.is_private or action == "X":
                assert after is None, f"{element.keyword or element.tag} survived"
            elif after is None:
                parents = [path[:n] for n in range(1, len(path)) if type(path[n - 1]) is not int]
                assert any(_at(ds, p) is None for p in parents), f"{element.keyword} vanished"
            elif action == "Z":
                assert after.value in ("", None, []), f"{element.keyword} not emptied"
            elif element.VR == "UI":
                if _uid_kept(element):
                    assert after.value == element.value
                else:
                    assert after.value != element.value and str(after.value).startswith("2.25.")
                    assert uids.setdefault(str(element.value), str(after.value)) == str(after.value)
            elif element.VR in ("DA", "DT", "TM") and element.value:
                assert after.value == DUMMIES[element.VR], f"{element.keyword} kept its {element.VR}"
            elif element.VR == "PN" and element.value:
                assert element.keyword == "PatientName" or after.value == DUMMY_TEXT
        for _, element in _walk(ds):
            assert not element.tag.is_private
            assert element.keyword not in {k for k, a in ACTIONS.items() if a == "X"}
        assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "REMOVED"
        assert ds.PatientName != PATIENT["PatientName"] and ds.PatientID.startswith("VES")
        assert ds.PatientBirthDate == "" and "PatientSex" in ds and ds.PatientSex == ""
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        data = _serialized(ds, tmp_path)
        for secret in [*SECRETS, *(u for u in uids)]:
            assert secret.encode() not in data, f"{secret!r} is in the de-identified bytes"
    assert len({ds.StudyInstanceUID for ds in sent}) == 1 and len({ds.PatientID for ds in sent}) == 1
    assert len({ds.AccessionNumber for ds in sent}) == 1 and sent[0].AccessionNumber != ACCESSIONS[0]


def test_references_resolve_consistently_across_jobs_and_dciodvfy_is_clean(jobs, store: Store) -> None:
    options = ["retain_longitudinal_dates", "retain_patient_characteristics"]
    with deid_mapping(store) as mapping:
        first = deidentify(jobs[0], mapping, options)
    with deid_mapping(store) as mapping:  # a later delivery: the same table, no new pseudonyms
        second = deidentify(jobs[1], mapping, options)
        again = deidentify(jobs[0][:1], mapping, options)
    assert again[0].SOPInstanceUID == first[0].SOPInstanceUID
    assert {ds.PatientID for ds in first + second} == {first[0].PatientID}
    assert {str(ds.PatientName) for ds in first + second} == {str(first[0].PatientName)}
    assert first[0].StudyInstanceUID != second[0].StudyInstanceUID
    assert first[0].AccessionNumber != second[0].AccessionNumber
    assert first[0].PatientSex == jobs[0][0].PatientSex  # retained characteristic
    assert PATIENT_CHARACTERISTICS >= {"PatientSex"}
    for deid, originals in ((first, jobs[0]), (second, jobs[1])):
        by_class = {ds.SOPClassUID.name: ds for ds in deid}
        seg = by_class["Segmentation Storage"]
        sr, surfaces = by_class["Comprehensive 3D SR Storage"], by_class["Surface Segmentation Storage"]
        source_series = originals[0].ReferencedSeriesSequence[0].SeriesInstanceUID
        with deid_mapping(store) as mapping:
            pseudo_source = mapping.original("uid", seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
        assert pseudo_source == source_series  # the SEG references the pseudonymised source series
        referenced = {str(e.value) for ds in (sr, surfaces) for _, e in _walk(ds) if e.VR == "UI"}
        assert str(seg.SOPInstanceUID) in referenced - {str(sr.SOPInstanceUID)}  # SR -> SEG
        assert str(seg.SOPInstanceUID) in {str(e.value) for _, e in _walk(surfaces) if e.VR == "UI"}
        assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) in referenced  # -> source
        assert len({str(ds.FrameOfReferenceUID) for ds in deid if "FrameOfReferenceUID" in ds}) == 1
        shift = {_days(o.StudyDate, d.StudyDate) for o, d in zip(originals, deid, strict=True)}
        assert len(shift) == 1 and shift != {0}  # one offset for the patient, not zero
        assert deid[0].LongitudinalTemporalInformationModified == "MODIFIED"
        for ds in deid:
            assert_dciodvfy_clean(ds)
    assert _days(jobs[0][0].StudyDate, first[0].StudyDate) == _days(jobs[1][0].StudyDate, second[0].StudyDate)


def _days(before: str, after: str) -> int:
    import datetime

    def day(v: str) -> datetime.date:
        return datetime.date(int(v[:4]), int(v[4:6]), int(v[6:8]))

    return (day(after) - day(before)).days


def test_reidentify_round_trips(jobs, store: Store) -> None:
    with deid_mapping(store) as mapping:
        sent = deidentify(jobs[0], mapping, ["retain_longitudinal_dates"])
    for original, ds in zip(jobs[0], sent, strict=True):
        with deid_mapping(store) as mapping:
            back = reidentify(ds, mapping)
        assert back.PatientName == PATIENT["PatientName"] and back.PatientID == PATIENT["PatientID"]
        assert back.AccessionNumber == ACCESSIONS[0] and back.StudyDate == original.StudyDate
        assert "PatientIdentityRemoved" not in back
        for path, element in _walk(back):
            before = _at(original, path)
            assert before is not None, f"{element.keyword} appeared"
            if ACTIONS.get(element.keyword) in ("Z", "D"):
                continue  # emptied or dummied for good (the birth date, ...)
            if element.VR in ("UI", "DA", "DT") or element.keyword in ("PatientID", "PatientName"):
                assert before.value == element.value, f"{element.keyword} not restored"
        assert back.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID


def test_delivery_deidentified_to_research_originals_to_pacs(tmp_path: Path) -> None:
    series = write_phantom_series(tmp_path / "ct", shape=(24, 80, 80), spacing=(3, 2, 2), objects=CHEST)
    research_port, pacs_port = free_port(), free_port()
    config = (f'[[destinations]]\nname = "research"\nae_title = "RESEARCH"\nhost = "127.0.0.1"\n'
              f'port = {research_port}\ndeidentify = "basic"\n'
              f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n')
    with storescp(tmp_path / "research", "RESEARCH", research_port) as research, \
            storescp(tmp_path / "pacs", "PACS", pacs_port) as pacs, \
            vesalius_node(tmp_path, config=config) as node:
        storescu(series.paths, node.port)
        wait_for(lambda: node.delivered(2), 180, "both deliveries")
        assert not list(node.data_dir.glob(".deid-*"))  # the de-identified copies are gone
    received = [pydicom.dcmread(p) for p in research.files()]
    originals = [pydicom.dcmread(p) for p in pacs.files()]
    assert len(received) == len(originals) == 4  # SEG, Surface Segmentation, SR, 3D preview
    assert {ds.PatientID for ds in originals} == {"PHANTOM1"}
    assert {ds.StudyInstanceUID for ds in originals} == {series.study_uid}
    for ds in received:
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientID.startswith("VES")
        assert ds.StudyInstanceUID != series.study_uid and ds.AccessionNumber not in ("", "ACC0001")
    assert {ds.SOPInstanceUID for ds in received}.isdisjoint({ds.SOPInstanceUID for ds in originals})
    store = Store(node.data_dir)
    with deid_mapping(store) as mapping:
        assert {str(reidentify(ds, mapping).SOPInstanceUID) for ds in received} == \
            {str(ds.SOPInstanceUID) for ds in originals}


def test_deidentify_config_is_validated() -> None:
    from vesalius.node.config import ConfigError, parse_config

    base = {"name": "r", "ae_title": "R", "host": "127.0.0.1", "port": 104}
    config = parse_config({"destinations": [{**base, "deidentify": "basic",
                                              "deidentify_options": ["retain_longitudinal_dates"]}]})
    assert config.destinations[0].deidentify_options == ("retain_longitudinal_dates",)
    for bad, words in (({"deidentify": "full"}, "deidentify: expected \"basic\""),
                       ({"deidentify": "basic", "deidentify_options": ["keep_names"]}, "unknown option"),
                       ({"deidentify_options": ["retain_longitudinal_dates"]}, "only with deidentify")):
        with pytest.raises(ConfigError, match=words):
            parse_config({"destinations": [{**base, **bad}]})
