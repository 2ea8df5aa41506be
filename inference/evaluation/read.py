"""Label images from files: a DICOM-SEG (BINARY or LABELMAP), a NIfTI/NRRD label map with a labels
file, or a Vesalius results folder (its ``seg.dcm``, or the label map of a NIfTI/NRRD input)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from vesalius.inference.evaluation.labels import (
    Concept,
    EvaluationError,
    LabelImage,
    Structure,
    concept_of_name,
    reordered,
)
from vesalius.inference.volume import VolumeError

# What a results folder holds (node/pipeline.py writes it; tests check the names agree)
SUMMARY_FILE = "summary.json"
RESULTS_SEG_FILE = "seg.dcm"
RESULTS_LABEL_MAPS = ("labels.nii.gz", "labels.nrrd")
SEGMENTATION_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
# A LABELMAP SEG keeps one segment per voxel; our writer (dicom_out/seg.py) says in the Segment
# Description which other segments complete a structure that contains them (the body's lungs).
PARTS = re.compile(r"with segments ([\d, ]+) forms the whole structure")


def read_label_image(path: str | Path, labels: str | Path | None = None) -> LabelImage:
    """A SEG, a NIfTI/NRRD label map (``labels``: a JSON ``{"value": "name"}`` file) or a
    results folder, as a ``LabelImage`` in the canonical voxel layout."""
    from pydicom.misc import is_dicom

    from vesalius.inference.volume_files import is_volume_file

    path = Path(path)
    if path.is_dir():
        return read_results_folder(path, labels)
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist")
    if is_volume_file(path):
        return read_label_file(path, labels)
    if is_dicom(path):
        return read_seg(path)
    raise EvaluationError(f"{path.name} is neither a DICOM-SEG nor a NIfTI/NRRD label map "
                          "(.nii, .nii.gz, .nrrd, .nhdr)")


def is_results_folder(path: Path) -> bool:
    return (path / SUMMARY_FILE).is_file()


def read_results_folder(folder: Path, labels: str | Path | None = None) -> LabelImage:
    """The segmentation of a ``vesalius process`` / node job: its BINARY SEG, or for a NIfTI/NRRD
    input its label map named by the summary's ``labels`` (values, names and what each includes)."""
    if not is_results_folder(folder):
        raise EvaluationError(f"{folder} is not a Vesalius results folder (no {SUMMARY_FILE}); "
                              "a cohort is compared folder against folder")
    if (folder / RESULTS_SEG_FILE).is_file():
        return read_seg(folder / RESULTS_SEG_FILE)
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    for name in RESULTS_LABEL_MAPS:
        if (folder / name).is_file():
            if labels is not None:
                return read_label_file(folder / name, labels)
            described = summary.get("labels")
            if not described:
                raise EvaluationError(f"{folder}: {name} without label names (a summary from before "
                                      "`labels` was written); pass --pred-labels/--ref-labels")
            return _label_file(folder / name, {int(d["value"]): d["name"] for d in described},
                               {int(d["value"]): tuple(d.get("includes", ())) for d in described})
    raise EvaluationError(f"{folder}: no segmentation in the results folder (nothing was found in "
                          "the series, or retention removed it)")


def read_label_names(path: str | Path) -> dict[int, str]:
    """A labels file: JSON ``{"value": "name"}`` (TotalSegmentator's ``label_map_*.json`` form)."""
    try:
        table = json.loads(Path(path).read_text())
        return {int(value): str(name) for value, name in table.items() if int(value) != 0}
    except (OSError, ValueError, AttributeError) as err:
        raise EvaluationError(f"{Path(path).name}: a labels file is JSON "
                              f"{{\"value\": \"name\"}}: {err}") from err


def read_label_file(path: Path, labels: str | Path | None) -> LabelImage:
    """A NIfTI/NRRD label map; without a labels file its values name the structures ("1", "2")."""
    names = read_label_names(labels) if labels is not None else None
    return _label_file(path, names, {}, unnamed=names is None)


