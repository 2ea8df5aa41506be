"""Putting a reference's masks on the prediction's grid: voxel for voxel when the lattices agree
(cropped or padded when only the extent differs: a SEG may leave out empty slices), otherwise
resampled with SimpleITK's nearest neighbour; two frames of reference are never compared."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vesalius.inference.evaluation.labels import EvaluationError, LabelImage, Structure

POSITION_TOLERANCE = 1e-3  # of a voxel: lattices closer than this are the same lattice


def check_frames(pred: LabelImage, ref: LabelImage) -> None:
    """Refuse two Frame of Reference UIDs: their coordinates are not the same space."""
    if pred.frame_of_reference_uid and ref.frame_of_reference_uid and \
            pred.frame_of_reference_uid != ref.frame_of_reference_uid:
        raise EvaluationError(
            f"different frames of reference: {pred.source} is in {pred.frame_of_reference_uid}, "
            f"{ref.source} in {ref.frame_of_reference_uid}; segmentations of different scans (or of "
            "unregistered ones) cannot be compared voxel by voxel")


def lattice_offset(pred: LabelImage, ref: LabelImage) -> tuple[int, int, int] | None:
    """The whole-voxel index of ref's first voxel on pred's grid when both share one lattice."""
    if not np.allclose(pred.affine[:3, :3], ref.affine[:3, :3], atol=POSITION_TOLERANCE * pred.spacing.min()):
        return None
    index = np.linalg.solve(pred.affine[:3, :3], ref.affine[:3, 3] - pred.affine[:3, 3])
    whole = np.round(index)
    if np.any(np.abs(index - whole) > POSITION_TOLERANCE):
        return None
    return (int(whole[0]), int(whole[1]), int(whole[2]))


def on_grid(pred: LabelImage, ref: LabelImage) -> tuple[LabelImage, bool]:
    """``ref`` with every mask on ``pred``'s grid, and whether it had to be resampled."""
    check_frames(pred, ref)
    offset = lattice_offset(pred, ref)
    if offset == (0, 0, 0) and pred.shape == ref.shape:
        return ref, False
    if offset is not None:
        return _moved(pred, ref, lambda mask: _shifted(mask, offset, pred.shape)), False
    return _moved(pred, ref, lambda mask: _resampled(mask, ref.affine, pred.affine, pred.shape)), True


def _moved(pred: LabelImage, ref: LabelImage, move: Callable[[np.ndarray], np.ndarray]) -> LabelImage:
    def structure(s: Structure) -> Structure:
        return Structure(s.name, lambda: move(s.mask()), s.concept)

    return LabelImage(pred.shape, pred.affine, tuple(structure(s) for s in ref.structures),
                      ref.frame_of_reference_uid, ref.series_uid, ref.source, ref.notes)


def _shifted(mask: np.ndarray, offset: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
    """A mask whose voxel (0, 0, 0) is at ``offset`` on a grid of ``shape``: cropped and padded."""
    out = np.zeros(shape, bool)
    target, source = [], []
    for start, n, size in zip(offset, mask.shape, shape, strict=True):
        lo, hi = max(start, 0), min(start + n, size)
        if lo >= hi:
            return out  # no overlap with the grid at all
        target.append(slice(lo, hi))
        source.append(slice(lo - start, hi - start))
    out[tuple(target)] = mask[tuple(source)]
    return out


def sitk_image(array: np.ndarray, affine: np.ndarray):
    """A SimpleITK image of a (slice, row, col) array: its x, y, z are our col, row, slice."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array.astype(np.uint8))
    columns = affine[:3, [2, 1, 0]]
    spacing = np.linalg.norm(columns, axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    image.SetDirection([float(v) for v in (columns / spacing).ravel()])
    return image


def _resampled(mask: np.ndarray, affine: np.ndarray, target_affine: np.ndarray,
               shape: tuple[int, int, int]) -> np.ndarray:
    import SimpleITK as sitk

    reference = sitk_image(np.zeros(shape, np.uint8), target_affine)
    try:
        moved = sitk.Resample(sitk_image(mask, affine), reference, sitk.Transform(), sitk.sitkNearestNeighbor,
                              0, sitk.sitkUInt8)
    except RuntimeError as err:  # a sheared grid SimpleITK cannot represent
        raise EvaluationError(f"cannot resample the reference onto the prediction's grid: {err}") from err
    return sitk.GetArrayFromImage(moved) > 0
