"""Meshes -> lit RGB views around the patient, rendered off-screen by VTK (EGL or OSMesa, no display).

Every PACS viewer shows images, few render surfaces: these views carry the 3D model to every
reading room. The camera is orthographic (sizes compare across views) and circles the patient's
long axis, starting from the front: view 0 is anterior, the view a quarter turn later is the
left lateral. Seen from the front the patient's left is on the image's right, as radiographs
show it. Each view is labelled with the patient directions at its edges and carries a legend
(structure, colour, volume). Meshes are decimated to a fixed triangle budget so that a
TotalSegmentator result renders about as fast as one structure.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fast_simplification
import numpy as np
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import vtkPoints
from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkPolyData
from vtkmodules.vtkFiltersCore import vtkPolyDataNormals
from vtkmodules.vtkRenderingCore import (
    vtkActor,
    vtkPolyDataMapper,
    vtkRenderer,
    vtkRenderWindow,
    vtkTextActor,
    vtkWindowToImageFilter,
)

import vtkmodules.vtkRenderingFreeType  # noqa: F401  isort: skip  (text actors)
import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  isort: skip  (the off-screen render window)

from vesalius.inference.surfaces import Mesh
from vesalius.inference.terminology import term_for

# No display on a node: straight to EGL, instead of VTK trying X first and warning on stderr.
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

# Software rasterising costs about 1 ms per 1000 triangles a view: 60 000 in all look smooth at
# 512 x 512 and keep a view well under 100 ms.
TRIANGLE_BUDGET = 60_000  # all structures together, after decimation
MIN_TRIANGLES = 500  # per structure: small structures keep their shape
LEGEND_LINES = 8  # the largest structures; the rest are counted in one line
BACKGROUND = (0.0, 0.0, 0.0)
FONT_PX = 13

# Patient directions (LPS): +x left, +y posterior, +z superior.
_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))


@dataclass(frozen=True)
class LegendEntry:
    """One legend line: the structure's name as the SEG labels it, its colour and volume."""

    label: str
    rgb: tuple[int, int, int]
    text: str  # e.g. "1.4 mL" or "1.4 mL (incomplete)"


@dataclass(frozen=True)
class View:
    name: str  # e.g. "anterior", "left lateral", "rotation 30°"
    azimuth_deg: float  # 0 anterior, 90 left lateral, 180 posterior, 270 right lateral


def rotation_views(count: int = 12) -> list[View]:
    """``count`` views evenly around the long axis from the front; anterior and laterals named."""
    names = {0.0: "anterior", 90.0: "left lateral", 180.0: "posterior", 270.0: "right lateral"}
    views = []
    for i in range(count):
        azimuth = 360.0 * i / count
        views.append(View(names.get(azimuth, f"rotation {azimuth:g}°"), azimuth))
    return views


def direction_label(vector: np.ndarray) -> str:
    """Patient direction letters of a unit LPS vector, strongest first (e.g. "L", "LA")."""
    parts = sorted(((abs(float(c)), _LETTERS[axis][0 if c > 0 else 1])
                    for axis, c in enumerate(vector) if abs(float(c)) > 0.3), reverse=True)
    return "".join(letter for _, letter in parts)


