"""Pixels decoded ahead: a compressed instance's stored values, kept in a ``.decoded`` folder
beside its spool file by the listener while the series still arrives (node.decode_ahead), so
that reading the series (``read``) does not decode it again once the job starts.

Only a cache, never the record: written without fsync, used only when it names the very file it
was decoded from (inode, size, modification time: an instance sent again is a new file), and
anything it cannot vouch for is ignored and decoded again. It is 5-20 times the size of the
JPEG 2000 it comes from and holds patient data as the spool does, so it is short-lived: the job
removes its series' folder once the volume is read, retention sweeps folders left longer than
an hour (a series no job read) and removes it with its series (node.jobs, node.retention).
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np

_MAGIC = b"VSDEC1"
_KEY = struct.Struct("<6sQQQ")  # magic, then the source file's inode, size and mtime in ns
FOLDER = ".decoded"  # in a series folder of the spool, beside its instance files


def cache_path(path: str | Path) -> Path:
    """Where the decoded pixels of the spool file ``path`` are kept."""
    path = Path(path)
    return path.parent / FOLDER / f"{path.name}.npy"


def _key(source: os.stat_result) -> bytes:
    return _KEY.pack(_MAGIC, source.st_ino, source.st_size, source.st_mtime_ns)


def save(path: str | Path, pixels: np.ndarray, source: os.stat_result) -> None:
    """Keep ``pixels``, decoded from the spool file ``path`` as ``source`` (its stat before it was
    read) describes it; written to a temporary name and renamed, so a reader never sees half."""
    target = cache_path(path)
    target.parent.mkdir(exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_key(source))
            np.save(f, np.ascontiguousarray(pixels), allow_pickle=False)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load(path: str | Path) -> np.ndarray | None:
    """The pixels kept for the spool file ``path`` as it is now, or None (none kept, kept for an
    earlier file of that name, or unreadable: a crash may leave a renamed but empty file)."""
    try:
        source = os.stat(path)
        with open(cache_path(path), "rb") as f:
            if f.read(_KEY.size) != _key(source):
                return None
            pixels: np.ndarray = np.load(f, allow_pickle=False)
            return pixels
    except (OSError, ValueError, EOFError):
        return None


def remove_folder(series_folder: str | Path) -> None:
    """Delete all that is kept for the instance files in ``series_folder``."""
    shutil.rmtree(Path(series_folder) / FOLDER, ignore_errors=True)


def sweep(series_folder: str | Path, older_than: float) -> bool:
    """``remove_folder`` when nothing was added to it since ``older_than`` (a time); True if so."""
    folder = Path(series_folder) / FOLDER
    try:
        if folder.stat().st_mtime >= older_than:
            return False
    except FileNotFoundError:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True
