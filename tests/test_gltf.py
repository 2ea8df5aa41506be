"""The .glb: every structure with its colour, read back by pygltflib and trimesh, equal to the
Surface Segmentation meshes (vertex data in LPS mm, root transform to glTF's Y-up metres)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pygltflib
import pytest
import trimesh

from tests.dicom_out_inputs import LABELS, phantom_volume
from vesalius.dicom_out.gltf import LPS_MM_TO_GLTF, ROOT_NODE_NAME, glb_bytes, write_glb
from vesalius.dicom_out.identity import Algorithm
from vesalius.dicom_out.surface_segmentation import build_surface_segmentation
from vesalius.inference.surfaces import build_meshes
from vesalius.inference.terminology import term_for

ALGORITHM = Algorithm("builtin_ct", "1")


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("gltf")
    volume, label_map = phantom_volume(tmp / "phantom", feet_first=True)
    meshes = build_meshes(label_map, volume.affine, LABELS)
    surfaces = build_surface_segmentation(volume, meshes, ALGORITHM)
    return meshes, surfaces, write_glb(meshes, tmp / "out" / "structures.glb")


def _accessor(document: pygltflib.GLTF2, blob: bytes, index: int, dtype: str,
              width: int) -> np.ndarray:
    accessor = document.accessors[index]
    view = document.bufferViews[accessor.bufferView]
    start = view.byteOffset + (accessor.byteOffset or 0)
    data = np.frombuffer(blob, dtype, count=accessor.count * width, offset=start)
    return data.reshape(-1, width) if width > 1 else data


def _surface(surfaces: pydicom.Dataset, number: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = surfaces.SurfaceSequence[number - 1]
    points = np.frombuffer(s.SurfacePointsSequence[0].PointCoordinatesData, "<f4").reshape(-1, 3)
    normals = np.frombuffer(s.SurfacePointsNormalsSequence[0].VectorCoordinateData,
                            "<f4").reshape(-1, 3)
    indices = np.frombuffer(s.SurfaceMeshPrimitivesSequence[0].LongTrianglePointIndexList, "<u4")
    return points, normals, indices.astype(np.int64).reshape(-1, 3) - 1


def test_pygltflib_reads_every_structure_as_the_surface_mesh(written) -> None:
    meshes, surfaces, path = written
    document = pygltflib.GLTF2().load(str(path))
    blob = document.binary_blob()
    assert len(document.meshes) == len(meshes)
    root = document.nodes[document.scenes[document.scene].nodes[0]]
    assert root.name == ROOT_NODE_NAME
    np.testing.assert_array_equal(np.array(root.matrix).reshape(4, 4).T, LPS_MM_TO_GLTF)
    assert np.linalg.det(LPS_MM_TO_GLTF[:3, :3]) > 0  # a rotation: winding stays outward
    for number, (child, mesh) in enumerate(zip(root.children, meshes, strict=True), start=1):
        node = document.nodes[child]
        assert node.name == mesh.label.name
        primitive = document.meshes[node.mesh].primitives[0]
        points = _accessor(document, blob, primitive.attributes.POSITION, "<f4", 3)
        normals = _accessor(document, blob, primitive.attributes.NORMAL, "<f4", 3)
        indices = _accessor(document, blob, primitive.indices, "<u4", 1).reshape(-1, 3)
        expected_points, expected_normals, expected_triangles = _surface(surfaces, number)
        np.testing.assert_array_equal(points, expected_points)
        np.testing.assert_array_equal(normals, expected_normals)
        np.testing.assert_array_equal(indices, expected_triangles)
        accessor = document.accessors[primitive.attributes.POSITION]
        np.testing.assert_allclose(accessor.min, points.min(axis=0))
        np.testing.assert_allclose(accessor.max, points.max(axis=0))


def test_each_structure_has_its_table_colour_and_opacity(written) -> None:
    meshes, _, path = written
    document = pygltflib.GLTF2().load(str(path))
    for gltf_mesh, mesh in zip(document.meshes, meshes, strict=True):
        term = term_for(mesh.label.name)
        material = document.materials[gltf_mesh.primitives[0].material]
        assert material.name == gltf_mesh.name == term.label
        linear = np.array(material.pbrMetallicRoughness.baseColorFactor[:3])
        srgb = np.where(linear <= 0.0031308, linear * 12.92,
                        1.055 * linear ** (1 / 2.4) - 0.055) * 255
        np.testing.assert_allclose(srgb, term.rgb, atol=0.5)
        assert material.pbrMetallicRoughness.baseColorFactor[3] == pytest.approx(term.opacity)
        assert material.alphaMode == ("BLEND" if term.opacity < 1 else "OPAQUE")


def test_trimesh_sees_closed_outward_meshes_in_gltf_metres(written) -> None:
    meshes, _, path = written
    scene = trimesh.load(path)
    assert sorted(scene.geometry) == sorted(term_for(m.label.name).label for m in meshes)
    flattened = scene.to_geometry() if hasattr(scene, "to_geometry") else scene.dump(True)
    assert isinstance(flattened, trimesh.Trimesh)
    for mesh in meshes:
        geometry = scene.geometry[term_for(mesh.label.name).label]
        assert geometry.is_watertight and geometry.is_winding_consistent
        assert geometry.volume == pytest.approx(mesh.volume_mm3, rel=1e-5)  # LPS mm data
    # placed by the scene graph: metres, Y up (superior), so volumes scale by 1e-9
    total = sum(m.volume_mm3 for m in meshes) * 1e-9
    assert flattened.volume == pytest.approx(total, rel=1e-4)
    body = next(m for m in meshes if m.label.name == "body")
    lps_top = body.points[:, 2].max()  # most superior point, LPS z
    assert flattened.bounds[1][1] == pytest.approx(lps_top / 1000.0, abs=1e-6)


def test_refuses_nothing_to_write() -> None:
    with pytest.raises(ValueError, match="no mesh"):
        glb_bytes([])


def test_glb_is_deterministic(written, tmp_path: Path) -> None:
    meshes, _, path = written
    assert write_glb(meshes, tmp_path / "again.glb").read_bytes() == Path(path).read_bytes()
