"""Segmentation models behind one interface: the structures they produce and ``predict``.

``predict`` returns a label map: a uint8 array on the volume's grid whose values are the
``Label.value`` of the model's ``structures`` (0 is background)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vesalius.inference.volume import Volume


@dataclass(frozen=True)
class Label:
    """One structure a model produces.

    ``name`` is the key into ``inference.terminology``; ``includes`` lists other label values that
    belong to this structure too (the body contains the lungs), so segments may overlap.
    """

    value: int
    name: str
    includes: tuple[int, ...] = ()

    @property
    def values(self) -> list[int]:
        """Every label value that is this structure: its own and those it includes."""
        return [self.value, *self.includes]

    def mask(self, label_map: np.ndarray) -> np.ndarray:
        """Boolean mask of this structure in a label map."""
        if not self.includes:
            return label_map == self.value
        low, high = min(self.values), max(self.values)
        if label_map.dtype == np.uint8 and len(set(self.values)) == high - low + 1:
            # Contiguous values: one unsigned range test (values below `low` wrap
            # round to large ones), about 6x faster than the gather below.
            return (label_map - np.uint8(low)) <= np.uint8(high - low)
        member = np.zeros(256, bool)  # a lookup table: one gather, far faster than np.isin
        member[self.values] = True
        return member[label_map]


class Model(Protocol):
    name: str
    version: str
    family: str  # "ai" (trained network) or "morphology" (thresholds, morphology): DICOM Algorithm Family
    structures: tuple[Label, ...]

    def predict(self, volume: Volume) -> np.ndarray:
        """The label map: uint8, the volume's shape; 0 is background."""
        ...

