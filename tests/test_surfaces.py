"""build_meshes: closed outward meshes in patient space that match analytic shapes."""

from __future__ import annotations

import numpy as np
import pytest

from tests.phantoms import Cylinder, Sphere, phantom_affine, voxel_centres
from vesalius.inference.models import Label
from vesalius.inference.surfaces import Mesh, build_meshes

SPHERE = Sphere(center=(6.0, -5.0, 3.0), radius=14.0, hu=1.0)
CYLINDER = Cylinder(center=(-4.0, 3.0, 1.0), axis=(0.3, -0.2, 1.0), radius=8.0, length=30.0,
                    hu=1.0)
LABEL = Label(1, "body")

GEOMETRIES = [
    pytest.param(dict(orientation="axial"), id="axial"),
    pytest.param(dict(orientation="axial", feet_first=True), id="axial-feet-first"),
    pytest.param(dict(orientation="coronal"), id="coronal"),
    pytest.param(dict(orientation="sagittal"), id="sagittal"),
    pytest.param(dict(orientation="oblique"), id="oblique"),
    pytest.param(dict(orientation="axial", spacing=(2.5, 0.9, 1.2), shape=(26, 64, 50)),
                 id="anisotropic"),
]


def _grid(shape=(44, 48, 48), spacing=(1.5, 1.4, 1.4), orientation="axial", feet_first=False):
    affine = phantom_affine(shape, spacing, orientation, feet_first)
    return affine, shape


def _render(affine: np.ndarray, shape, obj) -> np.ndarray:
    return np.stack([obj.inside(voxel_centres(affine, shape, k)) for k in range(shape[0])])


def _half_voxel_diagonal(affine: np.ndarray) -> float:
    return 0.5 * float(np.linalg.norm(np.linalg.norm(affine[:3, :3], axis=0)))


def _face_normals(mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
    p = mesh.points.astype(np.float64)[mesh.triangles]
    return np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), p.mean(axis=1)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_sphere_mesh_matches_analytic(geometry: dict) -> None:
    affine, shape = _grid(**geometry)
    label_map = _render(affine, shape, SPHERE).astype(np.uint8)
    (mesh,) = build_meshes(label_map, affine, [LABEL])
    assert mesh.label == LABEL
    assert mesh.points.dtype == np.float32 and mesh.points.shape[1] == 3
    assert mesh.normals.dtype == np.float32 and mesh.normals.shape == mesh.points.shape
    assert mesh.triangles.dtype == np.int64 and mesh.triangles.shape[1] == 3
    assert mesh.closed and mesh.manifold
    assert mesh.volume_mm3 == pytest.approx(SPHERE.volume_mm3, rel=0.02)
    assert mesh.area_mm2 == pytest.approx(SPHERE.area_mm2, rel=0.03)
    assert SPHERE.distance_to_surface(mesh.points).max() <= _half_voxel_diagonal(affine)
    outward = mesh.points - np.asarray(SPHERE.center, np.float32)
    np.testing.assert_allclose(np.linalg.norm(mesh.normals, axis=1), 1.0, atol=1e-3)
    assert np.all(np.einsum("ij,ij->i", mesh.normals, outward) > 0)
    faces, centres = _face_normals(mesh)  # counter-clockwise seen from outside
    assert np.all(np.einsum("ij,ij->i", faces, centres - SPHERE.center) > 0)


def _cylinder_distance(points: np.ndarray, cylinder: Cylinder) -> np.ndarray:
    axis = np.asarray(cylinder.axis, float) / np.linalg.norm(cylinder.axis)
    d = points.astype(np.float64) - np.asarray(cylinder.center)
    along = d @ axis
    radial = np.linalg.norm(d - along[:, None] * axis, axis=1)
    q = np.stack([radial - cylinder.radius, np.abs(along) - cylinder.length / 2], axis=1)
    inside = np.all(q < 0, axis=1)
    return np.where(inside, np.min(np.abs(q), axis=1), np.linalg.norm(np.maximum(q, 0), axis=1))


@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[4], GEOMETRIES[5]])
def test_cylinder_mesh_matches_analytic(geometry: dict) -> None:
    affine, shape = _grid(**geometry)
    label_map = _render(affine, shape, CYLINDER).astype(np.uint8)
    (mesh,) = build_meshes(label_map, affine, [LABEL])
    assert mesh.closed and mesh.manifold
    assert mesh.volume_mm3 == pytest.approx(CYLINDER.volume_mm3, rel=0.02)
    assert mesh.area_mm2 == pytest.approx(CYLINDER.area_mm2, rel=0.03)
    assert _cylinder_distance(mesh.points, CYLINDER).max() <= _half_voxel_diagonal(affine)


def test_decimation_respects_the_budget_and_stays_closed() -> None:
    affine, shape = _grid()
    label_map = _render(affine, shape, SPHERE).astype(np.uint8)
    (full,) = build_meshes(label_map, affine, [LABEL])
    (small,) = build_meshes(label_map, affine, [LABEL], max_triangles=2500)
    assert len(full.triangles) > 2500 >= len(small.triangles)
    assert small.closed and small.manifold
    assert small.volume_mm3 == pytest.approx(SPHERE.volume_mm3, rel=0.02)


@pytest.mark.parametrize("shape, spacing", [((64, 64, 64), (0.7, 0.7, 0.7)),
                                            ((44, 80, 68), (1.1, 0.6, 0.7))],  # a typical CT's voxels
                         ids=["isotropic", "anisotropic"])
