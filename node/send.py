"""Deliveries: our result objects to each destination by C-STORE, retried with capped exponential
backoff; a permanent refusal ends in a visible failed state instead of an endless loop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import EncapsulatedSTLStorage, LabelMapSegmentationStorage

from vesalius.node.config import Config, Destination, Retry
from vesalius.node.pipeline import OUTPUT_FILES, STL_DIR
from vesalius.node.store import Store

log = logging.getLogger("vesalius.send")

WARNING_STATUSES = {0xB000, 0xB006, 0xB007}  # stored, with coercion or elements discarded
# Extras a destination may lack: when it does not accept them, they are skipped, not a failure
# (the BINARY SEG and the Surface Segmentation carry the same content).
OPTIONAL_SOP_CLASSES = frozenset({LabelMapSegmentationStorage, EncapsulatedSTLStorage})


def files_for(destination: Destination, result_dir: str | Path) -> list[Path]:
    """The result objects this destination receives, in a stable order."""
    folder = Path(result_dir)
    wanted = {"seg": True, "seg_labelmap": destination.labelmap,
              "surface_segmentation": destination.surfaces, "sr": destination.sr,
              "preview": destination.preview}
    files = [folder / OUTPUT_FILES[key] for key, on in wanted.items() if on]
    stls = destination.encapsulated_stl
    if stls:
        files += [p for p in sorted((folder / STL_DIR).glob("*.dcm")) if stls is True or p.stem in stls]
    return [f for f in files if f.exists()]


class DeliveryError(Exception):
    """A delivery that did not go through; ``permanent`` means retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


def c_store(destination: Destination, files: Sequence[Path], calling_ae: str) -> None:
    """Send files in one association, negotiating exactly their SOP classes and transfer syntaxes."""
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                                     for ds in datasets}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         max_pdu=destination.max_pdu)
    if not assoc.is_established:
        if assoc.is_rejected and assoc.acceptor.primitive is not None:
            result = assoc.acceptor.primitive.result
            reason = assoc.acceptor.primitive.reason_str
            raise DeliveryError(f"association rejected: {reason}", permanent=result == 0x01)
        if assoc.rejected_contexts:  # the peer accepted the association but none of our SOP classes
            names = ", ".join(sorted({cx.abstract_syntax.name for cx in assoc.rejected_contexts}))
            raise DeliveryError(f"destination does not accept {names}", permanent=True)
        raise DeliveryError("no association (destination unreachable or aborted)", permanent=False)
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        for ds in datasets:
            if str(ds.SOPClassUID) not in accepted:
                if ds.SOPClassUID in OPTIONAL_SOP_CLASSES:
                    log.info("destination %s does not accept %s: skipped (the BINARY SEG and surfaces "
                             "carry the same content)", destination.name, ds.SOPClassUID.name)
                    continue
                raise DeliveryError(f"destination does not accept SOP class {ds.SOPClassUID.name}",
                                    permanent=True)
            status = assoc.send_c_store(ds)
            if "Status" not in status:
                raise DeliveryError("connection lost during C-STORE", permanent=False)
            code = int(status.Status)
            if code != 0x0000 and code not in WARNING_STATUSES:
                transient = code & 0xFF00 == 0xA700  # out of resources: try again later
                raise DeliveryError(f"C-STORE of {ds.SOPClassUID.name} refused with status 0x{code:04X}",
                                    permanent=not transient)
    finally:
        assoc.release()


def next_delay(retry: Retry, attempts: int) -> float:
    """Exponential backoff after ``attempts`` failed tries, capped."""
    return min(retry.base_delay * 2 ** max(attempts - 1, 0), retry.max_delay)


class Sender:
    """Works through due deliveries, one at a time, until stopped."""

    def __init__(self, store: Store, config: Config, wake: threading.Event, stop: threading.Event) -> None:
        self.store = store
        self.config = config
        self.wake = wake
        self.stop = stop
        self.thread = threading.Thread(target=self._loop, name="sender", daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            due = self.store.due_deliveries()
            for delivery in due:
                if self.stop.is_set():
                    return
                self.deliver(delivery)
            if not due:
                self.wake.wait(0.5)
                self.wake.clear()

    def deliver(self, delivery) -> None:
        destinations = {d.name: d for d in self.config.destinations}
        name, attempt = delivery["destination"], delivery["attempts"] + 1
        destination = destinations.get(name)
        files: list[Path] = []
        try:
            if destination is None:
                raise DeliveryError(f"destination {name!r} is no longer configured", permanent=True)
            files = files_for(destination, delivery["result_dir"])
            if destination.kind == "dicomweb":
                from vesalius.node.stow import stow_rs  # node.stow imports this module

                stow_rs(destination, files)
            else:
                c_store(destination, files, self.config.ae_title)
        except DeliveryError as err:
            self._failed(delivery, destination, attempt, str(err), err.permanent)
            return
        except Exception as err:  # network errors and the like: worth another try
            self._failed(delivery, destination, attempt, f"{type(err).__name__}: {err}", False)
            return
        self.store.record_delivery(delivery["id"], "done", None, time.time())
        log.info("delivery done delivery=%d job=%d destination=%s attempt=%d objects=%d",
                 delivery["id"], delivery["job_id"], name, attempt, len(files))

    def _failed(self, delivery, destination: Destination | None, attempt: int, reason: str,
                permanent: bool) -> None:
        max_attempts = (destination and destination.max_attempts) or self.config.retry.max_attempts
        give_up = permanent or attempt >= max_attempts
        delay = next_delay(self.config.retry, attempt)
        state = "failed" if give_up else "pending"
        self.store.record_delivery(delivery["id"], state, reason, time.time() + delay)
        log.warning("delivery try failed delivery=%d job=%d destination=%s attempt=%d state=%s%s: %s",
                    delivery["id"], delivery["job_id"], delivery["destination"], attempt, state,
                    "" if give_up else f" next_try_in={delay:.0f}s", reason)
