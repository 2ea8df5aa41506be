"""The evaluation's figures against closed forms: two spheres, a box shifted by one voxel, anisotropic
voxels, empty masks; and SimpleITK's overlap against the voxel-count definition.

Two equal spheres of radius R whose centres are d apart: their lens has volume
pi (4R + d)(2R - d)^2 / 12; the Hausdorff distance is d; a point on one sphere's surface lies at
|t| from the other's surface with |t| uniform on [0, d] (the distance to the other centre has density
s / 2Rd on [R - d, R + d]), so the mean surface distance (ASSD) is d / 2 and HD95 is 0.95 d.
Tolerances follow from the voxel size h: a voxelised ball's volume is off by O((R/h)^1.5) voxels
(lattice points in a ball), a relative 2 (h/R)^1.5 here; voxel sets are within half a voxel diagonal
of the true shapes (Hausdorff: one diagonal); contour voxels lie within one voxel of the surface.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from vesalius.inference.evaluation import LabelImage, evaluate
from vesalius.inference.evaluation.metrics import figures


def _grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxel centres in mm, (slice, row, col) -> (z, y, x)."""
    index = np.indices(shape).astype(float)
    return np.stack([index[a] * spacing[a] for a in range(3)], axis=-1)


def _ball(points: np.ndarray, centre: tuple[float, float, float], radius: float) -> np.ndarray:
    return np.sum((points - np.asarray(centre)) ** 2, axis=-1) <= radius**2


def _lens(radius: float, d: float) -> float:
    return math.pi * (4 * radius + d) * (2 * radius - d) ** 2 / 12


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 0.8, 0.8)])
@pytest.mark.parametrize("axis", [0, 2])
def test_two_spheres_match_the_closed_forms(spacing: tuple[float, float, float], axis: int) -> None:
    radius, d = 20.0, 10.0
    shape = tuple(int(round(80 / s)) for s in spacing)
    points = _grid(shape, spacing)  # type: ignore[arg-type]
    centre = np.array([40.0, 40.0, 40.0])
    offset = np.zeros(3)
    offset[axis] = d
    a = _ball(points, tuple(centre - offset / 2), radius)
    b = _ball(points, tuple(centre + offset / 2), radius)
    voxel_ml = float(np.prod(spacing)) / 1000
    got = figures(a, b, np.array(spacing), voxel_ml)

    h = max(spacing)
    sphere, lens = 4 / 3 * math.pi * radius**3, _lens(radius, d)
    relative = 2 * (h / radius) ** 1.5
    assert got["dice"] == pytest.approx(lens / sphere, rel=relative)
    assert got["iou"] == pytest.approx(lens / (2 * sphere - lens), rel=relative)
    assert got["volume_pred_ml"] == pytest.approx(sphere / 1000, rel=relative)
    assert got["hausdorff_mm"] == pytest.approx(d, abs=math.sqrt(sum(s * s for s in spacing)))
    assert got["hd95_mm"] == pytest.approx(0.95 * d, abs=h)
    assert got["assd_mm"] == pytest.approx(d / 2, abs=h)
    assert got["flag"] is None


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 0.8, 0.8), (0.5, 1.2, 3.0)])
def test_a_box_against_itself_shifted_by_one_voxel(spacing: tuple[float, float, float]) -> None:
    """n voxels along the shift: Dice (n-1)/n, IoU (n-1)/(n+1), Hausdorff one voxel step. Shifted
    along its finest axis, the surface distances are exact too: the two faces across the shift
    (less the back face's rim, which lies on the other box's side) are one step away, all else 0."""
    n = 10
    box = np.zeros((n + 6, n + 6, n + 6), bool)
    box[3:3 + n, 3:3 + n, 3:3 + n] = True
    finest = int(np.argmin(spacing))
    for axis in range(3):
        shifted = np.roll(box, 1, axis=axis)
        got = figures(box, shifted, np.array(spacing), float(np.prod(spacing)) / 1000)
        assert got["dice"] == pytest.approx((n - 1) / n, abs=1e-12)
        assert got["iou"] == pytest.approx((n - 1) / (n + 1), abs=1e-12)
        assert got["hausdorff_mm"] == pytest.approx(spacing[axis], abs=1e-6)
        assert got["volume_diff_ml"] == 0.0
        if axis == finest:
            contour = n**3 - (n - 2) ** 3
            one_step = n * n + (n - 2) ** 2
            assert got["assd_mm"] == pytest.approx(spacing[axis] * one_step / contour, abs=1e-4)
            assert got["hd95_mm"] == pytest.approx(spacing[axis], abs=1e-4)  # a third of the contour


