"""Bounds on what one peer can make pynetdicom hold in memory (a wrapper of its PDU reading).

pynetdicom 3.0 reads a whole PDU into memory, whatever length its header claims and whatever
maximum was negotiated, even an A-ASSOCIATE-RQ before any AE title check: one connection claiming
a 4 GB PDU grows the process by gigabytes. It has no hook there, so :func:`install` wraps
``DULServiceProvider._read_pdu_data``: during one call the DUL's socket is a :class:`_CheckedSocket`
whose first ``recv`` is the 6-byte PDU header (type, reserved, length) and whose second is the PDU
body. A header claiming more than the receiver can accept, or a P-DATA-TF body that takes the data
set of one message past a set maximum, closes the connection (the DUL sees it closed: Evt17)
before the body is read. Proposed upstream, this is a length check in ``_read_pdu_data`` itself.
``tests/test_limits.py`` fails when a pynetdicom upgrade changes the reading this relies on.
"""

from __future__ import annotations

import logging
import socket
import struct
import weakref
from typing import Any

from pynetdicom.ae import ApplicationEntity
from pynetdicom.dul import DULServiceProvider

log = logging.getLogger("vesalius.pdu")

ASSOCIATION_PDU_LIMIT = 64 * 1024  # an A-ASSOCIATE-RQ/AC with hundreds of contexts is a few KB
P_DATA_TF = 0x04
# DUL states before the association is established (PS3.8 9.2): only association PDUs arrive
NEGOTIATING = {"Sta1", "Sta2", "Sta3", "Sta4", "Sta5"}

_dataset_limits: weakref.WeakKeyDictionary[ApplicationEntity, int] = weakref.WeakKeyDictionary()
_original_read = DULServiceProvider._read_pdu_data


def set_max_dataset_bytes(ae: ApplicationEntity, max_bytes: int) -> None:
    """Close an association of ``ae`` whose peer sends one message data set over ``max_bytes``
    (0: no limit). Counted as it arrives, so nothing past the limit is kept or written."""
    _dataset_limits[ae] = max_bytes


def pdu_limit(dul: DULServiceProvider) -> int:
    """The largest PDU length (the header's length field) this DUL accepts now; 0: unlimited."""
    if dul.state_machine.current_state in NEGOTIATING:
        return ASSOCIATION_PDU_LIMIT
    assoc = dul.assoc
    local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    return int(local.maximum_length or 0)


def dataset_bytes(body: bytes | bytearray) -> tuple[int, bool]:
    """Data set fragment bytes in one P-DATA-TF variable field, and whether it ends a data set."""
    total, last, offset = 0, False, 0
    while offset + 6 <= len(body):
        item_length, control = struct.unpack_from(">L", body, offset)[0], body[offset + 5]
        if not control & 0x01:  # a data set (not a command) fragment
            total += max(item_length - 2, 0)
            last = last or bool(control & 0x02)
        offset += 4 + item_length
    return total, last


class _CheckedSocket:
    """The DUL's AssociationSocket for one ``_read_pdu_data`` call; everything else passes through."""

    def __init__(self, dul: DULServiceProvider, sock: Any) -> None:
        self._dul = dul
        self._sock = sock
        self._reads = 0
        self._pdu_type = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def recv(self, nr_bytes: int) -> bytearray:
        self._reads += 1
        if self._reads == 1:  # the PDU header
            header: bytearray = self._sock.recv(nr_bytes)
            if len(header) == 6:
                self._pdu_type, _, length = struct.unpack(">BBL", header)
                limit = pdu_limit(self._dul)
                if limit and length > limit:
                    return self._refuse(f"a PDU of {length} bytes (type 0x{self._pdu_type:02X}) "
                                        f"exceeds the {limit} bytes it may send now")
            return header
        body: bytearray = self._sock.recv(nr_bytes)
        if self._reads == 2 and self._pdu_type == P_DATA_TF:
            problem = self._count_dataset(body)
            if problem:
                return self._refuse(problem)
        return body

    def _count_dataset(self, body: bytearray) -> str:
        max_bytes = _dataset_limits.get(self._dul.assoc.ae, 0)
        if not max_bytes:
            return ""
        added, last = dataset_bytes(body)
        received = getattr(self._dul, "_vesalius_dataset_bytes", 0) + added
        self._dul._vesalius_dataset_bytes = 0 if last else received  # type: ignore[attr-defined]
        if received > max_bytes:
            return f"a data set of more than {max_bytes} bytes (the maximum instance size)"
        return ""

    def _refuse(self, why: str) -> bytearray:
        """Close the connection; the DUL reads a short PDU and treats the transport as closed."""
        assoc = self._dul.assoc
        peer = assoc.requestor if assoc.is_acceptor else assoc.acceptor
        log.warning("closed the connection of %s at %s: %s", peer.ae_title or "(not yet known)",
                    peer.address, why)
        raw = self._sock.socket
        if raw is not None:
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return bytearray()


def _read_pdu_data_bounded(self: DULServiceProvider) -> None:
    sock = self.socket
    self.socket = _CheckedSocket(self, sock)  # type: ignore[assignment]
    try:
        _original_read(self)
    finally:
        self.socket = sock


def install() -> None:
    """Bound every PDU read in this process (idempotent)."""
    DULServiceProvider._read_pdu_data = _read_pdu_data_bounded  # type: ignore[method-assign]
