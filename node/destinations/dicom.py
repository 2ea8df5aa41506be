"""Kind "dicom": C-STORE to a DICOM peer in one association, optionally over TLS."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pynetdicom._config
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE

from vesalius.inference.fields import FieldError, from_table
from vesalius.node.checks import ConfigError, ae_title, not_negative, port, positive, under
from vesalius.node.destinations import DeliveryError, Destination, Outgoing, register
from vesalius.node.tls import ClientTLS, client_context

log = logging.getLogger("vesalius.send")

WARNING_STATUSES = {0xB000, 0xB006, 0xB007}  # stored, with coercion or elements discarded
# Extras a destination may lack: when it does not accept them, they are skipped, not a failure
# (the BINARY SEG and the Surface Segmentation carry the same content).
OPTIONAL_SOP_CLASSES = frozenset({UID("1.2.840.10008.5.1.4.1.1.66.7"),  # Label Map Segmentation Storage
                                  UID("1.2.840.10008.5.1.4.1.1.104.3")})  # Encapsulated STL Storage
TLS_KEYS = ("tls_ca_certificates", "tls_certificate", "tls_private_key", "tls_verify_hostname")


def parse_tls(table: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """``tls = true`` and its flat tls_* keys (which need it) as one ClientTLS; relative files
    start at ``base``."""
    settings = {name.removeprefix("tls_"): table.pop(name) for name in TLS_KEYS if name in table}
    tls = table.pop("tls", False)
    if tls is False:
        if settings:
            raise FieldError(f"tls_{next(iter(settings))}: only with tls = true")
        return table
    if tls is not True:
        raise FieldError(f"tls: expected true or false, got {tls!r}")
    for name in ("ca_certificates", "certificate", "private_key"):
        if isinstance(settings.get(name), str):
            settings[name] = str(under(base, Path(settings[name])))
    try:
        return {**table, "tls": from_table(ClientTLS, settings)}
    except FieldError as err:
        raise FieldError(f"tls_{err}") from None


def connect_error(host: str, port: int, timeout: float) -> str:
    """Why a TCP connection to the peer fails ("Connection refused", "timed out", a name that does
    not resolve), or "" when it succeeds: pynetdicom reports a failed association without it."""
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 10.0)):
            return ""
    except socket.gaierror as err:
        return f"cannot resolve {host}: {err.strerror}"
    except TimeoutError:
        return "connection timed out"
    except OSError as err:
        return err.strerror or type(err).__name__


@register
@dataclass(frozen=True)
class DicomDestination(Destination):
    """A DICOM peer (a PACS) receiving our objects by C-STORE."""

    kind: ClassVar[str] = "dicom"
    TABLE_KEYS: ClassVar[frozenset[str]] = frozenset(TLS_KEYS)
    ae_title: str
    host: str
    port: int
    max_pdu: int = 0  # 0: unlimited
    timeout: float = 30.0  # s for the association and each DIMSE reply
    tls: ClientTLS | None = None  # None: plain DICOM

    @property
    def address(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + (" tls" if self.tls else "")

    @classmethod
    def parse(cls, text: str) -> DicomDestination:
        """``AE@HOST:PORT`` as given on the command line."""
        match = re.fullmatch(r"([^@]{1,16})@([^:@]+):(\d{1,5})", text.strip())
        if not match:
            raise ConfigError(f"destination {text!r}: expected AE@HOST:PORT, e.g. PACS@10.0.0.5:104")
        ae, host, number = match.groups()
        try:
            return cls(ae, ae, host, int(number))
        except FieldError as err:
            raise ConfigError(f"destination {text!r}: {err}") from None

    @classmethod
    def prepare(cls, table: dict[str, Any], base: Path | None) -> dict[str, Any]:
        if "ae_title" in table:
            table = {"name": table["ae_title"], **table}  # named after its AE title by default
        return parse_tls(table, base)

    def __post_init__(self) -> None:
        super().__post_init__()
        ae_title("ae_title", self.ae_title)
        port("port", self.port)
        not_negative("max_pdu", self.max_pdu)
        positive("timeout", self.timeout)

    def check(self) -> None:
        if self.tls is not None:
            client_context(self.tls, f"destination {self.name}: tls")

    def send(self, files: Sequence[Path], calling_ae: str = "VESALIUS") -> None:
        """Each file sent as it lies on disk, a PDU at a time (pynetdicom's chunked send): only
        the file meta is read, so the node holds no result object in memory while it sends (a
        1000-slice job's objects took the listener from ~150 to ~670 MB when read whole)."""
        if type(self).transform is not Destination.transform:  # a kind that rewrites datasets
            super().send(files, calling_ae)
            return
        pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True  # only send_c_store(path) reads it
        metas = [(read_file_meta_info(path), path) for path in files]  # a SEG's header alone is MBs
        self._send([(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID, path) for meta, path in metas],
                   calling_ae)

    def send_objects(self, objects: Sequence[Outgoing], calling_ae: str) -> None:
        """One association, negotiating exactly the objects' SOP classes and transfer syntaxes."""
        self._send([(o.dataset.SOPClassUID, o.dataset.file_meta.TransferSyntaxUID, o.dataset)
                    for o in objects], calling_ae)

    def _send(self, items: Sequence[tuple[UID, UID, Dataset | Path]], calling_ae: str) -> None:
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for sop_class, syntax in sorted({(str(sop_class), str(syntax)) for sop_class, syntax, _ in items}):
            ae.add_requested_context(sop_class, syntax)
        tls_args = None
        if self.tls is not None:
            tls_args = (client_context(self.tls, f"destination {self.name}: tls"), self.host)
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title, max_pdu=self.max_pdu,
                             tls_args=tls_args)
        if not assoc.is_established:
            if assoc.is_rejected and assoc.acceptor.primitive is not None:
                result = assoc.acceptor.primitive.result
                reason = assoc.acceptor.primitive.reason_str
                raise DeliveryError(f"association rejected: {reason}", permanent=result == 0x01)
            if assoc.rejected_contexts:  # the peer accepted the association but none of our SOP classes
                refused = {UID(cx.abstract_syntax or "").name for cx in assoc.rejected_contexts}
                names = ", ".join(sorted(refused))
                raise DeliveryError(f"destination does not accept {names}", permanent=True)
            cause = connect_error(self.host, self.port, self.timeout)
            if cause:  # the operator sees "Connection refused", "No route to host", a timeout...
                where = f"{self.host}:{self.port}"
                raise DeliveryError(f"no association: destination unreachable: {cause} ({where})",
                                    permanent=False)
            how = " or the TLS handshake failed" if self.tls else ""
            raise DeliveryError("no association (the destination accepted the connection, then closed "
                                f"it{how})", permanent=False)
        try:
            accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
            for sop_class, _, item in items:
                if str(sop_class) not in accepted:
                    if sop_class in OPTIONAL_SOP_CLASSES:
                        log.info("destination %s does not accept %s: skipped (the BINARY SEG and surfaces "
                                 "carry the same content)", self.label, sop_class.name)
                        continue
                    raise DeliveryError(f"destination does not accept SOP class {sop_class.name}",
                                        permanent=True)
                status = assoc.send_c_store(item)
                if "Status" not in status:
                    raise DeliveryError("connection lost during C-STORE", permanent=False)
                code = int(status.Status)
                if code != 0x0000 and code not in WARNING_STATUSES:
                    transient = code & 0xFF00 == 0xA700  # out of resources: try again later
                    raise DeliveryError(f"C-STORE of {sop_class.name} refused with status 0x{code:04X}",
                                        permanent=not transient)
        finally:
            assoc.release()
