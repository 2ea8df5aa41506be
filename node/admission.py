"""Who may open an association, and how many at once: checked when an A-ASSOCIATE-RQ arrives.

AE titles are trivially spoofed, so an allow-list entry may bind one to a host (``AE@10.0.0.5``)
or a network (``AE@10.0.0.0/24``). A peer is a (calling AE title, IP address) pair; one peer may
hold at most ``max_associations_per_peer`` of the node's ``max_associations``, so idle or hostile
connections from one peer cannot lock the other modalities out. Refusals are an A-ASSOCIATE-RJ
with the standard reason and a log line naming the peer.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass

from pynetdicom import evt
from pynetdicom.association import Association

log = logging.getLogger("vesalius.admission")

# A-ASSOCIATE-RJ (result, source, reason) of PS3.8 table 9-21
CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)  # rejected-permanent, service-user
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AllowRule:
    """One ``allowed_calling_aes`` entry: an AE title, optionally only from one network."""

    ae_title: str
    network: Network | None = None

    @classmethod
    def parse(cls, text: str) -> AllowRule:
        """``AE`` or ``AE@IP`` or ``AE@IP/PREFIX``; ValueError when the part after ``@`` is no address."""
        ae, at, host = text.rpartition("@")
        if not at:
            return cls(text.strip())
        return cls(ae.strip(), ipaddress.ip_network(host.strip(), strict=False))

    def allows(self, ae_title: str, address: str) -> bool:
        if ae_title != self.ae_title:
            return False
        if self.network is None:
            return True
        try:
            return ipaddress.ip_address(address.split("%")[0]) in self.network
        except ValueError:
            return False


def printable(text: str, limit: int = 64) -> str:
    """A value from the network as it may appear in a log line: control characters replaced."""
    return "".join(c if c.isprintable() else "?" for c in str(text)[:limit])


class Admission:
    """The EVT_REQUESTED handler: allow-list, total and per-peer association limits."""

    def __init__(self, allowed: tuple[str, ...], max_associations: int, max_per_peer: int) -> None:
        self.rules = tuple(AllowRule.parse(a) for a in allowed)
        self.max_associations = max_associations
        self.max_per_peer = max_per_peer
        self._lock = threading.Lock()

    def refusal(self, ae_title: str, address: str,
                admitted: list[tuple[str, str]]) -> tuple[str, tuple[int, ...]]:
        """Why this peer may not associate now ("" when it may), and the A-ASSOCIATE-RJ reason."""
        if self.rules and not any(r.allows(ae_title, address) for r in self.rules):
            return "calling AE and address not in allowed_calling_aes", CALLING_AE_NOT_RECOGNIZED
        if len(admitted) >= self.max_associations:
            return f"all max_associations ({self.max_associations}) in use", LOCAL_LIMIT_EXCEEDED
        if admitted.count((ae_title, address)) >= self.max_per_peer:
            return (f"this peer already holds max_associations_per_peer ({self.max_per_peer})",
                    LOCAL_LIMIT_EXCEEDED)
        return "", ()

    def handle_requested(self, event: evt.Event) -> None:
        assoc: Association = event.assoc
        request = assoc.requestor.primitive
        ae_title = str(request.calling_ae_title if request is not None else "").strip()
        address = str(assoc.requestor.address)
        with self._lock:
            admitted = [a._vesalius_peer for a in assoc.ae.active_associations
                        if a is not assoc and a.is_alive() and hasattr(a, "_vesalius_peer")]
            why, reason = self.refusal(ae_title, address, admitted)
            if not why:
                assoc._vesalius_peer = (ae_title, address)  # type: ignore[attr-defined]
                return
        log.warning("association from %s at %s refused: %s", printable(ae_title), address, why)
        assoc.acse.send_reject(*reason)
        assoc.kill()
