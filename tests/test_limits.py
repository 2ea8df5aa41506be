"""Memory bounded under hostile bytes, and available under many peers.

Real `vesalius serve` processes on loopback: PDUs claiming 4 GB (before and after association),
a data set streamed without end in a valid association, idle associations from one peer while
sixteen modalities send, idle timeouts, and the allow-list bound to hosts. The node's memory is
read from /proc; bytes and time of every stream are bounded.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification

from tests.peers import DCMTK_ENV, NodeProcess, storescu, vesalius_node, wait_for
from tests.phantoms import Cylinder, write_phantom_series
from vesalius.node import pdu_limits

NO_JOBS = '[[rules]]\nname = "none"\nmodality = ["NONE"]\n'
MB = 2**20
RSS_MARGIN = 300 * MB  # "within a few hundred MB of idle"
STREAM_CAP = 512 * MB  # the most any hostile stream in these tests sends


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class PeakRSS:
    """The largest RSS of a process while the ``with`` block runs (sampled every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, rss(pid), threading.Event()

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss(self.pid))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        print(f"node RSS peak {self.peak // MB} MB")  # shown with pytest -s


def stream(sock: socket.socket, chunks: Iterator[bytes], cap: int = STREAM_CAP) -> int:
    """Send chunks until the peer closes the connection; the bytes sent (at most ``cap``)."""
    sent = 0
    sock.settimeout(30)
    try:
        for chunk in chunks:
            sock.sendall(chunk)
            sent += len(chunk)
            if sent >= cap:
                break
    except OSError:  # closed by the node: what the test expects
        return sent
    return sent


def zeros(size: int = MB) -> Iterator[bytes]:
    block = bytes(size)
    while True:
        yield block


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    return True


def echo_ok(port: int, calling: str = "ECHOSCU") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="VESALIUS")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return "Status" in status and status.Status == 0


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    tmp = tmp_path_factory.mktemp("limits")
    with vesalius_node(tmp, config="max_instance_mb = 32\n" + NO_JOBS) as running_node:
        assert echo_ok(running_node.port)
        yield running_node