def test_large_surfaces_are_contoured_on_a_pooled_grid_accurately(shape, spacing) -> None:
    """A fine grid with a small budget: contour on blocks of a few voxels (near-cubes in mm on
    anisotropic voxels), still the analytic sphere."""
    affine, shape = _grid(shape=shape, spacing=spacing)
    label_map = _render(affine, shape, SPHERE).astype(np.uint8)
    (full,) = build_meshes(label_map, affine, [LABEL], max_triangles=1_000_000)
    (mesh,) = build_meshes(label_map, affine, [LABEL], max_triangles=4000)
    assert len(full.triangles) > 3 * 4000  # so the budget forces the pooled contour
    assert len(mesh.triangles) <= 4000
    assert mesh.closed and mesh.manifold
    assert mesh.volume_mm3 == pytest.approx(SPHERE.volume_mm3, rel=0.02)
    assert mesh.area_mm2 == pytest.approx(SPHERE.area_mm2, rel=0.03)
    assert SPHERE.distance_to_surface(mesh.points).max() <= 2 * _half_voxel_diagonal(affine)
    outward = mesh.points - np.asarray(SPHERE.center, np.float32)
    assert np.all(np.einsum("ij,ij->i", mesh.normals, outward) > 0)


def test_one_mesh_per_non_empty_label_with_includes() -> None:
    affine, shape = _grid()
    label_map = _render(affine, shape, SPHERE).astype(np.uint8)
    label_map[_render(affine, shape, CYLINDER)] = 2
    union = Label(1, "body", (2,))
    inner = Label(2, "bone")
    empty = Label(3, "airways")
    meshes = build_meshes(label_map, affine, [union, inner, empty])
    assert [mesh.label for mesh in meshes] == [union, inner]
    voxel = abs(np.linalg.det(affine[:3, :3]))
    assert meshes[0].volume_mm3 == pytest.approx(np.count_nonzero(label_map) * voxel, rel=0.02)
    assert meshes[1].volume_mm3 == pytest.approx(np.count_nonzero(label_map == 2) * voxel, rel=0.03)


def test_object_cut_by_the_volume_border_is_closed() -> None:
    affine, shape = _grid(shape=(14, 48, 48))  # the sphere sticks out of both ends of the slab
    label_map = _render(affine, shape, SPHERE).astype(np.uint8)
    assert label_map[0].any() and label_map[-1].any()
    (mesh,) = build_meshes(label_map, affine, [LABEL])
    assert mesh.closed and mesh.manifold
    voxel = abs(np.linalg.det(affine[:3, :3]))
    assert mesh.volume_mm3 == pytest.approx(np.count_nonzero(label_map) * voxel, rel=0.05)


def test_smoothing_off_still_closed_and_smoothing_helps_area() -> None:
    affine, shape = _grid()
    label_map = _render(affine, shape, SPHERE).astype(np.uint8)
    (raw,) = build_meshes(label_map, affine, [LABEL], smoothing_iterations=0)
    (smooth,) = build_meshes(label_map, affine, [LABEL])
    assert raw.closed and raw.manifold
    error = abs(raw.area_mm2 / SPHERE.area_mm2 - 1)
    assert abs(smooth.area_mm2 / SPHERE.area_mm2 - 1) < error


def test_volume_sign_follows_winding() -> None:
    affine, shape = _grid()
    (mesh,) = build_meshes(_render(affine, shape, SPHERE).astype(np.uint8), affine, [LABEL])
    flipped = Mesh(mesh.label, mesh.points, -mesh.normals, mesh.triangles[:, ::-1].copy(),
                   mesh.closed, mesh.manifold)
    assert flipped.volume_mm3 == pytest.approx(-mesh.volume_mm3)
    assert flipped.area_mm2 == pytest.approx(mesh.area_mm2)


def test_open_mesh_is_reported_open() -> None:
    affine, shape = _grid()
    (mesh,) = build_meshes(_render(affine, shape, SPHERE).astype(np.uint8), affine, [LABEL])
    from vesalius.inference.surfaces import _topology

    assert _topology(mesh.triangles) == (True, True)
    assert _topology(mesh.triangles[1:]) == (False, False)


def test_a_vertex_whose_faces_cancel_gets_a_unit_outward_normal() -> None:
    """Where the faces around a vertex cancel (a pinch decimation can leave), VTK gives a zero
    normal; ours is a unit vector: its largest face's, or away from the centre without one."""
    from vesalius.inference.surfaces import _unit_normals

    # a tetrahedron, outward winding; vertex 0's normal zeroed as VTK leaves it; vertex 4 sits on
    # zero-area faces only
    points = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                       [2.0, 2.0, 2.0]])
    triangles = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3], [4, 4, 4]])
    normals = np.array([[0.0, 0.0, 0.0], *np.eye(3), [0.0, 0.0, 0.0]])
    fixed = _unit_normals(points, triangles, normals)
    assert np.allclose(np.linalg.norm(fixed, axis=1), 1.0)
    assert np.allclose(fixed[1:4], normals[1:4])  # good normals stay as they are
    assert fixed[0] @ (points[0] - points[:4].mean(axis=0)) > 0  # outward
    assert fixed[0].tolist() in ([0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0])  # a face's
    assert fixed[4] @ (points[4] - points.mean(axis=0)) > 0
