"""A pydicom decoding plugin for JPEG 2000 through imagecodecs, which releases the GIL.

pylibjpeg-openjpeg (pydicom's default JPEG 2000 plugin) feeds OpenJPEG from a Python file object,
so it holds the GIL for the whole decode: two threads decode no faster than one
(`bench/decode.py`). imagecodecs decodes with the same library (OpenJPEG) from a memory buffer
with the GIL released, so `read.py` can decode the slices of a series on every core with threads.

The plugin follows pydicom's decoder plugin interface (``is_available``,
``DECODER_DEPENDENCIES``, a ``decode_frame(src, runner)`` function) and mirrors what pydicom's own
pylibjpeg plugin tells the runner about OpenJPEG's output, so pydicom's post-processing (J2K sign
correction, precision, colour space) is the same whichever plugin decoded; it could go upstream
into ``pydicom.pixels.decoders`` as is.
"""

from __future__ import annotations

import functools

import numpy as np
from pydicom import uid
from pydicom.pixels.common import PhotometricInterpretation as PI
from pydicom.pixels.decoders.base import DecodeRunner

PLUGIN = "imagecodecs"
# The syntaxes registered (and tested): JPEG 2000 Part 1. HTJ2K decodes through OpenJPEG too, but
# pydicom cannot encode it to test against; it keeps pydicom's own plugins.
SYNTAXES = (uid.JPEG2000Lossless, uid.JPEG2000)
DECODER_DEPENDENCIES = {syntax: ("imagecodecs>=2024.1.1",) for syntax in SYNTAXES}


def is_available(syntax: str) -> bool:
    """pydicom's plugin check: imagecodecs importable and built with OpenJPEG."""
    if syntax not in SYNTAXES:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(imagecodecs.JPEG2K.available)


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One frame's JPEG 2000 codestream -> its pixel bytes (pydicom's plugin signature)."""
    array = _jpeg2k_decode(src)
    # what pydicom's pylibjpeg plugin sets for OpenJPEG's output (the same library here):
    if runner.photometric_interpretation in (PI.YBR_ICT, PI.YBR_RCT):
        runner.set_option("photometric_interpretation", PI.RGB)  # OpenJPEG applied the inverse MCT
    precision = runner.get_option("j2k_precision", runner.bits_stored)
    if 0 < precision <= 8:
        runner.set_option("bits_allocated", 8)
    elif 8 < precision <= 16:
        runner.set_option("bits_allocated", 16)
    elif 16 < precision <= 32:
        runner.set_option("bits_allocated", 32)
    if array.ndim == 3:
        runner.set_option("planar_configuration", 0)  # imagecodecs returns colour-by-pixel
    if array.dtype.itemsize * 8 != runner.get_option("bits_allocated"):
        raise ValueError(f"imagecodecs returned {array.dtype} for J2K precision {precision}")
    return bytes(array.data)


def _jpeg2k_decode(src: bytes) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpeg2k_decode(src)  # the GIL is released while OpenJPEG decodes


@functools.cache
def register() -> bool:
    """Add the plugin to pydicom's JPEG 2000 decoders once per process; True if it is usable.

    Added, not preferred: pydicom's order is unchanged for everyone else, and ``read.py`` asks for
    it by name (``decoding_plugin=PLUGIN``)."""
    from pydicom.pixels.decoders.base import get_decoder

    decoders = [get_decoder(syntax) for syntax in SYNTAXES]
    for decoder in decoders:
        try:
            decoder.add_plugin(PLUGIN, (__name__, "decode_frame"))
        except ValueError:  # added already (by another caller of this module in the process)
            pass
    return all(PLUGIN in decoder.available_plugins for decoder in decoders)
