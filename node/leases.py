"""This node's claims kept alive: one heartbeat thread per node renews, every lease_seconds/3, the
leases of the jobs and deliveries it works on and of the associations it is receiving, and its own
row in ``nodes``; and the background duties (pull runner, correction recognition, retention) this
node holds, so that one node at a time does each. Only a dead (or hung, or cut-off) node's claims
and duties expire, and another node takes them over (node.store claim_job, claim_delivery,
take_duties; docs/scale-out.md)."""

from __future__ import annotations

import logging
import threading
import time

from vesalius.node import database
from vesalius.node.checks import ConfigError
from vesalius.node.store import Claim, Store

log = logging.getLogger("vesalius.leases")
KINDS = ("jobs", "deliveries")


class Leases:
    """The claims this process holds, and the heartbeat that renews them."""

    def __init__(self, store: Store, owner: str, lease_seconds: float) -> None:
        self.store = store
        self.owner = owner
        self.lease_seconds = lease_seconds
        self._held: dict[str, dict[int, int]] = {kind: {} for kind in KINDS}
        self._duties: set[str] = set()  # those asked for (holds): taken when free, renewed when held
        self._held_duties: set[str] = set()
        self._duties_until = 0.0  # monotonic: held duties are ours until then (their last renewal)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def register(self) -> None:
        """Join the nodes sharing the database; a ConfigError when a live node has our name (two
        nodes of one name would take each other's claims back at every start)."""
        other = self.store.register_node(self.owner, self.lease_seconds)
        if other is not None:
            raise ConfigError(f"node_name: another node named {self.owner!r} is running (host "
                              f"{other['host']}, pid {other['pid']}) and shares this database; give each "
                              "node its own node_name (or stop that one and start this one lease_seconds "
                              "later)")

    def hold(self, kind: str, row_id: int, claim: Claim | None) -> None:
        """Renew this claim from now on (None: a row not claimed, nothing to renew)."""
        if claim is not None:
            with self._lock:
                self._held[kind][row_id] = claim.attempt

    def drop(self, kind: str, row_id: int) -> None:
        with self._lock:
            self._held[kind].pop(row_id, None)

    def renew(self) -> list[str]:
        """One heartbeat; returns the claims another node took over (logged: their results will be
        refused by the fencing in node.store)."""
        with self._lock:
            held = {kind: dict(rows) for kind, rows in self._held.items()}
        lost = self.store.renew_leases(self.owner, self.lease_seconds, held["jobs"], held["deliveries"])
        for what in lost:
            log.warning("lease lost: %s was taken over by another node (this node did not renew it "
                        "within lease_seconds=%g); what this node does with it is no longer recorded",
                        what, self.lease_seconds)
            kind, _, row_id = what.partition(" ")
            self.drop(kind, int(row_id))
        self._take_duties()
        return lost

    def holds(self, duty: str) -> bool:
        """Whether this node does ``duty`` now. The first ask takes it at once when it is free (a
        lone node starts its loops without waiting); then every heartbeat renews it, or takes it
        over from a holder that stopped renewing. A duty not renewed within lease_seconds (the
        database away) is not ours any more: another node may have taken it."""
        if self._stop.is_set():
            return False  # stopping: the duties are given back
        with self._lock:
            asked = duty in self._duties
            self._duties.add(duty)
        if not asked:
            self._take_duties()
        with self._lock:
            return duty in self._held_duties and time.monotonic() < self._duties_until

    def _take_duties(self) -> None:
        with self._lock:
            names = sorted(self._duties)
        if not names:
            return
        started = time.monotonic()
        held = self.store.take_duties(self.owner, names, self.lease_seconds)
        with self._lock:
            taken, lost = held - self._held_duties, self._held_duties - held
            self._held_duties, self._duties_until = held, started + self.lease_seconds
        for duty in sorted(taken):
            log.info("this node does the %s duty now", duty)
        for duty in sorted(lost):
            log.warning("duty %s was taken over by another node (this node did not renew it within "
                        "lease_seconds=%g)", duty, self.lease_seconds)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing, give the duties back and leave the nodes sharing the database (after the
        claims were given back)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with self._lock:
            self._held_duties.clear()
        self.store.release_duties(self.owner)
        self.store.unregister_node(self.owner)

    def _loop(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                self.renew()
            except database.Error as err:  # the database is away (restarting): the next beat tries again
                log.warning("could not renew this node's leases: %s", err)
            except Exception:
                log.exception("could not renew this node's leases")
