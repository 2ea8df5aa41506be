"""The audit trail: who did what, when, append-only, after the event vocabulary of IHE ATNA /
DICOM PS3.15 Annex A.5 audit messages.

Every event is written twice: a row of the ``audit`` table (triggers refuse UPDATE and DELETE
on it; node/migrations/) and a JSON line appended to ``<data_dir>/audit.jsonl`` (fsynced). Events carry UIDs,
AE titles, addresses, token and OS user names, counts; never patient data.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vesalius.node import database
from vesalius.node.store import Store

log = logging.getLogger("vesalius.audit")

# Event names (DICOM PS3.15 A.5.3) and the one Vesalius adds for operator commands.
APPLICATION_ACTIVITY = "Application Activity"  # node start / stop
SECURITY_ALERT = "Security Alert"  # association rejected (calling AE not allowed)
USER_AUTHENTICATION = "User Authentication"  # HTTP bearer token missing or wrong
INSTANCES_TRANSFERRED = "DICOM Instances Transferred"  # an association ended; a delivery try ended
BEGIN_TRANSFERRING = "Begin Transferring DICOM Instances"  # a delivery try starts
INSTANCES_ACCESSED = "DICOM Instances Accessed"  # a job read a series and created results
OPERATOR_ACTION = "Operator Action"  # retry / resend, over HTTP (token name) or the CLI (OS user)

# EventOutcomeIndicator
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12

AUDIT_FILE = "audit.jsonl"


def utc_iso(seconds: float | None) -> str | None:
    """A POSIX time as ISO 8601 in UTC with its offset (None stays None)."""
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat()


class Audit:
    """``record(...)`` appends one event; a failure to write is logged, never raised, so auditing
    cannot stop the listener or a job (the log line says which event was lost)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = store.data_dir / AUDIT_FILE
        self._lock = threading.Lock()  # the table: node/migrations/*/0001_initial.sql

    def record(self, event: str, *, outcome: int = SUCCESS, event_type: str | None = None,
               action: str | None = None, user: str | None = None, address: str | None = None,
               **details: Any) -> None:
        entry = {"time": datetime.now(UTC).isoformat(timespec="microseconds"), "event": event,
                 "event_type": event_type, "action": action, "outcome": outcome, "user": user,
                 "address": address, "details": details}
        try:
            line = json.dumps(entry, sort_keys=True, separators=(",", ":"))
            with self._lock:
                try:
                    with self.store.transaction() as db:
                        db.execute('INSERT INTO audit (time, event, event_type, action, outcome, "user", '
                                   "address, details) VALUES (?,?,?,?,?,?,?,?)",
                                   (entry["time"], event, event_type, action, outcome, user, address,
                                    json.dumps(details, sort_keys=True)))
                except database.OperationalError as err:  # the database is down: the file keeps it
                    log.error("audit event %s written to %s only, not to the database: %s", event,
                              AUDIT_FILE, str(err).splitlines()[0])
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line.encode() + b"\n")
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except (OSError, database.Error, TypeError, ValueError):
            log.exception("could not write audit event %s", event)


def read_events(store: Store, since: str | None = None) -> list[dict[str, Any]]:
    """The audit table's events, oldest first, from ``since`` (an ISO 8601 UTC time) on."""
    Audit(store)  # the table exists even before the first event
    rows = store.query("SELECT * FROM audit WHERE time >= ? ORDER BY id", (since or "",))
    return [{**dict(r), "details": json.loads(r["details"])} for r in rows]


def instance_uids(files: Iterable[Path]) -> list[str]:
    """The SOP Instance UIDs of our own result files, for delivery events: from the file meta
    alone (pydicom parses a SEG's whole per-frame sequence even for ``specific_tags``)."""
    import pydicom
    from pydicom.filereader import read_file_meta_info

    uids = []
    for f in files:
        try:
            uids.append(str(read_file_meta_info(f).MediaStorageSOPInstanceUID))
        except (OSError, AttributeError, pydicom.errors.InvalidDicomError):
            uids.append("")
    return uids


