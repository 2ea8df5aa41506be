"""A research volume (NIfTI or NRRD) as a ``Volume``, and the label map written back beside it.

nibabel reads NIfTI (its RAS affine, sform or qform as nibabel chooses, becomes LPS) and pynrrd
reads NRRD (``space directions`` and ``space origin`` in the file's ``space``: LPS, RAS or LAS).
The volume is then laid out as an axial DICOM series of the same anatomy would be
(``canonical_layout``: slices along +S, rows along +P, columns along +L for an axial scan; only
axis permutations and flips, no resampling), so a model sees the same array, and gives the same
labels, whether the data came as DICOM or as a file. The label map goes back in the file's own
format, voxel layout and geometry, so it overlays the input in any research viewer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from vesalius.inference.volume import Volume, VolumeError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
SUFFIXES = (*NIFTI_SUFFIXES, *NRRD_SUFFIXES)
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
# NRRD ``space`` values of patient spaces (both spellings), as the sign of each axis towards LPS
NRRD_SPACES = {"left-posterior-superior": (1, 1, 1), "lps": (1, 1, 1),
               "right-anterior-superior": (-1, -1, 1), "ras": (-1, -1, 1),
               "left-anterior-superior": (1, -1, 1), "las": (1, -1, 1)}


def is_volume_file(path: str | Path) -> bool:
    """A NIfTI or NRRD file, by its name (the formats the reader takes)."""
    name = Path(path).name.lower()
    return any(name.endswith(suffix) for suffix in SUFFIXES)


def label_map_name(path: str | Path) -> str:
    """``labels`` in the input's format: ``ct.nii.gz`` -> ``labels.nii.gz``; an NRRD (detached
    ``.nhdr`` too) -> ``labels.nrrd``."""
    name = Path(path).name.lower()
    return "labels" + next((s for s in NIFTI_SUFFIXES if name.endswith(s)), ".nrrd")


@dataclass(frozen=True, eq=False)
class VolumeFile:
    """A volume read from a file, and how to put arrays on its grid back into the file's layout."""

    path: Path
    volume: Volume
    permutation: tuple[int, int, int]  # file array axis of each volume axis
    flips: tuple[bool, bool, bool]  # volume axes reversed after the permutation
    header: Any  # the nibabel image or the pynrrd header read: the label map gets its geometry

    def to_file_layout(self, array: np.ndarray) -> np.ndarray:
        """An array on the volume's grid, in the file's voxel order."""
        flipped = array[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]
        return np.transpose(flipped, np.argsort(self.permutation))

    def write_label_map(self, labels: np.ndarray, target: Path) -> Path:
        """The labels (uint8) as a file of the input's format, on the input's grid and geometry."""
        data = np.ascontiguousarray(self.to_file_layout(labels).astype(np.uint8))
        if isinstance(self.header, dict):
            import nrrd

            keep = ("space", "space directions", "space origin", "space units", "measurement frame")
            header = {k: self.header[k] for k in keep if k in self.header}
            nrrd.write(str(target), data, {**header, "kinds": ["domain"] * 3, "encoding": "gzip"})
        else:
            import nibabel as nib

            image = nib.Nifti1Image(data, self.header.affine, header=self.header.header.copy())
            image.set_data_dtype(np.uint8)
            image.header.set_slope_inter(1, 0)
            nib.save(image, str(target))
        return target


