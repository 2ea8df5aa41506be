"""Every object we write, for every model and every writer option, passes dciodvfy with no Error
line and our own checks of what dciodvfy does not verify (tests/object_checks.py).

Models: builtin_ct as it runs (its own prediction) and TotalSegmentator's ``total`` labels (its
reference segmentation of the same CT), both on TotalSegmentator's real example CT written as a
DICOM series. Options: BINARY and LABELMAP SEG, with the surfaces and SR built on each, and the
Encapsulated STL of every structure.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.dicom_checks import dciodvfy_errors
from tests.object_checks import (
    encapsulated_stl_problems,
    seg_problems,
    sr_problems,
    surface_segmentation_problems,
)
from tests.realdata import nifti_labels_in_volume_space, write_nifti_as_dicom_series
from vesalius.dicom_out.encapsulated_stl import build_encapsulated_stls
from vesalius.dicom_out.identity import Algorithm
from vesalius.dicom_out.seg import BINARY, LABELMAP, build_seg
from vesalius.dicom_out.sr import build_sr
from vesalius.dicom_out.surface_segmentation import build_surface_segmentation
from vesalius.inference.measures import measure
from vesalius.inference.models import Label
from vesalius.inference.models.registry import resolve
from vesalius.inference.series import load_series
from vesalius.inference.surfaces import build_meshes
from vesalius.inference.terminology import TOTAL_CLASSES

MODELS = ("builtin_ct", "totalsegmentator_total")
STLS_VALIDATED = 3  # dciodvfy on the first few STL instances; our checks on all of them


def _objects(volume, label_map, structures, algorithm, out: Path, stl_names=None) -> dict:
    meshes = build_meshes(label_map, volume.affine, structures, max_triangles=20_000)
    measurements = measure(volume, label_map, structures, meshes)
    objects: dict[str, object] = {"sources": volume.sources}
    for kind in (BINARY, LABELMAP):
        seg = build_seg(volume, label_map, structures, algorithm, segmentation_type=kind)
        objects[("seg", kind)] = seg
        objects[("surfaces", kind)] = build_surface_segmentation(volume, meshes, algorithm, seg)
    objects[("sr", BINARY)] = build_sr(volume, objects[("seg", BINARY)], measurements, algorithm)
    objects["stl"] = build_encapsulated_stls(volume, meshes, algorithm, names=stl_names,
                                             seg=objects[("seg", BINARY)])
    paths = {}
    for key, ds in objects.items():
        if isinstance(key, tuple):
            path = out / f"{key[0]}-{key[1]}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths[key] = path
    for number, ds in enumerate(objects["stl"][:STLS_VALIDATED]):
        path = out / f"stl-{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths[("stl", number)] = path
    objects["paths"] = paths
    objects["structures"] = len(meshes)
    return objects


@pytest.fixture(scope="module")
def written(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    data = shared_data / "totalseg-examples"
    work = tmp_path_factory.mktemp("conformance")
    volume = load_series(write_nifti_as_dicom_series(data / "example_ct_sm.nii.gz", work / "ct"))
    model = resolve("builtin_ct")
    builtin = _objects(volume, model.predict(volume), model.structures,
                       Algorithm(model.name, model.version), work)
    total_dir = work / "total"
    total_dir.mkdir()
    total_labels = nifti_labels_in_volume_space(data / "example_seg.nii.gz", volume)
    total_defs = tuple(Label(value, name) for value, name in enumerate(TOTAL_CLASSES, start=1))
    total = _objects(volume, total_labels.astype(np.uint8), total_defs,
                     Algorithm("totalsegmentator_total", "2"), total_dir,
                     stl_names=("liver", "vertebrae_L1", "rib_left_10", "kidney_left"))
    return {"builtin_ct": builtin, "totalsegmentator_total": total}


OBJECTS = [("seg", BINARY), ("seg", LABELMAP), ("surfaces", BINARY), ("surfaces", LABELMAP),
           ("sr", BINARY)]


@pytest.mark.parametrize("obj", OBJECTS, ids=["-".join(o) for o in OBJECTS])
@pytest.mark.parametrize("model", MODELS)
def test_dciodvfy_finds_no_error(written, model: str, obj: tuple[str, str]) -> None:
    errors = dciodvfy_errors(written[model]["paths"][obj])
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("model", MODELS)
def test_encapsulated_stls_pass_dciodvfy_and_our_checks(written, model: str) -> None:
    objects = written[model]
    assert len(objects["stl"]) >= 3
    if model == "builtin_ct":  # every structure; TotalSegmentator's: the selected ones
        assert len(objects["stl"]) == objects["structures"]
    for number in range(STLS_VALIDATED):
        errors = dciodvfy_errors(objects["paths"][("stl", number)])
        assert not errors, "\n".join(errors)
    for ds in objects["stl"]:
        assert encapsulated_stl_problems(ds) == []


@pytest.mark.parametrize("segmentation_type", [BINARY, LABELMAP])
@pytest.mark.parametrize("model", MODELS)
def test_our_checks_find_nothing(written, model: str, segmentation_type: str) -> None:
    objects = written[model]
    seg = objects[("seg", segmentation_type)]
    assert seg_problems(seg, objects["sources"]) == []
    assert surface_segmentation_problems(objects[("surfaces", segmentation_type)]) == []
    assert sr_problems(objects[("sr", BINARY)], objects[("seg", BINARY)]) == []
    # every frame of every segment is kept (known viewer issue with omitted frames)
    frames = len(objects["sources"])
    expected = frames * objects["structures"] if segmentation_type == BINARY else frames
    assert seg.NumberOfFrames == expected


def test_the_sr_references_the_binary_seg_only(written) -> None:
    """dciodvfy rejects Referenced Segment Number on a Label Map SEG: the SR never does that."""
    from vesalius.dicom_out.sr import build_sr as build

    objects = written["builtin_ct"]
    with pytest.raises(ValueError, match="BINARY"):
        build(None, objects[("seg", LABELMAP)], [], None)  # type: ignore[arg-type]


def test_the_totalsegmentator_objects_carry_many_structures(written) -> None:
    total = written["totalsegmentator_total"]
    assert total["structures"] >= 30
    seg = total[("seg", LABELMAP)]
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    described = [item for item in seg.SegmentSequence if item.SegmentNumber != 0]  # background
    assert len(described) == total["structures"]


# -- the checks can fail: each catches the defect it is there for -------------------------------

def test_surface_checks_catch_bad_indices_counts_and_numbering(written) -> None:
    good = written["builtin_ct"][("surfaces", BINARY)]
    bad = copy.deepcopy(good)
    primitives = bad.SurfaceSequence[0].SurfaceMeshPrimitivesSequence[0]
    indices = np.frombuffer(primitives.LongTrianglePointIndexList, "<u4").copy()
    indices[5] = bad.SurfaceSequence[0].SurfacePointsSequence[0].NumberOfSurfacePoints + 1
    primitives.LongTrianglePointIndexList = indices.tobytes()
    assert any("outside 1.." in p for p in surface_segmentation_problems(bad))

    bad = copy.deepcopy(good)
    indices = np.frombuffer(
        bad.SurfaceSequence[0].SurfaceMeshPrimitivesSequence[0].LongTrianglePointIndexList, "<u4")
    bad.SurfaceSequence[0].SurfaceMeshPrimitivesSequence[0].LongTrianglePointIndexList = \
        indices[:-3].tobytes()  # drop a triangle: a hole
    assert any("Finite Volume YES" in p for p in surface_segmentation_problems(bad))

    bad = copy.deepcopy(good)
    bad.SegmentSequence[0].SurfaceCount = 2
    bad.NumberOfSurfaces = len(bad.SurfaceSequence) + 1
    bad.SegmentSequence[-1].SegmentNumber = 1
    problems = " ".join(surface_segmentation_problems(bad))
    assert "SurfaceCount" in problems and "NumberOfSurfaces" in problems
    assert "SegmentNumbers" in problems


def test_seg_checks_catch_misplaced_frames_and_retired_codes(written) -> None:
    objects = written["builtin_ct"]
    bad = copy.deepcopy(objects[("seg", BINARY)])
    position = bad.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence[0]
    position.ImagePositionPatient = [float(v) + 0.5 for v in position.ImagePositionPatient]
    bad.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator = "SRT"
    problems = " ".join(seg_problems(bad, objects["sources"]))
    assert "frame 4: position" in problems and "SNOMED-RT" in problems


def test_sr_checks_catch_a_broken_tree_and_a_foreign_seg(written) -> None:
    objects = written["builtin_ct"]
    sr = objects[("sr", BINARY)]
    assert any("another SEG" in p for p in sr_problems(sr, objects[("seg", LABELMAP)]))
    bad = copy.deepcopy(sr)
    measurements = next(c for c in bad.ContentSequence
                        if c.ConceptNameCodeSequence[0].CodeValue == "126010")
    group = measurements.ContentSequence[0]
    group.ContentSequence = [c for c in group.ContentSequence
                             if c.ConceptNameCodeSequence[0].CodeValue != "112040"]
    assert any("Tracking UID" in p for p in sr_problems(bad))


def test_stl_checks_catch_a_wrong_length_and_units(written) -> None:
    good = written["builtin_ct"]["stl"][0]
    bad = copy.deepcopy(good)
    bad.EncapsulatedDocumentLength = int(good.EncapsulatedDocumentLength) - 50
    bad.MeasurementUnitsCodeSequence[0].CodeValue = "cm"
    problems = " ".join(encapsulated_stl_problems(bad))
    assert "Length" in problems and "mm" in problems


def test_a_written_file_reads_back_as_checked(written, tmp_path: Path) -> None:
    """The checks work on files read from disk too (OL/OF values as bytes)."""
    path = written["totalsegmentator_total"]["paths"][("surfaces", LABELMAP)]
    assert surface_segmentation_problems(pydicom.dcmread(path)) == []
