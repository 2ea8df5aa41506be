"""A structure's mesh -> an Encapsulated STL object (PS3.3 A.85), so 3D-printing labs pull models
from the PACS.

One instance per structure, all of one run in one series and one Model Group (so a lab fetches
the set), each holding the binary STL of ``dicom_out.stl`` in patient (LPS) coordinates and
millimetres: the Frame of Reference is the CT's and the Measurement Units say "mm". Source
Instance Sequence names the CT slices (and the SEG when given) the model was derived from.
"""

from __future__ import annotations

from collections.abc import Sequence

import pydicom
from pydicom.sr.coding import Code

from vesalius.dicom_out.common import (
    check_same_study,
    code_item,
    common_instance_references,
    derived_from,
    image_reference,
    new_derived_dataset,
)
from vesalius.dicom_out.identity import SERIES_NUMBER, Algorithm, derived_uid
from vesalius.dicom_out.seg import segment_tracking_uid
from vesalius.dicom_out.sources import tidy
from vesalius.dicom_out.stl import stl_bytes
from vesalius.inference.surfaces import Mesh
from vesalius.inference.terminology import term_for
from vesalius.inference.volume import Volume

ENCAPSULATED_STL_STORAGE = "1.2.840.10008.5.1.4.1.1.104.3"
MILLIMETRE = Code("mm", "UCUM", "mm")
STL_MIME_TYPE = "model/stl"


def encapsulated_stl_uid(volume: Volume, algorithm: Algorithm, mesh: Mesh) -> str:
    """The SOP Instance UID of a structure's Encapsulated STL (deterministic, per structure)."""
    return derived_uid(volume.series_uid, algorithm, f"stl/instance/{mesh.label.name}")


def build_encapsulated_stl(volume: Volume, mesh: Mesh, algorithm: Algorithm, *,
                           instance_number: int = 1,
                           seg: pydicom.Dataset | None = None) -> pydicom.Dataset:
    """One structure's mesh as an Encapsulated STL instance in the source study.

    ``instance_number`` orders the structures within the series; ``seg``, when given, is named
    as a source next to the CT slices. Re-running the same model on the same series gives the
    same UIDs.
    """
    check_same_study(volume, seg)
    data = stl_bytes(mesh)  # refuses empty meshes
    term = term_for(mesh.label.name)
    source = tidy(volume.sources[0])
    ds = new_derived_dataset(source, ENCAPSULATED_STL_STORAGE,
                             encapsulated_stl_uid(volume, algorithm, mesh))
    # Encapsulated Document Series
    ds.Modality = "M3D"
    ds.SeriesInstanceUID = derived_uid(volume.series_uid, algorithm, "stl/series")
    ds.SeriesNumber = SERIES_NUMBER["stl"]
    ds.SeriesDescription = f"Vesalius {algorithm.name} 3D models"[:64]
    # Frame of Reference: the model is in the CT's patient coordinates
    ds.FrameOfReferenceUID = volume.frame_of_reference_uid
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
    # Manufacturing 3D Model
    ds.MeasurementUnitsCodeSequence = [code_item(MILLIMETRE)]
    ds.ModelGroupUID = derived_uid(volume.series_uid, algorithm, "stl/model-group")
    # Encapsulated Document
    ds.InstanceNumber = instance_number
    ds.AcquisitionDateTime = ""
    ds.BurnedInAnnotation = "NO"
    ds.DocumentTitle = f"{term.label} ({algorithm.name} {algorithm.version})"[:64]
    ds.ConceptNameCodeSequence = [code_item(term.type)]
    ds.SourceInstanceSequence = [image_reference(d) for d in derived_from(volume, seg)]
    ds.MIMETypeOfEncapsulatedDocument = STL_MIME_TYPE
    ds.EncapsulatedDocument = data
    ds.EncapsulatedDocumentLength = len(data)
    # the same structure is tracked by the same UID in the SEG, the surfaces and the SR
    ds.ContentDescription = f"Tracking UID {segment_tracking_uid(volume, algorithm, mesh.label)}"[:64]
    # Common Instance Reference
    ds.ReferencedSeriesSequence = common_instance_references(volume, seg)
    return ds


def build_encapsulated_stls(volume: Volume, meshes: Sequence[Mesh], algorithm: Algorithm, *,
                            names: Sequence[str] | None = None,
                            seg: pydicom.Dataset | None = None) -> list[pydicom.Dataset]:
    """Encapsulated STL instances for every mesh, or only those whose label name is in ``names``.

    Instance numbers follow the mesh order, so a structure keeps its number whichever are chosen.
    """
    if names is not None:
        unknown = set(names) - {mesh.label.name for mesh in meshes}
        if unknown:
            raise ValueError(f"no mesh for {sorted(unknown)}")
    return [build_encapsulated_stl(volume, mesh, algorithm, instance_number=number, seg=seg)
            for number, mesh in enumerate(meshes, start=1)
            if names is None or mesh.label.name in names]
