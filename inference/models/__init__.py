"""Segmentation models behind one interface: the labels they produce and ``predict``."""

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

    def mask(self, labels: np.ndarray) -> np.ndarray:
        """Boolean mask of this structure in a label array."""
        if not self.includes:
            return labels == self.value
        member = np.zeros(256, bool)  # a lookup table: one gather, far faster than np.isin
        member[[self.value, *self.includes]] = True
        return member[labels]


class Model(Protocol):
    name: str
    version: str
    family: str  # "ai" (trained network) or "morphology" (thresholds, morphology): DICOM Algorithm Family
    labels: tuple[Label, ...]

    def predict(self, volume: Volume) -> np.ndarray:
        """uint8 label array with the volume's shape; 0 is background."""
        ...

