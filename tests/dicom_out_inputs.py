"""Inputs for the dicom_out tests: a small phantom volume with a known label map, and VTK meshes.

The phantom is a box of soft tissue (the body) holding a left and a right "lung" sphere and a bone
cylinder, each at its own HU so the label array follows exactly from the voxel values.
Meshes are VTK spheres in patient space, so the writers are tested on real, closed geometry
independently of inference.surfaces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from tests.phantoms import Box, Cylinder, Sphere, write_phantom_series
from vesalius.inference.models import Label
from vesalius.inference.series import load_series
from vesalius.inference.surfaces import Mesh
from vesalius.inference.volume import Volume

BODY_HU, LUNG_LEFT_HU, LUNG_RIGHT_HU, BONE_HU = 20.0, -810.0, -790.0, 700.0
# builtin_ct-like label definitions; airways (5) stays empty in the phantom.
LABELS = (
    Label(1, "body", includes=(2, 3, 4, 5)),
    Label(2, "lung_left"),
    Label(3, "lung_right"),
    Label(5, "airways"),
    Label(4, "bone"),
)
BODY, LUNG_LEFT, LUNG_RIGHT, AIRWAYS, BONE = LABELS


def phantom_volume(out_dir: Path, orientation: str = "axial",
                   feet_first: bool = False) -> tuple[Volume, np.ndarray]:
    """A small CT phantom series read back as a Volume, and its exact label array."""
    objects = [
        Box((0, 0, 0), (44, 36, 26), BODY_HU),
        Sphere((10, 0, 0), 7, LUNG_LEFT_HU),  # +x in LPS is the patient's left
        Sphere((-10, 0, 0), 7, LUNG_RIGHT_HU),
        Cylinder((0, 12, 0), (0, 0, 1), 3, 20, BONE_HU),
    ]
    series = write_phantom_series(out_dir, shape=(14, 40, 48), spacing=(2.0, 1.0, 1.1),
                                  orientation=orientation, feet_first=feet_first, objects=objects)
    volume = load_series(series.paths)
    hu = np.round(volume.array)
    label_map = np.zeros(hu.shape, np.uint8)
    for value, level in ((1, BODY_HU), (2, LUNG_LEFT_HU), (3, LUNG_RIGHT_HU), (4, BONE_HU)):
        label_map[hu == level] = value
    return volume, label_map


def sphere_mesh(label: Label, center: tuple[float, float, float], radius: float,
                resolution: int = 24, closed: bool = True) -> Mesh:
    """A triangulated VTK sphere (or an open cap of one) with outward point normals."""
    source = vtk.vtkSphereSource()
    source.SetCenter(*center)
    source.SetRadius(radius)
    source.SetThetaResolution(resolution)
    source.SetPhiResolution(resolution)
    if not closed:
        source.SetEndPhi(120)  # a bowl: open at the bottom
    triangles = vtk.vtkTriangleFilter()
    triangles.SetInputConnection(source.GetOutputPort())
    triangles.Update()
    polydata = triangles.GetOutput()
    points = vtk_to_numpy(polydata.GetPoints().GetData()).astype(np.float32)
    cells = vtk_to_numpy(polydata.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    normals = points - np.asarray(center, np.float32)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    return Mesh(label=label, points=points, normals=normals.astype(np.float32),
                triangles=cells.astype(np.int64), closed=closed, manifold=True)
