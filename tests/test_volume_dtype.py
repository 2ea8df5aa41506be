"""The volume's voxel type: int16 when the modality values are integers that fit (nearly every CT),
float32 otherwise (a fractional rescale, or values beyond int16), always the same values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels.processing import apply_modality_lut

from tests.phantoms import Sphere, write_phantom_series
from vesalius.inference.series import load_series


def _series(tmp_path: Path) -> list[Path]:
    return write_phantom_series(tmp_path / "ct", shape=(6, 20, 24), spacing=(2, 1, 1),
                                objects=[Sphere((0, 0, 0), 6, 300)]).paths


def _rewrite(paths: list[Path], **attributes: object) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)


def _expected(paths: list[Path], volume_sources: tuple[pydicom.Dataset, ...]) -> np.ndarray:
    by_uid = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in paths}
    slices = []
    for header in volume_sources:
        ds = pydicom.dcmread(by_uid[str(header.SOPInstanceUID)])
        slices.append(apply_modality_lut(ds.pixel_array, ds))
    return np.stack(slices)


def test_integer_rescale_gives_int16_with_the_same_values(tmp_path: Path) -> None:
    paths = _series(tmp_path)
    volume = load_series(paths)
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, _expected(paths, volume.sources))
    assert all("PixelData" not in ds for ds in volume.sources)


def test_fractional_slope_gives_float32(tmp_path: Path) -> None:
    paths = _series(tmp_path)
    _rewrite(paths, RescaleSlope="0.5")
    volume = load_series(paths)
    assert volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.array, _expected(paths, volume.sources))


def test_values_beyond_int16_fall_back_to_float32(tmp_path: Path) -> None:
    paths = _series(tmp_path)
    _rewrite(paths[:1], RescaleIntercept="-33000")  # air, stored as 24, becomes -32976 HU there
    volume = load_series(paths)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, _expected(paths, volume.sources))
    assert volume.array.min() < np.iinfo(np.int16).min


def test_unsigned_12_bit_ct_is_let_go_of_slice_by_slice_and_still_exact(tmp_path: Path) -> None:
    paths = _series(tmp_path)
    for path in paths:  # stored as unsigned 12-bit, as many scanners do
        ds = pydicom.dcmread(path)
        stored = (ds.pixel_array.astype(np.int32) + 1024).astype(np.uint16)
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 12, 11
        ds.RescaleIntercept = "-2048"
        ds.PixelData = stored.tobytes()
        ds.save_as(path, enforce_file_format=True)
    volume = load_series(paths)
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, _expected(paths, volume.sources))
