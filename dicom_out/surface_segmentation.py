"""Triangle meshes -> a DICOM Surface Segmentation (PS3.3 A.57), written on pydicom.

No library writes this object, so it is assembled module by module following the IOD: Patient,
General Study, General Series + Segmentation Series, Frame of Reference, General and Enhanced General
Equipment, Surface Segmentation (C.8.23.1), Surface Mesh (C.27.1), Common Instance Reference and
SOP Common. Each mesh becomes one surface of one segment: float32 points in patient LPS mm, unit
vertex normals, and triangles as 1-based indices in a Long Triangle Point Index List (OL), so
meshes with more than 65535 points need no workaround.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.sequence import Sequence as DicomSequence

from vesalius.dicom_out.common import (
    check_same_study,
    code_item,
    common_instance_references,
    derived_from,
    image_reference,
    new_derived_dataset,
)
from vesalius.dicom_out.identity import SERIES_NUMBER, Algorithm, algorithm_identification, derived_uid
from vesalius.dicom_out.seg import role_prefix, segment_tracking_uid
from vesalius.dicom_out.sources import tidy
from vesalius.inference.surfaces import Mesh
from vesalius.inference.terminology import Term, term_for
from vesalius.inference.volume import Volume

SURFACE_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.5"

def _yes_no(flag: bool) -> str:
    return "YES" if flag else "NO"


def _check_mesh(mesh: Mesh) -> None:
    """Refuse what the Surface Mesh module cannot carry or would carry wrongly."""
    points, normals, triangles = mesh.points, mesh.normals, mesh.triangles
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise ValueError(f"{mesh.label.name}: points must be a non-empty (N, 3) array")
    if normals.shape != points.shape:
        raise ValueError(f"{mesh.label.name}: one normal per point is required")
    if triangles.ndim != 2 or triangles.shape[1] != 3 or len(triangles) == 0:
        raise ValueError(f"{mesh.label.name}: triangles must be a non-empty (M, 3) array")
    if not (np.isfinite(points).all() and np.isfinite(normals).all()):
        raise ValueError(f"{mesh.label.name}: points and normals must be finite")
    if triangles.min() < 0 or triangles.max() >= len(points):
        raise ValueError(f"{mesh.label.name}: triangle index out of range 0..{len(points) - 1}")
    if len(points) >= 2**32:
        raise ValueError(f"{mesh.label.name}: too many points for 32-bit indices")


def _surface_item(number: int, mesh: Mesh, term: Term) -> pydicom.Dataset:
    """One Surface Sequence item (C.27.1): presentation, topology flags, points, normals, mesh."""
    points = np.ascontiguousarray(mesh.points, dtype="<f4")
    normals = np.ascontiguousarray(mesh.normals, dtype="<f4")
    indices = np.ascontiguousarray(mesh.triangles, dtype=np.int64) + 1  # DICOM counts from 1

    surface = pydicom.Dataset()
    surface.SurfaceNumber = number
    surface.SurfaceComments = term.label
    surface.SurfaceProcessing = "NO"
    surface.RecommendedDisplayGrayscaleValue = term.grayscale
    surface.RecommendedDisplayCIELabValue = list(term.cielab)
    surface.RecommendedPresentationOpacity = float(term.opacity)
    surface.RecommendedPresentationType = "SURFACE"
    surface.FiniteVolume = _yes_no(mesh.closed)
    surface.Manifold = _yes_no(mesh.manifold)

    surface_points = pydicom.Dataset()
    surface_points.NumberOfSurfacePoints = len(points)
    surface_points.PointCoordinatesData = points.tobytes()
    low, high = points.min(axis=0), points.max(axis=0)
    surface_points.PointsBoundingBoxCoordinates = [float(v) for v in (*low, *high)]
    surface.SurfacePointsSequence = [surface_points]

    surface_normals = pydicom.Dataset()
    surface_normals.NumberOfVectors = len(normals)
    surface_normals.VectorDimensionality = 3
    surface_normals.VectorCoordinateData = normals.tobytes()
    surface.SurfacePointsNormalsSequence = [surface_normals]

    primitives = pydicom.Dataset()
    primitives.LongVertexPointIndexList = b""
    primitives.LongEdgePointIndexList = b""
    primitives.LongTrianglePointIndexList = indices.astype("<u4").tobytes()
    primitives.TriangleStripSequence = DicomSequence()
    primitives.TriangleFanSequence = DicomSequence()
    primitives.LineSequence = DicomSequence()
    primitives.FacetSequence = DicomSequence()
    surface.SurfaceMeshPrimitivesSequence = [primitives]
    return surface


def _segment_item(number: int, mesh: Mesh, term: Term, volume: Volume, algorithm: Algorithm,
                  sources: Sequence[pydicom.Dataset]) -> pydicom.Dataset:
    """One Segment Sequence item (C.8.23.1): what the surface is, and how it was made."""
    segment = pydicom.Dataset()
    segment.SegmentNumber = number
    segment.SegmentLabel = term.label
    segment.SegmentAlgorithmType = "AUTOMATIC"
    category = code_item(term.category)
    segment.SegmentedPropertyCategoryCodeSequence = [category]
    kind = code_item(term.type)
    if term.modifier is not None:
        kind.SegmentedPropertyTypeModifierCodeSequence = [code_item(term.modifier)]
    segment.SegmentedPropertyTypeCodeSequence = [kind]
    if term.region is not None:
        region = code_item(term.region)
        if term.region_modifier is not None:
            region.AnatomicRegionModifierSequence = [code_item(term.region_modifier)]
        segment.AnatomicRegionSequence = [region]
    # The same structure carries the same Tracking UID in the SEG, the surfaces and the SR.
    segment.TrackingID = term.label
    segment.TrackingUID = segment_tracking_uid(volume, algorithm, mesh.label)
    segment.SurfaceCount = 1

    reference = pydicom.Dataset()
    reference.ReferencedSurfaceNumber = number
    # (0066,002D), which dciodvfy (and C.8.23.1) require here; (0062,0007) is not in this module.
    reference.SegmentSurfaceGenerationAlgorithmIdentificationSequence = algorithm_identification(
        algorithm
    )
    reference.SegmentSurfaceSourceInstanceSequence = [image_reference(ds) for ds in sources]
    segment.ReferencedSurfaceSequence = [reference]
    return segment


def build_surface_segmentation(volume: Volume, meshes: Sequence[Mesh], algorithm: Algorithm,
                               seg: pydicom.Dataset | None = None) -> pydicom.Dataset:
    """A Surface Segmentation with one surface per mesh, in the source study and frame of reference.

    When ``seg`` (the SEG written from the same labels, BINARY or LABELMAP) is given, it is
    referenced as a source of every surface next to the CT slices; the object made with the
    LABELMAP SEG has UIDs of its own, so send each with the SEG it references.
    """
    if not meshes:
        raise ValueError("no mesh to write as a surface segmentation")
    for mesh in meshes:
        _check_mesh(mesh)
    source = tidy(volume.sources[0])
    check_same_study(volume, seg)
    sources = derived_from(volume, seg)

    kind = f"{role_prefix(seg)}surface"  # those referencing the Label Map SEG are other objects
    ds = new_derived_dataset(source, SURFACE_SEGMENTATION_STORAGE,
                             derived_uid(volume.series_uid, algorithm, f"{kind}/instance"))
    # General Series + Segmentation Series
    ds.Modality = "SEG"
    ds.SeriesInstanceUID = derived_uid(volume.series_uid, algorithm, f"{kind}/series")
    ds.SeriesNumber = SERIES_NUMBER[kind]
    ds.SeriesDescription = f"Vesalius {algorithm.name} surfaces"[:64]
    # Frame of Reference: the surfaces are in the source's patient coordinates
    ds.FrameOfReferenceUID = volume.frame_of_reference_uid
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
    # Surface Segmentation: Content Identification, content date/time, segments
    ds.InstanceNumber = 1
    ds.ContentLabel = "SURFACES"
    ds.ContentDescription = f"{algorithm.name} {algorithm.version}"[:64]
    ds.ContentCreatorName = "Vesalius^Node"
    terms = [term_for(mesh.label.name) for mesh in meshes]
    ds.SegmentSequence = [
        _segment_item(number, mesh, term, volume, algorithm, sources)
        for number, (mesh, term) in enumerate(zip(meshes, terms, strict=True), start=1)
    ]
    # Surface Mesh
    ds.NumberOfSurfaces = len(meshes)
    ds.SurfaceSequence = [
        _surface_item(number, mesh, term)
        for number, (mesh, term) in enumerate(zip(meshes, terms, strict=True), start=1)
    ]
    # Common Instance Reference: the source series, and the SEG series when given
    ds.ReferencedSeriesSequence = common_instance_references(volume, seg)
    return ds
