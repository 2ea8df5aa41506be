"""Key-slice thumbnails: the slices go through the drawn structures' centre, shown as radiologists
read them (the patient's right on the screen's left, anterior up on the axial), whatever order the
series was stored in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from vesalius.dicom_out.thumbnails import write_thumbnails
from vesalius.inference.models import Label
from vesalius.inference.volume import Volume

SHAPE = (20, 30, 40)  # slices (superior), rows (posterior), cols (left)
CUBE = (slice(5, 10), slice(10, 15), slice(28, 34))  # a drawn structure, off centre in every axis


def _volume(flip_cols: bool) -> tuple[Volume, np.ndarray]:
    """A CT whose columns run toward the patient's left, or toward the right (stored mirrored)."""
    header = pydicom.Dataset()
    header.Modality = "CT"
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = 2.0, 1.0, -1.0 if flip_cols else 1.0, 1.0
    labels = np.zeros(SHAPE, np.uint8)
    labels[CUBE] = 2
    labels[:, :, :3] = 1  # the body: see-through, never drawn, so it does not move the centre
    image = np.full(SHAPE, 40, np.int16)
    if flip_cols:
        labels, image = labels[:, :, ::-1].copy(), image[:, :, ::-1].copy()
    return Volume(image, affine, (header,) * SHAPE[0]), labels


@pytest.mark.parametrize("flip_cols", [False, True])
def test_axial_thumbnail_shows_the_structure_on_the_patients_left(tmp_path: Path, flip_cols: bool) -> None:
    volume, labels = _volume(flip_cols)
    structures = [Label(1, "body"), Label(2, "lung_left")]
    paths = write_thumbnails(volume, labels, structures, tmp_path)
    assert [p.name for p in paths] == ["axial.png", "coronal.png", "sagittal.png"]
    views = {p.stem: np.asarray(Image.open(p).convert("RGB")).astype(int) for p in paths}
    found = {view: np.argwhere(np.abs(pixels - pixels[0, 0]).sum(axis=2) > 30)  # the structure's colour
             for view, pixels in views.items()}
    assert all(len(c) for c in found.values()), "each slice goes through the structure's centre"
    axial, coloured = views["axial"], found["axial"]
    rows, cols = axial.shape[:2]
    # patient left (high column index in patient order) is on the screen's right; posterior down
    centre_col, centre_row = coloured[:, 1].mean() / cols, coloured[:, 0].mean() / rows
    assert centre_col == pytest.approx(31 / SHAPE[2], abs=0.05)
    assert centre_row == pytest.approx(12.5 / SHAPE[1], abs=0.05)
