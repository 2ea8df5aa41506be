"""Fidelity against independent readers and analytic truth.

- SEG (BINARY and LABELMAP) decoded by dcmqi and by highdicom equals our label map, voxel for voxel
  and in physical placement; the liver on the GE CT equals dcmqi's own SEG of the same labels.
- Surfaces read back from our Surface Segmentation match analytic phantoms (sphere, cylinder,
  ellipsoid; axial, coronal, oblique, feet-first; anisotropic voxels): volume within 2 %, area
  within 3 %, every vertex within half a voxel diagonal of the true surface, outward normals,
  closed and manifold by trimesh.
- SR volumes equal voxel count x voxel volume to 0.1 %.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import trimesh

from tests.dicom_checks import tool
from tests.dicom_out_inputs import LABELS, phantom_volume
from tests.phantoms import Cylinder, Ellipsoid, Sphere, write_phantom_series
from vesalius.dicom_out.identity import Algorithm
from vesalius.dicom_out.seg import LABELMAP, build_seg
from vesalius.dicom_out.sr import build_sr
from vesalius.dicom_out.surface_segmentation import build_surface_segmentation
from vesalius.inference.measures import measure
from vesalius.inference.models import Label
from vesalius.inference.series import load_series
from vesalius.inference.surfaces import build_meshes
from vesalius.inference.volume import Volume

ALGORITHM = Algorithm("builtin_ct", "1")
OBJECT_HU = 300.0


def _outward(obj, p: np.ndarray) -> np.ndarray:
    """A direction that points out of ``obj`` at points near its surface."""
    if isinstance(obj, Ellipsoid):
        return obj.outward(p)
    if isinstance(obj, Sphere):
        return p - np.asarray(obj.center)
    axis = np.asarray(obj.axis, float) / np.linalg.norm(obj.axis)
    d = p - np.asarray(obj.center)
    along = d @ axis
    radial = d - along[:, None] * axis
    on_cap = np.abs(along) - obj.length / 2 > np.linalg.norm(radial, axis=1) - obj.radius
    return np.where(on_cap[:, None], np.sign(along)[:, None] * axis, radial)


PHANTOMS = {
    "sphere": Sphere((1.3, -2.1, 0.7), 12.0, OBJECT_HU),
    "cylinder": Cylinder((0.5, 0.3, -0.4), (0.3, 0.5, 0.81), 8.0, 30.0, OBJECT_HU),
    "ellipsoid": Ellipsoid((0.4, -0.6, 0.2), (14.0, 9.0, 11.0), OBJECT_HU),
}
GEOMETRIES = {  # orientation, feet first; anisotropic voxels (slice, row, col) in mm
    "axial": ("axial", False),
    "coronal": ("coronal", False),
    "oblique": ("oblique", False),
    "feet-first": ("axial", True),
}
SPACING = (1.6, 0.9, 1.0)
OBJECT = Label(1, "bone")


def _read_surface(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    surface = ds.SurfaceSequence[0]
    points = np.frombuffer(surface.SurfacePointsSequence[0].PointCoordinatesData, "<f4")
    normals = np.frombuffer(surface.SurfacePointsNormalsSequence[0].VectorCoordinateData, "<f4")
    indices = np.frombuffer(surface.SurfaceMeshPrimitivesSequence[0].LongTrianglePointIndexList,
                            "<u4")
    return (points.reshape(-1, 3).astype(np.float64), normals.reshape(-1, 3).astype(np.float64),
            indices.reshape(-1, 3).astype(np.int64) - 1)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("shape", list(PHANTOMS))
def test_surfaces_match_the_analytic_shape(shape: str, geometry: str, tmp_path: Path) -> None:
    obj = PHANTOMS[shape]
    orientation, feet_first = GEOMETRIES[geometry]
    series = write_phantom_series(tmp_path / "ct", shape=(28, 44, 44), spacing=SPACING,
                                  orientation=orientation, feet_first=feet_first, objects=[obj])
    volume = load_series(series.paths)
    label_map = (np.round(volume.array) == OBJECT_HU).astype(np.uint8)
    meshes = build_meshes(label_map, volume.affine, [OBJECT])
    path = tmp_path / "surfaces.dcm"
    build_surface_segmentation(volume, meshes, ALGORITHM).save_as(path, enforce_file_format=True)
    points, normals, triangles = _read_surface(pydicom.dcmread(path))

    mesh = trimesh.Trimesh(points, triangles, process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent  # closed, manifold, oriented
    assert mesh.volume > 0  # outward-facing triangles enclose a positive volume
    assert mesh.volume == pytest.approx(obj.volume_mm3, rel=0.02)
    assert mesh.area == pytest.approx(obj.area_mm2, rel=0.03)
    half_diagonal = 0.5 * math.sqrt(sum(s * s for s in SPACING))
    assert obj.distance_to_surface(points).max() <= half_diagonal
    # vertex normals are unit and point out of the true shape
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-4)
    assert (np.einsum("ij,ij->i", normals, _outward(obj, points)) > 0).mean() > 0.99
    # face normals of the decoded triangles point outward too
    centres = mesh.triangles_center
    assert (np.einsum("ij,ij->i", mesh.face_normals, _outward(obj, centres)) > 0).mean() > 0.99


def test_ellipsoid_area_formula_reduces_to_the_sphere() -> None:
    """The analytic truth itself: a near-spherical ellipsoid has the sphere's area."""
    almost = Ellipsoid((0, 0, 0), (10.0002, 10.0001, 10.0), 0)
    assert almost.area_mm2 == pytest.approx(4 * math.pi * 100, rel=1e-4)
    p = np.array([[13.0, 0, 0], [0, 0, 4.0]])
    np.testing.assert_allclose(almost.distance_to_surface(p), [3.0, 6.0], atol=1e-3)


