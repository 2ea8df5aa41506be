"""DICOM TLS against DCMTK: storescu +tls into the node's TLS listener, the node into storescp +tls,
certificates made here by a throwaway CA (tests/tls_pki.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import free_port
from tests.peers import DCMTK_ENV, StoreSCP, port_open, running, storescu, vesalius_node, wait_for
from tests.phantoms import Cylinder, write_phantom_series
from tests.test_e2e import COMPREHENSIVE_3D_SR, PREVIEW, SEG, SURFACE
from tests.tls_pki import CertificateAuthority, Identity
from vesalius.node.config import ConfigError, parse_config
from vesalius.node.destinations import DeliveryError
from vesalius.node.destinations.dicom import DicomDestination
from vesalius.node.tls import ClientTLS, ListenerTLS


@dataclass(frozen=True)
class Pki:
    ca: Path
    node: Identity  # the node's server certificate (localhost, 127.0.0.1), also its client certificate
    scanner: Identity  # a client the CA signed
    pacs: Identity  # storescp's server certificate
    wrong_host: Identity  # a server certificate for another host name
    rogue_ca: Path
    intruder: Identity  # a client certificate from the CA nobody trusts


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = CertificateAuthority(folder, "test-ca"), CertificateAuthority(folder, "rogue-ca")
    return Pki(ca=ca.identity.certificate,
               node=ca.issue("vesalius-node", ("localhost", "127.0.0.1")),
               scanner=ca.issue("scanner1"),
               pacs=ca.issue("pacs", ("localhost", "127.0.0.1")),
               wrong_host=ca.issue("elsewhere", ("pacs.example.org",)),
               rogue_ca=rogue.identity.certificate,
               intruder=rogue.issue("intruder"))


def tls_args(identity: Identity | None, ca: Path) -> list[str]:
    """DCMTK's TLS options: our key and certificate (or anonymous), the CA we trust."""
    own = ["+tls", str(identity.private_key), str(identity.certificate), "-pw"] if identity else ["+tla"]
    return [*own, "+cf", str(ca)]


@contextmanager
def storescp_tls(folder: Path, pki: Pki, server: Identity | None = None) -> Iterator[StoreSCP]:
    """DCMTK storescp +tls: its own certificate, and it requires a client certificate the CA signed."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = ["storescp", *tls_args(server or pki.pacs, pki.ca), "-aet", "PACS", "-od", str(folder), "+xa",
           str(port)]
    with running(cmd, folder.parent / f"storescp-tls-{port}.log", DCMTK_ENV):
        wait_for(lambda: port_open(port), 10, "storescp +tls to listen")
        yield StoreSCP("PACS", port, folder)


def node_tls_config(pki: Pki, tls_port: int, extra: str = "") -> str:
    return (f"tls_port = {tls_port}\n{extra}[tls]\ncertificate = '{pki.node.certificate}'\n"
            f"private_key = '{pki.node.private_key}'\nca_certificates = '{pki.ca}'\n")


def tls_destination(pki: Pki, port: int, host: str = "127.0.0.1") -> str:
    return (f"[[destinations]]\nname = 'secure-pacs'\nae_title = 'PACS'\nhost = '{host}'\nport = {port}\n"
            f"tls = true\ntls_ca_certificates = '{pki.ca}'\ntls_certificate = '{pki.node.certificate}'\n"
            f"tls_private_key = '{pki.node.private_key}'\n")


def small_chest(folder: Path) -> list[Path]:
    body, spine = Cylinder((0, 0, 0), (0, 0, 1), 90, 80, 40), Cylinder((0, 55, 0), (0, 0, 1), 16, 70, 700)
    return write_phantom_series(folder, shape=(24, 64, 64), spacing=(4.0, 3.6, 3.6), objects=[body, spine],
                                series_description="TLS chest").paths


def echo(port: int, tls: ClientTLS | None = None, calling: str = "PROBE") -> bool:
    """A pynetdicom C-ECHO, plain or over TLS: True only on success."""
    from vesalius.node.tls import client_context

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    ae.add_requested_context(Verification)
    args = (client_context(tls), "localhost") if tls else None
    assoc = ae.associate("127.0.0.1", port, ae_title="VESALIUS", tls_args=args)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return "Status" in status and status.Status == 0
    finally:
        assoc.release()


def test_series_in_over_tls_results_out_over_tls(tmp_path: Path, pki: Pki) -> None:
    """storescu +tls -> the node's TLS listener; the results -> storescp +tls, mutual TLS both ways."""
    paths = small_chest(tmp_path / "ct")
    tls_port = free_port()
    with storescp_tls(tmp_path / "pacs", pki) as pacs, \
            vesalius_node(tmp_path, config=node_tls_config(pki, tls_port) + tls_destination(pki, pacs.port)) \
            as node:
        storescu(paths, tls_port, calling="SCANNER", extra=tls_args(pki.scanner, pki.ca))
        wait_for(lambda: node.delivered(1), 240, "the results at storescp +tls")
        # the delivery row is written before its log line: wait for the line, not only the row
        wait_for(lambda: "delivery done" in node.log(), 30, "the delivery's log line")
        log = node.log()
        received = {str(pydicom.dcmread(p).SOPClassUID) for p in pacs.files()}
    assert received == {SEG, SURFACE, COMPREHENSIVE_3D_SR, PREVIEW}
    assert f"dicom_tls=127.0.0.1:{tls_port}" in log
    assert "TLS connection from 127.0.0.1:" in log and "certificate CN='scanner1'" in log
    assert f"destination=secure-pacs (dicom PACS@127.0.0.1:{pacs.port} tls)" in log


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[tuple[object, int]]:
    tmp = tmp_path_factory.mktemp("tls-node")
    tls_port = free_port()
    with vesalius_node(tmp, config=node_tls_config(pki, tls_port)) as node:
        yield node, tls_port


