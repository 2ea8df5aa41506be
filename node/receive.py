"""The DICOM listener: C-ECHO and C-STORE for every storage SOP class and transfer syntax.

Handlers only store durably, record, and answer; they never decode pixel data. Which series become
jobs is decided later (node.series, node.jobs), once a series is complete.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
from collections.abc import Callable

from pydicom.dataset import Dataset
from pydicom.pixels.utils import get_expected_length
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from vesalius.node.audit import AssociationTally
from vesalius.node.config import Config
from vesalius.node.store import SeriesInfo, Store

log = logging.getLogger("vesalius.receive")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class Receiver:
    """C-STORE handling: spool file + row before success; remembers which series each association touched."""

    def __init__(self, store: Store, min_free_bytes: int = 0,
                 on_stored: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.min_free_bytes = min_free_bytes
        self.on_stored = on_stored
        self._touched: dict[int, set[str]] = {}
        self._lock = threading.Lock()

    def handle_store(self, event: evt.Event) -> int:
        calling_ae = event.assoc.requestor.ae_title
        free = shutil.disk_usage(self.store.spool_dir).free
        if free < self.min_free_bytes:
            log.error("refused instance from %s: only %d MB free in %s", calling_ae, free // 2**20,
                      self.store.spool_dir)
            return OUT_OF_RESOURCES
        try:
            ds: Dataset = event.dataset
            problem, status = self._problem(ds, event)
        except Exception as err:  # an unparsable dataset must not end the association
            log.warning("refused instance from %s: dataset cannot be parsed (%s)", calling_ae, err)
            return CANNOT_UNDERSTAND
        if problem:
            log.warning("refused instance from %s: %s", calling_ae, problem)
            return status
        info = SeriesInfo(
            series_instance_uid=str(ds.SeriesInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            modality=str(ds.get("Modality", "") or ""),
            sop_class_uid=str(event.request.AffectedSOPClassUID),
            series_description=str(ds.get("SeriesDescription", "") or ""),
            body_part=str(ds.get("BodyPartExamined", "") or ""),
            manufacturer=str(ds.get("Manufacturer", "") or ""),
        )
        try:
            self.store.store_instance(info, str(ds.SOPInstanceUID),
                                      event.encoded_dataset(include_meta=True), calling_ae)
        except (OSError, sqlite3.OperationalError) as err:  # disk full, I/O error, database locked
            log.error("could not store instance from %s: %s", calling_ae, err)
            return OUT_OF_RESOURCES
        with self._lock:
            self._touched.setdefault(id(event.assoc), set()).add(info.series_instance_uid)
        self.on_stored()
        return SUCCESS

    @staticmethod
    def _problem(ds: Dataset, event: evt.Event) -> tuple[str, int]:
        """Why an instance cannot be accepted, without decoding its pixels ("" when it can)."""
        missing = [k for k in REQUIRED_UIDS if not str(ds.get(k, "") or "").strip()]
        if missing:
            return f"missing {', '.join(missing)}", CANNOT_UNDERSTAND
        command_class = str(event.request.AffectedSOPClassUID)
        if str(ds.get("SOPClassUID", "")) != command_class:
            return (f"SOP Class UID {ds.get('SOPClassUID', '(none)')} in the data set differs from "
                    f"{command_class} in the command", DOES_NOT_MATCH_SOP_CLASS)
        if "PixelData" in ds and not event.context.transfer_syntax.is_encapsulated:
            expected = get_expected_length(ds, unit="bytes")
            if len(ds.PixelData) not in (expected, expected + 1):  # +1: even-length padding
                return (f"pixel data holds {len(ds.PixelData)} bytes, Rows x Columns x "
                        f"BitsAllocated needs {expected}", CANNOT_UNDERSTAND)
        return "", SUCCESS

    def handle_rejected(self, event: evt.Event) -> None:
        log.warning("association from %s at %s rejected: calling AE not in allowed_calling_aes",
                    event.assoc.requestor.ae_title, event.assoc.requestor.address)

    def handle_close(self, event: evt.Event) -> None:
        """The association ended (released, aborted or dropped): its series start their quiet period."""
        with self._lock:
            touched = self._touched.pop(id(event.assoc), set())
        log.info("association from %s at %s ended; %d series touched", event.assoc.requestor.ae_title,
                 event.assoc.requestor.address, len(touched))
        self.store.mark_released(sorted(touched))


def build_ae(config: Config, receiver: Receiver, tally: AssociationTally | None = None) -> tuple[AE, list]:
    """The application entity and its handlers, ready for ``start_server``; ``tally`` audits
    each association (node.audit)."""
    ae = AE(ae_title=config.ae_title)
    ae.maximum_pdu_size = 0  # unlimited: far faster for large images (PERFORMANCE.md)
    ae.network_timeout = 60
    ae.require_calling_aet = list(config.allowed_calling_aes)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    handlers = [(evt.EVT_C_STORE, receiver.handle_store), (evt.EVT_CONN_CLOSE, receiver.handle_close),
                (evt.EVT_REJECTED, receiver.handle_rejected)]
    if tally is not None:  # its C-STORE handler counts the answers of receiver.handle_store
        handlers = [h for h in handlers if h[0] is not evt.EVT_C_STORE]
        handlers += tally.handlers(receiver.handle_store)
    return ae, handlers