def test_hausdorff_is_the_one_simpleitk_computes_between_the_voxel_sets() -> None:
    import SimpleITK as sitk

    rng = np.random.default_rng(2)
    for spacing in ((1.0, 1.0, 1.0), (2.5, 0.7, 0.9)):
        a = np.zeros((24, 30, 30), bool)
        b = np.zeros_like(a)
        a[4:14, 5:25, 8:22] = rng.random((10, 20, 14)) > 0.3  # ragged, with islands and holes
        b[8:20, 4:22, 3:20] = rng.random((12, 18, 17)) > 0.4
        images = []
        for mask in (a, b):
            image = sitk.GetImageFromArray(mask.astype(np.uint8))
            image.SetSpacing(spacing[::-1])
            images.append(image)
        reference = sitk.HausdorffDistanceImageFilter()
        reference.Execute(*images)
        got = figures(a, b, np.array(spacing), 0.001)
        assert got["hausdorff_mm"] == pytest.approx(reference.GetHausdorffDistance(), abs=1e-4)


def test_overlap_is_the_voxel_count_definition() -> None:
    rng = np.random.default_rng(1)
    a = np.zeros((30, 30, 30), bool)
    b = np.zeros_like(a)
    a[5:20, 5:25, 8:22] = rng.random((15, 20, 14)) > 0.2
    b[8:24, 4:22, 6:20] = rng.random((16, 18, 14)) > 0.3
    got = figures(a, b, np.array([1.0, 1.0, 1.0]), 0.001)
    both = int((a & b).sum())
    assert got["dice"] == pytest.approx(2 * both / (a.sum() + b.sum()), abs=1e-12)
    assert got["iou"] == pytest.approx(both / (a | b).sum(), abs=1e-12)
    assert got["sensitivity"] == pytest.approx(both / b.sum(), abs=1e-12)
    assert got["precision"] == pytest.approx(both / a.sum(), abs=1e-12)


def test_empty_masks_are_flagged_never_a_silent_one() -> None:
    empty = np.zeros((10, 10, 10), bool)
    cube = empty.copy()
    cube[2:6, 2:6, 2:6] = True
    spacing = np.array([1.0, 1.0, 1.0])
    both = figures(empty, empty, spacing, 0.001)
    assert all(both[k] is None for k in ("dice", "iou", "hd95_mm", "hausdorff_mm", "assd_mm"))
    assert "both empty" in both["flag"]
    for pred, ref, which in ((empty, cube, "prediction"), (cube, empty, "reference")):
        one = figures(pred, ref, spacing, 0.001)
        assert one["dice"] == 0.0 and one["iou"] == 0.0
        assert one["hd95_mm"] is None and one["hausdorff_mm"] is None and one["assd_mm"] is None
        assert one["flag"].startswith(f"{which} empty")
        assert one["volume_diff_ml"] == pytest.approx((pred.sum() - ref.sum()) * 0.001)


def test_in_memory_label_images_and_the_mask_at_the_grid_edge() -> None:
    """``evaluate`` on label maps in memory (what issue 16 scores corrections with); a structure
    touching the grid's edge still has its surface there."""
    affine = np.diag([2.0, 0.8, 0.8, 1.0])
    pred = np.zeros((12, 20, 20), np.uint8)
    pred[0:6, 0:10, 0:10] = 1
    ref = np.roll(pred, 1, axis=2)
    evaluation = evaluate(LabelImage.from_label_map(pred, {1: "liver"}, affine),
                          LabelImage.from_label_map(ref, {1: "Liver"}, affine))
    row = evaluation.structure("liver")
    assert row["matched_by"] == "concept" and row["dice"] == pytest.approx(0.9)
    assert row["hausdorff_mm"] == pytest.approx(0.8, abs=1e-6)
    assert evaluation.resampled is False
