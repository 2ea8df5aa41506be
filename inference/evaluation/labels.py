"""What is compared: named structures (boolean masks) on one grid placed in patient space.

A ``LabelImage`` is whatever a reader made of a SEG, a NIfTI/NRRD label map or a results folder,
or what a caller builds in memory (``LabelImage.from_label_map``). Structures may overlap (a
BINARY SEG's body contains its lungs), so each one is its own mask; masks are made on demand
(``Structure.mask()``), so a SEG of a hundred structures never sits in memory as a hundred arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# (coding scheme, Segmented Property Type code value, laterality code value or None)
Concept = tuple[str, str, str | None]


class EvaluationError(ValueError):
    """Two segmentations cannot be compared (or one cannot be read); str(err) says why."""


@dataclass(frozen=True, eq=False)
class Structure:
    """One named structure: its coded concept when known, and its mask on the image's grid."""

    name: str
    mask: Callable[[], np.ndarray]  # boolean, the image's shape (slice, row, col)
    concept: Concept | None = None


@dataclass(frozen=True, eq=False)
class LabelImage:
    """Structures on one grid. ``affine`` maps (slice, row, col, 1) to patient LPS mm, as
    ``inference.volume.Volume`` does; ``frame_of_reference_uid`` is None when the source does not
    say (NIfTI, NRRD); ``series_uid`` is the source series a SEG segments (pairs cohort cases)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    structures: tuple[Structure, ...]
    frame_of_reference_uid: str | None = None
    series_uid: str | None = None
    source: str = "in memory"
    notes: tuple[str, ...] = field(default=())

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along (slice, row, col)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def voxel_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @classmethod
    def from_label_map(cls, label_map: np.ndarray, names: Mapping[int, str], affine: np.ndarray,
                       *, includes: Mapping[int, Sequence[int]] | None = None, **kwargs: Any) -> LabelImage:
        """A label map (value -> name) as structures; ``includes`` lists other values a structure
        contains (``Label.includes``: the body holds the lungs). Names get coded concepts from
        ``inference.terminology`` where it knows them."""
        includes = includes or {}
        structures = tuple(
            Structure(name, _value_mask(label_map, (int(value), *includes.get(int(value), ()))),
                      concept_of_name(name))
            for value, name in sorted(names.items()))
        shape = (int(label_map.shape[0]), int(label_map.shape[1]), int(label_map.shape[2]))
        return cls(shape, np.asarray(affine, float), structures, **kwargs)

    def with_structures(self, structures: Sequence[Structure]) -> LabelImage:
        return LabelImage(self.shape, self.affine, tuple(structures), self.frame_of_reference_uid,
                          self.series_uid, self.source, self.notes)


def _value_mask(label_map: np.ndarray, values: Sequence[int]) -> Callable[[], np.ndarray]:
    def mask() -> np.ndarray:
        return np.isin(label_map, values)
    return mask


def concept_of_name(name: str) -> Concept | None:
    """The coded concept our terminology gives a label name (ours or TotalSegmentator's; also
    written with capitals or spaces: "Liver", "urinary bladder")."""
    from vesalius.inference.terminology import all_terms

    terms = all_terms()
    term = terms.get(name) or terms.get(name.strip().lower().replace(" ", "_"))
    if term is None:
        return None
    return (term.type.scheme_designator, term.type.value, term.modifier.value if term.modifier else None)


def reordered(image: LabelImage) -> LabelImage:
    """The same image with its axes permuted and flipped to the layout of an axial DICOM series
    (``volume_files.canonical_layout``), so two files of one lattice stored in different voxel
    orders compare voxel for voxel. Only views: no copy, no resampling."""
    from vesalius.inference.volume_files import canonical_layout

    permutation, flips = canonical_layout(image.affine)
    if permutation == (0, 1, 2) and not any(flips):
        return image
    shape = tuple(image.shape[axis] for axis in permutation)
    matrix = image.affine[:3, list(permutation)].copy()
    origin = image.affine[:3, 3].copy()
    for axis, flip in enumerate(flips):
        if flip:  # index i -> n-1-i: the last voxel becomes the origin
            origin = origin + matrix[:, axis] * (shape[axis] - 1)
            matrix[:, axis] = -matrix[:, axis]
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = matrix, origin
    flip_index = tuple(slice(None, None, -1) if f else slice(None) for f in flips)

    def moved(structure: Structure) -> Structure:
        return Structure(structure.name, lambda: np.transpose(structure.mask(), permutation)[flip_index],
                         structure.concept)

    return LabelImage((shape[0], shape[1], shape[2]), affine, tuple(moved(s) for s in image.structures),
                      image.frame_of_reference_uid, image.series_uid, image.source, image.notes)