class AssociationTally:
    """pynetdicom handlers that audit every association: rejected ones as a Security Alert, the
    others, when they end, as DICOM Instances Transferred with the instances stored and refused."""

    def __init__(self, audit: Audit) -> None:
        self.audit = audit
        self._open: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def counting(self, handle_store: Callable[[Any], int]) -> Callable[[Any], int]:
        """Wrap the C-STORE handler: count its answers per association."""
        def handler(event: Any) -> int:
            status = handle_store(event)
            with self._lock:
                tally = self._open.setdefault(id(event.assoc), {"stored": 0, "refused": 0, "sops": []})
                if status == SUCCESS:
                    tally["stored"] += 1
                    tally["sops"].append(str(event.request.AffectedSOPInstanceUID))
                else:
                    tally["refused"] += 1
            return status
        return handler

    def accepted(self, event: Any) -> None:
        with self._lock:
            self._open.setdefault(id(event.assoc), {"stored": 0, "refused": 0, "sops": []})

    def closed(self, event: Any) -> None:
        with self._lock:
            tally = self._open.pop(id(event.assoc), None)
        if tally is None:  # rejected or never accepted: audited (or nothing to say) already
            return
        requestor = event.assoc.requestor
        outcome = SUCCESS if not tally["refused"] else MINOR_FAILURE
        self.audit.record(INSTANCES_TRANSFERRED, outcome=outcome, action="C", user=requestor.ae_title,
                          address=f"{requestor.address}:{requestor.port}", direction="received",
                          called_ae=event.assoc.acceptor.ae_title, instances=tally["stored"],
                          refused=tally["refused"], studies=self._studies(tally["sops"]))

    def _studies(self, sop_uids: list[str]) -> list[str]:
        """The Study Instance UIDs of the instances stored (from the store, not the data sets)."""
        found: set[str] = set()
        for i in range(0, len(sop_uids), 500):
            chunk = sop_uids[i:i + 500]
            try:
                rows = self.audit.store.query(
                    "SELECT DISTINCT s.study_instance_uid AS uid FROM instances i JOIN series s ON "
                    "s.series_instance_uid=i.series_instance_uid WHERE i.sop_instance_uid IN "
                    f"({','.join('?' * len(chunk))})", chunk)
            except database.OperationalError:  # the database is down: the event goes without them
                return ["unknown: database unavailable"]
            found.update(str(r["uid"]) for r in rows)
        return sorted(found)

    def rejected(self, event: Any, reason: str = "association rejected by pynetdicom") -> None:
        requestor = event.assoc.requestor
        primitive = requestor.primitive
        calling = str(primitive.calling_ae_title if primitive is not None else requestor.ae_title).strip()
        self.audit.record(SECURITY_ALERT, outcome=MINOR_FAILURE, event_type="Node Authentication",
                          user=calling, address=f"{requestor.address}:{requestor.port}", reason=reason)

    def admitting(self, handle_requested: Callable[[Any], None]) -> Callable[[Any], None]:
        """Wrap the admission handler (node.admission): an association it refuses is audited."""
        def handler(event: Any) -> None:
            handle_requested(event)
            if not hasattr(event.assoc, "_vesalius_peer"):  # admission marks the ones it admits
                self.rejected(event, "association refused: allowed_calling_aes or association limits")
        return handler

    def handlers(self, handle_store: Callable[[Any], int],
                 handle_requested: Callable[[Any], None]) -> Sequence[tuple[Any, Callable[..., Any]]]:
        """The (event, handler) pairs for ``AE.start_server``."""
        from pynetdicom import evt

        return [(evt.EVT_REQUESTED, self.admitting(handle_requested)),
                (evt.EVT_C_STORE, self.counting(handle_store)), (evt.EVT_ACCEPTED, self.accepted),
                (evt.EVT_CONN_CLOSE, self.closed), (evt.EVT_REJECTED, self.rejected)]
