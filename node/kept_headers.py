"""The header elements series completion reads (node.series.read_facts), kept from the parse
that checked each instance at ingest (node.receive, node.ingest).

Completing a series read every header of it again from the spool, ~1 ms an instance (0.35 s for
300 slices), between the association's release and the job's start. The listener has already
parsed each header before acknowledging the instance; the few elements completion needs are
taken from that parse instead (as read, unconverted: ~40 us an instance). A header that is not
kept (another listener received it, the node restarted, it was dropped to stay within
``KEPT_HEADERS``, or it is an enhanced multi-frame one) is read from the file as before, so what
completion decides never depends on what is kept here.
"""

from __future__ import annotations

import threading
from pathlib import Path

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

# what read_facts reads of each instance (and the character set its text values need)
HEADER_TAGS = ["Modality", "ImageType", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness",
               "PixelSpacing", "ConvolutionKernel", "ContrastBolusAgent", "NumberOfFrames",
               "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"]
KEPT_TAGS: list[BaseTag] = [Tag(k) for k in ("SpecificCharacterSet", *HEADER_TAGS)]
FUNCTIONAL_GROUPS = Tag("PerFrameFunctionalGroupsSequence")
KEPT_HEADERS = 4096  # ~1.5 KB each: four series of 1000 slices arriving at once
_kept: dict[str, Dataset] = {}
_lock = threading.Lock()


def keep(path: Path, ds: Dataset) -> None:
    """Keep what completion reads of the instance just stored at ``path``, from ``ds``, its data
    set as ingest parsed it (values not yet converted; none of the large ones read)."""
    if FUNCTIONAL_GROUPS in ds:  # an enhanced multi-frame header: large, and one file to read
        return
    header = Dataset()
    for tag in KEPT_TAGS:
        if tag in ds:
            element = ds.get_item(tag, keep_deferred=True)
            if isinstance(element, RawDataElement) and element.value is None and element.length:
                return  # deferred by ingest (larger than its defer size): the file has it
            header[tag] = element
    with _lock:
        _kept.pop(str(path), None)  # a resent instance: its latest header, at the end
        _kept[str(path)] = header
        while len(_kept) > KEPT_HEADERS:
            del _kept[next(iter(_kept))]  # the oldest


def take(path: Path) -> Dataset | None:
    """The header kept for ``path`` (then forgotten: a series completed again reads its files),
    or None."""
    with _lock:
        return _kept.pop(str(path), None)
