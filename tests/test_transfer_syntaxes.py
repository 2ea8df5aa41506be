"""Every transfer syntax the node accepts decodes to the right volume (real encoders, real CT).

The GE CT of ../shared/data (512x512, 16-bit signed, Implicit VR Little Endian) is re-encoded with
DCMTK's converters (dcmconv, dcmcrle, dcmcjpeg, dcmcjpls) and, for JPEG 2000 which DCMTK 3.6.7
cannot write, with pydicom + pylibjpeg-openjpeg. Lossless syntaxes must give exactly the volume
of the uncompressed files. Lossy JPEG cannot, so the volume decoded by load_series (pydicom's
decoders) must match the one from DCMTK's own decoder (dcmdjpeg) of the same file, within the one
level the JPEG standard lets decoders differ by, and the values stay near the original's.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from tests.peers import DCMTK_ENV
from vesalius.inference.series import load_series
from vesalius.inference.volume import Volume


def _dcmtk(*command: str) -> Callable[[Path, Path], None]:
    def encode(source: Path, target: Path) -> None:
        subprocess.run([*command, str(source), str(target)], check=True, env=DCMTK_ENV,
                       capture_output=True, timeout=60)

    return encode


def _pydicom_j2k(source: Path, target: Path) -> None:
    ds = pydicom.dcmread(source)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    ds.save_as(target)


LOSSLESS = {
    "implicit-vr": (ImplicitVRLittleEndian, _dcmtk("dcmconv", "+ti")),
    "explicit-vr": (ExplicitVRLittleEndian, _dcmtk("dcmconv", "+te")),
    "explicit-vr-big-endian": (ExplicitVRBigEndian, _dcmtk("dcmconv", "+tb")),
    "deflated": (DeflatedExplicitVRLittleEndian, _dcmtk("dcmconv", "+td")),
    "rle": (RLELossless, _dcmtk("dcmcrle")),
    "jpeg-lossless-sv1": (JPEGLosslessSV1, _dcmtk("dcmcjpeg", "+e1")),
    "jpeg-ls-lossless": (JPEGLSLossless, _dcmtk("dcmcjpls", "+el")),
    "jpeg2000-lossless": (JPEG2000Lossless, _pydicom_j2k),
}
LOSSY = {
    # 16-bit input: DCMTK maps it to 8 (baseline) or 12 (extended) bits and writes a new rescale
    "jpeg-baseline": (JPEGBaseline8Bit, _dcmtk("dcmcjpeg", "+eb")),
    "jpeg-extended-12bit": (JPEGExtended12Bit, _dcmtk("dcmcjpeg", "+ee")),
}


@pytest.fixture(scope="module")
def original(shared_data: Path) -> tuple[list[Path], Volume]:
    paths = sorted((shared_data / "ct-3slice-ge").glob("*.dcm"))
    return paths, load_series(paths)


def _encode(paths: list[Path], folder: Path, syntax: str,
            encode: Callable[[Path, Path], None]) -> list[Path]:
    folder.mkdir()
    out = []
    for path in paths:
        encode(path, folder / path.name)
        out.append(folder / path.name)
        assert pydicom.dcmread(out[-1], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    return out


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_syntax_decodes_to_the_uncompressed_volume(tmp_path: Path, original, name: str) -> None:
    paths, reference = original
    syntax, encode = LOSSLESS[name]
    volume = load_series(_encode(paths, tmp_path / name, syntax, encode))
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_array_equal(volume.affine, reference.affine)
    assert [ds.SOPInstanceUID for ds in volume.sources] == [ds.SOPInstanceUID for ds in reference.sources]


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_jpeg_decodes_like_dcmtk(tmp_path: Path, original, name: str) -> None:
    paths, reference = original
    syntax, encode = LOSSY[name]
    encoded = _encode(paths, tmp_path / name, syntax, encode)
    volume = load_series(encoded)
    decoded_by_dcmtk = _encode(encoded, tmp_path / "dcmdjpeg", ExplicitVRLittleEndian,
                               _dcmtk("dcmdjpeg", "+te"))
    independent = load_series(decoded_by_dcmtk)
    # ISO 10918 lets conforming decoders' inverse DCTs differ by one level in a few pixels
    step = float(pydicom.dcmread(encoded[0], stop_before_pixels=True).RescaleSlope)
    difference = np.abs(volume.array - independent.array)
    assert float(difference.max()) <= step * 1.0001
    assert float(np.mean(difference > 0)) < 0.1
    np.testing.assert_array_equal(volume.affine, reference.affine)
    # and it is still this CT: 8 bits over its 4405 HU range are 32 HU steps, 12 bits 2 HU steps;
    # at DCMTK's quality 90 the typical error stays within two steps plus a few HU
    error = np.abs(volume.array - reference.array)
    assert float(np.median(error)) <= 2 * step + 5
    assert float(np.corrcoef(volume.array.ravel(), reference.array.ravel())[0, 1]) > 0.99
