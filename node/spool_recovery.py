"""Instance rows rebuilt from the spool at start-up, before the listener accepts anything.

``Store.store_instance`` makes the fsynced spool file the record of an instance and commits its
row without an fsync of its own (docs/performance.md, "Ingest"): a power loss can take the rows
of the last instances acknowledged before it, never their files. This module finds spool files
that have no row — by their names first, reading only the headers of those — and records them
as the receiver would have, with the same checks (node.ingest). Files it cannot vouch for (a
temporary file of an interrupted write, a header that does not parse, a file its own UIDs would
not name, a series that retention had already removed) are reported and left as they are.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.uid import UID

from vesalius.inference.series import decoded
from vesalius.node.ingest import HEADER_DEFER_SIZE, instance_problem, series_info
from vesalius.node.store import SeriesInfo, Store

log = logging.getLogger("vesalius.spool_recovery")


@dataclass
class Recovery:
    """What ``recover_rows`` did: rows rebuilt, the series they belong to, files left alone and why."""

    rebuilt: int = 0
    series: set[str] = field(default_factory=set)
    refused: dict[Path, str] = field(default_factory=dict)


def unrecorded_files(store: Store) -> tuple[list[Path], dict[Path, str]]:
    """Spool files no instance row names (from the folder listings alone), and names that
    cannot be instance files."""
    known = {row["path"] for row in store.query("SELECT path FROM instances")}
    missing: list[Path] = []
    refused: dict[Path, str] = {}
    for series in store.series_folders():
        for entry in os.scandir(series):
            path = Path(entry.path)
            if entry.path in known or entry.name == decoded.FOLDER:
                continue
            if not entry.is_file(follow_symlinks=False):
                refused[path] = "not a regular file"
            elif entry.name.startswith(".") or not entry.name.endswith(".dcm"):
                refused[path] = "not an instance file (a temporary file of an interrupted write)"
            else:
                missing.append(path)
    return missing, refused


def read_instance(store: Store, path: Path) -> tuple[SeriesInfo, str] | str:
    """The series and SOP Instance UID of a spool file from its header alone, checked as
    ``node.ingest`` checks a received one; or why it is not an instance this store wrote."""
    try:
        ds = dcmread(path, defer_size=HEADER_DEFER_SIZE)  # the pixel data is skipped, not read
        meta = ds.file_meta
        sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
        syntax = UID(str(meta.get("TransferSyntaxUID", "")))
        encapsulated = syntax.is_transfer_syntax and syntax.is_encapsulated
    except Exception as err:  # anything unreadable is reported, never raised
        return f"header cannot be parsed ({type(err).__name__})"
    problem, _ = instance_problem(ds, sop_class, encapsulated)
    if problem:
        return problem
    pixels = ds.get_item("PixelData") if "PixelData" in ds else None
    if isinstance(pixels, RawDataElement) and pixels.value_tell + pixels.length > path.stat().st_size:
        return "truncated: the pixel data ends beyond the end of the file"
    info, sop_uid = series_info(ds, sop_class), str(ds.SOPInstanceUID)
    if store.spool_path(info.study_instance_uid, info.series_instance_uid, sop_uid) != path:
        return "its UIDs do not name this file"
    return info, sop_uid


def recover_rows(store: Store) -> Recovery:
    """Record every spool file that has no row and is an instance this store wrote; the series
    they belong to start their quiet period (the associations that sent them ended with the
    node), so they complete and are processed as usual."""
    recovery = Recovery()
    missing, recovery.refused = unrecorded_files(store)
    for path in missing:
        found = read_instance(store, path)
        if isinstance(found, str):
            recovery.refused[path] = found
            continue
        info, sop_uid = found
        series = store.query("SELECT calling_ae FROM series WHERE series_instance_uid=?",
                             (info.series_instance_uid,))
        if not series:  # its series row, committed durably with its first instance, was deleted
            recovery.refused[path] = "its series was removed (retention) before this file"
            continue
        store.store_instance(info, sop_uid, path, series[0]["calling_ae"])
        recovery.rebuilt += 1
        recovery.series.add(info.series_instance_uid)
    if recovery.series:
        store.mark_released(sorted(recovery.series))  # a FULL commit: the rebuilt rows are durable
        log.warning("rebuilt %d instance row(s) of %d series from the spool (lost with a power "
                    "loss after they were acknowledged)", recovery.rebuilt, len(recovery.series))
    for path, why in sorted(recovery.refused.items()):
        log.warning("spool file %s not recorded: %s", path.relative_to(store.spool_dir), why)
    return recovery
