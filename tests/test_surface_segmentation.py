"""Surface Segmentation: valid (dciodvfy), exact round trip of points, normals and 1-based indices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.dicom_checks import assert_dciodvfy_clean
from tests.dicom_out_inputs import (
    BONE,
    LABELS,
    LUNG_LEFT,
    LUNG_RIGHT,
    phantom_volume,
    sphere_mesh,
)
from vesalius.dicom_out.identity import MANUFACTURER, SOFTWARE_VERSION, Algorithm, derived_uid
from vesalius.dicom_out.seg import build_seg
from vesalius.dicom_out.surface_segmentation import (
    SURFACE_SEGMENTATION_STORAGE,
    build_surface_segmentation,
)
from vesalius.inference.surfaces import Mesh
from vesalius.inference.terminology import term_for
from vesalius.inference.volume import Volume

ALGORITHM = Algorithm("builtin_ct", "1")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory):
    volume, label_map = phantom_volume(tmp_path_factory.mktemp("phantom"))
    seg = build_seg(volume, label_map, LABELS, ALGORITHM)
    meshes = [
        sphere_mesh(LUNG_LEFT, (10.0, 0.0, 0.0), 7.0),
        sphere_mesh(LUNG_RIGHT, (-10.0, 0.0, 0.0), 7.0, closed=False),
        sphere_mesh(BONE, (0.0, 12.0, 0.0), 3.0, resolution=8),
    ]
    return volume, seg, meshes


@pytest.fixture(scope="module")
def written(inputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    volume, seg, meshes = inputs
    path = tmp_path_factory.mktemp("surfaces") / "surfaces.dcm"
    build_surface_segmentation(volume, meshes, ALGORITHM, seg).save_as(path,
                                                                      enforce_file_format=True)
    return path


def read_mesh(surface: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    points = np.frombuffer(surface.SurfacePointsSequence[0].PointCoordinatesData, "<f4")
    normals = np.frombuffer(surface.SurfacePointsNormalsSequence[0].VectorCoordinateData, "<f4")
    indices = np.frombuffer(
        surface.SurfaceMeshPrimitivesSequence[0].LongTrianglePointIndexList, "<u4")
    return points.reshape(-1, 3), normals.reshape(-1, 3), indices.reshape(-1, 3)


def test_surface_segmentation_passes_dciodvfy(written: Path) -> None:
    assert_dciodvfy_clean(written)


def test_points_normals_and_triangles_round_trip_exactly(inputs, written: Path) -> None:
    _, _, meshes = inputs
    ds = pydicom.dcmread(written)
    assert ds.SOPClassUID == SURFACE_SEGMENTATION_STORAGE
    assert ds.NumberOfSurfaces == len(ds.SurfaceSequence) == len(meshes)
    for number, (surface, mesh) in enumerate(zip(ds.SurfaceSequence, meshes, strict=True), 1):
        assert surface.SurfaceNumber == number
        points, normals, indices = read_mesh(surface)
        n = len(mesh.points)
        assert surface.SurfacePointsSequence[0].NumberOfSurfacePoints == n
        normals_item = surface.SurfacePointsNormalsSequence[0]
        assert (normals_item.NumberOfVectors, normals_item.VectorDimensionality) == (n, 3)
        np.testing.assert_array_equal(points, mesh.points)
        np.testing.assert_array_equal(normals, mesh.normals)
        assert indices.min() >= 1 and indices.max() <= n  # 1-based
        np.testing.assert_array_equal(indices.astype(np.int64) - 1, mesh.triangles)
        low, high = mesh.points.min(axis=0), mesh.points.max(axis=0)
        np.testing.assert_allclose(surface.SurfacePointsSequence[0].PointsBoundingBoxCoordinates,
                                   [*low, *high], rtol=1e-6)


def test_surface_flags_and_presentation_are_truthful(inputs, written: Path) -> None:
    _, _, meshes = inputs
    ds = pydicom.dcmread(written)
    for surface, mesh in zip(ds.SurfaceSequence, meshes, strict=True):
        term = term_for(mesh.label.name)
        assert surface.FiniteVolume == ("YES" if mesh.closed else "NO")
        assert surface.Manifold == ("YES" if mesh.manifold else "NO")
        assert surface.SurfaceProcessing == "NO"
        assert surface.RecommendedPresentationType == "SURFACE"
        assert list(surface.RecommendedDisplayCIELabValue) == list(term.cielab)
        assert surface.RecommendedDisplayGrayscaleValue == term.grayscale
        assert surface.RecommendedPresentationOpacity == pytest.approx(term.opacity)
    assert [s.FiniteVolume for s in ds.SurfaceSequence] == ["YES", "NO", "YES"]


def test_segments_reference_their_surfaces_and_the_sources(inputs, written: Path) -> None:
    volume, seg, meshes = inputs
    ds = pydicom.dcmread(written)
    surface_numbers = {s.SurfaceNumber for s in ds.SurfaceSequence}
    seg_tracking = {str(item.SegmentLabel): str(item.TrackingUID) for item in seg.SegmentSequence}
    expected_sources = {d.SOPInstanceUID for d in volume.sources} | {seg.SOPInstanceUID}
    assert len(ds.SegmentSequence) == len(meshes)
    for number, (segment, mesh) in enumerate(zip(ds.SegmentSequence, meshes, strict=True), 1):
        term = term_for(mesh.label.name)
        assert segment.SegmentNumber == number
        assert segment.SegmentLabel == term.label
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == term.type.value
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        modifiers = [m.CodeValue for m in kind.get("SegmentedPropertyTypeModifierCodeSequence", [])]
        assert modifiers == ([term.modifier.value] if term.modifier else [])
        assert segment.SurfaceCount == len(segment.ReferencedSurfaceSequence) == 1
        reference = segment.ReferencedSurfaceSequence[0]
        assert reference.ReferencedSurfaceNumber in surface_numbers
        assert reference.ReferencedSurfaceNumber == number
        algorithm = reference.SegmentSurfaceGenerationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("builtin_ct", "1")
        sources = {item.ReferencedSOPInstanceUID
                   for item in reference.SegmentSurfaceSourceInstanceSequence}
        assert sources == expected_sources
        # the same structure is tracked by the same UID in the SEG and here
        assert segment.TrackingUID == seg_tracking[term.label]
    series = {item.SeriesInstanceUID: item for item in ds.ReferencedSeriesSequence}
    assert set(series) == {volume.series_uid, seg.SeriesInstanceUID}
    assert {i.ReferencedSOPInstanceUID
            for i in series[volume.series_uid].ReferencedInstanceSequence} == {
        d.SOPInstanceUID for d in volume.sources}


def test_object_is_ours_in_the_source_study_and_frame(inputs, written: Path) -> None:
    volume, _, _ = inputs
    ds = pydicom.dcmread(written)
    source = volume.sources[0]
    assert ds.StudyInstanceUID == volume.study_uid
    assert (ds.PatientID, ds.PatientName) == (source.PatientID, source.PatientName)
    assert ds.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert ds.Modality == "SEG"
    assert ds.SeriesInstanceUID == derived_uid(volume.series_uid, ALGORITHM, "surface/series")
    assert ds.SOPInstanceUID == derived_uid(volume.series_uid, ALGORITHM, "surface/instance")
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.SeriesInstanceUID != volume.series_uid
    assert (ds.Manufacturer, ds.SoftwareVersions) == (MANUFACTURER, SOFTWARE_VERSION)
    assert ds.DeviceSerialNumber and ds.ManufacturerModelName


def test_uids_are_deterministic_and_change_with_the_version(inputs) -> None:
    volume, seg, meshes = inputs
    first = build_surface_segmentation(volume, meshes, ALGORITHM, seg)
    again = build_surface_segmentation(volume, meshes, Algorithm("builtin_ct", "1"), seg)
    newer = build_surface_segmentation(volume, meshes, Algorithm("builtin_ct", "2"))
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID,
                                                               again.SOPInstanceUID)
    assert first.SeriesInstanceUID != newer.SeriesInstanceUID
    assert first.SOPInstanceUID != newer.SOPInstanceUID
    # without a SEG, only the source series is referenced
    assert [s.SeriesInstanceUID for s in newer.ReferencedSeriesSequence] == [volume.series_uid]


def test_more_than_65535_points_use_32_bit_indices(inputs, tmp_path: Path) -> None:
    volume, _, _ = inputs
    big = sphere_mesh(LUNG_LEFT, (10.0, 0.0, 0.0), 7.0, resolution=300)
    assert len(big.points) > 65535
    path = tmp_path / "big.dcm"
    build_surface_segmentation(volume, [big], ALGORITHM).save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)
    points, _, indices = read_mesh(pydicom.dcmread(path).SurfaceSequence[0])
    assert indices.max() == len(points) > 65535
    np.testing.assert_array_equal(indices.astype(np.int64) - 1, big.triangles)


def test_refuses_what_it_cannot_write(inputs) -> None:
    volume, _, meshes = inputs
    with pytest.raises(ValueError, match="no mesh"):
        build_surface_segmentation(volume, [], ALGORITHM)
    good = meshes[0]
    bad = Mesh(good.label, good.points, good.normals, good.triangles + len(good.points),
               good.closed, good.manifold)
    with pytest.raises(ValueError, match="out of range"):
        build_surface_segmentation(volume, [bad], ALGORITHM)
    empty = Mesh(good.label, good.points[:0], good.normals[:0], good.triangles[:0], True, True)
    with pytest.raises(ValueError, match="non-empty"):
        build_surface_segmentation(volume, [empty], ALGORITHM)
    nan = good.points.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        build_surface_segmentation(
            volume, [Mesh(good.label, nan, good.normals, good.triangles, True, True)], ALGORITHM)


def test_surfaces_from_a_real_series_pass_dciodvfy(shared_data: Path, tmp_path: Path) -> None:
    """The GE series has an empty Specific Character Set and single-component names."""
    from vesalius.inference.series import load_series

    volume: Volume = load_series(sorted((shared_data / "ct-3slice-ge").glob("0*.dcm")))
    centre = volume.affine @ np.array([1, 256, 256, 1])
    mesh = sphere_mesh(LUNG_LEFT, tuple(centre[:3]), 20.0)
    path = tmp_path / "surfaces.dcm"
    build_surface_segmentation(volume, [mesh], ALGORITHM).save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)
    assert pydicom.dcmread(path).StudyInstanceUID == volume.study_uid


def test_meshes_from_inference_round_trip(tmp_path: Path) -> None:
    """The pipeline's own meshes (inference.surfaces) on an oblique phantom."""
    from vesalius.inference.surfaces import build_meshes

    volume, label_map = phantom_volume(tmp_path / "phantom", orientation="oblique")
    meshes = build_meshes(label_map, volume.affine, LABELS)
    assert [m.label.name for m in meshes] == ["body", "lung_left", "lung_right", "bone"]
    path = tmp_path / "surfaces.dcm"
    build_surface_segmentation(volume, meshes, ALGORITHM).save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)
    ds = pydicom.dcmread(path)
    for surface, mesh in zip(ds.SurfaceSequence, meshes, strict=True):
        points, normals, indices = read_mesh(surface)
        np.testing.assert_array_equal(points, mesh.points)
        np.testing.assert_array_equal(normals, mesh.normals)
        np.testing.assert_array_equal(indices.astype(np.int64) - 1, mesh.triangles)
        assert surface.FiniteVolume == ("YES" if mesh.closed else "NO")
        assert surface.Manifold == ("YES" if mesh.manifold else "NO")


def test_surfaces_on_the_labelmap_seg_are_their_own_object(inputs, tmp_path: Path) -> None:
    volume, seg, meshes = inputs
    labelmap = build_seg(volume, phantom_volume(tmp_path / "again")[1], LABELS, ALGORITHM,
                         segmentation_type="LABELMAP")
    on_binary = build_surface_segmentation(volume, meshes, ALGORITHM, seg)
    on_labelmap = build_surface_segmentation(volume, meshes, ALGORITHM, labelmap)
    assert on_labelmap.SOPInstanceUID == derived_uid(volume.series_uid, ALGORITHM,
                                                     "labelmap-surface/instance")
    assert on_labelmap.SOPInstanceUID != on_binary.SOPInstanceUID
    assert labelmap.SeriesInstanceUID in {s.SeriesInstanceUID
                                          for s in on_labelmap.ReferencedSeriesSequence}
    assert_dciodvfy_clean(on_labelmap)
