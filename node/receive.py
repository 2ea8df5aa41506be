"""The DICOM listener: C-ECHO and C-STORE for every storage SOP class and transfer syntax.

Handlers only store durably, record, and answer; they never decode pixel data. Which series become
jobs is decided later (node.series, node.jobs), once a series is complete. Data sets arrive in
chunks on disk (in the spool's ``.incoming`` folder), never whole in memory; what the listener
bounds and refuses is in docs/input.md.
"""

from __future__ import annotations

import copy
import ctypes
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynetdicom._config
import pynetdicom.dimse_messages
import pynetdicom.transport
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from vesalius.node import database, ingest, kept_headers, pdu_limits
from vesalius.node.admission import Admission, printable
from vesalius.node.audit import AssociationTally
from vesalius.node.config import Config
from vesalius.node.ingest import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
from vesalius.node.paths import UnsafePath
from vesalius.node.store import SeriesInfo, Store

RELEASE_TRIES = 5  # s-spaced tries to record an association's end while the database is unavailable
log = logging.getLogger("vesalius.receive")

# pynetdicom, as acceptor, takes the first of OUR transfer syntaxes that the requestor offers in a
# presentation context (presentation.negotiate_as_acceptor). So the order below is the choice made
# when a modality offers several in one context: the lossless compressions we decode first (the
# bytes as the modality holds them, 2.5-3 times smaller), then uncompressed Explicit and Implicit
# VR Little Endian, and only then syntaxes that may be lossy (accepting lossy JPEG when the
# modality also offers uncompressed could discard data the modality has), syntaxes we cannot
# decode, and the retired big endian. Everything stays accepted when it is the only one offered.
LOSSLESS_COMPRESSED_SYNTAXES = (
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless Only
    "1.2.840.10008.1.2.4.202",  # HTJ2K with RPCL Options Lossless Only
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (SV1)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
)
UNCOMPRESSED_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # Explicit, Implicit VR LE
BIG_ENDIAN = "1.2.840.10008.1.2.2"
ACCEPTED_SYNTAXES = (
    *LOSSLESS_COMPRESSED_SYNTAXES, *UNCOMPRESSED_SYNTAXES,
    *(uid for uid in ALL_TRANSFER_SYNTAXES
      if uid not in {*LOSSLESS_COMPRESSED_SYNTAXES, *UNCOMPRESSED_SYNTAXES, BIG_ENDIAN}),
    BIG_ENDIAN,
)