def test_untrusted_client_certificate_is_refused_and_logged(tmp_path: Path, pki: Pki, tls_node) -> None:
    node, tls_port = tls_node
    paths = small_chest(tmp_path / "ct")[:1]
    for identity, ca in ((pki.intruder, pki.ca), (None, pki.ca)):  # a foreign CA's client, and no certificate
        cmd = ["storescu", *tls_args(identity, ca), "-aet", "INTRUDER", "-aec", "VESALIUS",
               "127.0.0.1", str(tls_port), str(paths[0])]
        result = subprocess.run(cmd, capture_output=True, text=True, env=DCMTK_ENV, timeout=60)
        assert result.returncode != 0 and "Association Request Failed" in result.stderr, result.stderr
    wait_for(lambda: node.log().count("refused: certificate not trusted") >= 1, 10, "the refusal log line")
    wait_for(lambda: "refused: PEER_DID_NOT_RETURN_A_CERTIFICATE" in node.log(), 10,
             "the refusal of a client without a certificate")
    assert not node.get("/series")  # nothing was stored


def test_plain_dicom_on_the_tls_port_fails_while_the_plain_port_serves(pki: Pki, tls_node) -> None:
    node, tls_port = tls_node
    assert not echo(tls_port)  # no TLS: no association, no C-ECHO success
    assert echo(node.port)  # the plain listener keeps serving
    assert echo(tls_port, ClientTLS(pki.ca, pki.scanner.certificate, pki.scanner.private_key))
    assert not echo(tls_port, ClientTLS(pki.ca))  # TLS, but no client certificate: mutual TLS refuses
    assert echo(node.port)


def test_a_silent_client_does_not_hold_up_the_others(pki: Pki, tls_node) -> None:
    """A connection that never starts its handshake waits in its own thread, not in the accept loop."""
    node, tls_port = tls_node
    scanner = ClientTLS(pki.ca, pki.scanner.certificate, pki.scanner.private_key)
    with socket.create_connection(("127.0.0.1", tls_port)), socket.create_connection(("127.0.0.1", tls_port)):
        assert echo(tls_port, scanner)  # upstream pynetdicom blocks here until the silent ones give up


