"""A research volume (NIfTI or NRRD) as a ``Volume``, and the label map written back beside it.

SimpleITK reads both formats with their geometry and gives it in LPS whatever the file holds
(NIfTI's RAS header included). The volume is then laid out as an axial DICOM series of the same
anatomy would be (``canonical_layout``: slices along +S, rows along +P, columns along +L for an
axial scan; only axis permutations and flips, no resampling), so a model sees the same array,
and gives the same labels, whether the data came as DICOM or as a file. The label map goes back
in the file's own voxel layout and header, so it overlays the input in any research viewer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from vesalius.inference.volume import Volume, VolumeError

SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr")


def is_volume_file(path: str | Path) -> bool:
    """A NIfTI or NRRD file, by its name (the formats the reader takes)."""
    name = Path(path).name.lower()
    return any(name.endswith(suffix) for suffix in SUFFIXES)


def label_map_name(path: str | Path) -> str:
    """``labels`` with the input's own suffix: ``ct.nii.gz`` -> ``labels.nii.gz``."""
    name = Path(path).name.lower()
    return "labels" + next(s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s))


@dataclass(frozen=True, eq=False)
class VolumeFile:
    """A volume read from a file, and how to put arrays on its grid back into the file's layout."""

    path: Path
    volume: Volume
    permutation: tuple[int, int, int]  # file array axis of each volume axis
    flips: tuple[bool, bool, bool]  # volume axes reversed after the permutation
    image: object  # the SimpleITK image read (its header is copied onto the label map)

    def to_file_layout(self, array: np.ndarray) -> np.ndarray:
        """An array on the volume's grid, in the file's (z, y, x) order."""
        flipped = array[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]
        return np.transpose(flipped, np.argsort(self.permutation))

    def write_label_map(self, labels: np.ndarray, target: Path) -> Path:
        """The labels as a file of the input's format, on the input's grid and header geometry."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.to_file_layout(labels).astype(np.uint8)))
        image.CopyInformation(self.image)
        sitk.WriteImage(image, str(target), useCompression=True)
        return target


def read_volume_file(path: str | Path, modality: str = "CT") -> VolumeFile:
    """Read a NIfTI/NRRD scalar volume; raises VolumeError when it cannot be placed in space.

    The file does not say its modality: ``modality`` does (models check it, e.g. builtin_ct
    segments CT only). Values are taken as they are stored (HU for a CT).
    """
    import SimpleITK as sitk

    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else "unreadable"
        raise VolumeError(f"cannot read {path.name} as NIfTI/NRRD: {reason}") from err
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{path.name}: a 3D scalar volume is needed, not {image.GetDimension()}D with "
                          f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    array = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)  # columns: x, y, z
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    affine = np.eye(4)  # file (z, y, x) index -> LPS
    affine[:3, :3] = (direction * spacing)[:, ::-1]
    affine[:3, 3] = image.GetOrigin()
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(f"{path.name}: degenerate geometry (direction/spacing)")
    permutation, flips = canonical_layout(affine)
    array, affine = _reordered(array, affine, permutation, flips)
    header = _header(path, modality)
    volume = Volume(array=array, affine=affine, sources=(header,) * array.shape[0])
    return VolumeFile(path, volume, permutation, flips, image)


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