class Receiver:
    """C-STORE handling: spool file + row before success; which series each open association is
    storing is in the store (open_associations), seen by every listener sharing the database."""

    def __init__(self, store: Store, min_free_bytes: int = 0,
                 on_stored: Callable[[], None] = lambda: None, node_name: str = "",
                 lease_seconds: float = 30.0, on_released: Callable[[], None] = lambda: None,
                 decode_ahead: Callable[[SeriesInfo, str, Any], object] | None = None) -> None:
        self.store = store
        self.min_free_bytes = min_free_bytes
        self.on_stored = on_stored
        self.on_released = on_released  # told when an association's series may be complete at once
        self.decode_ahead = decode_ahead  # given each compressed instance stored (node.decode_ahead)
        self.node_name = node_name
        self.lease_seconds = lease_seconds
        self._touched: dict[int, set[str]] = {}
        self._lock = threading.Lock()
        clear_incoming(store.incoming_dir, incoming_prefix(node_name))

    def handle_store(self, event: evt.Event) -> int:
        calling_ae = printable(event.assoc.requestor.ae_title, 16)
        free = shutil.disk_usage(self.store.spool_dir).free
        if free < self.min_free_bytes:
            log.error("refused instance from %s: only %d MB free in %s", calling_ae, free // 2**20,
                      self.store.spool_dir)
            return OUT_OF_RESOURCES
        received = Path(event.dataset_path)
        spool_file = getattr(event.request, "_dataset_file", None)
        if isinstance(spool_file, SpoolFile):
            spool_file.close()
            if spool_file.error is not None:
                log.error("could not store instance from %s: %s", calling_ae, spool_file.error)
                received.unlink(missing_ok=True)
                return OUT_OF_RESOURCES
        try:
            ds = dcmread(received, defer_size=ingest.HEADER_DEFER_SIZE)
            problem, status = self._problem(ds, event)
            info = None if problem else SeriesInfo(
                series_instance_uid=str(ds.SeriesInstanceUID),
                study_instance_uid=str(ds.StudyInstanceUID),
                modality=str(ds.get("Modality", "") or ""),
                sop_class_uid=str(event.request.AffectedSOPClassUID),
                series_description=str(ds.get("SeriesDescription", "") or ""),
                body_part=str(ds.get("BodyPartExamined", "") or ""),
                manufacturer=str(ds.get("Manufacturer", "") or ""),
            )
        except Exception as err:  # an unparsable dataset must not end the association
            log.warning("refused instance from %s: dataset cannot be parsed (%s)", calling_ae,
                        type(err).__name__)
            return CANNOT_UNDERSTAND
        if info is None:
            log.warning("refused instance from %s: %s", calling_ae, problem)
            return status
        sop_uid = str(ds.SOPInstanceUID)
        try:
            self._opened(event.assoc, info.series_instance_uid)
            self.store.store_instance(info, sop_uid, received, calling_ae)
            kept_headers.keep(self.store.instance_path(info.study_instance_uid, info.series_instance_uid,
                                                       sop_uid), ds)
        except UnsafePath as err:  # cannot happen for a checked UID; refused rather than written
            log.error("refused instance from %s: %s", calling_ae, err)
            return CANNOT_UNDERSTAND
        except (OSError, database.OperationalError) as err:  # disk full, I/O error, database locked or down
            log.error("could not store instance from %s: %s", calling_ae, err)
            return OUT_OF_RESOURCES
        if self.decode_ahead is not None and event.context.transfer_syntax.is_encapsulated:
            self.decode_ahead(info, sop_uid, event.assoc)
        self.on_stored()
        return SUCCESS

    def _opened(self, assoc: object, series_uid: str) -> None:
        """Before an association stores its first instance of a series, every listener learns that
        it is sending that series (so none completes it at another association's release)."""
        with self._lock:
            touched = self._touched.setdefault(id(assoc), set())
            first = series_uid not in touched
            touched.add(series_uid)
        if first:
            self.store.open_association(self.node_name, _association_key(assoc), series_uid)

    @staticmethod
    def _problem(ds: Dataset, event: evt.Event) -> tuple[str, int]:
        """Why an instance cannot be accepted, without decoding its pixels ("" when it can)."""
        problem, status = ingest.instance_problem(ds, str(event.request.AffectedSOPClassUID),
                                                  event.context.transfer_syntax.is_encapsulated)
        return problem.replace(" announced", " in the command"), status

    def handle_rejected(self, event: evt.Event) -> None:
        log.warning("association from %s at %s rejected by pynetdicom",
                    printable(event.assoc.requestor.ae_title, 16), event.assoc.requestor.address)

    def handle_close(self, event: evt.Event) -> None:
        """The association ended (released, aborted or dropped): its series start their quiet period."""
        discard_partial_data_set(event.assoc)
        with self._lock:
            touched = self._touched.pop(id(event.assoc), set())
        released = bool(getattr(event.assoc, "is_released", False))  # A-RELEASE, not abort or drop
        log.info("association from %s at %s %s; %d series touched",
                 printable(event.assoc.requestor.ae_title, 16), event.assoc.requestor.address,
                 "released" if released else "ended without release", len(touched))
        if not touched:
            return
        problem = ""
        for _ in range(RELEASE_TRIES):  # a database restarting comes back within seconds
            try:
                if self.store.close_association(self.node_name, _association_key(event.assoc),
                                                sorted(touched), released, self.lease_seconds):
                    self.on_released()
                return
            except database.OperationalError as err:
                problem = str(err).splitlines()[0]
                time.sleep(1.0)
        log.warning("association end not recorded (database unavailable: %s); its %d series complete "
                    "after the stability timeout", problem, len(touched))


def _association_key(assoc: object) -> str:
    """An open association's name in open_associations: unique in this process while it is open."""
    return f"{id(assoc):x}"


def incoming_prefix(node_name: str) -> str:
    """The start of the names of the files this listener receives into (the folder is shared by
    the listeners sharing a spool)."""
    return f"{node_name}-" if node_name else "tmp"


def clear_incoming(folder: Path, prefix: str, abandoned_after: float = 3600.0) -> None:
    """At start-up: delete the data sets this listener was receiving when it stopped, and any file
    nobody wrote to for ``abandoned_after`` s (a dead listener's; a STOW-RS or pull leftover)."""
    folder.mkdir(parents=True, exist_ok=True)
    old = time.time() - abandoned_after
    for path in folder.iterdir():
        try:
            if not (path.name.startswith(prefix) or path.stat().st_mtime < old):
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # another listener cleared it first
            continue


def discard_partial_data_set(assoc: object) -> None:
    """Delete the file of a data set whose association ended before it was complete (aborted,
    dropped, or closed for exceeding max_instance_mb)."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is not None:
        partial.close()
        Path(partial.name).unlink(missing_ok=True)


SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages in the range, no wait


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2), which Python's os module does not offer; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` to disk now, without
    waiting (what PostgreSQL's ``*_flush_after`` settings do): the fsync before the acknowledgement
    then finds most of the data set written already, instead of writing all of it then. Durability
    is the fsync's, unchanged; this only moves the writing earlier, while the rest arrives."""
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)  # a hint: a failure changes nothing