def read_volume_file(path: str | Path, modality: str = "CT") -> VolumeFile:
    """Read a NIfTI/NRRD scalar volume; raises VolumeError when it cannot be placed in space.

    The file does not say its modality: ``modality`` does (models check it, e.g. builtin_ct
    segments CT only). Values are taken as they are stored (HU for a CT; NIfTI scaling applied).
    """
    path = Path(path)
    array, affine, header = (_read_nifti if path.name.lower().endswith(NIFTI_SUFFIXES) else _read_nrrd)(path)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise VolumeError(f"{path.name}: a 3D scalar volume is needed, not {array.ndim}D {array.shape}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(f"{path.name}: degenerate geometry (voxel axes)")
    permutation, flips = canonical_layout(affine)
    array, affine = _reordered(array.astype(np.float32), affine, permutation, flips)
    volume = Volume(array=array, affine=affine, sources=(_header(path, modality),) * array.shape[0])
    return VolumeFile(path, volume, permutation, flips, header)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    import nibabel as nib

    try:
        image: Any = nib.load(str(path))  # a Nifti1/2Image: dataobj, affine
        array = np.asarray(image.dataobj)  # scl_slope/scl_inter applied
    except Exception as err:  # nibabel raises many kinds for a damaged file
        raise VolumeError(f"cannot read {path.name} as NIfTI: {err}") from err
    affine = np.eye(4)
    affine[:3, :3] = RAS_TO_LPS @ image.affine[:3, :3]
    affine[:3, 3] = RAS_TO_LPS @ image.affine[:3, 3]
    return array, affine, image


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    import nrrd

    try:
        array, header = nrrd.read(str(path))  # index order (i, j, k): fastest axis first
    except Exception as err:  # pynrrd raises NRRDError, ValueError, OSError...
        raise VolumeError(f"cannot read {path.name} as NRRD: {err}") from err
    space = str(header.get("space", "")).lower()
    if space not in NRRD_SPACES or "space directions" not in header:
        raise VolumeError(f"{path.name}: NRRD without a patient space (space {space or 'missing'}; "
                          "LPS, RAS or LAS with space directions needed)")
    sign = np.array(NRRD_SPACES[space], dtype=np.float64)
    directions = np.asarray(header["space directions"], dtype=np.float64)  # one row per axis
    if directions.shape != (3, 3):
        raise VolumeError(f"{path.name}: a 3D scalar volume is needed (space directions {directions.shape})")
    affine = np.eye(4)
    affine[:3, :3] = (directions * sign).T  # column per axis, in LPS
    affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64) * sign
    return array, affine, header


def canonical_layout(affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """The axis permutation and flips that make (slice, row, col) run as close as possible to
    +S, +P, +L (how an axial DICOM series is laid out), from an index -> LPS affine."""
    from itertools import permutations

    cosines = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    targets = (2, 1, 0)  # LPS component each volume axis should follow: S, P, L
    best = max(permutations(range(3)),
               key=lambda p: sum(abs(cosines[targets[axis], p[axis]]) for axis in range(3)))
    flips = tuple(bool(cosines[targets[axis], best[axis]] < 0) for axis in range(3))
    return (best[0], best[1], best[2]), (flips[0], flips[1], flips[2])


def _reordered(array: np.ndarray, affine: np.ndarray, permutation: tuple[int, int, int],
               flips: tuple[bool, bool, bool]) -> tuple[np.ndarray, np.ndarray]:
    array = np.transpose(array, permutation)
    matrix = affine[:3, permutation]
    origin = affine[:3, 3].copy()
    for axis, flip in enumerate(flips):
        if flip:  # index i -> n-1-i: the last voxel becomes the origin
            origin = origin + matrix[:, axis] * (array.shape[axis] - 1)
            matrix[:, axis] = -matrix[:, axis]
    array = array[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = origin
    return np.ascontiguousarray(array), out


def _header(path: Path, modality: str) -> pydicom.Dataset:
    """What models read from ``Volume.sources``: the modality, and UIDs derived from the file's
    name and size (they name the volume in a model's metadata; no DICOM object carries them)."""
    header = pydicom.Dataset()
    header.Modality = modality
    entropy = ["vesalius-volume-file", path.name, str(path.stat().st_size)]
    header.StudyInstanceUID = generate_uid(entropy_srcs=[*entropy, "study"])
    header.SeriesInstanceUID = generate_uid(entropy_srcs=[*entropy, "series"])
    header.FrameOfReferenceUID = generate_uid(entropy_srcs=[*entropy, "frame"])
    return header
