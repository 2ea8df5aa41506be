"""Binary STL: exact LPS millimetre vertices, one facet per triangle, outward facet normals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.dicom_out_inputs import LUNG_LEFT, sphere_mesh
from vesalius.dicom_out.stl import write_stl
from vesalius.inference.surfaces import Mesh

FACET = np.dtype([("normal", "<f4", 3), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])


def read_binary_stl(path: Path) -> tuple[bytes, np.ndarray]:
    """Header and facets of a binary STL, parsed straight from the bytes."""
    data = path.read_bytes()
    count = int(np.frombuffer(data, "<u4", count=1, offset=80)[0])
    assert len(data) == 84 + 50 * count  # binary, not ASCII
    return data[:80], np.frombuffer(data, FACET, count=count, offset=84)


def test_stl_holds_the_mesh_triangles_in_patient_millimetres(tmp_path: Path) -> None:
    center = (-41.5, 17.25, 103.0)  # LPS mm, far from the origin on purpose
    mesh = sphere_mesh(LUNG_LEFT, center, 12.0)
    path = write_stl(mesh, tmp_path / "out" / "lung_left.stl")
    assert path == tmp_path / "out" / "lung_left.stl"
    header, facets = read_binary_stl(path)
    assert b"LPS mm" in header
    assert len(facets) == len(mesh.triangles)
    np.testing.assert_array_equal(facets["vertices"], mesh.points[mesh.triangles])


def test_stl_facet_normals_point_outward(tmp_path: Path) -> None:
    center = np.array([5.0, -3.0, 60.0])
    mesh = sphere_mesh(LUNG_LEFT, tuple(center), 10.0)
    _, facets = read_binary_stl(write_stl(mesh, tmp_path / "sphere.stl"))
    outward = facets["vertices"].mean(axis=1) - center
    dots = np.einsum("ij,ij->i", facets["normal"], outward)
    assert (dots > 0).all()
    np.testing.assert_allclose(np.linalg.norm(facets["normal"], axis=1), 1.0, atol=1e-5)


def test_empty_mesh_is_refused(tmp_path: Path) -> None:
    mesh = sphere_mesh(LUNG_LEFT, (0.0, 0.0, 0.0), 5.0)
    empty = Mesh(mesh.label, mesh.points[:0], mesh.normals[:0], mesh.triangles[:0], True, True)
    with pytest.raises(ValueError, match="empty"):
        write_stl(empty, tmp_path / "empty.stl")
    assert not (tmp_path / "empty.stl").exists()


def test_stl_of_a_pipeline_mesh_encloses_its_volume_outward(tmp_path: Path) -> None:
    """A pipeline mesh (inference.surfaces): the facets enclose the voxels' volume, outward."""
    from tests.dicom_out_inputs import LABELS, phantom_volume
    from vesalius.inference.surfaces import build_meshes

    volume, label_map = phantom_volume(tmp_path / "phantom", orientation="oblique")
    body = build_meshes(label_map, volume.affine, LABELS)[0]
    assert body.label.name == "body"  # includes the lungs and bone: one solid block
    _, facets = read_binary_stl(write_stl(body, tmp_path / "body.stl"))
    v = facets["vertices"].astype(np.float64)
    signed_mm3 = np.einsum("ij,ij->i", v[:, 0], np.cross(v[:, 1], v[:, 2])).sum() / 6
    voxels_mm3 = body.label.mask(label_map).sum() * abs(np.linalg.det(volume.affine[:3, :3]))
    assert signed_mm3 == pytest.approx(voxels_mm3, rel=0.1)


def test_the_writers_load_only_the_vtk_modules_they_use() -> None:
    """``import vtk`` loads every VTK module: about 190 MB more in each worker process."""
    import subprocess
    import sys

    code = ("import sys; import vesalius.dicom_out.stl, vesalius.dicom_out.render, "
            "vesalius.dicom_out.preview, vesalius.inference.surfaces, vesalius.node.pipeline; "
            "print('vtk' in sys.modules, 'vtkmodules.vtkIOGeometry' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]
