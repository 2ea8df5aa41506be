"""Conformance checks dciodvfy does not make: each returns the problems it finds (empty = fine).

dciodvfy validates attributes module by module; it does not decode mesh index lists, count
surfaces against their references, follow a SEG's frames back to the source slices or walk an SR
content tree against TID 1500. These do, so tests can assert them on any object we write.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.multival import MultiValue

from vesalius.dicom_out.encapsulated_stl import ENCAPSULATED_STL_STORAGE
from vesalius.dicom_out.seg import LABEL_MAP_SEGMENTATION_STORAGE, SEGMENTATION_STORAGE
from vesalius.dicom_out.surface_segmentation import SURFACE_SEGMENTATION_STORAGE
from vesalius.inference.surfaces import edge_counts


def _consecutive(numbers: Sequence[int], what: str) -> list[str]:
    if list(numbers) != list(range(1, len(numbers) + 1)):
        return [f"{what} are not unique and consecutive from 1: {list(numbers)}"]
    return []


def _coded(item: pydicom.Dataset, keyword: str, where: str) -> list[str]:
    if keyword not in item or len(item[keyword].value) != 1:
        return [f"{where}: {keyword} must hold one item"]
    code = item[keyword].value[0]
    problems = []
    if code.get("CodingSchemeDesignator") == "SRT":
        problems.append(f"{where}: {keyword} uses retired SNOMED-RT (SRT) code {code.CodeValue}")
    if not code.get("CodeValue") or not code.get("CodeMeaning"):
        problems.append(f"{where}: {keyword} lacks a code value or meaning")
    return problems


def _segment_problems(segments: Sequence[pydicom.Dataset], labelmap: bool = False,
                      colour: bool = True) -> list[str]:
    if labelmap and segments and int(segments[0].SegmentNumber) == 0:
        segments = segments[1:]  # a Label Map may describe its background as segment 0
    problems = _consecutive([int(s.SegmentNumber) for s in segments], "SegmentNumbers")
    for segment in segments:
        where = f"segment {segment.SegmentNumber}"
        problems += _coded(segment, "SegmentedPropertyCategoryCodeSequence", where)
        problems += _coded(segment, "SegmentedPropertyTypeCodeSequence", where)
        if colour and "RecommendedDisplayCIELabValue" not in segment:
            problems.append(f"{where}: no Recommended Display CIELab Value")
    return problems


def seg_problems(ds: pydicom.Dataset, sources: Sequence[pydicom.Dataset]) -> list[str]:
    """A SEG (BINARY or LABELMAP) against the source slices it was derived from.

    Checks segment numbering and codes, Referenced Series and per-frame Derivation Image
    references, and that every frame lies exactly on a source slice: same orientation, pixel
    spacing, rows and columns, and an Image Position equal to that slice's (to 1 micrometre).
    """
    problems = []
    if ds.SOPClassUID not in (SEGMENTATION_STORAGE, LABEL_MAP_SEGMENTATION_STORAGE):
        return [f"not a Segmentation or Label Map Segmentation: {ds.SOPClassUID}"]
    problems += _segment_problems(ds.SegmentSequence,
                                  labelmap=ds.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE)
    numbers = {int(s.SegmentNumber) for s in ds.SegmentSequence}
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    referenced = {str(i.ReferencedSOPInstanceUID)
                  for series in ds.get("ReferencedSeriesSequence", [])
                  for i in series.ReferencedInstanceSequence}
    if not referenced or not referenced <= set(by_uid):
        problems.append("Referenced Series Sequence does not list the source instances")
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    spacing = np.array(shared.PixelMeasuresSequence[0].PixelSpacing, float)
    for number, frame in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        where = f"frame {number}"
        if ds.SOPClassUID == SEGMENTATION_STORAGE:
            segment = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            if segment not in numbers:
                problems.append(f"{where}: references undescribed segment {segment}")
        derivation = frame.get("DerivationImageSequence")
        if not derivation:
            problems.append(f"{where}: no Derivation Image Sequence")
            continue
        uids = [str(i.ReferencedSOPInstanceUID)
                for d in derivation for i in d.SourceImageSequence]
        if len(uids) != 1 or uids[0] not in by_uid:
            problems.append(f"{where}: derived from {uids}, not one source slice")
            continue
        source = by_uid[uids[0]]
        position = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        if not np.allclose(position, np.array(source.ImagePositionPatient, float), atol=1e-3):
            problems.append(f"{where}: position {position} is not its source slice's")
        if not np.allclose(orientation, np.array(source.ImageOrientationPatient, float),
                           atol=1e-6):
            problems.append(f"{where}: orientation differs from its source slice's")
        if not np.allclose(spacing, np.array(source.PixelSpacing, float), rtol=1e-6):
            problems.append(f"{where}: pixel spacing differs from its source slice's")
    if (int(ds.Rows), int(ds.Columns)) != (int(sources[0].Rows), int(sources[0].Columns)):
        problems.append("rows/columns differ from the source slices'")
    return problems


def surface_segmentation_problems(ds: pydicom.Dataset) -> list[str]:
    """A Surface Segmentation's internal consistency.

    Surface and segment numbering (unique, consecutive), NumberOfSurfaces and each SurfaceCount
    against the sequences, every surface referenced by exactly one segment, point/normal data
    lengths against their counts, unit normals, triangle indices within 1..NumberOfSurfacePoints,
    the bounding box, and Finite Volume / Manifold against the topology of the index list.
    """
    if ds.SOPClassUID != SURFACE_SEGMENTATION_STORAGE:
        return [f"not a Surface Segmentation: {ds.SOPClassUID}"]
    surfaces = ds.SurfaceSequence
    problems = _consecutive([int(s.SurfaceNumber) for s in surfaces], "SurfaceNumbers")
    if int(ds.NumberOfSurfaces) != len(surfaces):
        problems.append(f"NumberOfSurfaces {ds.NumberOfSurfaces} != {len(surfaces)} surfaces")
    problems += _segment_problems(ds.SegmentSequence, colour=False)  # colour is per surface
    referenced: list[int] = []
    for segment in ds.SegmentSequence:
        refs = segment.ReferencedSurfaceSequence
        if int(segment.SurfaceCount) != len(refs):
            problems.append(f"segment {segment.SegmentNumber}: SurfaceCount "
                            f"{segment.SurfaceCount} != {len(refs)} referenced surfaces")
        referenced += [int(r.ReferencedSurfaceNumber) for r in refs]
    if sorted(referenced) != [int(s.SurfaceNumber) for s in surfaces]:
        problems.append(f"surfaces referenced by segments {sorted(referenced)} are not each "
                        "surface exactly once")
    for surface in surfaces:
        where = f"surface {surface.SurfaceNumber}"
        if "RecommendedDisplayCIELabValue" not in surface:
            problems.append(f"{where}: no Recommended Display CIELab Value")
        point_item = surface.SurfacePointsSequence[0]
        n = int(point_item.NumberOfSurfacePoints)
        points = np.frombuffer(point_item.PointCoordinatesData, "<f4")
        if points.size != 3 * n:
            problems.append(f"{where}: {points.size} coordinates for {n} points")
            continue
        points = points.reshape(-1, 3)
        box = np.array(point_item.PointsBoundingBoxCoordinates, float).reshape(2, 3)
        if (points < box[0] - 1e-3).any() or (points > box[1] + 1e-3).any():
            problems.append(f"{where}: points outside the Points Bounding Box")
        normal_item = surface.SurfacePointsNormalsSequence[0]
        normals = np.frombuffer(normal_item.VectorCoordinateData, "<f4")
        if (int(normal_item.NumberOfVectors) != n or int(normal_item.VectorDimensionality) != 3
                or normals.size != 3 * n):
            problems.append(f"{where}: normals do not match the {n} points")
        elif not np.allclose(np.linalg.norm(normals.reshape(-1, 3), axis=1), 1.0, atol=1e-3):
            problems.append(f"{where}: normals are not unit vectors")
        primitives = surface.SurfaceMeshPrimitivesSequence[0]
        indices = np.frombuffer(primitives.LongTrianglePointIndexList, "<u4")
        if indices.size == 0 or indices.size % 3:
            problems.append(f"{where}: triangle index list of {indices.size} entries")
            continue
        if indices.min() < 1 or indices.max() > n:
            problems.append(f"{where}: triangle indices {indices.min()}..{indices.max()} "
                            f"outside 1..{n}")
            continue
        counts = edge_counts(indices.reshape(-1, 3).astype(np.int64))
        closed, manifold = bool((counts >= 2).all()), bool((counts == 2).all())
        if surface.FiniteVolume == "YES" and not closed:
            problems.append(f"{where}: Finite Volume YES but the mesh has boundary edges")
        if surface.Manifold == "YES" and not manifold:
            problems.append(f"{where}: Manifold YES but an edge is not shared by two triangles")
        if surface.FiniteVolume == "NO" and closed:
            problems.append(f"{where}: Finite Volume NO but the mesh is closed")
    return problems


def _concept(item: pydicom.Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodingSchemeDesignator), str(code.CodeValue)


def _children(item: pydicom.Dataset, concept: tuple[str, str]) -> list[pydicom.Dataset]:
    return [c for c in item.get("ContentSequence", []) if _concept(c) == concept]


IMAGING_MEASUREMENT_REPORT = ("DCM", "126000")
IMAGING_MEASUREMENTS = ("DCM", "126010")
MEASUREMENT_GROUP = ("DCM", "125007")
TRACKING_IDENTIFIER = ("DCM", "112039")
TRACKING_UID = ("DCM", "112040")
REFERENCED_SEGMENT = ("DCM", "121191")
PROCEDURE_REPORTED = ("DCM", "121058")
LANGUAGE = ("DCM", "121049")


def sr_problems(ds: pydicom.Dataset, seg: pydicom.Dataset | None = None) -> list[str]:
    """A measurement report's content tree against TID 1500 / TID 1411 (as far as we use them).

    Root: CONTAINER "Imaging Measurement Report" with template 1500, language, procedure
    reported, one "Imaging Measurements" container of "Measurement Group"s; each group has one
    Tracking Identifier, one Tracking UID, one Referenced Segment (to ``seg``'s SOP instance and
    a described segment number, when ``seg`` is given) and NUM items with a value and UCUM unit.
    """
    problems = []
    if ds.ValueType != "CONTAINER" or _concept(ds) != IMAGING_MEASUREMENT_REPORT:
        return ["root is not an Imaging Measurement Report container"]
    templates = ds.get("ContentTemplateSequence", [])
    if not templates or (templates[0].MappingResource, templates[0].TemplateIdentifier) != (
            "DCMR", "1500"):
        problems.append("root does not name template DCMR 1500")
    if len(_children(ds, LANGUAGE)) != 1:
        problems.append("no Language of Content Item and Descendants (TID 1204)")
    if not _children(ds, PROCEDURE_REPORTED):
        problems.append("no Procedure Reported")
    containers = _children(ds, IMAGING_MEASUREMENTS)
    if len(containers) != 1:
        return [*problems, f"{len(containers)} Imaging Measurements containers, not 1"]
    groups = _children(containers[0], MEASUREMENT_GROUP)
    if not groups:
        problems.append("no Measurement Group")
    numbers = {int(s.SegmentNumber) for s in seg.SegmentSequence} if seg is not None else None
    for index, group in enumerate(groups, start=1):
        where = f"group {index}"
        for concept, name in ((TRACKING_IDENTIFIER, "Tracking Identifier"),
                              (TRACKING_UID, "Tracking UID"),
                              (REFERENCED_SEGMENT, "Referenced Segment")):
            if len(_children(group, concept)) != 1:
                problems.append(f"{where}: needs exactly one {name}")
        for reference in _children(group, REFERENCED_SEGMENT):
            sop = reference.ReferencedSOPSequence[0]
            if seg is not None and sop.ReferencedSOPInstanceUID != seg.SOPInstanceUID:
                problems.append(f"{where}: references another SEG than the one given")
            raw = sop.get("ReferencedSegmentNumber")
            segments = [] if raw is None else [
                int(n) for n in (raw if isinstance(raw, MultiValue) else [raw])]
            if numbers is not None and (len(segments) != 1 or segments[0] not in numbers):
                problems.append(f"{where}: referenced segment {segments} is not in the SEG")
        values = [c for c in group.get("ContentSequence", []) if c.ValueType == "NUM"]
        if not values:
            problems.append(f"{where}: no measurement")
        for item in values:
            measured = item.MeasuredValueSequence[0]
            unit = measured.MeasurementUnitsCodeSequence[0]
            if unit.CodingSchemeDesignator != "UCUM" or "NumericValue" not in measured:
                problems.append(f"{where}: {_concept(item)} lacks a value with a UCUM unit")
    return problems


def encapsulated_stl_problems(ds: pydicom.Dataset) -> list[str]:
    """An Encapsulated STL: MIME type, millimetres, document length = binary STL size, frame."""
    problems = []
    if ds.SOPClassUID != ENCAPSULATED_STL_STORAGE:
        return [f"not an Encapsulated STL: {ds.SOPClassUID}"]
    if ds.MIMETypeOfEncapsulatedDocument != "model/stl":
        problems.append(f"MIME type {ds.MIMETypeOfEncapsulatedDocument}")
    unit = ds.MeasurementUnitsCodeSequence[0]
    if (unit.CodingSchemeDesignator, unit.CodeValue) != ("UCUM", "mm"):
        problems.append("Measurement Units are not UCUM mm")
    data = bytes(ds.EncapsulatedDocument)
    length = int(ds.EncapsulatedDocumentLength)
    if length > len(data) or len(data) - length > 1:
        problems.append(f"Encapsulated Document Length {length} for {len(data)} bytes")
    if len(data) < 84:
        return [*problems, "the document is too short for a binary STL"]
    facets = int(np.frombuffer(data, "<u4", count=1, offset=80)[0])
    if length != 84 + 50 * facets:
        problems.append(f"{length} bytes is not a binary STL of {facets} facets")
    if not ds.get("FrameOfReferenceUID"):
        problems.append("no Frame of Reference: the model cannot be placed on the images")
    if ds.Modality != "M3D":
        problems.append(f"Modality {ds.Modality}, not M3D")
    return problems
