"""The source series' headers, tidied the way the writers need them.

Real scanners write things highdicom refuses to copy, e.g. an empty Specific Character Set
(GE does); the sources are shallow-copied and such empty attributes dropped, never modified in place.
"""

from __future__ import annotations

import pydicom

from vesalius.inference.volume import Volume

# Type 1C attributes that, when present, must have a value; an empty one means "not given".
_DROP_WHEN_EMPTY = ("SpecificCharacterSet",)


def tidy(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` itself, or a shallow copy without the empty attributes that must not be empty."""
    if not any(keyword in ds and ds[keyword].is_empty for keyword in _DROP_WHEN_EMPTY):
        return ds  # nothing to drop: the writers only read their sources
    copy = pydicom.Dataset()  # Dataset(ds) and copy.copy(ds) share ds's element dict
    for element in ds:
        if not (element.keyword in _DROP_WHEN_EMPTY and element.is_empty):
            copy.add(element)
    if hasattr(ds, "file_meta"):
        copy.file_meta = ds.file_meta
    return copy


def source_headers(volume: Volume) -> list[pydicom.Dataset]:
    """The volume's source headers in array order, tidied for writing derived objects."""
    return [tidy(ds) for ds in volume.sources]
