"""Key-slice thumbnails: an axial, a coronal and a sagittal slice with the segmentation drawn over
the image, as small PNGs for the dashboard's job page (cheap: three slices of arrays in memory).

Each slice passes through the centre of the segmented structures and is shown as radiologists
read it: the patient's right on the screen's left; anterior up on the axial, superior up on the
coronal and sagittal (anterior on the left of the sagittal); pixels square in millimetres.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vesalius.inference.models import Label
from vesalius.inference.terminology import term_for
from vesalius.inference.volume import Volume

VIEWS = ("axial", "coronal", "sagittal")
SIZE = 256  # px, the longer side
CT_WINDOW = (-160.0, 240.0)  # HU: soft tissue
ALPHA = 0.45  # of the structures' colour over the image
SLAB_SLICES = 16  # the drawn voxels are counted this many slices at a time


def _lps_order(volume: Volume) -> tuple[list[int], list[bool]]:
    """For each of patient left, posterior and superior: the array axis (slice, row, col) nearest
    it, and whether that axis runs the other way."""
    directions = volume.affine[:3, :3] / volume.spacing  # column j: where array axis j points
    order = [int(np.argmax(np.abs(directions[p]))) for p in range(3)]  # array axis nearest L, P, S
    if sorted(order) != [0, 1, 2]:  # an oblique grid: keep the array order
        order = [0, 1, 2]
    return order, [bool(directions[p, axis] < 0) for p, axis in enumerate(order)]


def _lps_axes(volume: Volume, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (slice, row, col) reordered and flipped so that its indices grow toward patient
    left, posterior and superior; and the voxel size in mm along those axes."""
    order, flips = _lps_order(volume)
    out = np.transpose(array, order)
    for p, flip in enumerate(flips):
        if flip:
            out = np.flip(out, p)
    return out, volume.spacing[order]


def _centre(volume: Volume, label_map: np.ndarray, drawn: np.ndarray) -> list[int]:
    """The mean (L, P, S) index of the drawn voxels (the middle of the volume when there are
    none), counted per axis a slab of slices at a time: a mask of them all would be the label
    map's size again (79 MB at 300 slices), np.argwhere 24 bytes a voxel."""
    counts = [np.zeros(n, np.int64) for n in label_map.shape]
    for start in range(0, label_map.shape[0], SLAB_SLICES):
        shown = drawn[label_map[start:start + SLAB_SLICES]]
        counts[0][start:start + len(shown)] = shown.sum(axis=(1, 2))
        counts[1] += shown.sum(axis=(0, 2))
        counts[2] += shown.sum(axis=(0, 1))
    order, flips = _lps_order(volume)
    total = int(counts[0].sum())
    if not total:
        return [label_map.shape[axis] // 2 for axis in order]
    along = [counts[axis][::-1] if flip else counts[axis] for axis, flip in zip(order, flips, strict=True)]
    return [int(round(float(np.dot(np.arange(len(c)), c)) / total)) for c in along]


def _window(values: np.ndarray, modality: str) -> tuple[float, float]:
    low, high = CT_WINDOW if modality == "CT" else tuple(np.percentile(values, (1, 99)))
    return float(low), float(high)


def _grey(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """One view in 8-bit grey (applied per view: a float copy of the whole volume costs 300 MB+)."""
    low, high = window
    scaled = (values.astype(np.float32) - low) / max(float(high - low), 1e-6)
    grey: np.ndarray = np.clip(scaled * 255, 0, 255).astype(np.uint8)
    return grey


def _slices(lps: np.ndarray, centre: Sequence[int]) -> dict[str, np.ndarray]:
    """The three views at ``centre`` (L, P, S indices), each as displayed (rows down, cols right)."""
    i, j, k = centre
    return {"axial": lps[:, :, k].T, "coronal": lps[:, j, :].T[::-1], "sagittal": lps[i, :, :].T[::-1]}


def _pixel_mm(spacing: np.ndarray) -> dict[str, tuple[float, float]]:
    """(row, col) pixel size in mm of each view of ``_slices``."""
    sl, sp, ss = (float(s) for s in spacing)
    return {"axial": (sp, sl), "coronal": (ss, sl), "sagittal": (ss, sp)}


def write_thumbnails(volume: Volume, label_map: np.ndarray, structures: Sequence[Label],
                     folder: Path) -> list[Path]:
    """``folder``/axial.png, coronal.png, sagittal.png; returns their paths."""
    image, spacing = _lps_axes(volume, volume.array)
    labels, _ = _lps_axes(volume, label_map)
    colours = np.zeros((int(label_map.max()) + 1, 3), np.float32)
    drawn = np.zeros(len(colours), bool)
    for label in structures:
        term = term_for(label.name)
        if 0 < label.value < len(colours) and term.opacity >= 1.0:  # see-through ones (body) not drawn
            colours[label.value] = term.rgb
            drawn[label.value] = True
    centre = _centre(volume, label_map, drawn)
    window = _window(image, volume.modality)
    grey_views = {view: _grey(pixels, window) for view, pixels in _slices(image, centre).items()}
    label_views = _slices(labels, centre)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for view, (row_mm, col_mm) in _pixel_mm(spacing).items():
        rgb = np.repeat(grey_views[view][..., None], 3, axis=2).astype(np.float32)
        mask = drawn[label_views[view]]
        rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * colours[label_views[view][mask]]
        height_mm, width_mm = rgb.shape[0] * row_mm, rgb.shape[1] * col_mm
        scale = SIZE / max(height_mm, width_mm)
        size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
        picture = Image.fromarray(np.ascontiguousarray(rgb.round().astype(np.uint8)), "RGB")
        path = folder / f"{view}.png"
        picture.resize(size, Image.Resampling.BILINEAR).save(path, optimize=False)
        written.append(path)
    return written
