"""Rendered views of the 3D model -> one Multi-frame True Color Secondary Capture in the source study.

Surface Segmentation and Encapsulated STL reach no viewer's screen; images reach every one. The
views (dicom_out.render) go into one multi-frame object played as a cine loop: the model turning
around the patient's long axis from the anterior view, the laterals among the frames. highdicom's
SCImage writes single-frame SC only, so the object is assembled on pydicom with the shared
derived-dataset builder, following PS3.3 A.8.5.4 (Patient, General Study, General Series, General
Equipment, SC Equipment, General Image, General Reference, Image Pixel, Cine, Multi-frame,
SC Multi-frame Image, Common Instance Reference, SOP Common).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pydicom

from vesalius.dicom_out.common import image_reference, new_derived_dataset, referenced_series
from vesalius.dicom_out.identity import Algorithm, derived_uid, name_series
from vesalius.dicom_out.render import LegendEntry, View, render_views, rotation_views
from vesalius.dicom_out.sources import source_headers
from vesalius.inference.measures import Measurement
from vesalius.inference.surfaces import Mesh
from vesalius.inference.terminology import term_for
from vesalius.inference.volume import Volume

MULTIFRAME_TRUE_COLOR_SC = "1.2.840.10008.5.1.4.1.1.7.4"
FRAME_TIME_MS = 250.0  # cine: one turn in 3 s at 12 views
VIEW_COUNT = 12  # every 30°: anterior, left lateral, posterior and right lateral among them
SIZE = 512


def legend_entries(meshes: Sequence[Mesh], measurements: Sequence[Measurement]) -> list[LegendEntry]:
    """One legend line per rendered structure, largest first, with its reported volume."""
    by_name = {m.label.name: m for m in measurements}
    entries = []
    for mesh in meshes:
        term = term_for(mesh.label.name)
        measurement = by_name.get(mesh.label.name)
        text = "" if measurement is None else f"{measurement.rounded().volume_ml:.1f} mL"
        if measurement is not None and measurement.incomplete:
            text += " (incomplete)"
        volume = measurement.volume_ml if measurement is not None else 0.0
        entries.append((volume, LegendEntry(term.label, term.rgb, text)))
    entries.sort(key=lambda pair: -pair[0])
    return [entry for _, entry in entries]


def build_preview(volume: Volume, meshes: Sequence[Mesh], measurements: Sequence[Measurement],
                  algorithm: Algorithm, views: Sequence[View] | None = None,
                  size: int = SIZE) -> pydicom.Dataset:
    """The rendered views as one Multi-frame True Color SC, with UIDs derived like the others."""
    views = list(views) if views is not None else rotation_views(VIEW_COUNT)
    frames = render_views(meshes, legend_entries(meshes, measurements), views, size)
    sources = source_headers(volume)
    ds = new_derived_dataset(sources[0], MULTIFRAME_TRUE_COLOR_SC,
                             derived_uid(volume.series_uid, algorithm, "preview/instance"))
    # General Series
    ds.Modality = "OT"
    ds.SeriesInstanceUID = derived_uid(volume.series_uid, algorithm, "preview/series")
    name_series(ds, algorithm, "preview")
    ds.Laterality = ""  # the views show both sides
    # SC Equipment: a workstation rendering
    ds.ConversionType = "WSD"
    # General Image
    ds.InstanceNumber = 1
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientOrientation = ""  # directions change from frame to frame: labelled in the image
    ds.BurnedInAnnotation = "NO"  # labels and legend, nothing that identifies the patient
    ds.RecognizableVisualFeatures = "NO"
    ds.DerivationDescription = (f"Surface rendering of {len(meshes)} structures segmented by "
                                f"{algorithm.name} {algorithm.version}; views: "
                                # ASCII: the source's character set may not have a degree sign
                                + ", ".join(v.name.replace("°", " degrees") for v in views))[:1024]
    # General Reference: rendered from these slices
    ds.SourceImageSequence = [image_reference(d) for d in sources]
    # Cine + Multi-frame + SC Multi-frame Image
    ds.NumberOfFrames = len(frames)
    ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
    ds.FrameTime = FRAME_TIME_MS
    ds.CineRate = round(1000.0 / FRAME_TIME_MS)
    # Image Pixel
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.stack(frames).astype(np.uint8).tobytes()
    # Common Instance Reference
    ds.ReferencedSeriesSequence = [referenced_series(sources)]
    return ds
