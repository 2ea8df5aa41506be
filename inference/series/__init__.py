"""A received series -> ``Volume``: read and decode (``read``), flatten multi-frame instances
(``frames``), check the geometry (``geometry``). ``load_series``, ``Volume`` and ``VolumeError`` are
importable from here."""

from __future__ import annotations

from vesalius.inference.series.frames import frame_number, multiframe_header, multiframe_source
from vesalius.inference.series.read import load_series
from vesalius.inference.volume import Volume, VolumeError

__all__ = ["Volume", "VolumeError", "frame_number", "load_series", "multiframe_header", "multiframe_source"]
