"""Deliveries: our result objects to each destination (by its kind: node.destinations), retried with
capped exponential backoff; a permanent refusal ends in a visible failed state instead of an endless
loop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from vesalius.node import audit, database
from vesalius.node.audit import Audit
from vesalius.node.config import Config, Retry
from vesalius.node.database import Row
from vesalius.node.deidentify import deidentified_files
from vesalius.node.destinations import DeliveryError, Destination
from vesalius.node.leases import Leases
from vesalius.node.pipeline import FIRST_OBJECTS, OUTPUT_FILES, STL_DIR
from vesalius.node.store import Claim, Store

__all__ = ["DeliveryError", "Sender", "files_for", "next_delay"]

log = logging.getLogger("vesalius.send")
POLL_SECONDS = 0.1  # how soon a delivery queued by another process (a worker, another node) starts


def files_for(destination: Destination, result_dir: str | Path, part: str = "all") -> list[Path]:
    """The result objects this destination receives, in a stable order: ``part`` "first" (the
    SEG, SR and surfaces: node.pipeline.FIRST_OBJECTS), "rest" (the 3D preview and the STLs) or
    "all" (the deliveries' column ``part``, set by node.store.results_ready and finish_job)."""
    if part not in ("all", "first", "rest"):
        raise ValueError(f"no such part of a job's results: {part!r}")
    folder = Path(result_dir)
    wanted = {"seg": True, "seg_labelmap": destination.labelmap,
              "surface_segmentation": destination.surfaces, "sr": destination.sr,
              "preview": destination.preview}
    files = [folder / OUTPUT_FILES[key] for key, on in wanted.items()
             if on and (part == "all" or (key in FIRST_OBJECTS) == (part == "first"))]
    stls = destination.encapsulated_stl if part != "first" else False
    if stls:
        files += [p for p in sorted((folder / STL_DIR).glob("*.dcm"))
                  if stls is True or (isinstance(stls, tuple) and p.stem in stls)]
    return [f for f in files if f.exists()]


def next_delay(retry: Retry, attempts: int) -> float:
    """Exponential backoff after ``attempts`` failed tries, capped."""
    return float(min(retry.base_delay * 2 ** max(attempts - 1, 0), retry.max_delay))


class Sender:
    """Works through due deliveries, one at a time, until stopped."""

    def __init__(self, store: Store, config: Config, wake: threading.Event, stop: threading.Event,
                 trail: Audit | None = None, leases: Leases | None = None) -> None:
        self.store = store
        # the node's heartbeat renews the claims held here (none given: claims are not renewed)
        self.leases = leases or Leases(store, config.owner, config.lease_seconds)
        self.trail = trail
        self.config = config
        self.wake = wake
        self.stop = stop
        self.thread = threading.Thread(target=self._loop, name="sender", daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                # a worker queues a job's first objects from its own process (node.store.results_ready):
                # looked for by a read every POLL_SECONDS; the claim's write lock only when one is due
                if not self.wake.is_set() and not self.store.delivery_due():
                    self.wake.wait(POLL_SECONDS)
                    continue
                self.wake.clear()
                delivery = self.store.claim_delivery(self.leases.owner, self.leases.lease_seconds)
                if delivery is None:
                    continue
                self.leases.hold("deliveries", delivery["id"], Claim.of(delivery))
                try:
                    self.deliver(delivery)  # sent, not recorded (database down): sent again later
                finally:
                    self.leases.drop("deliveries", delivery["id"])
            except database.Error as err:
                database.pause_after_outage("sender", err, self.stop)

    def deliver(self, delivery: Row) -> None:
        destinations = {d.name: d for d in self.config.destinations}
        name, attempt = delivery["destination"], delivery["attempts"] + 1
        destination = destinations.get(name)
        if destination is None:
            self._failed(delivery, None, attempt, f"destination {name!r} is no longer configured", True)
            return
        max_attempts = destination.max_attempts or self.config.retry.max_attempts
        if attempt > max_attempts:  # the last tries' senders died mid-send (node.store.claim_delivery)
            self._failed(delivery, destination, attempt, f"gave up: {delivery['error']}", True)
            return
        files: list[Path] = []
        try:
            files = files_for(destination, delivery["result_dir"], delivery["part"])
            if files:  # e.g. the first objects for a destination that takes only the 3D preview
                self._audit(audit.BEGIN_TRANSFERRING, delivery, audit.SUCCESS, files)
                # de-identification per destination (issue 9; node/deidentify.py): de-identified copies
                with deidentified_files(self.store, destination.deidentify, destination.deidentify_options,
                                        files) as sent:
                    destination.send(sent, self.config.ae_title)
        except DeliveryError as err:
            self._failed(delivery, destination, attempt, str(err), err.permanent)
            outcome = audit.SERIOUS_FAILURE if err.permanent else audit.MINOR_FAILURE
            self._audit(audit.INSTANCES_TRANSFERRED, delivery, outcome, files)
            return
        except Exception as err:  # network errors and the like: worth another try
            self._failed(delivery, destination, attempt, f"{type(err).__name__}: {err}", False)
            self._audit(audit.INSTANCES_TRANSFERRED, delivery, audit.MINOR_FAILURE, files)
            return
        if not self.store.record_delivery(delivery["id"], "done", None, time.time(), Claim.of(delivery)):
            log.warning("delivery done but not recorded delivery=%d job=%d: its lease expired and another "
                        "node took it over, or its job ran again", delivery["id"], delivery["job_id"])
        if files:
            self._audit(audit.INSTANCES_TRANSFERRED, delivery, audit.SUCCESS, files)
        log.info("delivery done delivery=%d job=%d destination=%s part=%s attempt=%d objects=%d",
                 delivery["id"], delivery["job_id"], destination.label, delivery["part"], attempt, len(files))

    def _audit(self, event: str, delivery: Row, outcome: int, files: Sequence[Path]) -> None:
        if self.trail is not None:
            self.trail.record(event, outcome=outcome, action="R", user=self.config.ae_title,
                              direction="sent", destination=delivery["destination"], delivery=delivery["id"],
                              job=delivery["job_id"], attempt=delivery["attempts"] + 1,
                              instances=audit.instance_uids(files))

    def _failed(self, delivery: Row, destination: Destination | None, attempt: int, reason: str,
                permanent: bool) -> None:
        max_attempts = (destination and destination.max_attempts) or self.config.retry.max_attempts
        give_up = permanent or attempt >= max_attempts
        delay = next_delay(self.config.retry, attempt)
        state = "failed" if give_up else "pending"
        self.store.record_delivery(delivery["id"], state, reason, time.time() + delay, Claim.of(delivery))
        where = destination.label if destination else repr(delivery["destination"])
        log.warning("delivery try failed delivery=%d job=%d destination=%s attempt=%d state=%s%s: %s",
                    delivery["id"], delivery["job_id"], where, attempt, state,
                    "" if give_up else f" next_try_in={delay:.0f}s", reason)
