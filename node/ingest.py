"""What every way in checks before an instance is stored: C-STORE (node.receive), C-GET and
WADO-RS retrieval (node.pull) and STOW-RS (node.api.stow) all end in ``store_file``, so an
instance is refused for the same reasons whichever way it came, and stored with the same
durability (``Store.store_instance``) before anything is acknowledged.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from vesalius.node import database, kept_headers
from vesalius.node.paths import UnsafePath
from vesalius.node.store import SeriesInfo, Store

log = logging.getLogger("vesalius.ingest")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
# What can be a UID at all: digits in dot-separated components, at most 64 characters. Leading
# zeros in a component break PS3.5 9.1 but are common from older modalities and harmless: such
# UIDs are accepted and stored under a hashed file name (node.paths.uid_file_name).
UID_SHAPE = re.compile(r"[0-9]+(\.[0-9]+)*")
MAX_UID_LENGTH = 64
HEADER_DEFER_SIZE = 4096  # values larger than this stay on disk while the header is checked


def uid_problem(keyword: str, value: object) -> str:
    """Why ``value`` cannot be a UID ("" when it can); never quotes the value itself."""
    text = str(value if value is not None else "").rstrip("\x00 ")
    if not text:
        return f"missing {keyword}"
    if len(text) > MAX_UID_LENGTH:
        return f"{keyword} of {len(text)} characters is longer than {MAX_UID_LENGTH}"
    if not UID_SHAPE.fullmatch(text):
        return f"{keyword} is not a UID (only digits and dots, no empty component)"
    return ""


def _value_length(ds: Dataset, keyword: str) -> int:
    """The length of a value as read, without loading a deferred one (``keep_deferred``: without
    it pydicom reads a deferred value, the whole pixel data, to return the element)."""
    element = ds.get_item(keyword, keep_deferred=True)
    if isinstance(element, RawDataElement):
        return int(element.length)
    return len(element.value)


def _printable(value: object, limit: int = 64) -> str:
    return "".join(c if c.isprintable() else "?" for c in str(value)[:limit])


def instance_problem(ds: Dataset, sop_class_uid: str, encapsulated: bool) -> tuple[str, int]:
    """Why an instance cannot be accepted, without decoding its pixels ("" and SUCCESS when it
    can): ``sop_class_uid`` is what the transfer announced (the C-STORE command's, or the file
    meta's), ``encapsulated`` whether its transfer syntax compresses the pixel data."""
    for keyword in REQUIRED_UIDS:
        problem = uid_problem(keyword, ds.get(keyword, ""))
        if problem:
            return problem, CANNOT_UNDERSTAND
    if str(ds.get("SOPClassUID", "")) != sop_class_uid:
        sent = ds.get("SOPClassUID", "(none)")
        return (f"SOP Class UID {_printable(sent)} in the data set differs from "
                f"{_printable(sop_class_uid)} announced", DOES_NOT_MATCH_SOP_CLASS)
    if "PixelData" in ds and not encapsulated:
        expected = get_expected_length(ds, unit="bytes")
        length = _value_length(ds, "PixelData")
        if length not in (expected, expected + 1):  # +1: even-length padding
            return (f"pixel data holds {length} bytes, Rows x Columns x "
                    f"BitsAllocated needs {expected}", CANNOT_UNDERSTAND)
    return "", SUCCESS


def series_info(ds: Dataset, sop_class_uid: str) -> SeriesInfo:
    """What the store records of a series, from one of its (checked) instances."""
    return SeriesInfo(
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        modality=str(ds.get("Modality", "") or ""),
        sop_class_uid=sop_class_uid,
        series_description=str(ds.get("SeriesDescription", "") or ""),
        body_part=str(ds.get("BodyPartExamined", "") or ""),
        manufacturer=str(ds.get("Manufacturer", "") or ""),
    )


@dataclass(frozen=True)
class Ingested:
    """The outcome for one instance: a DIMSE status (0 stored), why not, and what was stored."""

    status: int
    problem: str = ""
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    new: bool = False  # False: this SOP Instance UID was stored before (now replaced)


def store_file(store: Store, path: Path, source: str, min_free_bytes: int = 0) -> Ingested:
    """Check and store a Part 10 file that arrived without a DIMSE command (C-GET's, WADO-RS's
    and STOW-RS's instances): the file meta stands in for the command. ``path`` is moved into
    the spool (it should lie in ``store.incoming_dir``, on the spool's filesystem) or, when
    refused, deleted. ``source`` is recorded as the instance's calling AE."""
    try:
        ds = dcmread(path, defer_size=HEADER_DEFER_SIZE)
        meta = getattr(ds, "file_meta", None)
        sop_class = str(meta.get("MediaStorageSOPClassUID", "") if meta is not None else "")
        syntax = UID(str(meta.get("TransferSyntaxUID", "") if meta is not None else ""))
        encapsulated = syntax.is_transfer_syntax and syntax.is_encapsulated
    except Exception as err:  # anything unreadable is refused, never raised to the caller
        path.unlink(missing_ok=True)
        return Ingested(CANNOT_UNDERSTAND, f"data set cannot be parsed ({type(err).__name__})")
    if not sop_class:
        path.unlink(missing_ok=True)
        return Ingested(CANNOT_UNDERSTAND, "no File Meta Information (MediaStorageSOPClassUID)")
    return store_checked(store, ds, path, sop_class, encapsulated, source, min_free_bytes)


def store_checked(store: Store, ds: Dataset, path: Path, sop_class_uid: str, encapsulated: bool,
                  source: str, min_free_bytes: int = 0) -> Ingested:
    """``instance_problem``, the free-space floor, then ``Store.store_instance``; the file is
    deleted unless stored."""
    free = shutil.disk_usage(store.spool_dir).free
    if free < min_free_bytes:
        path.unlink(missing_ok=True)
        return Ingested(OUT_OF_RESOURCES, f"only {free // 2**20} MB free in the spool")
    problem, status = instance_problem(ds, sop_class_uid, encapsulated)
    if problem:
        path.unlink(missing_ok=True)
        return Ingested(status, problem, sop_class_uid=sop_class_uid)
    info = series_info(ds, sop_class_uid)
    sop_uid = str(ds.SOPInstanceUID)
    try:
        new = store.store_instance(info, sop_uid, path, source)
        kept_headers.keep(store.instance_path(info.study_instance_uid, info.series_instance_uid, sop_uid), ds)
    except UnsafePath as err:  # cannot happen for a checked UID; refused rather than written
        path.unlink(missing_ok=True)
        return Ingested(CANNOT_UNDERSTAND, str(err), sop_uid, sop_class_uid)
    except (OSError, database.OperationalError) as err:  # disk full, I/O error, database locked or down
        path.unlink(missing_ok=True)
        return Ingested(OUT_OF_RESOURCES, f"could not store: {err}", sop_uid, sop_class_uid)
    return Ingested(SUCCESS, "", sop_uid, sop_class_uid, info.series_instance_uid,
                    info.study_instance_uid, new)
