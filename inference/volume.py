"""A received series as a volume placed in patient space (array + affine + source headers)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut


class VolumeError(ValueError):
    """The series cannot be placed in space; str(err) is the human reason stored on the job."""


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxel values with the geometry that places them in the patient.

    ``array`` has shape (slices, rows, cols) and holds modality values (HU for CT);
    ``affine`` maps homogeneous (slice, row, col, 1) indices to patient LPS millimetres;
    ``sources`` are the source headers (no pixel data), one per slice, in array order.
    """

    array: np.ndarray
    affine: np.ndarray
    sources: tuple[pydicom.Dataset, ...]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along (slice, row, col)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def series_uid(self) -> str:
        return str(self.sources[0].SeriesInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.sources[0].StudyInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.sources[0].FrameOfReferenceUID)

    @property
    def modality(self) -> str:
        return str(self.sources[0].Modality)


# Storage SOP classes that carry pixel data but are not slices of an image volume.
_NON_IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
        "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
        "1.2.840.10008.5.1.4.1.1.104.3",  # Encapsulated STL
        "1.2.840.10008.5.1.4.1.1.104.4",  # Encapsulated OBJ
        "1.2.840.10008.5.1.4.1.1.104.5",  # Encapsulated MTL
    }
)
_ORIENTATION_TOL = 1e-4  # direction cosines are unit vectors written with ~6 decimals
_SPACING_REL_TOL = 0.10  # slice gaps further than this from the median mean a missing slice
_DUPLICATE_TOL_MM = 1e-3
_MAX_DRIFT_PIXELS = 0.5  # in-plane offset of a slice from the stack's normal line


def load_series(paths: Sequence[str | Path]) -> Volume:
    """Read a series from files and place it in space; raises VolumeError when it cannot.

    Non-image instances (SR, SEG, PR, ...) among ``paths`` are ignored; the image instances must
    form one single-frame series with consistent geometry, which is checked rather than assumed.
    """
    datasets = _read_all(paths)
    images = [ds for ds in datasets if _is_image(ds)]
    if not images:
        raise VolumeError("the series contains no image instances")
    _refuse_unsupported(images)
    order, affine = _geometry(images)
    images = [images[i] for i in order]
    array = _decode_all(images)
    for ds in images:
        del ds.PixelData
    return Volume(array=array, affine=affine, sources=tuple(images))


def _read_all(paths: Sequence[str | Path]) -> list[pydicom.Dataset]:
    """Whole files (pixel bytes stay encoded until we know which instances we keep)."""

    def read(path: str | Path) -> pydicom.Dataset:
        try:
            return pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise VolumeError(f"cannot read {Path(path).name} as DICOM: {exc}") from exc

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        return list(pool.map(read, paths))


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _is_image(ds: pydicom.Dataset) -> bool:
    return (
        "PixelData" in ds
        and "Rows" in ds
        and str(ds.get("SOPClassUID", "")) not in _NON_IMAGE_SOP_CLASSES
    )


def _refuse_unsupported(images: list[pydicom.Dataset]) -> None:
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in images}
    if len(series) > 1:
        raise VolumeError(f"mixed SeriesInstanceUID: {len(series)} series among the instances")
    for ds in images:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            raise VolumeError(
                "enhanced/multi-frame images are not supported (only single-frame slices)"
            )
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise VolumeError(
                f"colour images are not supported (PhotometricInterpretation "
                f"{ds.get('PhotometricInterpretation', '?')})"
            )
    frames = {str(ds.get("FrameOfReferenceUID", "")) for ds in images}
    if "" in frames:
        raise VolumeError("missing FrameOfReferenceUID: the series is not placed in patient space")
    if len(frames) > 1:
        raise VolumeError(f"mixed FrameOfReferenceUID: {len(frames)} frames of reference")


def _vector(ds: pydicom.Dataset, keyword: str, size: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != size:
        raise VolumeError(f"missing or malformed {keyword} in instance {_name(ds)}")
    try:
        return np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"malformed {keyword} in instance {_name(ds)}") from exc


def _name(ds: pydicom.Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "?"))


def _geometry(images: list[pydicom.Dataset]) -> tuple[np.ndarray, np.ndarray]:
    """Slice order and the (slice, row, col) -> LPS affine, after checking consistency."""
    first = images[0]
    size = (int(first.Rows), int(first.Columns))
    spacing = _vector(first, "PixelSpacing", 2)
    iop = _vector(first, "ImageOrientationPatient", 6)
    for ds in images[1:]:
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise VolumeError(
                f"different image sizes: {size[0]}x{size[1]} and {int(ds.Rows)}x{int(ds.Columns)}"
            )
        if not np.allclose(_vector(ds, "PixelSpacing", 2), spacing, rtol=1e-4, atol=1e-6):
            raise VolumeError("different PixelSpacing between slices")
        if not np.allclose(_vector(ds, "ImageOrientationPatient", 6), iop, atol=_ORIENTATION_TOL):
            raise VolumeError("mixed orientations (ImageOrientationPatient differs between slices)")
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
    positions = np.array([_vector(ds, "ImagePositionPatient", 3) for ds in images])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    positions = positions[order]
    if len(images) > 1:
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


def _slice_step(along: np.ndarray) -> float:
    gaps = np.diff(along)
    if np.any(gaps < _DUPLICATE_TOL_MM):
        count = int(np.sum(gaps < _DUPLICATE_TOL_MM))
        raise VolumeError(f"duplicate slice positions ({count} slices share a position)")
    median = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - median)))
    if abs(gaps[worst] - median) > _SPACING_REL_TOL * median:
        raise VolumeError(
            f"missing slice or irregular slice spacing: gap of {gaps[worst]:.3g} mm after slice "
            f"{worst + 1} where the median is {median:.3g} mm"
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
            "off the slice normal (not supported)"
        )


def _decode_all(images: list[pydicom.Dataset]) -> np.ndarray:
    """Modality values (rescale / Modality LUT applied) as float32, decoded in parallel."""
    first = images[0]
    out = np.empty((len(images), int(first.Rows), int(first.Columns)), dtype=np.float32)

    def decode(index: int) -> None:
        ds = images[index]
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # any decoder failure is a refusal with the reason
            syntax = ds.file_meta.get("TransferSyntaxUID", "?") if "file_meta" in ds else "?"
            raise VolumeError(
                f"cannot decode pixel data of instance {_name(ds)} (transfer syntax {syntax}): "
                f"{exc}"
            ) from exc
        out[index] = apply_modality_lut(pixels, ds)

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        list(pool.map(decode, range(len(images))))
    return out