def camera_axes(azimuth_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(towards the camera, image right, image up) in LPS for a view at ``azimuth_deg``."""
    a = math.radians(azimuth_deg)
    towards = np.array([math.sin(a), -math.cos(a), 0.0])  # 0: in front (anterior is -y)
    up = np.array([0.0, 0.0, 1.0])  # superior at the top
    right = np.cross(-towards, up)  # the camera looks along -towards
    return towards, right, up


def render_views(meshes: Sequence[Mesh], legend: Sequence[LegendEntry], views: Sequence[View],
                 size: int = 512) -> list[np.ndarray]:
    """One (size, size, 3) uint8 RGB image per view, top row first."""
    if not meshes:
        raise ValueError("nothing to render")
    window = vtkRenderWindow()
    window.SetOffScreenRendering(True)
    window.SetSize(size, size)
    window.SetMultiSamples(0)
    renderer = vtkRenderer()  # the model, above the legend band
    renderer.SetBackground(*BACKGROUND)
    # see-through structures (the body) by plain alpha blending: order-independent transparency
    # costs several full-window passes a view on a software rasteriser
    renderer.SetUseOIT(False)
    overlay = vtkRenderer()  # labels and legend over the whole image
    overlay.SetLayer(1)
    overlay.InteractiveOff()
    window.SetNumberOfLayers(2)
    window.AddRenderer(renderer)
    window.AddRenderer(overlay)
    per_mesh = max(MIN_TRIANGLES, TRIANGLE_BUDGET // len(meshes))
    for actor in _actors(meshes, per_mesh):
        renderer.AddActor(actor)
    swatches, band = _legend(overlay, legend, size)
    renderer.SetViewport(0.0, band / size, 1.0, 1.0)
    low = np.min([m.points.min(axis=0) for m in meshes], axis=0).astype(np.float64)
    high = np.max([m.points.max(axis=0) for m in meshes], axis=0).astype(np.float64)
    centre = (low + high) / 2
    # one scale for every view, so sizes compare frame to frame: the model's horizontal extent
    # turns with the camera (at most the box's diagonal in the axial plane), its height does not
    across = float(np.linalg.norm(high[:2] - low[:2])) / 2
    height = float(high[2] - low[2]) / 2
    aspect = size / (size - band)
    camera = renderer.GetActiveCamera()
    camera.ParallelProjectionOn()
    camera.SetParallelScale(max(height, across / aspect, 1.0) * 1.1)  # room for the edge labels
    depth = float(np.linalg.norm(high - low)) + 1.0
    edges = {key: _text(overlay, FONT_PX + 3, justify) for key, justify in
             (("left", "left"), ("right", "right"), ("top", "center"), ("bottom", "center"))}
    title = _text(overlay, FONT_PX, "left")
    title.SetPosition(6, size - FONT_PX - 6)
    middle = (band + size) // 2
    edges["left"].SetPosition(6, middle)
    edges["right"].SetPosition(size - 6, middle)
    edges["top"].SetPosition(size // 2, size - FONT_PX - 24)
    edges["bottom"].SetPosition(size // 2, band + 4)
    capture = vtkWindowToImageFilter()
    capture.SetInput(window)
    capture.ReadFrontBufferOff()
    capture.ShouldRerenderOff()  # read what window.Render() drew, do not draw it twice
    images = []
    for view in views:
        towards, right, up = camera_axes(view.azimuth_deg)
        camera.SetFocalPoint(*centre)
        camera.SetPosition(*(centre + towards * depth))
        camera.SetViewUp(*up)
        renderer.ResetCameraClippingRange()
        title.SetInput(view.name)
        edges["right"].SetInput(direction_label(right))
        edges["left"].SetInput(direction_label(-right))
        edges["top"].SetInput(direction_label(up))
        edges["bottom"].SetInput(direction_label(-up))
        window.Render()
        capture.Modified()
        capture.Update()
        output = capture.GetOutput()
        scalars = numpy_support.vtk_to_numpy(output.GetPointData().GetScalars())  # type: ignore[no-untyped-call]
        pixels = np.asarray(scalars).reshape(size, size, -1)[..., :3]
        image = np.ascontiguousarray(pixels[::-1])  # VTK's first row is the bottom one
        if not image.any():  # labels alone light some pixels: nothing drawn means no OpenGL
            raise RuntimeError("off-screen rendering drew nothing: no working OpenGL (EGL/OSMesa); "
                               "install Debian's libegl1 libegl-mesa0 libgl1-mesa-dri")
        for (row, col), rgb in swatches:
            image[row:row + FONT_PX - 3, col:col + FONT_PX - 3] = rgb
        images.append(image)
    window.Finalize()
    return images


def _vtk_array(values: np.ndarray) -> Any:
    """A VTK copy of a numpy array (numpy_support has no type hints)."""
    return numpy_support.numpy_to_vtk(np.ascontiguousarray(values), deep=True)  # type: ignore[no-untyped-call]


def _decimated(mesh: Mesh, max_triangles: int) -> tuple[np.ndarray, np.ndarray]:
    points, triangles = mesh.points.astype(np.float64), mesh.triangles
    if len(triangles) > max_triangles:
        points, triangles = fast_simplification.simplify(points, triangles.astype(np.int32),
                                                         target_count=max_triangles)
    return np.asarray(points, np.float32), np.asarray(triangles, np.int64)


def _actors(meshes: Sequence[Mesh], max_triangles: int) -> list[vtkActor]:
    """The meshes (each decimated to ``max_triangles``) in their structures' colours, lit.

    Structures of one opacity share one actor (vertex colours): one draw call for a hundred
    structures instead of a hundred.
    """
    groups: dict[float, list[tuple[np.ndarray, np.ndarray, tuple[int, int, int]]]] = {}
    for mesh in meshes:
        term = term_for(mesh.label.name)
        # the colour the SEG recommends (its CIELab value is computed from this RGB)
        groups.setdefault(term.opacity, []).append((*_decimated(mesh, max_triangles), term.rgb))
    actors = []
    for opacity, parts in sorted(groups.items(), reverse=True):  # opaque first
        offsets = np.cumsum([0] + [len(points) for points, _, _ in parts])
        points = np.concatenate([p for p, _, _ in parts])
        triangles = np.concatenate([t + offset for (_, t, _), offset in zip(parts, offsets, strict=False)])
        colours = np.concatenate([np.tile(np.asarray(rgb, np.uint8), (len(p), 1)) for p, _, rgb in parts])
        actors.append(_actor(points, triangles, colours, opacity))
    return actors


def _actor(points: np.ndarray, triangles: np.ndarray, colours: np.ndarray, opacity: float) -> vtkActor:
    polydata = vtkPolyData()
    vtk_points = vtkPoints()
    vtk_points.SetData(_vtk_array(points))
    polydata.SetPoints(vtk_points)
    cells = vtkCellArray()
    cells.SetData(_vtk_array(np.arange(0, 3 * len(triangles) + 1, 3, dtype=np.int64)),
                  _vtk_array(triangles.ravel()))
    polydata.SetPolys(cells)
    polydata.GetPointData().SetScalars(_vtk_array(colours))
    normals = vtkPolyDataNormals()  # smooth shading; the triangles already face outward
    normals.SetInputData(polydata)
    normals.SplittingOff()
    normals.ConsistencyOff()
    normals.Update()
    mapper = vtkPolyDataMapper()
    mapper.SetInputData(normals.GetOutput())
    mapper.ScalarVisibilityOn()
    mapper.SetColorModeToDirectScalars()
    actor = vtkActor()
    actor.SetMapper(mapper)
    surface = actor.GetProperty()
    surface.SetOpacity(opacity)
    surface.SetAmbient(0.25)
    surface.SetDiffuse(0.75)
    surface.SetSpecular(0.1)
    surface.SetSpecularPower(20)
    return actor


def _text(renderer: vtkRenderer, font_px: int, justify: str,
          rgb: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> vtkTextActor:
    actor = vtkTextActor()
    style = actor.GetTextProperty()
    style.SetFontSize(font_px)
    style.SetColor(*rgb)
    style.BoldOn()
    style.SetJustification({"left": 0, "center": 1, "right": 2}[justify])
    renderer.AddViewProp(actor)
    return actor


def _legend(overlay: vtkRenderer, legend: Sequence[LegendEntry],
            size: int) -> tuple[list[tuple[tuple[int, int], tuple[int, int, int]]], int]:
    """Legend text at the bottom left: where (row, col from the top) each swatch goes, and the
    height in pixels of the band it takes."""
    lines = list(legend[:LEGEND_LINES])
    extra = len(legend) - len(lines)
    swatches = []
    line_px = FONT_PX + 4
    bottom = 6 + (line_px if extra else 0)
    if extra:
        more = _text(overlay, FONT_PX, "left")
        more.SetInput(f"+ {extra} more structures")
        more.SetPosition(6, 6)
    for i, entry in enumerate(reversed(lines)):
        y = bottom + i * line_px  # VTK display coordinates: from the bottom
        actor = _text(overlay, FONT_PX, "left")
        actor.SetInput(f"{entry.label}  {entry.text}")
        actor.SetPosition(6 + FONT_PX + 2, y)
        swatches.append(((size - y - FONT_PX + 1, 6), entry.rgb))
    return swatches, bottom + len(lines) * line_px + 4