def _label_file(path: Path, names: dict[int, str] | None, includes: dict[int, tuple[int, ...]],
                unnamed: bool = False) -> LabelImage:
    from vesalius.inference.volume_files import read_volume_file

    try:
        volume = read_volume_file(path).volume  # already in the canonical layout
    except VolumeError as err:
        raise EvaluationError(str(err)) from err
    array = volume.array
    if not np.array_equal(array, np.round(array)) or array.min() < 0:
        raise EvaluationError(f"{path.name}: a label map holds non-negative whole numbers")
    label_map = array.astype(np.uint16 if array.max() > 255 else np.uint8)
    present = {int(v) for v in np.unique(label_map) if v != 0}
    notes: tuple[str, ...] = ()
    if names is None:
        names = {v: str(v) for v in sorted(present)}
    unknown = sorted(present - set(names))
    if unknown:
        notes = (f"{path.name}: values {', '.join(map(str, unknown))} have no name in the labels file; "
                 "they are not compared",)
    if unnamed:
        notes += (f"{path.name}: no labels file; structures are named by their values",)
    return LabelImage.from_label_map(label_map, names, volume.affine, includes=includes, source=path.name,
                                     notes=notes)


def read_seg(path: Path) -> LabelImage:
    """A DICOM Segmentation (BINARY, FRACTIONAL at 0.5 or LABELMAP) through highdicom: one
    structure per segment, with its Segmented Property Type and laterality."""
    import highdicom as hd
    import pydicom

    try:
        dataset = pydicom.dcmread(path)
        if str(dataset.get("SOPClassUID", "")) not in SEGMENTATION_SOP_CLASSES:
            raise EvaluationError(f"{path.name} is a DICOM object but not a Segmentation "
                                  f"(SOP Class {dataset.get('SOPClassUID', 'missing')})")
        seg = hd.seg.Segmentation.from_dataset(dataset, copy=False)
        geometry = seg.get_volume_geometry()
    except EvaluationError:
        raise
    except Exception as err:  # pydicom / highdicom raise many kinds on a damaged object
        raise EvaluationError(f"cannot read {path.name} as a DICOM Segmentation "
                              f"({type(err).__name__})") from err
    if geometry is None:
        raise EvaluationError(f"{path.name}: its frames are not a regular 3D volume (highdicom finds no "
                              "volume geometry), so it cannot be compared voxel by voxel")
    numbers = [int(n) for n in seg.segment_numbers]
    parts = {n: _parts(seg.get_segment_description(n)) for n in numbers}

    labelmap: list[np.ndarray] = []  # a LABELMAP SEG's segment numbers per voxel, decoded once

    def loader(segments: tuple[int, ...]) -> Any:
        def mask() -> np.ndarray:
            if seg.segmentation_type == hd.seg.SegmentationTypeValues.LABELMAP:
                if not labelmap:
                    labelmap.append(seg.get_volume(combine_segments=True).match_geometry(geometry).array)
                return np.isin(labelmap[0], segments)
            volume = seg.get_volume(segment_numbers=list(segments), combine_segments=False)
            volume = volume.match_geometry(geometry)
            array = volume.array
            array = array.max(axis=3) if array.ndim == 4 else array
            return array >= 0.5 if array.dtype.kind == "f" else array > 0  # FRACTIONAL: half or more
        return mask

    structures = []
    for n in numbers:
        description = seg.get_segment_description(n)
        segments = (n, *(p for p in parts[n] if p in numbers))
        structures.append(Structure(str(description.SegmentLabel), loader(segments), _concept(description)))
    referenced = dataset.get("ReferencedSeriesSequence")
    image = LabelImage(
        shape=tuple(int(n) for n in geometry.spatial_shape),  # type: ignore[arg-type]
        affine=np.asarray(geometry.affine, float), structures=tuple(structures),
        frame_of_reference_uid=str(dataset.get("FrameOfReferenceUID", "")) or None,
        series_uid=str(referenced[0].SeriesInstanceUID) if referenced else None, source=path.name)
    return reordered(image)


def _parts(description: Any) -> tuple[int, ...]:
    match = PARTS.search(str(description.get("SegmentDescription", "")))
    return tuple(int(n) for n in match[1].replace(" ", "").split(",") if n) if match else ()


def _concept(description: Any) -> Concept | None:
    """(scheme, Segmented Property Type, laterality) of a segment; retired SNOMED-RT codes (SRT,
    as dcmqi and older writers use) as their SNOMED CT equivalents."""
    types = description.get("SegmentedPropertyTypeCodeSequence")
    if not types:
        return concept_of_name(str(description.SegmentLabel))
    code = types[0]
    modifier = code.get("SegmentedPropertyTypeModifierCodeSequence")
    laterality = _sct(modifier[0])[1] if modifier else None
    return (*_sct(code), laterality)


def _sct(code: Any) -> tuple[str, str]:
    from pydicom.sr._snomed_dict import mapping

    scheme, value = str(code.CodingSchemeDesignator), str(code.CodeValue)
    if scheme == "SRT" and value in mapping["SRT"]:
        return "SCT", mapping["SRT"][value]
    return scheme, value
