"""A label volume -> one BINARY DICOM Segmentation (highdicom), one segment per structure.

BINARY rather than LABELMAP because it is what most viewers and PACS read today, and because our
structures overlap (the body contains the lungs), which one labelmap frame cannot express.
Frames are aligned to the source slices, so each frame references the CT slice it was derived from.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom

from dicom_out.codes import term_for
from dicom_out.identity import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    MODEL_NAME,
    SERIES_NUMBER,
    SOFTWARE_VERSION,
    Algorithm,
    algorithm_identification,
    derived_uid,
)
from dicom_out.sources import source_headers
from inference.models import Label
from inference.volume import Volume


def segment_tracking_uid(volume: Volume, algorithm: Algorithm, label: Label) -> str:
    """The Tracking UID of a structure's segment; the SR names the same UID for its measurements."""
    return derived_uid(volume.series_uid, algorithm, f"segment/{label.name}")


def segment_numbers(seg: pydicom.Dataset) -> dict[str, int]:
    """Tracking UID -> Segment Number of a SEG written by :func:`build_seg`."""
    return {str(item.TrackingUID): int(item.SegmentNumber) for item in seg.SegmentSequence}


def segment_description(number: int, label: Label, volume: Volume,
                        algorithm: Algorithm) -> hd.seg.SegmentDescription:
    """The coded description of one structure's segment (category, type, laterality, colour)."""
    term = term_for(label.name)
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
    )
    if term.modifier is not None:
        # highdicom's constructor has no parameter for the laterality modifier (CID 244).
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(term.modifier)
        ]
    return description


def build_seg(volume: Volume, labels: np.ndarray, label_defs: Sequence[Label],
              algorithm: Algorithm) -> pydicom.Dataset:
    """A BINARY Segmentation of every non-empty label, in the source study, with derived UIDs."""
    if labels.shape != volume.array.shape:
        raise ValueError(f"label array shape {labels.shape} differs from the volume's "
                         f"{volume.array.shape}")
    masks: list[np.ndarray] = []
    descriptions: list[hd.seg.SegmentDescription] = []
    for label in label_defs:
        mask = label.mask(labels)
        if not mask.any():
            continue
        masks.append(mask)
        descriptions.append(segment_description(len(masks), label, volume, algorithm))
    if not masks:
        raise ValueError("no label has any voxel: there is nothing to write as a segmentation")

    seg = hd.seg.Segmentation(
        source_images=source_headers(volume),
        pixel_array=np.stack(masks, axis=-1),  # (frames = source slices, rows, cols, segments)
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(volume.series_uid, algorithm, "seg/series"),
        series_number=SERIES_NUMBER["seg"],
        sop_instance_uid=derived_uid(volume.series_uid, algorithm, "seg/instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=SOFTWARE_VERSION,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        content_label="SEGMENTATION",
        content_description=f"{algorithm.name} {algorithm.version}"[:64],
        content_creator_name="Vesalius^Node",
    )
    seg.SeriesDescription = f"Vesalius {algorithm.name} segmentation"[:64]
    return seg
