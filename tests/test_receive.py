"""The listener with real senders: DCMTK storescu and a pynetdicom SCU against `vesalius serve`."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pydicom
import pynetdicom._config
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, RLELossless
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.peers import DCMTK_ENV, NodeProcess, storescu, vesalius_node, wait_for
from tests.phantoms import Sphere, write_phantom_series

# The receive tests do not need jobs: route nothing, so only the listener is exercised.
NO_JOBS = '[[rules]]\nname = "none"\nmodality = ["NO_SUCH_MODALITY"]\n'


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    tmp = tmp_path_factory.mktemp("receive")
    with vesalius_node(tmp, config="stability_timeout = 3\n" + NO_JOBS) as running_node:
        yield running_node


def series_row(node: NodeProcess, uid: str) -> dict | None:
    return next((s for s in node.get("/series") if s["series_instance_uid"] == uid), None)


def small_series(folder: Path, n: int = 6, **kwargs) -> object:
    return write_phantom_series(folder, shape=(n, 32, 32), spacing=(2, 2, 2),
                                objects=[Sphere((0, 0, 0), 10, 300)], **kwargs)


def test_series_stored_durably_then_complete(node: NodeProcess, tmp_path: Path) -> None:
    phantom = small_series(tmp_path / "s", n=8)
    result = storescu(phantom.paths, node.port)
    assert "Status" not in result.stderr or "Success" in result.stderr
    row = wait_for(lambda: (r := series_row(node, phantom.series_uid)) and r["state"] == "stored" and r,
                   15, "the series to complete")
    assert row["instances"] == 8 and row["calling_ae"] == "SCANNER" and row["modality"] == "CT"
    spooled = sorted((node.data_dir / "spool" / phantom.study_uid / phantom.series_uid).glob("*.dcm"))
    assert len(spooled) == 8
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).PixelData for p in phantom.paths}
    for path in spooled:  # the spool holds the bytes we were sent, as valid Part 10 files
        ds = pydicom.dcmread(path)
        assert ds.PixelData == sent[ds.SOPInstanceUID]
    metrics = node.get("/metrics")
    assert "vesalius_instances_received_total" in metrics
    assert not list(node.data_dir.rglob("*.tmp"))


def test_duplicate_instance_is_stored_once(node: NodeProcess, tmp_path: Path) -> None:
    phantom = small_series(tmp_path / "d", n=3)
    storescu([*phantom.paths, phantom.paths[0]], node.port)
    storescu([phantom.paths[1]], node.port)
    # the first association may complete the series at its release; the second reopens it
    row = wait_for(lambda: (r := series_row(node, phantom.series_uid)) and r["state"] == "stored"
                   and r["instances"] == 3 and r, 15, "the series to complete with 3 instances")
    assert row["instances"] == 3


@pytest.mark.parametrize(("encoder", "syntax", "flag"), [
    ("dcmcjpeg", JPEGLosslessSV1, "-xs"),
    ("dcmcrle", RLELossless, "-xr"),
])
def test_compressed_series_accepted_as_sent(node: NodeProcess, tmp_path: Path, encoder: str,
                                            syntax: str, flag: str) -> None:
    phantom = small_series(tmp_path / "raw", n=3)
    compressed = []
    for path in phantom.paths:
        out = tmp_path / f"c-{path.name}"
        subprocess.run([encoder, str(path), str(out)], check=True, env=DCMTK_ENV)
        compressed.append(out)
    storescu(compressed, node.port, extra=[flag])
    folder = node.data_dir / "spool" / phantom.study_uid / phantom.series_uid
    stored = wait_for(lambda: len(files := sorted(folder.glob("*.dcm"))) == 3 and files, 10, "3 files")
    assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in stored} == {syntax}


def test_missing_uid_refused_and_association_goes_on(node: NodeProcess, tmp_path: Path) -> None:
    phantom = small_series(tmp_path / "m", n=2)
    good = pydicom.dcmread(phantom.paths[0])
    bad = pydicom.dcmread(phantom.paths[1])
    del bad.SeriesInstanceUID
    ae = AE(ae_title="BADSENDER")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="VESALIUS")
    assert assoc.is_established
    try:
        refused = assoc.send_c_store(bad)
        accepted = assoc.send_c_store(good)
        echo = assoc.send_c_echo()
    finally:
        assoc.release()
    assert refused.Status == 0xC000
    assert accepted.Status == 0x0000 and echo.Status == 0x0000
    wait_for(lambda: "refused instance from BADSENDER: missing SeriesInstanceUID" in node.log(), 5,
             "the refusal log line")


def test_series_open_across_associations_completes_after_stability_timeout(
        node: NodeProcess, tmp_path: Path) -> None:
    phantom = small_series(tmp_path / "o", n=2)
    ae = AE(ae_title="SLOWSENDER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="VESALIUS")
    try:
        for path in phantom.paths:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
        # the association stays open: only the stability timeout (3 s here) can complete the series
        row = wait_for(lambda: (r := series_row(node, phantom.series_uid)) and r["state"] == "stored" and r,
                       15, "completion by stability timeout")
        completed, last = (datetime.fromisoformat(row[k]) for k in ("completed_at", "last_received"))
        assert (completed - last).total_seconds() >= 3
    finally:
        assoc.release()


def test_echo_command(node: NodeProcess) -> None:
    import sys

    result = subprocess.run([sys.executable, "-m", "vesalius.node.cli",
                             "echo", f"VESALIUS@127.0.0.1:{node.port}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "success" in result.stdout
    result = subprocess.run([sys.executable, "-m", "vesalius.node.cli",
                             "echo", "VESALIUS@127.0.0.1:1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1


def send_one(port: int, ds: pydicom.Dataset | Path, calling: str = "FUZZY",
             sop_class: str = CTImageStorage) -> int:
    """C-STORE one dataset (or file, sent as its raw bytes) from a pynetdicom SCU; returns the
    status, or -1 when no association could be made."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="VESALIUS")
    if not assoc.is_established:
        return -1
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_inconsistent_instances_refused_with_reason(node: NodeProcess, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    phantom = small_series(tmp_path / "i", n=3)
    # the file meta (hence the command) says CT; the data set's own SOP Class UID says MR.
    # pynetdicom sends such a file's bytes as they are when STORE_SEND_CHUNKED_DATASET is on.
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    raw = phantom.paths[0].read_bytes()
    at = raw.rindex(CTImageStorage.encode())
    (tmp_path / "wrong.dcm").write_bytes(raw[:at] + b"1.2.840.10008.5.1.4.1.1.4" + raw[at + 25:])
    short_pixels = pydicom.dcmread(phantom.paths[1])
    short_pixels.PixelData = short_pixels.PixelData[:-64]
    assert send_one(node.port, tmp_path / "wrong.dcm") == 0xA900
    assert send_one(node.port, short_pixels) == 0xC000
    assert send_one(node.port, pydicom.dcmread(phantom.paths[2])) == 0x0000
    log = wait_for(lambda: "pixel data holds" in node.log() and node.log(), 5, "the log lines")
    assert "refused instance from FUZZY: SOP Class UID 1.2.840.10008.5.1.4.1.1.4" in log


def test_allow_list_and_low_disk(tmp_path: Path) -> None:
    phantom = small_series(tmp_path / "a", n=1)
    config = 'allowed_calling_aes = ["CT1"]\nmin_free_disk_mb = 100000000\n' + NO_JOBS
    with vesalius_node(tmp_path, config=config) as picky:
        assert send_one(picky.port, pydicom.dcmread(phantom.paths[0]), calling="STRANGER") == -1
        assert send_one(picky.port, pydicom.dcmread(phantom.paths[0]), calling="CT1") == 0xA700
        wait_for(lambda: "from STRANGER" in picky.log() and "MB free" in picky.log(), 5, "log lines")
        assert picky.get("/series") == []


def test_full_disk_refuses_then_recovers_and_database_stays_sound(tmp_path: Path) -> None:
    """The node's data folder on a small tmpfs of its own (a private mount namespace)."""
    import shutil
    import sqlite3

    phantom = small_series(tmp_path / "f", n=4)
    for threshold_mb in (8, 0):  # the configured threshold, then the disk really full (ENOSPC)
        data = tmp_path / f"data{threshold_mb}"
        data.mkdir()
        mount = f'mount -t tmpfs -o size=48m tmpfs "{data}" && exec "$@"'
        config = f"min_free_disk_mb = {threshold_mb}\n" + NO_JOBS
        with vesalius_node(tmp_path, data_dir=data, config=config,
                           wrap=["unshare", "-rm", "sh", "-c", mount, "sh"]) as node:
            inside = Path(f"/proc/{node.proc.pid}/root") / data.relative_to("/")
            assert shutil.disk_usage(inside).total <= 48 * 2**20
            assert send_one(node.port, pydicom.dcmread(phantom.paths[0])) == 0x0000
            ballast = inside / "ballast"
            with open(ballast, "wb", buffering=0) as f:  # fill the disk below the threshold, or completely
                try:
                    while shutil.disk_usage(inside).free > max(threshold_mb - 1, 0) * 2**20:
                        f.write(b"\0" * 2**18)
                except OSError:  # ENOSPC: completely full
                    pass
            assert send_one(node.port, pydicom.dcmread(phantom.paths[1])) == 0xA700
            ballast.unlink()  # space returns
            assert send_one(node.port, pydicom.dcmread(phantom.paths[2])) == 0x0000
            copy = tmp_path / f"copy{threshold_mb}"  # SQLite would resolve /proc/PID/root away
            copy.mkdir()
            for name in ("vesalius.sqlite", "vesalius.sqlite-wal"):
                shutil.copy(inside / name, copy / name)
            db = sqlite3.connect(copy / "vesalius.sqlite")
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            stored = {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")}
            db.close()
            assert len(stored) == 2 and not list(inside.rglob("*.tmp"))


# --- the per-instance receive path's cuts (issue 14): same results, less work -----------------


def test_contexts_copied_with_their_uids_kept(tmp_path: Path) -> None:
    """The acceptor's per-association copy is a real copy of the contexts (negotiation mutates
    them) that shares only the immutable UIDs."""
    import copy

    from pynetdicom import AllStoragePresentationContexts

    from vesalius.node.receive import ACCEPTED_SYNTAXES, copy_contexts

    ae = AE()
    for context in AllStoragePresentationContexts[:5]:
        ae.add_supported_context(context.abstract_syntax, list(ACCEPTED_SYNTAXES))
    contexts = ae.supported_contexts
    copied = copy_contexts(contexts)
    assert [(c.abstract_syntax, c.transfer_syntax) for c in copied] == \
        [(c.abstract_syntax, c.transfer_syntax) for c in copy.deepcopy(contexts)]
    assert copied[0] is not contexts[0] and copied[0].transfer_syntax is not contexts[0].transfer_syntax
    assert copied[0].transfer_syntax[0] is contexts[0].transfer_syntax[0]
    copied[0].result = 0x01
    assert contexts[0].result != 0x01


def test_spool_file_hands_each_flushed_fragment_to_writeback(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from vesalius.node import receive

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(receive, "start_writeback", lambda fd, offset, length: calls.append((offset, length)))
    spool = receive.SpoolFile(tmp_path)
    spool.write(b"\x00" * 132)  # preamble and file meta: pynetdicom does not flush these
    spool.write(b"a" * 1000)
    spool.file.flush()
    spool.write(b"b" * 10)
    spool.file.flush()
    spool.close()
    assert calls == [(0, 1132), (1132, 10)]
    assert Path(spool.name).read_bytes() == b"\x00" * 132 + b"a" * 1000 + b"b" * 10


def test_start_writeback_leaves_the_file_as_written(tmp_path: Path) -> None:
    import os
    import sys

    from vesalius.node import receive

    assert receive._SYNC_FILE_RANGE is not None or not sys.platform.startswith("linux")
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(b"x" * 300_000)
        f.flush()
        receive.start_writeback(f.fileno(), 0, 300_000)
        receive.start_writeback(f.fileno(), 300_000, 0)
        os.fsync(f.fileno())
    assert path.read_bytes() == b"x" * 300_000


def test_pixel_length_checked_without_reading_the_pixel_data(tmp_path: Path) -> None:
    from pydicom.dataelem import RawDataElement

    from vesalius.node import ingest

    series = small_series(tmp_path / "ct", n=1)
    ds = pydicom.dcmread(series.paths[0], defer_size=16)
    assert ingest.instance_problem(ds, str(ds.SOPClassUID), False) == ("", ingest.SUCCESS)
    assert isinstance(ds.get_item("PixelData", keep_deferred=True), RawDataElement)
    assert ds.get_item("PixelData", keep_deferred=True).value is None  # still deferred, never read


@pytest.mark.parametrize("ending", ["release", "abort"])
def test_a_normal_release_wakes_series_completion(tmp_path: Path, ending: str) -> None:
    """The listener tells series completion at once when an association that stored a series
    ended with a normal release (its series may complete on it), not when it was aborted (its
    series wait the quiet period): completion need not wait for its next tick."""
    import threading

    from tests.conftest import free_port
    from vesalius.node.config import Config
    from vesalius.node.receive import Receiver, build_ae
    from vesalius.node.service import open_store

    config = Config(host="127.0.0.1", data_dir=tmp_path / "data")
    store = open_store(config)
    woken = threading.Event()
    ae, handlers = build_ae(config, Receiver(store, node_name="test", on_released=woken.set))
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        series = small_series(tmp_path / "ct", n=2)
        scu = AE(ae_title="SCANNER")
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", port, ae_title=config.ae_title)
        assert assoc.is_established
        for path in series.paths:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
        assoc.release() if ending == "release" else assoc.abort()
        ended = wait_for(lambda: store.query("SELECT released_normally FROM series "
                                             "WHERE released_at IS NOT NULL"), 10, "the association's end")
        assert [r["released_normally"] for r in ended] == [int(ending == "release")]
        # told right after that record (a release), never (an abort)
        assert (woken.wait(5) if ending == "release" else woken.is_set()) == (ending == "release")
    finally:
        server.shutdown()
