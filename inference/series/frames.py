"""Multi-frame flattening: an enhanced / legacy-converted instance becomes one slice per frame.

Each frame's header gets the geometry its functional groups carry (see ``frame_number``), so the
rest of the reading treats it like a classic single-frame slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import DataElement

from vesalius.inference.volume import Volume, VolumeError

# ImageType / FrameType values of projection images that are not slices of the volume. LOCALIZER
# is the standard's defined term; SCOUT and TOPOGRAM are what some vendors write instead.
_LOCALIZER_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM"})


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
    return header, np.argsort([n for n in numbers if n is not None])


@dataclass(frozen=True, eq=False)
class Slice:
    """One slice: its header, the dataset holding its pixels and, for a multi-frame one, its frame."""

    header: pydicom.Dataset
    pixels: pydicom.Dataset
    frame: int | None = None  # 0-based index into a multi-frame instance's frames
    frame_type: tuple[str, ...] = ()


def frame_slices(ds: pydicom.Dataset) -> list[Slice]:
    """A single-frame instance is one slice; a multi-frame one is one slice per frame."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return [Slice(ds, ds, None, ())]
    per_frame = ds.PerFrameFunctionalGroupsSequence
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if len(per_frame) != frames:
        raise VolumeError(
            f"instance {instance_name(ds)} has {frames} frames but {len(per_frame)} per-frame functional "
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
        out.append(Slice(header, ds, index, frame_type))
    return out


def _frame_value(item: pydicom.Dataset, shared: pydicom.Dataset, macro: str, keyword: str) -> Any:
    """An attribute of a frame's functional group, per-frame first, else shared; or None."""
    for group in (item, shared):
        sequence = group.get(macro)
        if sequence and keyword in sequence[0]:
            return sequence[0][keyword].value
    return None


def is_localizer(piece: Slice) -> bool:
    image_type = piece.header.get("ImageType") or ()
    values = {str(v).upper() for v in image_type} | set(piece.frame_type)
    return bool(values & _LOCALIZER_TYPES)


def instance_name(ds: pydicom.Dataset) -> str:
    frame = ds.get(_FRAME_NUMBER) if "PerFrameFunctionalGroupsSequence" in ds else None
    name = str(ds.get("SOPInstanceUID", "?"))
    return f"{name} frame {frame}" if frame is not None else name
