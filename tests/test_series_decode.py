"""Decoding a series in parallel: the same volume, voxel for voxel, as one slice at a time and as
pydicom's own JPEG 2000 plugin; the imagecodecs plugin (GIL released) is the one used, and a
failure of it falls back to pydicom's plugins."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from tests.phantoms import Cylinder, Sphere, write_phantom_series
from vesalius.inference.series import j2k, load_series
from vesalius.inference.series import read as read_module

OBJECTS = [Sphere(center=(4.0, -3.0, 2.0), radius=9.0, hu=900.0),
           Cylinder(center=(-6.0, 5.0, 0.0), axis=(0.1, 0.2, 1.0), radius=5.0, length=30.0, hu=-800.0)]


def _series(tmp_path: Path, syntax: str, slices: int = 12) -> list[Path]:
    phantom = write_phantom_series(tmp_path / "series", shape=(slices, 40, 36), spacing=(2.0, 1.0, 1.0),
                                   objects=OBJECTS)
    if syntax != ExplicitVRLittleEndian:
        for path in phantom.paths:
            ds = pydicom.dcmread(path)
            lossy = {"j2k_cr": [20]} if syntax == JPEG2000 else {}
            ds.compress(syntax, encoding_plugin="pylibjpeg" if syntax != RLELossless else "", **lossy)
            ds.save_as(path)
    return list(phantom.paths)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless])
def test_parallel_decode_is_voxel_for_voxel_the_serial_one(tmp_path: Path, syntax: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _series(tmp_path, syntax)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    monkeypatch.setattr(read_module, "_workers", lambda: 4)
    parallel = load_series(paths)
    monkeypatch.setattr(read_module, "_workers", lambda: 1)
    serial = load_series(paths)
    assert parallel.array.dtype == serial.array.dtype == np.int16
    np.testing.assert_array_equal(parallel.array, serial.array)
    assert [ds.SOPInstanceUID for ds in parallel.sources] == [ds.SOPInstanceUID for ds in serial.sources]
    assert parallel.array.std() > 100  # the phantom's objects are in it, not a blank volume


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEG2000])
def test_imagecodecs_plugin_decodes_what_pydicoms_plugin_decodes(tmp_path: Path, syntax: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _series(tmp_path, syntax, slices=6)
    calls = []
    decode = j2k._jpeg2k_decode
    monkeypatch.setattr(j2k, "_jpeg2k_decode", lambda src: calls.append(1) or decode(src))
    ours = load_series(paths)
    assert len(calls) == 6  # every slice went through imagecodecs
    monkeypatch.setattr(read_module, "register_j2k", lambda: False)  # pydicom's own choice
    theirs = load_series(paths)
    assert len(calls) == 6
    np.testing.assert_array_equal(ours.array, theirs.array)


@pytest.mark.parametrize("bits_stored", [12, 16])
def test_signed_and_narrow_j2k_frames_match_pylibjpeg(tmp_path: Path, bits_stored: int) -> None:
    """Negative stored values (Pixel Representation 1) and a precision below 16 bits: pydicom's
    sign correction and container size apply to imagecodecs' output as to pylibjpeg's."""
    paths = _series(tmp_path, ExplicitVRLittleEndian, slices=1)
    ds = pydicom.dcmread(paths[0])
    rng = np.random.default_rng(bits_stored)
    low, high = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1)
    values = rng.integers(low, high, size=(ds.Rows, ds.Columns), dtype=np.int16)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 1
    ds.PixelData = values.tobytes()
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    assert j2k.register()
    ours = ds.pixel_array_options(decoding_plugin=j2k.PLUGIN) or ds.pixel_array.copy()
    ds._pixel_array = None
    ds.pixel_array_options(decoding_plugin="pylibjpeg")
    np.testing.assert_array_equal(ours, ds.pixel_array)
    np.testing.assert_array_equal(ours, values)


def test_a_failing_imagecodecs_decode_falls_back_to_pydicoms_plugins(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _series(tmp_path, JPEG2000Lossless, slices=4)
    expected = load_series(paths).array

    calls = []

    def broken(src: bytes) -> np.ndarray:
        calls.append(1)
        raise RuntimeError("imagecodecs failed")

    monkeypatch.setattr(j2k, "_jpeg2k_decode", broken)
    np.testing.assert_array_equal(load_series(paths).array, expected)
    assert len(calls) == 4  # tried first, every slice


def test_workers_follow_the_cpu_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(read_module.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert read_module._workers() == 3
    monkeypatch.setattr(read_module.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert read_module._workers() == 8
