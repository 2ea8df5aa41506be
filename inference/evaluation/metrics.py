"""Overlap and distance figures of one structure, by SimpleITK's (ITK's) filters.

Dice and Jaccard: ``LabelOverlapMeasuresImageFilter``. HD95 and the average symmetric surface
distance (ASSD): distances between the two surfaces, i.e. the voxels on each mask's contour
(``LabelContourImageFilter``, face neighbours), each measured to the other's contour through
``SignedMaurerDistanceMapImageFilter``; HD95 is the larger of the two directed 95th percentiles (as
MONAI and DeepMind's surface-distance compute it). Hausdorff: between the two voxel sets, read from
the same distance maps (equal to ``HausdorffDistanceImageFilter``'s, which would compute two more).
Distances are between voxel centres in mm, with each axis's spacing.
Masks are cropped to their common bounding box (plus a margin) first: the figures do not change and
a lung costs a fraction of a whole CT.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MARGIN = 2  # background voxels put around the masks' bounding box
DECIMALS = 4  # distances to 0.1 micrometre: ITK's float32 distance maps are noisy below that


def figures(pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray, voxel_ml: float) -> dict[str, Any]:
    """Dice, IoU, sensitivity, precision, HD95, Hausdorff, ASSD and volumes of two boolean masks
    on one grid (``spacing``: mm along slice, row, col). Empty masks give ``None`` with a
    ``flag`` saying why, never a silent 1.0."""
    pred_voxels, ref_voxels = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    out: dict[str, Any] = {
        "dice": None, "iou": None, "sensitivity": None, "precision": None,
        "hd95_mm": None, "hausdorff_mm": None, "assd_mm": None,
        "volume_pred_ml": round(pred_voxels * voxel_ml, 4), "volume_ref_ml": round(ref_voxels * voxel_ml, 4),
        "volume_diff_ml": round((pred_voxels - ref_voxels) * voxel_ml, 4), "flag": None,
    }
    if pred_voxels == 0 and ref_voxels == 0:
        out["flag"] = "both empty: nothing to compare"
        return out
    if pred_voxels == 0 or ref_voxels == 0:
        empty = "prediction" if pred_voxels == 0 else "reference"
        out.update(dice=0.0, iou=0.0, flag=f"{empty} empty: no surface to measure distances to")
        out["sensitivity"] = 0.0 if ref_voxels else None
        out["precision"] = 0.0 if pred_voxels else None
        return out
    pred, ref = _cropped(pred, ref)
    both = int(np.count_nonzero(pred & ref))
    out["sensitivity"] = both / ref_voxels
    out["precision"] = both / pred_voxels
    out.update(_overlap_and_distances(pred, ref, spacing))
    return out


def _cropped(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    either = pred | ref
    box = []
    for axis in range(3):
        present = np.flatnonzero(either.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(present[0], present[-1] + 1))
    index = tuple(box)  # then a background margin all round: a mask at the grid's edge has a contour there
    return np.pad(pred[index], MARGIN), np.pad(ref[index], MARGIN)


def _overlap_and_distances(pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray) -> dict[str, float]:
    import SimpleITK as sitk

    def image(mask: np.ndarray) -> Any:
        out = sitk.GetImageFromArray(mask.astype(np.uint8))
        out.SetSpacing([float(spacing[2]), float(spacing[1]), float(spacing[0])])  # x, y, z = col, row, slice
        return out

    a, b = image(pred), image(ref)
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(b, a)
    pred_contour, to_pred_contour = _contour_and_distance(a)
    ref_contour, to_ref_contour = _contour_and_distance(b)
    to_ref, to_pred = to_ref_contour[pred_contour], to_pred_contour[ref_contour]
    # The nearest voxel of a mask to a voxel outside it lies on its contour, so these are the
    # directed distances between the voxel sets (what HausdorffDistanceImageFilter computes, with
    # two more distance maps; the tests check that both agree)
    hausdorff = max(to_ref_contour[pred & ~ref].max(initial=0.0),
                    to_pred_contour[ref & ~pred].max(initial=0.0))
    return {
        "dice": float(overlap.GetDiceCoefficient()),
        "iou": float(overlap.GetJaccardCoefficient()),
        "hausdorff_mm": round(float(hausdorff), DECIMALS),
        "hd95_mm": round(float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95))), DECIMALS),
        "assd_mm": round(float((to_ref.sum(dtype=np.float64) + to_pred.sum(dtype=np.float64))
                               / (to_ref.size + to_pred.size)), DECIMALS),
    }


def _contour_and_distance(mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """A mask's contour voxels (those with a face neighbour outside it) and every voxel's distance
    (mm) to the nearest of them."""
    import SimpleITK as sitk

    contour = sitk.LabelContour(mask, fullyConnected=False)
    distance = sitk.SignedMaurerDistanceMap(contour, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    return sitk.GetArrayFromImage(contour) > 0, np.abs(sitk.GetArrayFromImage(distance))