@pytest.fixture(scope="module")
def oblique(tmp_path_factory: pytest.TempPathFactory) -> tuple[Volume, np.ndarray]:
    return phantom_volume(tmp_path_factory.mktemp("oblique"), orientation="oblique")


def _labelmap_expected(label_map: np.ndarray) -> np.ndarray:
    """Segment number per voxel as build_seg numbers them: non-empty structures in model order."""
    present = [label for label in LABELS if label.mask(label_map).any()]
    expected = np.zeros(label_map.shape, np.uint16)
    for number, label in enumerate(present, start=1):
        expected[label_map == label.value] = number
    return expected


def test_labelmap_seg_decodes_with_dcmqi_to_our_voxels_and_placement(
        oblique: tuple[Volume, np.ndarray], tmp_path: Path) -> None:
    volume, label_map = oblique
    path = tmp_path / "labelmap.dcm"
    build_seg(volume, label_map, LABELS, ALGORITHM, segmentation_type=LABELMAP).save_as(
        path, enforce_file_format=True)
    out = tmp_path / "dcmqi"
    out.mkdir()
    result = subprocess.run([tool("segimage2itkimage"), "--inputDICOM", str(path),
                             "--outputDirectory", str(out), "-t", "nrrd", "-p", "lm"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = _labelmap_expected(label_map)
    images = sorted(out.glob("lm-*.nrrd"))
    assert images
    decoded = np.zeros(label_map.shape, np.uint16)
    spacing = volume.spacing
    for image_path in images:
        image = sitk.ReadImage(str(image_path))
        np.testing.assert_allclose(image.GetOrigin(), volume.affine[:3, 3], atol=1e-4)
        np.testing.assert_allclose(image.GetSpacing(), spacing[::-1], rtol=1e-6)
        direction = np.array(image.GetDirection()).reshape(3, 3)
        np.testing.assert_allclose(direction, (volume.affine[:3, :3] / spacing)[:, ::-1],
                                   atol=1e-5)
        array = sitk.GetArrayFromImage(image)
        decoded[array > 0] = array[array > 0]
    np.testing.assert_array_equal(decoded, expected)


def test_labelmap_seg_decodes_with_highdicom_to_our_voxels(
        oblique: tuple[Volume, np.ndarray], tmp_path: Path) -> None:
    volume, label_map = oblique
    path = tmp_path / "labelmap.dcm"
    build_seg(volume, label_map, LABELS, ALGORITHM, segmentation_type=LABELMAP).save_as(
        path, enforce_file_format=True)
    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    combined = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in volume.sources],
        combine_segments=True)
    np.testing.assert_array_equal(combined, _labelmap_expected(label_map))
    geometry = hd.VolumeGeometry(volume.affine, volume.array.shape, "PATIENT",
                                 volume.frame_of_reference_uid)
    matched = seg.get_volume(combine_segments=True).match_geometry(geometry)
    np.testing.assert_allclose(matched.affine, volume.affine, atol=1e-4)
    np.testing.assert_array_equal(matched.array, _labelmap_expected(label_map))


@pytest.mark.filterwarnings("ignore:The string .* unlikely to represent:UserWarning")
@pytest.mark.parametrize("segmentation_type", ["BINARY", "LABELMAP"])
def test_real_ct_liver_equals_dcmqis_seg_of_the_same_labels(
        segmentation_type: str, shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "ct-3slice-ge"
    volume = load_series(sorted(folder.glob("0*.dcm")))
    label_map = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "liver_seg.nrrd")))
    path = tmp_path / "liver.dcm"
    build_seg(volume, label_map.astype(np.uint8), (Label(1, "liver"),), ALGORITHM,
              segmentation_type=segmentation_type).save_as(path, enforce_file_format=True)
    uids = [ds.SOPInstanceUID for ds in volume.sources]
    ours = hd.seg.segread(path).get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], combine_segments=True)
    theirs = hd.seg.segread(folder / "reference-seg" / "liver_seg_dcmqi.dcm")
    reference = theirs.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], combine_segments=True,
        ignore_spatial_locations=True)
    assert reference.any()
    np.testing.assert_array_equal(ours.astype(bool), reference.astype(bool))


@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_sr_volumes_equal_voxel_count_times_voxel_volume(orientation: str,
                                                         tmp_path: Path) -> None:
    volume, label_map = phantom_volume(tmp_path / "ct", orientation=orientation)
    meshes = build_meshes(label_map, volume.affine, LABELS)
    measurements = measure(volume, label_map, LABELS, meshes)
    seg = build_seg(volume, label_map, LABELS, ALGORITHM)
    path = tmp_path / "sr.dcm"
    build_sr(volume, seg, measurements, ALGORITHM).save_as(path, enforce_file_format=True)
    voxel_ml = abs(np.linalg.det(volume.affine[:3, :3])) / 1000.0
    truth = {}
    for label in LABELS:
        count = int(label.mask(label_map).sum())
        if count:
            truth[label.name] = count * voxel_ml
    tracking = {str(item.TrackingUID): str(item.SegmentLabel) for item in seg.SegmentSequence}
    names = {str(item.SegmentLabel): label.name for item, label in zip(
        seg.SegmentSequence, [lb for lb in LABELS if lb.name in truth], strict=True)}
    groups = hd.sr.srread(path).content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(truth)
    for group in groups:
        name = names[tracking[str(group.tracking_uid)]]
        [reported] = [m.value for m in group.get_measurements() if m.name.value == "118565006"]
        assert reported == pytest.approx(truth[name], rel=1e-3)
