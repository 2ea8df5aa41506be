"""A label volume -> one DICOM Segmentation (highdicom), one segment per structure.

BINARY (Segmentation Storage, ...66.4) by default: it is what most viewers and PACS read today, and
it lets structures overlap (the body contains the lungs). LABELMAP (Label Map Segmentation Storage,
...66.7, RLE compressed) is the compact option for destinations that read it: one frame per slice
for all structures, so 100+ TotalSegmentator classes cost no more than one. A labelmap voxel holds
one segment, so a structure that contains others (``Label.includes``) keeps only its own voxels
there; its Segment Description says which segments complete it.

Both types number segments the same way (non-empty labels in model order, from 1) and use the same
Tracking UIDs, so the SR and the surfaces name the same structure by the same number in either.
The SR references the BINARY SEG (Referenced Segment Number is defined for Segmentation Storage
only), so a LABELMAP SEG is sent in addition to the BINARY one, never instead of it.
Frames are aligned to the source slices: frame i of a segment is derived from, and references,
source slice i. Empty frames are kept (see ``KEEP_EMPTY_FRAMES_UP_TO``).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom

from vesalius.dicom_out.identity import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    MODEL_NAME,
    SERIES_NUMBER,
    SOFTWARE_VERSION,
    Algorithm,
    algorithm_identification,
    derived_uid,
    name_series,
)
from vesalius.dicom_out.seg_overlap import Segmentation, SegmentMasks
from vesalius.dicom_out.sources import source_headers, tidy
from vesalius.inference.models import Label
from vesalius.inference.series import multiframe_source
from vesalius.inference.terminology import term_for
from vesalius.inference.volume import Volume

BINARY, LABELMAP = "BINARY", "LABELMAP"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
# OHIF/cornerstone (OHIF#2833, highdicom#214, monai-deploy-app-sdk#397) have drawn SEGs whose empty
# frames were omitted shifted by the number of missing slices; keeping every frame avoids that in
# every viewer. A BINARY frame costs rows*cols/8 bytes, so beyond this many frames (segments x
# slices, ~330 MB at 512x512) the empty ones are left out and the file stays sendable.
KEEP_EMPTY_FRAMES_UP_TO = 10_000


def role_prefix(seg: pydicom.Dataset | None) -> str:
    """UID role prefix of the objects derived from ``seg``: "" for BINARY, "labelmap-" otherwise.

    The surfaces reference one SEG by SOP Instance UID; those made for the LABELMAP SEG are
    distinct objects with their own UIDs. (The SR always references the BINARY SEG.)
    """
    if seg is not None and seg.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE:
        return "labelmap-"
    return ""


def segment_tracking_uid(volume: Volume, algorithm: Algorithm, label: Label) -> str:
    """The Tracking UID of a structure's segment; the SR names the same UID for its measurements."""
    return derived_uid(volume.series_uid, algorithm, f"segment/{label.name}")


def segment_numbers(seg: pydicom.Dataset) -> dict[str, int]:
    """Tracking UID -> Segment Number of a SEG written by :func:`build_seg`."""
    return {str(item.TrackingUID): int(item.SegmentNumber) for item in seg.SegmentSequence
            if "TrackingUID" in item}


def segment_description(number: int, label: Label, volume: Volume,
                        algorithm: Algorithm) -> hd.seg.SegmentDescription:
    """The coded description of one structure's segment (category, type, laterality, colour)."""
    term = term_for(label.name)
    regions = [term.region] if term.region is not None else None
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=term.label,
        segmented_property_category=term.category,
        segmented_property_type=term.type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(algorithm),
        tracking_uid=segment_tracking_uid(volume, algorithm, label),
        tracking_id=term.label,
        display_color=hd.color.CIELabColor.from_rgb(*term.rgb),
        anatomic_regions=regions,
    )
    if term.region_modifier is not None:
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [
            hd.sr.CodedConcept.from_code(term.region_modifier)
        ]
    if term.modifier is not None:
        # highdicom's constructor has no parameter for the laterality modifier (CID 244).
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(term.modifier)
        ]
    return description