class SpoolFile:
    """The file pynetdicom writes a received data set into, in the spool's ``.incoming`` folder.
    A failed write (a full disk) is remembered and the rest dropped, so the C-STORE is answered
    A700 instead of the association dying in pynetdicom's state machine. Each fragment pynetdicom
    flushes is handed to the disk at once (``start_writeback``)."""

    def __init__(self, folder: Path, prefix: str = "tmp") -> None:
        # a plain file object: NamedTemporaryFile's wrapper adds a Python call to every write,
        # and pynetdicom writes the File Meta Information element by element
        fd, self.name = tempfile.mkstemp(suffix=".dcm", dir=folder, prefix=prefix)
        self._file = os.fdopen(fd, "wb")
        self.error: OSError | None = None
        self._written = 0  # bytes written, and those of them handed to start_writeback
        self._started = 0

    @property
    def file(self) -> SpoolFile:  # pynetdicom flushes through ``.file``
        return self

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                self._written += self._file.write(data)
            except OSError as err:
                self.error = err
        return len(data)

    def flush(self) -> None:
        """pynetdicom flushes after each data set fragment it writes."""
        if self.error is None:
            try:
                self._file.flush()
            except OSError as err:
                self.error = err
                return
            start_writeback(self._file.fileno(), self._started, self._written - self._started)
            self._started = self._written

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as err:
            self.error = self.error or err


def receive_data_sets_into(folder: Path, prefix: str = "tmp") -> None:
    """Make pynetdicom write each received C-STORE data set to a file in ``folder`` as it arrives
    (``STORE_RECV_CHUNKED_DATASET``), instead of the system temp folder: storing it is then a
    rename on one filesystem. pynetdicom names no folder for that file; upstream this would be a
    ``_config`` setting next to ``STORE_RECV_CHUNKED_DATASET``."""
    pynetdicom._config.STORE_RECV_CHUNKED_DATASET = True
    def spool_file(**_: Any) -> SpoolFile:
        return SpoolFile(folder, prefix)

    pynetdicom.dimse_messages.NamedTemporaryFile = spool_file  # type: ignore[assignment,attr-defined]


def quiet_standard_handlers() -> None:
    """Bind none of pynetdicom's standard log handlers (``LOG_HANDLER_LEVEL``) while its logger
    drops debug records, as the node's does (cli: WARNING): they format a debug line for every PDU
    and DIMSE message whether or not it is logged, CPU that competes with receiving."""
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        pynetdicom._config.LOG_HANDLER_LEVEL = "none"


def copy_contexts(contexts: Any) -> Any:
    """What pynetdicom's acceptor deep-copies for every association (the supported presentation
    contexts, transport.RequestHandler), copied keeping the UIDs themselves: immutable strings
    that make nearly all of the 60-80 ms a deep copy of every storage SOP class x 45 transfer
    syntaxes costs, while the storage SCU waits for the association to be accepted. Upstream this
    would be ``PresentationContext.__deepcopy__`` (or ``UID.__deepcopy__`` returning itself)."""
    memo: dict[int, Any] = {}
    if isinstance(contexts, list) and all(isinstance(cx, PresentationContext) for cx in contexts):
        for cx in contexts:
            for uid in (cx.abstract_syntax, *cx.transfer_syntax):
                memo[id(uid)] = uid
    return copy.deepcopy(contexts, memo)


def install_fast_copies() -> None:
    """Make pynetdicom's acceptor copy its contexts with ``copy_contexts`` (idempotent)."""
    pynetdicom.transport.deepcopy = copy_contexts  # type: ignore[assignment,attr-defined]


def build_ae(config: Config, receiver: Receiver,
             tally: AssociationTally | None = None) -> tuple[AE, list[tuple[Any, ...]]]:
    """The application entity and its handlers, ready for ``start_server``; ``tally`` audits
    each association (node.audit)."""
    ae = AE(ae_title=config.ae_title)
    ae.maximum_pdu_size = config.max_pdu  # finite: a peer cannot make us hold more (docs/input.md)
    ae.network_timeout = config.idle_timeout
    ae.acse_timeout = min(30.0, config.idle_timeout)
    ae.maximum_associations = config.max_associations
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, list(ACCEPTED_SYNTAXES))
    pdu_limits.install()
    pdu_limits.set_max_dataset_bytes(ae, config.max_instance_mb * 2**20)
    quiet_standard_handlers()
    install_fast_copies()
    receive_data_sets_into(receiver.store.incoming_dir, incoming_prefix(receiver.node_name))
    admission = Admission(config.allowed_calling_aes, config.max_associations,
                          config.max_associations_per_peer)
    handlers = [(evt.EVT_REQUESTED, admission.handle_requested), (evt.EVT_C_STORE, receiver.handle_store),
                (evt.EVT_CONN_CLOSE, receiver.handle_close), (evt.EVT_REJECTED, receiver.handle_rejected)]
    if tally is not None:  # wraps the admission and C-STORE handlers to audit their answers
        handlers = [h for h in handlers if h[0] not in (evt.EVT_C_STORE, evt.EVT_REQUESTED)]
        handlers += tally.handlers(receiver.handle_store, admission.handle_requested)
    return ae, handlers