def test_echo_command_over_tls(pki: Pki, tls_node) -> None:
    node, tls_port = tls_node
    base = [sys.executable, "-m", "vesalius.node.cli", "echo", f"VESALIUS@localhost:{tls_port}"]
    mutual = ["--tls-ca", str(pki.ca), "--tls-certificate", str(pki.scanner.certificate),
              "--tls-private-key", str(pki.scanner.private_key)]
    ok = subprocess.run([*base, *mutual], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "success" in ok.stdout, ok.stderr
    refused = subprocess.run([*base, "--tls", "--tls-ca", str(pki.ca)], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 1
    half = subprocess.run([*base, "--tls-certificate", str(pki.scanner.certificate)], capture_output=True,
                          text=True, timeout=60)
    assert half.returncode == 2 and "go together" in half.stderr


def result_files(tmp_path: Path) -> list[Path]:
    return small_chest(tmp_path / "stand-in")[:2]  # CT slices stand in for results: C-STORE is C-STORE


def destination(pki: Pki, port: int, host: str = "127.0.0.1", **tls: object) -> DicomDestination:
    settings = {"ca_certificates": pki.ca, "certificate": pki.node.certificate,
                "private_key": pki.node.private_key, **tls}
    return DicomDestination("pacs", "PACS", host, port, timeout=10, tls=ClientTLS(**settings))  # type: ignore[arg-type]


def test_destination_verifies_the_peer(tmp_path: Path, pki: Pki) -> None:
    files = result_files(tmp_path)
    with storescp_tls(tmp_path / "pacs", pki) as pacs:
        destination(pki, pacs.port, "localhost").send(files)
        assert len(pacs.files()) == 2
        for untrusted in (destination(pki, pacs.port, ca_certificates=pki.rogue_ca),  # CA does not match
                          destination(pki, pacs.port, certificate=None, private_key=None)):  # no client cert
            with pytest.raises(DeliveryError, match="TLS handshake failed") as err:
                untrusted.send(files)
            assert not err.value.permanent
    with storescp_tls(tmp_path / "other", pki, server=pki.wrong_host) as other:
        with pytest.raises(DeliveryError, match="TLS handshake failed"):
            destination(pki, other.port).send(files)  # the certificate names pacs.example.org
        destination(pki, other.port, verify_hostname=False).send(files)
        assert len(other.files()) == 2


# --- configuration ------------------------------------------------------------------------------------


def test_tls_keys_are_read(pki: Pki) -> None:
    config = parse_config({"tls_port": 2762, "tls": {
        "certificate": str(pki.node.certificate), "private_key": str(pki.node.private_key),
        "ca_certificates": str(pki.ca)}, "destinations": [
        {"ae_title": "PACS", "host": "h", "port": 2762, "tls": True, "tls_ca_certificates": str(pki.ca)},
        {"ae_title": "OLD", "host": "h", "port": 104}]})
    assert config.tls == ListenerTLS(pki.node.certificate, pki.node.private_key, pki.ca, True)
    secure, plain = config.destinations
    assert isinstance(secure, DicomDestination) and isinstance(plain, DicomDestination)
    assert secure.tls == ClientTLS(ca_certificates=pki.ca, verify_hostname=True) and plain.tls is None
    assert secure.label == "PACS (dicom PACS@h:2762 tls)"


def test_relative_certificate_paths_start_at_the_config_file(tmp_path: Path, pki: Pki) -> None:
    from vesalius.node.config import load_config

    (tmp_path / "ca.pem").write_bytes(pki.ca.read_bytes())
    (tmp_path / "v.toml").write_text("[[destinations]]\nae_title = 'P'\nhost = 'h'\nport = 1\ntls = true\n"
                                     "tls_ca_certificates = 'ca.pem'\n")
    (secure,) = load_config(tmp_path / "v.toml").destinations
    assert isinstance(secure, DicomDestination) and secure.tls is not None
    assert secure.tls.ca_certificates == tmp_path / "ca.pem"


@pytest.mark.parametrize(("data", "message"), [
    ({"tls_port": 2762}, "tls_port: the TLS listener needs a [tls] table"),
    ({"tls": {"certificate": "x"}}, "tls.private_key: required"),
    ({"tls_port": 11112, "tls": {}}, "tls.certificate: required"),
    ({"tls_port": 2762, "tls": {"certificate": "/nowhere.crt", "private_key": "/nowhere.key",
                                "require_client_certificate": False}}, "tls.certificate: no such file"),
    ({"tls_port": 2762, "tls": {"certificate": "c", "private_key": "k"}},
     "tls.ca_certificates: required with require_client_certificate = true"),
    ({"tls_port": 2762, "tls": {"certificate": "c", "private_key": "k", "colour": 1}},
     "tls.colour: unknown key"),
    ({"destinations": [{"ae_title": "P", "host": "h", "port": 1, "tls_ca_certificates": "ca.pem"}]},
     "destinations[0].tls_ca_certificates: only with tls = true"),
    ({"destinations": [{"ae_title": "P", "host": "h", "port": 1, "tls": "yes"}]},
     "destinations[0].tls: expected true or false"),
    ({"destinations": [{"ae_title": "P", "host": "h", "port": 1, "tls": True,
                        "tls_ca_certificates": "/nowhere.pem"}]},
     "destinations[0].tls_ca_certificates: no such file"),
    ({"destinations": [{"name": "w", "kind": "dicomweb", "url": "https://h/x", "tls": True}]},
     'destinations[0].tls: only for kind = "dicom"'),
])
def test_tls_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in str(err.value)


def test_tls_port_must_differ_and_tls_needs_a_port(pki: Pki) -> None:
    files = {"certificate": str(pki.node.certificate), "private_key": str(pki.node.private_key),
             "ca_certificates": str(pki.ca)}
    with pytest.raises(ConfigError, match="tls_port: must differ from port"):
        parse_config({"port": 2762, "tls_port": 2762, "tls": files})
    with pytest.raises(ConfigError, match="tls: set tls_port"):
        parse_config({"tls": files})


def test_mismatched_key_is_a_config_error_at_start(tmp_path: Path, pki: Pki) -> None:
    from vesalius.node.tls import server_context

    with pytest.raises(ConfigError, match="tls.certificate: cannot load"):
        server_context(ListenerTLS(pki.node.certificate, pki.scanner.private_key, pki.ca))
    with pytest.raises(ConfigError, match="tls_certificate: cannot load"):
        destination(pki, 1, private_key=pki.scanner.private_key).check()
