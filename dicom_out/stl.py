"""A mesh -> a binary STL file for 3D printing, in patient LPS millimetres (VTK's STL writer).

VTK's modules are imported one by one: ``import vtk`` loads every one of them (~190 MB in each
worker process).

STL carries no coordinate system or units; by convention printers read millimetres, and keeping
the patient (LPS) coordinates lets a printed part be registered back to the images. Facet normals
are computed by the writer from the triangles' winding, which the mesh keeps outward-facing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from vtkmodules.util.numpy_support import numpy_to_vtk, numpy_to_vtkIdTypeArray
from vtkmodules.vtkCommonCore import vtkPoints
from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkPolyData
from vtkmodules.vtkIOGeometry import vtkSTLWriter

from vesalius.inference.surfaces import Mesh


def mesh_to_polydata(mesh: Mesh) -> vtkPolyData:
    """The mesh as vtkPolyData: points and triangles (counter-clockwise seen from outside)."""
    points = vtkPoints()
    coordinates = np.ascontiguousarray(mesh.points, dtype=np.float32)
    points.SetData(numpy_to_vtk(coordinates, deep=True))  # type: ignore[no-untyped-call]
    triangles = np.ascontiguousarray(mesh.triangles, dtype=np.int64)
    offsets = np.arange(0, 3 * len(triangles) + 1, 3, dtype=np.int64)
    cells = vtkCellArray()
    cells.SetData(numpy_to_vtkIdTypeArray(offsets, deep=True),  # type: ignore[no-untyped-call]
                  numpy_to_vtkIdTypeArray(triangles.ravel(), deep=True))  # type: ignore[no-untyped-call]
    polydata = vtkPolyData()
    polydata.SetPoints(points)
    polydata.SetPolys(cells)
    return polydata


def stl_bytes(mesh: Mesh) -> bytes:
    """The mesh as binary STL bytes (80-byte header naming the structure and "LPS mm")."""
    if len(mesh.triangles) == 0:
        raise ValueError(f"{mesh.label.name}: an empty mesh cannot be written as STL")
    writer = vtkSTLWriter()
    writer.SetInputData(mesh_to_polydata(mesh))
    writer.SetFileTypeToBinary()
    writer.SetHeader(f"Vesalius {mesh.label.name} LPS mm"[:80])
    with tempfile.TemporaryDirectory() as tmp:  # the STL writer writes files only
        path = Path(tmp) / "mesh.stl"
        writer.SetFileName(str(path))
        if writer.Write() != 1:
            raise OSError(f"VTK could not write the STL of {mesh.label.name}")
        data = path.read_bytes()
    if len(data) != 84 + 50 * len(mesh.triangles):
        raise OSError(f"VTK wrote {len(data)} bytes for {len(mesh.triangles)} STL facets")
    return data


def write_stl(mesh: Mesh, path: Path) -> Path:
    """Write ``mesh`` as a binary STL at ``path`` (parent folders created); returns the path."""
    data = stl_bytes(mesh)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
