"""Per-structure quantities the SR reports: volume, surface area, intensity statistics.

Honest about what the scan shows: a structure that touches the first or last slice or the edge of
the field of view is cut by the scan, so it is marked incomplete and the faces where the scan cut
it are left out of its surface area (they are the scan's boundary, not the organ's). Reported
values are rounded to what the voxels can tell (``Measurement.rounded``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from vesalius.inference.device import on_two_threads
from vesalius.inference.models import Label
from vesalius.inference.surfaces import Mesh
from vesalius.inference.volume import Volume

# Reported precision (decimal places): 0.1 mL, 0.1 cm², 1 HU (or 1 unit of the image's values).
VOLUME_DECIMALS = 1
AREA_DECIMALS = 1
INTENSITY_DECIMALS = 0
# A mesh triangle on a cut face lies beyond the outermost voxel centres and faces out of the
# scanned box: its normal within 45 degrees of the box face's outward direction.
_CUT_FACE_COSINE = float(np.cos(np.radians(45.0)))
SLAB_SLICES = 16  # voxel statistics a slab at a time: 16 x 512 x 512 float64 is 32 MB


@dataclass(frozen=True)
class Measurement:
    label: Label
    voxel_count: int
    volume_ml: float
    surface_area_cm2: float | None  # without the faces the scan cut (see ``incomplete``)
    mean: float
    std: float
    # index (volume order) of the slice with the most of its voxels: where the SR points a viewer
    key_slice: int
    # touches the first or last slice or the edge of the field of view: the scan shows part of it
    incomplete: bool = False

    def rounded(self) -> Measurement:
        """The same measurement at reported precision (what the SR and summary.json carry)."""
        return replace(
            self,
            volume_ml=round(self.volume_ml, VOLUME_DECIMALS),
            surface_area_cm2=None if self.surface_area_cm2 is None
            else round(self.surface_area_cm2, AREA_DECIMALS),
            mean=round(self.mean, INTENSITY_DECIMALS) + 0.0,  # + 0.0: no "-0.0"
            std=round(self.std, INTENSITY_DECIMALS) + 0.0,
        )


def not_found(structures: Sequence[Label], measurements: Sequence[Measurement]) -> list[Label]:
    """The declared structures without a measurement: the model looked and found no voxel."""
    found = {m.label.value for m in measurements}
    return [label for label in structures if label.value not in found]


def measure(
    volume: Volume,
    label_map: np.ndarray,
    structures: Sequence[Label],
    meshes: Sequence[Mesh],
) -> list[Measurement]:
    """One Measurement per non-empty label: voxel volume, mesh area and value statistics.

    Counts, means and squared deviations come from bincounts over every label value at once
    (``_value_stats``), and a structure that includes other labels adds theirs up.
    """
    voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
    edges = _edge_values(label_map)
    cut = {label.value: [face for face, values in edges.items()
                         if values & {label.value, *label.includes}] for label in structures}
    areas = {mesh.label.value: _uncut_area_mm2(mesh, volume.affine, label_map.shape,
                                               cut.get(mesh.label.value, [])) / 100.0
             for mesh in meshes}
    stats, per_slice = _value_stats(volume.array, label_map)
    results = []
    for label in structures:
        count, mean, deviations = _combined([stats.get(v, (0, 0.0, 0.0))
                                              for v in (label.value, *label.includes)])
        if count == 0:
            continue
        results.append(
            Measurement(
                label=label,
                voxel_count=count,
                volume_ml=count * voxel_ml,
                surface_area_cm2=areas.get(label.value),
                mean=mean,
                std=float(np.sqrt(deviations / count)),
                key_slice=int(np.argmax(per_slice[:, label.values].sum(axis=1))),
                incomplete=bool(cut[label.value]),
            )
        )
    return results


def _value_stats(values: np.ndarray, label_map: np.ndarray
                 ) -> tuple[dict[int, tuple[int, float, float]], np.ndarray]:
    """Label value -> (count, mean, sum of squared deviations) of the voxel values it labels, and
    the (slices, 256) voxel count of each label value on each slice.

    A slab of slices at a time (gathering one value's voxels is the fastest way numpy has), the
    slabs pooled with ``_combined`` in slice order: no float copy of the whole volume is ever
    made. Two slabs at once where two cores may be used: numpy releases the GIL in the compares,
    gathers and sums, and the measures run after the SEG writer child has left its core.
    """
    per_slab = on_two_threads(lambda slab: _slab_stats(values[slab], label_map[slab]),
                              _slabs(len(values)))
    parts: dict[int, list[tuple[int, float, float]]] = {}
    for found, _ in per_slab:
        for value, part in found:
            parts.setdefault(value, []).append(part)
    per_slice = np.concatenate([counts for _, counts in per_slab])
    return {value: _combined(groups) for value, groups in parts.items()}, per_slice


def _slab_stats(voxels: np.ndarray, labels: np.ndarray
                ) -> tuple[list[tuple[int, tuple[int, float, float]]], np.ndarray]:
    """(label value, (count, mean, sum of squared deviations)) of each value in one slab, and
    the slab's (slices, 256) voxel counts per label value."""
    per_slice = np.stack([np.bincount(plane.ravel(), minlength=256)[:256] for plane in labels])
    found = []
    # the label values in this slab, background (0) left out: no structure is background
    for value in (np.flatnonzero(per_slice[:, 1:].any(axis=0)) + 1).tolist():
        inside = voxels[labels == value].astype(np.float64)
        mean = float(inside.mean())
        inside -= mean
        # squared and summed in place, not np.dot: BLAS would spin threads of its own
        deviations = float(np.square(inside, out=inside).sum())
        found.append((value, (inside.size, mean, deviations)))
    return found, per_slice


def _slabs(slices: int) -> list[slice]:
    return [slice(start, start + SLAB_SLICES) for start in range(0, slices, SLAB_SLICES)]


def _combined(parts: list[tuple[int, float, float]]) -> tuple[int, float, float]:
    """Pooled (count, mean, sum of squared deviations) of groups (Chan et al.), stable in float."""
    count, mean, deviations = 0, 0.0, 0.0
    for n, part_mean, part_deviations in parts:
        if n == 0:
            continue
        total = count + n
        delta = part_mean - mean
        deviations += part_deviations + delta * delta * count * n / total
        mean += delta * n / total
        count = total
    return count, mean, deviations


def _edge_values(label_map: np.ndarray) -> dict[tuple[int, int], set[int]]:
    """Label values on each face of the scanned box: (axis, 0 = first / 1 = last) -> values."""
    faces = {}
    for axis in range(3):
        for side, index in ((0, 0), (1, label_map.shape[axis] - 1)):
            faces[(axis, side)] = set(np.unique(np.take(label_map, index, axis=axis)).tolist()) - {0}
    return faces


def _uncut_area_mm2(mesh: Mesh, affine: np.ndarray, shape: tuple[int, ...],
                    cut_faces: Sequence[tuple[int, int]]) -> float:
    """The mesh's area without the triangles that close it along the faces the scan cut.

    The surface closes half a voxel beyond the outermost voxel centres, flat along the box face;
    those triangles are found in voxel index space (where the face is a coordinate plane).
    """
    if not cut_faces:
        return mesh.area_mm2
    points = mesh.points.astype(np.float64)
    index = (points - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    p0, p1, p2 = (points[mesh.triangles[:, i]] for i in range(3))
    areas = np.linalg.norm(np.cross(p1 - p0, p2 - p0), axis=1) / 2.0
    i0, i1, i2 = (index[mesh.triangles[:, i]] for i in range(3))
    centroids = (i0 + i1 + i2) / 3.0
    # outward in LPS; the index axes may be a mirror image of LPS (then the cross product flips)
    normals = np.cross(i1 - i0, i2 - i0) * np.sign(np.linalg.det(affine[:3, :3]))
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    on_cut = np.zeros(len(areas), bool)
    for axis, side in cut_faces:
        if side == 0:
            on_cut |= (centroids[:, axis] < 0.0) & (-normals[:, axis] > _CUT_FACE_COSINE)
        else:
            on_cut |= ((centroids[:, axis] > shape[axis] - 1)
                       & (normals[:, axis] > _CUT_FACE_COSINE))
    return float(areas[~on_cut].sum())
