"""Encapsulated STL: valid (dciodvfy), in patient mm, and the same mesh as the Surface Segmentation
when read back by an independent STL reader (numpy-stl); plain .stl files likewise."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from stl import mesh as numpy_stl

from tests.dicom_checks import assert_dciodvfy_clean
from tests.dicom_out_inputs import LABELS, phantom_volume
from tests.object_checks import encapsulated_stl_problems
from vesalius.dicom_out.encapsulated_stl import (
    ENCAPSULATED_STL_STORAGE,
    build_encapsulated_stl,
    build_encapsulated_stls,
)
from vesalius.dicom_out.identity import MANUFACTURER, Algorithm, derived_uid
from vesalius.dicom_out.seg import build_seg
from vesalius.dicom_out.stl import write_stl
from vesalius.dicom_out.surface_segmentation import build_surface_segmentation
from vesalius.inference.surfaces import build_meshes
from vesalius.inference.terminology import term_for

ALGORITHM = Algorithm("builtin_ct", "1")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory):
    volume, label_map = phantom_volume(tmp_path_factory.mktemp("phantom"), orientation="oblique")
    meshes = build_meshes(label_map, volume.affine, LABELS)
    seg = build_seg(volume, label_map, LABELS, ALGORITHM)
    surfaces = build_surface_segmentation(volume, meshes, ALGORITHM, seg)
    return volume, meshes, seg, surfaces


def _surface_triangles(surfaces: pydicom.Dataset, number: int) -> np.ndarray:
    """(M, 3, 3) triangle corners of one surface, decoded from the Surface Segmentation."""
    surface = surfaces.SurfaceSequence[number - 1]
    points = np.frombuffer(surface.SurfacePointsSequence[0].PointCoordinatesData, "<f4")
    indices = np.frombuffer(surface.SurfaceMeshPrimitivesSequence[0].LongTrianglePointIndexList,
                            "<u4").astype(np.int64) - 1
    return points.reshape(-1, 3)[indices.reshape(-1, 3)]


def _read_stl(data: bytes) -> numpy_stl.Mesh:
    return numpy_stl.Mesh.from_file("model.stl", fh=io.BytesIO(data))


def test_one_valid_instance_per_structure_each_the_surface_mesh(inputs, tmp_path: Path) -> None:
    volume, meshes, seg, surfaces = inputs
    objects = build_encapsulated_stls(volume, meshes, ALGORITHM, seg=seg)
    assert len(objects) == len(meshes) == 4
    for number, (ds, mesh) in enumerate(zip(objects, meshes, strict=True), start=1):
        path = tmp_path / f"stl{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert_dciodvfy_clean(path)
        read = pydicom.dcmread(path)
        assert encapsulated_stl_problems(read) == []
        assert read.SOPClassUID == ENCAPSULATED_STL_STORAGE
        assert read.InstanceNumber == number
        stl = _read_stl(bytes(read.EncapsulatedDocument)[: read.EncapsulatedDocumentLength])
        # the exact float32 LPS millimetre corners of the Surface Segmentation's triangles
        np.testing.assert_array_equal(stl.vectors, _surface_triangles(surfaces, number))
        assert stl.is_closed()
        volume_mm3, _, _ = stl.get_mass_properties()
        assert volume_mm3 == pytest.approx(mesh.volume_mm3, rel=1e-5)
        assert term_for(mesh.label.name).label in read.DocumentTitle


def test_in_the_source_study_frame_and_series_with_derived_uids(inputs) -> None:
    volume, meshes, seg, _ = inputs
    objects = build_encapsulated_stls(volume, meshes, ALGORITHM, seg=seg)
    again = build_encapsulated_stls(volume, meshes, ALGORITHM, seg=seg)
    source = volume.sources[0]
    assert len({ds.SOPInstanceUID for ds in objects}) == len(objects)
    for ds, same in zip(objects, again, strict=True):
        assert ds.SOPInstanceUID == same.SOPInstanceUID  # a re-run replaces
        assert ds.StudyInstanceUID == volume.study_uid
        assert (ds.PatientID, ds.PatientName) == (source.PatientID, source.PatientName)
        assert ds.FrameOfReferenceUID == volume.frame_of_reference_uid
        assert ds.SeriesInstanceUID == derived_uid(volume.series_uid, ALGORITHM, "stl/series")
        assert ds.Modality == "M3D" and ds.Manufacturer == MANUFACTURER
        assert ds.MeasurementUnitsCodeSequence[0].CodeValue == "mm"
        assert ds.ModelGroupUID == objects[0].ModelGroupUID
        sources = {item.ReferencedSOPInstanceUID for item in ds.SourceInstanceSequence}
        assert sources == {s.SOPInstanceUID for s in volume.sources} | {seg.SOPInstanceUID}


def test_selected_structures_keep_their_instance_numbers(inputs) -> None:
    volume, meshes, _, _ = inputs
    chosen = build_encapsulated_stls(volume, meshes, ALGORITHM, names=["bone", "lung_left"])
    assert [(ds.InstanceNumber, ds.DocumentTitle.split(" (")[0]) for ds in chosen] == [
        (2, "Left lung"), (4, "Bone")]
    with pytest.raises(ValueError, match="spleen"):
        build_encapsulated_stls(volume, meshes, ALGORITHM, names=["spleen"])


def test_refuses_a_seg_of_another_study_and_an_empty_mesh(inputs) -> None:
    volume, meshes, seg, _ = inputs
    other = pydicom.Dataset()
    other.StudyInstanceUID = "1.2.3"
    with pytest.raises(ValueError, match="another study"):
        build_encapsulated_stl(volume, meshes[0], ALGORITHM, seg=other)
    empty = type(meshes[0])(meshes[0].label, meshes[0].points[:0], meshes[0].normals[:0],
                            meshes[0].triangles[:0], True, True)
    with pytest.raises(ValueError, match="empty"):
        build_encapsulated_stl(volume, empty, ALGORITHM)


def test_plain_stl_files_read_back_as_the_surface_meshes(inputs, tmp_path: Path) -> None:
    _, meshes, _, surfaces = inputs
    for number, mesh in enumerate(meshes, start=1):
        path = write_stl(mesh, tmp_path / f"{mesh.label.name}.stl")
        stl = numpy_stl.Mesh.from_file(str(path))
        np.testing.assert_array_equal(stl.vectors, _surface_triangles(surfaces, number))
        # facet normals point outward: the signed volume they enclose is positive
        assert stl.get_mass_properties()[0] > 0
