"""Geometry checks: slices -> stack order and the (slice, row, col) -> LPS affine, or a refusal.

Refused, with the reason: several orientations, several echoes / time points / b-values at the
same positions, a missing slice or spacing irregular beyond 10 % of the median step, and a sheared
stack (gantry tilt), because each would give a silently wrong surface.
"""

from __future__ import annotations

import numpy as np
import pydicom

from vesalius.inference.series.frames import instance_name
from vesalius.inference.volume import VolumeError

_ORIENTATION_TOL = 1e-4  # direction cosines are unit vectors written with ~6 decimals


_SPACING_REL_TOL = 0.10  # slice gaps further than this from the median mean a missing slice


_DUPLICATE_TOL_MM = 1e-3


_MAX_DRIFT_PIXELS = 0.5  # in-plane offset of a slice from the stack's normal line


# Attributes that tell apart images of one series at the same position: several of these are
# several volumes, each of which a reader looks at on its own, so the series is refused.
_STACK_DIMENSIONS = (
    ("EchoNumbers", "echoes"),
    ("EchoTime", "echoes"),
    ("DiffusionBValue", "diffusion b-values"),
    ("TemporalPositionIdentifier", "time points"),
    ("TemporalPositionIndex", "time points"),
    ("TriggerTime", "cardiac phases"),
    ("AcquisitionNumber", "acquisitions"),
)


def vector(ds: pydicom.Dataset, keyword: str, size: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != size:
        raise VolumeError(f"missing or malformed {keyword} in instance {instance_name(ds)}")
    try:
        return np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"malformed {keyword} in instance {instance_name(ds)}") from exc


def stack_geometry(images: list[pydicom.Dataset]) -> tuple[np.ndarray, np.ndarray]:
    """Slice order and the (slice, row, col) -> LPS affine, after checking consistency."""
    first = images[0]
    size = (int(first.Rows), int(first.Columns))
    spacing = vector(first, "PixelSpacing", 2)
    iop = vector(first, "ImageOrientationPatient", 6)
    orientations = [vector(ds, "ImageOrientationPatient", 6) for ds in images]
    for ds, orientation in zip(images[1:], orientations[1:], strict=True):
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise VolumeError(
                f"different image sizes: {size[0]}x{size[1]} and {int(ds.Rows)}x{int(ds.Columns)}"
            )
        if not np.allclose(vector(ds, "PixelSpacing", 2), spacing, rtol=1e-4, atol=1e-6):
            raise VolumeError("different PixelSpacing between slices")
        if not np.allclose(orientation, iop, atol=_ORIENTATION_TOL):
            raise VolumeError(_mixed_orientations(orientations))
    if np.any(spacing <= 0):
        raise VolumeError(f"invalid PixelSpacing {spacing.tolist()}")
    row_dir, col_dir = iop[:3], iop[3:]  # along a row (column index), along a column (row index)
    if (
        abs(np.linalg.norm(row_dir) - 1) > 1e-3
        or abs(np.linalg.norm(col_dir) - 1) > 1e-3
        or abs(row_dir @ col_dir) > 1e-3
    ):
        raise VolumeError(f"ImageOrientationPatient is not orthonormal: {iop.tolist()}")
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    positions = np.array([vector(ds, "ImagePositionPatient", 3) for ds in images])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    positions = positions[order]
    if len(images) > 1:
        refuse_stacked([images[i] for i in order], along)
        slice_step = _slice_step(along)
        _refuse_tilt(positions, normal, along, spacing)
    else:
        thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness")
        slice_step = float(thickness) if thickness and float(thickness) > 0 else 1.0
    affine = np.eye(4)
    affine[:3, 0] = normal * slice_step
    affine[:3, 1] = col_dir * spacing[0]
    affine[:3, 2] = row_dir * spacing[1]
    affine[:3, 3] = positions[0]
    return order, affine


def _mixed_orientations(orientations: list[np.ndarray]) -> str:
    """Why a series with several image planes is refused, with the size of each stack."""
    stacks: list[tuple[np.ndarray, int]] = []
    for orientation in orientations:
        for n, (known, count) in enumerate(stacks):
            if np.allclose(orientation, known, atol=_ORIENTATION_TOL):
                stacks[n] = (known, count + 1)
                break
        else:
            stacks.append((orientation, 1))
    sizes = ", ".join(str(count) for _, count in stacks)
    return (
        f"mixed orientations (ImageOrientationPatient differs between slices): {len(stacks)} "
        f"image planes with {sizes} slices; send each orientation as its own series"
    )


def refuse_stacked(images: list[pydicom.Dataset], along: np.ndarray) -> None:
    """Several images at one position: say which dimension (echo, time...) makes them differ."""
    same = np.flatnonzero(np.diff(along) < _DUPLICATE_TOL_MM)
    if same.size == 0:
        return
    first, second = images[same[0]], images[same[0] + 1]
    for keyword, what in _STACK_DIMENSIONS:
        a, b = first.get(keyword), second.get(keyword)
        if a is not None and b is not None and str(a) != str(b):
            values = sorted({str(ds.get(keyword, "?")) for ds in images})
            raise VolumeError(
                f"several {what} in one series ({keyword} {', '.join(values[:8])}): "
                f"{same.size} slices share a position with another; each is its own volume, "
                "send one per series"
            )
    raise VolumeError(f"duplicate slice positions ({same.size} slices share a position)")


def _slice_step(along: np.ndarray) -> float:
    gaps = np.diff(along)
    median = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - median)))
    gap = float(gaps[worst])
    if abs(gap - median) > _SPACING_REL_TOL * median:
        multiple = round(gap / median)
        where = f"gap of {gap:.3g} mm after slice {worst + 1} where the median step is {median:.3g} mm"
        if multiple >= 2 and abs(gap - multiple * median) <= _SPACING_REL_TOL * median:
            raise VolumeError(f"missing slice: {multiple - 1} slice(s) missing ({where})")
        raise VolumeError(
            f"irregular slice spacing: {where} (tolerance {_SPACING_REL_TOL:.0%} of the median)"
        )
    return float((along[-1] - along[0]) / (len(along) - 1))


def _refuse_tilt(
    positions: np.ndarray, normal: np.ndarray, along: np.ndarray, spacing: np.ndarray
) -> None:
    """Slices must stack along their normal; a sheared stack (gantry tilt) is refused.

    Rounding in written positions/orientations drifts a little; the stack is accepted while no
    slice lies more than half a pixel off the normal through the first one.
    """
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(in_plane, axis=1)
    if float(drift.max()) > _MAX_DRIFT_PIXELS * float(spacing.min()):
        angle = np.degrees(np.arctan2(drift[-1], along[-1] - along[0]))
        raise VolumeError(
            f"gantry tilt or sheared slice stack: slice positions progress {angle:.2f} degrees "
            "off the slice normal (not supported; send a tilt-corrected reconstruction)"
        )