def test_associate_rq_claiming_4gb_closes_the_connection(node: NodeProcess) -> None:
    idle = rss(node.proc.pid)
    with PeakRSS(node.proc.pid) as peak, socket.create_connection(("127.0.0.1", node.port)) as sock:
        header = struct.pack(">BBL", 0x01, 0, 4 * 2**30 - 1)
        sent = stream(sock, _chain(header, zeros()))
        assert closed_by_peer(sock)
    assert sent < STREAM_CAP, "the node kept reading a 4 GB A-ASSOCIATE-RQ"
    assert peak.peak - idle < RSS_MARGIN, f"node grew by {(peak.peak - idle) // MB} MB"
    assert "exceeds the 65536 bytes it may send now" in node.log()
    assert echo_ok(node.port)


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def established(port: int) -> tuple[AE, object, socket.socket, int]:
    """A valid association for CT Image Storage; its raw socket and the accepted context id."""
    ae = AE(ae_title="STREAMER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="VESALIUS")
    assert assoc.is_established
    return ae, assoc, assoc.dul.socket.socket, assoc.accepted_contexts[0].context_id


def test_p_data_claiming_4gb_closes_the_association(node: NodeProcess) -> None:
    idle = rss(node.proc.pid)
    _, assoc, sock, _ = established(node.port)
    with PeakRSS(node.proc.pid) as peak:
        sent = stream(sock, _chain(struct.pack(">BBL", 0x04, 0, 4 * 2**30 - 1), zeros()))
        wait_for(lambda: not assoc.is_established, 30, "the node to drop the association")
    assert sent < STREAM_CAP
    assert peak.peak - idle < RSS_MARGIN, f"node grew by {(peak.peak - idle) // MB} MB"
    assert "a PDU of 4294967295 bytes (type 0x04) exceeds the 4194304 bytes" in node.log()
    assert echo_ok(node.port)


def command_pdv(context_id: int, sop_instance_uid: str) -> bytes:
    """One P-DATA-TF PDU holding a whole C-STORE-RQ command set (data set follows)."""
    cmd = Dataset()
    cmd.AffectedSOPClassUID = CTImageStorage
    cmd.CommandField = 0x0001
    cmd.MessageID = 1
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = sop_instance_uid
    body = encode(cmd, True, True)
    group = Dataset()
    group.CommandGroupLength = len(body)
    command = encode(group, True, True) + body
    return pdu([(context_id, 0x03, command)])


def pdu(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    items = b"".join(struct.pack(">LBB", len(data) + 2, cx, control) + data for cx, control, data in pdvs)
    return struct.pack(">BBL", 0x04, 0, len(items)) + items


def huge_dataset(context_id: int, sop_instance_uid: str, size: int = 3 * 2**30) -> Iterator[bytes]:
    """A C-STORE of a CT data set whose Pixel Data is ``size`` bytes, generated as it is sent."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    head = encode(ds, False, True) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, size)
    yield command_pdv(context_id, sop_instance_uid)
    yield pdu([(context_id, 0x00, head)])
    fragment = bytes(MB)
    for _ in range(size // MB):
        yield pdu([(context_id, 0x00, fragment)])


def test_3gb_data_set_is_refused_while_it_arrives(node: NodeProcess) -> None:
    idle = rss(node.proc.pid)
    _, assoc, sock, cx = established(node.port)
    uid = generate_uid()
    with PeakRSS(node.proc.pid) as peak:
        sent = stream(sock, huge_dataset(cx, uid))
        wait_for(lambda: not assoc.is_established, 30, "the node to drop the association")
    assert sent < STREAM_CAP, "the node accepted more than max_instance_mb"
    assert peak.peak - idle < RSS_MARGIN, f"node grew by {(peak.peak - idle) // MB} MB"
    assert "a data set of more than 33554432 bytes" in node.log()
    spool = node.data_dir / "spool"
    assert not any(p.is_file() for p in spool.rglob("*") if ".incoming" not in p.parts)
    wait_for(lambda: not any((spool / ".incoming").iterdir()), 10, "the partial data set to be deleted")
    assert echo_ok(node.port)


def test_received_data_sets_are_written_in_the_spool(node: NodeProcess, tmp_path: Path) -> None:
    """Chunked receive puts its temporary file in spool/.incoming: storing is a rename, no copy."""
    phantom = write_phantom_series(tmp_path / "s", shape=(2, 16, 16), spacing=(2, 2, 2),
                                   objects=[Cylinder((0, 0, 0), (0, 0, 1), 10, 10, 40)])
    storescu(phantom.paths, node.port)
    spool = node.data_dir / "spool"
    stored = sorted((spool / phantom.study_uid / phantom.series_uid).iterdir())
    assert len(stored) == 2 and (spool / ".incoming").is_dir()
    assert list((spool / ".incoming").iterdir()) == []  # moved, not copied


def test_pdu_reading_is_still_wrapped() -> None:
    """pynetdicom's reading, as the wrapper relies on it: a 6-byte header read, then the body."""
    import inspect

    pdu_limits.install()
    assert DULServiceProvider._read_pdu_data is pdu_limits._read_pdu_data_bounded
    source = inspect.getsource(pdu_limits._original_read)
    header_at, body_at = source.index("self.socket.recv(6)"), source.index("self.socket.recv(pdu_length)")
    assert header_at < body_at


def test_dataset_bytes_counts_only_data_set_fragments() -> None:
    body = pdu([(1, 0x03, b"c" * 10), (1, 0x00, b"d" * 100), (1, 0x02, b"e" * 50)])[6:]
    assert pdu_limits.dataset_bytes(body) == (150, True)
    assert pdu_limits.dataset_bytes(pdu([(1, 0x00, b"d" * 7)])[6:]) == (7, False)


# --- many peers -------------------------------------------------------------------------------


def test_idle_peer_cannot_lock_out_sixteen_modalities(tmp_path: Path) -> None:
    series = [write_phantom_series(tmp_path / f"m{i}", shape=(3, 16, 16), spacing=(2, 2, 2),
                                   objects=[Cylinder((0, 0, 0), (0, 0, 1), 10, 10, 40)], seed=i)
              for i in range(16)]
    with vesalius_node(tmp_path, config=NO_JOBS) as node:
        idler = AE(ae_title="IDLER")
        idler.add_requested_context(Verification)
        held = [idler.associate("127.0.0.1", node.port, ae_title="VESALIUS") for _ in range(20)]
        try:
            accepted = [a for a in held if a.is_established]
            refused = [a for a in held if a.is_rejected]
            assert (len(accepted), len(refused)) == (16, 4)  # max_associations_per_peer = 16
            rj = refused[0].acceptor.primitive
            assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # local-limit-exceeded
            senders = [subprocess.Popen(
                ["storescu", "-aet", f"MOD{i:02d}", "-aec", "VESALIUS", "127.0.0.1", str(node.port),
                 *map(str, s.paths)], env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                for i, s in enumerate(series)]
            for sender in senders:
                out, _ = sender.communicate(timeout=300)
                assert sender.returncode == 0, out.decode(errors="replace")[-2000:]
            stored = {s["series_instance_uid"]: s["instances"] for s in node.get("/series")}
            assert all(stored.get(s.series_uid) == 3 for s in series), stored
            assert all(a.is_established for a in accepted)
        finally:
            for a in held:
                if a.is_established:
                    a.release()
        assert "association from IDLER at 127.0.0.1 refused: this peer already holds " \
               "max_associations_per_peer (16)" in node.log()


def test_total_limit_refuses_with_local_limit_exceeded(tmp_path: Path) -> None:
    config = "max_associations = 3\nmax_associations_per_peer = 3\n" + NO_JOBS
    with vesalius_node(tmp_path, config=config) as node:
        held = []
        for i in range(4):
            ae = AE(ae_title=f"PEER{i}")
            ae.add_requested_context(Verification)
            held.append(ae.associate("127.0.0.1", node.port, ae_title="VESALIUS"))
        try:
            assert [a.is_established for a in held] == [True, True, True, False]
            rj = held[3].acceptor.primitive
            assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
            assert ("association from PEER3 at 127.0.0.1 refused: all max_associations (3) in use"
                    in node.log())
        finally:
            for a in held[:3]:
                a.release()
        assert echo_ok(node.port)  # released ones free their places


def test_idle_associations_are_closed(tmp_path: Path) -> None:
    with vesalius_node(tmp_path, config="idle_timeout = 2\n" + NO_JOBS) as node:
        ae = AE(ae_title="SILENT")
        ae.add_requested_context(Verification)
        silent = ae.associate("127.0.0.1", node.port, ae_title="VESALIUS")
        assert silent.is_established
        wait_for(lambda: not silent.is_established, 60, "the idle association to be closed")
        assert silent.is_aborted
        assert echo_ok(node.port)


def test_allow_list_binds_ae_titles_to_hosts(tmp_path: Path) -> None:
    config = 'allowed_calling_aes = ["CT1@127.0.0.1", "CT2@10.9.9.0/24", "PLAIN"]\n' + NO_JOBS
    with vesalius_node(tmp_path, config=config) as node:
        assert echo_ok(node.port, "CT1")
        assert echo_ok(node.port, "PLAIN")  # the AE-title-only form still works
        for spoofed in ("CT2", "OTHER"):  # CT2 is allowed, but only from 10.9.9.0/24
            ae = AE(ae_title=spoofed)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", node.port, ae_title="VESALIUS")
            assert assoc.is_rejected
            rj = assoc.acceptor.primitive
            assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
        assert "association from CT2 at 127.0.0.1 refused: calling AE and address not in " \
               "allowed_calling_aes" in node.log()


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "message"), [
    ({"max_pdu": 0}, "max_pdu: must be 4096-268435456 bytes"),
    ({"max_pdu": 2**40}, "max_pdu: must be"),
    ({"max_associations": 0}, "max_associations: must be > 0"),
    ({"max_associations_per_peer": "8"}, "max_associations_per_peer: expected an integer"),
    ({"idle_timeout": -1}, "idle_timeout: must be > 0"),
    ({"max_instance_mb": 1.5}, "max_instance_mb: expected an integer"),
    ({"allowed_calling_aes": ["CT1@not-an-address"]}, "allowed_calling_aes[0]: expected AE or AE@IP"),
    ({"allowed_calling_aes": ["@10.0.0.1"]}, "allowed_calling_aes[0]: an AE title is 1-16"),
])
def test_limit_keys_are_validated(data: dict, message: str) -> None:
    from vesalius.node.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(data)


def test_limit_keys_parse() -> None:
    from vesalius.node.config import parse_config

    config = parse_config({"max_pdu": 1048576, "max_associations": 100, "max_associations_per_peer": 4,
                           "idle_timeout": 5, "max_instance_mb": 10,
                           "allowed_calling_aes": ["CT1@10.0.0.0/8", "CT2@::1", "PLAIN"]})
    assert (config.max_pdu, config.max_associations, config.max_associations_per_peer) == (1048576, 100, 4)
    assert (config.idle_timeout, config.max_instance_mb) == (5.0, 10)
    assert config.allowed_calling_aes == ("CT1@10.0.0.0/8", "CT2@::1", "PLAIN")


def test_allow_rules_match_address_and_title() -> None:
    from vesalius.node.admission import AllowRule

    rule = AllowRule.parse("CT1@10.1.0.0/16")
    assert rule.allows("CT1", "10.1.2.3") and not rule.allows("CT1", "10.2.0.1")
    assert not rule.allows("CT2", "10.1.2.3") and not rule.allows("CT1", "not an address")
    assert AllowRule.parse("PLAIN").allows("PLAIN", "192.0.2.1")
    assert AllowRule.parse("V6@::1").allows("V6", "::1")
