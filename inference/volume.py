"""A received series as a volume placed in patient space (array + affine + source headers).

Built by ``inference.series.load_series`` (reading, multi-frame flattening and geometry checks);
docs/input.md says what real scanners send and what is accepted or refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom


class VolumeError(ValueError):
    """The series cannot be placed in space; str(err) is the human reason stored on the job."""


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxel values with the geometry that places them in the patient.

    ``array`` has shape (slices, rows, cols) and holds modality values (HU for CT);
    ``affine`` maps homogeneous (slice, row, col, 1) indices to patient LPS millimetres;
    ``sources`` are the source headers (no pixel data), one per slice, in array order. A slice
    that is a frame of a multi-frame instance has a header of its own: see ``frame_number``.
    """

    array: np.ndarray
    affine: np.ndarray
    sources: tuple[pydicom.Dataset, ...]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along (slice, row, col)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def series_uid(self) -> str:
        return str(self.sources[0].SeriesInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.sources[0].StudyInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.sources[0].FrameOfReferenceUID)

    @property
    def modality(self) -> str:
        return str(self.sources[0].Modality)