def build_seg(volume: Volume, label_map: np.ndarray, structures: Sequence[Label],
              algorithm: Algorithm, *, segmentation_type: str = BINARY) -> pydicom.Dataset:
    """A Segmentation of every non-empty label, in the source study, with derived UIDs.

    ``segmentation_type`` is ``"BINARY"`` (Segmentation Storage, the default: every viewer reads
    it) or ``"LABELMAP"`` (Label Map Segmentation Storage, RLE Lossless; for destinations that
    accept that SOP class; its UIDs differ from the BINARY one's). Both pass dciodvfy.
    """
    if segmentation_type not in (BINARY, LABELMAP):
        raise ValueError(f"segmentation_type must be {BINARY!r} or {LABELMAP!r}, "
                         f"not {segmentation_type!r}")
    if label_map.shape != volume.array.shape:
        raise ValueError(f"label map shape {label_map.shape} differs from the volume's "
                         f"{volume.array.shape}")
    present = present_labels(label_map, structures)
    if not present:
        raise ValueError("no label has any voxel: there is nothing to write as a segmentation")
    descriptions = [segment_description(number, label, volume, algorithm)
                    for number, label in enumerate(present, start=1)]
    uid_kind = "seg" if segmentation_type == BINARY else "labelmap-seg"
    if segmentation_type == BINARY:
        pixels = _binary_stack(label_map, present)
        keep_empty = label_map.shape[0] * len(present) <= KEEP_EMPTY_FRAMES_UP_TO
        transfer_syntax = pydicom.uid.ExplicitVRLittleEndian
    else:
        pixels = _labelmap(label_map, present)
        _describe_partial_segments(descriptions, present)
        keep_empty = True  # one RLE frame per slice: empty ones cost a few bytes
        transfer_syntax = pydicom.uid.RLELossless

    source_images = source_headers(volume)
    multiframe = multiframe_source(volume)
    if multiframe is not None:  # an Enhanced CT/MR: one source, frames in its own frame order
        header, order = multiframe
        source_images = [tidy(header)]
        pixels = (np.moveaxis(np.moveaxis(pixels, -1, 0)[:, order], 0, -1) if pixels.ndim == 4
                  else pixels[order])  # a BINARY stack keeps each segment's frames contiguous
    seg = Segmentation(
        source_images=source_images,
        pixel_array=pixels,  # (frames = source slices/frames, rows, cols[, segments])
        segmentation_type=segmentation_type,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(volume.series_uid, algorithm, f"{uid_kind}/series"),
        series_number=SERIES_NUMBER[uid_kind],
        sop_instance_uid=derived_uid(volume.series_uid, algorithm, f"{uid_kind}/instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=SOFTWARE_VERSION,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        content_label="SEGMENTATION",
        content_description=f"{algorithm.name} {algorithm.version}"[:64],
        content_creator_name="Vesalius^Node",
        transfer_syntax_uid=transfer_syntax,
        omit_empty_frames=not keep_empty,
    )
    name_series(seg, algorithm, uid_kind)
    if segmentation_type == LABELMAP:
        drop_background_segment(seg)
    return seg


def present_labels(label_map: np.ndarray, structures: Sequence[Label]) -> list[Label]:
    """The structures with a voxel, in model order: the SEG's segments 1..N."""
    found = np.any(values_per_slice(label_map), axis=0)
    return [label for label in structures if found[label.values].any()]


# What the SR, the surfaces and the STLs take from the BINARY SEG they reference: its identity,
# and the patient and study that the SR copies from its first evidence (highdicom's SEG has them
# from the first source image)
REFERENCE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
PATIENT_STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                          "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                          "ReferringPhysicianName", "SpecificCharacterSet")


def seg_reference(volume: Volume, present: Sequence[Label], algorithm: Algorithm) -> pydicom.Dataset:
    """What the objects referencing the BINARY SEG that :func:`build_seg` makes for the same
    structures read of it (its UIDs, patient and study, segment numbers and Tracking UIDs), known
    before it is written: they are built while a child still writes it (node.pipeline).
    ``present``: the structures with a voxel, in model order (``present_labels``, or the labels of
    the measurements, which are exactly those). ``check_reference`` holds the written SEG to it."""
    reference = pydicom.Dataset()
    reference.SOPClassUID = SEGMENTATION_STORAGE
    reference.SOPInstanceUID = derived_uid(volume.series_uid, algorithm, "seg/instance")
    reference.SeriesInstanceUID = derived_uid(volume.series_uid, algorithm, "seg/series")
    reference.StudyInstanceUID = volume.study_uid
    source = tidy(volume.sources[0])
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            reference[keyword] = source[keyword]
    reference.SegmentSequence = []
    for number, label in enumerate(present, start=1):
        item = pydicom.Dataset()
        item.SegmentNumber = number
        item.TrackingUID = segment_tracking_uid(volume, algorithm, label)
        reference.SegmentSequence.append(item)
    return reference


def check_reference(reference: pydicom.Dataset, seg: pydicom.Dataset) -> None:
    """ValueError unless the written SEG is the one :func:`seg_reference` promised."""
    differ = [keyword for keyword in (*REFERENCE_KEYWORDS, *PATIENT_STUDY_KEYWORDS)
              if reference.get(keyword) != seg.get(keyword)]
    if segment_numbers(reference) != segment_numbers(seg):
        differ.append("SegmentSequence")
    if differ:
        raise ValueError(f"the SEG written differs from the one referenced in {', '.join(differ)}")


def drop_background_segment(seg: pydicom.Dataset) -> None:
    """Remove the "Background" item (Segment Number 0) highdicom writes first in a Label Map SEG.

    The Label Map Segmentation IOD does not require a segment for pixel value 0, and OHIF 3.x
    both lists it and takes segment colours by list position, so with the item every structure
    was drawn in its neighbour's colour. Nothing else is renumbered: segments keep 1..N, the
    pixel values, and Pixel Padding Value 0 (pixels in no segment).
    """
    seg.SegmentSequence = [item for item in seg.SegmentSequence if int(item.SegmentNumber) != 0]


def values_per_slice(label_map: np.ndarray) -> np.ndarray:
    """(slices, 256) bool: which label values occur in each slice (one bincount per slice)."""
    return np.stack([np.bincount(plane.ravel(), minlength=256)[:256] > 0
                     for plane in label_map.astype(np.uint8, copy=False)])


def _binary_stack(label_map: np.ndarray, present: Sequence[Label]) -> np.ndarray:
    """The segments' 0/1 masks, (slices, rows, cols, segments) for highdicom, as the label map
    itself and which label values each segment holds (dicom_out.seg_overlap.SegmentMasks): each
    frame's mask is made as highdicom encodes it, so no full-volume mask is ever held."""
    members = np.zeros((len(present) + 1, 256), np.uint8)
    for number, label in enumerate(present, start=1):
        members[number, label.values] = 1
    return SegmentMasks(label_map.astype(np.uint8, copy=False), members)


def _labelmap(label_map: np.ndarray, present: Sequence[Label]) -> np.ndarray:
    """Segment numbers per voxel: each voxel gets the segment of its own label value."""
    by_value = np.zeros(256, np.uint8 if len(present) < 256 else np.uint16)  # highdicom's dtype
    for number, label in enumerate(present, start=1):
        by_value[label.value] = number
    return by_value[label_map.astype(np.uint8, copy=False)]


def _describe_partial_segments(descriptions: Sequence[hd.seg.SegmentDescription],
                               present: Sequence[Label]) -> None:
    """Say, in a labelmap, which segments complete a structure that contains others."""
    numbers = {label.value: number for number, label in enumerate(present, start=1)}
    for description, label in zip(descriptions, present, strict=True):
        parts = [numbers[value] for value in label.includes if value in numbers]
        if parts:
            description.SegmentDescription = (
                f"with segments {', '.join(map(str, parts))} forms the whole structure")[:64]
