"""A received series as a volume placed in patient space (array + affine + source headers).

What real scanners send, and what this module does with it (docs/input.md is the long form):

- every transfer syntax pydicom decodes (uncompressed, deflated, RLE, JPEG, JPEG-LS, JPEG 2000);
- classic single-frame slices, or enhanced / legacy-converted multi-frame instances whose frames
  carry their geometry in functional groups: each frame becomes one slice (see ``frame_number``);
- the same SOP Instance UID twice is read once; localizer (scout) images are left out;
- refused, with the reason: several orientations, several echoes / time points / b-values at the
  same positions, a missing slice or spacing irregular beyond 10 % of the median step, and a
  sheared stack (gantry tilt), because each would give a silently wrong surface.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut


class VolumeError(ValueError):
    """The series cannot be placed in space; str(err) is the human reason stored on the job."""


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxel values with the geometry that places them in the patient.

    ``array`` has shape (slices, rows, cols) and holds modality values (HU for CT);
    ``affine`` maps homogeneous (slice, row, col, 1) indices to patient LPS millimetres;
    ``sources`` are the source headers (no pixel data), one per slice, in array order. A slice
    that is a frame of a multi-frame instance has a header of its own: see ``frame_number``.
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
# ImageType / FrameType values of projection images that are not slices of the volume. LOCALIZER
# is the standard's defined term; SCOUT and TOPOGRAM are what some vendors write instead.
_LOCALIZER_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM"})
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
# Top-level attributes a frame's header gets from its functional groups (macro, attribute, VR).
_FRAME_ATTRIBUTES = (
    ("PlanePositionSequence", "ImagePositionPatient", "DS"),
    ("PlaneOrientationSequence", "ImageOrientationPatient", "DS"),
    ("PixelMeasuresSequence", "PixelSpacing", "DS"),
    ("PixelMeasuresSequence", "SliceThickness", "DS"),
    ("PixelMeasuresSequence", "SpacingBetweenSlices", "DS"),
    ("PixelValueTransformationSequence", "RescaleIntercept", "DS"),
    ("PixelValueTransformationSequence", "RescaleSlope", "DS"),
    ("PixelValueTransformationSequence", "RescaleType", "LO"),
    ("FrameContentSequence", "TemporalPositionIndex", "UL"),
    ("MRDiffusionSequence", "DiffusionBValue", "FD"),
)
_FRAME_TYPE_MACROS = ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence", "FrameTypeSequence")
_FRAME_NUMBER = "ReferencedFrameNumber"


def frame_number(source: pydicom.Dataset) -> int | None:
    """The 1-based frame of the multi-frame instance that a ``Volume.sources`` header stands for.

    A frame's header is a copy of its instance's header (same SOP Class and Instance UID, every
    attribute but the pixel data, the functional groups included) with that frame's geometry and
    rescale also written at the top level, as on a single-frame slice, and the frame number in
    Referenced Frame Number. ``None`` for a single-frame instance.
    """
    value = source.get(_FRAME_NUMBER)
    return None if value is None or "PerFrameFunctionalGroupsSequence" not in source else int(value)


def multiframe_header(source: pydicom.Dataset) -> pydicom.Dataset:
    """The instance header a frame's header was made from (top-level frame attributes removed)."""
    header = pydicom.Dataset()
    added = {keyword for _, keyword, _ in _FRAME_ATTRIBUTES} | {_FRAME_NUMBER, "EchoTime"}
    for element in source:
        if element.keyword not in added:
            header.add(element)
    if hasattr(source, "file_meta"):
        header.file_meta = source.file_meta
    return header


def multiframe_source(volume: Volume) -> tuple[pydicom.Dataset, np.ndarray] | None:
    """The one multi-frame instance a volume is made of, as a derived object must reference it.

    Returns its header and ``order``, the array's slice indices in frame order (so
    ``labels[order]`` is a label array frame by frame, what highdicom expects with that single
    multi-frame source), when the slices are every frame of one instance; ``None`` otherwise.
    """
    numbers = [frame_number(ds) for ds in volume.sources]
    uids = {str(ds.SOPInstanceUID) for ds in volume.sources}
    header = multiframe_header(volume.sources[0])
    if None in numbers or len(uids) != 1 or int(header.NumberOfFrames) != len(numbers):
        return None
    return header, np.argsort(numbers)


@dataclass(frozen=True, eq=False)
class _Slice:
    """One slice: its header, the dataset holding its pixels and, for a multi-frame one, its frame."""

    header: pydicom.Dataset
    pixels: pydicom.Dataset
    frame: int | None = None  # 0-based index into a multi-frame instance's frames
    frame_type: tuple[str, ...] = ()


def load_series(paths: Sequence[str | Path]) -> Volume:
    """Read a series from files and place it in space; raises VolumeError when it cannot.

    Non-image instances (SR, SEG, PR, ...) and localizers among ``paths`` are ignored, and an
    instance given twice is read once; the remaining slices (single-frame images or the frames of
    multi-frame ones) must form one stack whose geometry is checked rather than assumed.
    """
    images = [ds for ds in _unique(_read_all(paths)) if _is_image(ds)]
    if not images:
        raise VolumeError("the series contains no image instances")
    _refuse_unsupported(images)
    slices = [piece for ds in images for piece in _slices(ds)]
    kept = [piece for piece in slices if not _is_localizer(piece)]
    if not kept:
        raise VolumeError(f"the series holds only localizer images ({len(slices)})")
    order, affine = _geometry([piece.header for piece in kept])
    kept = [kept[i] for i in order]
    array = _decode_all(kept)
    for ds in images:
        del ds.PixelData
    return Volume(array=array, affine=affine, sources=tuple(piece.header for piece in kept))


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


