"""Decoding while receiving (node.decode_ahead, inference.series.decoded): compressed instances
decoded as they are stored give the volume stage the same voxels without decoding them again; a
kept result is used only for the very file it was decoded from; nothing is decoded for an
association that has ended, for uncompressed instances or for series no rule could take; and the
kept pixels go with their series (retention) and are never taken for instances (spool recovery).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import free_port
from tests.peers import vesalius_node, wait_for
from tests.phantoms import Cylinder, Sphere, write_phantom_series
from vesalius.inference.series import decoded, j2k, load_series
from vesalius.inference.series.read import decode_ahead
from vesalius.node.config import Config, Retention, Rule
from vesalius.node.decode_ahead import DecodeAhead
from vesalius.node.receive import Receiver, build_ae
from vesalius.node.retention import DAY, cleanup
from vesalius.node.routing import may_take
from vesalius.node.spool_recovery import unrecorded_files
from vesalius.node.store import SeriesInfo, Store

OBJECTS = [Sphere(center=(4.0, -3.0, 2.0), radius=9.0, hu=900.0),
           Cylinder(center=(-6.0, 5.0, 0.0), axis=(0.0, 0.0, 1.0), radius=5.0, length=30.0, hu=-800.0)]


def j2k_series(folder: Path, slices: int = 6, **kwargs: object) -> list[Path]:
    phantom = write_phantom_series(folder, shape=(slices, 40, 36), spacing=(2.0, 1.0, 1.0), objects=OBJECTS,
                                   **kwargs)
    for path in phantom.paths:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        ds.save_as(path)
    return list(phantom.paths)


def counting_j2k_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    decode = j2k._jpeg2k_decode
    monkeypatch.setattr(j2k, "_jpeg2k_decode", lambda src: calls.append(1) or decode(src))
    return calls


def test_a_series_decoded_ahead_reads_the_same_voxels_without_decoding_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = j2k_series(tmp_path / "ct")
    fresh = load_series(paths)
    calls = counting_j2k_decodes(monkeypatch)
    assert all(decode_ahead(path) for path in paths)
    assert len(calls) == len(paths) and all(decoded.cache_path(p).is_file() for p in paths)
    ahead = load_series(paths)
    assert len(calls) == len(paths)  # the volume stage decoded nothing itself
    assert ahead.array.dtype == fresh.array.dtype == np.int16
    np.testing.assert_array_equal(ahead.array, fresh.array)
    np.testing.assert_array_equal(ahead.affine, fresh.affine)
    assert fresh.array.std() > 100  # the phantom's objects are in it


def test_pixels_kept_for_an_earlier_file_of_the_name_or_broken_ones_are_not_used(tmp_path: Path) -> None:
    paths = j2k_series(tmp_path / "ct")
    other = j2k_series(tmp_path / "other", study_uid=pydicom.dcmread(paths[0]).StudyInstanceUID)
    for path in paths:
        decode_ahead(path)
    # the same name now holds another image (an instance sent again is a new file, renamed over)
    replacement = pydicom.dcmread(paths[0])
    replacement.PixelData = pydicom.dcmread(other[3]).PixelData
    replacement.save_as(tmp_path / "new.dcm")
    os.replace(tmp_path / "new.dcm", paths[0])
    decoded.cache_path(paths[1]).write_bytes(b"")  # what a crash can leave: renamed, never written
    assert decoded.load(paths[0]) is None and decoded.load(paths[1]) is None
    decoded.save(paths[2], np.zeros((3, 3), np.int16), os.stat(paths[2]))  # not the header's shape
    volume = load_series(paths)
    decoded.remove_folder(paths[0].parent)
    np.testing.assert_array_equal(volume.array, load_series(paths).array)


def test_uncompressed_instances_and_large_ones_are_not_decoded_ahead(tmp_path: Path) -> None:
    phantom = write_phantom_series(tmp_path / "ct", shape=(2, 20, 20), objects=OBJECTS)
    assert pydicom.dcmread(phantom.paths[0]).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert decode_ahead(phantom.paths[0]) is False
    assert not decoded.cache_path(phantom.paths[0]).exists()
    compressed = j2k_series(tmp_path / "j2k", slices=1)[0]  # 40 x 36 x 2 bytes decoded
    assert decode_ahead(compressed, max_bytes=40 * 36 * 2 - 1) is False
    assert not decoded.cache_path(compressed).exists()
    assert decode_ahead(compressed, max_bytes=40 * 36 * 2) is True


def test_only_series_a_rule_could_take_are_decoded_ahead() -> None:
    ct, mr = Rule(name="ct", modality=("CT",)), Rule(name="mr", modality=("MR",))
    anything = Rule(name="any", modality=())
    assert may_take(Config(rules=(ct,)), "CT", str(CTImageStorage))
    assert not may_take(Config(rules=(ct,)), "MR", "1.2.840.10008.5.1.4.1.1.4")
    assert may_take(Config(rules=(ct, mr)), "MR", "1.2.840.10008.5.1.4.1.1.4")
    assert may_take(Config(rules=(anything,)), "PT", "1.2.840.10008.5.1.4.1.1.4")
    assert not may_take(Config(rules=(anything,)), "CT", "1.2.840.10008.5.1.4.1.1.66.4")  # a SEG
    assert not may_take(Config(rules=(anything,)), "CT", str(CTImageStorage), manufacturer="Vesalius")
    assert not may_take(Config(rules=()), "CT", str(CTImageStorage))


class Association:
    """What DecodeAhead asks of a pynetdicom association."""

    def __init__(self, established: bool) -> None:
        self.is_established = established


def test_nothing_is_decoded_for_an_ended_association_an_unwanted_series_or_on_a_full_disk(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    paths = j2k_series(tmp_path / "ct", slices=2)
    ds = pydicom.dcmread(paths[0])
    info = SeriesInfo(ds.SeriesInstanceUID, ds.StudyInstanceUID, "CT", str(CTImageStorage), "", "", "")
    for path in paths:
        ds = pydicom.dcmread(path)
        store.store_instance(info, ds.SOPInstanceUID, path.read_bytes(), "SCANNER")
    spooled = store.series_paths(info.series_instance_uid)
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in spooled]
    ahead = DecodeAhead(store, wanted=lambda _: True, threads=1)
    ahead.submit(info, uids[0], Association(established=False)).result(timeout=30)
    assert not decoded.cache_path(spooled[0]).exists()
    ahead.submit(info, uids[1], Association(established=True)).result(timeout=30)
    assert decoded.load(spooled[1]) is not None
    assert DecodeAhead(store, wanted=lambda _: False).submit(info, uids[0], Association(True)) is None
    low_on_disk = DecodeAhead(store, wanted=lambda _: True, min_free_bytes=2**62, threads=1)
    low_on_disk.submit(info, uids[0], Association(established=True)).result(timeout=30)
    # at most max_queued instances wait: the rest is left to the job
    gate = threading.Event()

    class Held:  # an association the decoder waits on
        @property
        def is_established(self) -> bool:
            gate.wait(30)
            return True

    full = DecodeAhead(store, wanted=lambda _: True, threads=1, max_queued=1)
    waiting = full.submit(info, uids[1], Held())
    assert full.submit(info, uids[1], Association(established=True)) is None
    gate.set()
    waiting.result(timeout=30)
    assert full.submit(info, uids[1], Association(established=True)).result(timeout=30) is None
    full.shutdown()
    # the decoding thread runs below the listener's priority (its own nice value, on Linux)
    nice = {int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
            for task in Path("/proc/self/task").iterdir()}
    assert os.getpriority(os.PRIO_PROCESS, 0) + 10 in nice
    for pool in (ahead, low_on_disk):
        pool.shutdown()
    assert not decoded.cache_path(spooled[0]).exists()


def test_the_listener_decodes_a_compressed_series_while_its_association_is_open(tmp_path: Path) -> None:
    """A real association: every JPEG 2000 instance is decoded before the association ends (and
    the uncompressed one is not); the kept pixels are not mistaken for instances by spool recovery
    and go with the series when retention removes it."""
    config = Config(host="127.0.0.1", data_dir=tmp_path / "data", rules=(Rule(name="ct", modality=("CT",)),))
    store = Store(config.data_dir)
    ahead = DecodeAhead(store, wanted=lambda info: may_take(config, info.modality, info.sop_class_uid))
    offered: list[str] = []
    lock = threading.Lock()

    def submit(info: SeriesInfo, sop_uid: str, assoc: object) -> None:
        with lock:
            offered.append(sop_uid)
        ahead.submit(info, sop_uid, assoc)

    ae, handlers = build_ae(config, Receiver(store, node_name="test", decode_ahead=submit))
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        paths = j2k_series(tmp_path / "ct")
        plain = write_phantom_series(tmp_path / "plain", shape=(1, 40, 36), objects=OBJECTS).paths[0]
        scu = AE(ae_title="SCANNER")
        scu.add_requested_context(CTImageStorage, JPEG2000Lossless)
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", port, ae_title=config.ae_title)
        assert assoc.is_established
        for path in [*paths, plain]:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
        uids = {str(pydicom.dcmread(p).SeriesInstanceUID) for p in paths}
        assert len(uids) == 1
        spooled = store.series_paths(uids.pop())
        wait_for(lambda: all(decoded.load(p) is not None for p in spooled), 30,
                 "every compressed instance decoded while the association is open")
        assoc.release()
    finally:
        server.shutdown()
        ahead.shutdown()
    assert sorted(offered) == sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in paths)
    plain_spooled = store.series_paths(str(pydicom.dcmread(plain).SeriesInstanceUID))
    assert [decoded.cache_path(p).exists() for p in plain_spooled] == [False]

    missing, refused = unrecorded_files(store)
    assert missing == [] and refused == {}  # the kept pixels are neither instances nor leftovers
    with store.transaction() as db:
        db.execute("UPDATE series SET state='complete', completed_at=?", (time.time(),))
    rules = Retention(spool_days=0, results_days=0, unrouted_days=1, free_space_high_water_mb=0)
    report = cleanup(store, rules, now=time.time() + 2 * DAY, free=10**15)
    assert len(report["removed"]) == 2
    # the kept pixels went with their series' files, and the emptied folders with them
    assert [p.name for p in store.spool_dir.iterdir()] == [".incoming"]
    assert not [p for p in store.spool_dir.rglob("*") if p.is_file()]


def test_pixels_no_job_read_within_the_hour_are_swept(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    folders = []
    for n in range(2):
        folder = store.spool_series_dir("1.2.3", f"1.2.3.{n}")
        folder.mkdir(parents=True)
        (folder / "1.dcm").write_bytes(b"instance")
        decoded.save(folder / "1.dcm", np.zeros((4, 4), np.int16), os.stat(folder / "1.dcm"))
        folders.append(folder)
    two_hours_ago = time.time() - 7200
    os.utime(folders[0] / decoded.FOLDER, (two_hours_ago, two_hours_ago))
    cleanup(store, Retention(free_space_high_water_mb=0), free=10**15)
    assert not (folders[0] / decoded.FOLDER).exists() and (folders[0] / "1.dcm").exists()
    assert decoded.load(folders[1] / "1.dcm") is not None  # decoded minutes ago: a job may need it


BODY = [Cylinder((0, 0, 0), (0, 0, 1), 50, 80, 40), Cylinder((22, -4, 0), (0, 0, 1), 16, 60, -850),
        Cylinder((-22, -4, 0), (0, 0, 1), 16, 60, -850), Sphere((0, 30, 0), 8, 700)]


def test_a_job_reads_what_was_decoded_ahead_and_then_removes_it(tmp_path: Path) -> None:
    """A real node: the series is decoded while its association is open, the job that processes
    it leaves no decoded pixels behind."""
    rule = '[[rules]]\nname = "ct"\ntrigger = "series"\nselect = "all"\n'
    phantom = write_phantom_series(tmp_path / "ct", shape=(16, 64, 64), spacing=(3.0, 2.0, 2.0), objects=BODY)
    for path in phantom.paths:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        ds.save_as(path)
    with vesalius_node(tmp_path, config=rule) as node:
        scu = AE(ae_title="SCANNER")
        scu.add_requested_context(CTImageStorage, JPEG2000Lossless)
        assoc = scu.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established
        for path in phantom.paths:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
        spool = node.data_dir / "spool"
        wait_for(lambda: len(list(spool.glob(f"*/*/{decoded.FOLDER}/*.npy"))) == len(phantom.paths), 60,
                 "the series decoded while its association is open")
        assoc.release()
        done = wait_for(lambda: [j for j in node.jobs() if j["state"] in ("done", "failed")], 120, "the job")
        assert [j["state"] for j in done] == ["done"], node.log()[-3000:]
        assert not list(spool.rglob(decoded.FOLDER))