def _unique(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """One dataset per SOP Instance UID: an instance sent or copied twice is the same image."""
    seen: set[str] = set()
    unique = []
    for ds in datasets:
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid and uid in seen:
            continue
        seen.add(uid)
        unique.append(ds)
    return unique


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
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 and "PerFrameFunctionalGroupsSequence" not in ds:
            raise VolumeError(
                f"multi-frame instance {_name(ds)} has no per-frame geometry (functional groups); "
                "only enhanced/legacy-converted multi-frame images can be placed in space"
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


def _slices(ds: pydicom.Dataset) -> list[_Slice]:
    """A single-frame instance is one slice; a multi-frame one is one slice per frame."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return [_Slice(ds, ds, None, ())]
    per_frame = ds.PerFrameFunctionalGroupsSequence
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if len(per_frame) != frames:
        raise VolumeError(
            f"instance {_name(ds)} has {frames} frames but {len(per_frame)} per-frame functional "
            "group items"
        )
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_item = shared[0] if shared else pydicom.Dataset()
    base = [element for element in ds if element.keyword != "PixelData"]
    out = []
    for index, item in enumerate(per_frame):
        header = pydicom.Dataset()
        for element in base:  # shared elements: the copies cost no memory per frame
            header.add(element)
        if hasattr(ds, "file_meta"):
            header.file_meta = ds.file_meta
        for macro, keyword, vr in _FRAME_ATTRIBUTES:
            value = _frame_value(item, shared_item, macro, keyword)
            if value is not None:  # a new element, never a write into the shared one
                header.add(DataElement(keyword, vr, value))
        echo = _frame_value(item, shared_item, "MREchoSequence", "EffectiveEchoTime")
        if echo is not None:
            header.add(DataElement("EchoTime", "DS", echo))
        header.add(DataElement(_FRAME_NUMBER, "IS", index + 1))
        frame_type = next((tuple(str(v).upper() for v in value) for macro in _FRAME_TYPE_MACROS
                           if (value := _frame_value(item, shared_item, macro, "FrameType"))),
                          ())
        out.append(_Slice(header, ds, index, frame_type))
    return out


def _frame_value(item: pydicom.Dataset, shared: pydicom.Dataset, macro: str, keyword: str):
    """An attribute of a frame's functional group, per-frame first, else shared; or None."""
    for group in (item, shared):
        sequence = group.get(macro)
        if sequence and keyword in sequence[0]:
            return sequence[0][keyword].value
    return None


def _is_localizer(piece: _Slice) -> bool:
    image_type = piece.header.get("ImageType") or ()
    values = {str(v).upper() for v in image_type} | set(piece.frame_type)
    return bool(values & _LOCALIZER_TYPES)


def _vector(ds: pydicom.Dataset, keyword: str, size: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != size:
        raise VolumeError(f"missing or malformed {keyword} in instance {_name(ds)}")
    try:
        return np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"malformed {keyword} in instance {_name(ds)}") from exc


def _name(ds: pydicom.Dataset) -> str:
    frame = ds.get(_FRAME_NUMBER) if "PerFrameFunctionalGroupsSequence" in ds else None
    name = str(ds.get("SOPInstanceUID", "?"))
    return f"{name} frame {frame}" if frame is not None else name


def _geometry(images: list[pydicom.Dataset]) -> tuple[np.ndarray, np.ndarray]:
    """Slice order and the (slice, row, col) -> LPS affine, after checking consistency."""
    first = images[0]
    size = (int(first.Rows), int(first.Columns))
    spacing = _vector(first, "PixelSpacing", 2)
    iop = _vector(first, "ImageOrientationPatient", 6)
    orientations = [_vector(ds, "ImageOrientationPatient", 6) for ds in images]
    for ds, orientation in zip(images[1:], orientations[1:], strict=True):
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise VolumeError(
                f"different image sizes: {size[0]}x{size[1]} and {int(ds.Rows)}x{int(ds.Columns)}"
            )
        if not np.allclose(_vector(ds, "PixelSpacing", 2), spacing, rtol=1e-4, atol=1e-6):
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
    positions = np.array([_vector(ds, "ImagePositionPatient", 3) for ds in images])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    positions = positions[order]
    if len(images) > 1:
        _refuse_stacked([images[i] for i in order], along)
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


def _refuse_stacked(images: list[pydicom.Dataset], along: np.ndarray) -> None:
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


def _decode_all(slices: list[_Slice]) -> np.ndarray:
    """Modality values (rescale / Modality LUT applied) as float32, one instance per thread."""
    first = slices[0].header
    out = np.empty((len(slices), int(first.Rows), int(first.Columns)), dtype=np.float32)
    by_instance: dict[int, list[int]] = {}
    for index, piece in enumerate(slices):
        by_instance.setdefault(id(piece.pixels), []).append(index)

    def decode(indices: list[int]) -> None:
        ds = slices[indices[0]].pixels
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # any decoder failure is a refusal with the reason
            syntax = ds.file_meta.get("TransferSyntaxUID", "?") if "file_meta" in ds else "?"
            raise VolumeError(
                f"cannot decode pixel data of instance {_name(ds)} (transfer syntax {syntax}): "
                f"{exc}"
            ) from exc
        for index in indices:
            piece = slices[index]
            frame = pixels if piece.frame is None or pixels.ndim == 2 else pixels[piece.frame]
            out[index] = apply_modality_lut(frame, piece.header)

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        list(pool.map(decode, by_instance.values()))
    return out
